#!/usr/bin/env python3
"""Fleet benchmark (issue #18): a three-agent rollout in three waves, what the agents' clients see
during it, and how fast a revocation brings every agent back.

Set-up (all real, on loopback): Debian's `docker-registry`, a `nats-server -js`, two images built
from recipes/app.yaml (`--set release=1|2`) and pushed, signed, with `kiln publish`; a `kiln
controller`; three `kiln agent`s in the group `bench` (own state directories and stable addresses;
`--require signature` because `kiln publish` adds no boot attestation). A first rollout of v1 in one
wave brings them up.

Measured, per round (v2, v1, v2, … alternately):
  rollout      wall time of `kiln rollout REF --group bench --waves 1,1,1 --bake B --follow`, from
               the command's start until it prints `completed` (three waves: order, pull, boot,
               health check and swap on each host, one host after the other, each wave baked B s)
  failures     a client per agent GETs / through its stable address every 50 ms during the rollout;
               requests that got no page
Then once: `kiln revoke` of the image all three run, and the time from the command's start until
the last agent's `completed` line back on the image before.

Usage: bench/fleet.py [--profile uefi|direct] [--rounds N] [--bake S] [--kiln PATH] [--work DIR] [--keep]
(KILN_HOME defaults to the tests' shared cache /var/tmp/kiln-test-cache so packages are reused.)
`--profile` is the agents' (`uefi`: OVMF → systemd-boot → kernel; `direct`: QEMU boots the kernel
and initrd of the image's boot entry).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from agent import REPO, free_port, get_page, wait_http  # noqa: E402

AGENTS = ["bench-a", "bench-b", "bench-c"]


class Clients(threading.Thread):
    """GET / through each port every 50 ms; counts answers and failures."""

    def __init__(self, ports):
        super().__init__(daemon=True)
        self.ports = ports
        self.ok = 0
        self.failed = 0
        self.stop = False

    def run(self):
        while not self.stop:
            for p in self.ports:
                if get_page(p) is None:
                    self.failed += 1
                else:
                    self.ok += 1
            time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", default="uefi", help="the agents' QEMU profile: uefi or direct")
    ap.add_argument("--bake", type=int, default=2, help="seconds each wave bakes")
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
    work = args.work or tempfile.mkdtemp(prefix="kiln-bench-fleet.")
    os.makedirs(work, exist_ok=True)
    procs = []
    states = [os.path.join(work, a) for a in AGENTS]
    try:
        reg_port, nats_port = free_port(), free_port()
        nats = f"nats://127.0.0.1:{nats_port}"
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
        digest = {}
        for release in ["1", "2"]:
            out = os.path.join(work, f"v{release}")
            print(f"building release {release} …", flush=True)
            subprocess.run([kiln, "build", "recipes/app.yaml", "--set", f"release={release}", "-o", out],
                           check=True, env=env, cwd=REPO, capture_output=True)
            r = subprocess.run([kiln, "publish", os.path.join(out, "app-1.0.0.qcow2"), "--to",
                                f"{repo}:v{release}", "--key", key, "--json"],
                               check=True, env=env, capture_output=True, text=True)
            digest[release] = json.loads(r.stdout)["manifest_digest"]
        procs.append(subprocess.Popen([kiln, "controller", "--nats", nats, "--name", "bench"],
                                      stdout=subprocess.DEVNULL,
                                      stderr=open(os.path.join(work, "controller.log"), "w"), env=env))
        ports = []
        agents = []
        for name, state in zip(AGENTS, states):
            port = free_port()
            ports.append(port)
            a = subprocess.Popen(
                [kiln, "agent", "--nats", nats, "--name", name, "--watch", f"{repo}:stable",
                 "--trust", key + ".pub", "--require", "signature", "--state-dir", state,
                 "--group", "bench", "--heartbeat-interval", "1",
                 "--listen", f"127.0.0.1:{port}", "--json", "--profile", args.profile,
                 "--health-port", "8080", "--health-serial", "app-ready"],
                stdout=subprocess.PIPE, stderr=open(os.path.join(work, f"{name}.log"), "w"),
                text=True, env=env)
            procs.append(a)
            lines = []
            threading.Thread(target=lambda a=a, lines=lines: [lines.append(json.loads(x)) for x in a.stdout],
                             daemon=True).start()
            agents.append(lines)
        time.sleep(3)

        def rollout(release, waves, bake, unavailable=1):
            t0 = time.time()
            r = subprocess.run([kiln, "rollout", f"{repo}@{digest[release]}", "--group", "bench",
                                "--waves", waves, "--bake", str(bake), "--max-unavailable",
                                str(unavailable), "--follow", "--json", "--nats", nats],
                               env=env, capture_output=True, text=True)
            took = time.time() - t0
            if r.returncode != 0:
                sys.exit(f"rollout of v{release} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
            return took

        print("first rollout (v1, one wave of three) …", flush=True)
        cold = rollout("1", "100%", 0, unavailable=3)
        print(f"cold start of three agents: {cold:.2f} s", flush=True)
        rows = []
        running = "1"
        for i in range(args.rounds):
            release = "2" if running == "1" else "1"
            clients = Clients(ports)
            clients.start()
            took = rollout(release, "1,1,1", args.bake)
            clients.stop = True
            clients.join()
            running = release
            row = {"round": i, "release": release, "rollout_s": round(took, 2),
                   "requests": clients.ok + clients.failed, "failed": clients.failed}
            rows.append(row)
            print(json.dumps(row), flush=True)
        # Revocation of what runs: every agent goes back to the other release.
        marks = [len(lines) for lines in agents]
        t0 = time.time()
        subprocess.run([kiln, "revoke", f"{repo}@{digest[running]}", "--reason", "bench", "--nats", nats],
                       check=True, env=env, capture_output=True)
        back = []
        deadline = time.time() + 600
        for lines, mark in zip(agents, marks):
            while not any(v.get("kind") == "completed" and "revoked" in (v.get("cause") or "")
                          for v in lines[mark:]):
                if time.time() > deadline:
                    sys.exit("an agent did not go back from the revoked image")
                time.sleep(0.02)
            back.append(time.time() - t0)
        print()
        print(f"three agents, waves 1,1,1, bake {args.bake} s, {args.profile} profile, {len(rows)} rounds:")
        print(f"  rollout median {statistics.median(r['rollout_s'] for r in rows):.2f} s "
              f"(min {min(r['rollout_s'] for r in rows):.2f}, max {max(r['rollout_s'] for r in rows):.2f}); "
              f"failed requests {sum(r['failed'] for r in rows)} of {sum(r['requests'] for r in rows)}")
        print(f"  kiln revoke → last agent back on the image before: {max(back):.2f} s "
              f"(each: {', '.join(f'{b:.2f}' for b in back)})")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if "qemu-system" in cmd and any(s in cmd for s in states):
                os.kill(int(pid), 9)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
