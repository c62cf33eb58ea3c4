#!/usr/bin/env python3
"""NATS pipeline benchmark (issue #5): stage-to-stage hop latency and cached-build throughput.

Each round starts its own nats-server (JetStream, file storage in a temp dir, a free loopback
port) and two `kiln worker` processes (every stage each, one shared $KILN_HOME), then:

  warm-up     one build of recipes/minimal.yaml (`kiln submit --follow`, profile direct), so every
              stage of that recipe is recorded in the kiln-stages KV bucket and its blobs are in
              the kiln-blobs object store;
  hops        builds of the same (now cached) recipe submitted one after another; for each, the
              time from a stage's `completed` message to the next stage's `started` message,
              both as the KILN stream stored them (their Nats-Time-Stamp, ns, read back with a
              direct get): source → render → rootfs → kernel → disk → verify → publish, 6 hops a build.
              That is delivery to the next worker, its decoding and its `started` publish.
              Reported: p50 and p99 over all hops;
  burst       100 requests for the cached recipe published at once (JetStream publishes,
              pipelined); total time from the first publish to the 100th `publish completed`,
              and builds per second.

Requests are published and events read over a plain NATS connection from this script (stdlib
only), exactly as docs/messages.md shows them, so no kiln client code is in the measurement.
Goals: hop p50 < 5 ms, 100 cached builds < 10 s. Prints each round and the medians.

The workers' $KILN_HOME is a temp dir whose `blobs` and `debian` directories link to the tests'
shared download cache (/var/tmp/kiln-test-cache) when it exists, so the warm-up downloads the
Debian packages only once per machine.

Usage: bench/pipeline.py [--rounds N] [--builds N] [--hop-builds N] [--kiln PATH] [--keep]
Needs: a release build of kiln (`cargo build --release`), nats-server, QEMU (warm-up boot).
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CACHE = "/var/tmp/kiln-test-cache"
STAGES = ["source", "render", "rootfs", "kernel", "disk", "verify", "publish"]


def default_kiln():
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target"))
    return os.path.join(target, "release", "kiln")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, limit=20.0):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                if s.recv(4).startswith(b"INFO"):
                    return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nats-server on port {port} did not come up")


class Nats:
    """A minimal NATS text-protocol client: publish, subscribe, read messages with receipt times."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self._line()  # INFO
        self.send(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"name":"bench"}\r\n')
        self.sid = 0
        self.headers = b""

    def send(self, data):
        self.sock.sendall(data)

    def sub(self, subject):
        self.sid += 1
        self.send(f"SUB {subject} {self.sid}\r\n".encode())

    def pub(self, subject, payload, reply=None):
        head = f"PUB {subject} {reply} {len(payload)}\r\n" if reply else f"PUB {subject} {len(payload)}\r\n"
        return head.encode() + payload + b"\r\n"

    def _fill(self, timeout):
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except socket.timeout:
            return False
        if not data:
            raise SystemExit("nats-server closed the connection")
        self.buf += data
        return True

    def _line(self, timeout=10.0):
        while b"\r\n" not in self.buf:
            if not self._fill(timeout):
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n, timeout=10.0):
        while len(self.buf) < n:
            if not self._fill(timeout):
                raise SystemExit("timed out inside a message")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def next(self, timeout):
        """(receipt time, subject, payload) of the next message, or None after `timeout`."""
        while True:
            line = self._line(timeout)
            if line is None:
                return None
            now = time.monotonic()
            if line.startswith(b"PING"):
                self.send(b"PONG\r\n")
            elif line.startswith(b"-ERR"):
                raise SystemExit(f"nats-server: {line.decode()}")
            elif line.startswith(b"MSG "):
                parts = line.split()
                data = self._exact(int(parts[-1]) + 2)[:-2]
                self.headers = b""
                return now, parts[1].decode(), data
            elif line.startswith(b"HMSG "):
                parts = line.split()
                hlen, total = int(parts[-2]), int(parts[-1])
                data = self._exact(total + 2)[:-2]
                self.headers = data[:hlen]
                return now, parts[1].decode(), data[hlen:]

    def stored_at(self, subject):
        """The time (ns since the epoch) the KILN stream stored the last message on `subject`,
        by a direct get (its Nats-Time-Stamp header)."""
        self.sid += 1
        inbox = f"_INBOX.bench.get.{self.sid}"
        body = json.dumps({"last_by_subj": subject}).encode()
        self.send(self.pub("$JS.API.DIRECT.GET.KILN", body, inbox))
        while True:
            msg = self.next(10)
            if msg is None:
                raise SystemExit(f"no answer to a direct get of {subject}")
            if msg[1] != inbox:
                continue
            for h in self.headers.split(b"\r\n"):
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"nats-time-stamp":
                    return parse_time_ns(value.strip().decode())
            raise SystemExit(f"direct get of {subject}: no timestamp in {self.headers!r}")


