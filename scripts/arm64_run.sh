#!/usr/bin/env bash
# Run the arm64 python3.11 of an arm64 userland (scripts/arm64_userland.sh) under qemu-user:
#
#   scripts/arm64_run.sh ROOT WORKDIR [python arguments...]
#
# In a private mount namespace (nothing leaks to the host, everything goes when the process ends):
# /proc with the userland's ARM cpuinfo over /proc/cpuinfo (qemu-user shows the host's x86 one, and
# LiteRT's CPU detection crashes on it), /dev and /sys from the host, WORKDIR at /work (the current
# and the repo's edge_client read-only at /litefed/edge_client; then
# `chroot ROOT qemu-aarch64-static python3.11 ...` (the current directory is /: pass /work/... paths).
# No binfmt_misc needed (qemu is called by name); root is (unshare, mount, chroot).
set -euo pipefail

[ "$#" -ge 2 ] || { echo "usage: scripts/arm64_run.sh ROOT WORKDIR [python arguments...]" >&2; exit 2; }
ROOT="$(cd "$1" && pwd)"
WORK="$(cd "$2" && pwd)"
shift 2
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "arm64-run: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (unshare -m, mount, chroot); run it as root"
command -v unshare >/dev/null 2>&1 || die "unshare not found; install util-linux"
[ -x "$ROOT/usr/bin/qemu-aarch64-static" ] && [ -x "$ROOT/usr/bin/python3.11" ] && [ -f "$ROOT/etc/litefed/cpuinfo" ] \
    || die "$ROOT is not an arm64 userland; build it with: bash scripts/arm64_userland.sh"

# The inner script gets its paths as positional arguments, so no quoting of them is needed.
exec unshare --mount --propagation private -- /bin/sh -euc '
    root="$1"; work="$2"; repo="$3"; shift 3
    mkdir -p "$root/litefed/edge_client"
    mount -t proc proc "$root/proc"
    mount --bind "$root/etc/litefed/cpuinfo" "$root/proc/cpuinfo"
    mount --rbind /dev "$root/dev"
    mount --rbind /sys "$root/sys"
    mount --bind "$work" "$root/work"
    mount --bind "$repo/edge_client" "$root/litefed/edge_client"
    mount -o remount,bind,ro "$root/litefed/edge_client"
    chroot_bin="$(command -v chroot)"
    exec env -i PATH=/usr/bin:/bin HOME=/work LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
        PYTHONPATH=/opt/litefed/site:/litefed \
        "$chroot_bin" "$root" /usr/bin/qemu-aarch64-static /usr/bin/python3.11 "$@"
' arm64-run "$ROOT" "$WORK" "$REPO" "$@"
