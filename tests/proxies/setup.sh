#!/usr/bin/env bash
# Installs HAProxy from Debian's packages for tests/proxies.rs, when it is missing. Idempotent, and
# fails loudly: without a real load balancer the trusted-proxy tests cannot run, and CI must fail
# rather than skip them.
set -euo pipefail
cd "$(dirname "$0")"
# Several tests of one binary run this at once: one installs, the others wait and reuse it.
exec 9>.setup.lock
flock 9

if ! command -v haproxy >/dev/null 2>&1; then
  echo "setup: installing haproxy with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends haproxy
fi
haproxy -v >/dev/null 2>&1 || { echo "setup: haproxy does not run" >&2; exit 1; }
echo "setup: $(haproxy -v | head -1)" >&2
