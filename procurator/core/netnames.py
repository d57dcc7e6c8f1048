"""Pure naming and address arithmetic for VM networking.

Everything a VM's NIC is called or numbered is *derived* from its id, so the
same VM gets the same tap, MAC and (on a free subnet) address on every worker
start, and an operator can tell from ``ip link`` which VM a tap belongs to.
Derivation is deterministic-first: each function takes an ``attempt``
counter, and the allocator (``allocate``) probes ``attempt = 0, 1, ...`` until
the result collides with nothing already allocated. Derived values are hints;
the persisted allocation table is the truth, which is what makes uniqueness
*guaranteed* rather than merely likely.

Invariants:

- tap names are at most 15 characters (IFNAMSIZ - 1) of ``[a-z0-9_-]`` plus
  the configured prefix. A VM id that fits and uses only ``[a-z0-9-]`` is
  kept verbatim (``pvm`` + ``web-1`` -> ``pvmweb-1``); any other id becomes a
  readable head, ``_`` and a base32 hash (``pvmweb-f_k3j9xq``). Verbatim names
  never contain ``_`` after the prefix and hashed ones always do, so the two
  forms cannot collide; hashed forms collide only on a 30-bit hash collision,
  which ``allocate`` resolves by probing.
- guest MACs are ``02:`` + 40 hash bits: locally administered (bit 1 of the
  first octet set), unicast (bit 0 clear). The tap's own (host side) MAC is
  the guest MAC with the first octet ``fe`` (libvirt's convention): it must
  differ from the guest's, or the bridge would treat frames for the guest as
  addressed to itself, and a high first octet keeps it out of the bridge's
  "lowest port MAC" choice. MACs depend only on the VM id: every worker has
  its own bridge (L2 domain), and VM ids are unique in a fleet.
- a subnet's first host address is the gateway (the bridge's address); VMs
  get the others, never the network or broadcast address. A VM's first
  candidate address comes from a hash of its id, so allocation order does
  not matter much, and a linear probe finds the next free one.

No I/O here (core): hashlib and ipaddress only.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.vmdef import Nic

__all__ = [
    "MAX_IFNAME",
    "Allocation",
    "SubnetPlan",
    "VmNic",
    "allocate",
    "bridge_mac",
    "check_tap_prefix",
    "guest_mac",
    "host_mac",
    "tap_name",
]

MAX_IFNAME = 15  # IFNAMSIZ (16) minus the terminating NUL
MAX_PREFIX = 8
_HASH_CHARS = 6  # base32: 30 bits
_MAX_ATTEMPTS = 64
_PREFIX_RE = re.compile(rf"[a-z][a-z0-9_-]{{0,{MAX_PREFIX - 1}}}")
_VERBATIM_RE = re.compile(r"[a-z0-9-]+")
_UNSAFE_RE = re.compile(r"[^a-z0-9-]")


def _digest(domain: str, value: str, attempt: int) -> bytes:
    # Domain separation keeps the name, MAC and address hashes independent.
    return hashlib.sha256(f"procurator/{domain}/{attempt}/{value}".encode()).digest()


def check_tap_prefix(prefix: str) -> str | None:
    """A problem with ``prefix`` as a tap prefix, or None when it is usable."""
    if not _PREFIX_RE.fullmatch(prefix):
        return (
            f"tap prefix {prefix!r} must be 1-{MAX_PREFIX} characters of a-z, 0-9, '_' "
            "and '-', starting with a letter"
        )
    return None


def tap_name(prefix: str, vm_id: str, attempt: int = 0) -> str:
    """The tap name for ``vm_id`` (see the module docstring for the forms).

    ``attempt`` > 0 always gives the hashed form with a different hash: it is
    how the allocator steps around a (30-bit) hash collision.
    """
    problem = check_tap_prefix(prefix)
    if problem:
        raise ValidationError(problem)
    room = MAX_IFNAME - len(prefix)
    if attempt == 0 and len(vm_id) <= room and _VERBATIM_RE.fullmatch(vm_id):
        return prefix + vm_id
    digest = _digest("tap", vm_id, attempt)
    tag = base64.b32encode(digest).decode("ascii").lower()[:_HASH_CHARS]
    head_len = room - 1 - _HASH_CHARS
    head = _UNSAFE_RE.sub("-", vm_id.lower())[: max(head_len, 0)].rstrip("-")
    return f"{prefix}{head}_{tag}"


def _mac(first_octet: int, rest: bytes) -> str:
    return ":".join(f"{b:02x}" for b in (first_octet, *rest[:5]))


def guest_mac(vm_id: str, attempt: int = 0) -> str:
    """The guest's MAC: ``02:`` and 40 bits of a hash of the VM id."""
    return _mac(0x02, _digest("mac", vm_id, attempt))


def host_mac(guest: str) -> str:
    """The tap's own MAC for a guest MAC: the same with first octet ``fe``."""
    return "fe" + guest[2:]


def bridge_mac(bridge: str) -> str:
    """A fixed MAC for a bridge we create, so the guests' gateway MAC does not
    change as taps come and go (an unpinned bridge takes its lowest port's).

    scripts/setup-network.sh derives the same value:
    ``fe:`` + the first 5 bytes of sha256("procurator/bridge-mac/" + name).
    """
    digest = hashlib.sha256(f"procurator/bridge-mac/{bridge}".encode()).digest()
    return _mac(0xFE, digest)


