"""VM cgroups: one per VMM, with memory, CPU and task limits, on cgroup v1
or v2 behind one small interface.

Layout. Each worker keeps its VMs' cgroups in a directory of its own,
``<base>/<parent>/<instance>/<vm id>``: ``parent`` is ``JailPolicy.
cgroup_parent`` (default ``procurator``), ``instance`` is the worker's
own name for itself (a digest of its state directory, so two workers on a
host never share one and one worker's sweep never touches another's VMs),
and ``base`` is where the kernel lets a worker put them:

- **v1** (one hierarchy per controller, ``/sys/fs/cgroup/<controller>``):
  the worker's own cgroup in each hierarchy. v1 allows processes in inner
  cgroups, so VM cgroups nest under the worker's: under systemd they stay
  in the unit's cgroup (with ``KillMode=process``, as the NixOS module
  sets, a restart of the worker leaves them alone), and they stay inside
  whatever limits the worker itself runs under.
- **v2** (one unified hierarchy): the *parent* of the worker's cgroup. v2
  forbids processes in a cgroup whose controllers are enabled for its
  children ("no internal processes"), so VMs go *beside* the worker: run
  the worker in a delegated sub-cgroup (systemd: ``Delegate=cpu memory
  pids`` and ``DelegateSubgroup=worker``) and its VMs live next to it in
  the unit's cgroup. Controllers are enabled (``cgroup.subtree_control``)
  from the hierarchy's root down to the VMs' parent; a level that refuses
  (it holds processes, or the worker may not write it) leaves that
  controller unenforced, and says so.
- A ``parent`` starting with ``/`` is absolute in the hierarchy instead.

Limits (``procurator.core.jail.ResourceLimits``), written into a VM's
cgroup for each launch:

- memory: v1 ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``
  when swap is accounted: no swap beyond it); v2 ``memory.max``,
  ``memory.swap.max`` 0 and ``memory.oom.group`` 1 (an OOM kills the
  whole VMM, never half of it);
- CPU: v1 ``cpu.cfs_quota_us`` per ``cpu.cfs_period_us``; v2 ``cpu.max``;
- tasks: ``pids.max`` in both.

A controller that is not there (not mounted, bound to the other version,
not delegated) or a limit the kernel refuses is a note in the placement
(the supervisor turns it into a warning event): never silence. What holds
is read back from the VMM's own cgroup (``read_limits``) once it runs.

A VM's cgroup is made at its first launch and removed with the VM
(``remove``: processes still inside are killed first; they can only be
that VM's; then its memory is released, see below). The VMM joins it
itself, before it execs (the jail writes ``0`` to each file of
``Placement.join``: v1's ``tasks``, which moves its one thread without the
threadgroup lock a process move takes; v2's ``cgroup.procs``), so
everything it ever runs is inside from the first instruction.

Relaunch. A later launch of the VM (a replacement, a restart of a crashed
VMM, a rollout step: each on the critical path of a change) keeps the
empty cgroup its last VMM left, and only rewrites the limits (a file that
holds its value already is not written: each v1 CPU write walks every cpu
cgroup of the host). Making it anew instead cost the release below (6-44
ms with pages charged), an rmdir and a mkdir. What a fresh cgroup gave
holds for a kept one: its OOM count is 0 (one that counts a kill, which
the kernel cannot reset, is made anew: ``oom_kills`` means "since the
launch"), v1's peak usage and limit-hit counts are reset, and every limit
is the new one. The writes are ordered so the kernel takes them over the
old values (v1: memsw first when the memory limit grows, the CPU quota
first when the period shrinks); a limit it still refuses makes the cgroup
anew (released, removed, made, written as at a first launch, where a
refusal is a note): a kept cgroup never runs a VMM under the last one's
limits, and one that cannot be removed fails the launch. The pages the
last VMM left stay charged to the kept cgroup (the image it read, likely
the next VMM's too): reclaimable, they yield to the new VMM's memory
under its limit, and the VM's removal releases them. Nothing in the
worker's metrics is read from a cgroup's counters (the VM's CPU and
memory come from ``/proc``; the limit gauges from these files).

Removal releases the VM's memory first. Removing a memory cgroup's
directory does not free it: the kernel keeps it, *dying* (counted in
``/proc/cgroups``, gone from the filesystem), for as long as one page is
still charged to it, and each costs ~0.3 MiB of unreclaimable kernel memory
(SUnreclaim). Kernel objects (slab: inodes, dentries, sockets) move to the
parent when the cgroup goes (objcg, Linux >= 5.9); pages do not: page cache
the VMM brought in (the image's kernel, initrd and disk read from the
store, which every later VM of that image keeps hot; filesystem metadata
blocks; files that outlive the VM) pins the dead cgroup until memory
pressure evicts it, which on a host with room may be never. So once no
process is left inside, and before the rmdir, ``_release`` reclaims what is
charged: v1 ``memory.force_empty`` (the kernel's documented use: "before
calling rmdir()"; dirty pages are written back first), v2
``memory.reclaim`` of ``memory.current``. A page another VM still uses is
read again and charged to that VM's cgroup. The release is best effort: a
page still under writeback can stay; a release that fails is a warning;
the removal goes on either way. Measured here (v1, Linux 6.18): 20 VMs of
the C fake VMM, removed, left 22 cgroups dying (theirs, the worker's and
its parent) without the release and none with it (docs/BENCHMARKS.md,
"Session 7 (2026-12-07): dying memory cgroups").

OOM: ``oom_kills`` reads the kernel's count of OOM kills in the cgroup
(v1 ``memory.oom_control``, v2 ``memory.events``): a VMM that died with a
count above zero was killed for reaching ``memory.max``.

First launch. A VM's first launch (most launches: every VM a fleet
grows by) makes its cgroup by one ``mkdir`` per hierarchy and writes its
limits without reading them first where a fresh cgroup's defaults (no
limit) cannot be the value (v1: all but the CPU period, which is read:
each file at most once, issue 31's CPU per start); anything else there
(a directory left by the VM's last VMM, a missing parent) takes the
relaunch's way below.

Threads: every method is thread-safe; ``_lock`` (a leaf) serialises the
making and removing of directories, so a removal emptying the worker's
directory never races a launch making its first VM cgroup in it. A
relaunch that keeps its cgroup makes and removes nothing (v1 takes
``_lock`` for the one ``mkdir`` that finds the cgroup there; v2 takes
it to check the controllers are enabled). The
release (milliseconds of reclaim, no directory made or removed) runs
before ``_lock`` is taken, so one VM's release holds back no other VM's
launch or removal; the caller's per-VM lock keeps a launch and a removal
of the same VM apart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from procurator.core.errors import TemporaryError
from procurator.core.jail import LimitsRead, ResourceLimits

__all__ = [
    "CONTROLLERS",
    "CgroupBusyError",
    "CgroupError",
    "Cgroups",
    "CgroupsV1",
    "CgroupsV2",
    "NoCgroups",
    "Placement",
    "detect",
]

log = logging.getLogger(__name__)

CONTROLLERS = ("memory", "cpu", "pids")
_UNLIMITED_V1 = 1 << 62  # memory.limit_in_bytes reads 9223372036854771712 when unset
_MAX = "max"
_RELEASE_ROUNDS = 3  # force_empty / memory.reclaim writes per release, at most


class CgroupError(TemporaryError):
    """A VM's cgroup could not be made, read or removed."""


