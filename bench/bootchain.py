#!/usr/bin/env python3
"""Boot chain benchmark (issue #17): what a unified kernel image, Secure Boot and dm-verity cost.

For each pair of recipes — recipes/minimal.yaml and recipes/minimal-secure.yaml (busybox), and
with --debian also recipes/debian-bookworm.yaml and recipes/debian-secure.yaml — the second being
the first plus `boot.uki`, `boot.secure_boot` and `disk.verity`: builds each --runs times without
booting (--no-verify), every build in a fresh KILN_HOME whose package downloads and Debian bases
are shared (so every stage but the Debian base runs, nothing is downloaded) and which holds the
same Secure Boot key (made once, as a farm's workers share one); then boots each image --boots
times with `kiln boot`: the plain one under `uefi`, the secure one under `uefi-secureboot` (which
includes systemd-boot enrolling the keys and the reset that follows).

Reported (medians): the disk stage's seconds (the ESP with the UKI signed, the ext4 and its
verity tree) and their ratio (goal <= 1.2), and the time to the marker of each boot and their
ratio.

Usage: bench/bootchain.py [--runs N] [--boots N] [--debian] [--kiln PATH]
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
    for sub in ["blobs", "debian", "kernel", "stages/debian-base"]:
        os.makedirs(os.path.join(SHARED, sub), exist_ok=True)
        os.makedirs(os.path.dirname(os.path.join(home, sub)), exist_ok=True)
        os.symlink(os.path.join(SHARED, sub), os.path.join(home, sub))
    for suffix in ["", ".crt"]:
        shutil.copy(key + suffix, os.path.join(home, "secureboot.key" + suffix))
    return home


def build(kiln, recipe, home, out):
    env = dict(os.environ, KILN_HOME=home)
    r = subprocess.run([kiln, "build", recipe, "--no-verify", "--json", "-o", out],
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


PAIRS = {
    "busybox": ("minimal", "minimal-secure"),
    "debian": ("debian-bookworm", "debian-secure"),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--debian", action="store_true", help="also the Debian pair")
    ap.add_argument("--kiln", default=None)
    args = ap.parse_args()
    kiln = kiln_binary(args.kiln)
    work = tempfile.mkdtemp(prefix="kiln-bench-bootchain.")
    pairs = ["busybox", "debian"] if args.debian else ["busybox"]
    results = {}
    try:
        key = os.path.join(work, "secureboot.key")
        subprocess.run([kiln, "keygen", "--secure-boot", "-o", key], check=True,
                       capture_output=True)
        for pair in pairs:
            plain, secure = PAIRS[pair]
            disk = {plain: [], secure: []}
            images = {}
            for i in range(args.runs):
                for name in disk:
                    home = fresh_home(work, key)
                    out = os.path.join(work, f"out-{name}-{i}")
                    report, seconds = build(kiln, f"recipes/{name}.yaml", home, out)
                    disk[name].append(seconds)
                    images[name] = (report["image"], f"kiln-boot-ok {report['inputs']}", home)
            boots = {}
            for name, profile in [(plain, "uefi"), (secure, "uefi-secureboot")]:
                image, marker, home = images[name]
                boots[name] = [boot(kiln, image, profile, marker, home)
                               for _ in range(args.boots)]
            results[pair] = {"disk_stage_seconds": disk, "boot_seconds_to_marker": boots}
            d0, d1 = statistics.median(disk[plain]), statistics.median(disk[secure])
            b0, b1 = statistics.median(boots[plain]), statistics.median(boots[secure])
            print(f"{pair}: disk stage: {plain} {d0:.3f} s, {secure} (UKI + Secure Boot + "
                  f"verity) {d1:.3f} s: {d1 / d0:.2f}x (medians of {args.runs})")
            print(f"{pair}: boot to marker: uefi {b0:.2f} s, uefi-secureboot (enrollment and "
                  f"reset included) {b1:.2f} s: {b1 / b0:.2f}x (medians of {args.boots})")
        print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
