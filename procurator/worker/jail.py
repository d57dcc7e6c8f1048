"""The worker's side of the jail: each VMM launched unprivileged, in
namespaces of its own, in a cgroup with limits (``procurator.core.jail``
says what and why).

Parts:

- ``Jailer``: the client of the jailer, the single-threaded fork server
  (``procurator/worker/_jailer.py``) that does the namespace, mount and
  privilege work between fork and exec. One per worker, started on first
  use, ended with the worker (it ends by itself when the worker's end of
  its socket closes, even after a SIGKILL of the worker).
- ``Jail``: the policy made real for one worker. ``prepare`` is the jail's
  share of a launch (called by the VM's supervisor, under the VM's flock,
  before the driver launches): the VM's uid slot (taken once, recorded by
  the owner of ``vms/<id>/run``), its cgroup with the VM's limits, the
  VM's writable directories given to its uid. It returns a ``VmJail``, which the
  driver asks to spawn its VMM (``VmJail.spawn``: the driver adds what only
  it knows — its argv, its runtime files, its devices). ``inspect`` reads
  what a running VMM is really confined by (``Confinement``); ``release``
  removes a removed VM's cgroup and frees its slot; ``sweep`` (at start)
  removes the cgroups of VMs this worker no longer has, killing what still
  runs in them.

What a VMM sees (its mount namespace, built by the jailer from the plan
here): a read-only tmpfs root holding

- the VM's writable directories, read-write: ``vms/<id>/run`` (API socket,
  event and log files, serial file) and ``vms/<id>/disks`` (its disk
  copies). Not ``vms/<id>`` itself: ``vm.json`` and ``handles.json``
  there are the worker's, and a VMM that could rewrite them could make the
  next worker run anything;
- read-only: the store paths the VM's definition names (kernel, initramfs,
  read-only disks), the VMM's runtime files (``vmm.closure``);
- ``/dev`` with ``null zero full random urandom`` and the devices the
  driver asks for (``/dev/kvm``; ``/dev/net/tun`` with a tap), the latter
  owned by the VM's uid, mode 0600;
- a ``/proc`` of its own pid namespace.

And under the VMM's own syscall filter, the jail's
(``procurator.core.seccomp``): no namespaces, mounts, tracing, eBPF,
keyrings or kernel code for any VMM, whatever filter it brings.

Paths keep their host names inside (a socket at ``/var/lib/.../api.sock``
is there for both sides), and symlinks on the way to an exposed path are
replicated as symlinks, so a program named through links
(``/usr/bin/python3 -> python3.11``, Debian's ``/lib -> usr/lib``) runs
as it does outside.

Who may touch what: the VM's uid owns ``run`` and ``disks`` (and what is
in them; given anew at each launch, never following a symlink) and nothing
else on the host. The worker never follows a symlink the VMM could have
planted: writable directories are bound as directories (nothing inside them
is resolved on the host), opened ``O_NOFOLLOW``.

Uid slots: the VM's run directory (``vms/<id>/run``) is given to its uid
before the first launch, and its owner is the record of the VM's uid, read
back at start (not fsynced: what it guards are processes, which do not
outlive what an fsync protects against), so a VM keeps its uid across
worker restarts and re-adoption, and no two VMs of a worker share one. The
record cannot be forged by the VMM: a process that is not root cannot
give a directory away, and ``vms/<id>`` (where ``run`` could be replaced)
is root's. It needs no file of its own (issue 31: a new file is a new
inode, tens to hundreds of us of a start's CPU on ext4 without a journal):
releases before this one wrote ``vms/<id>/jail.json``, which is still read
first where it exists. A slot taken and not yet given (a worker killed
before the launch's ``_give``) is lost with the worker's memory: no VMM ran
with it, so the VM's next launch takes a fresh one. A worker's range is its
own: two workers on one host need different ``--vmm-uids``.

Threads: every method is thread-safe. ``Jail._lock`` (a leaf) guards the
slot table; ``Jail._runtime_lock`` the exposure of runtime files, held
while one is computed (``lstat``s only: launches needing it wait rather
than all doing it at once); ``Jailer._lock`` guards starting and stopping
the server (a request does not hold it while it waits for its answer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import logging
import marshal
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from array import array
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from procurator.core.errors import PermanentError, ProcuratorError, TemporaryError, ValidationError
from procurator.core.jail import (
    Confinement,
    JailPolicy,
    LimitsRead,
    ResourceLimits,
    SlotTable,
    VmPathsPlan,
    limits_for,
    plan_vm_paths,
)
from procurator.core.seccomp import baseline_filter
from procurator.core.vmdef import VmDefinition
from procurator.worker import cgroups
from procurator.worker.cgroups import Cgroups, Placement
from procurator.worker.state import RUN_DIR
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmError, VmmGone, VmmPaths, VmmRejected
from procurator.worker.vmm.closure import store_path_of

__all__ = [
    "JAIL_FILE",
    "NEEDED_CAPABILITIES",
    "Jail",
    "JailError",
    "Jailer",
    "VmJail",
    "inspect",
    "instance_name",
    "missing_privileges",
    "remove_worker_cgroups",
]

log = logging.getLogger(__name__)

#: Where releases before the run directory's owner recorded a VM's uid
#: (still read: see "Uid slots").
JAIL_FILE = "jail.json"
#: The jail's own syscall filter, under every VMM's (procurator.core.seccomp).
_FILTER = baseline_filter()
_JAILER = Path(__file__).with_name("_jailer.py")
#: Devices every jailed VMM gets (read-write for everyone, as on any host).
_STANDARD_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
#: Devices that give access to host resources: owned by the VM's uid, 0600.
_OWNED_DEVICES = frozenset(("/dev/kvm", "/dev/net/tun", "/dev/vhost-net"))
_STORE_PREFIX = "/nix/store/"
#: Capabilities a jailing worker needs: CAP_CHOWN (0), CAP_DAC_OVERRIDE (1),
#: CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7), CAP_SETPCAP (8),
#: CAP_NET_ADMIN (12), CAP_SYS_CHROOT (18), CAP_SYS_PTRACE (19: reading a
#: jailed VMM's /proc files), CAP_SYS_ADMIN (21), CAP_MKNOD (27).
_NEEDED_CAPS = {
    0: "CAP_CHOWN",
    1: "CAP_DAC_OVERRIDE",
    5: "CAP_KILL",
    6: "CAP_SETGID",
    7: "CAP_SETUID",
    8: "CAP_SETPCAP",
    12: "CAP_NET_ADMIN",
    18: "CAP_SYS_CHROOT",
    19: "CAP_SYS_PTRACE",
    21: "CAP_SYS_ADMIN",
    27: "CAP_MKNOD",
}
#: The capabilities a jailing worker needs (it refuses to start without one).
NEEDED_CAPABILITIES = tuple(_NEEDED_CAPS.values())


class JailError(TemporaryError):
    """A VMM could not be jailed (the jailer failed, or a jail step did)."""


def missing_privileges() -> list[str]:
    """The capabilities this process lacks to jail VMMs (empty: none)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError as exc:
        return [f"cannot read /proc/self/status: {exc.strerror}"]
    effective = 0
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
    return [name for bit, name in sorted(_NEEDED_CAPS.items()) if not effective & (1 << bit)]


