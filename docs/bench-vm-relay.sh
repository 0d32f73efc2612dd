#!/usr/bin/env bash
# Calls into VM levels on this machine: the no-op round trip from L0 to the bottom of a
# chain of DEPTH VM levels (1 .. DEPTH) over the virtio-serial relay, beside a 32-byte
# echo through SSH to the bottom level of a chain of the same depth (the peer
# baseline: OpenSSH through each level's sshd, `ProxyJump` per hop, one session kept
# open, `cat` at the bottom).
#   DEPTH=3 CALLS=500 bash docs/bench-vm-relay.sh     (FROM=3: only depth 3)
# The relay side: the relay suite's bench_round_trips with MATRYOSHKA_CHAIN=vm,...
# (the L0 test boots L1, each level boots the next, every level keeps its handle).
# The SSH side: ci.wasm's failing test on a `--levels N` chain held with
# --keep-failed-for; the echo runs through the run's ssh_config while it is held.
# Needs the image (./x image); builds the release runtimes (./x runtime).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
DEPTH=${DEPTH:-3}
FROM=${FROM:-1}
CALLS=${CALLS:-500}
# The level runtime (no compiler) for the levels, the full one in target/release.
./x runtime >&2
export MATRYOSHKA_RUNTIME_DIR=$PWD/target/runtimes
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bin=./target/release/matryoshka
for depth in $(seq "$FROM" "$DEPTH"); do
    chain=$(python3 -c "print(','.join(['vm'] * $depth))")
    BENCH_CALLS=$CALLS $bin test target/wasm-suites/components/relay/relay.wasm \
        --grant nest --env MATRYOSHKA_CHAIN="$chain" --env BENCH_CALLS="$CALLS" \
        --run-dir "$work/relay-$depth" --ignored --exact bench_round_trips --nocapture \
        --timeout 900s \
        >"$work/relay-$depth.out" 2>&1 || true
    relay=$(grep -o 'BENCH round-trip.*' "$work/relay-$depth.out" || echo "no result (see below)")
    echo "relay, depth $depth: $relay"
    grep -q 'BENCH round-trip' "$work/relay-$depth.out" || tail -5 "$work/relay-$depth.out"

    # The SSH echo: hold a chain of the same depth and echo through its ssh_config.
    fifo=$work/hold-$depth.in
    mkfifo "$fifo"
    $bin test target/wasm-suites/components/ci/ci.wasm --levels "$depth" \
        --keep-failed-for 600s --run-dir "$work/ssh-$depth" --exact fails_on_purpose \
        <"$fifo" >"$work/ssh-$depth.out" 2>&1 &
    held=$!
    exec 9>"$fifo"
    for _ in $(seq 600); do
        grep -q 'going on in' "$work/ssh-$depth.out" 2>/dev/null && break
        kill -0 "$held" 2>/dev/null || break
        sleep 1
    done
    python3 - "$work/ssh-$depth/ssh_config" "L$depth" "$CALLS" <<'PY' || true
import os, statistics, subprocess, sys, time
config, host, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
if not os.path.exists(config):
    print(f"ssh echo, depth {host[1:]}: no chain held")
    sys.exit(0)
# sshd starts niced beside the runtime: give the bottom level a moment.
for _ in range(60):
    if subprocess.run(["ssh", "-F", config, host, "true"], capture_output=True).returncode == 0:
        break
    time.sleep(1)
p = subprocess.Popen(["ssh", "-F", config, host, "cat"], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, bufsize=0)
msg = b"x" * 31 + b"\n"
def trip():
    p.stdin.write(msg)
    got = b""
    while not got.endswith(b"\n"):
        got += os.read(p.stdout.fileno(), 64)
samples = []
for i in range(50 + calls):
    t = time.perf_counter()
    trip()
    if i >= 50:
        samples.append((time.perf_counter() - t) * 1e6)
p.stdin.close()
p.wait()
samples.sort()
print(f"ssh echo, depth {host[1:]}: calls={calls} median_us={samples[len(samples) // 2]:.1f} "
      f"mean_us={statistics.mean(samples):.1f} p90_us={samples[len(samples) * 9 // 10]:.1f}")
PY
    echo >&9
    exec 9>&-
    wait "$held" || true
done
