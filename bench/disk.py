#!/usr/bin/env python3
"""Disk benchmark: kiln writing a partitioned disk vs the standard tools making the same disk.

Generates a root tree (2,000 files, ~100 MiB: a few large files, many small ones, symlinks, nested
directories) and a 40 MiB ESP tree, then, for several rounds, times:

  kiln-qcow2   kiln disk --format qcow2  (GPT + FAT32 + ext4 written straight into qcow2)
  kiln-raw     kiln disk --format raw
  standard     sfdisk; mkfs.vfat --offset + mcopy -s; mke2fs -t ext4 -b 4096 -d DIR -E offset=…;
               then qemu-img convert -O qcow2
  floor        read the tree's bytes once and write them once (cat of every file into one file)

and prints medians, the ratio kiln/standard and kiln's peak memory (from /usr/bin/time).

Usage: bench/disk.py [--rounds N] [--kiln PATH] [--work DIR]
"""

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

MiB = 1 << 20


def make_root(root: str) -> None:
    rng = random.Random(42)
    os.makedirs(root)
    large = [30 * MiB, 20 * MiB, 12 * MiB, 8 * MiB]
    n = 0
    for i, size in enumerate(large):
        d = os.path.join(root, "opt", "big")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"blob{i}.bin"), "wb") as f:
            f.write(rng.randbytes(size))
        n += 1
    small_total = 100 * MiB - sum(large)
    count = 2000 - len(large) - 200
    per = small_total // count
    for i in range(count):
        d = os.path.join(root, "usr", f"share{i % 20}", f"pkg{i % 97}")
        os.makedirs(d, exist_ok=True)
        size = max(1, int(rng.expovariate(1 / per)))
        with open(os.path.join(d, f"file{i}.txt"), "wb") as f:
            f.write(rng.randbytes(min(size, 4 * per)))
        n += 1
    for i in range(200):
        d = os.path.join(root, "usr", "bin")
        os.makedirs(d, exist_ok=True)
        os.symlink(f"../share{i % 20}/pkg{i % 97}/file{i}.txt", os.path.join(d, f"link{i}"))


def make_esp(esp: str) -> None:
    rng = random.Random(7)
    d = os.path.join(esp, "EFI", "BOOT")
    os.makedirs(d)
    with open(os.path.join(d, "BOOTX64.EFI"), "wb") as f:
        f.write(rng.randbytes(200 * 1024))
    k = os.path.join(esp, "kiln")
    os.makedirs(k)
    for name, size in [("vmlinuz", 8 * MiB), ("initrd.img", 30 * MiB)]:
        with open(os.path.join(k, name), "wb") as f:
            f.write(rng.randbytes(size))
    os.makedirs(os.path.join(esp, "loader", "entries"))
    with open(os.path.join(esp, "loader", "entries", "kiln.conf"), "w") as f:
        f.write("title kiln\nlinux /kiln/vmlinuz\ninitrd /kiln/initrd.img\n")


