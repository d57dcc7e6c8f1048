"""A worker's VM snapshots: create, list, delete, restore.

A snapshot is the guest's memory and device state plus a point-in-time copy
of each writable disk, taken while the guest is paused (docs/SNAPSHOTS.md).
Layout, in the VM's directory (``procurator.worker.state``)::

    vms/<vm>/snapshots/<name>/meta.json     SnapshotInfo: hash, image, size, time, op id
    vms/<vm>/snapshots/<name>/state/        what the VMM saved (QEMU: ``memory``)
    vms/<vm>/snapshots/<name>/disks/<i>.img the VM's writable disk i, as it was
    vms/<vm>/snapshots/.<name>.partial/     one being written (deleted if found)
    vms/<vm>/run/snapshot.partial/          a VMM that writes its state itself
    vms/<vm>/run/restore/                   (cloud-hypervisor) works here: in its jail

Invariants:

- **The jail is not widened.** ``snapshots/`` is beside ``run/``, so a
  jailed VMM never sees a stored snapshot (it could rewrite what the next
  restore loads). A QEMU gets its state file as a descriptor the worker
  opened; a VMM that writes and reads its state itself (cloud-hypervisor,
  ``Capabilities.vmm_writes_state``) works in a directory inside its
  ``run/``, which the worker moves out after a snapshot and fills before a
  restore.
- **A snapshot is whole or absent.** It is assembled under a ``.partial``
  name, its files made durable, and renamed into place with its
  ``meta.json`` written last; a partial one found later is deleted, and
  ``list`` shows only whole ones.
- **The VM runs on.** Creating one pauses the guest (when it ran) and
  resumes it whatever happened, so a snapshot that fails halfway leaves the
  VM as it was, and the error says why.
- **One actor touches the VMM.** Create, restore and delete run as
  jobs in the VM's supervisor's turns (``VmManager.run_job``), between two of
  its steps, holding the VM's op_lock: no health check sees the VM paused
  by a snapshot, no replacement starts during one.
- **Restore only onto the same image** (``core.snapshot.restore_problem``)
  unless forced; never onto another driver's state. The disk copies are put
  back first, then a VMM is launched from the saved state in place of the
  running one.
- **Quotas** (``core.snapshot.SnapshotQuota``) are checked before a
  snapshot with its estimated size and after with its real size; creates of
  one worker are counted together (``_reserved``, under ``_lock``, a leaf
  lock held only around the count).

The guest's clock after a restore is the clock of the snapshot: neither
backend here can set it without a guest agent, so the ``restored`` event
and docs/SNAPSHOTS.md say so.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from procurator import durable
from procurator.core.errors import (
    NotFoundError,
    PermanentError,
    ProcuratorError,
    TemporaryError,
    ValidationError,
)
from procurator.core.models import EventKind, PowerState
from procurator.core.snapshot import (
    SnapshotAction,
    SnapshotInfo,
    SnapshotQuota,
    SnapshotRequest,
    check_name,
    check_quota,
    restore_problem,
)
from procurator.core.vmdef import Disk
from procurator.nix._disk import clone_or_copy
from procurator.worker.manager import VmManager
from procurator.worker.state import write_json_atomic
from procurator.worker.supervisor import JobContext
from procurator.worker.vmm.base import VmmError, VmState

__all__ = ["SnapshotNode", "SnapshotService", "default_name"]

log = logging.getLogger(__name__)

SNAPSHOTS_DIR = "snapshots"
_META = "meta.json"
_STATE = "state"
_DISKS = "disks"
_STAGE_SAVE = "snapshot.partial"
_STAGE_RESTORE = "restore"


def default_name(unix_ms: int) -> str:
    """A snapshot's name when none is given: its UTC time, to the second."""
    return time.strftime("s%Y%m%d-%H%M%S", time.gmtime(unix_ms / 1000))


@dataclass(frozen=True, slots=True)
class _Reservation:
    vm_id: str
    name: str
    size_bytes: int