class CgroupBusyError(CgroupError):
    """A VM's cgroup still holds processes."""


@dataclass(frozen=True, slots=True)
class Placement:
    """A VM's cgroup made for a launch: ``join`` are the ``cgroup.procs``
    files the VMM writes itself into; ``notes`` what could not be set."""

    path: str
    join: tuple[str, ...]
    notes: tuple[str, ...] = ()


class Cgroups(Protocol):
    """One worker's VM cgroups (see the module docstring)."""

    version: int  # 1, 2; 0 without cgroups

    @property
    def enforceable(self) -> frozenset[str]:
        """The controllers of ``CONTROLLERS`` this worker can limit."""
        ...

    def describe(self) -> str: ...

    def create(self, name: str, limits: ResourceLimits) -> Placement: ...

    def remove(self, name: str, *, timeout: float = 5.0) -> None: ...

    def names(self) -> list[str]: ...

    def processes(self, name: str) -> set[int]: ...

    def oom_kills(self, name: str) -> int: ...

    def read_limits(self, pid: int) -> LimitsRead: ...

    def close(self) -> None: ...


# -- discovery ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mount:
    point: Path
    root: str  # the cgroup this mount shows at its mount point
    fstype: str
    options: frozenset[str]


def _mounts(mountinfo: str) -> list[_Mount]:
    found = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        sep = fields.index("-")
        fstype = fields[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3 else frozenset()
        point = fields[4].replace("\\040", " ")
        found.append(_Mount(Path(point), fields[3], fstype, options))
    return found


def _own_cgroups(text: str) -> dict[str, str]:
    """``/proc/<pid>/cgroup`` -> {controller (or "" for v2): path}."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            own[""] = path
        for controller in controllers.split(","):
            if controller:
                own[controller] = path
    return own


def _on_disk(mount: _Mount, path: str) -> Path | None:
    """Where cgroup ``path`` (as /proc/<pid>/cgroup names it) is under
    ``mount``; None when the mount does not show it."""
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/") and root:
        return None
    rest = path[len(root) :].lstrip("/")
    return mount.point / rest if rest else mount.point


def _slurp(path: Path) -> str:
    """The whole of a small kernel file (cgroupfs, procfs) by descriptor
    calls alone: open, read to the end, close; four syscalls where
    ``open()``'s buffer and text layers make nine (two fstats, an ioctl,
    two lseeks), each a GIL hand-off on a busy worker (issue 31: a VM's
    start reads six). Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode(errors="surrogateescape")


