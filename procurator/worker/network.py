"""VM networking on a worker: the bridge, one tap per VM, stable MACs and
IPv4 addresses. The adapter over pyroute2 (netlink); nothing here runs `ip`.

Shape of the network: every VM's tap is a port of one bridge (default
``br-procurator``) whose address is the first host of the subnet and the
guests' gateway; scripts/setup-network.sh adds forwarding and NAT. The guest
configures itself from the kernel command line (``VmNic.kernel_ip_arg``).

Invariants:

- **Allocations are the truth.** ``<state_dir>/network/addresses.json`` maps
  each VM id to its address, tap name and MAC (derived deterministically, see
  ``procurator.core.netnames``, and probed past collisions). It is written
  atomically (temp file, fsync, rename, fsync of the directory) before any
  tap is created, so a crash can leave an allocation without a tap (the next
  ``ensure_vm`` creates it) but never a tap nobody can map back to its VM. A
  VM keeps its allocation across worker restarts and replacements (a new
  hash); only ``release_vm`` and ``sweep`` free it.
- **One writer per state dir.** The manager holds an exclusive ``flock`` on
  ``addresses.lock`` from construction to ``close``; a second manager on the
  same state dir fails at once instead of racing on the file.
- **Our taps are marked.** Each tap's ifalias is ``procurator:<prefix>:<vm
  id>`` (visible in ``ip link``). A tap is ours when its name is allocated to
  a VM or it carries our marker; ``sweep`` and ``release_vm`` delete only
  ours, and ``ensure_vm`` refuses to take over an interface that is not a tap
  or carries someone else's alias. An unmarked tap with an allocated name is
  adopted: that is what a crash between creating a tap and marking it leaves.
- **Measure, act, verify.** ``ensure_vm`` reads the tap, changes only what
  differs (MAC, master, alias, up), and reads it back. Multi-queue and
  persistence cannot be changed on a live tap: a tap with either wrong is
  deleted and re-created (our VMMs never use multi-queue taps).

Threads: pyroute2 sockets are per thread, and a network namespace is a
per-thread property. So every operation that touches interfaces or the
allocation table's writes (``ensure_bridge``, ``ensure_vm``, ``release_vm``,
``sweep``) runs whole on one private thread that owns the IPRoute socket and,
when ``NetworkConfig.netns`` is set, has entered that namespace once
(``setns``): taps are created there too, with no helper process. Callers may
call any method from any thread; operations queue up on that thread and never
interleave (the kernel's rtnl lock would serialize most of the work anyway).
``_table_lock`` is a leaf lock (nothing else is taken and no netlink call is
made while it is held); it lets ``nic`` read the table from any thread.

Errors (all from ``procurator.core.errors``), naming the VM and interface:

- ``BridgeMissingError`` (temporary): the bridge is absent and
  ``manage_bridge`` is off; the VM can start once an operator creates it.
- ``InterfaceConflictError`` (permanent): the tap's or bridge's name is held
  by an interface that is not ours; a person must act.
- ``NetworkPermissionError`` (permanent): no CAP_NET_ADMIN (EPERM/EACCES).
- ``LimitExceededError`` (permanent): the subnet has no free address.
- ``NetworkError`` (temporary): any other netlink failure, or a tap that did
  not converge.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns
from pyroute2.netlink.exceptions import NetlinkError

from procurator.core.defaults import DEFAULT_BRIDGE, DEFAULT_SUBNET
from procurator.core.errors import (
    PermanentError,
    ProcuratorError,
    TemporaryError,
    UnavailableError,
    ValidationError,
)
from procurator.core.netnames import (
    MAX_IFNAME,
    Allocation,
    SubnetPlan,
    VmNic,
    allocate,
    bridge_mac,
    check_tap_prefix,
    host_mac,
)
from procurator.core.validation import check_vm_id

__all__ = [
    "BridgeMissingError",
    "InterfaceConflictError",
    "NetworkConfig",
    "NetworkError",
    "NetworkManager",
    "NetworkPermissionError",
    "VmNic",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_IFF_UP = 0x1
_TUN_TYPE_TAP = 2
_ALIAS_PREFIX = "procurator:"
_STATE_VERSION = 1
_IFNAME_RE = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_IFNAME}}}")


class NetworkError(TemporaryError):
    """A netlink operation failed in a way that may pass, or an interface did
    not reach the state we set."""


class BridgeMissingError(UnavailableError):
    """The bridge does not exist and we may not create it."""


class InterfaceConflictError(PermanentError):
    """A name we need is held by an interface that is not ours."""


class NetworkPermissionError(PermanentError):
    """The worker may not change the network (it needs CAP_NET_ADMIN)."""

    code = "unauthorized"


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """How a worker wires its VMs. Validated on construction."""

    bridge: str = DEFAULT_BRIDGE
    # The bridge gets the first host address (.1): the guests' gateway.
    subnet: str = DEFAULT_SUBNET
    tap_prefix: str = "pvm"
    # Operate inside this named network namespace (/run/netns/<name>).
    netns: str | None = None
    # Create the bridge and its address if missing; else require the bridge.
    manage_bridge: bool = True

    def __post_init__(self) -> None:
        problems = []
        if not _IFNAME_RE.fullmatch(self.bridge) or self.bridge in (".", ".."):
            problems.append(
                f"bridge name {self.bridge!r} must be 1-{MAX_IFNAME} characters of "
                "A-Z a-z 0-9 _ . -"
            )
        prefix_problem = check_tap_prefix(self.tap_prefix)
        if prefix_problem:
            problems.append(prefix_problem)
        elif self.bridge.startswith(self.tap_prefix):
            problems.append(
                f"bridge name {self.bridge!r} starts with the tap prefix {self.tap_prefix!r}"
            )
        try:
            SubnetPlan.parse(self.subnet)
        except ValidationError as exc:
            problems.append(exc.message)
        if self.netns is not None and (
            not self.netns or "/" in self.netns or self.netns in (".", "..")
        ):
            problems.append(f"network namespace name {self.netns!r} is not a plain name")
        if problems:
            raise ValidationError("invalid network configuration", details=problems)

    @property
    def plan(self) -> SubnetPlan:
        return SubnetPlan.parse(self.subnet)


def _marker(prefix: str, vm_id: str) -> str:
    return f"{_ALIAS_PREFIX}{prefix}:{vm_id}"


def _marker_vm(prefix: str, alias: str | None) -> str | None:
    """The VM id in our ifalias marker, or None if ``alias`` is not ours."""
    head = f"{_ALIAS_PREFIX}{prefix}:"
    if alias and alias.startswith(head) and len(alias) > len(head):
        return alias[len(head) :]
    return None


@dataclass(frozen=True, slots=True)
class _Link:
    """The facts we check about one interface, read from netlink."""

    index: int
    name: str
    kind: str | None
    tun_type: int | None
    multi_queue: bool
    persistent: bool
    address: str
    master: int | None
    alias: str | None
    up: bool

    @classmethod
    def from_msg(cls, msg: Any) -> _Link:
        return cls(
            index=int(msg["index"]),
            name=str(msg.get("ifname")),
            kind=msg.get(("linkinfo", "kind")),
            tun_type=msg.get(("linkinfo", "data", "IFLA_TUN_TYPE")),
            multi_queue=bool(msg.get(("linkinfo", "data", "IFLA_TUN_MULTI_QUEUE"))),
            persistent=bool(msg.get(("linkinfo", "data", "IFLA_TUN_PERSIST"))),
            address=str(msg.get("address") or "").lower(),
            master=msg.get("master"),
            alias=msg.get("ifalias") or None,
            up=bool(int(msg["flags"]) & _IFF_UP),
        )

    @property
    def is_tap(self) -> bool:
        return self.kind == "tun" and self.tun_type == _TUN_TYPE_TAP

    def describe(self) -> str:
        if self.kind == "tun":
            return "a tun device" if self.tun_type != _TUN_TYPE_TAP else "a tap"
        return f"a {self.kind} device" if self.kind else "a device of another kind"


class _Table:
    """The persisted allocations (see the module docstring). Not thread-safe:
    the manager guards it with ``_table_lock``."""

    def __init__(self, path: Path, plan: SubnetPlan, tap_prefix: str) -> None:
        self.path = path
        self._plan = plan
        self._prefix = tap_prefix
        self.vms: dict[str, Allocation] = {}
        self._load()

    def _load(self) -> None:
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise PermanentError(f"cannot read VM address table {self.path}: {exc}") from exc
        try:
            data = json.loads(raw)
            entries = data["vms"] if data.get("version") == _STATE_VERSION else None
            if not isinstance(entries, dict):
                raise TypeError(f"unsupported version {data.get('version')!r} or layout")  # noqa: TRY301
            loaded = [
                Allocation(vm_id=str(k), ip=str(v["ip"]), tap=str(v["tap"]), mac=str(v["mac"]))
                for k, v in entries.items()
            ]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PermanentError(
                f"VM address table {self.path} is unreadable ({exc}); "
                "fix or remove it (VMs then get new addresses)"
            ) from exc
        seen_ip: set[str] = set()
        seen_tap: set[str] = set()
        seen_mac: set[str] = set()
        for a in loaded:
            # After a change of subnet or prefix, or a hand edit, an entry may
            # no longer be valid; its VM gets a fresh allocation on next use.
            if (
                not self._plan.in_pool(a.ip)
                or not a.tap.startswith(self._prefix)
                or len(a.tap) > MAX_IFNAME
                or a.ip in seen_ip
                or a.tap in seen_tap
                or a.mac in seen_mac
            ):
                log.warning(
                    "dropping allocation of VM %s (%s, %s) from %s: not valid for subnet %s "
                    "and tap prefix %r",
                    a.vm_id,
                    a.ip,
                    a.tap,
                    self.path,
                    self._plan.network,
                    self._prefix,
                )
                continue
            seen_ip.add(a.ip)
            seen_tap.add(a.tap)
            seen_mac.add(a.mac)
            self.vms[a.vm_id] = a

    def save(self) -> None:
        data = {
            "version": _STATE_VERSION,
            "subnet": str(self._plan.network),
            "tap_prefix": self._prefix,
            "vms": {
                a.vm_id: {"ip": a.ip, "tap": a.tap, "mac": a.mac}
                for a in sorted(self.vms.values(), key=lambda a: a.vm_id)
            },
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(self.path)
            dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise NetworkError(f"cannot write VM address table {self.path}: {exc}") from exc


class NetworkManager:
    """Bridge, taps, MACs and addresses of one worker's VMs.

    Every method blocks and is thread-safe (see the module docstring); the
    worker calls them through ``trio.to_thread.run_sync``.
    """

    def __init__(self, config: NetworkConfig, state_dir: Path) -> None:
        self.config = config
        self._plan = config.plan
        net_dir = Path(state_dir) / "network"
        try:
            net_dir.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(net_dir / "addresses.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise PermanentError(f"cannot use network state dir {net_dir}: {exc}") from exc
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._lock_fd)
            raise TemporaryError(
                f"network state dir {net_dir} is in use by another network manager "
                f"(lock {net_dir / 'addresses.lock'} is held)"
            ) from exc
        self._table_lock = threading.Lock()
        try:
            self._table = _Table(net_dir / "addresses.json", self._plan, config.tap_prefix)
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._closed = False
        # One thread owns the netlink socket (and lives in the netns).
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="procurator-netlink"
        )
        self._ipr: IPRoute | None = None

    # -- public API -------------------------------------------------------

    def ensure_bridge(self) -> None:
        """Make sure the bridge is there (created with its address and up when
        ``manage_bridge``; only required to exist otherwise)."""
        self._run(lambda: self._ensure_bridge(vm_id=None))

    def ensure_vm(self, vm_id: str) -> VmNic:
        """Allocate (once, persisted) and wire up ``vm_id``'s tap: present,
        a single-queue persistent tap, our MAC, on the bridge, marked, up.
        Idempotent; fixes whatever drifted. Returns the VM's NIC."""
        problem = check_vm_id(vm_id)
        if problem:
            raise ValidationError(problem)
        return self._run(lambda: self._ensure_vm(vm_id))

    def release_vm(self, vm_id: str) -> None:
        """The VM is no longer assigned here: delete its tap and free its
        address. Idempotent. (A replacement keeps both: don't call this.)"""
        self._run(lambda: self._release_vm(vm_id))

    def nic(self, vm_id: str) -> VmNic | None:
        """The NIC ``ensure_vm`` would give ``vm_id``, if it has an allocation;
        touches no interface."""
        with self._table_lock:
            allocation = self._table.vms.get(vm_id)
        return None if allocation is None else self._nic(allocation)

    def sweep(self, owned: Iterable[str]) -> list[str]:
        """Delete our taps (our prefix, and allocated to a VM or marked by
        us) whose VM is not in ``owned`` or that are not the tap allocated to
        their VM, and free the allocations of VMs not in ``owned``.

        ``owned`` must hold every VM this worker keeps (running or not), and
        the worker calls this after re-adopting its VMs and before starting
        any VM not in ``owned``. Returns the names of the taps deleted.
        """
        owned_set = set(owned)
        return self._run(lambda: self._sweep(owned_set))

    def guest_socket(self) -> socket.socket:
        """A TCP socket in the guests' network: this manager's namespace, for
        the worker's guest health checks (``procurator.worker.health``). Made
        on the netlink thread, which has entered the namespace; a socket
        stays in the namespace it was made in."""

        def make() -> socket.socket:
            self._socket()  # enters the namespace (once)
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

        return self._run(make)

    def close(self) -> None:
        """Close the netlink socket and release the state-dir lock."""
        with self._table_lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._executor.submit(self._close_ipr).result()
        finally:
            self._executor.shutdown(wait=True)
            os.close(self._lock_fd)

    def __enter__(self) -> NetworkManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- allocations --------------------------------------------------------

    def _allocation(self, vm_id: str) -> Allocation:
        with self._table_lock:
            existing = self._table.vms.get(vm_id)
            if existing is not None:
                return existing
            new = allocate(vm_id, self._table.vms.values(), self._plan, self.config.tap_prefix)
            self._table.vms[vm_id] = new
            try:
                self._table.save()
            except ProcuratorError:
                del self._table.vms[vm_id]
                raise
        log.info("allocated %s, tap %s, MAC %s to VM %s", new.ip, new.tap, new.mac, vm_id)
        return new

    def _nic(self, a: Allocation) -> VmNic:
        return VmNic(
            vm_id=a.vm_id,
            tap=a.tap,
            mac=a.mac,
            ip=a.ip,
            prefix_len=self._plan.prefix_len,
            gateway=str(self._plan.gateway),
        )

    # -- the netlink thread ---------------------------------------------------

    def _run(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the netlink thread and wait for its result."""
        try:
            future = self._executor.submit(fn)
        except RuntimeError:  # shut down
            raise ProcuratorError("the network manager is closed") from None
        return future.result()

    def _socket(self) -> IPRoute:
        if self._ipr is None:
            if self.config.netns is not None:
                try:
                    # Per-thread: only the netlink thread enters the netns.
                    pyroute2_netns.setns(self.config.netns, flags=0)
                except OSError as exc:
                    raise PermanentError(
                        f"cannot enter network namespace {self.config.netns!r}: "
                        f"{exc.strerror or exc}"
                    ) from exc
            try:
                self._ipr = IPRoute()
            except OSError as exc:
                raise NetworkError(f"cannot open a netlink socket: {exc}") from exc
        return self._ipr

    def _close_ipr(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    @contextlib.contextmanager
    def _netlink(self, action: str, ifname: str, vm_id: str | None) -> Iterator[None]:
        """Translate pyroute2/OS errors of ``action`` on ``ifname``."""
        who = f" for VM {vm_id}" if vm_id else ""
        try:
            yield
        except NetlinkError as exc:
            raise self._translate(exc.code, str(exc), action, ifname, who) from exc
        except OSError as exc:
            # The tun ioctl path and socket failures raise plain OSError.
            code = exc.errno or 0
            if code not in (errno.EPERM, errno.EACCES):
                self._close_ipr()  # the socket may be unusable: reopen next time
            raise self._translate(code, exc.strerror or str(exc), action, ifname, who) from exc

    @staticmethod
    def _translate(code: int, text: str, action: str, ifname: str, who: str) -> ProcuratorError:
        reason = os.strerror(code) if code > 0 else text
        if code in (errno.EPERM, errno.EACCES):
            return NetworkPermissionError(
                f"cannot {action} {ifname}{who}: {reason} (the worker needs CAP_NET_ADMIN)"
            )
        if code == errno.EEXIST:
            return InterfaceConflictError(
                f"cannot {action} {ifname}{who}: the name is taken by another interface"
            )
        return NetworkError(f"cannot {action} {ifname}{who}: {reason}")

    def _get(self, name: str) -> _Link | None:
        msgs = self._socket().get_links(ifname=name)
        return _Link.from_msg(msgs[0]) if msgs else None

    def _ensure_bridge(self, vm_id: str | None) -> int:
        """On the netlink thread: the bridge's index, creating it if allowed."""
        cfg = self.config
        who = f" for VM {vm_id}" if vm_id else ""
        with self._netlink("look up bridge", cfg.bridge, vm_id):
            link = self._get(cfg.bridge)
        if link is None:
            if not cfg.manage_bridge:
                raise BridgeMissingError(
                    f"bridge {cfg.bridge} does not exist{who} and this worker does not "
                    "manage it (manage_bridge is off): create it, e.g. with "
                    "scripts/setup-network.sh",
                    delay=30.0,
                )
            with self._netlink("create bridge", cfg.bridge, vm_id):
                self._socket().link(
                    "add", ifname=cfg.bridge, kind="bridge", address=bridge_mac(cfg.bridge)
                )
                link = self._get(cfg.bridge)
            if link is None:
                raise NetworkError(f"bridge {cfg.bridge} vanished right after it was created")
            log.info("created bridge %s", cfg.bridge)
        if link.kind != "bridge":
            raise InterfaceConflictError(
                f"cannot use {cfg.bridge} as the VM bridge{who}: it is {link.describe()}, "
                "not a bridge"
            )
        if cfg.manage_bridge:
            gateway = str(self._plan.gateway)
            with self._netlink("configure bridge", cfg.bridge, vm_id):
                ipr = self._socket()
                present = {
                    (a.get("address"), a["prefixlen"])
                    for a in ipr.get_addr(index=link.index, family=2)  # AF_INET
                }
                if (gateway, self._plan.prefix_len) not in present:
                    ipr.addr(
                        "add",
                        index=link.index,
                        address=gateway,
                        prefixlen=self._plan.prefix_len,
                    )
                    log.info("added %s/%s to bridge %s", gateway, self._plan.prefix_len, cfg.bridge)
                if not link.up:
                    ipr.link("set", index=link.index, state="up")
        return link.index

    def _ensure_vm(self, vm_id: str) -> VmNic:
        nic = self._nic(self._allocation(vm_id))
        self._ensure_tap(nic)
        return nic

    def _release_vm(self, vm_id: str) -> None:
        with self._table_lock:
            allocation = self._table.vms.get(vm_id)
        if allocation is None:
            return
        # Tap first, allocation second: a crash in between leaves an
        # allocation whose tap is gone, never a tap we cannot map to a VM.
        self._delete_if_ours(allocation.tap, vm_id)
        with self._table_lock:
            del self._table.vms[vm_id]
            self._table.save()
        log.info("released %s and tap %s of VM %s", allocation.ip, allocation.tap, vm_id)

    def _sweep(self, owned: set[str]) -> list[str]:
        with self._table_lock:
            table = dict(self._table.vms)
        removed = self._sweep_taps(owned, table)
        with self._table_lock:
            freed = [vm for vm in self._table.vms if vm not in owned]
            for vm in freed:
                del self._table.vms[vm]
            if freed:
                self._table.save()
        if removed or freed:
            log.info("swept taps %s; freed the addresses of VMs %s", removed, freed)
        return removed

    def _ensure_tap(self, nic: VmNic) -> None:
        """On the netlink thread: measure the tap, fix what differs, verify."""
        bridge_index = self._ensure_bridge(nic.vm_id)
        prefix = self.config.tap_prefix
        marker = _marker(prefix, nic.vm_id)
        want_mac = host_mac(nic.mac)
        with self._netlink("look up tap", nic.tap, nic.vm_id):
            link = self._get(nic.tap)
        if link is not None:
            if not link.is_tap:
                raise InterfaceConflictError(
                    f"cannot create tap {nic.tap} for VM {nic.vm_id}: the name is taken by "
                    f"{link.describe()} that is not ours; remove it or change the tap prefix"
                )
            if link.alias is not None and link.alias != marker:
                raise InterfaceConflictError(
                    f"cannot use tap {nic.tap} for VM {nic.vm_id}: it belongs to someone else "
                    f"(alias {link.alias!r})"
                )
            if link.multi_queue or not link.persistent:
                log.warning(
                    "tap %s of VM %s is %s: re-creating it",
                    nic.tap,
                    nic.vm_id,
                    "multi-queue" if link.multi_queue else "not persistent",
                )
                with self._netlink("delete tap", nic.tap, nic.vm_id):
                    self._socket().link("del", index=link.index)
                link = None
        if link is None:
            with self._netlink("create tap", nic.tap, nic.vm_id):
                # pyroute2 creates it with the tun ioctl, persistent, on this
                # thread (hence in our netns). Flags match what VMMs ask for.
                self._socket().link(
                    "add",
                    ifname=nic.tap,
                    kind="tuntap",
                    mode="tap",
                    ifr={
                        "no_pi": 1,
                        "one_queue": 0,
                        "vnet_hdr": 1,
                        "tun_excl": 0,
                        "multi_queue": 0,
                        "persist": 1,
                        "nofilter": 0,
                    },
                )
                link = self._get(nic.tap)
            if link is None:
                raise NetworkError(f"tap {nic.tap} of VM {nic.vm_id} vanished after creation")
            log.info("created tap %s for VM %s", nic.tap, nic.vm_id)

        changes: dict[str, Any] = {}
        if link.address != want_mac:
            changes["address"] = want_mac
        if link.master != bridge_index:
            changes["master"] = bridge_index
        if link.alias != marker:
            changes["ifalias"] = marker
        if not link.up:
            changes["state"] = "up"
        if changes:
            with self._netlink("configure tap", nic.tap, nic.vm_id):
                self._socket().link("set", index=link.index, **changes)
                after = self._get(nic.tap)
            if after is None or not (
                after.is_tap
                and after.address == want_mac
                and after.master == bridge_index
                and after.alias == marker
                and after.up
            ):
                raise NetworkError(
                    f"tap {nic.tap} of VM {nic.vm_id} did not take its configuration "
                    f"({sorted(changes)}): now {after}"
                )
            log.info("configured tap %s of VM %s: %s", nic.tap, nic.vm_id, sorted(changes))

    def _delete_if_ours(self, tap: str, vm_id: str) -> None:
        with self._netlink("look up tap", tap, vm_id):
            link = self._get(tap)
        if link is None:
            return
        if not link.is_tap or (
            link.alias is not None and link.alias != _marker(self.config.tap_prefix, vm_id)
        ):
            log.warning(
                "not deleting %s of VM %s: it is %s that is not ours (alias %r)",
                tap,
                vm_id,
                link.describe(),
                link.alias,
            )
            return
        with self._netlink("delete tap", tap, vm_id):
            self._socket().link("del", index=link.index)
        log.info("deleted tap %s of VM %s", tap, vm_id)

    def _sweep_taps(self, owned: set[str], table: dict[str, Allocation]) -> list[str]:
        prefix = self.config.tap_prefix
        by_tap = {a.tap: a.vm_id for a in table.values()}
        with self._netlink("list", "interfaces", None):
            links = [_Link.from_msg(m) for m in self._socket().get_links()]
        removed: list[str] = []
        for link in links:
            if not link.name.startswith(prefix) or not link.is_tap:
                continue
            owner = by_tap.get(link.name) or _marker_vm(prefix, link.alias)
            if owner is None:
                log.debug("sweep: leaving tap %s alone: not ours", link.name)
                continue
            allocated = table.get(owner)
            if owner in owned and (allocated is None or allocated.tap == link.name):
                continue
            with self._netlink("delete orphaned tap", link.name, owner):
                try:
                    self._socket().link("del", index=link.index)
                except NetlinkError as exc:
                    if exc.code != errno.ENODEV:  # gone meanwhile: fine
                        raise
            removed.append(link.name)
            log.info("swept tap %s (VM %s is not on this worker)", link.name, owner)
        return removed