def parse_time_ns(text):
    """RFC 3339 with up to 9 fractional digits, UTC (as nats-server writes it) → ns."""
    import calendar

    main, _, frac = text.rstrip("Z").partition(".")
    secs = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return secs * 1_000_000_000 + int((frac + "000000000")[:9])


def request(build_id, recipe):
    return json.dumps(
        {
            "v": 1,
            "id": build_id,
            "recipe": {"path": recipe},
            "requester": "bench",
            "profiles": ["direct"],
        }
    ).encode()


def event(subject):
    """(build, stage, kind) of a stage event subject kiln.build.<id>.<stage>.<kind>."""
    parts = subject.split(".")
    if len(parts) < 5 or parts[0] != "kiln" or parts[1] != "build":
        return None
    return ".".join(parts[2:-2]), parts[-2], parts[-1]


def wait_builds(nats, ids, limit, times=None):
    """Read events until every build in `ids` has its publish `completed` (the last stage); returns the time the
    last one arrived. Records (build, stage, kind) → receipt time in `times`."""
    pending = set(ids)
    end = time.monotonic() + limit
    last = None
    while pending:
        left = end - time.monotonic()
        if left <= 0:
            raise SystemExit(f"timed out with {len(pending)} builds unfinished")
        msg = nats.next(left)
        if msg is None:
            continue
        now, subject, payload = msg
        if subject.startswith("_INBOX.") and b'"error"' in payload:
            raise SystemExit(f"the stream refused a request: {payload.decode()}")
        ev = event(subject)
        if ev is None:
            continue
        build, stage, kind = ev
        if times is not None:
            times.setdefault((build, stage, kind), now)
        if kind == "failed" and build in pending:
            raise SystemExit(f"build {build} failed at {stage}: {payload[:400]!r}")
        if kind == "completed" and stage == "publish" and build in pending:
            pending.discard(build)
            last = now
    return last