@dataclass(frozen=True, slots=True)
class SubnetPlan:
    """A bridge subnet: the gateway (first host) and the VMs' address pool."""

    network: ipaddress.IPv4Network

    @classmethod
    def parse(cls, subnet: str) -> SubnetPlan:
        try:
            network = ipaddress.IPv4Network(subnet, strict=True)
        except ValueError as exc:
            raise ValidationError(
                f"bridge subnet {subnet!r} is not an IPv4 network: {exc}"
            ) from None
        if network.prefixlen > 30:
            raise ValidationError(
                f"bridge subnet {subnet} is too small: it needs a gateway and at least one VM "
                "address (/30 or larger)"
            )
        return cls(network)

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return self.network.network_address + 1

    @property
    def prefix_len(self) -> int:
        return self.network.prefixlen

    @property
    def netmask(self) -> str:
        return str(self.network.netmask)

    @property
    def pool_size(self) -> int:
        # All addresses minus network, gateway and broadcast.
        return self.network.num_addresses - 3

    def pool_address(self, slot: int) -> ipaddress.IPv4Address:
        """The ``slot``-th VM address (0-based, after the gateway)."""
        return self.network.network_address + 2 + slot

    def in_pool(self, address: str) -> bool:
        try:
            ip = ipaddress.IPv4Address(address)
        except ValueError:
            return False
        first = int(self.network.network_address) + 2
        return first <= int(ip) < first + self.pool_size


@dataclass(frozen=True, slots=True)
class Allocation:
    """What one VM holds on this worker: the persisted record."""

    vm_id: str
    ip: str
    tap: str
    mac: str


def allocate(
    vm_id: str, taken: Iterable[Allocation], plan: SubnetPlan, tap_prefix: str
) -> Allocation:
    """A new allocation for ``vm_id`` that shares no address, tap name or MAC
    with ``taken`` (which must not contain ``vm_id``).

    Raises ``LimitExceededError`` when the subnet has no free address.
    """
    used_ips: set[str] = set()
    used_taps: set[str] = set()
    used_macs: set[str] = set()
    for other in taken:
        used_ips.add(other.ip)
        used_taps.add(other.tap)
        used_macs.add(other.mac)

    size = plan.pool_size
    if len(used_ips) >= size:
        raise LimitExceededError(
            f"no free address for VM {vm_id!r}: all {size} VM addresses of "
            f"{plan.network} are allocated"
        )
    start = int.from_bytes(_digest("addr", vm_id, 0)[:8], "big") % size
    ip = ""
    for step in range(size):
        candidate = str(plan.pool_address((start + step) % size))
        if candidate not in used_ips:
            ip = candidate
            break

    return Allocation(
        vm_id=vm_id,
        ip=ip,
        tap=_first_free(lambda n: tap_name(tap_prefix, vm_id, n), used_taps, vm_id, "tap name"),
        mac=_first_free(lambda n: guest_mac(vm_id, n), used_macs, vm_id, "MAC"),
    )


def _first_free(derive: Callable[[int], str], used: set[str], vm_id: str, what: str) -> str:
    for attempt in range(_MAX_ATTEMPTS):
        candidate = derive(attempt)
        if candidate not in used:
            return candidate
    # 64 independent 30+-bit hashes all colliding means the table is corrupt.
    raise LimitExceededError(f"no free {what} for VM {vm_id!r} after {_MAX_ATTEMPTS} attempts")


@dataclass(frozen=True, slots=True)
class VmNic:
    """A VM's network identity on this worker: what the VMM config, the guest
    kernel command line and the VM status need."""

    vm_id: str
    tap: str
    mac: str
    ip: str
    prefix_len: int
    gateway: str

    @property
    def host_mac(self) -> str:
        return host_mac(self.mac)

    @property
    def netmask(self) -> str:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{self.prefix_len}").netmask)

    def kernel_ip_arg(self) -> str:
        """The guest kernel's static configuration (Documentation/admin-guide/
        nfs/nfsroot: ``ip=<client>:<server>:<gw>:<netmask>:<hostname>:<dev>:
        <autoconf>``), with the VM id as hostname and the first NIC, eth0."""
        return f"ip={self.ip}::{self.gateway}:{self.netmask}:{self.vm_id}:eth0:off"

    def device(self) -> Nic:
        """The VM's NIC for its definition (``VmConfig.net[]``, OpenAPI
        ``NetConfig``).

        ``ip`` and ``mask`` are deliberately absent: in cloud-hypervisor they
        configure the *host* side of the tap (the VMM assigns them to a tap it
        creates), not the guest. Our tap is a bridge port and must carry no
        address; the guest learns its address from ``kernel_ip_arg``.
        ``host_mac`` repeats the MAC we gave the tap, so the VMM keeps it.
        The tap is single-queue: ``num_queues`` must stay at its default (2,
        one queue pair), or the VMM refuses a non-multi-queue tap.
        """
        return Nic(tap=self.tap, mac=self.mac, host_mac=self.host_mac)
