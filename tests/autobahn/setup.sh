#!/usr/bin/env bash
# Creates the Python 2.7 virtualenv that runs the Autobahn|Testsuite (`wstest`), or reuses it.
#
#   tests/autobahn/setup.sh            # venv at target/autobahn-venv
#   AUTOBAHN_VENV=/some/dir tests/autobahn/setup.sh
#
# wstest (autobahntestsuite 0.8.2) runs only on Python 2.7. The interpreter is pyenv's 2.7.18
# ($(pyenv root)/versions/2.7.18/bin/python), or AUTOBAHN_PYTHON27 when set. virtualenv 20.15.1
# (the last line that creates Python 2 environments) is installed into a throw-away directory
# with the 2.7 interpreter's own pip, so neither interpreter's site-packages is changed. The
# packages come from requirements.txt beside this script, every one pinned.
#
# Idempotent: a venv whose stamp matches requirements.txt and whose wstest imports is reused.
# Anything that goes wrong exits non-zero with the reason on standard error: the Rust test that
# calls this script (tests/autobahn.rs) then fails; it never skips.
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
find_python27() {
    if [[ -n ${AUTOBAHN_PYTHON27:-} ]]; then
        echo "$AUTOBAHN_PYTHON27"
        return
    fi
    local pyenv_root=""
    if command -v pyenv >/dev/null 2>&1; then
        pyenv_root=$(pyenv root 2>/dev/null || true)
    fi
    local candidate
    for candidate in \
        "${pyenv_root:+$pyenv_root/versions/2.7.18/bin/python}" \
        "${PYENV_ROOT:+$PYENV_ROOT/versions/2.7.18/bin/python}" \
        "$HOME/.pyenv/versions/2.7.18/bin/python" \
        /root/.pyenv/versions/2.7.18/bin/python; do
        if [[ -n $candidate && -x $candidate ]]; then
            echo "$candidate"
            return
        fi
    done
    command -v python2.7 || true
}

python27=$(find_python27)
[[ -n $python27 && -x $python27 ]] ||
    die "no Python 2.7 interpreter: expected \$(pyenv root)/versions/2.7.18/bin/python (or set AUTOBAHN_PYTHON27)"
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
    die "installing virtualenv 20.15.1 with $python27 -m pip failed"
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