def _read(path: Path) -> str:
    try:
        return _slurp(path)
    except OSError as exc:
        raise CgroupError(f"cannot read {path}: {exc.strerror or exc}") from exc


_UNREAD = object()


def _write_unless(path: Path, value: str, held: str | object | None = _UNREAD) -> None:
    """``_write``, unless the file already reads ``value``; ``held``: what
    the caller read from it already (stripped; None: unreadable or known
    to differ), so that it is not read again."""
    if held is _UNREAD:
        held = _text_or_none(path)  # unreadable: the write says what is wrong
    if held == value:
        return
    _write(path, value)


def _write(path: Path, value: str) -> None:
    # One write(2) of the whole value: cgroup files take one value per write.
    # (O_CREAT: cgroupfs refuses to make a file that is not an interface
    # file, which is reported like any refusal; a plain directory shaped like
    # cgroupfs, in the tests, gets the file.)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CgroupError(f"cannot open {path}: {exc.strerror or exc}") from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)


def _procs(directory: Path) -> set[int]:
    try:
        text = _slurp(directory / "cgroup.procs")
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise CgroupError(f"cannot read {directory / 'cgroup.procs'}: {exc.strerror}") from exc
    return {int(line) for line in text.split()}


def _kill_all(directory: Path) -> None:
    for pid in _procs(directory):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _release_when_empty(
    directory: Path, release: Callable[[Path], None], *, timeout: float
) -> None:
    """Run ``release`` on cgroup ``directory`` once no process is left in it
    (killing what is, waiting up to ``timeout``): it frees the memory still
    charged to the cgroup, which would otherwise keep it alive in the kernel
    after its rmdir ("Removal" in the module docstring). Nothing to do when
    the directory is not there; a failure is a warning (only memory is at
    stake, and the rmdir that follows says whether the cgroup is busy)."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    try:
        while _procs(directory):
            if time.monotonic() >= deadline:
                return  # the rmdir's own wait reports the processes
            _kill_all(directory)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        release(directory)
    except CgroupError as exc:
        log.warning("cannot release the memory charged to %s: %s", directory, exc)


def _rmdir_when_empty(directory: Path, *, timeout: float) -> None:
    """Remove cgroup ``directory``, killing what is still inside and waiting
    (up to ``timeout``) for the kernel to let it go."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        try:
            directory.rmdir()
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise CgroupError(f"cannot remove cgroup {directory}: {exc.strerror}") from exc
            if time.monotonic() >= deadline:
                raise CgroupBusyError(
                    f"cgroup {directory} still holds processes {sorted(_procs(directory))} "
                    f"after {timeout:g} s"
                ) from exc
            _kill_all(directory)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        else:
            return


