#!/usr/bin/env python3
"""Build-farm scale benchmark (issue #15): listing builds and many cached builds at once.

It starts its own nats-server (JetStream in a temp dir, a free loopback port) and measures:

  status      `kiln status --limit 20` wall time (median of --runs runs, each a new process that
              connects, lists and prints) with 100, 1,000 and 10,000 builds in the history. The
              history is filled cheaply and SYNTHETICALLY: for each build this script publishes,
              over the NATS text protocol, what a cached build of recipes/minimal.yaml puts in
              the `KILN` stream (the request, `started` and v2 `completed` for the seven stages,
              payloads shaped and sized like the real ones, ~5 KB per build) and the build's
              summary in the `kiln-builds` index bucket, as the stage workers write it. `kiln up`
              runs once before to create the stream and buckets, then is stopped, so no worker
              takes the synthetic requests. Each listing is checked: the 20 newest ids, newest
              first. Goal: flat (10,000 <= 2 x the 100 case) and under 100 ms.
  throughput  (unless --no-throughput) a SINGLE `kiln up` node (the three-node cluster with two
              worker hosts is the cluster benchmark's) with a warm $KILN_HOME (one build of the
              recipe first: cold, minutes), then --builds cached build requests of the same
              recipe published at once: builds per second from the first request to the last
              `publish.completed`, and kiln up's peak RSS (VmHWM) before and after.

  cluster     (--cluster, instead of the two above) the throughput case on a farm: a three-node
              JetStream cluster of /usr/sbin/nats-server on free loopback ports (own configuration
              file, store directory and server_name each, `cluster { name, listen, routes }`),
              `kiln up` (its own $KILN_HOME) and one `kiln worker` with every stage (another
              $KILN_HOME: a second host; they share nothing but NATS), both given the
              comma-separated seed list. One build of the recipe warms the cache (cold: minutes;
              its stages land on either process), then --builds cached build requests are
              published at once: builds per second until every one has its `publish.completed`,
              and for each process VmHWM and VmRSS after the warm-up, VmRSS sampled while the
              builds run (the highest, and when 25/50/75/100% had completed) and VmHWM after,
              plus how many of the builds each process's stages completed (from the `worker` of
              each `completed` message in the stream). Goal: memory does not grow with the
              number of builds finished.

Prints a small table, then the whole result as JSON on the last line.

Needs: nats-server (2.9+), a build of kiln (release recommended: --kiln target/release/kiln),
and for throughput QEMU and the Debian mirror (the warm-up build).

With --baseline OLD_KILN, the same `kiln status --limit 20` of another kiln binary (one from
before the build index reads the whole stream) is timed on the same data, for comparison.

Usage: bench/scale.py [--kiln PATH] [--sizes 100,1000,10000] [--runs N] [--builds N]
                      [--home DIR] [--baseline OLD_KILN] [--no-throughput] [--keep]
       bench/scale.py --cluster [--kiln PATH] [--builds N] [--home DIR] [--worker-home DIR]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["source", "render", "rootfs", "kernel", "disk", "verify", "publish"]


def die(msg):
    sys.exit(f"scale.py: {msg}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nats:
    """Just enough of the NATS text protocol: publish, flush, request."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.buf = b""
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"name":"scale.py"}\r\n')
        self.sid = 0
        self.out = []

    def _fill(self):
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            die("the server closed the connection")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line.decode()

    def pub(self, subject, payload):
        self.out.append(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        if len(self.out) >= 512:
            self.sock.sendall(b"".join(self.out))
            self.out = []

    def flush(self):
        if self.out:
            self.sock.sendall(b"".join(self.out))
            self.out = []
        self.sock.sendall(b"PING\r\n")
        while True:
            line = self._line()
            if line == "PONG":
                return
            if line.startswith("-ERR"):
                die(line)

    def request(self, subject, payload=b""):
        self.flush()
        self.sid += 1
        inbox = f"_INBOX.scale.{self.sid}"
        self.sock.sendall(f"SUB {inbox} {self.sid}\r\nUNSUB {self.sid} 1\r\n".encode())
        self.sock.sendall(b"PUB %s %s %d\r\n%s\r\n" % (subject.encode(), inbox.encode(),
                                                        len(payload), payload))
        while True:
            line = self._line()
            if line == "PING":
                self.sock.sendall(b"PONG\r\n")
            elif line.startswith("-ERR"):
                die(line)
            elif line.startswith("MSG "):
                size = int(line.split()[-1])
                while len(self.buf) < size + 2:
                    self._fill()
                body, self.buf = self.buf[:size], self.buf[size + 2:]
                return json.loads(body)

    def messages(self, stream, filt, count):
        """The payloads of the first `count` messages of `stream` matching `filt`, through an
        ephemeral push consumer (no acks) whose deliveries go to an inbox of this connection."""
        self.flush()
        self.sid += 2
        deliver, reply = f"_INBOX.scale.d{self.sid}", f"_INBOX.scale.r{self.sid}"
        dsid, rsid = self.sid - 1, self.sid
        config = {"deliver_subject": deliver, "ack_policy": "none", "deliver_policy": "all",
                  "filter_subject": filt, "replay_policy": "instant", "mem_storage": True,
                  "num_replicas": 1, "inactive_threshold": 60_000_000_000}
        body = json.dumps({"stream_name": stream, "config": config}).encode()
        self.sock.sendall(f"SUB {deliver} {dsid}\r\nSUB {reply} {rsid}\r\n".encode()
                          + b"PUB $JS.API.CONSUMER.CREATE.%s %s %d\r\n%s\r\n"
                          % (stream.encode(), reply.encode(), len(body), body))
        got, name = [], None
        while len(got) < count or name is None:
            line = self._line()
            if line == "PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            if line.startswith("-ERR"):
                die(line)
            if not line.startswith(("MSG ", "HMSG ")):
                continue
            parts = line.split()
            size = int(parts[-1])
            hdr = int(parts[-2]) if parts[0] == "HMSG" else 0
            while len(self.buf) < size + 2:
                self._fill()
            body, self.buf = self.buf[hdr:size], self.buf[size + 2:]
            if int(parts[2]) == rsid:
                created = json.loads(body)
                if "error" in created:
                    die(f"consumer on {stream}: {created['error']}")
                name = created["name"]
            elif int(parts[2]) == dsid and body:  # not a heartbeat or flow control message
                got.append(json.loads(body))
        self.sock.sendall(f"UNSUB {dsid}\r\nUNSUB {rsid}\r\n".encode())
        self.request(f"$JS.API.CONSUMER.DELETE.{stream}.{name}")
        return got

    def stream_info(self, stream, filt=None):
        body = json.dumps({"subjects_filter": filt} if filt else {}).encode()
        return self.request(f"$JS.API.STREAM.INFO.{stream}", body)


def digest(seed):
    import hashlib
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def iso(ms):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + ".%03dZ" % (ms % 1000)


def outputs(stage, n):
    """Outputs shaped like a cached build of recipes/minimal.yaml (sizes as measured)."""
    d = lambda what: digest(f"{what}-{n % 7}")
    if stage == "source":
        return {"path": f"{REPO}/recipes/minimal.yaml"}
    if stage == "render":
        return {"inputs": d("inputs"), "name": "minimal", "recipe": d("recipe")}
    if stage == "rootfs":
        pkgs = [{"name": p, "version": "1.36.1-9", "sha256": d(p)[7:]}
                for p in ["busybox-static", "systemd-boot-efi", "linux-image-6.1.0-56-cloud-amd64",
                          "kmod", "libc6"]]
        return {"packages": pkgs, "rootfs": {"manifest": d("manifest"), "entries": 412}}
    if stage == "kernel":
        return {"kernel": {"version": "6.1.0-56-cloud-amd64", "vmlinuz": d("vmlinuz"),
                           "initrd": d("initrd"), "modules": [d("m1"), d("m2"), d("m3")]}}
    if stage == "disk":
        return {"disk": {"image": d("image"), "format": "qcow2", "disk_size": 268435456,
                         "file_size": 21430272}}
    if stage == "verify":
        return {"verify.direct": {"profile": "direct", "marker_line": "kiln-boot-ok minimal",
                                  "seconds": 4.2, "serial_log": d("serial"), "cached": True,
                                  "accel": "tcg", "machine": "q35", "boot": "direct"}}
    return {"skipped": "the recipe has no publish: section"}


def fill(nats, start, count, t0_ms):
    """Publish `count` synthetic cached builds, numbered from `start`."""
    ids = []
    for n in range(start, start + count):
        bid = "20261205T%06dZ-%08x" % (n % 1000000, n)
        ms = t0_ms + n * 1000
        req = {"v": 1, "id": bid, "recipe": {"path": f"{REPO}/recipes/minimal.yaml"},
               "requester": "bench", "profiles": ["direct"]}
        nats.pub("kiln.build.requested", json.dumps(req).encode())
        for i, stage in enumerate(STAGES):
            worker = "bench-host/4242"
            nats.pub(f"kiln.build.{bid}.{stage}.started", json.dumps(
                {"v": 1, "build": bid, "stage": stage, "worker": worker,
                 "time": iso(ms + 10 * i), "attempt": 1}).encode())
            nats.pub(f"kiln.build.{bid}.{stage}.completed", json.dumps(
                {"v": 2, "build": bid, "stage": stage, "worker": worker,
                 "time": iso(ms + 10 * i + 5), "outputs": outputs(stage, n),
                 "state_digest": digest(f"state-{bid}-{stage}"), "cache": "hit",
                 "duration_ms": 5}).encode())
        summary = {"id": bid, "recipe": f"{REPO}/recipes/minimal.yaml", "requester": "bench",
                   "state": "completed", "stage": "publish", "requested_ms": ms,
                   "updated_ms": ms + 75, "image": digest(f"image-{n % 7}")}
        nats.pub(f"$KV.kiln-builds.{bid}", json.dumps(summary).encode())
        ids.append(bid)
    nats.flush()
    return ids


def time_status(kiln, url, env, runs, expect):
    """Median, min and max wall time of `kiln status --limit 20`; with `expect`, checks the ids."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run([kiln, "status", "--limit", "20", "--json", "--nats", url],
                           capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            die(f"kiln status failed: {p.stderr}")
        got = [b["id"] for b in json.loads(p.stdout)["builds"]]
        if expect is not None and got != expect:
            die(f"kiln status listed {got[:3]}..., expected {expect[:3]}...")
    return statistics.median(times), min(times), max(times)


def vm_hwm_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def vm_kib(pid):
    """{"rss": VmRSS, "hwm": VmHWM} of a process in KiB (None while it is gone)."""
    out = {"rss": None, "hwm": None}
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                out["rss"] = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                out["hwm"] = int(line.split()[1])
    except OSError:
        pass
    return out


def mib(kib):
    return None if kib is None else round(kib / 1024, 1)


def start_up(kiln, url, home, log, extra=()):
    env = dict(os.environ, KILN_HOME=home)
    return subprocess.Popen([kiln, "up", "--nats", url, "--listen", "none", "--recipes", REPO,
                             *extra], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env,
                            cwd=REPO)


def wait_stream(nats, name, timeout=60, proc=None, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = nats.stream_info(name)
        if "config" in info:
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.2)
    die(f"stream {name} did not appear" + (f"; log:\n{tail(log)}" if log else ""))


def start_server(work, name):
    """A nats-server with JetStream in `work`/`name` on a free port; (process, port, client)."""
    server_bin = shutil.which("nats-server") or "/usr/sbin/nats-server"
    port = free_port()
    server = subprocess.Popen([server_bin, "-js", "-a", "127.0.0.1", "-p", str(port),
                               "-sd", os.path.join(work, name)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            return server, port, Nats(port)
        except OSError:
            time.sleep(0.1)
    server.kill()
    die("nats-server did not start")


def start_cluster(work, n=3):
    """`n` nats-server nodes (JetStream, one store directory, configuration file and server_name
    each, routes to the others) on free loopback ports, with a JetStream meta leader; returns
    (processes, client ports, log files)."""
    server_bin = shutil.which("nats-server") or "/usr/sbin/nats-server"
    ports = [(free_port(), free_port(), free_port()) for _ in range(n)]
    procs, logs = [], []
    for i, (port, route, monitor) in enumerate(ports):
        name = f"n{i + 1}"
        routes = ", ".join(f'"nats-route://127.0.0.1:{r}"'
                           for j, (_, r, _) in enumerate(ports) if j != i)
        conf = os.path.join(work, f"{name}.conf")
        with open(conf, "w") as f:
            f.write(f'server_name: {name}\nlisten: "127.0.0.1:{port}"\n'
                    f'http: "127.0.0.1:{monitor}"\n'
                    f'jetstream {{\n  store_dir: "{os.path.join(work, name)}"\n}}\n'
                    f'cluster {{\n  name: kiln-scale\n  listen: "127.0.0.1:{route}"\n'
                    f'  routes: [{routes}]\n}}\n')
        logs.append(os.path.join(work, f"{name}.log"))
        procs.append(subprocess.Popen([server_bin, "-c", conf, "-l", logs[-1]],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    deadline = time.time() + 60
    while True:
        leaders = []
        for _, _, monitor in ports:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{monitor}/jsz", timeout=5) as r:
                    leaders.append(json.load(r).get("meta_cluster", {}).get("leader"))
            except (OSError, ValueError):
                leaders.append(None)
        if all(leaders) and len(set(leaders)) == 1:
            return procs, [p for p, _, _ in ports], logs
        if time.time() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            die(f"no JetStream meta leader in the cluster: {leaders}")
        time.sleep(0.2)


def stop(procs, timeout=30):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def tail(path, n=3000):
    try:
        return open(path, errors="replace").read()[-n:]
    except OSError:
        return ""


def cluster_throughput(kiln, work, up_home, worker_home, builds, recipe):
    """Three nodes, `kiln up` and one `kiln worker` (every stage; another $KILN_HOME), a warm-up
    build, then `builds` cached build requests at once."""
    servers, ports, _ = start_cluster(work)
    urls = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    kilns = []
    try:
        nats = Nats(ports[0])
        up_log, worker_log = os.path.join(work, "up-cluster.log"), os.path.join(work,
                                                                                "worker.log")
        kilns.append(start_up(kiln, urls, up_home, up_log))
        wait_stream(nats, "KV_kiln-builds", timeout=120, proc=kilns[0], log=up_log)
        kilns.append(subprocess.Popen(
            [kiln, "worker", "--nats", urls, "--recipes", REPO], stdout=subprocess.DEVNULL,
            stderr=open(worker_log, "w"), env=dict(os.environ, KILN_HOME=worker_home), cwd=REPO))
        up, worker = kilns
        names = {"kiln up": up, "kiln worker": worker}
        logs = {"kiln up": up_log, "kiln worker": worker_log}
        replicas = nats.stream_info("KILN")["config"]["num_replicas"]

        def crashed():
            for what, p in names.items():
                if p.poll() is not None:
                    return f"{what} exited ({p.returncode}):\n{tail(logs[what])}"
            return None

        # Warm the cache: one build; its stages go to whichever process takes them.
        time.sleep(2)  # the worker's consumers are bound
        if crashed():
            die(crashed())
        t0 = time.perf_counter()
        p = subprocess.run([kiln, "submit", recipe, "--profile", "direct", "--follow", "--json",
                            "--nats", urls], capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, KILN_HOME=up_home))
        if p.returncode != 0:
            die(f"warm-up build failed: {p.stderr}\nkiln up:\n{tail(up_log)}\n"
                f"kiln worker:\n{tail(worker_log)}")
        warm_s = time.perf_counter() - t0
        after_warmup = {what: vm_kib(p.pid) for what, p in names.items()}
        done_before = count_subjects(nats, "kiln.build.*.publish.completed")
        failed_before = count_subjects(nats, "kiln.build.*.*.failed")
        prefix = "scale-%d-" % os.getpid()
        path = os.path.join(REPO, recipe)
        t0 = time.perf_counter()
        for i in range(builds):
            req = {"v": 1, "id": "%s%06d" % (prefix, i), "recipe": {"path": path},
                   "requester": "bench", "profiles": ["direct"]}
            nats.pub("kiln.build.requested", json.dumps(req).encode())
        nats.flush()
        peak_rss = {what: m["rss"] or 0 for what, m in after_warmup.items()}
        marks, checkpoints = [builds * q // 4 for q in (1, 2, 3, 4)], []
        deadline = time.time() + 3600
        while True:
            done = count_subjects(nats, "kiln.build.*.publish.completed") - done_before
            failed = count_subjects(nats, "kiln.build.*.*.failed") - failed_before
            now = {what: vm_kib(p.pid) for what, p in names.items()}
            for what, m in now.items():
                peak_rss[what] = max(peak_rss[what], m["rss"] or 0)
            if marks and done >= marks[0]:
                checkpoints.append({"completed": done, "seconds": round(time.perf_counter() - t0,
                                                                        1),
                                    **{what: mib(m["rss"]) for what, m in now.items()}})
                marks = [m for m in marks if m > done]
            if done + failed >= builds:
                break
            if time.time() > deadline or crashed():
                die(f"{done}/{builds} builds done; {crashed() or 'timed out'}")
            time.sleep(0.25)
        seconds = time.perf_counter() - t0
        after = {what: vm_kib(p.pid) for what, p in names.items()}
        # Who did what: the worker named in each `completed` of the benchmark's builds.
        pid_of = {p.pid: what for what, p in names.items()}
        total = sum((nats.stream_info("KILN", "kiln.build.*.*.completed")["state"]
                     .get("subjects") or {}).values())
        stages = {what: {} for what in names}
        for m in nats.messages("KILN", "kiln.build.*.*.completed", total):
            if not str(m.get("build", "")).startswith(prefix):
                continue
            try:
                what = pid_of[int(str(m.get("worker", "")).rsplit("/", 1)[-1])]
            except (ValueError, KeyError):
                what = str(m.get("worker"))
            stages.setdefault(what, {})
            stages[what][m["stage"]] = stages[what].get(m["stage"], 0) + 1
        failures = {}
        nfailed = sum((nats.stream_info("KILN", "kiln.build.*.*.failed")["state"]
                       .get("subjects") or {}).values())
        for m in nats.messages("KILN", "kiln.build.*.*.failed", nfailed) if nfailed else []:
            if str(m.get("build", "")).startswith(prefix):
                key = f"{m.get('stage')}: {json.dumps(m)[:400]}"
                failures[key] = failures.get(key, 0) + 1
        processes = {}
        for what in names:
            processes[what] = {
                "rss_mib_after_warmup": mib(after_warmup[what]["rss"]),
                "hwm_mib_after_warmup": mib(after_warmup[what]["hwm"]),
                "rss_mib_peak_sampled": mib(peak_rss[what]),
                "rss_mib_after": mib(after[what]["rss"]),
                "hwm_mib_after": mib(after[what]["hwm"]),
                "stages_completed": {st: stages.get(what, {}).get(st, 0) for st in STAGES},
            }
        others = {w: c for w, c in stages.items() if w not in names}
        return {"node": "three-node cluster, kiln up + one kiln worker (all stages)",
                "replicas": replicas, "builds": builds, "completed": done, "failed": failed,
                "seconds": round(seconds, 2), "builds_per_s": round(builds / seconds, 1),
                "warmup_s": round(warm_s, 1), "processes": processes,
                "rss_mib_at": checkpoints, **({"other_workers": others} if others else {}),
                **({"failures": failures} if failures else {})}
    finally:
        stop(kilns)
        stop(servers)


def count_subjects(nats, filt):
    """How many subjects of the `KILN` stream match `filt` (the server's own count per subject)."""
    return len(nats.stream_info("KILN", filt)["state"].get("subjects") or {})


def throughput(kiln, work, home, builds, recipe):
    """A fresh server (the synthetic history must not reach a worker), one kiln up."""
    server, port, nats = start_server(work, "js-throughput")
    url = f"nats://127.0.0.1:{port}"
    log = os.path.join(work, "up-throughput.log")
    up = start_up(kiln, url, home, log)
    try:
        wait_stream(nats, "KV_kiln-stages")
        # Warm the cache: one build of the recipe through the same kiln up.
        t0 = time.perf_counter()
        p = subprocess.run([kiln, "submit", recipe, "--profile", "direct", "--follow", "--json",
                            "--nats", url], capture_output=True, text=True, cwd=REPO,
                           env=dict(os.environ, KILN_HOME=home))
        if p.returncode != 0:
            die(f"warm-up build failed: {p.stderr}\n{open(log).read()[-3000:]}")
        warm_s = time.perf_counter() - t0
        hwm_before = vm_hwm_kib(up.pid)
        done_before = count_subjects(nats, "kiln.build.*.publish.completed")
        path = os.path.join(REPO, recipe)
        t0 = time.perf_counter()
        for i in range(builds):
            req = {"v": 1, "id": "scale-%06d-%d" % (i, os.getpid()), "recipe": {"path": path},
                   "requester": "bench", "profiles": ["direct"]}
            nats.pub("kiln.build.requested", json.dumps(req).encode())
        nats.flush()
        peak = hwm_before or 0
        deadline = time.time() + 3600
        while True:
            done = count_subjects(nats, "kiln.build.*.publish.completed") - done_before
            failed = count_subjects(nats, "kiln.build.*.*.failed")
            peak = max(peak, vm_hwm_kib(up.pid) or 0)
            if done + failed >= builds:
                break
            if time.time() > deadline or up.poll() is not None:
                die(f"{done}/{builds} builds done; kiln up log:\n{open(log).read()[-3000:]}")
            time.sleep(0.25)
        seconds = time.perf_counter() - t0
        return {"node": "single nats-server, one kiln up", "builds": builds,
                "completed": done, "failed": failed, "seconds": round(seconds, 2),
                "builds_per_s": round(builds / seconds, 1), "warmup_s": round(warm_s, 1),
                "kiln_up_peak_rss_mib_before": round((hwm_before or 0) / 1024, 1),
                "kiln_up_peak_rss_mib_after": round(peak / 1024, 1)}
    finally:
        up.terminate()
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        server.terminate()
        server.wait(timeout=30)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiln", default=os.path.join(REPO, "target/release/kiln"))
    ap.add_argument("--sizes", default="100,1000,10000")
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--builds", type=int, default=1000)
    ap.add_argument("--recipe", default="recipes/minimal.yaml")
    ap.add_argument("--home", help="$KILN_HOME for the throughput run (default: a temp dir)")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--baseline", help="another kiln binary (e.g. one built before the build "
                    "index) whose `kiln status --limit 20` is timed on the same data")
    ap.add_argument("--cluster", action="store_true", help="only the throughput case, on a "
                    "three-node cluster with kiln up and one kiln worker")
    ap.add_argument("--worker-home", help="$KILN_HOME of the kiln worker (--cluster; default: "
                    "a temp dir)")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    kiln = os.path.abspath(a.kiln)
    if not os.access(kiln, os.X_OK):
        die(f"{kiln} is not executable (cargo build --release, or --kiln PATH)")
    if a.cluster:
        return cluster_main(a, kiln)
    sizes = [int(s) for s in a.sizes.split(",")]
    work = tempfile.mkdtemp(prefix="kiln-scale-")
    server, port, nats = start_server(work, "js")
    url = f"nats://127.0.0.1:{port}"
    result = {"kiln": kiln, "status": [], "throughput": None}
    try:
        # Stream and buckets, made by kiln itself; then no worker runs.
        home = os.path.join(work, "home-fill")
        up = start_up(kiln, url, home, os.path.join(work, "up-fill.log"))
        wait_stream(nats, "KV_kiln-builds")
        up.terminate()
        up.wait(timeout=30)
        env = dict(os.environ, KILN_HOME=home)
        ids, t0_ms = [], int(time.time() * 1000) - 10**8
        for size in sizes:
            t = time.perf_counter()
            ids += fill(nats, len(ids), size - len(ids), t0_ms)
            fill_s = time.perf_counter() - t
            kiln_state = nats.stream_info("KILN")["state"]
            expect = list(reversed(ids[-20:]))
            med, lo, hi = time_status(kiln, url, env, a.runs, expect)
            row = {
                "builds": size, "median_ms": round(med * 1000, 1), "min_ms": round(lo * 1000, 1),
                "max_ms": round(hi * 1000, 1), "stream_messages": kiln_state["messages"],
                "stream_bytes": kiln_state["bytes"], "fill_s": round(fill_s, 1)}
            if a.baseline:
                bmed, _, _ = time_status(os.path.abspath(a.baseline), url, env,
                                         max(3, a.runs // 3), None)
                row["baseline_median_ms"] = round(bmed * 1000, 1)
            result["status"].append(row)
        if not a.no_throughput:
            thome = a.home or os.path.join(work, "home-throughput")
            result["throughput"] = throughput(kiln, work, thome, a.builds, a.recipe)
    finally:
        server.terminate()
        server.wait(timeout=30)
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)

    print(f"{'builds':>8} {'status --limit 20 (median)':>27} {'min':>8} {'max':>8} "
          f"{'stream msgs':>12} {'stream MiB':>11} {'baseline (median)':>18}")
    for r in result["status"]:
        base = f"{r['baseline_median_ms']:>15.1f} ms" if "baseline_median_ms" in r else ""
        print(f"{r['builds']:>8} {r['median_ms']:>24.1f} ms {r['min_ms']:>5.1f} ms "
              f"{r['max_ms']:>5.1f} ms {r['stream_messages']:>12} "
              f"{r['stream_bytes'] / 2**20:>11.1f} {base}")
    s = result["status"]
    if len(s) >= 2:
        ratio = s[-1]["median_ms"] / s[0]["median_ms"]
        result["status_ratio_largest_to_smallest"] = round(ratio, 2)
        ok = ratio <= 2 and s[-1]["median_ms"] < 100
        print(f"{s[-1]['builds']} / {s[0]['builds']} builds: {ratio:.2f}x "
              f"(goal <= 2x and < 100 ms: {'met' if ok else 'NOT met'})")
    if result["throughput"]:
        t = result["throughput"]
        print(f"throughput ({t['node']}): {t['builds']} cached builds in {t['seconds']} s = "
              f"{t['builds_per_s']} builds/s ({t['completed']} completed, {t['failed']} failed); "
              f"kiln up peak RSS {t['kiln_up_peak_rss_mib_before']} MiB after the warm-up, "
              f"{t['kiln_up_peak_rss_mib_after']} MiB after all")
    print(json.dumps(result))


def cluster_main(a, kiln):
    work = tempfile.mkdtemp(prefix="kiln-scale-cluster-")
    try:
        t = cluster_throughput(kiln, work, a.home or os.path.join(work, "home-up"),
                               a.worker_home or os.path.join(work, "home-worker"), a.builds,
                               a.recipe)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"throughput ({t['node']}, streams R{t['replicas']}): {t['builds']} cached builds in "
          f"{t['seconds']} s = {t['builds_per_s']} builds/s ({t['completed']} completed, "
          f"{t['failed']} failed; warm-up build {t['warmup_s']} s)")
    print(f"{'MiB':>12} {'RSS warm':>9} {'HWM warm':>9} {'RSS peak':>9} {'RSS after':>10} "
          f"{'HWM after':>10}  stages completed ({', '.join(STAGES)})")
    for what, p in t["processes"].items():
        print(f"{what:>12} {p['rss_mib_after_warmup']:>9} {p['hwm_mib_after_warmup']:>9} "
              f"{p['rss_mib_peak_sampled']:>9} {p['rss_mib_after']:>10} {p['hwm_mib_after']:>10}"
              f"  {' '.join(str(p['stages_completed'][st]) for st in STAGES)}")
    for c in t["rss_mib_at"]:
        print(f"  {c['completed']:>5} completed at {c['seconds']:>6} s: "
              + ", ".join(f"{what} RSS {c[what]} MiB" for what in t["processes"]))
    for what, n in t.get("failures", {}).items():
        print(f"  failed x{n}: {what}")
    print(json.dumps({"kiln": kiln, "cluster": t}))


if __name__ == "__main__":
    main()