class SnapshotService:
    """The snapshots of the VMs ``manager`` runs. Thread-safe; every
    method blocks (call it through ``trio.to_thread.run_sync``)."""

    def __init__(
        self,
        manager: VmManager,
        *,
        quota: SnapshotQuota | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.manager = manager
        self.quota = quota or SnapshotQuota()
        self.wall_clock = wall_clock
        self._lock = threading.Lock()  # leaf: _reserved only
        self._reserved: list[_Reservation] = []

    # -- reading ---------------------------------------------------------------

    def _dir(self, vm_id: str) -> Path:
        return self.manager.state.vm_dir(vm_id) / SNAPSHOTS_DIR

    def list(self, vm_id: str | None = None) -> list[SnapshotInfo]:
        """The whole snapshots of one VM, or of every VM of this worker,
        oldest first. Unreadable ones are logged and left out."""
        vm_ids = [vm_id] if vm_id is not None else self.manager.state.vm_ids()
        found: list[SnapshotInfo] = []
        for vm in vm_ids:
            directory = self._dir(vm)
            try:
                entries = sorted(directory.iterdir())
            except FileNotFoundError:
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                info = self._read_meta(vm, entry)
                if info is not None:
                    found.append(info)
        return sorted(found, key=lambda s: (s.created_unix_ms, s.vm_id, s.name))

    def _read_meta(self, vm_id: str, directory: Path) -> SnapshotInfo | None:
        try:
            info = SnapshotInfo.from_json(json.loads((directory / _META).read_text()))
        except FileNotFoundError:
            return None  # not whole yet (or never): not a snapshot
        except (OSError, ValueError, ProcuratorError) as exc:
            log.warning("snapshot %s: unreadable, left out: %s", directory, exc)
            return None
        if (info.vm_id, info.name) != (vm_id, directory.name):
            log.warning("snapshot %s: its metadata names %s/%s", directory, info.vm_id, info.name)
            return None
        return info

    def get(self, vm_id: str, name: str) -> SnapshotInfo:
        check_name(vm_id, name)
        info = self._read_meta(vm_id, self._dir(vm_id) / name)
        if info is None:
            raise NotFoundError(f"VM {vm_id} has no snapshot {name!r} on this worker")
        return info

    # -- create ----------------------------------------------------------------

    def create(self, vm_id: str, name: str = "", *, op_id: str = "") -> SnapshotInfo:
        """Snapshot the running (or paused) VM ``vm_id`` as ``name`` (by
        default its time). Raises ``ValidationError`` (a bad name, a name
        taken), ``NotFoundError`` (no such VM), ``LimitExceededError`` (a
        quota), ``PermanentError`` (no VMM runs the VM) or the VMM's error
        (the VM is resumed all the same)."""
        name = name or default_name(int(self.wall_clock() * 1000))
        check_name(vm_id, name)
        return self.manager.run_job(
            vm_id, f"snapshot {name}", lambda ctx: self._create(ctx, name, op_id)
        )

    def _create(self, ctx: JobContext, name: str, op_id: str) -> SnapshotInfo:
        spec, handle = ctx.spec, ctx.handle
        if spec is None or handle is None:
            raise PermanentError(f"VM {ctx.vm_id} has no running VMM to snapshot (start it first)")
        directory = self._dir(ctx.vm_id)
        final = directory / name
        if final.exists():
            raise ValidationError(f"VM {ctx.vm_id} already has a snapshot named {name!r}")
        disks = _writable(spec.definition.disks)
        estimate = spec.definition.memory.size + sum(_size_of(Path(d.path)) for _, d in disks)
        reservation = self._reserve(ctx.vm_id, name, estimate)
        partial = directory / f".{name}.partial"
        try:
            shutil.rmtree(partial, ignore_errors=True)
            # snapshots/ (and snapshots/<vm>) may be new: each a name the
            # renamed snapshot's own depends on.
            durable.make_dirs(directory)
            (partial / _DISKS).mkdir(parents=True, mode=0o700)
            started = time.monotonic()
            created_ms = int(self.wall_clock() * 1000)
            self._save(ctx, partial, disks)
            seconds = time.monotonic() - started
            # Every file (the VMM's state is written without fsync) and
            # every directory of the set: the metadata written next must
            # never name state a power loss could cut short.
            size = durable.fsync_tree(partial)
            # Its real size against the quotas: the estimate may be short
            # (a VMM's state beyond the guest's memory).
            existing = self.list()
            with self._lock:
                others = [*existing, *self._reserved_infos(exclude=reservation)]
            check_quota(self.quota, others, ctx.vm_id, size)
            info = SnapshotInfo(
                vm_id=ctx.vm_id,
                name=name,
                hash=spec.hash,
                image=spec.image,
                size_bytes=size,
                created_unix_ms=created_ms,
                op_id=op_id,
                driver=ctx.driver.name,
            )
            write_json_atomic(partial / _META, info.to_json())
            partial.rename(final)
            durable.fsync_dir(directory)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            with self._lock:
                if reservation in self._reserved:
                    self._reserved.remove(reservation)
        ctx.event(
            EventKind.SNAPSHOTTED,
            f"snapshot {name} taken ({size / (1 << 20):.1f} MiB, guest paused {seconds:.2f} s)",
        )
        return info

    def _reserve(self, vm_id: str, name: str, estimate: int) -> _Reservation:
        """Count a snapshot being taken against the quotas (refused when it
        would break one)."""
        existing = self.list()
        with self._lock:
            check_quota(self.quota, [*existing, *self._reserved_infos()], vm_id, estimate)
            reservation = _Reservation(vm_id, name, estimate)
            self._reserved.append(reservation)
        return reservation

    def _reserved_infos(self, exclude: _Reservation | None = None) -> builtins.list[SnapshotInfo]:
        """Snapshots being taken, as infos for the quota (under _lock)."""
        return [
            SnapshotInfo(r.vm_id, r.name, "-", "", r.size_bytes, 0)
            for r in self._reserved
            if r is not exclude
        ]

    def _save(self, ctx: JobContext, partial: Path, disks: builtins.list[tuple[int, Disk]]) -> None:
        """Pause (when running), save the state, copy the disks, resume
        (when it ran), whatever happened in between."""
        driver, handle, t = ctx.driver, ctx.handle, ctx.timeouts
        assert handle is not None
        was_running = driver.state(handle, timeout=t.api) is VmState.RUNNING
        if was_running:
            driver.pause(handle, timeout=t.api)
        ctx.forget_state()
        try:
            target = partial / _STATE
            if driver.capabilities.vmm_writes_state:
                stage = ctx.paths.vmm_dir / _STAGE_SAVE
                shutil.rmtree(stage, ignore_errors=True)
                _make_owned_like(stage, ctx.paths.vmm_dir)
                try:
                    driver.save_state(handle, stage, timeout=t.boot)
                    stage.rename(target)
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
            else:
                target.mkdir(mode=0o700)
                driver.save_state(handle, target, timeout=t.boot)
            for index, disk in disks:
                clone_or_copy(Path(disk.path), partial / _DISKS / f"{index}.img")
        except OSError as exc:
            raise VmmError(f"VM {ctx.vm_id}: cannot write the snapshot: {exc}") from exc
        finally:
            if was_running:
                try:
                    driver.resume(handle, timeout=t.api)
                except ProcuratorError as exc:
                    # The supervisor's next health check finds the VM paused
                    # and resumes it (its desired power): say so, go on.
                    log.warning("VM %s: resume after the snapshot: %s", ctx.vm_id, exc)

    # -- delete ----------------------------------------------------------------

    def delete(self, vm_id: str, name: str) -> SnapshotInfo:
        """Delete snapshot ``name`` of ``vm_id`` (``NotFoundError`` if
        there is none), in the VM's turns: never during its restore."""
        check_name(vm_id, name)

        def run(ctx: JobContext) -> SnapshotInfo:
            info = self.get(vm_id, name)
            directory = self._dir(vm_id) / name
            # Renamed away first: a crash mid-delete leaves a .partial,
            # swept later, never a snapshot with files missing.
            doomed = self._dir(vm_id) / f".{name}.partial"
            shutil.rmtree(doomed, ignore_errors=True)
            directory.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            return info

        return self.manager.run_job(vm_id, f"delete snapshot {name}", run)

    # -- restore ---------------------------------------------------------------

    def restore(
        self, vm_id: str, name: str, *, force: bool = False, op_id: str = ""
    ) -> SnapshotInfo:
        """Put VM ``vm_id`` back as snapshot ``name`` found it: its disks,
        its memory and devices; it then runs (or is paused again, if that
        is its desired power). Refused (``ValidationError``) when the
        snapshot is of another image and not ``force``, or of another
        driver."""
        check_name(vm_id, name)
        return self.manager.run_job(
            vm_id, f"restore snapshot {name}", lambda ctx: self._restore(ctx, name, force, op_id)
        )

    def _restore(self, ctx: JobContext, name: str, force: bool, op_id: str) -> SnapshotInfo:
        spec = ctx.spec
        if spec is None:
            raise PermanentError(f"VM {ctx.vm_id} is being removed")
        if spec.power is PowerState.STOPPED:
            raise PermanentError(
                f"VM {ctx.vm_id}'s desired power is stopped: start it before restoring"
            )
        info = self.get(ctx.vm_id, name)
        problem = restore_problem(info, spec.hash, ctx.driver.name, force=force)
        if problem is not None:
            raise ValidationError(f"VM {ctx.vm_id}: restore refused: {problem}")
        source = self._dir(ctx.vm_id) / name
        disks = _writable(spec.definition.disks)
        saved = sorted(p.name for p in (source / _DISKS).iterdir())
        if saved != [f"{i}.img" for i, _ in disks]:
            raise ValidationError(
                f"VM {ctx.vm_id}: restore refused: snapshot {name} holds disks {saved}, "
                f"the VM has {len(disks)} writable disks"
            )
        how = ctx.stop_vmm(f"restoring snapshot {name}")
        try:
            for index, disk in disks:
                _put_back(source / _DISKS / f"{index}.img", Path(disk.path))
            state = source / _STATE
            stage: Path | None = None
            if ctx.driver.capabilities.vmm_writes_state:
                stage = ctx.paths.vmm_dir / _STAGE_RESTORE
                shutil.rmtree(stage, ignore_errors=True)
                shutil.copytree(state, stage)
                state = stage  # given to the VMM's uid by its jail at launch
        except OSError as exc:
            raise VmmError(f"VM {ctx.vm_id}: cannot put snapshot {name} back: {exc}") from exc
        age = max(0.0, self.wall_clock() - info.created_unix_ms / 1000)
        try:
            ctx.launch_restored(
                state,
                f"restored snapshot {name} (op {op_id or '-'}; taken by op {info.op_id or '-'}; "
                f"old VMM stopped by {how}); "
                f"the guest's clock is {age:.0f} s behind until the guest corrects it "
                "(no guest agent)",
            )
        finally:
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
        log.info("VM %s: restored snapshot %s (op %s)", ctx.vm_id, name, op_id or "-")
        return info

    # -- housekeeping ----------------------------------------------------------

    def sweep(self) -> builtins.list[str]:
        """Delete snapshots a crash left half-written (at worker start,
        before any create runs)."""
        swept: list[str] = []
        for vm_id in self.manager.state.vm_ids():
            directory = self._dir(vm_id)
            with contextlib.suppress(FileNotFoundError):
                for entry in directory.iterdir():
                    if entry.name.startswith(".") and entry.name.endswith(".partial"):
                        shutil.rmtree(entry, ignore_errors=True)
                        swept.append(f"{vm_id}/{entry.name}")
        return swept


def _writable(disks: tuple[Disk, ...]) -> list[tuple[int, Disk]]:
    """The VM's writable disks with their index (the read-only ones are
    its image's, immutable in the store)."""
    return [(i, d) for i, d in enumerate(disks) if not d.readonly]


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _make_owned_like(directory: Path, parent: Path) -> None:
    """Make ``directory`` (0700) owned like ``parent``: the VMM's uid owns
    its ``run/`` directory, and must be able to write in this one."""
    directory.mkdir(mode=0o700)
    st = parent.stat()
    os.chown(directory, st.st_uid, st.st_gid)


def _put_back(copy: Path, disk: Path) -> None:
    """Replace the VM's disk ``disk`` by the snapshot's ``copy`` (no VMM
    runs): a new file made beside it, then renamed over it, with the old
    one's owner and mode."""
    st = disk.stat()
    fresh = disk.with_name(f".{disk.name}.restore")
    fresh.unlink(missing_ok=True)
    clone_or_copy(copy, fresh)
    os.chown(fresh, st.st_uid, st.st_gid)
    os.chmod(fresh, st.st_mode & 0o7777)
    os.replace(fresh, disk)


class SnapshotNode:
    """The worker's side of the master's snapshot calls (``Node.snapshot``,
    ``Node.listSnapshots``; ``core.snapshot.SnapshotCalls``): the
    ``SnapshotService`` of the worker's VmManager, each call in a thread
    (at most ``concurrency`` at once). Bound late (``attach``): the service
    exists once the runtime has made its VmManager; until then calls are
    refused as temporary. Snapshots a crash left half-written are swept
    before the first call is served."""

    def __init__(self, *, concurrency: int = 2) -> None:
        self._service: SnapshotService | None = None
        self._limiter = trio.CapacityLimiter(concurrency)
        self._swept = False

    def attach(self, service: SnapshotService) -> None:
        self._service = service

    async def _ready(self) -> SnapshotService:
        service = self._service
        if service is None:
            raise TemporaryError("this worker's VMs are not recovered yet", delay=1.0)
        if not self._swept:
            self._swept = True
            swept = await trio.to_thread.run_sync(service.sweep, limiter=self._limiter)
            if swept:
                log.info("deleted half-written snapshots: %s", ", ".join(swept))
        return service

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        service = await self._ready()
        request.check()
        if request.action is SnapshotAction.CREATE:
            return await trio.to_thread.run_sync(
                lambda: service.create(request.vm_id, request.name, op_id=request.op_id),
                limiter=self._limiter,
            )
        if request.action is SnapshotAction.RESTORE:
            return await trio.to_thread.run_sync(
                lambda: service.restore(
                    request.vm_id, request.name, force=request.force, op_id=request.op_id
                ),
                limiter=self._limiter,
            )
        return await trio.to_thread.run_sync(
            lambda: service.delete(request.vm_id, request.name), limiter=self._limiter
        )

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        service = await self._ready()
        found = await trio.to_thread.run_sync(
            lambda: service.list(vm_id or None), limiter=self._limiter
        )
        return tuple(found)
