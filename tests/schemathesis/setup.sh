#!/usr/bin/env bash
# Creates (or reuses) a Python virtual environment with a pinned schemathesis, for
# tests/schemathesis.rs. Idempotent: a venv that already has the pinned version is left alone.
# Fails loudly (non-zero exit, message on stderr) when anything is missing.
#
#   bash tests/schemathesis/setup.sh          # → target/schemathesis-venv/bin/schemathesis
#
# Needs python3 (>= 3.9) with the venv module and access to PyPI.
set -euo pipefail

SCHEMATHESIS_VERSION="4.32.5"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${SCHEMATHESIS_VENV:-$repo_root/target/schemathesis-venv}"
python="${PYTHON:-python3}"

die() {
    echo "schemathesis setup: $*" >&2
    exit 1
}

command -v "$python" >/dev/null 2>&1 || die "$python not found"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "$python is older than 3.9 ($("$python" --version 2>&1))"

if [ -x "$venv/bin/schemathesis" ] \
    && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$SCHEMATHESIS_VERSION" ]; then
    echo "schemathesis $SCHEMATHESIS_VERSION already in $venv"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "could not create the venv $venv (is python3-venv installed?)"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    "schemathesis==$SCHEMATHESIS_VERSION" \
    || die "pip could not install schemathesis==$SCHEMATHESIS_VERSION into $venv"

installed="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))')" \
    || die "schemathesis is not importable in $venv"
[ "$installed" = "$SCHEMATHESIS_VERSION" ] \
    || die "expected schemathesis $SCHEMATHESIS_VERSION in $venv, found $installed"
"$venv/bin/schemathesis" --version >/dev/null || die "$venv/bin/schemathesis does not run"
echo "schemathesis $installed installed in $venv"
