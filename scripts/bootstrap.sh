#!/usr/bin/env bash
# Prepare a fresh Debian 12 machine (as root) to run, test and demo procurator:
# the Debian packages it drives and a virtualenv in .venv with the package
# installed in editable mode. Idempotent and quick when everything is there.
#
#   scripts/bootstrap.sh            runtime + test dependencies
#   scripts/bootstrap.sh --dev      also ruff, mypy, import-linter, profilers
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[ "${1:-}" = "--dev" ] && dev=1

# Debian packages: what the worker drives (QEMU, Nix, netlink tools for the
# NAT script) and what the tests check against (promtool, busybox for the test
# image's initramfs, PostgreSQL for the highly available master's store, a C
# compiler for bench/tiny_vmm.c, which the benches run and a test checks).
apt_packages=(python3-venv nix-bin qemu-system-x86 busybox-static prometheus
              nftables iproute2 cpio xz-utils procps curl btrfs-progs postgresql
              gcc libc6-dev)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages (${missing[*]}) and not root to install them" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The prometheus package starts a server on :9090 we do not want; tests start
# their own on a free port.
if systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl stop prometheus || true
fi
# Likewise the postgresql package's own cluster on :5432: tests run
# throwaway clusters of their own (tests/pgcluster.py).
if systemctl is-active --quiet postgresql 2>/dev/null; then
  systemctl stop postgresql || true
fi

py=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.procurator-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)-$dev"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  extras="test"
  [ "$dev" = 1 ] && extras="test,dev"
  .venv/bin/pip install -q -e ".[${extras}]"
  echo "$want" > "$stamp"
fi
