#!/usr/bin/env python3
"""Debian image benchmark (issue #7): `kiln build recipes/debian-bookworm.yaml` against mmdebstrap
alone plus the standard disk tools on the same tree, in one run.

It times, per round:

  kiln-cold     `kiln build recipes/debian-bookworm.yaml --no-verify` with an empty $KILN_HOME:
                InRelease + Packages fetched and verified by kiln, the package names checked,
                mmdebstrap run with kiln's arguments (its tarball streamed into the Tree), the
                overlay (users, keys, systemd configuration), the initramfs, and the GPT qcow2 disk
                (FAT32 ESP with systemd-boot, kernel and initrd; ext4 root) written by kiln.
  standard      the same base with mmdebstrap alone (the same suite, variant, packages and hooks,
                written as a tarball), then the standard disk tools on that tree: `tar -x
                --xattrs` into a directory (as root), a raw file with sfdisk (ESP + root, kiln's
                sizes), `mkfs.vfat --offset` + `mcopy` of the kernel onto the ESP, `mke2fs -t ext4
                -d DIR -E offset=…` for the root, `qemu-img convert -O qcow2`. It makes no
                overlay, no initramfs and no boot loader: strictly less work than kiln.
  kiln-warm1    a copy of the recipe with its own motd.j2, built once (not timed), then the
                template changed by one line and the image rebuilt (`--no-verify`): the one-file
                rebuild, with kiln's per-stage breakdown (the base is a cache hit).
  sizes         kiln's image as raw (allocated bytes of `qemu-img convert -O raw`, sparse), as
                kiln's qcow2, and as kiln's compressed qcow2 (`disk.compress: true`), against
                `qemu-img convert -c -O qcow2` of the standard-tools raw disk.

Prints medians over the rounds and the ratios against the goals (cold <= 1.2 x standard,
one-file rebuild excluding boot <= 3 s). Needs root (mmdebstrap in root mode, tar --xattrs
-x), a release build of kiln, mmdebstrap, sfdisk, mkfs.vfat, mtools, mke2fs, qemu-img, and the
Debian mirror (each round downloads the base's ~150 MiB of packages twice).

Usage: bench/debian.py [--rounds N] [--kiln PATH] [--work DIR] [--keep]
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
RECIPE = os.path.join(REPO, "recipes", "debian-bookworm.yaml")
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"


def die(msg):
    sys.exit(f"bench/debian.py: {msg}")


def run(cmd, env=None, **kw):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        die(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return r


def kiln_build(kiln, recipe, home, out, extra=()):
    env = dict(os.environ, KILN_HOME=home)
    env.pop("KILN_OFFLINE", None)
    # Each timed step starts with no dirty pages left by the step before it (this disk is slow
    # to write back, and a step would otherwise pay for its predecessor's writes).
    os.sync()
    t = time.monotonic()
    r = run([kiln, "build", recipe, "--json", "--no-verify", "-o", out,
             "--templates", os.path.join(REPO, "templates"), *extra], env=env)
    return time.monotonic() - t, json.loads(r.stdout)


def allocated(path):
    return os.stat(path).st_blocks * 512


def standard(work, kiln_args, esp_mib, root_bytes):
    """mmdebstrap + standard disk tools; returns (seconds, steps, raw path)."""
    steps = {}
    os.makedirs(work, exist_ok=True)
    tar = os.path.join(work, "base.tar")
    os.sync()
    t0 = time.monotonic()
    env = dict(os.environ, SOURCE_DATE_EPOCH="1700000000")
    with open(tar, "wb") as f:
        r = subprocess.run(["mmdebstrap", *kiln_args], stdout=f, stderr=subprocess.PIPE, env=env)
    if r.returncode != 0:
        die(f"mmdebstrap failed: {r.stderr.decode()[-2000:]}")
    steps["mmdebstrap"] = time.monotonic() - t0
    t = time.monotonic()
    tree = os.path.join(work, "tree")
    os.makedirs(tree)
    run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", tar, "-C", tree])
    steps["tar -x"] = time.monotonic() - t
    t = time.monotonic()
    raw = os.path.join(work, "std.raw")
    mib = 1 << 20
    esp_start = mib
    root_start = esp_start + esp_mib * mib
    size = root_start + root_bytes + mib
    with open(raw, "wb") as f:
        f.truncate(size)
    run(["sfdisk", "-q", raw], input=f"label: gpt\nstart=2048, size={esp_mib * 2048}, type={ESP_TYPE}\n"
        f"start={root_start // 512}, size={root_bytes // 512}, type={ROOT_TYPE}\n")
    run(["mkfs.vfat", "-F", "32", "-s", "1", "--offset", str(esp_start // 512), raw, str(esp_mib * 1024)])
    boot = os.path.join(tree, "boot")
    kernels = [k for k in os.listdir(boot) if k.startswith("vmlinuz-")]
    rc = os.path.join(work, "mtoolsrc")
    with open(rc, "w") as f:
        f.write("mtools_skip_check=1\n")
    run(["mcopy", "-i", f"{raw}@@{esp_start}", os.path.join(boot, kernels[0]), "::/vmlinuz"],
        env=dict(os.environ, MTOOLSRC=rc))
    run(["mke2fs", "-q", "-t", "ext4", "-b", "4096", "-d", tree, "-E", f"offset={root_start}",
         raw, str(root_bytes // 4096)])
    steps["disk (sfdisk, mkfs.vfat, mcopy, mke2fs -d)"] = time.monotonic() - t
    t = time.monotonic()
    run(["qemu-img", "convert", "-O", "qcow2", raw, os.path.join(work, "std.qcow2")])
    steps["qemu-img convert"] = time.monotonic() - t
    total = time.monotonic() - t0
    return total, steps, raw


def stage_times(report):
    out = {s["stage"]: s["seconds"] for s in report["stages"]}
    base = next(s for s in report["stages"] if s["stage"] == "rootfs")["outputs"].get("base_step")
    if base:
        out["(base step)"] = base["seconds"]
        out["(base cache)"] = base["cache"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--kiln", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(REPO, "target")), "release", "kiln"))
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    if os.geteuid() != 0:
        die("run as root (mmdebstrap root mode, tar --xattrs -x)")
    if not os.path.exists(a.kiln):
        die(f"{a.kiln} missing: cargo build --release (or --kiln PATH)")
    work_root = a.work or tempfile.mkdtemp(prefix="kiln-bench-debian.")
    os.makedirs(work_root, exist_ok=True)
    cold, std, std_steps, warm, warm_stages, cold_stages = [], [], [], [], [], []
    sizes = {}
    for rnd in range(a.rounds):
        w = os.path.join(work_root, f"round{rnd}")
        os.makedirs(w)
        home = os.path.join(w, "home")
        secs, rep = kiln_build(a.kiln, RECIPE, home, os.path.join(w, "out"))
        cold.append(secs)
        cold_stages.append(stage_times(rep))
        # The same mmdebstrap invocation kiln made (recorded in the base step's outputs).
        base = next(s for s in rep["stages"] if s["stage"] == "rootfs")["outputs"]["base_step"]
        spec = base["mmdebstrap"]
        disk_size = rep["disk_size"]
        root_bytes = disk_size - (64 + 2) * (1 << 20)
        s_secs, s_steps, raw = standard(os.path.join(w, "std"), spec, 64, root_bytes)
        std.append(s_secs)
        std_steps.append(s_steps)

        # One-file rebuild.
        rdir = os.path.join(w, "recipe")
        os.makedirs(rdir)
        shutil.copy(RECIPE, os.path.join(rdir, "recipe.yaml"))
        with open(os.path.join(rdir, "motd.j2"), "w") as f:
            f.write("Welcome (one).\n")
        kiln_build(a.kiln, os.path.join(rdir, "recipe.yaml"), home, os.path.join(w, "out2"))
        with open(os.path.join(rdir, "motd.j2"), "w") as f:
            f.write("Welcome (two).\n")
        secs, rep2 = kiln_build(a.kiln, os.path.join(rdir, "recipe.yaml"), home, os.path.join(w, "out2"))
        warm.append(secs)
        warm_stages.append(stage_times(rep2))

        if rnd == 0:
            kraw = os.path.join(w, "kiln.raw")
            run(["qemu-img", "convert", "-O", "raw", rep["image"], kraw])
            with open(RECIPE) as f:
                text = f.read()
            with open(os.path.join(rdir, "recipe.yaml"), "w") as f:
                f.write(text.replace("  format: qcow2\n", "  format: qcow2\n  compress: true\n"))
            _, rep3 = kiln_build(a.kiln, os.path.join(rdir, "recipe.yaml"), home, os.path.join(w, "out3"))
            stdc = os.path.join(w, "std-c.qcow2")
            run(["qemu-img", "convert", "-c", "-O", "qcow2", raw, stdc])
            sizes = {
                "kiln raw (allocated)": allocated(kraw),
                "kiln qcow2": os.path.getsize(rep["image"]),
                "kiln qcow2, compressed": os.path.getsize(rep3["image"]),
                "standard raw (allocated)": allocated(raw),
                "standard qcow2 (qemu-img convert)": os.path.getsize(os.path.join(w, "std", "std.qcow2")),
                "standard qemu-img convert -c": os.path.getsize(stdc),
            }
        if not a.keep:
            shutil.rmtree(os.path.join(w, "std"), ignore_errors=True)

    m = lambda xs: statistics.median(xs)
    print(f"rounds: {a.rounds}")
    print(f"kiln cold build (no boot):       {m(cold):8.2f} s")
    for k in cold_stages[0]:
        vals = [c[k] for c in cold_stages]
        print(f"    {k:28} {vals[0] if isinstance(vals[0], str) else f'{m(vals):8.2f} s'}")
    print(f"mmdebstrap + standard disk tools:{m(std):8.2f} s")
    for k in std_steps[0]:
        print(f"    {k:44} {m([s[k] for s in std_steps]):8.2f} s")
    print(f"ratio cold kiln / standard:      {m(cold) / m(std):8.2f}   (goal <= 1.2)")
    print(f"one-template rebuild (no boot):  {m(warm):8.2f} s   (goal <= 3 s)")
    for k in warm_stages[0]:
        vals = [c[k] for c in warm_stages]
        print(f"    {k:28} {vals[0] if isinstance(vals[0], str) else f'{m(vals):8.2f} s'}")
    for k, v in sizes.items():
        print(f"{k:36} {v / (1 << 20):9.1f} MiB")
    if not a.keep and not a.work:
        shutil.rmtree(work_root, ignore_errors=True)


if __name__ == "__main__":
    main()
