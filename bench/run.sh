#!/usr/bin/env bash
# The benchmark in one command: install what it needs, then run it.
#
#   bash bench/run.sh            # the full run (about 13 minutes on 2 cores)
#   bash bench/run.sh --quick    # one round, fewer messages (about a minute)
#
# Installs, when missing: Debian's postfix (smtp-source, smtp-sink; with "No
# configuration", so no system Postfix is set up or started),
# dovecot-lmtpd (Dovecot's LMTP server; the benchmark runs its own private
# instance, the system one is not configured or used) and postgresql (the
# servers part runs a private cluster; the system one is not used), then
# the package itself with RelStorage, psycopg2 and prometheus_client
# (pip install -e '.[postgresql,metrics]') and py-spy for --profile.
# Arguments go to bench/run.py (see python3 bench/run.py --help).
set -euo pipefail

cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
else
    SUDO=(sudo)
fi

have_tool() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

packages=()
if ! { have_tool smtp-source && have_tool smtp-sink; }; then
    packages+=(postfix)
fi
if [ ! -x /usr/lib/dovecot/lmtp ] || ! have_tool dovecot; then
    packages+=(dovecot-lmtpd)
fi
# The servers part starts a private PostgreSQL server (initdb, pg_ctl);
# Debian keeps those programs in /usr/lib/postgresql/<ver>/bin.
if ! { { command -v initdb && command -v pg_ctl; } >/dev/null 2>&1 \
    || compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null; }; then
    packages+=(postgresql)
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
    packages+=(python3-pip)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    echo "postfix postfix/main_mailer_type select No configuration" \
        | "${SUDO[@]}" debconf-set-selections
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
    # Debian starts the system Dovecot and PostgreSQL on install; the benchmark needs neither.
    if command -v systemctl >/dev/null 2>&1; then
        if [[ " ${packages[*]} " == *" dovecot-lmtpd "* ]]; then
            "${SUDO[@]}" systemctl stop dovecot >/dev/null 2>&1 || true
        fi
        if [[ " ${packages[*]} " == *" postgresql "* ]]; then
            "${SUDO[@]}" systemctl stop postgresql >/dev/null 2>&1 || true
        fi
    fi
fi

python3 -m pip install -q -e '.[postgresql,metrics]'
python3 -m pip install -q py-spy || echo "bench: py-spy not installed; --profile will be skipped" >&2

exec python3 bench/run.py "$@"
