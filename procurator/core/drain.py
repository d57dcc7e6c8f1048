"""Cordon, drain and the handoff: the pure parts (docs/SCHEDULING.md,
issue 27).

A worker's **mode** is what an operator set on it, stored with the fleet
(``WorkerMode``): ``cordoned`` (it keeps its VMs and takes no new ones) or
``draining`` (its unpinned VMs move elsewhere, ``max_unavailable`` at a
time). No mode is ``ready``. A worker's *state*, as ``status`` shows it,
combines the mode with its lease (``worker_state``): a lost worker is
``lost`` whatever its mode.

A **handoff** (``Handoff``) moves one VM from its worker (the *source*)
to another (the *target*) without a gap: the target is sent the VM in
addition to its own assignment and starts it; only once the target
reports it running with the desired hash is the VM moved in the fleet (an
ordinary generation: the source then stops it). The same VM id runs on
two workers in between. Invariants:

- a VM is in at most one handoff; the VM stays in its source's stored
  assignment until the handoff completes, so a handoff that is called off
  (``cancel``) loses nothing: the target stops its copy;
- a handoff starts and ends with a generation (the target's assignment
  changes both times), so every master hears of it with the fleet;
- at most ``max_unavailable`` VMs of one drain are in handoff at once
  (``next_batch``).

Where both workers move running VMs, a drain moves a VM live instead of
handing it off (``procurator.master.drain.live_or_handoff``): a live move
never runs it twice; it counts against the same bound.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass

from procurator.core.errors import ValidationError
from procurator.core.models import WorkerState

__all__ = [
    "DEFAULT_MAX_UNAVAILABLE",
    "MAX_UNAVAILABLE_LIMIT",
    "Handoff",
    "ModeAction",
    "ModeChange",
    "WorkerMode",
    "change_mode",
    "check_max_unavailable",
    "mode_json",
    "next_batch",
    "worker_state",
]

MAX_UNAVAILABLE_LIMIT = 1000
"""The largest ``--max-unavailable`` a drain takes."""

DEFAULT_MAX_UNAVAILABLE = 1
"""A drain's VMs in handoff at once when not told (also a request without
the bound, from an older client)."""


@dataclass(frozen=True, slots=True)
class WorkerMode:
    """What an operator set on a worker (see the module docstring).
    ``state`` is ``CORDONED`` or ``DRAINING``; a drain's progress is
    ``moved`` of ``total`` unpinned VMs, ``blocked`` says why it cannot go
    on ("" while it can). A finished drain leaves the worker ``CORDONED``
    with its progress."""

    state: WorkerState
    op_id: str
    since_unix_ms: int
    max_unavailable: int = 1
    moved: int = 0
    total: int = 0
    blocked: str = ""

    def __post_init__(self) -> None:
        if self.state not in (WorkerState.CORDONED, WorkerState.DRAINING):
            raise ValueError(f"a worker mode is cordoned or draining, not {self.state.value}")


@dataclass(frozen=True, slots=True)
class Handoff:
    """VM ``vm_id`` moving from ``source`` to ``target`` (see the module
    docstring); ``generation`` is the one that started it: the target's
    report of an older observed generation says nothing about it."""

    vm_id: str
    source: str
    target: str
    op_id: str
    generation: int
    started_unix_ms: int


def mode_json(mode: WorkerMode | None) -> dict[str, object] | None:
    """A worker's mode as ``status --json`` and the mode commands print it."""
    if mode is None:
        return None
    return {
        "state": mode.state.value,
        "op_id": mode.op_id,
        "since_unix_ms": mode.since_unix_ms,
        "max_unavailable": mode.max_unavailable,
        "moved": mode.moved,
        "total": mode.total,
        "blocked": mode.blocked,
    }


def check_max_unavailable(value: int) -> str | None:
    """Why ``value`` is not a drain's ``max_unavailable``, or None."""
    if not 1 <= value <= MAX_UNAVAILABLE_LIMIT:
        return f"max unavailable must be 1-{MAX_UNAVAILABLE_LIMIT}, not {value}"
    return None


