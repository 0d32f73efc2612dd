#!/usr/bin/env bash
# VM levels on this machine: time until each level serves calls, and resident memory
# of QEMU and of the runtime at each level, from one run of the nested demo suite.
#   LEVELS=3 bash docs/bench-vm.sh
# Needs the image (./x image); builds the release runtimes (./x runtime).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
LEVELS=${LEVELS:-2}
# The level runtime (no compiler) for the levels, the full one in target/release.
./x runtime >&2
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
out=$(mktemp)
trap 'rm -f "$out"' EXIT
./target/release/matryoshka test target/wasm-suites/components/nested/nested.wasm \
    --env NESTED_LEVELS="$LEVELS" --exact nested_levels --format json >"$out" || true
python3 - "$out" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("event") != "test-finished":
        continue
    print("outcome:", e["outcome"]["status"], f'{e["duration_secs"]:.1f} s',
          e["outcome"].get("message", "")[:300])
    for log in e["output"]["logs"]:
        m = log["message"]
        if "answering at level" in m:
            print(f'{log["level_path"]:<14} serving calls after {log["at_secs"]:6.1f} s')
        elif "booted with" in m:
            print(f'{log["level_path"]:<14} {m[:110]}')
        elif "resident memory" in m:
            print(f'{log["level_path"]:<14} {m.split(": ", 1)[1]}')
PY
