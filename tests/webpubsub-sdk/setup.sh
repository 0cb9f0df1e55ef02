#!/usr/bin/env bash
# Installs the pinned Azure Web PubSub client SDK (package-lock.json) into
# tests/webpubsub-sdk/node_modules for tests/webpubsub.rs. Idempotent and safe to run from several
# tests at once (a lock); fails loudly with one line naming what is missing.
# Needs, and does not install: Node.js 20 with npm.
set -euo pipefail
cd "$(dirname "$0")"

die() {
  echo "webpubsub-sdk setup: $*" >&2
  exit 1
}

command -v node >/dev/null 2>&1 || die "node not found: install Node.js 20 with npm"
command -v npm >/dev/null 2>&1 || die "npm not found: install Node.js 20 with npm"
exec 9>.setup.lock
flock 9
if [ -f node_modules/@azure/web-pubsub-client/package.json ] && cmp -s package-lock.json node_modules/.package-lock.stamp 2>/dev/null; then
  exit 0
fi
npm ci --no-audit --no-fund >&2 || die "npm ci could not install @azure/web-pubsub-client from the npm registry (see above)"
cp package-lock.json node_modules/.package-lock.stamp