def worker_state(mode: WorkerMode | None, *, lost: bool) -> WorkerState:
    """The state ``status`` shows: ``lost`` (its lease expired) first,
    then the operator's mode, else ``ready``. A worker away but not yet
    lost shows its mode or ``ready``: its connection column says it is
    away."""
    if lost:
        return WorkerState.LOST
    return mode.state if mode is not None else WorkerState.READY


def next_batch(moves: Sequence[str], in_flight: int, max_unavailable: int) -> list[str]:
    """The VMs (ids, from ``moves``: the scheduler's moves off a draining
    worker, in its order) whose handoffs start now: as many as keep the
    drain's handoffs in flight at most ``max_unavailable``, the first ones
    of ``moves``. Nothing while ``in_flight`` is at or over the bound (a
    bound lowered mid-drain waits for handoffs to finish)."""
    room = max(0, max_unavailable - in_flight)
    return list(moves[:room])


class ModeAction(enum.Enum):
    """What ``procurator worker cordon|uncordon|drain`` asks."""

    CORDON = "cordon"
    UNCORDON = "uncordon"
    DRAIN = "drain"


@dataclass(frozen=True, slots=True)
class ModeChange:
    """The answer to a ``ModeAction``: the worker's mode after it (None:
    ready), whether it changed, and one line for the operator."""

    worker_id: str
    mode: WorkerMode | None
    changed: bool
    message: str


def change_mode(
    worker_id: str,
    current: WorkerMode | None,
    action: ModeAction,
    *,
    op_id: str,
    now_ms: int,
    max_unavailable: int = 1,
    total: int = 0,
    pinned: int = 0,
) -> ModeChange:
    """The mode after ``action`` on a worker whose mode is ``current``.
    Idempotent: cordoning a cordoned (or draining) worker, uncordoning a
    ready one, draining a draining one with the same bound change nothing.
    ``total``: the worker's unpinned VMs (what a new drain moves);
    ``pinned``: its pinned VMs (which stay)."""
    if action is ModeAction.CORDON:
        if current is not None:
            return ModeChange(
                worker_id, current, False, f"worker {worker_id} is {current.state.value} already"
            )
        mode = WorkerMode(WorkerState.CORDONED, op_id, now_ms)
        return ModeChange(
            worker_id, mode, True, f"worker {worker_id} cordoned: it takes no new VMs"
        )
    if action is ModeAction.UNCORDON:
        if current is None:
            return ModeChange(worker_id, None, False, f"worker {worker_id} is ready already")
        ended = (
            f" (drain {current.op_id} ended at {current.moved}/{current.total} moved)"
            if current.state is WorkerState.DRAINING
            else ""
        )
        return ModeChange(
            worker_id, None, True, f"worker {worker_id} uncordoned: it takes new VMs{ended}"
        )
    if (problem := check_max_unavailable(max_unavailable)) is not None:
        raise ValidationError(problem)
    stay = f"; {pinned} pinned VM(s) stay" if pinned else ""
    if current is not None and current.state is WorkerState.DRAINING:
        if current.max_unavailable == max_unavailable:
            return ModeChange(
                worker_id,
                current,
                False,
                f"worker {worker_id} is draining already (op {current.op_id}, "
                f"{current.moved}/{current.total} moved)",
            )
        mode = dataclasses.replace(current, max_unavailable=max_unavailable)
        return ModeChange(
            worker_id,
            mode,
            True,
            f"worker {worker_id}: drain {current.op_id} goes on with max unavailable "
            f"{max_unavailable}",
        )
    mode = WorkerMode(WorkerState.DRAINING, op_id, now_ms, max_unavailable, 0, total)
    return ModeChange(
        worker_id,
        mode,
        True,
        f"worker {worker_id} draining (op {op_id}): {total} unpinned VM(s) to move, "
        f"at most {max_unavailable} at once{stay}",
    )
