// kiln's dashboard: a small page over kiln's JSON API (docs/api.md), kept live by one
// server-sent event stream (GET /v1/events). No framework and no build step: the server embeds
// this file as written. Everything the page shows is put in as text (never as HTML), so nothing
// a recipe, a message or a registry says can run here.
"use strict";

const STAGES = ["source", "render", "rootfs", "kernel", "disk", "verify", "publish"];
const TOKEN_KEY = "kiln.token";
const main = document.getElementById("main");

// ---- small helpers --------------------------------------------------------------------------

/** An element: h("a", {href: "/x", class: "y"}, "text", child, ...). */
function h(tag, props, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function badge(state) {
  return h("span", { class: "state " + String(state || "").toLowerCase() }, state || "?");
}

function toMs(t) {
  if (t === undefined || t === null) return null;
  return typeof t === "number" ? t : Date.parse(t);
}

function ago(ms) {
  if (!ms) return "";
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.floor(s / 60) + " min ago";
  if (s < 86400) return Math.floor(s / 3600) + " h ago";
  return Math.floor(s / 86400) + " d ago";
}

function secs(ms) {
  if (ms === undefined || ms === null) return "";
  return ms < 10000 ? (ms / 1000).toFixed(2) + " s" : (ms / 1000).toFixed(1) + " s";
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + units[i];
}

function short(digest) {
  return digest ? digest.replace("sha256:", "").slice(0, 12) : "";
}

/** An image reference `repo:tag@sha256:…` with its digest cut short (the whole in its title). */
function imageRef(reference) {
  if (!reference) return "";
  const [name, digest] = reference.split("@");
  return h("span", { class: "mono", title: reference }, digest ? name + "@" + short(digest) : name);
}

/** Seconds as people say them: 42 s, 3 min, 5 h, 2 d. */
function span(s) {
  if (s === undefined || s === null) return "";
  if (s < 60) return Math.round(s) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 86400) return Math.floor(s / 3600) + " h";
  return Math.floor(s / 86400) + " d";
}

async function getJSON(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((body.error && body.error.message) || r.status + " " + r.statusText);
  return body;
}

/** Call `fn` at most once per `ms`, after the last request in that time. */
function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function where(e) {
  if (!e || !e.file) return null;
  return e.file + (e.line ? ":" + e.line + (e.column ? ":" + e.column : "") : "");
}

function errorBox(e, stage) {
  const loc = where(e);
  return h("section", { class: "error", role: "alert", "aria-label": "Failure" },
    h("div", {}, stage ? h("strong", {}, stage + " failed: ") : null,
      loc ? h("span", { class: "where mono" }, loc + ": ") : null, e.message || ""),
    e.help ? h("div", {}, h("strong", {}, "help: "), e.help) : null,
    e.detail ? h("pre", { class: "mono" }, e.detail) : null);
}

// ---- the token, for what changes state --------------------------------------------------------

const tokenButton = document.getElementById("token");
const dialog = document.getElementById("token-dialog");

function token() { return sessionStorage.getItem(TOKEN_KEY); }

function showToken() {
  tokenButton.textContent = token() ? "Forget token" : "Enter token";
}

/** Ask for the token; resolves to it, or null when cancelled. */
function askToken() {
  return new Promise((resolve) => {
    const input = document.getElementById("token-input");
    input.value = "";
    const done = (value) => {
      dialog.close();
      form.removeEventListener("submit", onSubmit);
      cancel.removeEventListener("click", onCancel);
      showToken();
      resolve(value);
    };
    const form = document.getElementById("token-form");
    const cancel = document.getElementById("token-cancel");
    const onSubmit = (ev) => {
      ev.preventDefault();
      const t = input.value.trim();
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
      done(t || null);
    };
    const onCancel = () => done(null);
    form.addEventListener("submit", onSubmit);
    cancel.addEventListener("click", onCancel);
    dialog.showModal();
    input.focus();
  });
}

tokenButton.addEventListener("click", async () => {
  if (token()) { sessionStorage.removeItem(TOKEN_KEY); showToken(); } else { await askToken(); }
});

