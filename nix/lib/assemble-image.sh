# Assembles one procurator VM image directory: the files of an image next to
# the vm-config.json that names them (see vm-config.nix for the contract).
#
# Run by a POSIX shell: bash from nixpkgs (mk-vm-image.nix) or busybox's
# standalone shell offline (the flake tests). It uses only mkdir, ln and the
# shell's own printf/test, so both run exactly this script.
#
# Environment (from assemble-image.nix): out, kernel, initramfs, disk (empty
# when absent), kernelName, initramfsName, diskName, configName, vmConfig.
#
# The kernel, initramfs and disk are symlinked, not copied: they already are
# in the store, the link is a reference that keeps them in the image's
# closure, and the worker copies the disk per VM anyway (reflink where it
# can), never writing into the store.
set -eu

require_file() {
  # <what> <path>: fail with a message naming the input unless it is a file.
  if [ ! -f "$2" ]; then
    echo "assemble-image: $1 '$2' is not a regular file (did you pass a package instead of the file inside it?)" >&2
    exit 1
  fi
}

mkdir "$out"

require_file kernel "$kernel"
ln -s "$kernel" "$out/$kernelName"

if [ -n "$initramfs" ]; then
  require_file initramfs "$initramfs"
  ln -s "$initramfs" "$out/$initramfsName"
fi

if [ -n "$disk" ]; then
  require_file disk "$disk"
  ln -s "$disk" "$out/$diskName"
fi

printf '%s\n' "$vmConfig" > "$out/$configName"
