#!/usr/bin/env bash
# Prepare a host (or a network namespace) for procurator VMs: the bridge the
# worker attaches VM taps to, its gateway address, IPv4 forwarding, and NAT
# (masquerade) of the VM subnet out of an uplink. The worker itself creates
# and removes the taps (procurator/worker/network.py).
#
# Idempotent: each step measures first and acts only when something is
# missing, so a second run changes nothing. Every change the script makes is
# recorded in a state file (under /run by default: it lives exactly as long as
# the things it describes, which a reboot also clears); `--down` undoes those
# changes and nothing else (a bridge that existed before stays, forwarding
# goes back to its previous value).
#
# NAT uses nftables (its own table, `table ip procurator`, replaced as a
# whole), or iptables where nft is absent (one rule tagged with a comment).
# The table holds one bridge's rule: one procurator bridge per namespace.
set -euo pipefail

prog=$(basename "$0")

usage() {
  cat <<EOF
Usage: $prog [--up | --down] [options]

Prepare (default, --up) or undo (--down) the host network for procurator VMs:
bridge, gateway address, IPv4 forwarding, NAT of the VM subnet to an uplink.

Options (environment variable in brackets):
  --bridge NAME      bridge name [PROCURATOR_BRIDGE] (default: br-procurator)
  --subnet CIDR      VM subnet, e.g. 10.120.0.0/24; the bridge gets its first
                     host address, the guests' gateway [PROCURATOR_SUBNET]
                     (default: 10.120.0.0/24)
  --uplink IFACE     interface to masquerade out of [PROCURATOR_UPLINK]
                     (default: the interface of the IPv4 default route)
  --nat BACKEND      auto, nft, iptables or none [PROCURATOR_NAT] (default:
                     auto: nft if installed, else iptables)
  --netns NAME       operate inside network namespace NAME [PROCURATOR_NETNS]
                     (running under \`ip netns exec NAME\` works as well)
  --state-dir DIR    where the record of changes is kept
                     [PROCURATOR_NET_STATE_DIR] (default: /run/procurator/setup-network)
  -h, --help         show this help

Must run as root. Running --up twice changes nothing the second time.
EOF
}

die() {
  echo "$prog: $*" >&2
  exit 1
}

orig_args=("$@")
action=up
bridge=${PROCURATOR_BRIDGE:-br-procurator}
subnet=${PROCURATOR_SUBNET:-10.120.0.0/24}
uplink=${PROCURATOR_UPLINK:-}
nat=${PROCURATOR_NAT:-auto}
netns=${PROCURATOR_NETNS:-}
state_dir=${PROCURATOR_NET_STATE_DIR:-/run/procurator/setup-network}

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value (see --help)"; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --up) action=up ;;
    --down) action=down ;;
    --bridge) need_value "$@"; bridge=$2; shift ;;
    --subnet|--cidr) need_value "$@"; subnet=$2; shift ;;
    --uplink) need_value "$@"; uplink=$2; shift ;;
    --nat) need_value "$@"; nat=$2; shift ;;
    --netns) need_value "$@"; netns=$2; shift ;;
    --state-dir) need_value "$@"; state_dir=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

[ "$(id -u)" -eq 0 ] || die "must run as root"
command -v ip >/dev/null || die "ip (iproute2) is not installed"

# Enter the namespace by re-running ourselves under `ip netns exec`, which
# also mounts that namespace's /sys. Inside, `ip netns identify` names it.
current_ns=$(ip netns identify 2>/dev/null || true)
if [ -n "$netns" ] && [ "$current_ns" != "$netns" ]; then
  [ -e "/run/netns/$netns" ] || die "network namespace '$netns' does not exist"
  exec ip netns exec "$netns" "$BASH" "$0" "${orig_args[@]}"
fi

[[ "$bridge" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "bad bridge name '$bridge'"
case "$nat" in auto|nft|iptables|none) ;; *) die "--nat must be auto, nft, iptables or none" ;; esac

# --- subnet arithmetic -----------------------------------------------------
ip_to_int() {
  local IFS=. a b c d
  read -r a b c d <<<"$1"
  echo $(( (a << 24) | (b << 16) | (c << 8) | d ))
}
int_to_ip() {
  local n=$1
  echo "$(( (n >> 24) & 255 )).$(( (n >> 16) & 255 )).$(( (n >> 8) & 255 )).$(( n & 255 ))"
}
octet='(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
[[ "$subnet" =~ ^$octet\.$octet\.$octet\.$octet/([0-9]|[12][0-9]|30)$ ]] \
  || die "bad subnet '$subnet': want an IPv4 network, /30 or larger, e.g. 10.120.0.0/24"
net_ip=${subnet%/*}
plen=${subnet#*/}
mask=$(( (0xffffffff << (32 - plen)) & 0xffffffff ))
net_int=$(ip_to_int "$net_ip")
(( (net_int & mask) == net_int )) \
  || die "bad subnet '$subnet': host bits are set (network is $(int_to_ip $(( net_int & mask ))))/$plen"
gateway=$(int_to_ip $(( net_int + 1 )))

# The bridge MAC procurator/core/netnames.py bridge_mac() derives: pinned, so
# the guests' gateway MAC does not follow the lowest port MAC as taps come
# and go.
bridge_mac() {
  local h
  h=$(printf 'procurator/bridge-mac/%s' "$bridge" | sha256sum)
  echo "fe:${h:0:2}:${h:2:2}:${h:4:2}:${h:6:2}:${h:8:2}"
}

# --- the record of what we changed ----------------------------------------
state_file="$state_dir/${current_ns:-host}-$bridge.state"
made_bridge=0
made_addr=0
made_up=0
forward_was=
nft_table=0
ipt_rule=

load_state() {
  [ -f "$state_file" ] || return 0
  local key value
  while IFS='=' read -r key value; do
    case "$key" in
      made_bridge) made_bridge=$value ;;
      made_addr) made_addr=$value ;;
      made_up) made_up=$value ;;
      forward_was) forward_was=$value ;;
      nft_table) nft_table=$value ;;
      ipt_rule) ipt_rule=$value ;;
    esac
  done <"$state_file"
}

save_state() {
  mkdir -p "$state_dir"
  local tmp="$state_file.tmp"
  {
    echo "# written by $prog: what --down undoes"
    echo "made_bridge=$made_bridge"
    echo "made_addr=$made_addr"
    echo "made_up=$made_up"
    echo "forward_was=$forward_was"
    echo "nft_table=$nft_table"
    echo "ipt_rule=$ipt_rule"
  } >"$tmp"
  mv -f "$tmp" "$state_file"
}

# Output is captured before it is matched: with pipefail, `cmd | grep -q`
# fails at random when grep exits early and cmd dies of SIGPIPE.
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }
is_bridge() { local o; o=$(ip -d -o link show dev "$1") && [[ "$o" == *" bridge forward_delay "* ]]; }
up_flag='<([^>]*,)?UP(,[^>]*)?>'
is_up() { local o; o=$(ip -o link show dev "$1") && [[ "$o" =~ $up_flag ]]; }
has_addr() { local o; o=$(ip -4 -o addr show dev "$bridge") && [[ "$o" == *" inet $gateway/$plen "* ]]; }

nat_backend() {
  case "$nat" in
    auto)
      if command -v nft >/dev/null; then echo nft
      elif command -v iptables >/dev/null; then echo iptables
      else die "neither nft nor iptables is installed (or pass --nat none)"
      fi ;;
    nft) command -v nft >/dev/null || die "nft is not installed"; echo nft ;;
    iptables) command -v iptables >/dev/null || die "iptables is not installed"; echo iptables ;;
    none) echo none ;;
  esac
}

ipt_spec() {
  # $1: uplink. The comment tags the rule as ours.
  echo "POSTROUTING -s $subnet ! -d $subnet -o $1 -m comment --comment procurator:$bridge -j MASQUERADE"
}

up() {
  load_state

  if ! link_exists "$bridge"; then
    ip link add name "$bridge" address "$(bridge_mac)" type bridge
    made_bridge=1
    echo "$prog: created bridge $bridge"
  elif ! is_bridge "$bridge"; then
    die "$bridge exists and is not a bridge"
  fi
  save_state

  if ! has_addr; then
    ip addr add "$gateway/$plen" dev "$bridge"
    made_addr=1
    echo "$prog: added $gateway/$plen to $bridge"
    save_state
  fi

  if ! is_up "$bridge"; then
    ip link set dev "$bridge" up
    made_up=1
    save_state
  fi

  local forwarding
  forwarding=$(cat /proc/sys/net/ipv4/ip_forward)
  if [ "$forwarding" != 1 ]; then
    [ -n "$forward_was" ] || forward_was=$forwarding
    echo 1 >/proc/sys/net/ipv4/ip_forward
    echo "$prog: enabled IPv4 forwarding"
    save_state
  fi

  local backend
  backend=$(nat_backend)
  [ "$backend" = none ] && return 0
  if [ -z "$uplink" ]; then
    uplink=$(ip -4 route show default | awk '{ for (i = 1; i < NF; i++) if ($i == "dev") { print $(i + 1); exit } }')
    [ -n "$uplink" ] || die "no IPv4 default route to find the uplink: pass --uplink IFACE (or --nat none)"
  fi
  link_exists "$uplink" || die "uplink $uplink does not exist"
  [ "$uplink" != "$bridge" ] || die "the uplink cannot be the bridge itself"

  if [ "$backend" = nft ]; then
    local comment="procurator: $subnet via $uplink from $bridge"
    local current
    current=$(nft list table ip procurator 2>/dev/null) || current=
    if [[ "$current" != *"comment \"$comment\""* ]]; then
      # One transaction: create-if-missing, drop, recreate. Never half-applied.
      nft -f - <<EOF
table ip procurator
delete table ip procurator
table ip procurator {
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr $subnet ip daddr != $subnet oifname "$uplink" masquerade comment "$comment"
  }
}
EOF
      nft_table=1
      echo "$prog: NAT $subnet out of $uplink (nftables table ip procurator)"
      save_state
    fi
  else
    # shellcheck disable=SC2046 # the spec is split into arguments on purpose
    if [ -n "$ipt_rule" ] && [ "$ipt_rule" != "$uplink" ] \
      && iptables -t nat -C $(ipt_spec "$ipt_rule") 2>/dev/null; then
      iptables -t nat -D $(ipt_spec "$ipt_rule")
    fi
    # shellcheck disable=SC2046
    if ! iptables -t nat -C $(ipt_spec "$uplink") 2>/dev/null; then
      iptables -t nat -A $(ipt_spec "$uplink")
      ipt_rule=$uplink
      echo "$prog: NAT $subnet out of $uplink (iptables)"
      save_state
    fi
  fi
}

down() {
  if [ ! -f "$state_file" ]; then
    echo "$prog: nothing to undo (no $state_file)"
    return 0
  fi
  load_state

  if [ "$nft_table" = 1 ] && command -v nft >/dev/null \
    && nft list table ip procurator >/dev/null 2>&1; then
    nft delete table ip procurator
  fi
  # shellcheck disable=SC2046
  if [ -n "$ipt_rule" ] && command -v iptables >/dev/null \
    && iptables -t nat -C $(ipt_spec "$ipt_rule") 2>/dev/null; then
    iptables -t nat -D $(ipt_spec "$ipt_rule")
  fi
  if [ -n "$forward_was" ]; then
    echo "$forward_was" >/proc/sys/net/ipv4/ip_forward
  fi
  if [ "$made_bridge" = 1 ]; then
    if link_exists "$bridge"; then ip link del dev "$bridge"; fi
  elif link_exists "$bridge"; then
    if [ "$made_addr" = 1 ] && has_addr; then ip addr del "$gateway/$plen" dev "$bridge"; fi
    if [ "$made_up" = 1 ]; then ip link set dev "$bridge" down; fi
  fi
  rm -f "$state_file"
  rmdir "$state_dir" 2>/dev/null || true
  echo "$prog: undone"
}

"$action"
