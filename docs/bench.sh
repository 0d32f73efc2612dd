#!/usr/bin/env bash
# Benchmarks of the level-0 runner; `./x bench` runs this after a release build.
# Prints markdown rows for docs/benchmarks.md. Needs hyperfine and GNU time.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

BIN=${BIN:-target/release/matryoshka}
C=target/wasm-suites/components
BASICS=$C/basics/basics.wasm
MANY=$C/many/many.wasm
RUNS=${RUNS:-10}
CACHE=$(mktemp -d /tmp/matryoshka-bench.XXXXXX)
trap 'rm -rf "$CACHE"' EXIT
export MATRYOSHKA_CACHE_DIR=$CACHE

median_ms() { # prints the median wall time in ms of hyperfine's JSON export $1
    python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["results"][0]["median"]; print("%.1f" % (m*1000))' "$1"
}

echo "## $(date -u +%F) on $(nproc) cores, $(uname -m), $($BIN --version)"

hyperfine -N -w 0 -r "$RUNS" --export-json "$CACHE/cold.json" \
    "$BIN test $BASICS --list --no-cache" >/dev/null 2>&1
echo "- cold start (--no-cache: compile basics, $(stat -c %s "$BASICS") bytes, then list): $(median_ms "$CACHE/cold.json") ms median of $RUNS"

"$BIN" test "$BASICS" --list >/dev/null 2>&1
hyperfine -N -w 2 -r "$RUNS" --export-json "$CACHE/warm.json" "$BIN test $BASICS --list" >/dev/null 2>&1
echo "- warm start (precompiled basics from the cache, then list): $(median_ms "$CACHE/warm.json") ms median of $RUNS"

"$BIN" test "$MANY" --list >/dev/null 2>&1
hyperfine -N -w 1 -r "$RUNS" --export-json "$CACHE/one.json" "$BIN test $MANY -j 1 --exact trivial_0000" >/dev/null 2>&1
hyperfine -N -w 1 -r "$RUNS" --export-json "$CACHE/all.json" "$BIN test $MANY -j 1" >/dev/null 2>&1
one=$(median_ms "$CACHE/one.json")
all=$(median_ms "$CACHE/all.json")
echo "- 1000 trivial tests, -j 1: $all ms; 1 of them: $one ms; per-test overhead: $(python3 -c "print(f'{($all-$one)/999:.3f}')") ms"
hyperfine -N -w 1 -r "$RUNS" --export-json "$CACHE/all2.json" "$BIN test $MANY -j 2" >/dev/null 2>&1
echo "- 1000 trivial tests, -j 2: $(median_ms "$CACHE/all2.json") ms"

rss=$( { /usr/bin/time -f '%M' "$BIN" test "$BASICS" --list >/dev/null; } 2>&1 | tail -1)
echo "- peak RSS of a warm run that loads basics and lists its tests: $((rss / 1024)) MiB ($rss KiB)"
rss=$( { /usr/bin/time -f '%M' "$BIN" test "$BASICS" --skip deliberately >/dev/null; } 2>&1 | tail -1)
echo "- peak RSS of a warm run of the basics suite (11 tests, 2 at a time): $((rss / 1024)) MiB ($rss KiB)"
