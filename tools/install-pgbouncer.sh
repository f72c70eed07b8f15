#!/usr/bin/env bash
# Installs Debian's pgbouncer (1.18 on bookworm) for the PgBouncer tests when it is missing.
# The tests start their own PgBouncer on a free port, so the packaged service must not be left
# running or enabled on port 6432. Idempotent; run as root. Prints the version.
set -euo pipefail

bin=/usr/sbin/pgbouncer

if [ ! -x "$bin" ]; then
  export DEBIAN_FRONTEND=noninteractive
  # A policy-rc.d that exits 101 keeps the postinst from starting the service.
  own_policy=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
  fi
  trap 'if [ -n "$own_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi' EXIT
  if ! apt-cache policy pgbouncer 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq
  fi
  log=$(mktemp)
  apt-get install -y -qq --no-install-recommends pgbouncer >"$log" 2>&1 || { cat "$log"; exit 1; }
  rm -f "$log"
fi

# Whatever happened before (an older install, a start without policy-rc.d): stop and disable it.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now pgbouncer.service >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/pgbouncer ]; then
  /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
  update-rc.d pgbouncer disable >/dev/null 2>&1 || true
fi
for pidfile in /run/postgresql/pgbouncer.pid /run/pgbouncer/pgbouncer.pid; do
  if [ -s "$pidfile" ] && grep -qs pgbouncer "/proc/$(cat "$pidfile")/comm"; then
    kill "$(cat "$pidfile")" || true
  fi
done

"$bin" --version | head -n 1
