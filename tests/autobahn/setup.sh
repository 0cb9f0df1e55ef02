#!/usr/bin/env bash
# Creates the Python 2.7 virtualenv that runs the Autobahn|Testsuite (`wstest`), or reuses it.
#
#   tests/autobahn/setup.sh            # venv at target/autobahn-venv
#   AUTOBAHN_VENV=/some/dir tests/autobahn/setup.sh
#
# wstest (autobahntestsuite 0.8.2) runs only on Python 2.7. The interpreter is AUTOBAHN_PYTHON27
# when set, else pyenv's 2.7.18 ($(pyenv root)/versions/2.7.18/bin/python), else python2.7 on the
# PATH. When none is there but pyenv is, this script runs `pyenv install 2.7.18` (it downloads the
# source from python.org and compiles it: 138 s measured on 2 busy cores, and it needs Python's build
# dependencies). Without pyenv it fails with one line saying how to get it.
#
# virtualenv 20.15.1 (the last line that creates Python 2 environments) is installed into a
# throw-away directory with the 2.7 interpreter's own pip, so neither interpreter's site-packages
# is changed. The packages come from requirements.txt beside this script, every one pinned.
#
# Idempotent: a venv whose stamp matches requirements.txt and whose wstest imports is reused.
# Anything that goes wrong exits non-zero with one line on standard error naming what is missing
# and how to get it: the Rust test that calls this script (tests/autobahn.rs) then fails; it
# never skips.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${AUTOBAHN_VENV:-$root/target/autobahn-venv}
requirements=$here/requirements.txt

die() {
    echo "autobahn setup: $*" >&2
    exit 1
}

# One setup at a time (two tests of one binary may call this at once).
mkdir -p "$(dirname "$venv")"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
fi

# --- the Python 2.7 interpreter -----------------------------------------------------------
# pyenv itself, also when the shell that started the tests never ran `pyenv init` (CI). A pyenv
# found in its own root directory (not on the PATH) gets PYENV_ROOT set to that directory, so it
# installs where it looks.
find_pyenv() {
    if command -v pyenv >/dev/null 2>&1; then
        command -v pyenv
        return
    fi
    if [[ -n ${PYENV_ROOT:-} && -x $PYENV_ROOT/bin/pyenv ]]; then
        echo "$PYENV_ROOT/bin/pyenv"
        return
    fi
    local root
    for root in "$HOME/.pyenv" /root/.pyenv; do
        if [[ -x $root/bin/pyenv ]]; then
            echo "$root/bin/pyenv"
            return
        fi
    done
}

find_python27() {
    if [[ -n ${AUTOBAHN_PYTHON27:-} ]]; then
        echo "$AUTOBAHN_PYTHON27"
        return
    fi
    local pyenv_root=""
    if [[ -n $pyenv ]]; then
        pyenv_root=$("$pyenv" root 2>/dev/null || true)
    fi
    local candidate
    for candidate in \
        "${pyenv_root:+$pyenv_root/versions/2.7.18/bin/python}" \
        "${PYENV_ROOT:+$PYENV_ROOT/versions/2.7.18/bin/python}" \
        "$HOME/.pyenv/versions/2.7.18/bin/python"; do
        if [[ -n $candidate && -x $candidate ]]; then
            echo "$candidate"
            return
        fi
    done
    # pyenv's shim answers `command -v python2.7` even when 2.7 is not installed: ask it to run.
    if command -v python2.7 >/dev/null 2>&1 && python2.7 -c '' >/dev/null 2>&1; then
        command -v python2.7
    fi
}

pyenv=$(find_pyenv)
if [[ -n $pyenv && -z ${PYENV_ROOT:-} && $pyenv == */.pyenv/bin/pyenv ]]; then
    export PYENV_ROOT=${pyenv%/bin/pyenv}
fi
python27=$(find_python27)
if [[ -z $python27 && -n $pyenv ]]; then
    echo "autobahn setup: no Python 2.7; running $pyenv install 2.7.18 (downloads 17.5 MB from python.org and compiles: 138 s measured on 2 busy cores)" >&2
    started=$SECONDS
    "$pyenv" install --skip-existing 2.7.18 >&2 ||
        die "\`pyenv install 2.7.18\` failed (see above): it needs Python's build dependencies (https://github.com/pyenv/pyenv/wiki#suggested-build-environment) and python.org; or set AUTOBAHN_PYTHON27 to a Python 2.7 interpreter"
    echo "autobahn setup: pyenv installed Python 2.7.18 in $((SECONDS - started)) s" >&2
    python27=$(find_python27)
fi
[[ -n $python27 && -x $python27 ]] ||
    die "no Python 2.7 interpreter and no pyenv: install pyenv (https://github.com/pyenv/pyenv#installation), then run \`pyenv install 2.7.18\` (or set AUTOBAHN_PYTHON27 to a Python 2.7 interpreter)"
py_version=$("$python27" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>&1) ||
    die "$python27 does not run: $py_version"
[[ $py_version == 2.7.* ]] || die "$python27 is Python $py_version, wstest needs 2.7"

stamp_value="python=$python27 requirements=$(sha256sum "$requirements" | cut -d' ' -f1)"
stamp=$venv/.iotgate-autobahn-stamp

# --- reuse ----------------------------------------------------------------------------------
if [[ -f $stamp && $(cat "$stamp") == "$stamp_value" && -x $venv/bin/wstest ]] &&
    "$venv/bin/python" -c 'import autobahntestsuite, autobahn, wsaccel, twisted' >/dev/null 2>&1; then
    echo "autobahn setup: reusing $venv"
    exit 0
fi

# --- create -----------------------------------------------------------------------------------
echo "autobahn setup: creating $venv with $python27 (Python $py_version)"
rm -rf "$venv"
bootstrap=$(mktemp -d "$venv.bootstrap.XXXXXX")
trap 'rm -rf "$bootstrap"' EXIT

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONWARNINGS=ignore
"$python27" -m pip install --quiet --target "$bootstrap" virtualenv==20.15.1 ||
    die "$python27 -m pip could not install virtualenv 20.15.1 from PyPI (see above); a Python 2.7 without pip or ssl needs rebuilding: pyenv uninstall -f 2.7.18 && pyenv install 2.7.18"
PYTHONPATH=$bootstrap VIRTUALENV_OVERRIDE_APP_DATA=$bootstrap/app-data \
    "$python27" -m virtualenv --no-download --no-periodic-update "$venv" ||
    die "virtualenv could not create $venv"
"$venv/bin/python" -m pip install --progress-bar off -r "$requirements" ||
    die "pip install -r $requirements failed (see above)"
"$venv/bin/python" -c 'import autobahntestsuite, autobahn, wsaccel, twisted' ||
    die "the venv was created but autobahntestsuite does not import"
versions=$("$venv/bin/wstest" --autobahnversion 2>&1) || die "wstest does not run: $versions"
echo "$versions"
echo "$stamp_value" >"$stamp"
echo "autobahn setup: ready ($venv)"
