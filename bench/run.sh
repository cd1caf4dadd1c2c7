#!/usr/bin/env bash
# The benchmark in one command: install what it needs, then run it.
#
#   bash bench/run.sh            # the full run (about 10 minutes on 2 cores)
#   bash bench/run.sh --quick    # one round, fewer messages (about a minute)
#
# Installs, when missing: Debian's postfix (smtp-source, smtp-sink; with "No
# configuration", so no system Postfix is set up or started) and
# dovecot-lmtpd (Dovecot's LMTP server; the benchmark runs its own private
# instance, the system one is not configured or used), then the package
# itself (pip install -e .) and py-spy for --profile. Arguments go to
# bench/run.py (see python3 bench/run.py --help).
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
if ! python3 -m pip --version >/dev/null 2>&1; then
    packages+=(python3-pip)
fi
if [ "${#packages[@]}" -gt 0 ]; then
    echo "postfix postfix/main_mailer_type select No configuration" \
        | "${SUDO[@]}" debconf-set-selections
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${packages[@]}"
    # Debian starts the system Dovecot on install; the benchmark does not need it.
    if [[ " ${packages[*]} " == *" dovecot-lmtpd "* ]] && command -v systemctl >/dev/null 2>&1; then
        "${SUDO[@]}" systemctl stop dovecot >/dev/null 2>&1 || true
    fi
fi

python3 -m pip install -q -e .
python3 -m pip install -q py-spy || echo "bench: py-spy not installed; --profile will be skipped" >&2

exec python3 bench/run.py "$@"
