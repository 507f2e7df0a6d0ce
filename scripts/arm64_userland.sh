#!/usr/bin/env bash
# Build (or re-check) the cached aarch64 userland that tests/arm64 runs the edge client in, under qemu-user.
#
#   scripts/arm64_userland.sh          build it if missing or stale; print its path on the last line
#   scripts/arm64_userland.sh --check  only say whether it is ready (exit 1 if not)
#
# It is not a full Debian system (a debootstrap under emulation takes ~15 minutes): Debian bookworm's arm64
# python3.11 and the libraries it and the wheels link against, unpacked with `dpkg -x`, plus the aarch64
# wheels of numpy, ai-edge-litert, paho-mqtt and cryptography in /opt/litefed/site, an ARM (Cortex-A72, Raspberry Pi 4)
# /proc/cpuinfo for scripts/arm64_run.sh to mount, and a copy of qemu-aarch64-static to chroot into.
#
# Lives in ${LITEFED_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/litefed/arm64-bookworm}, outside the repo.
# Needs root (dpkg --add-architecture arm64, apt-get update), apt-get, pip and qemu-user-static.
# Idempotent: when the stamp matches, it returns at once without touching the network.
set -euo pipefail

SCRIPTS="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="${LITEFED_ARM64_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/litefed/arm64-bookworm}"
PY="${PYTHON:-python3}"
say() { echo "arm64-userland: $*" >&2; }
die() { say "$*"; exit 1; }

# What python3.11 (with ssl, ctypes, sqlite...) and the manylinux wheels need at run time; the
# closure of `apt-cache depends --recurse python3.11:arm64 libstdc++6:arm64` without dpkg, tar and perl.
DEBS=(
    libc6 libgcc-s1 gcc-12-base libstdc++6 zlib1g libexpat1 libssl3 libffi8 libbz2-1.0 liblzma5 libzstd1
    libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libdb5.3 libcrypt1 libnsl2 libtirpc3
    libgssapi-krb5-2 libkrb5-3 libk5crypto3 libcom-err2 libkrb5support0 libkeyutils1
    python3.11-minimal libpython3.11-minimal libpython3.11-stdlib python3.11
)
# Only the board's dependencies (pyproject's `edge` extra, without tomli: Python 3.11 has tomllib).
WHEELS=("numpy>=1.26" "ai-edge-litert>=1.2" "paho-mqtt>=2.0,<3" "cryptography>=42")
# pip needs the manylinux tags spelled out: ai-edge-litert 2.x ships manylinux_2_27 wheels only, cryptography
# manylinux_2_28 (Debian bookworm's glibc is 2.36).
PLATFORMS=(--platform manylinux_2_28_aarch64 --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64)
SITE=/opt/litefed/site
STAMP_TEXT="v1 ${DEBS[*]} | ${WHEELS[*]}"

stamp_ok() { [ -f "$ROOT/.litefed-userland" ] && [ "$(cat "$ROOT/.litefed-userland")" = "$STAMP_TEXT" ]; }

if [ "${1:-}" = "--check" ]; then
    if stamp_ok; then say "ready: $ROOT"; exit 0; fi
    die "no arm64 userland at $ROOT; build it with: bash scripts/arm64_userland.sh (or scripts/setup.sh --dev)"
fi

refresh_files() {
    # A static qemu inside the root lets `chroot ROOT qemu-aarch64-static ...` work without binfmt_misc.
    local qemu
    qemu="$(command -v qemu-aarch64-static || true)"
    [ -n "$qemu" ] || die "qemu-aarch64-static not found; install it with: apt-get install qemu-user-static"
    cmp -s "$qemu" "$ROOT/usr/bin/qemu-aarch64-static" 2>/dev/null || cp "$qemu" "$ROOT/usr/bin/qemu-aarch64-static"
    cmp -s "$SCRIPTS/arm64_cpuinfo.txt" "$ROOT/etc/litefed/cpuinfo" 2>/dev/null \
        || cp "$SCRIPTS/arm64_cpuinfo.txt" "$ROOT/etc/litefed/cpuinfo"
}

if stamp_ok; then
    refresh_files
    say "cached: $ROOT"
    echo "$ROOT"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "building the arm64 userland needs root (dpkg --add-architecture arm64, apt-get update)"
command -v apt-get >/dev/null 2>&1 || die "no apt-get: the arm64 userland is built from Debian's arm64 packages"
command -v qemu-aarch64-static >/dev/null 2>&1 \
    || die "qemu-aarch64-static not found; install it with: apt-get install qemu-user-static"

export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    say "dpkg --add-architecture arm64; apt-get update"
    dpkg --add-architecture arm64
    apt-get update -qq </dev/null >/dev/null
fi

DEB_CACHE="$ROOT.debs"
NEW="$ROOT.new"
rm -rf "$NEW"
mkdir -p "$DEB_CACHE" "$NEW"

say "downloading ${#DEBS[@]} arm64 .debs into $DEB_CACHE"
pkgs=()
for p in "${DEBS[@]}"; do pkgs+=("$p:arm64"); done
# apt-get download keeps already-downloaded identical files; a stale package list gets one update.
if ! (cd "$DEB_CACHE" && apt-get download -qq "${pkgs[@]}" </dev/null >/dev/null 2>&1); then
    apt-get update -qq </dev/null >/dev/null
    (cd "$DEB_CACHE" && apt-get download -qq "${pkgs[@]}" </dev/null >/dev/null) \
        || die "apt-get download of the arm64 packages failed; check apt's sources (Debian bookworm)"
fi
for p in "${DEBS[@]}"; do
    # The newest downloaded version of each package (older ones stay in the cache until deleted).
    deb="$(ls -1 "$DEB_CACHE/${p}_"*_arm64.deb | sort -V | tail -n 1)"
    dpkg -x "$deb" "$NEW"
done

say "installing aarch64 wheels: ${WHEELS[*]}"
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
    --target "$NEW$SITE" "${PLATFORMS[@]}" --only-binary=:all: --python-version 3.11 --implementation cp \
    "${WHEELS[@]}" </dev/null

mkdir -p "$NEW/proc" "$NEW/sys" "$NEW/dev" "$NEW/work" "$NEW/tmp" "$NEW/etc/litefed" "$NEW/litefed/edge_client"
chmod 1777 "$NEW/tmp"
[ -e "$NEW/usr/bin/python3" ] || ln -s python3.11 "$NEW/usr/bin/python3"
rm -rf "$ROOT"
mv "$NEW" "$ROOT"
refresh_files

say "smoke test: import numpy, ai_edge_litert and cryptography on aarch64"
bash "$SCRIPTS/arm64_run.sh" "$ROOT" "$ROOT/tmp" -c \
    "import platform, numpy, ai_edge_litert.interpreter, cryptography.hazmat.primitives.asymmetric.ed25519; assert platform.machine() == 'aarch64', platform.machine()" \
    || die "the arm64 userland at $ROOT does not run; see the error above"
echo "$STAMP_TEXT" >"$ROOT/.litefed-userland"
say "ready: $ROOT"
echo "$ROOT"
