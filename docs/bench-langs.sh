#!/usr/bin/env bash
# The basics suite in Rust, C, Python and JavaScript, side by side in one run:
# component size, cold compile (an empty compile cache), warm start (`--list` with the
# artifact cached), per-test overhead (median duration of the trivial tests, each in a
# fresh instance), and time to an L1 VM level serving the suite (`--levels 1`: boot,
# the runtime and the component with the artifact compiled at L0 sent down, instantiated).
#   RUNS=5 [ACCEL=tcg|kvm|auto] bash docs/bench-langs.sh
# Needs ./x langs, the release runtime (./x runtime) and the image (./x image).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
RUNS=${RUNS:-5}
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
python3 - "$RUNS" <<'PY'
import json, os, statistics, subprocess, sys, tempfile, time

runs = int(sys.argv[1])
# KVM does not work at L0 here; `auto` would probe it first with an empty cache.
ACCEL = os.environ.get("ACCEL", "tcg")
bin = "target/release/matryoshka"
suites = {
    "Rust": "target/wasm-suites/components/basics/basics.wasm",
    "C": "target/lang-suites/c/basics/basics.wasm",
    "Python": "target/lang-suites/python/basics/basics.wasm",
    "JavaScript": "target/lang-suites/js/basics/basics.wasm",
}
trivial = {"hostname_is_set", "arch_is_known", "level_path_matches_level"}


def timed(args, env):
    start = time.monotonic()
    out = subprocess.run([bin, *args], env=env, capture_output=True, text=True)
    return time.monotonic() - start, out


def up_at(args, env):
    """Seconds until stderr says the deepest level is up, and the whole run's."""
    start = time.monotonic()
    p = subprocess.Popen([bin, *args], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    up = None
    for line in p.stderr:
        if up is None and line.rstrip().endswith(" is up"):
            up = time.monotonic() - start
    p.wait()
    return up, time.monotonic() - start, p.returncode


print(f"{'':<11} {'size':>10} {'cold compile':>13} {'warm start':>11} {'per test':>9} {'L1 serving':>11} {'L1 run':>8}")
for lang, wasm in suites.items():
    size = os.path.getsize(wasm)
    colds, warms, per_test = [], [], []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, MATRYOSHKA_CACHE_DIR=cache)
            t, out = timed(["test", wasm, "--list"], env)
            assert out.returncode == 0, out.stderr
            colds.append(t)
            t, _ = timed(["test", wasm, "--list"], env)
            warms.append(t)
            _, out = timed(["test", wasm, "--format", "json"], env)
            for line in out.stdout.splitlines():
                e = json.loads(line)
                if e.get("event") == "test-finished" and e["test"]["name"] in trivial:
                    per_test.append(e["duration_secs"])
    # One L1 boot per language (a VM boot is the slow part), the component compiled at
    # L0 beforehand: its artifact travels down with it and L1 compiles nothing.
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as run_dir:
        env = dict(os.environ, MATRYOSHKA_CACHE_DIR=cache)
        timed(["test", wasm, "--list"], env)
        up, total, rc = up_at(["test", wasm, "--levels", "1", "--exact", "hostname_is_set",
                               "--image-dir", "target/images/x86_64", "--accel", ACCEL, "--run-dir", run_dir], env)
    med = statistics.median
    print(f"{lang:<11} {size / 1e6:>8.2f} MB {med(colds) * 1000:>10.0f} ms {med(warms) * 1000:>8.0f} ms "
          f"{med(per_test) * 1000:>6.2f} ms {up if up else float('nan'):>9.1f} s {total:>6.1f} s"
          + ("" if rc == 0 else f"  (exit {rc})"))
PY
