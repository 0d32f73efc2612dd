#!/usr/bin/env bash
# Boots the built x86_64 image as L1 (TCG here; `ACCEL=kvm` where KVM works), waits
# for its ready marker, pins the host key it prints on the console, runs a command
# over SSH with a throw-away key, and powers it off. Prints timings.
# A manual check of the image until VM levels are driven by the runtime.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."
IMG=${IMG:-target/images/x86_64}
ACCEL=${ACCEL:-tcg}
PORT=${PORT:-$((40000 + RANDOM % 20000))}
work=$(mktemp -d "${TMPDIR:-/tmp}/image-smoke.XXXXXX")
qemu_pid=
cleanup() { [ -n "$qemu_pid" ] && kill -9 "$qemu_pid" 2>/dev/null; [ -f "$work/console" ] && cp "$work/console" "${CONSOLE_COPY:-/dev/null}"; rm -rf "$work"; }
trap cleanup EXIT
ssh-keygen -q -t ed25519 -N "" -C smoke -f "$work/key"
key=$(base64 -w0 <"$work/key.pub")
start=$(date +%s.%N)
qemu-system-x86_64 -nodefaults -no-user-config -display none -machine q35 -accel "$ACCEL" \
    -cpu max -smp 2 -m 2048M -kernel "$IMG/kernel" -initrd "$IMG/initrd" \
    -append "console=ttyS0 quiet level=1 matryoshka.key=$key" \
    -drive "file=$IMG/root.img,format=raw,if=none,id=root,readonly=on,cache=none,aio=native" \
    -device virtio-blk-pci,drive=root \
    -netdev "user,id=net0,hostfwd=tcp:127.0.0.1:$PORT-:22" -device virtio-net-pci,netdev=net0 \
    -serial "file:$work/console" &
qemu_pid=$!
for _ in $(seq 600); do
    grep -q MATRYOSHKA-READY "$work/console" 2>/dev/null && break
    kill -0 "$qemu_pid" 2>/dev/null || { echo "QEMU exited"; tail -20 "$work/console"; exit 1; }
    sleep 0.1
done
grep -q MATRYOSHKA-READY "$work/console" || { echo "no ready marker in 60 s"; tail -20 "$work/console"; exit 1; }
ready=$(date +%s.%N)
hostkey=$(sed -n 's/^MATRYOSHKA-HOSTKEY //p' "$work/console" | tr -d '\r')
echo "[127.0.0.1]:$PORT $hostkey" >"$work/known_hosts"
ssh -p "$PORT" -i "$work/key" -o IdentitiesOnly=yes -o BatchMode=yes \
    -o UserKnownHostsFile="$work/known_hosts" -o StrictHostKeyChecking=yes \
    root@127.0.0.1 'uname -rm; hostname; cat /run/matryoshka/level; ls -lL /usr/lib/matryoshka/image; sha256sum /dev/vda | cut -c1-16; free -m'
done_at=$(date +%s.%N)
echo "local root sha256: $(sha256sum "$IMG/root.img" | cut -c1-16)"
grep MATRYOSHKA-READY "$work/console" | tr -d '\r'
python3 -c "import sys; s,r,d=map(float,sys.argv[1:]); print(f'ready marker after {r-s:.1f} s, SSH command done after {d-s:.1f} s')" "$start" "$ready" "$done_at"
