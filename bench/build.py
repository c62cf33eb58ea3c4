#!/usr/bin/env python3
"""Image-build benchmark (issue #4): `kiln build` vs the same steps done with standard tools.

In one run, for several rounds, it times:

  kiln-cold     `kiln build recipes/minimal.yaml --profile direct` with an empty $KILN_HOME (a fresh
                temp dir per round): InRelease + Packages index fetched and verified, the kernel
                image, busybox-static and systemd-boot-efi downloaded, rootfs, initramfs (zstd), ESP
                with systemd-boot, GPT qcow2 disk, and a direct-kernel boot to the marker. kiln's
                one-per-process KVM probe is part of it (shown on its own line).
  standard      the same with standard tools, from a shell script written to a temp dir:
                `apt-get download` of the same three package versions into an empty dir (this uses
                the host's apt index state from `apt-get update`, which is NOT fetched or verified
                here, unlike kiln's cold build), `dpkg -x`, a rootfs dir (busybox + applet links,
                the same /sbin/init and /etc files), an initramfs dir (busybox, the modules kiln put
                in, an /init like kiln's) packed with cpio + gzip, an ESP dir with systemd-boot,
                sfdisk + mkfs.vfat --offset + mcopy + mke2fs -d in place on a raw file with kiln's
                partition sizes, qemu-img convert to qcow2; then the same QEMU command line kiln
                runs (TCG), timed until the marker line appears on QEMU's stdout.
  kiln-warm     `kiln build` again with the same $KILN_HOME and nothing changed (every stage a cache
                hit; the verify result is cached by image digest), with kiln's per-stage breakdown.
  boot          per profile (direct, uefi), booting kiln's image:
                  kiln boot             `kiln boot IMAGE --profile P` (includes the KVM probe)
                  kiln boot, no probe   the same with a copy of the profile saying accel = "tcg"
                  bare QEMU             the command line kiln logs (-vv), run directly, read until
                                        the marker, then until QEMU exits (the guest powers off)
                kiln's overhead = kiln's wall time to exit - bare QEMU's wall time to exit.

Prints medians over the rounds and ratios. Needs: a release build of kiln, apt-get, dpkg,
cpio, gzip, sfdisk, mkfs.vfat, mtools, mke2fs, qemu-img, qemu-system-x86_64, OVMF, network access
to the Debian mirror (each cold round downloads ~70 MiB twice: once for kiln, once for apt-get).

Usage: bench/build.py [--rounds N] [--kiln PATH] [--recipe FILE] [--work DIR] [--keep]
"""

import argparse
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STD_MARKER = "std-boot-ok"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
STD_ROOT_UUID = "6c1d6a3e-3f5e-4b8a-9a61-0d6f3c2b7e10"
STD_ESP_UUID = "0b7c4a52-93d4-4f0e-8c11-5a2e9f6d3b21"

