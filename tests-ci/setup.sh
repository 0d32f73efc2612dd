#!/usr/bin/env bash
# Installs the CI tools that runtime/tests/test_ci_tools/ runs on matryoshka's
# reports, each at a pinned version, into $MATRYOSHKA_CI_TOOLS (default
# target/ci-tools, relative to the repository's root):
#
#   Debian:  meson (Debian 12's 1.0.1) with ninja-build, libxml2-utils (xmllint),
#            perl (prove), rsync (tmt's local provisioning copies with it)
#   PyPI:    avocado-103/  avocado-framework 103.0, the LTS
#            avocado/      avocado-framework, the newest that installs on Python 3.11
#            tmt/          tmt with the dependencies pinned in tmt-constraints.txt
#            meson/        meson, the newest, beside Debian's
#            junit-10.xsd  the Jenkins xunit plugin's JUnit schema (MIT), taken from
#                          pytest's sdist (testing/example_scripts/junit-10.xsd)
#
# Idempotent: each part is skipped when its stamp matches the pinned versions, so a
# second run only checks. Debian packages are installed as root (sudo otherwise).
# MATRYOSHKA_CI_PYTHON picks the Python the virtual environments use (default python3).
set -euo pipefail
root=$(cd "$(dirname "$(readlink -f "$0")")/.." && pwd)
here=$root/tests-ci

AVOCADO_LTS=103.0
AVOCADO=113.0
TMT=1.78.0
MESON=1.12.1
PYTEST=9.2.0 # only its sdist, for the schema
XSD_SHA256=a1a816f58d1bf95ebabf371994df0b9246dee66ea9572fbec4f9296f1b2c0ff6
DEBIAN_PACKAGES=(meson ninja-build libxml2-utils perl rsync python3-venv)

tools=${MATRYOSHKA_CI_TOOLS:-target/ci-tools}
case $tools in
    /*) ;;
    *) tools=$root/$tools ;;
esac
# Its physical path: each venv's scripts keep the path they were installed at (in
# their #! lines, hence in the stamps), and target/ may be a symlink into a cache
# shared by clones at other paths.
mkdir -p "$tools"
tools=$(cd "$tools" && pwd -P)
python=${MATRYOSHKA_CI_PYTHON:-python3}
start=$SECONDS
changed=0 # set when something was installed: versions.txt is written again

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

debian_packages() {
    local missing=() p
    for p in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if [ ${#missing[@]} -eq 0 ]; then
        say "Debian packages present: ${DEBIAN_PACKAGES[*]}"
        return
    fi
    say "installing Debian packages: ${missing[*]}"
    changed=1
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# venv NAME STAMP PIP-ARGS...: a virtual environment under $tools/NAME holding what
# `pip install PIP-ARGS` installs, made again when its stamp differs.
venv() {
    local name=$1 stamp="$2 in $tools/$1" dir=$tools/$1
    shift 2
    if [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$stamp" ] &&
        "$dir/bin/python" -c '' 2>/dev/null; then
        say "$name: up to date ($stamp)"
        return
    fi
    say "$name: installing $stamp"
    changed=1
    local t0=$SECONDS
    rm -rf "$dir"
    "$python" -m venv "$dir"
    "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
    printf '%s\n' "$stamp" >"$dir/.stamp"
    say "$name: installed in $((SECONDS - t0)) s ($(du -sh "$dir" | cut -f1))"
}

schema() {
    local xsd=$tools/junit-10.xsd
    if [ -f "$xsd" ] && echo "$XSD_SHA256  $xsd" | sha256sum -c --status; then
        say "junit-10.xsd: up to date"
        return
    fi
    say "junit-10.xsd: from pytest $PYTEST's sdist"
    changed=1
    local tmp
    tmp=$(mktemp -d)
    # pip from one of the environments above: Debian's python3 comes without it.
    "$tools/meson/bin/python" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
        "pytest==$PYTEST" -d "$tmp"
    tar -xzf "$tmp/pytest-$PYTEST.tar.gz" -O "pytest-$PYTEST/testing/example_scripts/junit-10.xsd" \
        >"$tmp/junit-10.xsd"
    if ! echo "$XSD_SHA256  $tmp/junit-10.xsd" | sha256sum -c --status; then
        echo "error: junit-10.xsd from pytest $PYTEST does not have the pinned sha256" >&2
        exit 1
    fi
    mv "$tmp/junit-10.xsd" "$xsd"
    rm -rf "$tmp"
}

debian_packages
mkdir -p "$tools"
py_version=$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
tmt_constraints=$(sha256sum "$here/tmt-constraints.txt" | cut -c1-16)
venv avocado-103 "avocado-framework==$AVOCADO_LTS python$py_version" "avocado-framework==$AVOCADO_LTS"
venv avocado "avocado-framework==$AVOCADO python$py_version" "avocado-framework==$AVOCADO"
venv tmt "tmt==$TMT constraints:$tmt_constraints python$py_version" \
    -c "$here/tmt-constraints.txt" "tmt==$TMT"
venv meson "meson==$MESON python$py_version" "meson==$MESON"
schema

if [ "$changed" = 1 ] || [ ! -f "$tools/versions.txt" ]; then
    {
        echo "meson (Debian) $(meson --version)"
        echo "meson (PyPI) $("$tools/meson/bin/meson" --version)"
        echo "ninja $(ninja --version)"
        echo "$(xmllint --version 2>&1 | head -n1)"
        echo "$(prove --version)"
        echo "avocado (LTS) $("$tools/avocado-103/bin/avocado" --version)"
        echo "avocado $("$tools/avocado/bin/avocado" --version)"
        echo "$("$tools/tmt/bin/tmt" --version)"
        echo "junit-10.xsd from pytest $PYTEST, sha256 $XSD_SHA256"
    } >"$tools/versions.txt"
fi
sed 's/^/    /' "$tools/versions.txt" >&2
say "CI tools ready in $tools ($(du -sh "$tools" | cut -f1)) after $((SECONDS - start)) s"
