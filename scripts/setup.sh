#!/usr/bin/env bash
# The one set-up command.
#
#   scripts/setup.sh          install litefed with every runtime extra:  pip install -e '.[all]'
#   scripts/setup.sh --dev    also the Mosquitto broker (for the tests) and the dev tools: '.[dev]'
#
# Uses ${PYTHON:-python3}. Idempotent: re-running it only re-checks what is installed.
set -euo pipefail

usage() { echo "usage: scripts/setup.sh [--dev]" >&2; }

DEV=0
for arg in "$@"; do
    case "$arg" in
        --dev) DEV=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "setup: unknown argument: $arg" >&2; usage; exit 2 ;;
    esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
say() { echo "setup: $*"; }

# --- (a) Mosquitto broker (tests only) --------------------------------------------------------
install_mosquitto() {
    if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
        say "mosquitto: present"
        return 0
    fi
    local manual="install it by hand (Debian/Ubuntu: apt-get install mosquitto; macOS: brew install mosquitto);"
    manual="$manual until then the tests fall back to the embedded amqtt broker"
    if ! command -v apt-get >/dev/null 2>&1; then
        say "mosquitto: not found and there is no apt-get; $manual"
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            say "mosquitto: not found, and installing needs root (no sudo); $manual"
            return 0
        fi
    fi
    say "mosquitto: installing with apt-get"
    if $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mosquitto \
            </dev/null >/dev/null; then
        say "mosquitto: installed"
    else
        say "mosquitto: apt-get failed; $manual"
    fi
}

if [ "$DEV" -eq 1 ]; then
    install_mosquitto
fi

# --- (b) Python package --------------------------------------------------------------------------
if [ "$DEV" -eq 1 ]; then EXTRA=dev; else EXTRA=all; fi

if ! command -v "$PY" >/dev/null 2>&1; then
    say "python: '$PY' not found; install Python >= 3.10 or set PYTHON=/path/to/python"
    exit 1
fi

say "python: $PY -m pip install -e '.[$EXTRA]'"
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[$EXTRA]" </dev/null
say "done"
