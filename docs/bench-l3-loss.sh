#!/usr/bin/env bash
# How often a chain to L3 is lost on this machine, per candidate configuration of L1:
# RUNS times the nested demo to L3 (as `LEVELS=3 bash docs/bench-vm.sh`), one line per
# run (passed or lost, and how), then the count.
#   CANDIDATE=tcg-single RUNS=30 bash docs/bench-l3-loss.sh
# Candidates (L1 is the only QEMU L0 starts, so a wrapper first in PATH changes it
# alone; the levels below boot as usual):
#   baseline    as shipped: TCG (multi-threaded), -cpu max, -smp 2, kvm_amd defaults
#   tcg-single  -accel tcg,thread=single: one host thread runs both vCPUs of L1
#   smp1        -smp 1 for L1
#   npt0        kvm_amd.npt=0 on L1's kernel line (L2 and L3 on shadow page tables)
#   epyc        -cpu EPYC instead of max
# Needs the image (./x image); builds the release runtimes (./x runtime).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
CANDIDATE=${CANDIDATE:-baseline}
RUNS=${RUNS:-30}
# The level runtime (no compiler) for the levels, the full one in target/release.
./x runtime >&2
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
wrap=$(mktemp -d)
out=$(mktemp)
trap 'rm -rf "$wrap" "$out"' EXIT
real=$(command -v qemu-system-x86_64)
case $CANDIDATE in
    baseline) edit='' ;;
    tcg-single) edit='s/^tcg$/tcg,thread=single/' ;;
    smp1) edit='/^-smp$/{n;s/^2$/1/}' ;;
    npt0) edit='/^-append$/{n;s/$/ kvm_amd.npt=0/}' ;;
    epyc) edit='/^-cpu$/{n;s/^max$/EPYC/}' ;;
    *) echo "unknown CANDIDATE=$CANDIDATE" >&2; exit 2 ;;
esac
# The wrapper rewrites its arguments one per line (none holds a newline) and execs
# the real QEMU, so the runner's process handling sees QEMU itself.
cat >"$wrap/qemu-system-x86_64" <<EOF
#!/usr/bin/env bash
args=()
while IFS= read -r a; do args+=("\$a"); done < <(printf '%s\n' "\$@" | sed -e '$edit')
exec $real "\${args[@]}"
EOF
chmod +x "$wrap/qemu-system-x86_64"
export PATH=$wrap:$PATH
passed=0
lost=0
for i in $(seq "$RUNS"); do
    t0=$SECONDS
    ./target/release/matryoshka test target/wasm-suites/components/nested/nested.wasm \
        --env NESTED_LEVELS=3 --exact nested_levels --format json >"$out" 2>/dev/null || true
    line=$(python3 - "$out" <<'PY'
import json, sys
status, msg, l3 = "no result", "", ""
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("event") != "test-finished":
        continue
    status = e["outcome"]["status"]
    msg = " ".join(e["outcome"].get("message", "").split())[:260]
    for log in e["output"]["logs"]:
        if "answering at level" in log["message"] and log["level_path"].count("/") == 3:
            l3 = f'L3 serving at {log["at_secs"]:.1f} s'
print(status, l3, msg, sep=" | ")
PY
)
    case $line in
        passed*) passed=$((passed + 1)) ;;
        *) lost=$((lost + 1)) ;;
    esac
    echo "$CANDIDATE run $i ($((SECONDS - t0)) s): $line"
done
echo "$CANDIDATE: $lost of $RUNS lost, $passed passed"
