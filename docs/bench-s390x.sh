#!/usr/bin/env bash
# s390x levels on this machine: where the component is compiled for an s390x level.
# Boots an s390x L1 from L0 RUNS times with the parent compiling the component for
# s390x (the default) and RUNS times with the level compiling it itself under TCG
# (MATRYOSHKA_CROSS_COMPILE=0), alternating, and prints for each run the boot time,
# the time from Load to an instance at L1, and how the component got there. Then, RUNS
# times each, an s390x L1 and an x86_64 L1 with CALLS no-op calls from L0 to each:
# time to serving and the round trip.
#   RUNS=3 CALLS=500 bash docs/bench-s390x.sh
# Needs both images (./x image, ./x image s390x) and both runtimes (./x runtime,
# ./x runtime s390x).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
RUNS=${RUNS:-3}
CALLS=${CALLS:-500}
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
suite=target/wasm-suites/components/nested/nested.wasm
echo "runtime sizes: x86_64 $(stat -L -c %s target/runtimes/x86_64/matryoshka) B," \
    "s390x $(stat -L -c %s target/runtimes/s390x/matryoshka) B; suite $(stat -c %s "$suite") B"
for i in $(seq "$RUNS"); do
    for cross in 1 0; do
        cache=$(mktemp -d) run=$(mktemp -d)
        # A fresh cache each time: the parent compiles (or not) every run.
        start=$(date +%s.%N)
        MATRYOSHKA_CROSS_COMPILE=$cross ./target/release/matryoshka -v test "$suite" --cache-dir "$cache" \
            --image-dir target/images --run-dir "$run" --env NESTED_LEVELS=1 --env NESTED_ARCHS=s390x \
            --exact nested_levels >"$run/out" 2>"$run/err" || true
        end=$(date +%s.%N)
        python3 - "$run/err" "$cross" "$start" "$end" "$(grep -c PASS "$run/out" || true)" <<'PY'
import re, sys
err, cross, start, end, passed = open(sys.argv[1]).read(), sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
boot = re.search(r"booted with tcg in ([0-9.]+) s", err)
comp = re.search(r"compiled component \w+ for s390x in (\d+) ms", err)
load = re.search(r"component loaded \((\w+)\) and instantiated (\d+) ms after Load", err)
print(f"{'parent compiles' if cross == '1' else 'level compiles '}: boot {boot.group(1) if boot else '?'} s, "
      f"compile at L0 {comp.group(1) + ' ms' if comp else '-'}, "
      f"Load to instance at L1 {load.group(2) if load else '?'} ms ({load.group(1) if load else '?'}), "
      f"whole run {float(end) - float(start):.1f} s, {'passed' if passed == '1' else 'FAILED'}")
PY
        rm -rf "$cache" "$run"
    done
done
for i in $(seq "$RUNS"); do
    for arch in s390x x86_64; do
        run=$(mktemp -d)
        ./target/release/matryoshka -v test "$suite" --image-dir target/images --run-dir "$run" \
            --env NESTED_LEVELS=1 --env NESTED_ARCHS=$arch --env NESTED_ROUND_TRIPS="$CALLS" \
            --exact nested_levels --nocapture >"$run/out" 2>&1 || true
        serving=$(grep -o 'booted with [a-z]* in [0-9.]* s' "$run/out" | head -1 || true)
        if trip=$(grep -o 'no-op round trip to .*' "$run/out"); then
            rm -rf "$run"
        else
            trip="no round trip (see $run/out)"
        fi
        echo "$arch L1: ${serving:-no boot line}; $trip"
    done
done
