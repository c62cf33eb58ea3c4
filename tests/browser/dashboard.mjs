// The dashboard in a real browser (run by tests/dashboard.rs): Debian's Chromium, headless,
// driven by Playwright against a running `kiln up`. Every request the page makes outside the kiln
// server is refused and fails the test. Screenshots of each page go to $KILN_ARTIFACTS.
//
// Environment: KILN_URL (the API's base URL), KILN_TOKEN, KILN_APP (path of recipes/app.yaml),
// KILN_BROKEN (a recipe with an error at KILN_BROKEN_AT, file:line:column), KILN_MARKER (a
// substring of the marker line the app image prints), KILN_AGENT (an agent that runs the app
// image), KILN_BIN, KILN_NATS and KILN_HOME (for `kiln rollout`), KILN_ARTIFACTS,
// KILN_BROWSER_MODULES (where playwright-core is installed), KILN_CHROMIUM.
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";
import { writeFileSync } from "node:fs";

const env = (name) => {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set`);
  return v;
};
const base = env("KILN_URL");
const artifacts = env("KILN_ARTIFACTS");
const require = createRequire(env("KILN_BROWSER_MODULES") + "/");
const { chromium } = require("playwright-core");

const step = (text) => console.log(`[${new Date().toISOString()}] ${text}`);
const BUILD_WAIT = 600_000;

const browser = await chromium.launch({
  executablePath: env("KILN_CHROMIUM"),
  args: ["--no-sandbox", "--disable-dev-shm-usage"],
});
const outside = [];
const problems = [];
let failed = false;
try {
  const context = await browser.newContext({ viewport: { width: 1366, height: 860 } });
  const origin = new URL(base).origin;
  // Any request to another origin is refused here, and recorded: the test fails on it.
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (new URL(url).origin === origin) return route.continue();
    outside.push(url);
    return route.abort("blockedbyclient");
  });
  const page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") problems.push(`console error: ${m.text()}`); });
  const shot = async (name) => {
    const path = `${artifacts}/${name}.png`;
    await page.screenshot({ path, fullPage: true });
    step(`screenshot ${path}`);
  };

  // The list, live: a build submitted through the API shows up, runs and completes without a reload.
  await page.goto(base + "/");
  await page.locator("h1", { hasText: "Builds" }).waitFor();
  await page.locator("#live.on").waitFor({ timeout: 15_000 });
  await page.evaluate(() => { window.kilnLoaded = "once"; });
  const release = String(Date.now());
  const answer = await fetch(base + "/v1/builds", {
    method: "POST",
    headers: { "Content-Type": "application/json", Authorization: "Bearer " + env("KILN_TOKEN") },
    body: JSON.stringify({ v: 1, recipe: { path: env("KILN_APP") }, requester: "browser-test", params: { release } }),
  });
  if (answer.status !== 202) throw new Error(`POST /v1/builds: ${answer.status} ${await answer.text()}`);
  const id = (await answer.json()).build;
  step(`submitted ${id}`);
  const row = page.locator(`tr[data-build="${id}"]`);
  await page.locator(`tr[data-build="${id}"][data-state="running"]`).waitFor({ timeout: 60_000 });
  step("the list shows it running");
  await shot("builds-running");
  await page.locator(`tr[data-build="${id}"][data-state="completed"]`).waitFor({ timeout: BUILD_WAIT });
  step("the list shows it completed");
  if (await page.evaluate(() => window.kilnLoaded) !== "once") throw new Error("the list page was reloaded");
  if (!(await row.textContent()).includes("browser-test")) throw new Error("the row does not name the requester");

  // One build: seven stage bars, the console with the marker line, a shareable URL.
  await row.locator("a").click();
  await page.waitForURL(`**/builds/${id}`);
  await page.locator(".stage.completed").nth(6).waitFor();
  const stages = await page.locator(".timeline .stage").evaluateAll((rows) => rows.map((r) => r.dataset.stage + ":" + r.className));
  if (stages.length !== 7 || !stages.every((s) => s.includes("completed"))) throw new Error(`stage bars: ${stages}`);
  await page.locator("pre.console mark", { hasText: env("KILN_MARKER") }).waitFor({ timeout: 30_000 });
  const consoleText = await page.locator("pre.console").first().textContent();
  if (consoleText.includes("\u001b")) throw new Error("the console shows escape sequences");
  if (consoleText.trim().split("\n").length < 3) throw new Error(`the console shows only: ${consoleText}`);
  step("seven completed stages and the marker line on the console");
  await shot("build");
  // The same URL opened afresh shows the same build.
  const fresh = await context.newPage();
  await fresh.goto(`${base}/builds/${encodeURIComponent(id)}`);
  await fresh.locator(".stage.completed").nth(6).waitFor();
  await fresh.close();

  // Back to the list; submit the broken recipe from the page: the token is asked for once.
  await page.goBack();
  await page.waitForURL(base + "/");
  await row.waitFor();
  await page.fill("#submit-recipe", env("KILN_BROKEN"));
  await page.click("#submit-form button[type=submit]");
  await page.locator("#token-dialog[open]").waitFor();
  await page.fill("#token-input", env("KILN_TOKEN"));
  await page.click("#token-save");
  await page.waitForURL(/\/builds\/[^/]+$/);
  const brokenId = decodeURIComponent(new URL(page.url()).pathname.split("/").pop());
  step(`submitted the broken recipe from the page: ${brokenId}`);
  const alert = page.locator("section.error");
  await alert.waitFor({ timeout: 120_000 });
  const where = await alert.locator(".where").textContent();
  if (!where.includes(env("KILN_BROKEN_AT"))) throw new Error(`the failure says ${where}, not ${env("KILN_BROKEN_AT")}`);
  if (!(await alert.textContent()).includes("help")) throw new Error("the failure has no help");
  await page.locator(".stage.failed").waitFor();
  step(`the failure is shown at ${where.trim()}`);
  await shot("build-failed");
  if (await page.evaluate(() => sessionStorage.getItem("kiln.token")) !== env("KILN_TOKEN")) throw new Error("the token is not kept in session storage");

  // Filters, with the state in the URL.
  await page.goBack();
  await page.selectOption("#filter-state", "failed");
  await page.waitForURL(/\?state=failed/);
  await page.locator(`tr[data-build="${brokenId}"]`).waitFor();
  if (await page.locator(`tr[data-build="${id}"]`).count() !== 0) throw new Error("the failed filter shows a completed build");
  await page.selectOption("#filter-state", "all");
  await page.fill("#filter-recipe", "app.yaml");
  await page.locator(`tr[data-build="${brokenId}"]`).waitFor({ state: "detached" });
  await row.waitFor();
  await page.fill("#filter-recipe", "");
  await shot("builds");

  // Keyboard: on a page just opened, the first Tab reaches the skip link.
  const keys = await context.newPage();
  await keys.goto(base + "/");
  await keys.locator(`tr[data-build="${id}"]`).waitFor();
  await keys.keyboard.press("Tab");
  if (await keys.evaluate(() => document.activeElement.textContent) !== "Skip to content") throw new Error("the first Tab does not reach the skip link");
  await keys.close();

  // Images: the published image with its checks, verified with kiln up's keys.
  await page.click('nav a[data-section="images"]');
  await page.waitForURL(base + "/images");
  const image = page.locator("tbody tr").first();
  await image.locator(".state.verified", { hasText: "signature verified" }).waitFor({ timeout: 60_000 });
  for (const what of ["sbom", "provenance", "boot"]) {
    await image.locator(".state.verified", { hasText: `${what} verified` }).waitFor();
  }
  await image.locator("summary").click();
  const packages = await image.locator("ul.packages li").count();
  if (packages < 1) throw new Error("the SBOM lists no package");
  step(`images: signature, sbom (${packages} packages), provenance and boot verified`);

  // The agent runs the image (the images page says where), then a rollout moves it there.
  const agent = env("KILN_AGENT");
  await image.locator("td", { hasText: agent }).waitFor({ timeout: 300_000 });
  step(`images: running on ${agent}`);
  await shot("images");
  const reference = await image.getAttribute("data-reference");
  const rolled = execFileSync(env("KILN_BIN"), ["rollout", reference, "--group", "web", "--waves", "1",
    "--bake", "1", "--follow", "--json", "--nats", env("KILN_NATS")], { encoding: "utf8", timeout: 300_000 });
  const rollout = JSON.parse(rolled.trim().split("\n").pop());
  step(`rollout ${rollout.id}: ${rollout.state}`);

  await page.click('nav a[data-section="fleet"]');
  await page.locator("h1", { hasText: "Fleet" }).waitFor();
  await page.locator(`tr[data-agent="${agent}"] .state.healthy`).waitFor({ timeout: 30_000 });
  const digest = reference.split("@")[1];
  if (await page.locator(`tr[data-agent="${agent}"] td:nth-child(4) [title$="${digest}"]`).count() !== 1) {
    throw new Error(`the fleet page shows ${agent} running: ${await page.locator(`tr[data-agent="${agent}"]`).textContent()}`);
  }
  await page.locator(`tr[data-rollout="${rollout.id}"] .state.completed`).waitFor({ timeout: 30_000 });
  await page.locator(`tr[data-rollout="${rollout.id}"] .wave .state.deployed`).waitFor();
  step("fleet: the agent healthy on the image, the rollout completed with its wave");
  await shot("fleet");

  await page.click('nav a[data-section="farm"]');
  await page.locator("h1", { hasText: "Farm" }).waitFor();
  await page.locator('tr[data-stage="verify"]').waitFor();
  const misses = Number(await page.locator('tr[data-stage="verify"] td').nth(4).textContent());
  if (!(misses >= 1)) throw new Error(`the farm counts ${misses} verify misses`);
  await shot("farm");

  // Back through the history: farm, fleet, images, then the list again.
  for (const want of [/\/fleet$/, /\/images$/]) {
    await page.goBack();
    await page.waitForURL(want);
  }
  await page.goBack();
  await page.waitForURL(base + "/");
  await row.waitFor();
  step("the back button walks the pages back");
} catch (e) {
  failed = true;
  console.error(`FAILED: ${e.stack || e}`);
} finally {
  await browser.close();
}
writeFileSync(`${artifacts}/outside-requests.json`, JSON.stringify(outside, null, 2));
if (outside.length) { failed = true; console.error(`requests outside the kiln server: ${outside.join(", ")}`); }
if (problems.length) { failed = true; console.error(problems.join("\n")); }
process.exit(failed ? 1 : 0);
