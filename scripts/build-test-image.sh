#!/usr/bin/env bash
# Build the test VM image (nix/test-image) into the Nix store, offline and
# without nixpkgs, and print its store path as the only line on stdout
# (progress goes to stderr):
#
#   image=$(scripts/build-test-image.sh)   # /nix/store/<hash>-procurator-test-vm
#
# Extra arguments go to nix-build, to make variants with other hashes, e.g.
#   scripts/build-test-image.sh --argstr name web-v2 --arg memoryMib 192
#   scripts/build-test-image.sh --argstr name web-bad --arg service false
# (arguments of nix/test-image/default.nix: name, vcpus, memoryMib, cmdline,
# service: false for the variant whose guest never opens its port 80).
#
# Steps, each cached and skipped when already done:
#   1. resolve the versioned kernel package behind linux-image-amd64, fetch
#      it with `apt-get download` (running `apt-get update` once if apt has
#      no lists) and unpack it with `dpkg -x`;
#   2. extract the uncompressed kernel (the XZ payload of vmlinuz) and copy
#      the guest's modules into a flat directory;
#   3. nix-build nix/test-image with a private NIX_CONF_DIR (no daemon, no
#      build users, no substituters, no sandbox) and keep a GC root to it.
#
# Environment:
#   PROCURATOR_CACHE_DIR   cache root (default /var/cache/procurator); the
#                          kernel goes to $PROCURATOR_CACHE_DIR/test-image
#   BUSYBOX                static busybox (default /bin/busybox, from
#                          busybox-static)
#   PYTHON                 a Python 3 for the XZ extraction (default python3)
# Needs root (apt, /nix/store). Concurrent runs serialise on a lock file.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cache="${PROCURATOR_CACHE_DIR:-/var/cache/procurator}/test-image"
busybox="${BUSYBOX:-/bin/busybox}"
python="${PYTHON:-python3}"
modules=(virtio_ring virtio virtio_mmio failover net_failover virtio_net virtio_blk virtio-rng evdev button)

log() { echo "build-test-image: $*" >&2; }
die() { log "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, /nix/store)"
command -v nix-build >/dev/null || die "nix-build not found (apt-get install nix-bin)"
[ -x "$busybox" ] || die "$busybox not found (apt-get install busybox-static)"
# Debian's /bin is a symlink to usr/bin: Nix must see the real directory.
busybox="$(readlink -f "$busybox")"
# A dynamically linked busybox (package busybox) cannot run in the initramfs.
if ! "$python" - "$busybox" <<'PY'
import struct
import sys

with open(sys.argv[1], "rb") as f:
    head = f.read(64)
    if head[:4] != b"\x7fELF" or head[4] != 2:
        sys.exit(1)
    phoff, = struct.unpack_from("<Q", head, 32)
    phentsize, phnum = struct.unpack_from("<HH", head, 54)
    f.seek(phoff)
    table = f.read(phentsize * phnum)
PT_INTERP = 3
kinds = [struct.unpack_from("<I", table, i * phentsize)[0] for i in range(phnum)]
sys.exit(1 if PT_INTERP in kinds else 0)
PY
then
  die "$busybox is not a static x86-64 ELF; the initramfs needs busybox-static"
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9

# 1. The kernel package. linux-image-amd64 is a metapackage that depends on
#    exactly one versioned linux-image-<abi>-amd64.
resolve_kernel_package() {
  apt-cache depends linux-image-amd64 2>/dev/null |
    awk '/Depends: linux-image-[0-9]/ { print $2; exit }'
}
pkg="$(resolve_kernel_package)"
if [ -z "$pkg" ]; then
  log "apt has no linux-image-amd64; running apt-get update"
  apt-get update -qq >&2
  pkg="$(resolve_kernel_package)"
fi
[ -n "$pkg" ] || die "cannot resolve the kernel package behind linux-image-amd64"

kdir="$cache/$pkg"
if [ ! -f "$kdir/.done" ]; then
  log "fetching $pkg"
  rm -rf "$kdir"
  mkdir -p "$kdir/download"
  if ! (cd "$kdir/download" && apt-get download -o APT::Sandbox::User=root "$pkg" >&2); then
    log "apt-get download failed; refreshing the package lists once"
    apt-get update -qq >&2
    (cd "$kdir/download" && apt-get download -o APT::Sandbox::User=root "$pkg" >&2)
  fi
  dpkg -x "$kdir"/download/*.deb "$kdir/unpacked"

  # 2. The uncompressed kernel and the modules the guest loads.
  vmlinuz="$(ls "$kdir"/unpacked/boot/vmlinuz-*)"
  "$python" - "$vmlinuz" "$kdir/vmlinux" <<'PY'
import lzma
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
start = data.find(b"\xfd7zXZ\x00")
if start < 0:
    sys.exit(f"no XZ payload in {src}")
decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
kernel = decompressor.decompress(data[start:])
if not decompressor.eof or not kernel.startswith(b"\x7fELF"):
    sys.exit(f"the XZ payload of {src} is not an ELF kernel")
with open(dst + ".tmp", "wb") as out:
    out.write(kernel)
PY
  mv "$kdir/vmlinux.tmp" "$kdir/vmlinux"
  mkdir -p "$kdir/modules"
  for m in "${modules[@]}"; do
    found="$(find "$kdir"/unpacked/lib/modules -name "$m.ko" -print -quit)"
    [ -n "$found" ] || die "module $m.ko not found in $pkg"
    cp "$found" "$kdir/modules/$m.ko"
  done
  # Keep only what the image needs (the package unpacks to ~400 MB).
  rm -rf "$kdir/unpacked" "$kdir/download"
  touch "$kdir/.done"
fi

# 3. The image. A private Nix configuration: works as root without a daemon
#    or nixbld users, never asks a substituter, needs no sandbox shell.
nixconf="$cache/nix-conf"
mkdir -p "$nixconf"
cat > "$nixconf/nix.conf" <<'CONF'
build-users-group =
substituters =
sandbox = false
flake-registry =
experimental-features = nix-command flakes
CONF
# One GC root per variant, so building one never lets another be collected.
link="$cache/image"
if [ "$#" -gt 0 ]; then
  link="$cache/image-$(printf '%s\0' "$@" | sha256sum | cut -c1-16)"
fi
log "building nix/test-image $*"
out="$(NIX_CONF_DIR="$nixconf" nix-build "$repo/nix/test-image" \
  --arg busybox "$busybox" \
  --arg kernel "$kdir/vmlinux" \
  --arg modules "$kdir/modules" \
  --out-link "$link" "$@")"
[ -f "$out/vm-config.json" ] || die "nix-build gave $out without vm-config.json"
log "image $out ($(du -sh --apparent-size "$out" | cut -f1))"
echo "$out"
