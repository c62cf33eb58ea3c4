#!/usr/bin/env python3
"""Kernel-build benchmark (issue #8): a kernel built from kernel-configs/ against the Debian kernel.

In one run it times:

  first build   `kiln build recipes/minimal-custom-kernel.yaml --no-verify` with no stage records:
                the kernel stage builds the kernel unless $KILN_HOME/kernel already has it (pass
                --cold for a kernel cache of its own, i.e. a real first build: source unpack,
                tinyconfig, olddefconfig, make bzImage). Prints the kernel stage's time and the
                compile time kiln recorded.
  cached        the same with the stage records removed again: the kernel comes from the kernel
                build cache (no compile), every other stage runs.
  warm          the same once more, nothing changed: every stage a cache hit.
  boot          per profile (direct, uefi) and round: the image with the built kernel and no
                initramfs, and the same recipe with `kernel.package: linux-image-cloud-amd64`
                (Debian's cloud kernel + kiln's initramfs; everything else identical), each booted
                by `kiln build --profile P` with only the verify record removed, so only the boot
                runs; time to the marker line as kiln reports it. Medians.

Usage: bench/kernel.py [--rounds N] [--kiln PATH] [--home DIR] [--cold]
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = "/var/tmp/kiln-test-cache"


def run(kiln, home, project, recipe, args):
    env = dict(os.environ, KILN_HOME=home)
    env.pop("KILN_OFFLINE", None)
    out = tempfile.mkdtemp(prefix="kiln-bench-out-")
    started = time.monotonic()
    p = subprocess.run(
        [kiln, "build", recipe, "--json", "-o", out] + args,
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    secs = time.monotonic() - started
    if p.returncode != 0:
        sys.exit(f"kiln build {recipe} {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    report = json.loads(p.stdout)
    for b in report.get("boots", []):
        b["serial_text"] = open(b["serial_log"], errors="replace").read()
    shutil.rmtree(out, ignore_errors=True)
    return secs, report


def stage(report, name):
    return next(s for s in report["stages"] if s["stage"] == name)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kiln", default=os.path.join(ROOT, "target/release/kiln"))
    ap.add_argument("--home", help="KILN_HOME (default: a temp dir sharing the test cache)")
    ap.add_argument("--cold", action="store_true", help="a kernel build cache of its own")
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="kiln-kbench-")
    project = os.path.join(work, "project")
    for sub in ["recipes", "templates", "qemu", "kernel-configs"]:
        shutil.copytree(os.path.join(ROOT, sub), os.path.join(project, sub))
    custom = "recipes/minimal-custom-kernel.yaml"
    text = open(os.path.join(project, custom)).read()
    start = text.index("kernel:\n")
    end = text.index("\nrootfs:")
    cloud_text = text[:start] + "kernel:\n  package: linux-image-cloud-amd64\n" + text[end:]
    cloud = "recipes/minimal-cloud-kernel.yaml"
    open(os.path.join(project, cloud), "w").write(cloud_text)

    home = a.home or os.path.join(work, "home")
    os.makedirs(home, exist_ok=True)
    subs = ["blobs", "debian"] + ([] if a.cold else ["kernel"])
    for sub in subs:
        link = os.path.join(home, sub)
        if not os.path.exists(link):
            os.makedirs(os.path.join(SHARED, sub), exist_ok=True)
            os.symlink(os.path.join(SHARED, sub), link)
    stages = os.path.join(home, "stages")

    shutil.rmtree(stages, ignore_errors=True)
    first_secs, first = run(a.kiln, home, project, custom, ["--no-verify"])
    k = stage(first, "kernel")
    built = k["outputs"]["built"]
    shutil.rmtree(stages, ignore_errors=True)
    cached_secs, cached = run(a.kiln, home, project, custom, ["--no-verify"])
    kc = stage(cached, "kernel")
    warm_secs, _ = run(a.kiln, home, project, custom, ["--no-verify"])

    boots = {}
    for _ in range(a.rounds):
        for name, recipe in [("built kernel, no initramfs", custom), ("Debian cloud kernel + initramfs", cloud)]:
            for profile in ["direct", "uefi"]:
                shutil.rmtree(os.path.join(stages, "verify"), ignore_errors=True)
                _, r = run(a.kiln, home, project, recipe, ["--profile", profile])
                b = r["boots"][0]
                boots.setdefault((name, profile), []).append(b["time_to_marker"])
                if name.startswith("built"):
                    log = b["serial_text"]
                    assert "kiln-initramfs" not in log, "the built kernel used an initramfs"

    print(f"kernel: {first['kernel_version'] if 'kernel_version' in first else k['outputs']['version']}, "
          f"build key {built['key'][:19]}…")
    print(f"first build (no stage records{', empty kernel cache' if a.cold else ''}): "
          f"{first_secs:.1f} s total, kernel stage {k['seconds']:.1f} s "
          f"(compiled now: {not built['cached']}; recorded compile time {built['build_seconds']:.0f} s)")
    print(f"cached rebuild (no stage records, kernel cache kept): {cached_secs:.1f} s total, "
          f"kernel stage {kc['seconds']:.2f} s (from cache: {kc['outputs']['built']['cached']})")
    print(f"warm no-change rebuild: {warm_secs:.2f} s")
    print(f"boot time to marker, median of {a.rounds} (TCG):")
    for profile in ["direct", "uefi"]:
        b = statistics.median(boots[("built kernel, no initramfs", profile)])
        d = statistics.median(boots[("Debian cloud kernel + initramfs", profile)])
        print(f"  {profile:6}  built kernel, no initramfs {b:.2f} s   Debian cloud kernel + initramfs "
              f"{d:.2f} s   ratio {b / d:.2f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
