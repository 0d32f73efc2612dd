#!/usr/bin/env bash
# Regenerates the C bindings of the `suite` world from guest-sdk/wit with
# `wit-bindgen c` at the pinned version (installed with cargo into the tools folder
# the first time: a few minutes), and records the hash of the WIT files they came
# from in wit.sha256, which check.sh compares before every C build.
set -euo pipefail
here=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
root=$(cd "$here/../../.." && pwd)
WIT_BINDGEN=0.63.0
tools=${MATRYOSHKA_GUEST_TOOLS:-$root/target/guest-tools}
if ! "$tools/bin/wit-bindgen" --version 2>/dev/null | grep -q " $WIT_BINDGEN"; then
    echo "==> installing wit-bindgen-cli $WIT_BINDGEN (cargo) into $tools" >&2
    cargo install --locked --root "$tools" "wit-bindgen-cli@$WIT_BINDGEN"
fi
rm -f "$here"/suite.c "$here"/suite.h "$here"/suite_component_type.o
"$tools/bin/wit-bindgen" c "$root/guest-sdk/wit" --world suite --out-dir "$here"
"$here/check.sh" --print >"$here/wit.sha256"
echo "==> regenerated $here from guest-sdk/wit" >&2