/** POST with the bearer token (asked for once); a refused token is forgotten. */
async function post(path, body) {
  let t = token() || await askToken();
  if (!t) throw new Error("a token is needed to submit");
  const r = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + t },
    body: JSON.stringify(body),
  });
  const answer = await r.json().catch(() => ({}));
  if (r.status === 401) { sessionStorage.removeItem(TOKEN_KEY); showToken(); }
  if (!r.ok) throw new Error((answer.error && answer.error.message) || r.status + " " + r.statusText);
  return answer;
}

// ---- live events ------------------------------------------------------------------------------

const live = document.getElementById("live");
let current = null; // the view on screen: { onEvent(kind, data), stop() }

function connect() {
  const source = new EventSource("/v1/events");
  source.onopen = () => { live.textContent = "live"; live.className = "live on"; };
  source.onerror = () => { live.textContent = "reconnecting…"; live.className = "live off"; };
  for (const kind of ["build", "deploy", "image", "rollout", "agent"]) {
    source.addEventListener(kind, (ev) => {
      let data;
      try { data = JSON.parse(ev.data); } catch { return; }
      if (current && current.onEvent) current.onEvent(kind, data);
    });
  }
}

// ---- navigation -------------------------------------------------------------------------------

function navigate(url) {
  history.pushState(null, "", url);
  route();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest("a");
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin || url.pathname.startsWith("/v1/") || a.target) return;
  ev.preventDefault();
  navigate(url.pathname + url.search);
});
window.addEventListener("popstate", route);

