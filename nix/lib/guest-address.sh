# Configures a procurator guest's network interface from the kernel command
# line, where the worker puts the VM's stable address (`ip=`).
#
# Accepted forms (the last ip= wins, as for the kernel):
#   ip=<addr>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>
#       (the kernel's own format; netmask dotted or a prefix length, empty
#        fields allowed; an empty device means --interface)
#   ip=<addr>/<prefix>
#   ip=off | none | dhcp | on | any | (absent)   -> nothing to do, exit 0
#
# Usage: guest-address.sh [--dry-run] [--cmdline FILE] [--interface NAME]
#   --dry-run     print the `ip` commands instead of running them
#   --cmdline     read FILE instead of /proc/cmdline
#   --interface   default device (eth0)
#
# Idempotent: `ip addr replace` and `ip route replace`, so a restart of the
# unit changes nothing. POSIX sh; needs iproute2's `ip` unless --dry-run.
set -eu

dry_run=""
cmdline_file=/proc/cmdline
interface=eth0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --cmdline) cmdline_file="$2"; shift ;;
    --interface) interface="$2"; shift ;;
    *) echo "guest-address: unknown argument '$1'" >&2; exit 2 ;;
  esac
  shift
done

run() {
  if [ -n "$dry_run" ]; then
    echo "$*"
  else
    "$@"
  fi
}

# Dotted netmask -> prefix length; a prefix length passes through.
prefix_of() {
  case "$1" in
    *.*)
      netmask="$1"
      bits=0
      old_ifs=$IFS
      IFS=.
      # shellcheck disable=SC2086  # split on dots on purpose
      set -- $1
      IFS=$old_ifs
      # Contiguous ones only: after the first octet below 255, all are 0.
      seen_partial=""
      for octet in "$@"; do
        if [ -n "$seen_partial" ] && [ "$octet" != 0 ]; then
          octet=invalid
        fi
        case "$octet" in
          255) bits=$((bits + 8)); continue ;;
          254) bits=$((bits + 7)) ;;
          252) bits=$((bits + 6)) ;;
          248) bits=$((bits + 5)) ;;
          240) bits=$((bits + 4)) ;;
          224) bits=$((bits + 3)) ;;
          192) bits=$((bits + 2)) ;;
          128) bits=$((bits + 1)) ;;
          0) ;;
          *) echo "guest-address: '$netmask' is not a valid netmask" >&2; exit 1 ;;
        esac
        seen_partial=1
      done
      if [ $# -ne 4 ]; then
        echo "guest-address: '$netmask' is not a valid netmask" >&2
        exit 1
      fi
      echo "$bits"
      ;;
    *) echo "$1" ;;
  esac
}

spec=""
for word in $(cat "$cmdline_file"); do
  case "$word" in ip=*) spec="${word#ip=}" ;; esac
done

addr=""
prefix=""
gateway=""
device=""
case "$spec" in
  "" | off | none | dhcp | on | any)
    echo "guest-address: no static ip= on the kernel command line, nothing to do" >&2
    exit 0
    ;;
  */*)
    addr="${spec%%/*}"
    prefix="${spec#*/}"
    ;;
  *)
    old_ifs=$IFS
    IFS=:
    # shellcheck disable=SC2086  # split the kernel's colon format on purpose
    set -- $spec
    IFS=$old_ifs
    addr="${1:-}"
    gateway="${3:-}"
    mask="${4:-}"
    device="${6:-}"
    prefix=$(prefix_of "${mask:-24}")
    ;;
esac

[ -n "$device" ] || device="$interface"
case "$addr" in
  "" | *[!0-9.]*)
    echo "guest-address: ip=$spec does not start with an IPv4 address" >&2
    exit 1
    ;;
esac
case "$prefix" in
  "" | *[!0-9]*)
    echo "guest-address: ip=$spec has no valid prefix length" >&2
    exit 1
    ;;
esac

run ip link set dev "$device" up
run ip addr replace "$addr/$prefix" dev "$device"
if [ -n "$gateway" ]; then
  run ip route replace default via "$gateway" dev "$device"
fi
