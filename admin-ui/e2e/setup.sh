#!/usr/bin/env bash
# Prepares the browser tests: Debian's Chromium and the pinned npm packages. Idempotent, and
# fails loudly: CI must fail rather than skip the browser tests. Each failure is one line naming
# what is missing and the command that gets it.
#
# Installs, when missing: Chromium, system-wide with apt-get (about 414 MB; as root, or through
# sudo), and the npm packages of package-lock.json into admin-ui/e2e/node_modules/.
# Needs, and does not install: Node.js 20 or newer with npm.
set -euo pipefail
cd "$(dirname "$0")"

# Several tests of one binary run this at once: one installs, the others wait and reuse it.
exec 9>.setup.lock
flock 9

die() {
  echo "setup: $*" >&2
  exit 1
}

if [ ! -x /usr/bin/chromium ]; then
  command -v apt-get >/dev/null \
    || die "/usr/bin/chromium is missing and there is no apt-get to install it: install Chromium so that /usr/bin/chromium runs"
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    die "/usr/bin/chromium is missing: run as root: apt-get update && apt-get install -y --no-install-recommends chromium"
  fi
  echo "setup: /usr/bin/chromium is missing: installing Debian's chromium system-wide (apt-get update && apt-get install chromium, about 414 MB)" >&2
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium \
    || die "apt-get could not install chromium (see above)"
fi
/usr/bin/chromium --version >/dev/null 2>&1 || die "/usr/bin/chromium does not run: apt-get install --reinstall chromium"

command -v node >/dev/null || die "node is required for the browser tests: install Node.js 20 and npm (https://nodejs.org, or NodeSource's Debian packages)"
command -v npm >/dev/null || die "npm is required for the browser tests: install it with Node.js 20 (https://nodejs.org)"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' \
  || die "Node.js 20 or newer is required, found $(node --version): https://nodejs.org"

if [ ! -d node_modules ]; then
  echo "setup: installing the e2e packages with npm ci" >&2
  npm ci --no-audit --no-fund || die "npm ci could not install the e2e packages from the npm registry (see above)"
fi
node -e "import('playwright-core').then(() => import('ws'))" \
  || die "the e2e packages do not load: rm -rf admin-ui/e2e/node_modules, and the next run reinstalls them"
echo "setup: browser tests ready" >&2
