#!/usr/bin/env python3
"""Delta delivery benchmark (issue #20): what a new image costs a host that holds the old one.

Set-up (all real, on loopback): Debian's `docker-registry`; for each example recipe three
builds without a boot (`kiln build --no-verify --no-bus`): v1, v2a after a one-template change
(`--set hostname=…`: /etc/hostname, /etc/issue or the motd change) and, for the Debian example,
v2b with one added Debian package (`tree`, in a copy of the recipe); each published with `kiln publish --key` (disk, chunks,
chunk index, signature; also tagged `latest`, so each publish reports what is new since the one
before).

Measured:
  bytes     what a pull of v2a / v2b passes through a counting proxy in front of the registry
            (headers and bodies, counted here, not by kiln), without a seed and seeded with v1;
            the seeded figure as a share of the disk.
  time      `kiln pull` of v2a whole against seeded with v1, and `curl` of the same disk blob,
            straight to the registry, whole processes, median of --rounds runs each.

Usage: bench/delta.py [--kiln PATH] [--rounds N] [--debian] [--work DIR] [--keep]
(KILN_HOME defaults to the tests' shared cache /var/tmp/kiln-test-cache, so packages are reused;
--debian adds the Debian example, whose first build takes a few minutes.)
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


def run(cmd, env, **kw):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return r.stdout


def timed(cmd, env):
    t = time.perf_counter()
    run(cmd, env)
    return time.perf_counter() - t


class Proxy:
    """A loopback HTTP proxy that counts the bytes the registry sends through it."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.bytes = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            c, _ = self.sock.accept()
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()

    def serve(self, c):
        with c:
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                b = c.recv(1)
                if not b:
                    return
                head += b
            lines = [l for l in head.decode("latin-1").split("\r\n")
                     if l and not l.lower().startswith("connection:")]
            req = ("\r\n".join(lines) + "\r\nConnection: close\r\n\r\n").encode("latin-1")
            with socket.create_connection(("127.0.0.1", self.upstream)) as u:
                u.sendall(req)
                while True:
                    data = u.recv(1 << 20)
                    if not data:
                        break
                    with self.lock:
                        self.bytes += len(data)
                    c.sendall(data)

    def take(self):
        with self.lock:
            n, self.bytes = self.bytes, 0
        return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=os.path.join(REPO, "target/release/kiln"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--debian", action="store_true")
    ap.add_argument("--work")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    kiln = os.path.abspath(args.kiln)
    work = args.work or tempfile.mkdtemp(prefix="kiln-bench-delta-")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("KILN_HOME", "/var/tmp/kiln-test-cache")

    port = free_port()
    with open(os.path.join(work, "registry.yml"), "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                f"storage:\n  filesystem:\n    rootdirectory: {work}/registry\n"
                f"http:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", os.path.join(work, "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    copies = []
    try:
        deadline = time.time() + 20
        while subprocess.run(["curl", "-sf", f"http://127.0.0.1:{port}/v2/"],
                             capture_output=True).returncode != 0:
            if time.time() > deadline:
                sys.exit("docker-registry did not start")
            time.sleep(0.1)
        key = os.path.join(work, "bench.key")
        run([kiln, "keygen", "-o", key], env)
        proxy = Proxy(port)
        examples = [("busybox", "recipes/minimal.yaml", "kiln-minimal-2")]
        if args.debian:
            examples.append(("debian", "recipes/debian-bookworm.yaml", "kiln-debian-2"))
        rows = []
        publishes = []
        for name, recipe, hostname in examples:
            # v2b: the same recipe with one more package, beside it (templates resolve the same).
            # (A busybox root takes no Debian packages: `rootfs.packages` is for `base: debian`.)
            text = open(os.path.join(REPO, recipe)).read()
            variants = [("v1", recipe, []), ("v2a", recipe, ["--set", f"hostname={hostname}"])]
            if "  packages:\n" in text:
                copy = os.path.join(REPO, "recipes", f".bench-delta-{name}.yaml")
                with open(copy, "w") as f:
                    f.write(text.replace("  packages:\n", "  packages:\n    - tree\n", 1))
                copies.append(copy)
                variants.append(("v2b", copy, []))
            images = {}
            for variant, path, sets in variants:
                out = os.path.join(work, name, variant)
                report = json.loads(run([kiln, "build", path, "--no-verify", "--no-bus", "--json",
                                         "-o", out] + sets, env, cwd=REPO))
                image = report["image"]
                ref = f"127.0.0.1:{port}/bench/{name}:{variant}"
                # Each also as `latest`, as a CI would: the chunks of what `latest` was are known.
                pub = json.loads(run([kiln, "publish", image, "--to", ref, "--tag", "latest",
                                      "--key", key, "--json"], env))
                images[variant] = (image, pub)
                publishes.append((name, variant, pub))
                print(f"{name} {variant}: {pub['bytes']} bytes, {pub['chunks']['chunks']} chunks, "
                      f"{pub['chunks']['new_bytes']} new", file=sys.stderr)
            v1 = images["v1"][0]
            for variant in [v for v in ["v2a", "v2b"] if v in images]:
                image, pub = images[variant]
                size = pub["bytes"]
                via = f"127.0.0.1:{proxy.port}/bench/{name}:{variant}"
                dest = os.path.join(work, f"{name}-{variant}.pulled")
                for f in [dest, dest + ".partial"]:
                    if os.path.exists(f):
                        os.remove(f)
                proxy.take()
                run([kiln, "pull", via, "-o", dest, "--trust", key + ".pub"], env)
                whole = proxy.take()
                os.remove(dest)
                run([kiln, "pull", via, "-o", dest, "--trust", key + ".pub", "--seed", v1], env)
                seeded = proxy.take()
                if open(dest, "rb").read() != open(image, "rb").read():
                    sys.exit(f"{name} {variant}: the seeded pull is not the published disk")
                rows.append((name, variant, size, whole, seeded))
            # Times: straight to the registry.
            ref = f"127.0.0.1:{port}/bench/{name}:v2a"
            layer = images["v2a"][1]["layer_digest"]
            dest = os.path.join(work, f"{name}-timed.img")
            full, seeded, curl = [], [], []
            for _ in range(args.rounds):
                for f in [dest, dest + ".partial"]:
                    if os.path.exists(f):
                        os.remove(f)
                full.append(timed([kiln, "pull", ref, "-o", dest, "--trust", key + ".pub"], env))
                os.remove(dest)
                seeded.append(timed([kiln, "pull", ref, "-o", dest, "--trust", key + ".pub",
                                     "--seed", v1], env))
                os.remove(dest)
                curl.append(timed(["curl", "-sf", "-o", dest,
                                   f"http://127.0.0.1:{port}/v2/bench/{name}/blobs/{layer}"], env))
                os.remove(dest)
            rows.append((name, "time", statistics.median(full), statistics.median(seeded),
                         statistics.median(curl)))
        print("| example | change | disk | whole pull (proxy bytes) | seeded with v1 | share |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r[1] == "time":
                continue
            name, variant, size, whole, seeded = r
            change = "one template" if variant == "v2a" else "one package added"
            print(f"| {name} | {change} | {size / 2**20:.1f} MiB | {whole / 2**20:.2f} MiB | "
                  f"{seeded / 2**20:.2f} MiB | {100 * seeded / size:.1f} % |")
        print()
        print(f"| example | whole pull | seeded pull | seeded/whole | curl of the blob | whole/curl speed |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            if r[1] != "time":
                continue
            name, _, full, seeded, curl = r
            print(f"| {name} | {full:.3f} s | {seeded:.3f} s | {seeded / full:.2f} | {curl:.3f} s | "
                  f"{curl / full:.2f} |")
        print()
        print("| example | published | seconds | disk uploaded | chunks (different) | in the image `latest` was | new |")
        print("|---|---|---|---|---|---|---|")
        for name, variant, pub in publishes:
            c = pub["chunks"]
            print(f"| {name} | {variant} | {pub['seconds']:.2f} s | {pub['uploaded'] / 2**20:.1f} MiB | "
                  f"{c['chunks']} ({c['unique']}) | {c['known_bytes'] / 2**20:.1f} MiB | "
                  f"{c['new_bytes'] / 2**20:.1f} MiB |")
        print(f"\n(medians of {args.rounds} runs; {kiln})")
    finally:
        registry.terminate()
        registry.wait()
        for c in copies:
            os.remove(c)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
