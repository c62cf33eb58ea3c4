#!/usr/bin/env python3
"""Embedded-bus benchmark (issue #5): what `kiln build` pays for going through NATS.

`kiln build RECIPE` starts a private nats-server (JetStream in a temp dir), runs every stage
worker in process, publishes the build request, follows the build's events and stops the server;
`kiln build --no-bus` runs the same stage code directly. This times both, as whole processes
(wall clock, from exec to exit), in two cases:

  warm       nothing changed: every stage is a cache hit (the verify result is cached by image
             digest), so what is left is kiln's fixed cost: starting, rendering, lookups and, for
             the bus path, the server, the stream, the consumers and the messages.
  disk-miss  the disk stage's records are deleted before each run, so the disk is written again
             (the same bytes, so verify stays a hit): a build that does real work.

Each round runs both modes in both cases, alternating which mode goes first; the medians over
the rounds and the overhead (bus - direct) in ms and as a ratio are printed.

Needs a release build of kiln (`cargo build --release`) and nats-server. The first run fills the
cache (downloads from the Debian mirror unless --downloads names a directory with `blobs/` and
`debian/` of an earlier cache, default /var/tmp/kiln-test-cache when it exists).

Usage: bench/embedded.py [--rounds N] [--kiln PATH] [--recipe FILE] [--profile P] [--downloads DIR]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(kiln, home, out, recipe, profile, bus):
    cmd = [kiln, "-q", "build", recipe, "--profile", profile, "--json", "-o", out]
    if not bus:
        cmd.append("--no-bus")
    env = dict(os.environ, KILN_HOME=home)
    env.pop("KILN_NATS_URL", None)
    start = time.monotonic()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - start
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr}")
    report = json.loads(p.stdout)
    return wall, report


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kiln", default=os.path.join(REPO, "target/release/kiln"))
    ap.add_argument("--recipe", default="recipes/minimal.yaml")
    ap.add_argument("--profile", default="direct")
    default_downloads = "/var/tmp/kiln-test-cache"
    ap.add_argument(
        "--downloads",
        default=default_downloads if os.path.isdir(default_downloads) else None,
        help="an earlier KILN_HOME whose blobs/ and debian/ are shared (no download)",
    )
    args = ap.parse_args()
    if not os.access(args.kiln, os.X_OK):
        sys.exit(f"{args.kiln} is not executable: run `cargo build --release` first")

    work = tempfile.mkdtemp(prefix="kiln-bench-embedded-")
    try:
        home = os.path.join(work, "home")
        os.makedirs(home)
        if args.downloads:
            for sub in ("blobs", "debian"):
                os.makedirs(os.path.join(args.downloads, sub), exist_ok=True)
                os.symlink(os.path.join(args.downloads, sub), os.path.join(home, sub))
        out = os.path.join(work, "out")
        # Fill the cache (and the KVM probe's verdict) once.
        wall, report = run(args.kiln, home, out, args.recipe, args.profile, bus=False)
        print(f"first build (fills the cache): {wall:.2f} s", file=sys.stderr)

        times = {(case, bus): [] for case in ("warm", "disk-miss") for bus in (False, True)}
        for r in range(args.rounds):
            for case in ("warm", "disk-miss"):
                order = (False, True) if r % 2 == 0 else (True, False)
                for bus in order:
                    if case == "disk-miss":
                        shutil.rmtree(os.path.join(home, "stages", "disk"), ignore_errors=True)
                    wall, report = run(args.kiln, home, out, args.recipe, args.profile, bus)
                    caches = {s["stage"]: s["cache"] for s in report["stages"]}
                    want = "miss" if case == "disk-miss" else "hit"
                    if caches.get("disk") != want:
                        sys.exit(f"{case}: expected the disk stage to {want}, got {caches}")
                    times[(case, bus)].append(wall)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        print(f"kiln build {args.recipe} --profile {args.profile}, wall time, "
              f"median of {args.rounds} rounds")
        print(f"{'case':<10} {'--no-bus':>10} {'private bus':>12} {'overhead':>10} {'ratio':>6}")
        for case in ("warm", "disk-miss"):
            direct = statistics.median(times[(case, False)])
            bus = statistics.median(times[(case, True)])
            print(f"{case:<10} {direct:>9.3f}s {bus:>11.3f}s {1000 * (bus - direct):>8.0f}ms "
                  f"{bus / direct:>6.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
