# Builder of the test image (run by `busybox sh -eu`). Environment from
# default.nix: busybox kernel modules init powerButton statusCgi vmConfig
# moduleOrder noService out. PATH is unset: busybox's shell runs its applets directly.
# shellcheck disable=SC2154  # those variables come from the derivation

root="$PWD/root"
mkdir -p "$root/bin" "$root/lib/modules" "$root/etc/acpi/PWRF" "$root/www/cgi-bin" \
  "$root/proc" "$root/sys" "$root/dev" "$root/tmp" "$root/run"
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
cp "$init" "$root/init"
cp "$powerButton" "$root/etc/acpi/PWRF/00000080"
cp "$statusCgi" "$root/www/cgi-bin/status"
echo "procurator test vm" > "$root/www/index.html"
if [ -n "$noService" ]; then
  echo "the bad test image: no service" > "$root/etc/no-service"
fi
for m in $moduleOrder; do
  if [ ! -f "$modules/$m.ko" ]; then
    echo "build: module $m.ko missing from $modules" >&2
    exit 1
  fi
  cp "$modules/$m.ko" "$root/lib/modules/$m.ko"
done
echo "$moduleOrder" > "$root/lib/modules/order"
chmod 0755 "$root/init" "$root/etc/acpi/PWRF/00000080" "$root/www/cgi-bin/status"
chmod 0644 "$root/lib/modules/"*.ko "$root/www/index.html"

# A reproducible archive: fixed mtimes, sorted names, no gzip timestamp.
find "$root" -exec touch -h -d "1970-01-01 00:00:01" {} +
mkdir -p "$out"
(cd "$root" && find . | sort | cpio -o -H newc 2>/dev/null) | gzip -9 -n > "$out/initrd"

cp "$kernel" "$out/vmlinux"
printf '%s\n' "$vmConfig" > "$out/vm-config.json"
chmod 0444 "$out/initrd" "$out/vmlinux" "$out/vm-config.json"
