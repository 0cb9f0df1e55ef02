#!/usr/bin/env bash
# Installs nats-server and mosquitto from Debian's packages for tests/brokers.rs when they are
# missing: the outage tests start private brokers on random ports, kill them and start them
# again. Idempotent, and fails loudly: CI must fail rather than skip the tests.
set -euo pipefail

# One setup at a time: the tests of tests/brokers.rs run in parallel threads.
if command -v flock >/dev/null 2>&1; then
  exec 9>"${TMPDIR:-/tmp}/iotgate-brokers-setup.lock"
  flock 9
fi

missing=()
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v mosquitto_passwd >/dev/null 2>&1 || missing+=(mosquitto)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]} with apt-get" >&2
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
fi
nats-server --version >/dev/null 2>&1 || { echo "setup: nats-server does not run" >&2; exit 1; }
command -v mosquitto >/dev/null 2>&1 || { echo "setup: mosquitto is missing" >&2; exit 1; }
echo "setup: $(nats-server --version), $(mosquitto -h 2>/dev/null | head -1)" >&2

# The machine's own brokers, which most tests use: started (with the commands this machine's
# services are started by) when they are not answering, and a clear failure when that fails.
reachable() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_for() {
  for _ in $(seq 1 50); do reachable "$1" && return 0; sleep 0.1; done
  return 1
}
if ! reachable 4222; then
  echo "setup: NATS is not answering on 127.0.0.1:4222; starting it with JetStream" >&2
  mkdir -p /var/lib/nats-server
  start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
    -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log \
    || true
  wait_for 4222 || { echo "setup: NATS did not start on 127.0.0.1:4222; start it with: nats-server -a 127.0.0.1 -p 4222 -js" >&2; exit 1; }
fi
if ! reachable 1883; then
  echo "setup: Mosquitto is not answering on 127.0.0.1:1883; starting it" >&2
  if [ -f /etc/mosquitto/mosquitto.conf ]; then
    mosquitto -d -c /etc/mosquitto/mosquitto.conf || true
  else
    mosquitto -d -p 1883 || true
  fi
  wait_for 1883 || { echo "setup: Mosquitto did not start on 127.0.0.1:1883; start it with: mosquitto -d -c /etc/mosquitto/mosquitto.conf" >&2; exit 1; }
fi
