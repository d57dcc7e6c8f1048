"""Snapshots of a VM: what one is, the quotas, and when one may be restored.

A snapshot is the guest's memory and device state (written by the VMM) plus
a point-in-time copy of each of the VM's writable disks, taken while the
guest is paused, kept by the worker that runs the VM
(``procurator.worker.snapshots``). This module holds the pure rules the
worker applies and the values the wire and the master carry:

- ``SnapshotInfo``: a snapshot's metadata (``meta.json`` on the worker; a
  row in the master's store).
- ``SnapshotQuota`` and ``quota_problem``: a per-VM and a per-worker bound
  on the number of snapshots and their bytes. A new snapshot is checked
  against them twice: before it is taken, with its estimated size (the
  guest's memory plus its writable disks), and once it is written, with
  its real size (a snapshot that turns out too big is deleted and refused).
- ``restore_problem``: a snapshot is restored only onto the image it was
  taken from (the same hash) unless forced: the memory image of one
  kernel loaded under another's disk or devices is a guest that crashes
  later, not at once.

Snapshot names follow the VM id's rule (``validation.check_snapshot_name``):
they become directory names, so no name can leave its VM's directory.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.validation import (
    check_hash,
    check_snapshot_name,
    check_vm_id,
)

__all__ = [
    "SnapshotAction",
    "SnapshotCalls",
    "SnapshotInfo",
    "SnapshotQuota",
    "SnapshotRequest",
    "check_name",
    "check_quota",
    "quota_problem",
    "restore_problem",
]

_MIB = 1 << 20
_GIB = 1 << 30


def check_name(vm_id: str, name: str) -> None:
    """Raise ``ValidationError`` unless ``vm_id`` and ``name`` are valid."""
    problems = [f"vm: {p}" for p in (check_vm_id(vm_id),) if p is not None] + [
        f"name: {p}" for p in (check_snapshot_name(name),) if p is not None
    ]
    if problems:
        raise ValidationError("invalid snapshot reference", details=problems)


@dataclass(frozen=True, slots=True)
class SnapshotInfo:
    """One snapshot. ``hash`` and ``image``: the VM's identity and store
    path when it was taken; ``size_bytes``: what it holds on the worker's
    disk (state and disk copies, apparent size); ``created_unix_ms``: when
    the guest was paused for it; ``op_id``: the operation that took it;
    ``driver``: the VMM that wrote the state (only it can read it back);
    ``worker_id``: where it lives ("" on the worker itself)."""

    vm_id: str
    name: str
    hash: str
    image: str
    size_bytes: int
    created_unix_ms: int
    op_id: str = ""
    driver: str = ""
    worker_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            "name": self.name,
            "hash": self.hash,
            "image": self.image,
            "size_bytes": self.size_bytes,
            "created_unix_ms": self.created_unix_ms,
            "op_id": self.op_id,
            "driver": self.driver,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, worker_id: str = "") -> SnapshotInfo:
        """Read ``meta.json``; ``ValidationError`` when it breaks a rule."""
        try:
            info = cls(
                vm_id=str(data["vm_id"]),
                name=str(data["name"]),
                hash=str(data["hash"]),
                image=str(data.get("image", "")),
                size_bytes=int(data["size_bytes"]),
                created_unix_ms=int(data["created_unix_ms"]),
                op_id=str(data.get("op_id", "")),
                driver=str(data.get("driver", "")),
                worker_id=worker_id,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError(f"snapshot metadata is malformed: {exc!r}") from exc
        check_name(info.vm_id, info.name)
        problem = check_hash(info.hash)
        if problem is not None or info.size_bytes < 0:
            raise ValidationError(
                f"snapshot {info.vm_id}/{info.name}: metadata is malformed",
                details=[problem or f"size_bytes {info.size_bytes} is negative"],
            )
        return info


class SnapshotAction(enum.Enum):
    CREATE = "create"
    DELETE = "delete"
    RESTORE = "restore"


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """One snapshot operation (``Control.snapshot``, forwarded by the master
    to the VM's worker as ``Node.snapshot``). ``name`` "" with create: named
    after its time; ``force``: restore another hash's snapshot; ``op_id``:
    the master's operation, set when it forwards."""

    action: SnapshotAction
    vm_id: str
    name: str = ""
    force: bool = False
    op_id: str = ""

    def check(self) -> None:
        """``ValidationError`` naming what is wrong with the request."""
        if self.action is SnapshotAction.CREATE and not self.name:
            problem = check_vm_id(self.vm_id)
            if problem is not None:
                raise ValidationError("invalid snapshot reference", details=[f"vm: {problem}"])
            return
        check_name(self.vm_id, self.name)


@dataclass(frozen=True, slots=True)
class SnapshotQuota:
    """Bounds on a worker's snapshots (0: no bound). Defaults: a few
    snapshots of a VM, bytes enough for a handful of small guests."""

    max_per_vm: int = 8
    max_bytes_per_vm: int = 16 * _GIB
    max_per_worker: int = 64
    max_bytes_per_worker: int = 64 * _GIB


def _size(n: int) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB else f"{n / _MIB:.1f} MiB"


def quota_problem(
    quota: SnapshotQuota, existing: Iterable[SnapshotInfo], vm_id: str, adding_bytes: int
) -> str | None:
    """Why one more snapshot of ``vm_id`` of ``adding_bytes`` bytes would
    break ``quota`` given the worker's ``existing`` snapshots (those being
    taken included); None when it fits."""
    every = list(existing)
    mine = [s for s in every if s.vm_id == vm_id]
    mine_bytes = sum(s.size_bytes for s in mine)
    all_bytes = sum(s.size_bytes for s in every)
    if quota.max_per_vm and len(mine) + 1 > quota.max_per_vm:
        return f"VM {vm_id} already has {len(mine)} snapshots (at most {quota.max_per_vm})"
    if quota.max_bytes_per_vm and mine_bytes + adding_bytes > quota.max_bytes_per_vm:
        return (
            f"VM {vm_id}'s snapshots would take {_size(mine_bytes + adding_bytes)} "
            f"(at most {_size(quota.max_bytes_per_vm)}; {_size(mine_bytes)} used, "
            f"this one {_size(adding_bytes)})"
        )
    if quota.max_per_worker and len(every) + 1 > quota.max_per_worker:
        return f"the worker already keeps {len(every)} snapshots (at most {quota.max_per_worker})"
    if quota.max_bytes_per_worker and all_bytes + adding_bytes > quota.max_bytes_per_worker:
        return (
            f"the worker's snapshots would take {_size(all_bytes + adding_bytes)} "
            f"(at most {_size(quota.max_bytes_per_worker)}; {_size(all_bytes)} used, "
            f"this one {_size(adding_bytes)})"
        )
    return None


def check_quota(
    quota: SnapshotQuota, existing: Iterable[SnapshotInfo], vm_id: str, adding_bytes: int
) -> None:
    """``quota_problem`` as a ``LimitExceededError``."""
    problem = quota_problem(quota, existing, vm_id, adding_bytes)
    if problem is not None:
        raise LimitExceededError(f"snapshot refused: {problem}")


def restore_problem(
    info: SnapshotInfo, current_hash: str, driver: str, *, force: bool
) -> str | None:
    """Why ``info`` may not be restored onto a VM that now has
    ``current_hash`` under ``driver`` (None: it may). Another driver's
    state cannot be read at all, force or not."""
    if info.driver and driver and info.driver != driver:
        return f"snapshot {info.name} was written by {info.driver}; this worker runs {driver}"
    if info.hash != current_hash and not force:
        return (
            f"snapshot {info.name} was taken of {info.hash}, the VM now is {current_hash}: "
            "restore it with --force to load it anyway"
        )
    return None


class SnapshotCalls(Protocol):
    """Snapshot operations as a worker's ``Node`` serves them and as the
    master's ``Control`` forwards them (async; errors are ours)."""

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        """Carry out ``request``; the snapshot created, deleted or restored."""
        ...

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        """The snapshots of one VM ("" for all), oldest first."""
        ...
