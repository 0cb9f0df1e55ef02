#!/usr/bin/env bash
# Installs Node-RED 4.1.15 (package-lock.json) into tests/node-red/node_modules for
# tests/websocket_client.rs. Idempotent, and fails loudly with one line naming what is missing.
# Needs, and does not install: Node.js 18.5 or newer with npm.
set -euo pipefail
cd "$(dirname "$0")"

die() {
  echo "node-red setup: $*" >&2
  exit 1
}

command -v node >/dev/null 2>&1 || die "node not found: install Node.js 20 with npm"
command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js 20 with npm"
node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>18||(a===18&&b>=5)?0:1)' \
  || die "Node.js $(node --version) is older than 18.5, which Node-RED 4 needs"
# Several tests of one binary run this at once: one installs, the others wait and reuse it.
exec 9>.setup.lock
flock 9
if [ -f node_modules/node-red/red.js ] && cmp -s package-lock.json node_modules/.package-lock.stamp 2>/dev/null; then
  exit 0
fi
npm ci --no-audit --no-fund --omit=optional >&2 || die "npm ci could not install Node-RED from the npm registry (see above)"
cp package-lock.json node_modules/.package-lock.stamp
