#!/usr/bin/env bash
# Creates (or reuses) a Python virtual environment with the client libraries in
# requirements.txt (websockets, msgpack), for tests that drive iotgate with real Python clients.
# Idempotent: a venv whose installed set matches the requirements is left alone. Fails loudly
# when anything is missing: non-zero exit, one line on stderr naming the missing piece and the
# command that gets it.
#
#   bash tests/python-clients/setup.sh        # → target/python-clients-venv/bin/python
#
# Needs python3 (>= 3.9) with the venv module (Debian: apt-get install python3 python3-venv) and
# access to PyPI; installs nothing outside the venv.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
venv="${PYTHON_CLIENTS_VENV:-$repo_root/target/python-clients-venv}"
python="${PYTHON:-python3}"
requirements="$here/requirements.txt"

die() {
    echo "python clients setup: $*" >&2
    exit 1
}

command -v "$python" >/dev/null 2>&1 \
    || die "$python not found: install Python 3.9 or newer (Debian: apt-get install python3 python3-venv), or set PYTHON"
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' \
    || die "$python is older than 3.9 ($("$python" --version 2>&1)): install a newer Python 3, or set PYTHON"
"$python" -c 'import venv, ensurepip' >/dev/null 2>&1 \
    || die "$python cannot create virtualenvs (no venv/ensurepip module): apt-get install python3-venv"

# One setup at a time: the tests of one binary run in parallel threads, and a second call that
# saw a half-made venv (python there, pip not yet) failed with "No module named pip".
mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
fi

stamp="$venv/.requirements"
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && cmp -s "$stamp" "$requirements"; then
    echo "python clients already in $venv"
    exit 0
fi
# A venv left without pip (an interrupted earlier setup) is made again from scratch.
if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || die "could not create the venv $venv (see above)"
fi
"$venv/bin/python" -m pip install --disable-pip-version-check --quiet -r "$requirements" \
    || die "pip could not install $requirements from PyPI into $venv (see above)"
"$venv/bin/python" -c 'import websockets, msgpack' \
    || die "websockets or msgpack is not importable in $venv"
cp "$requirements" "$stamp"
echo "python clients installed in $venv"