# The standard-tools pipeline. Arguments come in the environment (see standard()). Each step
# appends "NAME SECONDS" to $W/steps so the benchmark can show where the time goes.
STANDARD_SH = r"""#!/bin/bash
set -euo pipefail
cd "$W"
step() { echo "$1 $(date +%s.%N)" >> "$W/steps"; }

step download
mkdir debs
(cd debs && apt-get download -q=2 "$KPKG=$KVER" "busybox-static=$BBVER" "systemd-boot-efi=$SDVER")

step extract
dpkg -x debs/"$KPKG"_*.deb k
dpkg -x debs/busybox-static_*.deb bb
dpkg -x debs/systemd-boot-efi_*.deb sd

step rootfs
R=$W/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,root,home,var/log,mnt,boot/efi,lib,srv}
chmod 1777 "$R/tmp"; chmod 700 "$R/root"
cp bb/bin/busybox "$R/bin/busybox"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3
cat > "$R/sbin/init" <<EOF
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /run /tmp
mount -t tmpfs tmpfs /run
hostname -F /etc/hostname 2>/dev/null
echo "std: \$(uname -r) up" > /dev/console
echo "$MARKER" > /dev/console
sync
poweroff -f
EOF
chmod 755 "$R/sbin/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
echo "root:*:19000:0:99999:7:::" > "$R/etc/shadow"; chmod 600 "$R/etc/shadow"
echo "PARTUUID=$ROOT_UUID / ext4 defaults 0 1" > "$R/etc/fstab"
echo "kiln-minimal" > "$R/etc/hostname"
echo "kiln-minimal" > "$R/etc/motd"
echo 'kiln kiln-minimal \l' > "$R/etc/issue"
# Applet links last, relative (as kiln's), so none can point outside $R and none replaces
# /sbin/init. One process for the ~400 links (a `ln -s` each costs ~3 s on a slow machine).
"$R/bin/busybox" --list-full | R=$R perl -nle \
    '$p = "$ENV{R}/$_"; $up = "../" x tr{/}{}; -e $p or -l $p or symlink("${up}bin/busybox", $p) or die "$p: $!"'

step initramfs
I=$W/initrd
mkdir -p "$I"/{bin,dev,proc,sys,run,tmp,newroot}
mknod -m 600 "$I/dev/console" c 5 1
mknod -m 666 "$I/dev/null" c 1 3
cp bb/bin/busybox "$I/bin/busybox"
for a in cat echo grep insmod ls mkdir mount sh sleep switch_root umount poweroff; do
    ln -s busybox "$I/bin/$a"
done
{
    echo '#!/bin/sh'
    echo 'export PATH=/bin'
    echo 'mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev'
} > "$I/init"
for m in $MODULES; do
    f=$(find "k/lib/modules/$KREL/kernel" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) | head -n 1)
    [ -n "$f" ] || { echo "module $m not found in the kernel package" >&2; exit 1; }
    rel=${f#k/}
    mkdir -p "$I/$(dirname "$rel")"
    case "$f" in
    *.xz) xz -dc "$f" > "$I/${rel%.xz}"; rel=${rel%.xz} ;;
    *.zst) zstd -qdc "$f" > "$I/${rel%.zst}"; rel=${rel%.zst} ;;
    *) cp "$f" "$I/$rel" ;;
    esac
    echo "insmod /$rel" >> "$I/init"
done
cat >> "$I/init" <<'EOF'
tries=0
until [ -b /dev/vda2 ]; do
    tries=$((tries + 1)); [ $tries -gt 30 ] && { echo "no root"; poweroff -f; }
    sleep 1
done
mount -t ext4 -o ro /dev/vda2 /newroot
for fs in dev proc sys; do mount --move /$fs /newroot/$fs; done
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$I/init"
(cd "$I" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) | gzip -9 > initrd.img

step esp
E=$W/esp
mkdir -p "$E/EFI/BOOT" "$E/loader/entries" "$E/minimal"
cp sd/usr/lib/systemd/boot/efi/systemd-bootx64.efi "$E/EFI/BOOT/BOOTX64.EFI"
cp "k/boot/vmlinuz-$KREL" "$E/minimal/vmlinuz"
cp initrd.img "$E/minimal/initrd.img"
printf 'timeout 0\ndefault minimal.conf\neditor no\n' > "$E/loader/loader.conf"
printf 'title minimal\nlinux /minimal/vmlinuz\ninitrd /minimal/initrd.img\noptions %s\n' \
    "$CMDLINE root=PARTUUID=$ROOT_UUID" > "$E/loader/entries/minimal.conf"

step disk
truncate -s "$DISK_BYTES" disk.raw
sfdisk -q disk.raw <<EOF
label: gpt
start=$ESP_START, size=$ESP_SECTORS, type=$ESP_TYPE, uuid=$ESP_UUID, name=esp
start=$ROOT_START, size=$ROOT_SECTORS, type=$ROOT_TYPE, uuid=$ROOT_UUID, name=root
EOF
mkfs.vfat -F 32 -n ESP --offset "$ESP_START" disk.raw $((ESP_SECTORS / 2)) > /dev/null
printf 'mtools_skip_check=1\n' > mtoolsrc
MTOOLSRC=$W/mtoolsrc mcopy -s -i "disk.raw@@$((ESP_START * 512))" "$E"/* ::/
mke2fs -q -F -t ext4 -b 4096 -L root -d "$R" -E offset=$((ROOT_START * 512)) disk.raw \
    $((ROOT_SECTORS / 2))k

step convert
qemu-img convert -O qcow2 disk.raw disk.qcow2
step end
"""


def die(msg):
    sys.exit(f"bench/build.py: {msg}")