def _left(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


def _rmdir_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()


def _check_name(name: str) -> None:
    if not name or "/" in name or name in (".", "..") or name.startswith("cgroup."):
        raise ValueError(f"not a VM cgroup name: {name!r}")


def _relative(parent: str) -> tuple[bool, str]:
    """(absolute?, the parent without surrounding slashes)."""
    return parent.startswith("/"), parent.strip("/")


class _Base:
    """What both versions share: the worker's directory and its VMs."""

    version = 0

    def __init__(self, directories: Mapping[str, Path], notes: Iterable[str]) -> None:
        # controller -> the worker's directory in the hierarchy that has it
        # (v2: the one directory, under every controller it enforces).
        self._dirs = dict(directories)
        self._notes = tuple(notes)
        self._lock = threading.Lock()

    @property
    def enforceable(self) -> frozenset[str]:
        return frozenset(self._dirs)

    @property
    def notes(self) -> tuple[str, ...]:
        """What this worker's cgroups cannot limit, and why."""
        return self._notes

    def _roots(self) -> list[Path]:
        """The worker's directory in each hierarchy used, once each."""
        return sorted(set(self._dirs.values()))

    def names(self) -> list[str]:
        found: set[str] = set()
        for root in self._roots():
            with contextlib.suppress(FileNotFoundError):
                found.update(e.name for e in root.iterdir() if e.is_dir())
        return sorted(found)

    def processes(self, name: str) -> set[int]:
        _check_name(name)
        pids: set[int] = set()
        for root in self._roots():
            pids |= _procs(root / name)
        return pids

    def remove(self, name: str, *, timeout: float = 5.0) -> None:
        _check_name(name)
        # One deadline for the whole removal: a process that outlives its
        # SIGKILL makes it wait ``timeout`` once, not once per step.
        deadline = time.monotonic() + timeout
        # The release reclaims (milliseconds): outside ``_lock``, which every
        # launch and removal of this worker takes.
        for root in self._roots():
            _release_when_empty(root / name, self._release, timeout=_left(deadline))
        with self._lock:
            for root in self._roots():
                _rmdir_when_empty(root / name, timeout=_left(deadline))

    def close(self) -> None:
        """Remove the worker's directories if no VM cgroup is left in them
        (and the parent's, if that was the last worker in it)."""
        with self._lock:
            for root in self._roots():
                _rmdir_if_empty(root)
                _rmdir_if_empty(root.parent)

    def _release(self, directory: Path) -> None:
        """Free the memory charged to cgroup ``directory`` (no process is
        left in it): see "Removal" in the module docstring."""
        return None

    def oom_kills(self, name: str) -> int:
        """OOM kills counted in the VM's cgroup (each version reads its own
        file)."""
        return 0

    def _kept(self, name: str) -> bool:
        """Whether a launch keeps the VM's cgroup as its last VMM left it
        ("Relaunch" in the module docstring): there in every hierarchy,
        empty, and counting no OOM kill (the kernel's count cannot be reset,
        and ``oom_kills`` means "since the launch"). One that still holds
        processes is refused."""
        for root in self._roots():
            directory = root / name
            if not directory.is_dir():
                return False
            pids = _procs(directory)
            if pids:
                raise CgroupBusyError(
                    f"cgroup {directory} still holds processes {sorted(pids)}: "
                    "the VM's last VMM has not ended"
                )
        return self.oom_kills(name) == 0

    def _release_leftover(self, name: str) -> None:
        """Release what an empty cgroup left by the VM's last VMM holds
        before ``_fresh`` removes it (outside ``_lock``, as in ``remove``)."""
        for root in self._roots():
            directory = root / name
            if directory.is_dir() and not _procs(directory):
                _release_when_empty(directory, self._release, timeout=0)

    def _fresh(self, directory: Path) -> None:
        """``directory`` made anew (with its parents): an empty one left by
        the last VMM that could not be kept is removed first; one that still
        holds processes is refused."""
        if directory.is_dir():
            pids = _procs(directory)
            if pids:
                raise CgroupBusyError(
                    f"cgroup {directory} still holds processes {sorted(pids)}: "
                    "the VM's last VMM has not ended"
                )
            _rmdir_when_empty(directory, timeout=1.0)
        for attempt in range(3):
            try:
                directory.parent.mkdir(parents=True, exist_ok=True)
                directory.mkdir()
            except FileExistsError:
                return
            except FileNotFoundError as exc:
                # Another worker emptied and removed the shared parent
                # between our two mkdirs: make it again.
                if attempt == 2:
                    raise CgroupError(
                        f"cannot make cgroup {directory}: its parent vanishes"
                    ) from exc
            except OSError as exc:
                raise CgroupError(f"cannot make cgroup {directory}: {exc.strerror}") from exc
            else:
                return


class CgroupsV1(_Base):
    """cgroup v1: one hierarchy per controller."""

    version = 1

    def __init__(self, directories: Mapping[str, Path], notes: Iterable[str]) -> None:
        super().__init__(directories, notes)
        self._mounts: list[_Mount] | None = None
        self._memsw: bool | None = None  # swap accounted (``_swap_accounted``)

    def describe(self) -> str:
        held = ", ".join(f"{c} at {d}" for c, d in sorted(self._dirs.items())) or "no controller"
        return f"cgroup v1 ({held})"

    def create(self, name: str, limits: ResourceLimits) -> Placement:
        _check_name(name)
        if self._make_new(name):
            notes = list(self._notes)
            self._limit(name, limits, notes, fresh=True)
            return self._placement(name, notes)
        if self._kept(name):
            try:
                self._limit(name, limits, None)
            except CgroupError as exc:
                log.info("cgroup of VM %s made anew: its limits cannot be rewritten: %s", name, exc)
            else:
                self._restart_counters(name)
                return self._placement(name, list(self._notes))
        notes = list(self._notes)
        self._release_leftover(name)
        with self._lock:
            for root in self._roots():
                self._fresh(root / name)
        self._limit(name, limits, notes)
        return self._placement(name, notes)

    def _make_new(self, name: str) -> bool:
        """The VM's cgroup made in every hierarchy by one ``mkdir`` each,
        True when each was made here: a VM's first launch, the common case
        (one syscall per hierarchy, not the stats of ``_kept``,
        ``_release_leftover`` and ``_fresh``; the worker's own directory is
        made first when missing). False when one is there already or
        cannot be made so simply (a refusal): nothing else is made then,
        and ``create`` goes the long way, which keeps, remakes or makes
        what it finds (one made here is an empty cgroup like any other)
        and says what fails."""
        with self._lock:
            for root in self._roots():
                try:
                    os.mkdir(root / name)
                except FileNotFoundError:
                    try:
                        root.mkdir(parents=True, exist_ok=True)
                        os.mkdir(root / name)
                    except OSError:
                        return False
                except OSError:
                    return False
        return True

    def _swap_accounted(self, memory: Path) -> bool:
        """Whether the kernel accounts swap (``memory.memsw.*`` in the VM's
        memory cgroup ``memory``): fixed at the host's boot, so looked at
        once per worker."""
        if self._memsw is None:
            self._memsw = (memory / "memory.memsw.limit_in_bytes").exists()
        return self._memsw

    def _limit(
        self, name: str, limits: ResourceLimits, notes: list[str] | None, *, fresh: bool = False
    ) -> None:
        """Write ``limits`` into the VM's cgroup (a file that already holds
        its value is left alone; each file is read at most once); what the
        kernel refuses is a note in ``notes``, or raised when ``notes`` is
        None (a kept cgroup: it would keep the last VMM's limit). ``fresh``:
        the cgroup was just made (``_make_new``), so its files hold the
        kernel's defaults: no memory or task limit, no CPU quota (none of
        them a value ``limits`` can hold, so they are written unread), and
        the default period (read: writing it would walk every cpu
        cgroup)."""
        by = {controller: root / name for controller, root in self._dirs.items()}
        if "memory" in by:
            d = by["memory"]
            memory, memsw = d / "memory.limit_in_bytes", d / "memory.memsw.limit_in_bytes"
            value = str(limits.memory_bytes)
            held = None if fresh else _text_or_none(memory)
            steps = [lambda: _write_unless(memory, value, held)]
            if self._swap_accounted(d):
                held_memsw = None if fresh else _text_or_none(memsw)
                steps.append(lambda: _write_unless(memsw, value, held_memsw))
                # The kernel refuses a memory limit above memsw's: a kept
                # cgroup's limits grow memsw first, shrink memory first (a
                # fresh one's memsw is unlimited: memory first).
                current = _as_int(held)
                if current is not None and limits.memory_bytes > current:
                    steps.reverse()
            for step in steps:
                _attempt(notes, step)
        if "cpu" in by:
            d = by["cpu"]
            # Each write of either file walks every cpu cgroup of the host
            # (the kernel's tg_set_bandwidth): one that holds its value
            # already (the kernel's default period in a fresh cgroup; a kept
            # cgroup's unchanged limit) is not written. The quota goes first
            # when the period shrinks, so that the CPUs between the two
            # writes never exceed the old or the new figure (a parent with a
            # quota of its own would refuse them).
            period, quota = d / "cpu.cfs_period_us", d / "cpu.cfs_quota_us"
            held_period = _text_or_none(period)
            held_quota = None if fresh else _text_or_none(quota)
            cpu = [
                lambda: _write_unless(period, str(limits.cpu_period_us), held_period),
                lambda: _write_unless(quota, str(limits.cpu_quota_us), held_quota),
            ]
            old_period = _as_int(held_period)
            if old_period is not None and limits.cpu_period_us < old_period:
                cpu.reverse()
            for step in cpu:
                _attempt(notes, step)
        if "pids" in by:
            pids = by["pids"] / "pids.max"
            held_pids = None if fresh else _text_or_none(pids)
            _attempt(notes, lambda: _write_unless(pids, str(limits.pids), held_pids))

    def _restart_counters(self, name: str) -> None:
        """A kept cgroup's peak usage and limit-hit counts start again for
        the new VMM, as a fresh cgroup's would (best effort: nothing in the
        worker reads them; an operator might)."""
        if "memory" not in self._dirs:
            return
        d = self._dirs["memory"] / name
        for counter in (
            "failcnt",
            "max_usage_in_bytes",
            "memsw.failcnt",
            "memsw.max_usage_in_bytes",
        ):
            path = d / f"memory.{counter}"
            if path.exists():
                with contextlib.suppress(CgroupError):
                    _write(path, "0")

    def _placement(self, name: str, notes: list[str]) -> Placement:
        by = {controller: root / name for controller, root in self._dirs.items()}
        return Placement(
            path=str(by.get("memory", next(iter(by.values()), Path()))),
            # ``tasks``, not ``cgroup.procs``: the joining process has one
            # thread yet (the jail's, before exec), and moving one thread
            # takes no threadgroup lock. Moving a process takes it for
            # writing, which waits for an RCU grace period (7-17 ms on a
            # busy host) and holds back every fork on the host meanwhile
            # (jailed starts ran at 14-18 VMs/s against 49/s unjailed; a
            # ``tasks`` join takes 0.3 ms: docs/BENCHMARKS.md).
            join=tuple(str(d / "tasks") for d in sorted(set(by.values()))),
            notes=tuple(notes),
        )

    def _release(self, directory: Path) -> None:
        # force_empty reclaims the pages charged to the cgroup, writing
        # dirty ones back, and returns once a few tries free nothing more:
        # a page still under writeback then stays, so it is asked again
        # (at most _RELEASE_ROUNDS times) while pages are left. It costs
        # 6-12 ms even with nothing to reclaim (it drains every CPU's page
        # lists and retries): skipped when no page is charged (memory.stat's
        # own cache and rss; not usage, which also counts kernel memory, that
        # moves to the parent by itself, and charges cached per CPU). Only
        # the memory hierarchy has these files.
        force_empty = directory / "memory.force_empty"
        for _ in range(_RELEASE_ROUNDS):
            if not force_empty.exists():
                return
            stat = _fields(directory / "memory.stat")
            if stat and stat.get("cache", 0) + stat.get("rss", 0) == 0:
                return
            _write(force_empty, "0")

    def oom_kills(self, name: str) -> int:
        _check_name(name)
        if "memory" not in self._dirs:
            return 0
        return _field(self._dirs["memory"] / name / "memory.oom_control", "oom_kill")

    def _v1_mounts(self) -> list[_Mount]:
        """The v1 hierarchies, read once (they do not move under a worker)."""
        if self._mounts is None:
            mountinfo = _read(Path("/proc/self/mountinfo"))
            self._mounts = [m for m in _mounts(mountinfo) if m.fstype == "cgroup"]
        return self._mounts

    def read_limits(self, pid: int) -> LimitsRead:
        own = _own_cgroups(_read(Path(f"/proc/{pid}/cgroup")))
        mounts = self._v1_mounts()

        def where(controller: str) -> Path | None:
            for mount in mounts:
                if controller in mount.options and controller in own:
                    return _on_disk(mount, own[controller])
            return None

        memory = where("memory")
        cpu = where("cpu")
        pids = where("pids")
        mem_value = _int_or_none(memory / "memory.limit_in_bytes") if memory else None
        quota = _int_or_none(cpu / "cpu.cfs_quota_us") if cpu else None
        period = _int_or_none(cpu / "cpu.cfs_period_us") if cpu else None
        return LimitsRead(
            version=1,
            path=own.get("memory", ""),
            memory_bytes=mem_value if mem_value is not None and mem_value < _UNLIMITED_V1 else None,
            cpus=quota / period if quota is not None and quota > 0 and period else None,
            pids=_int_or_none(pids / "pids.max") if pids else None,
        )


class CgroupsV2(_Base):
    """cgroup v2: one unified hierarchy."""

    version = 2

    def __init__(
        self, directory: Path, mount: Path, controllers: Iterable[str], notes: Iterable[str]
    ) -> None:
        self._directory = directory
        self._mount = mount
        super().__init__({c: directory for c in controllers}, notes)
        if not self._dirs:
            # No controller to limit with, but a cgroup of its own still
            # tells the VMM's processes apart (the sweep finds them).
            self._placement_only = True
        else:
            self._placement_only = False

    def _roots(self) -> list[Path]:
        return [self._directory]

    def describe(self) -> str:
        held = ", ".join(sorted(self._dirs)) or "no controller"
        return f"cgroup v2 at {self._directory} ({held})"

    def _enable(self, notes: list[str]) -> None:
        """Enable the controllers for the children of every level from the
        mount down to the worker's directory."""
        wanted = set(self._dirs)
        level = self._mount
        chain = [level]
        for part in self._directory.relative_to(self._mount).parts:
            level = level / part
            chain.append(level)
        for index, directory in enumerate(chain):
            if not wanted:
                return
            if index > 0:
                with contextlib.suppress(FileExistsError):
                    directory.mkdir()
            enabled = set((_text_or_none(directory / "cgroup.subtree_control") or "").split())
            for controller in sorted(wanted - enabled):
                try:
                    _write(directory / "cgroup.subtree_control", f"+{controller}")
                except CgroupError as exc:
                    notes.append(f"{controller}: not enforced: {exc.message}")
                    wanted.discard(controller)

    def create(self, name: str, limits: ResourceLimits) -> Placement:
        _check_name(name)
        directory = self._directory / name
        placement = Placement(path=str(directory), join=(str(directory / "cgroup.procs"),))
        if self._kept(name):
            notes = list(self._notes)
            with self._lock:
                self._enable(notes)  # reads only: enabled when the cgroup was made
            try:
                self._limit(directory, limits, notes, strict=True)
            except CgroupError as exc:
                log.info("cgroup of VM %s made anew: its limits cannot be rewritten: %s", name, exc)
            else:
                return dataclasses.replace(placement, notes=tuple(notes))
        notes = list(self._notes)
        self._release_leftover(name)
        with self._lock:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._enable(notes)
            self._fresh(directory)
        self._limit(directory, limits, notes, strict=False)
        return dataclasses.replace(placement, notes=tuple(notes))

    def _limit(
        self, directory: Path, limits: ResourceLimits, notes: list[str], *, strict: bool
    ) -> None:
        """Write ``limits`` into cgroup ``directory`` for the controllers
        ``notes`` do not say are off (a file that holds its value already is
        left alone); a refusal is a note, or raised when ``strict`` (a kept
        cgroup: it would keep the last VMM's limit)."""
        into = None if strict else notes
        held = set(self._dirs) - {n.split(":", 1)[0] for n in notes}
        if "memory" in held:
            _attempt(
                into, lambda: _write_unless(directory / "memory.max", str(limits.memory_bytes))
            )
            if (directory / "memory.swap.max").exists():
                _attempt(into, lambda: _write_unless(directory / "memory.swap.max", "0"))
            if (directory / "memory.oom.group").exists():
                _attempt(into, lambda: _write_unless(directory / "memory.oom.group", "1"))
        if "cpu" in held:
            cpu_max = f"{limits.cpu_quota_us} {limits.cpu_period_us}"
            _attempt(into, lambda: _write_unless(directory / "cpu.max", cpu_max))
        if "pids" in held:
            _attempt(into, lambda: _write_unless(directory / "pids.max", str(limits.pids)))

    def remove(self, name: str, *, timeout: float = 5.0) -> None:
        _check_name(name)
        directory = self._directory / name
        kill = directory / "cgroup.kill"
        with contextlib.suppress(CgroupError):
            if kill.exists() and _procs(directory):
                _write(kill, "1")
        super().remove(name, timeout=timeout)

    def _release(self, directory: Path) -> None:
        # Asks the kernel to reclaim what is charged (memory.current), until
        # nothing is left or a round frees nothing more. EAGAIN: less than
        # asked was reclaimed; what stays is kernel memory, which the kernel
        # moves to the parent when the cgroup goes (it pins nothing).
        reclaim = directory / "memory.reclaim"
        last = None
        for _ in range(_RELEASE_ROUNDS):
            current = _int_or_none(directory / "memory.current")
            if not current or current == last or not reclaim.exists():
                return
            last = current
            try:
                _write(reclaim, str(current))
            except CgroupError as exc:
                if not isinstance(exc.__cause__, OSError) or exc.__cause__.errno != errno.EAGAIN:
                    raise

    def oom_kills(self, name: str) -> int:
        _check_name(name)
        return _field(self._directory / name / "memory.events", "oom_kill")

    def read_limits(self, pid: int) -> LimitsRead:
        own = _own_cgroups(_read(Path(f"/proc/{pid}/cgroup"))).get("")
        if own is None:
            return LimitsRead()
        mount = _Mount(self._mount, "/", "cgroup2", frozenset())
        directory = _on_disk(mount, own)
        if directory is None:
            return LimitsRead()
        memory = _int_or_none(directory / "memory.max")
        cpu_max = _text_or_none(directory / "cpu.max")
        cpus = None
        if cpu_max is not None and not cpu_max.startswith(_MAX):
            quota, _, period = cpu_max.partition(" ")
            cpus = int(quota) / int(period or 100_000)
        return LimitsRead(
            version=2,
            path=own,
            memory_bytes=memory,
            cpus=cpus,
            pids=_int_or_none(directory / "pids.max"),
        )


class NoCgroups:
    """No cgroup hierarchy this worker can use: nothing is limited, and
    every placement says so."""

    version = 0

    def __init__(self, why: str) -> None:
        self._why = why

    @property
    def enforceable(self) -> frozenset[str]:
        return frozenset()

    def describe(self) -> str:
        return f"no cgroups ({self._why})"

    def create(self, name: str, limits: ResourceLimits) -> Placement:
        return Placement(path="", join=(), notes=(f"no cgroup limits: {self._why}",))

    def remove(self, name: str, *, timeout: float = 5.0) -> None:
        return None

    def names(self) -> list[str]:
        return []

    def processes(self, name: str) -> set[int]:
        return set()

    def oom_kills(self, name: str) -> int:
        return 0

    def read_limits(self, pid: int) -> LimitsRead:
        return LimitsRead()

    def close(self) -> None:
        return None


def _attempt(notes: list[str] | None, action: Callable[[], None]) -> None:
    """``action``; a ``CgroupError`` it raises is a note in ``notes``, or
    raised when ``notes`` is None."""
    try:
        action()
    except CgroupError as exc:
        if notes is None:
            raise
        notes.append(exc.message)


def _text_or_none(path: Path) -> str | None:
    try:
        return _slurp(path).strip()
    except OSError:
        return None


def _int_or_none(path: Path) -> int | None:
    return _as_int(_text_or_none(path))


def _as_int(text: str | None) -> int | None:
    if text is None or text == _MAX:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _field(path: Path, key: str) -> int:
    """``key``'s value in a flat-keyed cgroup file (``key value`` lines); 0
    when the file or the key is not there."""
    return _fields(path).get(key, 0)


def _fields(path: Path) -> dict[str, int]:
    """The numeric ``key value`` lines of a flat-keyed cgroup file; empty
    when the file is not there."""
    found = {}
    for line in (_text_or_none(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[name] = int(value)
    return found


def detect(
    parent: str,
    instance: str,
    *,
    mountinfo: str | None = None,
    own: str | None = None,
) -> Cgroups:
    """This host's cgroups for a worker whose VM cgroups go under
    ``parent``/``instance`` (see the module docstring). v2 when the unified
    hierarchy holds every controller of ``CONTROLLERS``; else v1 with those
    that are mounted (the others noted); else v2 without controllers when
    only that is mounted; else none. ``mountinfo`` and ``own`` (the text of
    ``/proc/self/cgroup``) are for tests."""
    _check_name(instance)
    try:
        mountinfo = mountinfo if mountinfo is not None else _read(Path("/proc/self/mountinfo"))
        own = own if own is not None else _read(Path("/proc/self/cgroup"))
    except CgroupError as exc:
        return NoCgroups(exc.message)
    mounts = _mounts(mountinfo)
    own_paths = _own_cgroups(own)
    absolute, rel = _relative(parent)
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    v2_controllers: set[str] = set()
    if unified is not None:
        with contextlib.suppress(OSError):
            v2_controllers = set(_slurp(unified.point / "cgroup.controllers").split())
    if unified is not None and set(CONTROLLERS) <= v2_controllers:
        return _v2(unified, own_paths.get("", "/"), absolute, rel, instance, CONTROLLERS, [])
    directories: dict[str, Path] = {}
    notes: list[str] = []
    for controller in CONTROLLERS:
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if mount is None:
            notes.append(
                f"{controller}: not enforced: no cgroup v1 hierarchy has the {controller} "
                "controller" + (" (nor does the unified one)" if unified is not None else "")
            )
            continue
        base = (
            mount.point
            if absolute
            else _on_disk(mount, own_paths.get(controller, mount.root)) or mount.point
        )
        directories[controller] = base / rel / instance
    if directories:
        return CgroupsV1(directories, notes)
    if unified is not None:
        held = [c for c in CONTROLLERS if c in v2_controllers]
        missing = [
            f"{c}: not enforced: the unified hierarchy does not offer it"
            for c in CONTROLLERS
            if c not in v2_controllers
        ]
        return _v2(unified, own_paths.get("", "/"), absolute, rel, instance, held, missing)
    return NoCgroups(
        "no cgroup hierarchy is mounted in this worker's mount namespace (a worker "
        "started with `ip netns exec` sees a fresh /sys without /sys/fs/cgroup: enter "
        "the network namespace with `nsenter --net=/run/netns/NAME` instead)"
    )


def _v2(
    unified: _Mount,
    own: str,
    absolute: bool,
    rel: str,
    instance: str,
    controllers: Iterable[str],
    notes: list[str],
) -> CgroupsV2:
    if absolute:
        base = unified.point
    else:
        here = _on_disk(unified, own) or unified.point
        # Beside the worker, not under it: v2 allows no processes in a cgroup
        # that hands controllers to its children.
        base = here.parent if here != unified.point else here
    return CgroupsV2(base / rel / instance, unified.point, controllers, notes)
