#!/usr/bin/env bash
# Installs the system packages Parley's integration tests need:
#   - postfix: a real MTA that test/support/postfix.ts starts as private,
#     foreground instances (never the system-wide service);
#   - swaks:   the "Swiss Army Knife for SMTP", handy for poking at a server by hand.
#
# Idempotent: when everything is already installed it prints so and exits 0 without
# touching apt (no `apt-get update`). Works as root; as another user it uses sudo
# when available. Never leaves the system-wide postfix running.
set -euo pipefail

log() { printf '[install-system-deps] %s\n' "$*"; }

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
  else
    log "not root and no sudo: cannot install system packages" >&2
    exit 1
  fi
fi

# Package name -> a file it provides, to tell whether it is installed.
declare -A PROBE=(
  [postfix]=/usr/sbin/postfix
  [swaks]=/usr/bin/swaks
)

missing=()
for pkg in postfix swaks; do
  if [ -x "${PROBE[$pkg]}" ]; then
    log "$pkg: already installed (${PROBE[$pkg]})"
  else
    missing+=("$pkg")
  fi
done

stop_system_postfix() {
  # The Debian package may start the default instance (/etc/postfix) when an init
  # system lets it. Tests run their own instances, so make sure it is not running.
  if [ -x /usr/sbin/postfix ] && [ -f /etc/postfix/main.cf ] \
    && "${SUDO[@]}" /usr/sbin/postfix status >/dev/null 2>&1; then
    log "stopping the system-wide postfix instance (tests start their own)"
    "${SUDO[@]}" /usr/sbin/postfix stop >/dev/null 2>&1 || true
  fi
}

if [ "${#missing[@]}" -eq 0 ]; then
  stop_system_postfix
  log "nothing to install"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

# Don't let package scripts start services (there is no systemd here anyway): add a
# policy-rc.d that denies starts for the duration of the install, unless one exists.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
cleanup() {
  if [ "$created_policy" -eq 1 ]; then
    "${SUDO[@]}" rm -f "$POLICY"
  fi
}
trap cleanup EXIT
if [ ! -e "$POLICY" ]; then
  log "adding a temporary $POLICY so the package does not start services"
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod 755 "$POLICY"
  created_policy=1
fi

if [[ " ${missing[*]} " == *" postfix "* ]]; then
  log "preseeding debconf: postfix/main_mailer_type = No configuration"
  printf '%s\n' \
    'postfix postfix/main_mailer_type select No configuration' \
    'postfix postfix/mailname string localhost' \
    | "${SUDO[@]}" debconf-set-selections
fi

log "apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" update -q

log "apt-get install -y --no-install-recommends ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get "${APT_OPTS[@]}" install -y -q --no-install-recommends "${missing[@]}" </dev/null

for pkg in "${missing[@]}"; do
  if [ ! -x "${PROBE[$pkg]}" ]; then
    log "$pkg: install finished but ${PROBE[$pkg]} is missing" >&2
    exit 1
  fi
  log "$pkg: installed (${PROBE[$pkg]})"
done

stop_system_postfix
if [ -x /usr/sbin/postconf ]; then
  log "postfix version: $(/usr/sbin/postconf -d -h mail_version 2>/dev/null || echo unknown)"
fi
log "done"
