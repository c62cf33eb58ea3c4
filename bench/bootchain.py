#!/usr/bin/env python3
"""Boot chain benchmark (issue #17): what a unified kernel image, Secure Boot and dm-verity cost.

Builds recipes/minimal.yaml and recipes/minimal-secure.yaml (the same image plus `boot.uki`,
`boot.secure_boot` and `disk.verity`) --runs times each, every build in a fresh KILN_HOME whose
package downloads are shared (so every stage runs, nothing is downloaded) and which holds the
same Secure Boot key (made once, as a farm's workers share one), with the `direct` profile; then boots each image --boots times with `kiln boot`: minimal under `uefi`,
minimal-secure under `uefi-secureboot` (which includes systemd-boot enrolling the keys and the
reset that follows).

Reported (medians): the disk stage's seconds (the ESP with the UKI signed, the ext4 and its
verity tree) and their ratio (goal <= 1.2), and the time to the marker of each boot and their
ratio.

Usage: bench/bootchain.py [--runs N] [--boots N] [--kiln PATH]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = "/var/tmp/kiln-test-cache"


def kiln_binary(given):
    if given:
        return given
    for p in ["target/release/kiln", "target/debug/kiln"]:
        p = os.path.join(REPO, p)
        if os.path.exists(p):
            return p
    return "kiln"


def fresh_home(parent, key):
    """A KILN_HOME with the shared downloads and the one Secure Boot key (a farm's workers share
    theirs; making a key is a one-time cost, not the build's)."""
    home = tempfile.mkdtemp(prefix="home.", dir=parent)
    for sub in ["blobs", "debian", "kernel"]:
        os.makedirs(os.path.join(SHARED, sub), exist_ok=True)
        os.symlink(os.path.join(SHARED, sub), os.path.join(home, sub))
    for suffix in ["", ".crt"]:
        shutil.copy(key + suffix, os.path.join(home, "secureboot.key" + suffix))
    return home


def build(kiln, recipe, home, out):
    env = dict(os.environ, KILN_HOME=home)
    r = subprocess.run([kiln, "build", recipe, "--profile", "direct", "--json", "-o", out],
                       cwd=REPO, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kiln build {recipe} failed:\n{r.stderr[-3000:]}")
    report = json.loads(r.stdout)
    disk = next(s for s in report["stages"] if s["stage"] == "disk")
    return report, disk["seconds"]


def boot(kiln, image, profile, marker, home):
    env = dict(os.environ, KILN_HOME=home)
    r = subprocess.run([kiln, "boot", image, "--profile", profile, "--expect", marker,
                        "--timeout", "300", "--json"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kiln boot {image} --profile {profile} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)["time_to_marker"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--kiln", default=None)
    args = ap.parse_args()
    kiln = kiln_binary(args.kiln)
    work = tempfile.mkdtemp(prefix="kiln-bench-bootchain.")
    try:
        key = os.path.join(work, "secureboot.key")
        subprocess.run([kiln, "keygen", "--secure-boot", "-o", key], check=True,
                       capture_output=True)
        disk = {"minimal": [], "minimal-secure": []}
        images = {}
        for i in range(args.runs):
            for name in disk:
                home = fresh_home(work, key)
                out = os.path.join(work, f"out-{name}-{i}")
                report, seconds = build(kiln, f"recipes/{name}.yaml", home, out)
                disk[name].append(seconds)
                images[name] = (report["image"], report["boots"][0]["marker_line"], home)
        boots = {}
        for name, profile in [("minimal", "uefi"), ("minimal-secure", "uefi-secureboot")]:
            image, marker, home = images[name]
            boots[name] = [boot(kiln, image, profile, marker, home) for _ in range(args.boots)]
        d0, d1 = statistics.median(disk["minimal"]), statistics.median(disk["minimal-secure"])
        b0, b1 = statistics.median(boots["minimal"]), statistics.median(boots["minimal-secure"])
        print(json.dumps({"disk_stage_seconds": disk, "boot_seconds_to_marker": boots}))
        print(f"disk stage: minimal {d0:.2f} s, minimal-secure (UKI + Secure Boot + verity) "
              f"{d1:.2f} s: {d1 / d0:.2f}x (medians of {args.runs})")
        print(f"boot to marker: uefi {b0:.2f} s, uefi-secureboot (enrollment and reset "
              f"included) {b1:.2f} s: {b1 / b0:.2f}x (medians of {args.boots})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
