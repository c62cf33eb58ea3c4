#!/usr/bin/env python3
"""Supply-chain benchmark (issue #16): what the SBOM, provenance and boot attestation cost.

Set-up (all real, on loopback): Debian's `docker-registry`, a `nats-server -js`, and `kiln up
--publish-to REGISTRY --key KEY` (its verifier key made in KILN_HOME). N builds of
recipes/app.yaml with a different `release` each (so each disk is new and uploaded whole) are
submitted with `kiln submit --follow --json`.

Measured:
  publish     the publish stage's own figures for each build: `seconds` (hash, upload and sign
              the disk: publishing the image alone) and `attestation_seconds` (make the SBOM and
              provenance, sign them, push them with the verify stage's boot attestation);
              overhead = attestation_seconds / seconds, median over the builds.
  verify      `kiln verify REF --key --verifier-key` (signature + three attestations) against
              `cosign verify-attestation --type spdxjson` (one attestation) on the last image,
              whole processes, median of --verify-runs runs each.

Usage: bench/attest.py [--builds N] [--verify-runs N] [--kiln PATH] [--work DIR] [--keep]
                       [--recipe FILE --vary PARAM]
The Debian example: --recipe recipes/debian-bookworm.yaml --vary hostname --builds 1
(KILN_HOME defaults to the tests' shared cache /var/tmp/kiln-test-cache so packages are reused.)
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


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def wait_http(url, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                           capture_output=True, text=True)
        if r.stdout in ("200", "401"):
            return
        time.sleep(0.1)
    sys.exit(f"{url} did not answer")


def timed(cmd, env):
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
    return took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--builds", type=int, default=5)
    ap.add_argument("--verify-runs", type=int, default=7)
    ap.add_argument("--kiln", default=None)
    ap.add_argument("--work", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--recipe", default="recipes/app.yaml",
                    help="recipe to build (recipes/debian-bookworm.yaml for the Debian example)")
    ap.add_argument("--vary", default="release",
                    help="parameter set to a new value per build so each disk is new "
                         "(hostname for the Debian example)")
    args = ap.parse_args()
    kiln = args.kiln or next(
        (p for p in [os.path.join(REPO, "target/release/kiln"), os.path.join(REPO, "target/debug/kiln")]
         if os.path.exists(p)), "kiln")
    env = dict(os.environ)
    env.setdefault("KILN_HOME", "/var/tmp/kiln-test-cache")
    for k in ["KILN_NATS_URL", "KILN_REGISTRY_USER", "KILN_REGISTRY_PASSWORD"]:
        env.pop(k, None)
    work = args.work or tempfile.mkdtemp(prefix="kiln-bench-attest.")
    os.makedirs(work, exist_ok=True)
    procs = []
    made = []
    try:
        reg_port, nats_port = free_port(), free_port()
        with open(os.path.join(work, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                    f"storage:\n  filesystem:\n    rootdirectory: {work}/registry\n"
                    f"http:\n  addr: 127.0.0.1:{reg_port}\n")
        procs.append(subprocess.Popen(["/usr/bin/docker-registry", "serve", f"{work}/registry.yml"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["nats-server", "-js", "-sd", f"{work}/nats", "-a", "127.0.0.1",
                                       "-p", str(nats_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{reg_port}/v2/")
        key = os.path.join(work, "images.key")
        subprocess.run([kiln, "keygen", "-o", key], check=True, env=env, capture_output=True)
        url = f"nats://127.0.0.1:{nats_port}"
        up_log = open(os.path.join(work, "up.log"), "w")
        procs.append(subprocess.Popen(
            [kiln, "up", "--nats", url, "--publish-to", f"127.0.0.1:{reg_port}", "--key", key,
             "--recipes", REPO, "--listen", "none"],
            stdout=subprocess.DEVNULL, stderr=up_log, env=env, cwd=REPO))
        stamp = str(int(time.time()))
        recipe = args.recipe
        text = open(os.path.join(REPO, recipe)).read()
        if "\npublish:" not in text:
            # A recipe without a publish section (the Debian example): a copy beside it that has
            # one, removed at the end.
            recipe = os.path.join(os.path.dirname(recipe), f".bench-attest-{os.getpid()}.yaml")
            with open(os.path.join(REPO, recipe), "w") as f:
                f.write(text + "\npublish:\n  repository: kiln/bench\n  tags: [latest]\n")
            made.append(os.path.join(REPO, recipe))
        rows = []
        ref = None
        for i in range(args.builds):
            r = subprocess.run(
                [kiln, "submit", recipe, "--profile", "direct", "--set",
                 f"{args.vary}=bench-{stamp}-{i}", "--follow", "--timeout", "1800", "--json",
                 "--nats", url],
                env=env, cwd=REPO, capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"build {i} failed:\n{r.stdout}\n{r.stderr}")
            out = json.loads(r.stdout.strip().splitlines()[-1])["outputs"]
            rows.append((out["seconds"], out["attestation_seconds"], out["bytes"]))
            ref = out["reference"]
            print(f"build {i}: image {out['seconds']:.3f} s ({out['bytes'] >> 20} MiB), "
                  f"attestations {out['attestation_seconds']:.3f} s", flush=True)
        image = statistics.median(r[0] for r in rows)
        attest = statistics.median(r[1] for r in rows)
        overhead = statistics.median(r[1] / r[0] for r in rows)
        print(f"publish, median of {len(rows)}: image alone {image:.3f} s, attestations "
              f"{attest:.3f} s, overhead {overhead * 100:.1f} % (goal <= 10 %)")

        home = env["KILN_HOME"]
        verify = [kiln, "verify", ref, "--key", key + ".pub", "--verifier-key",
                  os.path.join(home, "verifier.key.pub")]
        cosign_home = os.path.join(work, "cosign-home")
        os.makedirs(cosign_home, exist_ok=True)
        cenv = dict(env, HOME=cosign_home, HTTPS_PROXY="http://127.0.0.1:9",
                    HTTP_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1")
        cosign = ["cosign", "verify-attestation", "--insecure-ignore-tlog", "--allow-http-registry",
                  "--type", "spdxjson", "--key", key + ".pub", ref]
        k = statistics.median(timed(verify, env) for _ in range(args.verify_runs))
        c = statistics.median(timed(cosign, cenv) for _ in range(args.verify_runs))
        print(f"verify, median of {args.verify_runs}: kiln verify (4 checks) {k * 1000:.0f} ms, "
              f"cosign verify-attestation (1) {c * 1000:.0f} ms, ratio {k / c:.2f}")
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        for path in made:
            os.remove(path)
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
