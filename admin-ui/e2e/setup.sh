#!/usr/bin/env bash
# Prepares the browser tests: Debian's Chromium and the pinned npm packages. Idempotent, and
# fails loudly: CI must fail rather than skip the browser tests.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x /usr/bin/chromium ]; then
  echo "setup: installing chromium with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi
/usr/bin/chromium --version >/dev/null 2>&1 || { echo "setup: /usr/bin/chromium does not run" >&2; exit 1; }

command -v node >/dev/null || { echo "setup: node is required for the browser tests" >&2; exit 1; }
command -v npm >/dev/null || { echo "setup: npm is required for the browser tests" >&2; exit 1; }

if [ ! -d node_modules ]; then
  echo "setup: installing the e2e packages with npm ci" >&2
  npm ci --no-audit --no-fund
fi
node -e "import('playwright-core').then(() => import('ws'))"
echo "setup: browser tests ready" >&2