def percentile(values, p):
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def one_round(args, n):
    work = tempfile.mkdtemp(prefix="kiln-bench-pipeline-")
    procs = []
    try:
        home = os.path.join(work, "home")
        os.makedirs(home)
        if os.path.isdir(SHARED_CACHE):
            for sub in ("blobs", "debian"):
                os.makedirs(os.path.join(SHARED_CACHE, sub), exist_ok=True)
                os.symlink(os.path.join(SHARED_CACHE, sub), os.path.join(home, sub))
        port = free_port()
        url = f"nats://127.0.0.1:{port}"
        log = open(os.path.join(work, "nats.log"), "w")
        procs.append(
            subprocess.Popen(
                ["nats-server", "-js", "-sd", os.path.join(work, "js"), "-a", "127.0.0.1", "-p", str(port)],
                stdout=log,
                stderr=log,
            )
        )
        wait_port(port)
        env = dict(os.environ, KILN_HOME=home, KILN_NATS_URL=url)
        for k in ("KILN_OFFLINE", "KILN_ACK_WAIT", "KILN_MAX_DELIVER"):
            env.pop(k, None)
        for w in range(2):
            wlog = open(os.path.join(work, f"worker{w}.log"), "w")
            procs.append(
                subprocess.Popen([args.kiln, "worker", "--nats", url, "--recipes", str(REPO)], env=env, cwd=REPO, stderr=wlog, stdout=wlog)
            )
        recipe = os.path.join(REPO, "recipes", "minimal.yaml")

        # Warm-up: the first build runs every stage for real (`kiln submit` also creates the
        # stream if the workers have not yet).
        t = time.monotonic()
        warm_out = subprocess.run(
            [args.kiln, "submit", recipe, "--profile", "direct", "--id", f"warm-{n}", "--follow", "--nats", url],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if warm_out.returncode != 0:
            raise SystemExit(f"warm-up build failed:\n{warm_out.stdout}{warm_out.stderr}")
        warm = time.monotonic() - t

        nats = Nats(port)
        nats.sub("kiln.build.>")
        nats.sub("_INBOX.bench.>")

        # Hops: cached builds one after another.
        times = {}
        hops = []
        for i in range(args.hop_builds):
            bid = f"hop-{n}-{i}"
            nats.send(nats.pub("kiln.build.requested", request(bid, recipe), "_INBOX.bench.hop"))
            wait_builds(nats, [bid], 120, times)
            for a, b in zip(STAGES, STAGES[1:]):
                done = nats.stored_at(f"kiln.build.{bid}.{a}.completed")
                start = nats.stored_at(f"kiln.build.{bid}.{b}.started")
                hops.append((start - done) / 1e6)

        # Burst: all requests pipelined in one write, then wait for every publish completed.
        ids = [f"burst-{n}-{i}" for i in range(args.builds)]
        batch = b"".join(
            nats.pub("kiln.build.requested", request(b, recipe), f"_INBOX.bench.burst.{i}") for i, b in enumerate(ids)
        )
        t = time.monotonic()
        nats.send(batch)
        last = wait_builds(nats, ids, 600)
        total = last - t
        return {
            "warm_s": warm,
            "hop_p50_ms": percentile(hops, 50),
            "hop_p99_ms": percentile(hops, 99),
            "hops": len(hops),
            "burst_s": total,
            "builds_per_s": args.builds / total,
        }
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if args.keep:
            print(f"  kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--builds", type=int, default=100, help="builds submitted at once (default 100)")
    ap.add_argument("--hop-builds", type=int, default=20, help="sequential cached builds for hop latency")
    ap.add_argument("--kiln", default=default_kiln())
    ap.add_argument("--keep", action="store_true", help="keep each round's temp dir (logs)")
    args = ap.parse_args()
    if not os.access(args.kiln, os.X_OK):
        raise SystemExit(f"{args.kiln} not found: run `cargo build --release` (or pass --kiln)")
    if shutil.which("nats-server") is None:
        raise SystemExit("nats-server not found: apt-get install nats-server")
    rows = []
    for n in range(args.rounds):
        r = one_round(args, n)
        rows.append(r)
        print(
            f"round {n + 1}: warm-up {r['warm_s']:.1f} s, hop p50 {r['hop_p50_ms']:.2f} ms "
            f"p99 {r['hop_p99_ms']:.2f} ms ({r['hops']} hops), {args.builds} cached builds "
            f"{r['burst_s']:.2f} s = {r['builds_per_s']:.1f} builds/s",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print()
    print(f"medians of {args.rounds} rounds (2 workers, loopback nats-server, kiln {args.kiln})")
    print(f"| {'':34} | {'measured':>10} | {'goal':>8} | {'':4} |")
    print(f"|{'-' * 36}|{'-' * 12}|{'-' * 10}|{'-' * 6}|")

    def row(name, value, goal, ok):
        print(f"| {name:34} | {value:>10} | {goal:>8} | {'met' if ok else 'MISS':4} |")

    row("hop latency p50", f"{med['hop_p50_ms']:.2f} ms", "< 5 ms", med["hop_p50_ms"] < 5)
    row("hop latency p99", f"{med['hop_p99_ms']:.2f} ms", "-", True)
    row(f"{args.builds} cached builds at once", f"{med['burst_s']:.2f} s", "< 10 s", med["burst_s"] < 10)
    row("builds per second", f"{med['builds_per_s']:.1f}", "-", True)


if __name__ == "__main__":
    main()
