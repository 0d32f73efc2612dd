#!/usr/bin/env bash
# The virtualization stack on this machine, ROUNDS times (default 3):
# - the passthrough demo to L2 with the qemu backend and with L2 as a libvirt domain:
#   time until L1 and L2 serve calls (each level's "serving after" from -v), and the test;
# - QMP on L1's QEMU: round trip (200 query-status) and hot-plug latency (device_add
#   returned -> the disk in L1's sysfs);
# - libvirt at L1: a plain guest's start, and attach-device -> the guest's kernel shows the disk.
#   ROUNDS=3 bash docs/bench-virt.sh
# Needs the image (./x image) and the suites (cargo build --release -p
# matryoshka-test-programs); builds the release runtimes (./x runtime).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
ROUNDS=${ROUNDS:-3}
# The level runtime (no compiler) for the levels, the full one in target/release.
./x runtime >&2
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
suite() { echo "target/wasm-suites/components/$1/$1.wasm"; }
mt=./target/release/matryoshka
out=$(mktemp)
trap 'rm -f "$out"' EXIT
# Each level's "serving after" (from -v) and the test's PASS/FAIL.
summary() {
    python3 - "$out" <<'PY'
import re, sys
said = []
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"serving after ([0-9.]+) s", line)
    if m:
        # Levels serve in order: L1 (counted from its QEMU's start at L0), then L2
        # (from its start at L1, as QEMU or as a libvirt domain).
        n = sum(1 for s in said if "serving" in s) + 1
        said.append(f"L{n} serving after {m.group(1)} s")
    m = re.search(r"(PASS|FAIL) \[ *([0-9.]+)s\]", line)
    if m:
        said.append(f"test {m.group(1)} in {m.group(2)} s")
print("; ".join(said))
PY
}
for round in $(seq "$ROUNDS"); do
    echo "== round $round"
    for backends in qemu qemu,libvirt; do
        $mt -v test "$(suite passthrough)" --grant nest --grant passthrough --grant exec=dd --grant libvirt \
            --env PASSTHROUGH_BACKENDS=$backends --nocapture disk_passed_to_level_n >"$out" 2>&1 || true
        echo "passthrough, backends $backends: $(summary)"
    done
    $mt test "$(suite qmp)" --grant nest --grant passthrough --grant qmp --nocapture >"$out" 2>&1 || true
    grep -oE '(QMP round trip.*|hot-plugged disk seen by its kernel.*|(PASS|FAIL) \[.*)' "$out" | sed 's/^/qmp: /'
    $mt test "$(suite libvirt)" --grant nest --grant libvirt --grant exec=truncate,cat,rm \
        --ignored domain_lifecycle_at_l1 --nocapture >"$out" 2>&1 || true
    grep -oE '(guest up after.*|hot-plugged disk seen by the guest after [0-9]+ ms|(PASS|FAIL) \[.*)' "$out" | sed 's/^/libvirt: /'
done
