#!/usr/bin/env python3
"""Deploy benchmark (issue #6): how fast `kiln agent` puts a newly published image into service,
and what a client of the guest sees during the swap.

Set-up (all real, on loopback): Debian's `docker-registry`, a `nats-server -js`, two images built
from recipes/app.yaml (`--set release=1` and `release=2`; a busybox httpd on guest port 8080
started by the image's deploy.run) and pushed, signed, with `kiln publish`, and `kiln agent
--listen 127.0.0.1:PORT` watching the tag. The announcements (`kiln.image.published.<repo>`)
are published with the plain NATS protocol, as any CI system could.

Measured, per swap (the image alternates v1 → v2 → v1 …; the first deployment is a cold start):
  published→healthy  from publishing the announcement until the agent's `completed` line (pull,
                     overlay, QEMU start, UEFI boot through OVMF and systemd-boot, the guest's
                     httpd answering on the forwarded port); the agent's own figure
                     (vm.seconds_to_healthy, from receiving the message) is shown beside it.
  client downtime    a client connects to the agent's stable address every 20 ms during the swap
                     and GETs /; downtime = the longest time between two successful answers while
                     the swap runs, failures = requests that got no answer. The new release's first
                     answer is when the proxy switched.

Usage: bench/agent.py [--rounds N] [--kiln PATH] [--work DIR] [--keep]
(KILN_HOME defaults to the tests' shared cache /var/tmp/kiln-test-cache so packages are reused.)
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
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(url, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                           capture_output=True, text=True)
        if r.stdout in ("200", "401"):
            return
        time.sleep(0.1)
    sys.exit(f"{url} did not answer")


def nats_publish(port, subject, payload):
    s = socket.create_connection(("127.0.0.1", port))
    s.recv(4096)
    data = payload.encode()
    s.sendall(b'CONNECT {"verbose":false}\r\n' +
              f"PUB {subject} {len(data)}\r\n".encode() + data + b"\r\nPING\r\n")
    buf = b""
    while b"PONG" not in buf:
        buf += s.recv(100)
    s.close()


def sanitize(name):
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name) or "_"


def get_page(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            text = data.decode(errors="replace")
            if "kiln-app release" in text:
                return text.split("kiln-app release", 1)[1].split()[0]
    except OSError:
        pass
    return None


class Client(threading.Thread):
    """GET / through the agent's address every 20 ms; records (time, release or None)."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port = port
        self.samples = []
        self.stop = False

    def run(self):
        while not self.stop:
            t = time.time()
            self.samples.append((t, get_page(self.port)))
            time.sleep(0.02)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3, help="swaps after the first deployment")
    ap.add_argument("--kiln", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    kiln = args.kiln or next(
        (p for p in [os.path.join(REPO, "target/release/kiln"), os.path.join(REPO, "target/debug/kiln")]
         if os.path.exists(p)), "kiln")
    env = dict(os.environ)
    env.setdefault("KILN_HOME", "/var/tmp/kiln-test-cache")
    for k in ["KILN_NATS_URL", "KILN_REGISTRY_USER", "KILN_REGISTRY_PASSWORD"]:
        env.pop(k, None)
    work = args.work or tempfile.mkdtemp(prefix="kiln-bench-agent.")
    os.makedirs(work, exist_ok=True)
    procs = []
    state = os.path.join(work, "agent-state")
    try:
        reg_port, nats_port, listen = free_port(), free_port(), free_port()
        with open(os.path.join(work, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {work}/registry\n"
                    f"http:\n  addr: 127.0.0.1:{reg_port}\n")
        procs.append(subprocess.Popen(["/usr/bin/docker-registry", "serve", f"{work}/registry.yml"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["nats-server", "-js", "-sd", f"{work}/nats", "-a", "127.0.0.1",
                                       "-p", str(nats_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{reg_port}/v2/")
        time.sleep(0.5)
        key = os.path.join(work, "images.key")
        subprocess.run([kiln, "keygen", "-o", key], check=True, env=env, capture_output=True)
        repo = f"127.0.0.1:{reg_port}/kiln/app"
        published = {}
        for release in ["1", "2"]:
            out = os.path.join(work, f"v{release}")
            print(f"building release {release} …", flush=True)
            subprocess.run([kiln, "build", "recipes/app.yaml", "--set", f"release={release}", "-o", out],
                           check=True, env=env, cwd=REPO, capture_output=True)
            r = subprocess.run([kiln, "publish", os.path.join(out, "app-1.0.0.qcow2"), "--to",
                                f"{repo}:v{release}", "--tag", "latest", "--key", key, "--json"],
                               check=True, env=env, capture_output=True, text=True)
            published[release] = json.loads(r.stdout)
        agent_log = open(os.path.join(work, "agent.log"), "w")
        agent = subprocess.Popen(
            [kiln, "agent", "--nats", f"nats://127.0.0.1:{nats_port}", "--name", "bench",
             "--watch", f"{repo}:latest", "--trust", key + ".pub", "--state-dir", state,
             # Published with kiln publish, outside the pipeline: no boot attestation.
             "--require", "signature",
             "--listen", f"127.0.0.1:{listen}", "--json",
             # `kiln publish` does not know the recipe, so its images carry no deploy settings.
             "--health-port", "8080", "--health-serial", "app-ready"],
            stdout=subprocess.PIPE, stderr=agent_log, text=True, env=env)
        procs.append(agent)
        lines = []

        def read():
            for line in agent.stdout:
                lines.append(json.loads(line))
        threading.Thread(target=read, daemon=True).start()

        def wait_kind(kind, after, limit=600):
            deadline = time.time() + limit
            while time.time() < deadline:
                for v in lines[after:]:
                    if v.get("kind") == kind:
                        return v
                    if v.get("kind") == "failed":
                        sys.exit(f"deploy failed: {v}")
                time.sleep(0.02)
            sys.exit(f"no {kind} from the agent")

        wait_kind("ready", 0)
        subject = f"kiln.image.published.{sanitize(repo)}"
        rows = []
        order = ["1"] + [("2" if i % 2 == 0 else "1") for i in range(args.rounds)]
        for i, release in enumerate(order):
            p = published[release]
            msg = {"v": 1, "build": f"bench-{i}", "repository": repo, "reference": p["reference"],
                   "digest": p["manifest_digest"], "tags": ["latest"],
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
            client = None
            if i > 0:
                client = Client(listen)
                client.start()
                time.sleep(1.0)
            n = len(lines)
            t0 = time.time()
            nats_publish(nats_port, subject, json.dumps(msg))
            done = wait_kind("completed", n)
            healthy = time.time() - t0
            row = {"swap": i, "release": release, "published_to_healthy": healthy,
                   "agent_seconds": done["vm"].get("seconds_to_healthy")}
            if client:
                time.sleep(3.0)
                client.stop = True
                client.join()
                s = client.samples
                ok = [t for t, r in s if r is not None]
                gaps = [b - a for a, b in zip(ok, ok[1:])]
                row["requests"] = len(s)
                row["failures"] = sum(1 for _, r in s if r is None)
                row["downtime"] = max(gaps) if gaps else None
                first_new = next((t for t, r in s if r == release), None)
                row["switched_after"] = (first_new - t0) if first_new else None
            rows.append(row)
            print(json.dumps(row), flush=True)
        swaps = [r for r in rows if r["swap"] > 0]
        print()
        print(f"cold deploy (nothing running): published→healthy {rows[0]['published_to_healthy']:.2f} s")
        if swaps:
            med = lambda k: statistics.median(r[k] for r in swaps)
            print(f"swaps ({len(swaps)}), medians: published→healthy {med('published_to_healthy'):.2f} s "
                  f"(agent: {med('agent_seconds'):.2f} s); client downtime "
                  f"{1000 * med('downtime'):.0f} ms (max {1000 * max(r['downtime'] for r in swaps):.0f} ms), "
                  f"failed requests {sum(r['failures'] for r in swaps)} of {sum(r['requests'] for r in swaps)}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        # The agent's VMs outlive it on purpose: stop them.
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and state in cmd:
                os.kill(int(pid), 9)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