def run(cmd, env=None, what=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        die(f"{what or ' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def kiln_build(kiln, recipe, home, out, extra=()):
    env = dict(os.environ, KILN_HOME=home)
    t0 = time.perf_counter()
    p = run([kiln, "-q", "build", recipe, "-o", out, "--profile", "direct", "--json", *extra], env,
            "kiln build")
    return time.perf_counter() - t0, json.loads(p.stdout)


def kiln_boot(kiln, image, profile, marker, direct=None, verbose=False):
    """Run `kiln boot`; return (wall seconds, JSON report, stderr)."""
    cmd = [kiln, "-vv" if verbose else "-q", "boot", image, "--profile", profile, "--expect", marker,
           "--json", "--serial-log", image + ".bench.serial.log"]
    if direct:
        cmd += ["--kernel", direct["kernel"], "--initrd", direct["initrd"], "--cmdline",
                direct["cmdline"]]
    t0 = time.perf_counter()
    p = run(cmd, what="kiln boot")
    return time.perf_counter() - t0, json.loads(p.stdout), p.stderr


def logged_qemu_args(stderr):
    """The QEMU arguments kiln logs at debug level: args=["-nodefaults", ...]."""
    m = re.search(r'args=(\[".*?"\])', re.sub(r"\x1b\[[0-9;]*m", "", stderr))
    if not m:
        die("kiln -vv boot did not log the QEMU command line (look for `starting QEMU`)")
    return json.loads(m.group(1))


def bare_qemu(args, marker, grace=3.0, timeout=180.0):
    """Run qemu-system-x86_64 ARGS; return (seconds to marker line, seconds to exit)."""
    t0 = time.perf_counter()
    err = tempfile.TemporaryFile()
    p = subprocess.Popen(["qemu-system-x86_64", *args], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=err)
    buf = b""
    t_marker = None
    fd = p.stdout.fileno()
    try:
        while t_marker is None:
            left = timeout - (time.perf_counter() - t0)
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                die(f"bare QEMU: no {marker!r} within {timeout} s:\n{buf[-2000:].decode(errors='replace')}")
            chunk = os.read(fd, 65536)
            if not chunk:
                err.seek(0)
                die(f"bare QEMU exited before {marker!r}: {err.read().decode(errors='replace')}\n"
                    f"{' '.join(args)}\n{buf[-2000:].decode(errors='replace')}")
            buf += chunk
            if any(marker.encode() in line for line in buf.split(b"\n")[:-1]):
                t_marker = time.perf_counter() - t0
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    return t_marker, time.perf_counter() - t0


def image_layout(image, work):
    """Disk size and partition starts/sizes (sectors) of kiln's image, via a raw copy + sfdisk."""
    raw = os.path.join(work, "layout.raw")
    run(["qemu-img", "convert", "-O", "raw", image, raw])
    table = json.loads(run(["sfdisk", "-J", raw]).stdout)["partitiontable"]
    size = os.path.getsize(raw)
    os.unlink(raw)
    parts = {p.get("name", ""): p for p in table["partitions"]}
    if "esp" not in parts or "root" not in parts:
        die(f"kiln's image has no esp/root partitions: {table}")
    return size, parts["esp"], parts["root"]


def standard(work, env_extra):
    """Run the standard-tools pipeline in a fresh dir; return (seconds, {step: seconds}, dir)."""
    d = tempfile.mkdtemp(prefix="std.", dir=work)
    script = os.path.join(work, "standard.sh")
    env = dict(os.environ, W=d, **env_extra)
    t0 = time.perf_counter()
    run(["bash", script], env, "the standard-tools pipeline")
    total = time.perf_counter() - t0
    marks = [line.split() for line in open(os.path.join(d, "steps"))]
    steps = {marks[i][0]: float(marks[i + 1][1]) - float(marks[i][1]) for i in range(len(marks) - 1)}
    return total, steps, d


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--kiln", default=os.environ.get("KILN", os.path.join(REPO, "target/release/kiln")))
    ap.add_argument("--recipe", default=os.path.join(REPO, "recipes/minimal.yaml"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temp dir under /var/tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()
    tools = ["apt-get", "dpkg", "cpio", "gzip", "sfdisk", "mkfs.vfat", "mcopy", "mke2fs", "qemu-img",
             "qemu-system-x86_64", "mknod"]
    for tool in tools:
        if not shutil.which(tool):
            die(f"missing {tool}: apt-get install apt dpkg cpio gzip fdisk dosfstools mtools e2fsprogs "
                "qemu-utils qemu-system-x86")
    if os.geteuid() != 0:
        die("run as root (the standard pipeline makes device nodes with mknod, as kiln's Tree does)")
    kiln = os.path.abspath(a.kiln)
    if not os.path.exists(kiln):
        die(f"{kiln} not found: run `cargo build --release` first")
    work = os.path.abspath(a.work) if a.work else tempfile.mkdtemp(prefix="kiln-bench-build.", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    with open(os.path.join(work, "standard.sh"), "w") as f:
        f.write(STANDARD_SH)
    recipe = os.path.abspath(a.recipe)

    r = {k: [] for k in ["kiln-cold", "kiln-warm", "standard"]}
    std_steps, warm_stages, cold_stages = [], [], []
    boots = {}
    std_env = None
    home = out = None
    for rnd in range(a.rounds):
        # 1. cold kiln build, fresh KILN_HOME
        if home:
            shutil.rmtree(home)
            shutil.rmtree(out)
        home = tempfile.mkdtemp(prefix="home.", dir=work)
        out = tempfile.mkdtemp(prefix="out.", dir=work)
        t, rep = kiln_build(kiln, recipe, home, out)
        if not rep.get("boots"):
            die("kiln build did not boot the image")
        r["kiln-cold"].append(t)
        cold_stages.append({s["stage"]: s["seconds"] for s in rep["stages"]})
        # 2. warm rebuild, same home, nothing changed
        t, wrep = kiln_build(kiln, recipe, home, out)
        # Stages with recorded steps must hit; source, render and publish record nothing (they
        # always run, in milliseconds).
        misses = [s["stage"] for s in wrep["stages"] if s.get("steps") and s["cache"] != "hit"]
        if misses or wrep["mirror_requests"]:
            print(f"warning: warm rebuild missed {misses}, {wrep['mirror_requests']} mirror requests",
                  file=sys.stderr)
        r["kiln-warm"].append(t)
        ws = {s["stage"]: s["seconds"] for s in wrep["stages"]}
        # Process start, recipe load, copying the image to -o, the report, exit.
        ws["(outside stages)"] = t - sum(ws.values())
        warm_stages.append(ws)

        if std_env is None:
            pk = {p["name"]: p for p in rep["packages"]}
            kpkg = next(n for n in pk if n.startswith("linux-image-"))
            size, esp, root = image_layout(rep["image"], work)
            cmdline = "console=ttyS0 quiet"  # recipe boot.cmdline (rendered)
            std_env = dict(
                KPKG=kpkg, KVER=pk[kpkg]["version"], KREL=rep["kernel_version"],
                BBVER=pk["busybox-static"]["version"], SDVER=pk["systemd-boot-efi"]["version"],
                MODULES=" ".join(rep["modules"]), MARKER=STD_MARKER, CMDLINE=cmdline,
                ROOT_UUID=STD_ROOT_UUID, ESP_UUID=STD_ESP_UUID, ESP_TYPE=ESP_TYPE, ROOT_TYPE=ROOT_TYPE,
                DISK_BYTES=str(size), ESP_START=str(esp["start"]), ESP_SECTORS=str(esp["size"]),
                ROOT_START=str(root["start"]), ROOT_SECTORS=str(root["size"]))
            # kiln's kernel and initrd (blob store) and its direct-boot command line.
            krec = json.load(open(os.path.join(home, "stages", "kernel",
                                               os.listdir(os.path.join(home, "stages", "kernel"))[0])))
            blob = lambda d: os.path.join(home, "blobs", "sha256", d.split(":")[-1])  # noqa: E731
            kiln_direct_cmdline = f"{cmdline} root=PARTUUID={root['uuid'].lower()}"
            kiln_marker = rep["boots"][0]["marker_line"].strip()

        # 1b. standard tools, cold (empty download dir)
        t_std, steps, sdir = standard(work, std_env)
        # ... plus the same QEMU command line, booted to the marker.
        direct = {"kernel": blob(krec["vmlinuz"]), "initrd": blob(krec["initrd"]),
                  "cmdline": kiln_direct_cmdline}
        if "direct-args" not in boots:
            # kiln's exact QEMU command line for its image (debug log), once.
            image = rep["image"]
            _, _, err = kiln_boot(kiln, image, "direct", kiln_marker, direct, verbose=True)
            boots["direct-args"] = logged_qemu_args(err)
            _, _, err = kiln_boot(kiln, image, "uefi", kiln_marker, verbose=True)
            boots["uefi-args"] = logged_qemu_args(err)
        std_args = substitute(boots["direct-args"], image=os.path.join(sdir, "disk.qcow2"), kernel=os.path.join(sdir, "k/boot/vmlinuz-" + std_env["KREL"]),
                              initrd=os.path.join(sdir, "initrd.img"),
                              append=f"{std_env['CMDLINE']} root=PARTUUID={STD_ROOT_UUID} console=ttyS0,115200 panic=-1")
        # Until QEMU exits, as kiln's verify stage waits for the guest to power off.
        _, t_boot = bare_qemu(std_args, STD_MARKER)
        steps["boot"] = t_boot
        r["standard"].append(t_std + t_boot)
        std_steps.append(steps)
        shutil.rmtree(sdir)

        # 3. boot times on kiln's image
        image = rep["image"]
        tcg_dir = os.path.join(work, "profiles")
        os.makedirs(tcg_dir, exist_ok=True)
        for prof in ["direct", "uefi"]:
            src = open(os.path.join(REPO, "qemu", f"{prof}.toml")).read()
            tcg = os.path.join(tcg_dir, f"{prof}-tcg.toml")
            with open(tcg, "w") as f:
                f.write(re.sub(r'(?m)^accel = "auto"', 'accel = "tcg"', src))
            d = direct if prof == "direct" else None
            t, brep, _ = kiln_boot(kiln, image, prof, kiln_marker, d)
            boots.setdefault(f"{prof}-kiln", []).append(t)
            boots.setdefault(f"{prof}-kiln-marker", []).append(brep["time_to_marker"])
            boots.setdefault(f"{prof}-kiln-outside", []).append(t - brep["time_to_marker"])
            t, brep, _ = kiln_boot(kiln, image, tcg, kiln_marker, d)
            boots.setdefault(f"{prof}-kiln-noprobe", []).append(t)
            boots.setdefault(f"{prof}-kiln-noprobe-outside", []).append(t - brep["time_to_marker"])
            # This round's image, kernel and initrd (the paths kiln logged were round 1's).
            args = substitute(boots[f"{prof}-args"], image, **({"kernel": d["kernel"], "initrd": d["initrd"]} if d else {}))
            if prof == "uefi":
                vars_copy = os.path.join(work, "OVMF_VARS.fd")
                shutil.copy("/usr/share/OVMF/OVMF_VARS_4M.fd", vars_copy)
                args = [re.sub(r"file=/[^,]*OVMF_VARS\.fd", f"file={vars_copy}", x) for x in args]
            tm, te = bare_qemu(args, kiln_marker)
            boots.setdefault(f"{prof}-bare-marker", []).append(tm)
            boots.setdefault(f"{prof}-bare", []).append(te)
            boots.setdefault(f"{prof}-bare-outside", []).append(te - tm)
        print(f"round {rnd + 1}: kiln-cold {r['kiln-cold'][-1]:.2f}s, standard {r['standard'][-1]:.2f}s, "
              f"kiln-warm {r['kiln-warm'][-1]:.3f}s, boots " +
              ", ".join(f"{k} {v[-1]:.2f}s" for k, v in boots.items() if not k.endswith("-args")),
              file=sys.stderr)

    report(a, r, std_steps, cold_stages, warm_stages, boots, rep)
    if not a.keep and not a.work:
        shutil.rmtree(work)


def substitute(args, image, kernel=None, initrd=None, append=None):
    """kiln's QEMU arguments with another disk (and, for direct boot, kernel, initrd, command line)."""
    out = list(args)
    for flag, value in [("-kernel", kernel), ("-initrd", initrd), ("-append", append)]:
        if value is not None:
            out[out.index(flag) + 1] = value
    i = next(i for i, x in enumerate(out) if x.startswith("file=") and "if=virtio" in x)
    out[i] = re.sub(r"^file=.*?,format=", f"file={image},format=", out[i])
    return out


def report(a, r, std_steps, cold_stages, warm_stages, boots, rep):
    n = a.rounds
    m = {k: med(v) for k, v in r.items()}

    def stage_meds(rows):
        keys = list(rows[0].keys())
        return {k: med([row.get(k, 0.0) for row in rows]) for k in keys}

    probe = med(boots["direct-kiln-outside"] + boots["uefi-kiln-outside"]) - \
        med(boots["direct-kiln-noprobe-outside"] + boots["uefi-kiln-noprobe-outside"])
    cold = stage_meds(cold_stages)
    warm = stage_meds(warm_stages)
    steps = stage_meds(std_steps)
    print(f"image build: {os.path.relpath(a.recipe, REPO)} (kernel {rep['kernel_version']}, "
          f"{len(rep['modules'])} modules, disk {rep['disk_size'] // (1 << 20)} MiB, qcow2 "
          f"{rep['file_size'] / (1 << 20):.1f} MiB); {n} rounds, medians; TCG (KVM unusable here)")
    print()
    print("1. cold build, direct boot to the marker")
    print(f"  kiln build (empty KILN_HOME)     {m['kiln-cold']:7.2f} s")
    print("    stages: " + ", ".join(f"{k} {v:.2f}" for k, v in cold.items()))
    print(f"  standard tools (apt-get …)       {m['standard']:7.2f} s")
    print("    steps:  " + ", ".join(f"{k} {v:.2f}" for k, v in steps.items()))
    print(f"  ratio kiln / standard            {m['kiln-cold'] / m['standard']:7.2f}")
    print(f"  kiln without its KVM probe       {m['kiln-cold'] - probe:7.2f} s   "
          f"ratio {(m['kiln-cold'] - probe) / m['standard']:.2f}")
    print("  note: apt-get download uses the host's apt indices (apt-get update state, not timed);")
    print("        kiln's cold build fetches and verifies InRelease + Packages itself, and its")
    print("        verify stage includes the per-process KVM probe (see 3).")
    print()
    print("2. warm no-change rebuild (same KILN_HOME)")
    print(f"  kiln build total (wall)          {m['kiln-warm']:7.3f} s   goal < 1 s")
    for k, v in sorted(warm.items(), key=lambda kv: -kv[1]):
        print(f"    {k:10} {v:7.3f} s")
    print(f"  ratio warm / cold                {m['kiln-warm'] / m['kiln-cold']:7.3f}")
    print()
    print("3. boot to the marker on kiln's image (wall time until the process exits)")
    print("   overhead = (kiln's wall time - its own time-to-marker) - (bare wall - bare time-to-marker):")
    print("   kiln's time outside the guest's boot, insensitive to guest-boot noise")
    for prof in ["direct", "uefi"]:
        b = {k: med(v) for k, v in boots.items() if k.startswith(prof + "-") and not k.endswith("-args")}
        bare_out = b[f"{prof}-bare-outside"]
        print(f"  {prof}:")
        print(f"    bare QEMU                        {b[f'{prof}-bare']:6.2f} s   (marker at {b[f'{prof}-bare-marker']:.2f} s)")
        print(f"    kiln boot, accel auto (probe)    {b[f'{prof}-kiln']:6.2f} s   (marker at "
              f"{b[f'{prof}-kiln-marker']:.2f} s)   overhead {b[f'{prof}-kiln-outside'] - bare_out:+6.2f} s")
        print(f"    kiln boot, accel tcg (no probe)  {b[f'{prof}-kiln-noprobe']:6.2f} s"
              f"{'':24}overhead {b[f'{prof}-kiln-noprobe-outside'] - bare_out:+6.2f} s   goal < 0.3 s")
        print(f"    ratio kiln (no probe) / bare     {b[f'{prof}-kiln-noprobe'] / b[f'{prof}-bare']:6.2f}")
    print(f"  KVM probe (once per kiln process and KILN_HOME; on a host where KVM hangs guests it ends 0.5 s after the test guest stalls): {probe:.2f} s")
    print("  (no flag or env var skips it for `kiln boot`/`kiln build`; a profile with accel = \"tcg\" does)")

if __name__ == "__main__":
    main()
