#!/usr/bin/env python3
"""Cache size before and after `kiln gc` for a day's worth of builds (issue 15).

Builds recipes/minimal.yaml N times with a changing parameter (hostname=bench-<i>, so every
build makes its own rootfs, initramfs, disk and boot while the packages stay shared), each with
`kiln build --profile direct` (private NATS server, QEMU boot), in one fresh $KILN_HOME. Then:

  kiln gc --dry-run                 the default policy (30 days): nothing of today goes
  kiln gc --max-size <budget>       least recently used records go first, then their blobs
  kiln build (the newest params)    still a full cache hit: the most recent build was kept
  kiln gc --keep-days 0             everything goes

The cache is measured here by walking blobs/, stages/ and kernel/ (allocated bytes), not taken
from kiln's report. Packages come from the shared test cache (/var/tmp/kiln-test-cache, hard
links) when it has them; the first build's unrelated blobs are collected before counting.

Usage: bench/gc.py [--builds N] [--budget SIZE] [--kiln PATH]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = "/var/tmp/kiln-test-cache"


def usage(home):
    total = 0
    for sub in ("blobs", "stages", "kernel"):
        for root, _dirs, files in os.walk(os.path.join(home, sub)):
            for f in files:
                try:
                    total += os.lstat(os.path.join(root, f)).st_blocks * 512
                except FileNotFoundError:
                    pass
    return total


def mib(n):
    return f"{n / 1048576:.1f} MiB"


def kiln(args, home, kiln_bin, check=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KILN_")}
    env["KILN_HOME"] = home
    started = time.monotonic()
    p = subprocess.run([kiln_bin, *args], cwd=REPO, env=env, capture_output=True, text=True)
    took = time.monotonic() - started
    if check and p.returncode != 0:
        sys.exit(f"kiln {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p, took


def build(i, home, kiln_bin, out):
    p, took = kiln(
        ["build", "recipes/minimal.yaml", "--profile", "direct", "--json",
         "--set", f"hostname=bench-{i}", "-o", out],
        home, kiln_bin)
    report = json.loads(p.stdout)
    return report, took


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--builds", type=int, default=30)
    ap.add_argument("--budget", default="64M")
    ap.add_argument("--kiln", default=os.path.join(REPO, "target", "release", "kiln"))
    args = ap.parse_args()
    home = tempfile.mkdtemp(prefix="kiln-gc-bench-", dir="/var/tmp")
    out = tempfile.mkdtemp(prefix="kiln-gc-bench-out-")
    try:
        blobs = os.path.join(home, "blobs", "sha256")
        os.makedirs(blobs)
        shared = os.path.join(SHARED, "blobs", "sha256")
        if os.path.isdir(shared):
            for name in os.listdir(shared):
                if not name.startswith("."):
                    try:
                        os.link(os.path.join(shared, name), os.path.join(blobs, name))
                    except OSError:
                        pass
        if os.path.isdir(os.path.join(SHARED, "debian")):
            os.symlink(os.path.join(SHARED, "debian"), os.path.join(home, "debian"))
        times = []
        report, took = build(0, home, args.kiln, out)
        times.append(took)
        # Only what the first build uses stays: the baseline of one build.
        kiln(["gc", "--keep-days", "365"], home, args.kiln)
        one = usage(home)
        for i in range(1, args.builds):
            report, took = build(i, home, args.kiln, out)
            times.append(took)
        image = report["image_digest"]
        before = usage(home)
        p, _ = kiln(["gc", "--dry-run", "--json"], home, args.kiln)
        dry = json.loads(p.stdout)["local"]
        p, gc_took = kiln(["gc", "--max-size", args.budget, "--json"], home, args.kiln)
        collected = json.loads(p.stdout)["local"]
        after = usage(home)
        report, rebuild_took = build(args.builds - 1, home, args.kiln, out)
        hits = [s["stage"] for s in report["stages"] if s["cache"] == "hit"]
        same = report["image_digest"] == image
        p, _ = kiln(["gc", "--keep-days", "0", "--json"], home, args.kiln)
        empty = usage(home)

        print(f"kiln: {args.kiln}")
        print(f"builds: {args.builds} of recipes/minimal.yaml (hostname=bench-<i>, --profile direct)")
        print(f"build time: median {sorted(times)[len(times) // 2]:.1f} s, total {sum(times):.0f} s")
        print(f"cache after 1 build:           {mib(one)}")
        print(f"cache after {args.builds} builds:          {mib(before)}  ({mib((before - one) / max(1, args.builds - 1))} per further build)")
        print(f"kiln gc --dry-run (30 days):   would free {mib(sum(k['freed_bytes'] for k in dry['kinds']))}")
        print(f"kiln gc --max-size {args.budget}:      {mib(before)} -> {mib(after)} measured "
              f"(kiln says {mib(collected['before_bytes'])} -> {mib(collected['after_bytes'])}), {gc_took:.2f} s")
        for k in collected["kinds"]:
            print(f"    {k['kind']:<8} kept {k['kept']:>6}  removed {k['removed']:>6}  freed {mib(k['freed_bytes'])}")
        print(f"rebuild of the newest params: {rebuild_took:.1f} s, hits: {','.join(hits)}, same image: {same}")
        print(f"kiln gc --keep-days 0:         -> {mib(empty)}")
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