def timed(cmds, env=None):
    """Run commands in sequence; return (seconds, peak RSS KiB of the largest process)."""
    t0 = time.perf_counter()
    peak = 0
    for cmd in cmds:
        full = ["/usr/bin/time", "-f", "%M"] + cmd
        p = subprocess.run(full, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
        peak = max(peak, int(p.stderr.strip().splitlines()[-1]))
    return time.perf_counter() - t0, peak


def standard(root, esp, out_raw, out_qcow2, esp_mib, root_mib):
    total = 1 + esp_mib + root_mib + 1
    if os.path.exists(out_raw):
        os.unlink(out_raw)
    with open(out_raw, "wb") as f:
        f.truncate(total * MiB)
    script = (
        "label: gpt\n"
        f"start=1MiB, size={esp_mib}MiB, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=esp\n"
        f"start={1 + esp_mib}MiB, size={root_mib}MiB, type=4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709, name=root\n"
    )
    sf = os.path.join(os.path.dirname(out_raw), "sfdisk.script")
    with open(sf, "w") as f:
        f.write(script)
    mtools_rc = os.path.join(os.path.dirname(out_raw), "mtoolsrc")
    with open(mtools_rc, "w") as f:
        f.write("mtools_skip_check=1\n")
    env = dict(os.environ, MTOOLSRC=mtools_rc)
    cmds = [
        ["sh", "-c", f"sfdisk -q {out_raw} < {sf}"],
        ["mkfs.vfat", "-F", "32", "--offset", str(2048), out_raw, str(esp_mib * 1024)],
        ["sh", "-c", f"mcopy -s -i {out_raw}@@{MiB} {esp}/* ::/"],
        ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", root,
         "-E", f"offset={(1 + esp_mib) * MiB}", out_raw, f"{root_mib * 1024}k"],
    ]
    t_raw, peak = timed(cmds, env)
    t_conv, peak2 = timed([["qemu-img", "convert", "-O", "qcow2", out_raw, out_qcow2]])
    return t_raw, t_raw + t_conv, max(peak, peak2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--kiln", default=os.environ.get("KILN", "target/release/kiln"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()
    for tool in ["/usr/bin/time", "sfdisk", "mkfs.vfat", "mcopy", "mke2fs", "qemu-img"]:
        if not shutil.which(tool):
            sys.exit(f"missing {tool}: apt-get install time fdisk dosfstools mtools e2fsprogs qemu-utils")
    kiln = os.path.abspath(a.kiln)
    if not os.path.exists(kiln):
        sys.exit(f"{kiln} not found: run `cargo build --release` first")
    work = a.work or tempfile.mkdtemp(prefix="kiln-bench-")
    root, esp = os.path.join(work, "root"), os.path.join(work, "esp")
    if not os.path.exists(root):
        make_root(root)
        make_esp(esp)
    out = {k: [] for k in ["kiln-qcow2", "kiln-raw", "standard-raw", "standard-qcow2", "floor"]}
    peaks = []
    # Same partition sizes for both: the ones kiln plans with `auto`.
    probe = os.path.join(work, "probe.raw")
    plan = json.loads(subprocess.run([kiln, "-q", "disk", "--root", root, "--esp", esp, "--format", "raw",
                                      "-o", probe, "--json"], check=True, capture_output=True, text=True).stdout)
    sizes = {p["name"]: p["size"] // MiB for p in plan["partitions"]}
    esp_mib, root_mib = sizes["esp"], sizes["root"]
    for r in range(a.rounds):
        q = os.path.join(work, "kiln.qcow2")
        t, peak = timed([[kiln, "-q", "disk", "--root", root, "--esp", esp, "--size", "auto", "--format", "qcow2",
                          "-o", q]])
        out["kiln-qcow2"].append(t)
        peaks.append(peak)
        rw = os.path.join(work, "kiln.raw")
        t, peak = timed([[kiln, "-q", "disk", "--root", root, "--esp", esp, "--format", "raw", "-o", rw]])
        out["kiln-raw"].append(t)
        peaks.append(peak)
        t_raw, t_q, _ = standard(root, esp, os.path.join(work, "std.raw"), os.path.join(work, "std.qcow2"),
                                 esp_mib, root_mib)
        out["standard-raw"].append(t_raw)
        out["standard-qcow2"].append(t_q)
        floor_file = os.path.join(work, "floor.bin")
        t, _ = timed([["sh", "-c", f"find {root} {esp} -type f -exec cat {{}} + > {floor_file}"]])
        out["floor"].append(t)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in out.items()), file=sys.stderr)
    med = {k: statistics.median(v) for k, v in out.items()}
    print(f"disk: ESP {esp_mib} MiB + root {root_mib} MiB; tree 2,000 entries ~100 MiB + ESP 40 MiB; "
          f"{a.rounds} rounds, medians")
    for k, v in med.items():
        print(f"  {k:15} {v:6.2f} s")
    print(f"  ratio kiln-qcow2 / standard-qcow2: {med['kiln-qcow2'] / med['standard-qcow2']:.2f}")
    print(f"  ratio kiln-raw   / standard-raw:   {med['kiln-raw'] / med['standard-raw']:.2f}")
    print(f"  kiln peak memory: {max(peaks) / 1024:.1f} MiB")
    if not a.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