function route() {
  if (current && current.stop) current.stop();
  current = null;
  const path = location.pathname;
  let section = "builds";
  main.replaceChildren();
  if (path === "/" || path === "/builds") current = buildsView();
  else if (path.startsWith("/builds/")) current = buildView(decodeURIComponent(path.slice(8)));
  else if (path === "/images") { section = "images"; current = imagesView(); }
  else if (path === "/fleet") { section = "fleet"; current = fleetView(); }
  else if (path === "/farm") { section = "farm"; current = farmView(); }
  else main.append(h("h1", {}, "Not found"), h("p", {}, "No page at " + path + ". "), h("a", { href: "/" }, "Builds"));
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.section === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

// ---- builds -----------------------------------------------------------------------------------

function buildsView() {
  const params = new URLSearchParams(location.search);
  const state = h("select", { id: "filter-state", "aria-label": "State" },
    ["all", "queued", "running", "completed", "failed"].map((s) => h("option", { value: s }, s)));
  state.value = params.get("state") || "all";
  const recipe = h("input", { id: "filter-recipe", type: "search", placeholder: "recipe contains…",
    "aria-label": "Recipe", value: params.get("recipe") || "" });
  const recipePath = h("input", { id: "submit-recipe", placeholder: "recipes/app.yaml", required: true,
    "aria-label": "Recipe to build", size: 28 });
  const notice = h("div", { role: "status", "aria-live": "polite" });
  const form = h("form", { id: "submit-form", onsubmit: async (ev) => {
    ev.preventDefault();
    notice.replaceChildren();
    try {
      const r = await post("/v1/builds", { v: 1, recipe: { path: recipePath.value.trim() }, requester: "dashboard" });
      navigate("/builds/" + encodeURIComponent(r.build));
    } catch (e) {
      notice.replaceChildren(h("div", { class: "notice bad" }, "Not submitted: " + e.message));
    }
  } }, h("label", {}, "Recipe path", recipePath), h("button", { type: "submit" }, "Build"));
  const tbody = h("tbody", { id: "builds" });
  const table = h("table", { "aria-label": "Builds" },
    h("thead", {}, h("tr", {}, ["Build", "State", "Stage", "Recipe", "Requester", "Requested"].map((t) => h("th", { scope: "col" }, t)))),
    tbody);
  main.append(h("h1", {}, "Builds"),
    h("div", { class: "bar-tools" }, h("label", {}, "State", state), h("label", {}, "Recipe", recipe), form),
    notice, table);

  let builds = [];
  const draw = () => {
    const want = state.value, text = recipe.value.trim().toLowerCase();
    const shown = builds.filter((b) => (want === "all" || b.state === want) &&
      (!text || (b.recipe || "").toLowerCase().includes(text)));
    tbody.replaceChildren(...shown.map((b) => h("tr", { "data-build": b.id, "data-state": b.state },
      h("td", {}, h("a", { href: "/builds/" + encodeURIComponent(b.id), class: "mono" }, b.id)),
      h("td", {}, badge(b.state)),
      h("td", {}, b.stage || ""),
      h("td", {}, b.recipe || ""),
      h("td", {}, b.requester || ""),
      h("td", { title: new Date(b.requested_ms).toISOString() }, ago(b.requested_ms)))));
    if (!shown.length) {
      tbody.append(h("tr", {}, h("td", { colspan: 6, class: "empty" },
        builds.length ? "No build matches the filters." : "No builds yet: submit one above, with `kiln submit`, or through POST /v1/builds.")));
    }
  };
  const load = async () => {
    try { builds = (await getJSON("/v1/builds?limit=200")).builds; draw(); }
    catch (e) { notice.replaceChildren(h("div", { class: "notice bad" }, "Cannot list builds: " + e.message)); }
  };
  const filters = () => {
    const q = new URLSearchParams();
    if (state.value !== "all") q.set("state", state.value);
    if (recipe.value.trim()) q.set("recipe", recipe.value.trim());
    history.replaceState(null, "", "/" + (q.toString() ? "?" + q : ""));
    draw();
  };
  state.addEventListener("change", filters);
  recipe.addEventListener("input", filters);
  const reload = debounce(load, 300);
  const later = debounce(load, 1500);
  const clock = setInterval(draw, 10000);
  load();
  return {
    onEvent(kind, data) {
      if (kind !== "build") return;
      const m = data.message || {};
      const row = builds.find((b) => b.id === m.build);
      // Show the change at once; the index the list is read from follows within moments.
      if (row && !["completed", "failed"].includes(row.state)) {
        const end = data.subject.endsWith(".failed") ? "failed"
          : data.subject.endsWith(".publish.completed") ? "completed" : null;
        row.state = end || "running";
        row.stage = m.stage || row.stage;
        draw();
      }
      if (!data.subject.endsWith(".progress")) { reload(); later(); }
    },
    stop() { clearInterval(clock); },
  };
}

// ---- one build --------------------------------------------------------------------------------

function buildView(id) {
  const head = h("h1", {}, "Build ", h("span", { class: "mono" }, id));
  const facts = h("dl", { class: "facts" });
  const failure = h("div");
  const timeline = h("div", { class: "timeline", role: "list", "aria-label": "Stages" });
  const consoles = h("div", { id: "consoles" });
  const deploys = h("div");
  const links = h("p", { class: "muted" },
    "JSON: ", h("a", { href: "/v1/builds/" + encodeURIComponent(id) }, "status"), " · ",
    h("a", { href: "/v1/builds/" + encodeURIComponent(id) + "/events" }, "events"), " · ",
    h("a", { href: "/v1/builds/" + encodeURIComponent(id) + "/serial" }, "serial logs"));
  main.append(head, facts, failure, h("h2", {}, "Stages"), timeline,
    h("h2", {}, "Serial console"), consoles, h("h2", {}, "Deployments"), deploys, links);
  document.title = "kiln · " + id;

  let status = null;
  const liveLines = {}; // profile → lines seen in progress events while booting
  let stored = null; // the logs the verify stage stored
  const drawConsoles = () => {
    const boots = stored && stored.boots && stored.boots.length ? stored.boots : null;
    const parts = [];
    if (boots) {
      for (const b of boots) {
        const pre = h("pre", { class: "console mono", tabindex: 0, "aria-label": "Serial console of the " + b.profile + " boot" });
        const text = b.text === null || b.text === undefined ? "(the log is no longer in the object store)" : b.text;
        for (const line of text.split("\n")) {
          if (b.marker_line && line.includes(b.marker_line)) pre.append(h("mark", {}, line), "\n");
          else pre.append(line + "\n");
        }
        parts.push(h("h3", {}, b.profile, b.time_to_marker ? h("span", { class: "muted" }, " · marker after " + Number(b.time_to_marker).toFixed(1) + " s (" + (b.accel || "") + ")") : null,
          b.truncated ? h("span", { class: "muted" }, " · last 2 MiB") : null), pre);
      }
    } else {
      for (const [profile, lines] of Object.entries(liveLines)) {
        parts.push(h("h3", {}, profile, h("span", { class: "muted" }, " · booting, live")),
          h("pre", { class: "console mono", tabindex: 0, "aria-label": "Serial console of the " + profile + " boot, live" }, lines.join("\n")));
      }
    }
    const verify = status && status.stages.find((s) => s.stage === "verify");
    if (!parts.length) parts.push(h("p", { class: "muted" }, verify && verify.status === "failed"
      ? "The boot failed; its last console lines are in the failure above."
      : "No boot yet: the verify stage boots the image under QEMU and its console shows here, live."));
    consoles.replaceChildren(...parts);
  };

  const draw = () => {
    if (!status) return;
    const s = status.summary || {};
    head.replaceChildren("Build ", h("span", { class: "mono" }, id), badge(status.state));
    const rows = [["Recipe", s.recipe], ["Requester", s.requester],
      ["Requested", s.requested_ms ? new Date(s.requested_ms).toLocaleString() + " (" + ago(s.requested_ms) + ")" : null],
      ["Commit", status.commit],
      ["Image", s.image ? h("span", { class: "mono" }, s.image) : null],
      ["Published", s.reference ? h("a", { href: "/images?digest=" + encodeURIComponent(s.reference.split("@")[1] || "") }, s.reference) : null]];
    facts.replaceChildren(...rows.filter(([, v]) => v).flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
    const failed = status.stages.find((st) => st.status === "failed");
    failure.replaceChildren(failed && failed.error ? errorBox(failed.error, failed.stage) : "");

    // One bar per stage on a common time axis: from the first start to the last end (or now).
    const byName = Object.fromEntries(status.stages.map((st) => [st.stage, st]));
    const starts = status.stages.map((st) => toMs(st.started) || toMs(st.time)).filter(Boolean);
    const t0 = starts.length ? Math.min(...starts) : Date.now();
    const ends = status.stages.map((st) => toMs(st.time) || (st.status === "started" ? Date.now() : null)).filter(Boolean);
    const t1 = Math.max(t0 + 1, ...ends);
    timeline.replaceChildren(...STAGES.map((name) => {
      const st = byName[name];
      if (!st) {
        return h("div", { class: "stage waiting", role: "listitem", "data-stage": name },
          h("span", { class: "name" }, name), h("div", { class: "track" }), h("span", { class: "info" }, "waiting"));
      }
      const begin = toMs(st.started) || (toMs(st.time) - (st.duration_ms || 0));
      const end = toMs(st.time) || Date.now();
      const left = ((begin - t0) / (t1 - t0)) * 100;
      const width = ((end - begin) / (t1 - t0)) * 100;
      const duration = st.duration_ms !== undefined ? st.duration_ms : end - begin;
      const info = [st.status === "started" ? "running " + secs(end - begin) : secs(duration),
        st.cache ? "cache " + st.cache : null, st.worker ? "on " + st.worker : null,
        st.attempts > 1 ? st.attempts + " attempts" : null].filter(Boolean).join(" · ");
      const fill = h("div", { class: "fill " + (st.cache || ""), style: null });
      fill.style.left = Math.max(0, Math.min(100, left)) + "%";
      fill.style.width = Math.max(0.4, Math.min(100 - left, width)) + "%";
      const row = h("div", { class: "stage " + st.status, role: "listitem", "data-stage": name,
        "aria-label": name + ": " + st.status + ", " + info },
        h("span", { class: "name" }, name),
        h("div", { class: "track", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
          "aria-valuenow": st.fraction !== undefined ? Math.round(st.fraction * 100) : (st.status === "started" ? null : 100) }, fill),
        h("span", { class: "info" }, h("span", {}, badge(st.status)), " ", info));
      if (st.status === "started" && (st.progress || st.fraction !== undefined)) {
        row.append(h("div", { class: "progress" },
          st.fraction !== undefined ? Math.round(st.fraction * 100) + "% " : "", st.progress || ""));
      }
      return row;
    }));

    const d = status.deployments || [];
    deploys.replaceChildren(d.length
      ? h("table", { "aria-label": "Deployments" },
          h("thead", {}, h("tr", {}, ["Agent", "Result", "Image", "Pulled", "Detail"].map((t) => h("th", { scope: "col" }, t)))),
          h("tbody", {}, d.map((x) => h("tr", {}, h("td", {}, x.agent || ""), h("td", {}, badge(x.kind)),
            h("td", {}, imageRef(x.reference || x.image)),
            h("td", {}, x.pull ? bytes(x.pull.fetched_bytes) + " of " + bytes(x.pull.bytes) + (x.pull.chunks ? " (delta)" : "") : ""),
            h("td", {}, x.error ? (x.error.message || JSON.stringify(x.error)) : (x.cause || ""))))))
      : h("p", { class: "muted" }, "Not deployed (yet)."));
    drawConsoles();
  };

  let ended = false;
  const load = async () => {
    try {
      status = await getJSON("/v1/builds/" + encodeURIComponent(id));
      const verify = status.stages.find((s) => s.stage === "verify");
      if (verify && verify.status === "completed" && !stored) {
        stored = await getJSON("/v1/builds/" + encodeURIComponent(id) + "/serial");
      }
      ended = status.state === "completed" || status.state === "failed";
      draw();
    } catch (e) {
      main.replaceChildren(h("h1", {}, "Build ", h("span", { class: "mono" }, id)),
        h("div", { class: "notice bad", role: "alert" }, e.message), h("a", { href: "/" }, "All builds"));
      if (current) current.stop();
    }
  };
  const reload = debounce(load, 250);
  const clock = setInterval(() => { if (!ended) draw(); }, 1000);
  load();
  return {
    onEvent(kind, data) {
      const m = data.message || {};
      if (kind === "deploy" && m.build === id) { reload(); return; }
      if (kind !== "build" || m.build !== id) return;
      if (m.stage === "verify" && data.subject.endsWith(".progress") && m.message) {
        const found = /^booting (\S+) [\d.]+ s: (.*)$/.exec(m.message);
        if (found) {
          const lines = (liveLines[found[1]] = liveLines[found[1]] || []);
          if (found[2] && lines[lines.length - 1] !== found[2]) { lines.push(found[2]); drawConsoles(); }
        }
      }
      reload();
    },
    stop() { clearInterval(clock); document.title = "kiln"; },
  };
}

// ---- images -----------------------------------------------------------------------------------

function imagesView() {
  const params = new URLSearchParams(location.search);
  const only = params.get("digest");
  const body = h("div");
  main.append(h("h1", {}, "Images"), body);
  const checks = new Map(); // reference → what /v1/images/verify said
  let images = [];

  const checkCell = (img) => {
    const v = checks.get(img.reference);
    if (!v) return h("span", { class: "muted" }, "checking…");
    if (v.error) return h("span", { class: "state refused", title: v.error }, "cannot check");
    return h("div", { class: "tags" }, (v.checks || []).map((c) => h("span", { class: "state " + c.status, title: c.detail }, c.what + " " + c.status)));
  };
  const details = (img) => {
    const v = checks.get(img.reference);
    if (!v || v.error) return v && v.error ? h("p", { class: "muted" }, v.error) : "";
    const detailOf = (what) => ((v.checks || []).find((c) => c.what === what) || {}).detail || "";
    return h("details", {}, h("summary", {}, "SBOM (" + (v.packages || []).length + " packages), provenance, boot"),
      h("dl", { class: "facts" },
        h("dt", {}, "Size"), h("dd", {}, bytes(v.size) + (v.format ? " " + v.format : "")),
        h("dt", {}, "Signature"), h("dd", {}, detailOf("signature")),
        h("dt", {}, "SBOM"), h("dd", {}, detailOf("sbom")),
        h("dt", {}, "Provenance"), h("dd", {}, detailOf("provenance")),
        h("dt", {}, "Boot"), h("dd", {}, detailOf("boot"))),
      h("ul", { class: "packages", "aria-label": "Packages" }, (v.packages || []).map((p) => h("li", {}, p.name + (p.version ? " " + p.version : "")))));
  };
  const draw = () => {
    const shown = images.filter((i) => !only || i.digest === only);
    if (!shown.length) {
      body.replaceChildren(h("p", { class: "empty" }, only ? "No image " + only + " was announced." : "No image published yet: recipes with `publish:` are pushed when `kiln up` has --publish-to and --key."));
      return;
    }
    body.replaceChildren(h("table", { "aria-label": "Images" },
      h("thead", {}, h("tr", {}, ["Repository", "Tags", "Digest", "Build", "Published", "Checks", "Running on"].map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, shown.map((i) => h("tr", { "data-digest": i.digest, "data-reference": i.reference },
        h("td", {}, i.repository, i.revoked ? [" ", h("span", { class: "state revoked", title: i.revoked.reason + " (" + i.revoked.by + ")" }, "revoked")] : null),
        h("td", {}, h("div", { class: "tags" }, i.tags.map((t) => h("span", { class: "tag" }, t)))),
        h("td", { class: "mono", title: i.digest }, short(i.digest)),
        h("td", {}, i.build ? h("a", { href: "/builds/" + encodeURIComponent(i.build), class: "mono" }, i.build) : ""),
        h("td", { title: i.published }, ago(toMs(i.published))),
        h("td", {}, checkCell(i), details(i)),
        h("td", {}, i.agents.length ? i.agents.map((a) => h("div", {}, a.agent, " ", badge(a.state))) : h("span", { class: "muted" }, "none")))))));
  };
  let stopped = false;
  const verifyAll = async () => {
    for (const i of images.filter((x) => !only || x.digest === only)) {
      if (stopped) return;
      if (checks.has(i.reference)) continue;
      try { checks.set(i.reference, await getJSON("/v1/images/verify?ref=" + encodeURIComponent(i.reference))); }
      catch (e) { checks.set(i.reference, { error: e.message }); }
      draw();
    }
  };
  const load = async () => {
    try { images = (await getJSON("/v1/images")).images; draw(); verifyAll(); }
    catch (e) { body.replaceChildren(h("div", { class: "notice bad", role: "alert" }, "Cannot list images: " + e.message)); }
  };
  const reload = debounce(load, 500);
  load();
  return {
    onEvent(kind) { if (kind === "image" || kind === "agent" || kind === "deploy") reload(); },
    stop() { stopped = true; },
  };
}

// ---- fleet ------------------------------------------------------------------------------------

function fleetView() {
  const agentsBox = h("div"), rolloutsBox = h("div");
  main.append(h("h1", {}, "Fleet"), h("h2", {}, "Agents"), agentsBox, h("h2", {}, "Rollouts"), rolloutsBox);
  const load = async () => {
    try {
      const [{ agents }, { rollouts }] = await Promise.all([getJSON("/v1/agents"), getJSON("/v1/rollouts")]);
      agentsBox.replaceChildren(agents.length ? h("table", { "aria-label": "Agents" },
        h("thead", {}, h("tr", {}, ["Agent", "State", "Groups", "Running", "Before", "Up", "Heard from"].map((t) => h("th", { scope: "col", class: t === "Up" ? "num" : null }, t)))),
        h("tbody", {}, agents.map((a) => h("tr", { "data-agent": a.agent },
          h("td", {}, a.agent, a.listen ? h("div", { class: "muted mono" }, a.listen) : null),
          h("td", {}, badge(a.state), a.deploying ? h("div", { class: "muted mono" }, "→ " + a.deploying) : null),
          h("td", {}, (a.groups || []).join(", ")),
          h("td", {}, a.digest ? h("a", { href: "/images?digest=" + encodeURIComponent(a.digest) }, imageRef(a.running || a.digest)) : "none"),
          h("td", { class: "muted" }, imageRef(a.previous)),
          h("td", { class: "num" }, span(a.uptime_s)),
          h("td", {}, span(a.last_seen_s) + " ago")))))
        : h("p", { class: "empty" }, "No agent has sent a heartbeat: start one with `kiln agent`."));
      rolloutsBox.replaceChildren(rollouts.length ? h("table", { "aria-label": "Rollouts" },
        h("thead", {}, h("tr", {}, ["Rollout", "Image", "Group", "State", "Waves"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, rollouts.slice().reverse().map(rolloutRow)))
        : h("p", { class: "empty" }, "No rollouts: `kiln rollout REF@DIGEST --group G` starts one."));
    } catch (e) {
      agentsBox.replaceChildren(h("div", { class: "notice bad", role: "alert" }, "Cannot read the fleet: " + e.message));
    }
  };
  const reload = debounce(load, 400);
  const clock = setInterval(load, 10000);
  load();
  return {
    onEvent(kind) { if (kind === "agent" || kind === "rollout" || kind === "deploy") reload(); },
    stop() { clearInterval(clock); },
  };
}

/** One rollout: its image, group, state and each wave with the state of each host. */
function rolloutRow(r) {
  const wave = (hosts, w) => h("div", { class: "wave" + (w === r.wave && r.state === "running" ? " current" : "") },
    h("strong", {}, "wave " + (w + 1) + " (" + (r.waves[w] || "") + "): "),
    hosts.map((name) => {
      const host = (r.hosts || []).find((x) => x.agent === name) || {};
      return h("span", { title: host.detail || "" }, name, " ", badge(host.state || "waiting"), " ");
    }));
  return h("tr", { "data-rollout": r.id },
    h("td", { class: "mono" }, r.id, h("div", { class: "muted" }, "by " + r.by)),
    h("td", {}, imageRef(r.reference)),
    h("td", {}, r.group),
    h("td", {}, badge(r.state), r.reason ? h("div", { class: "muted" }, r.reason) : null),
    h("td", {}, h("div", { class: "waves" }, (r.plan || []).map(wave))));
}

// ---- farm -------------------------------------------------------------------------------------

function farmView() {
  const box = h("div");
  main.append(h("h1", {}, "Farm"), box);
  const card = (label, value, note) => h("div", { class: "card" }, h("div", { class: "label" }, label), h("div", { class: "big" }, value), note ? h("div", { class: "muted" }, note) : null);
  const load = async () => {
    try {
      const f = await getJSON("/v1/farm");
      const queued = f.stages.reduce((n, s) => n + (s.pending || 0), 0);
      const working = f.stages.reduce((n, s) => n + (s.working || 0), 0);
      const ratio = f.cache.hit_ratio === null ? "–" : Math.round(f.cache.hit_ratio * 100) + "%";
      box.replaceChildren(
        h("div", { class: "grid" },
          card("Queued", queued, working + " being worked on"),
          card("Cache hit ratio", ratio, f.cache.hits + " hits, " + f.cache.misses + " misses"),
          card("Workers seen", f.workers.length, "in the last 15 min"),
          card("Object store", bytes(f.object_store_bytes), "kiln-blobs"),
          card("Stream", bytes(f.stream.bytes), f.stream.messages + " messages")),
        h("h2", {}, "Stages"),
        h("table", { "aria-label": "Stages" },
          h("thead", {}, h("tr", {}, ["Stage", "Waiting", "Working", "Cache hits", "Misses", "Median time when missed"].map((t, i) => h("th", { scope: "col", class: i ? "num" : null }, t)))),
          h("tbody", {}, f.stages.map((s) => h("tr", { "data-stage": s.stage }, h("td", {}, s.stage),
            h("td", { class: "num" }, s.pending === null ? "–" : s.pending), h("td", { class: "num" }, s.working === null ? "–" : s.working),
            h("td", { class: "num" }, s.hits), h("td", { class: "num" }, s.misses), h("td", { class: "num" }, secs(s.median_miss_ms)))))),
        h("h2", {}, "Workers"),
        f.workers.length ? h("table", { "aria-label": "Workers" },
          h("thead", {}, h("tr", {}, ["Worker", "Stages", "Completed", "Last seen"].map((t) => h("th", { scope: "col", class: t === "Completed" ? "num" : null }, t)))),
          h("tbody", {}, f.workers.map((w) => h("tr", {}, h("td", {}, w.worker), h("td", {}, w.stages.join(", ")),
            h("td", { class: "num" }, w.completed), h("td", {}, span(w.last_seen_s) + " ago")))))
          : h("p", { class: "empty" }, "No worker completed a stage in the last 15 minutes."),
        h("p", { class: "muted" }, "Cache figures cover the stream's last " + f.window_messages + " messages. Prometheus: ", h("a", { href: "/metrics" }, "/metrics"), "."));
    } catch (e) {
      box.replaceChildren(h("div", { class: "notice bad", role: "alert" }, "Cannot read the farm's state: " + e.message));
    }
  };
  const reload = debounce(load, 2000);
  const clock = setInterval(load, 15000);
  load();
  return {
    onEvent(kind, data) { if (kind === "build" && !data.subject.endsWith(".progress")) reload(); },
    stop() { clearInterval(clock); },
  };
}

showToken();
connect();
route();
