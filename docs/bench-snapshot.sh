#!/usr/bin/env bash
# Chain snapshots on this machine: 20 tests at the deepest level of a --levels chain,
# each on a copy restored from a snapshot: first with an empty cache (the chain booted
# bare, kept, attached, saved again for the copies), then again from the kept chain,
# then with --no-cache (saved for the run only, with the component), beside the same
# 20 tests on the chain as booted (--no-snapshot, shared). Prints the time from the
# start to the chain serving the component, the saves (time, size), each restore, and
# the totals.
#   LEVELS=3 bash docs/bench-snapshot.sh
# Needs the image (./x image); builds the release runtimes (./x runtime).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
LEVELS=${LEVELS:-3}
# The level runtime (no compiler) for the levels, the full one in target/release.
./x runtime >&2
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cache=$work/cache
mkdir -m 0700 "$cache"
run() {
    local name=$1
    shift
    local t0 t1
    t0=$(date +%s.%N)
    ./target/release/matryoshka test target/wasm-suites/components/many/many.wasm \
        --levels "$LEVELS" --partition count:1/50 --retries 1 --run-dir "$work/$name" "$@" \
        >"$work/$name.out" 2>"$work/$name.err" || true
    t1=$(date +%s.%N)
    python3 - "$name" "$t0" "$t1" "$work/$name" <<'PY'
import re, sys, pathlib
name, t0, t1, folder = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), pathlib.Path(sys.argv[4])
out = (folder.parent / f"{name}.out").read_text()
err = (folder.parent / f"{name}.err").read_text()
summary = [l for l in out.splitlines() if " passed, " in l]
print(f"{name}: {summary[-1] if summary else 'no summary'}; whole run {t1 - t0:.1f} s")
for line in err.splitlines():
    if line.startswith(("saved ", "restored ", "no snapshot ", "the snapshot ", "the chain did not boot")) or "warning" in line.lower():
        print("   ", line[:240])
finished = [float(m.group(1)) for m in re.finditer(r"finished in ([0-9.]+)s", out)]
if finished:
    print(f"    from the start to the chain serving the component: {t1 - t0 - finished[-1]:.1f} s")
journal = (folder / "L0-L1.relay").read_text() if (folder / "L0-L1.relay").exists() else ""
stamps = [(l[:24], l[25:]) for l in journal.splitlines()]
from datetime import datetime
def secs(stamp):
    return datetime.fromisoformat(stamp).timestamp()
ready = [secs(t) for t, what in stamps if what.startswith("← Ready")]
if ready:
    print(f"    from the start to the deepest level serving (cold boot): {ready[-1] - t0:.1f} s")
restores = [float(m.group(1)) for _, what in stamps if (m := re.search(r"restored from .* in ([0-9.]+) s", what))]
if restores:
    restores.sort()
    print(f"    {len(restores)} restores: min {restores[0]:.2f} s, median {restores[len(restores)//2]:.2f} s, max {restores[-1]:.2f} s")
# Request ids start again on each restored copy's connection: pair each attach
# with the next answer of its id.
asked, attaches = {}, []
for t, what in stamps:
    if m := re.match(r"→ attach of component .* #([0-9]+)$", what):
        asked[m.group(1)] = secs(t)
    elif (m := re.match(r"← #([0-9]+) answered", what)) and m.group(1) in asked:
        attaches.append(secs(t) - asked.pop(m.group(1)))
attaches.sort()
if attaches:
    print(f"    {len(attaches)} attaches of the component down the chain: min {attaches[0]:.2f} s, median {attaches[len(attaches)//2]:.2f} s, max {attaches[-1]:.2f} s")
tests = [float(m.group(1)) for m in re.finditer(r"PASS \[\s*([0-9.]+)s\]", out)]
if tests:
    print(f"    tests: {len(tests)}, their durations together {sum(tests):.1f} s")
PY
}
run kept-cold --cache-dir "$cache"
run kept-warm --cache-dir "$cache"
run in-run --no-cache
run shared --no-snapshot
du -sh "$cache/snapshots"/* | sed 's/^/kept in the cache: /'

