#!/usr/bin/env bash
# Creates (or reuses) a Python virtual environment with a pinned schemathesis, for
# tests/schemathesis.rs. Idempotent: a venv that already has the pinned version is left alone.
# Fails loudly when anything is missing: non-zero exit, one line on stderr naming the missing
# piece and the command that gets it.
#
#   bash tests/schemathesis/setup.sh          # → target/schemathesis-venv/bin/schemathesis
#
# Needs python3 (>= 3.9) with the venv module (Debian: apt-get install python3 python3-venv) and
# access to PyPI; installs nothing outside the venv.
set -euo pipefail

SCHEMATHESIS_VERSION="4.32.5"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${SCHEMATHESIS_VENV:-$repo_root/target/schemathesis-venv}"
python="${PYTHON:-python3}"

die() {
    echo "schemathesis setup: $*" >&2
    exit 1
}

command -v "$python" >/dev/null 2>&1 \
    || die "$python not found: install Python 3.9 or newer (Debian: apt-get install python3 python3-venv), or set PYTHON"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "$python is older than 3.9 ($("$python" --version 2>&1)): install a newer Python 3 (Debian: apt-get install python3), or set PYTHON"
# Debian's python3 has venv but not ensurepip until python3-venv is installed, and `-m venv`
# then fails with a long message; say it first, in one line.
"$python" -c 'import venv, ensurepip' >/dev/null 2>&1 \
    || die "$python cannot create virtualenvs (no venv/ensurepip module): apt-get install python3-venv"

# Two runs at once (two cargo test processes) would build the same venv: one builds, one waits.
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9

if [ -x "$venv/bin/schemathesis" ] \
    && [ "$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null)" = "$SCHEMATHESIS_VERSION" ]; then
    echo "schemathesis $SCHEMATHESIS_VERSION already in $venv"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" || die "could not create the venv $venv (see above)"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet \
    "schemathesis==$SCHEMATHESIS_VERSION" \
    || die "pip could not install schemathesis==$SCHEMATHESIS_VERSION from PyPI into $venv (see above)"

installed="$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))')" \
    || die "schemathesis is not importable in $venv"
[ "$installed" = "$SCHEMATHESIS_VERSION" ] \
    || die "expected schemathesis $SCHEMATHESIS_VERSION in $venv, found $installed"
"$venv/bin/schemathesis" --version >/dev/null || die "$venv/bin/schemathesis does not run"
echo "schemathesis $installed installed in $venv"
