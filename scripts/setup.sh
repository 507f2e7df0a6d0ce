#!/usr/bin/env bash
# The one set-up command.
#
#   scripts/setup.sh          install litefed with every runtime extra:  pip install -e '.[all]', and
#                             mosquitto (apt-get), the broker litefed-emulate runs its secured fleet on
#   scripts/setup.sh --dev    also what the tests need: openssl and qemu-user-static (apt-get),
#                             '.[dev]', and the cached arm64 userland of tests/arm64 (scripts/arm64_userland.sh)
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

# --- (a) System tools the tests need: the Mosquitto broker, openssl (TLS test certificates) and
#         qemu-user-static (tests/arm64 runs the edge client on aarch64 under qemu-aarch64-static) ---------
have() {
    case "$1" in
        mosquitto) command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] ;;
        qemu-user-static) command -v qemu-aarch64-static >/dev/null 2>&1 ;;
        *) command -v "$1" >/dev/null 2>&1 ;;
    esac
}

install_tools() {
    local missing=()
    for tool in "$@"; do
        if have "$tool"; then say "$tool: present"; else missing+=("$tool"); fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    local manual="install ${missing[*]} by hand (Debian/Ubuntu: apt-get install ${missing[*]}; macOS: brew install ${missing[*]});"
    manual="$manual without mosquitto litefed-emulate runs insecure on amqtt, and the integration tests fail"
    if ! command -v apt-get >/dev/null 2>&1; then
        say "no apt-get; $manual"
        return 0
    fi
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            say "installing ${missing[*]} needs root (no sudo); $manual"
            return 0
        fi
    fi
    say "installing ${missing[*]} with apt-get"
    if $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            </dev/null >/dev/null; then
        say "installed ${missing[*]}"
    else
        say "apt-get failed; $manual"
    fi
}

if [ "$DEV" -eq 1 ]; then
    install_tools mosquitto openssl qemu-user-static
else
    install_tools mosquitto
fi

# --- (b) Python package --------------------------------------------------------------------------
if [ "$DEV" -eq 1 ]; then EXTRA=dev; else EXTRA=all; fi

if ! command -v "$PY" >/dev/null 2>&1; then
    say "python: '$PY' not found; install Python >= 3.10 or set PYTHON=/path/to/python"
    exit 1
fi

say "python: $PY -m pip install -e '.[$EXTRA]'"
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[$EXTRA]" </dev/null

# --- (c) The arm64 userland of tests/arm64 (Debian's arm64 python3.11 + aarch64 wheels, cached) -------
# Built once (~1-2 min), then only re-checked. Not fatal here: tests/arm64 fails and says what is missing.
if [ "$DEV" -eq 1 ]; then
    if userland="$(PYTHON="$PY" bash scripts/arm64_userland.sh </dev/null)"; then
        say "arm64 userland: $userland"
    else
        say "arm64 userland not built (see above); tests/arm64 will fail until scripts/arm64_userland.sh succeeds"
    fi
fi
say "done"
