#!/usr/bin/env bash
# Checks that the committed C bindings were generated from the WIT files as they are
# now (their hash is in wit.sha256); `--print` prints the hash instead.
set -euo pipefail
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
root=$(cd "$here/../../.." && pwd)
hash=$(cd "$root/guest-sdk/wit" && sha256sum ./*.wit | sha256sum | cut -d' ' -f1)
if [ "${1:-}" = --print ]; then
    echo "$hash"
    exit 0
fi
if [ "$hash" != "$(cat "$here/wit.sha256" 2>/dev/null)" ]; then
    echo "error: guest-sdk/c/bindings were generated from other WIT files than guest-sdk/wit's;" \
        "run guest-sdk/c/bindings/generate.sh and commit what it writes" >&2
    exit 1
fi