def instance_name(state_dir: Path) -> str:
    """The worker's own directory name under the cgroup parent: a digest of
    its state directory (stable across restarts, distinct per worker)."""
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()
    return f"w-{digest[:12]}"


def remove_worker_cgroups(state_dir: Path, parent: str) -> None:
    """Remove what a worker on ``state_dir`` (VM cgroups under ``parent``)
    left in the cgroup hierarchies: its VMs' cgroups, killing what still
    runs in them, and its own directories. A worker leaves them to its VMs,
    which outlive it on purpose; this is for whoever tears a worker and its
    VMs down for good (the lab, the benchmarks)."""
    found = cgroups.detect(parent, instance_name(state_dir))
    try:
        for name in found.names():
            found.remove(name)
    finally:
        found.close()


# -- the fork server's client ------------------------------------------------------


class Jailer:
    """The worker's handle on the jailer process (see the module docstring).
    ``python``: the interpreter to run it with."""

    def __init__(self, *, python: str = sys.executable) -> None:
        self._python = python
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def _server(self) -> socket.socket:
        with self._lock:
            if self._closed:
                raise JailError("the jailer is closed (the worker is shutting down)")
            if self._sock is not None and self._proc is not None and self._proc.poll() is None:
                return self._sock
            self._stop_locked()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                env = {**os.environ, "PROCURATOR_JAILER_FD": str(theirs.fileno())}
                env.pop(process.LAUNCH_MARKER, None)
                self._proc = subprocess.Popen(
                    [self._python, "-I", "-S", str(_JAILER)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(),),
                    close_fds=True,
                    env=env,
                )
            except OSError as exc:
                ours.close()
                raise JailError(f"cannot start the jailer ({_JAILER}): {exc}") from exc
            finally:
                theirs.close()
            self._sock = ours
            log.info("started the jailer, pid %s", self._proc.pid)
            return ours

    def spawn(self, plan: Mapping[str, object], *, timeout: float) -> int:
        """Launch a jailed VMM as ``plan`` says; its pid. Raises
        ``JailError`` (temporary) when the jailer or a stage of the jail
        failed, with the stage and the reason."""
        message = marshal.dumps(dict(plan))
        for attempt in (1, 2):
            sock = self._server()
            read_end, write_end = os.pipe2(os.O_CLOEXEC)
            try:
                try:
                    sock.sendmsg(
                        [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [write_end]))]
                    )
                except OSError as exc:
                    if attempt == 2 or exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                        raise JailError(f"cannot reach the jailer: {exc}") from exc
                    log.warning("the jailer is gone (%s); starting it again", exc)
                    with self._lock:
                        self._stop_locked()
                    continue
                os.close(write_end)
                write_end = -1
                answer = _read_answer(read_end, timeout)
            finally:
                os.close(read_end)
                if write_end >= 0:
                    os.close(write_end)
            if "pid" in answer:
                pid = answer["pid"]
                assert isinstance(pid, int)
                return pid
            raise JailError(f"jail: {answer.get('error', answer)}")
        raise AssertionError("unreachable")

    def _stop_locked(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """End the jailer (VMMs it started keep running)."""
        with self._lock:
            self._closed = True
            self._stop_locked()


def _read_answer(fd: int, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise JailError(f"the jailer did not answer within {timeout:g} s")
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data:
        raise JailError("the jailer's launcher ended without an answer")
    try:
        answer = marshal.loads(data)
    except (ValueError, EOFError, TypeError) as exc:
        raise JailError(f"unreadable answer from the jailer: {exc}") from exc
    if not isinstance(answer, dict):
        raise JailError(f"unreadable answer from the jailer: {answer!r}")
    return answer


# -- what a VMM sees ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Exposure:
    """Host paths a jail shows: symlinks to re-create (path, target) and
    paths to bind at their own place (path, writable)."""

    symlinks: tuple[tuple[str, str], ...] = ()
    binds: tuple[tuple[str, bool], ...] = ()

    def __add__(self, other: Exposure) -> Exposure:
        return _exposure(self.symlinks + other.symlinks, self.binds + other.binds)


def _exposure(symlinks: Iterable[tuple[str, str]], binds: Iterable[tuple[str, bool]]) -> Exposure:
    """The binds pruned (``_prune``), and the symlinks that a bind does not
    already show (one inside a bound directory is there as it is)."""
    kept = _prune(binds)
    bound = {path.rstrip("/") for path, _ in kept}
    return Exposure(
        symlinks=tuple(link for link in dict.fromkeys(symlinks) if not _inside(link[0], bound)),
        binds=kept,
    )


def _inside(path: str, directories: set[str]) -> bool:
    """Whether ``path`` lies below one of ``directories`` (each without a
    trailing slash; "" is the root): ``path`` starts with one of them and a
    slash. Looks up each of its own prefixes that ends before a slash, so a
    path costs its depth, not the number of binds (issue 31: a VM's
    exposure is its runtime's plus its own, pruned at every start)."""
    at = path.find("/")
    while at != -1:
        if path[:at] in directories:
            return True
        at = path.find("/", at + 1)
    return False


def _resolve(path: str) -> tuple[list[tuple[str, str]], str]:
    """The symlinks met on the way to ``path`` (as (link, target text)) and
    its real path. Raises ``OSError`` for a path that is not there."""
    links: list[tuple[str, str]] = []
    pending = [part for part in path.split("/") if part]
    done = "/"
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == ".":
            continue
        if part == "..":
            done = os.path.dirname(done.rstrip("/")) or "/"
            continue
        here = os.path.join(done, part)
        st = os.lstat(here)
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise OSError(errno.ELOOP, "too many symlinks", path)
            target = os.readlink(here)
            links.append((here, target))
            pending = [p for p in target.split("/") if p] + pending
            if target.startswith("/"):
                done = "/"
            continue
        done = here
    return links, done


def expose(paths: Iterable[str]) -> Exposure:
    """What to show, read-only, so that every one of ``paths`` works inside
    a jail as outside: the symlinks on the way, and the real thing (a whole
    store path for anything in the store). Raises ``VmmRejected`` naming a
    path that is not there."""
    symlinks: dict[tuple[str, str], None] = {}
    binds: list[tuple[str, bool]] = []
    missing = []
    for path in paths:
        try:
            links, real = _resolve(path)
        except OSError as exc:
            missing.append(f"{path}: {exc.strerror or exc}")
            continue
        for link in links:
            symlinks[link] = None
        store_path = store_path_of(real)
        binds.append((store_path or real, False))
    if missing:
        raise VmmRejected("paths the VMM needs are not there", details=tuple(missing))
    return _exposure(symlinks, binds)


def _prune(binds: Iterable[tuple[str, bool]]) -> tuple[tuple[str, bool], ...]:
    """One bind per path, none inside another bound path (a writable bind
    wins over a read-only one of the same path); parents first."""
    best: dict[str, bool] = {}
    for path, writable in binds:
        best[path] = best.get(path, False) or writable
    kept: list[tuple[str, bool]] = []
    bound: set[str] = set()
    for path in sorted(best, key=lambda p: (p.count("/"), p)):
        if _inside(path, bound):
            continue
        kept.append((path, best[path]))
        bound.add(path.rstrip("/"))
    return tuple(kept)


@functools.cache
def _device_numbers(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        return None
    return os.major(st.st_rdev), os.minor(st.st_rdev)


# -- one VM's jail -------------------------------------------------------------------


@dataclass(frozen=True)
class VmJail:
    """The jail of one launch (made by ``Jail.prepare``): a driver calls
    ``spawn`` with what only it knows."""

    jail: Jail
    vm_id: str
    uid: int
    gid: int
    paths: VmmPaths
    limits: ResourceLimits
    placement: Placement
    vm: VmPathsPlan
    taps: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None,
        cwd: Path,
        runtime: Sequence[str],
        devices: Collection[str] = (),
        timeout: float = 30.0,
    ) -> tuple[int, int]:
        """Start ``argv`` jailed for this VM (as ``process.launch_detached``
        does unjailed: its own session, the launch marker, stdin closed,
        output appended to ``log_path``); its (pid, start ticks).
        ``runtime``: the program's runtime files; ``devices``: device nodes
        beyond the standard ones. Raises ``VmmRejected`` (a path it needs is
        not there) or ``VmmError``/``VmmGone``."""
        exe = argv[0] if os.path.isabs(argv[0]) else None
        if exe is None:
            raise VmmRejected(f"a jailed VMM is started by absolute path, not {argv[0]!r}")
        exposure = (
            self.jail.runtime_exposure(tuple(runtime))
            + expose(self.vm.readonly)
            + Exposure(binds=tuple((d, True) for d in self.vm.writable))
        )
        wanted = [*_STANDARD_DEVICES, *devices, *self.vm.devices]
        if self.taps:
            wanted.append("/dev/net/tun")
        nodes = []
        for path in dict.fromkeys(wanted):
            numbers = _device_numbers(path)
            if numbers is None:
                raise VmmError(f"VM {self.vm_id}: device {path} is not on this host")
            own = path in _OWNED_DEVICES
            nodes.append([path, numbers[0], numbers[1], 0o600 if own else 0o666, own])
        plan: dict[str, object] = {
            "uid": self.uid,
            "gid": self.gid,
            "root": str(self.jail.root_mount),
            "cgroups": list(self.placement.join),
            "netns": self.jail.netns_path or "",
            "taps": list(self.taps),
            "log": str(log_path),
            "symlinks": [list(s) for s in exposure.symlinks],
            "binds": [list(b) for b in exposure.binds],
            "devices": nodes,
            "cwd": str(cwd),
            "exe": exe,
            "argv": list(argv),
            "env": process.launch_env(self.paths.vm_dir, env),
            "seccomp": _FILTER,
        }
        try:
            pid = self.jail.jailer.spawn(plan, timeout=timeout)
        except JailError as exc:
            if "bind " in exc.message and "No such file" in exc.message:
                # A runtime file vanished (an upgrade of the VMM's package):
                # find them again for the next attempt.
                self.jail.forget_runtime()
            raise VmmError(
                f"VM {self.vm_id}: cannot start its VMM jailed: {exc.message}",
                details=process.log_tail(log_path),
            ) from exc
        ticks = process.pid_start_ticks(pid)
        if ticks is None:
            raise VmmGone(
                f"{argv[0]!r} for {self.paths.vm_dir} exited at once",
                details=process.log_tail(log_path),
            )
        return pid, ticks


# -- the worker's jail -----------------------------------------------------------------


class Jail:
    """One worker's jail (see the module docstring).

    ``state_dir`` is the worker's; ``cgroups`` its VM cgroups
    (``procurator.worker.cgroups.detect``); ``netns`` the network namespace
    the worker runs its network in (``NetworkConfig.netns``), entered by
    each VMM so that it finds its tap."""

    def __init__(
        self,
        policy: JailPolicy,
        state_dir: Path,
        *,
        cgroups: Cgroups,
        jailer: Jailer | None = None,
        netns: str | None = None,
    ) -> None:
        self.policy = policy
        self.state_dir = Path(state_dir)
        self.cgroups = cgroups
        # A jailer handed in is the caller's to close (tests share one).
        self._own_jailer = jailer is None
        self.jailer = jailer or Jailer()
        self.netns_path = f"/run/netns/{netns}" if netns else None
        # Where each jail's root tmpfs is mounted, inside its own mount
        # namespace only: on the host this stays an empty directory.
        self.root_mount = self.state_dir / "jail" / "root"
        try:
            self.root_mount.mkdir(parents=True, exist_ok=True)
            os.chmod(self.root_mount.parent, 0o700)
        except OSError as exc:
            raise PermanentError(f"cannot make {self.root_mount}: {exc.strerror}") from exc
        self._lock = threading.Lock()
        self._slots: SlotTable | None = None  # loaded on first use
        # Guards _runtime, held while one is computed (file system only).
        self._runtime_lock = threading.Lock()
        self._runtime: dict[tuple[str, ...], Exposure] = {}

    def describe(self) -> str:
        p = self.policy
        return (
            f"uids {p.uid_first}-{p.uid_last}, {self.cgroups.describe()}, memory = guest + "
            f"{p.memory_overhead_mib} MiB, cpu = vCPUs / {p.cpu_overcommit:g}, "
            f"pids.max {p.pids_max}"
        )

    # -- slots ---------------------------------------------------------------------

    def _table(self) -> SlotTable:
        """The slot table (caller holds ``_lock``), read the first time from
        every VM's run directory's owner (or the ``jail.json`` an earlier
        release wrote: see "Uid slots")."""
        if self._slots is None:
            slots = SlotTable(self.policy.uid_count)
            try:
                vm_dirs = sorted(os.scandir(self.state_dir / "vms"), key=lambda e: e.name)
            except FileNotFoundError:
                vm_dirs = []
            for vm_dir in vm_dirs:
                vm_id = vm_dir.name
                if not vm_dir.is_dir(follow_symlinks=False):
                    continue  # not a VM's directory
                uid = _recorded_uid(Path(vm_dir.path), vm_id)
                if uid is None:
                    continue
                slot = self.policy.slot_of(uid)
                if slot is None:
                    log.warning(
                        "VM %s: uid %s is outside this worker's range %s-%s: it gets a new one",
                        vm_id,
                        uid,
                        self.policy.uid_first,
                        self.policy.uid_last,
                    )
                    continue
                if not slots.take(vm_id, slot):
                    log.warning("VM %s: uid %s is another VM's: it gets a new one", vm_id, uid)
                    continue
            self._slots = slots
        return self._slots

    def uid_of(self, vm_id: str) -> int | None:
        with self._lock:
            slot = self._table().get(vm_id)
        return None if slot is None else self.policy.uid(slot)

    def _slot(self, vm_id: str, vm_dir: Path) -> int:
        with self._lock:
            table = self._table()
            slot = table.get(vm_id)
            fresh = slot is None
            if slot is None:
                slot = table.take_free(vm_id)
                if slot is None:
                    raise VmmError(
                        f"VM {vm_id}: no free uid in {self.policy.uid_first}-"
                        f"{self.policy.uid_last} (every one is another VM's)"
                    )
        if fresh:
            # Recorded by ``prepare``'s ``_give`` of the run directory, before
            # any VMM of the VM runs with it. At debug: the VM's "booted"
            # line (its event) names the uid the VMM really runs as.
            log.debug("VM %s: runs as uid %s", vm_id, self.policy.uid(slot))
        return slot

    # -- a launch ------------------------------------------------------------------

    def prepare(self, vm_id: str, definition: VmDefinition, paths: VmmPaths) -> VmJail:
        """The jail's share of a launch of VM ``vm_id`` (its supervisor holds
        its flock and no VMM of it runs): its uid, its cgroup with its
        limits, its writable directories given to its uid. Raises
        ``ValidationError`` (the definition needs what a jail cannot give),
        ``VmmError`` (no free uid, a cgroup still busy)."""
        slot = self._slot(vm_id, paths.vm_dir)
        uid = gid = self.policy.uid(slot)
        writable = [paths.vmm_dir]
        disks = paths.vm_dir / "disks"
        if disks.is_dir():
            writable.append(disks)
        try:
            vm_plan = plan_vm_paths(definition, [str(d) for d in writable])
        except ValidationError as exc:
            raise ValidationError(f"VM {vm_id}: {exc.message}", details=exc.details) from exc
        for directory in writable:
            _give(directory, uid, gid)
        limits = limits_for(definition, self.policy)
        try:
            placement = self.cgroups.create(vm_id, limits)
        except ProcuratorError as exc:
            raise VmmError(f"VM {vm_id}: {exc.message}", details=exc.details) from exc
        taps = (definition.net.tap,) if definition.net is not None else ()
        return VmJail(
            jail=self,
            vm_id=vm_id,
            uid=uid,
            gid=gid,
            paths=paths,
            limits=limits,
            placement=placement,
            vm=vm_plan,
            taps=taps,
            notes=placement.notes,
        )

    def runtime_exposure(self, runtime: tuple[str, ...]) -> Exposure:
        """``expose(runtime)``, once per set of runtime files (one thread
        computes it; launches that need it meanwhile wait for it)."""
        with self._runtime_lock:
            cached = self._runtime.get(runtime)
            if cached is None:
                try:
                    cached = self._runtime[runtime] = expose(runtime)
                except VmmRejected as exc:
                    # The VMM's own files, not the VM's: an upgrade of its
                    # package may be under way. Worth trying again later.
                    raise VmmError(exc.message, details=exc.details) from exc
            return cached

    def forget_runtime(self) -> None:
        with self._runtime_lock:
            self._runtime.clear()

    # -- afterwards -----------------------------------------------------------------

    def inspect(self, pid: int) -> Confinement:
        """What the VMM ``pid`` is confined by (``inspect``), its cgroup read
        with this worker's cgroups; ``jailed`` when it runs as a uid of this
        worker's range in a mount namespace of its own (a VMM another
        release, or an ``--unconfined`` run, started is not)."""
        seen = inspect(pid, self.cgroups)
        jailed = self.policy.slot_of(seen.uid) is not None and seen.own_mount_ns
        return dataclasses.replace(seen, jailed=jailed)

    def oom_kills(self, vm_id: str) -> int:
        """OOM kills in the VM's cgroup since its last launch."""
        try:
            return self.cgroups.oom_kills(vm_id)
        except ProcuratorError:
            return 0

    def release(self, vm_id: str) -> None:
        """The VM is gone (its VMM stopped, its directory removed): remove
        its cgroup and free its uid."""
        try:
            self.cgroups.remove(vm_id)
        except ProcuratorError as exc:
            raise VmmError(f"VM {vm_id}: {exc.message}") from exc
        with self._lock:
            self._table().pop(vm_id)

    def sweep(self, owned: Collection[str]) -> list[str]:
        """Remove the cgroups of VMs not in ``owned`` (every VM this worker
        keeps), killing what still runs in them: they are this worker's, and
        nothing is left to own them. Returns the VM ids swept."""
        swept = []
        for name in self.cgroups.names():
            if name in owned:
                continue
            leftover = self.cgroups.processes(name)
            if leftover:
                log.warning(
                    "cgroup of VM %s (not on this worker) still runs %s: killing them",
                    name,
                    sorted(leftover),
                )
            try:
                self.cgroups.remove(name)
            except ProcuratorError as exc:
                log.warning("cannot remove the cgroup of VM %s: %s", name, exc)
                continue
            swept.append(name)
        with self._lock:
            table = self._table()
            for vm_id in [v for v in table.vm_ids() if v not in owned]:
                table.pop(vm_id)
        return swept

    def close(self) -> None:
        """End the jailer (if this jail started it); the VMMs keep running
        (and their cgroups stay)."""
        if self._own_jailer:
            self.jailer.close()
        self.cgroups.close()


def _recorded_uid(vm_dir: Path, vm_id: str) -> int | None:
    """The uid recorded for the VM of ``vm_dir`` (see "Uid slots"): an
    earlier release's ``jail.json``, else the owner of its run directory
    when one was given (not root's: never given, or an ``--unconfined``
    run's); None when there is none (a warning when a record is bad)."""
    legacy = vm_dir / JAIL_FILE
    try:
        return int(json.loads(legacy.read_text())["uid"])
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("VM %s: %s unreadable (%s): it gets a new uid", vm_id, legacy, exc)
        return None
    try:
        run = os.lstat(vm_dir / RUN_DIR)
    except OSError:
        return None  # no run directory (yet), or not a VM's directory at all
    if not stat.S_ISDIR(run.st_mode) or run.st_uid == 0:
        return None
    return run.st_uid


def _give(directory: Path, uid: int, gid: int) -> None:
    """Make ``directory`` (made if missing) and everything in it owned by
    ``uid``:``gid``, never following a symlink (the VMM that ran as this uid
    could have planted one), the directory itself mode 0700. One made here
    is empty (the VM's flock keeps everyone else out of its directory, and
    no VMM of it runs): nothing to walk (issue 31: the walk was a dozen
    syscalls of every VM's first start)."""
    try:
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            made = False
        else:
            made = True
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise VmmError(f"cannot prepare {directory}: {exc.strerror or exc}") from exc
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o700)
        if made:
            return
        for _, dirs, files, dir_fd in os.fwalk(dir_fd=fd, follow_symlinks=False):
            for name in (*dirs, *files):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        raise VmmError(f"cannot give {directory} to uid {uid}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


# -- observation ---------------------------------------------------------------------


#: The lines of ``/proc/<pid>/status`` a ``Confinement`` is made of.
_STATUS_KEYS = frozenset((b"Uid", b"Gid", b"CapEff", b"NoNewPrivs", b"Seccomp", b"Seccomp_filters"))


def _status(pid: int) -> dict[str, str]:
    """The lines of ``_STATUS_KEYS`` from ``/proc/<pid>/status``, read with
    ``os.read`` on one descriptor (no text layer; a launch reads it once
    per VMM, and so does a re-adoption)."""
    chunks = []
    try:
        fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 8192):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise VmmGone(f"VMM pid {pid} is gone: {exc.strerror}") from exc
    fields = {}
    for line in b"".join(chunks).split(b"\n"):
        key, _, value = line.partition(b":")
        if key in _STATUS_KEYS:
            fields[key.decode()] = value.strip().decode()
    return fields


def _namespace(pid: int | str, kind: str) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/{kind}")
    except OSError:
        return ""


@functools.cache
def _own_namespace(kind: str) -> str:
    """This process's namespace of ``kind`` (``mnt``, ``pid``), read once:
    a process with threads cannot change its mount namespace, and entering
    a pid namespace changes only its children's."""
    return _namespace("self", kind)


def inspect(pid: int, cgroups: Cgroups | None = None, *, jailed: bool = True) -> Confinement:
    """What process ``pid`` is confined by, read from ``/proc`` (its uid and
    gid, effective capabilities, ``no_new_privs``, seccomp filters, whether
    its mount and pid namespaces differ from this process's) and from its
    cgroup (``cgroups.read_limits``). Raises ``VmmGone`` when it is gone."""
    fields = _status(pid)
    uid = int(fields.get("Uid", "0").split()[0])
    gid = int(fields.get("Gid", "0").split()[0])
    mnt = _namespace(pid, "mnt")
    pidns = _namespace(pid, "pid")
    limits = cgroups.read_limits(pid) if cgroups is not None else None
    return Confinement(
        jailed=jailed,
        uid=uid,
        gid=gid,
        capabilities=int(fields.get("CapEff", "0"), 16),
        no_new_privs=fields.get("NoNewPrivs", "0") == "1",
        own_mount_ns=bool(mnt) and mnt != _own_namespace("mnt"),
        own_pid_ns=bool(pidns) and pidns != _own_namespace("pid"),
        seccomp_filters=int(fields.get("Seccomp_filters", "0") or 0)
        if fields.get("Seccomp", "0") == "2"
        else 0,
        limits=limits if limits is not None else LimitsRead(),
    )
