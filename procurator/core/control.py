"""The plain values of the master's ``Control`` interface: an apply and its
result, the fleet's status, one VM's description, events as the master
numbers them.

What the master's service answers and what a client prints, with no wire
in between: ``procurator.rpc`` converts them to and from Cap'n Proto
(``rpc/convert.py``), the master (``procurator.master``) makes them, the
command (``procurator.cli``) reads them. Every collection is a tuple;
values are immutable and safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass

from procurator.core.drain import WorkerMode
from procurator.core.models import (
    Fleet,
    VmAssignment,
    VmEvent,
    VmPlacement,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerState,
    WorkerStatus,
)
from procurator.core.move import Move

__all__ = [
    "ApplyRequest",
    "ApplyResult",
    "FleetStatus",
    "VmDescription",
    "WorkerConnection",
    "WorkerEvent",
]


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    worker_id: str
    event: VmEvent
    seq: int = 0  # the master's receipt order (see the schema)


@dataclass(frozen=True, slots=True)
class ApplyRequest:
    """The parameters of ``Control.apply``."""

    fleet: Fleet
    expected_generation: int | None = None  # None: any
    dry_run: bool = False
    request_id: str = ""  # "" for none; else as ``validation.check_request_id`` allows
    # While a rollout is under way: end it and apply (docs/ROLLOUTS.md).
    supersede: bool = False


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """What an apply did (or, with ``dry_run``, would do)."""

    generation: int
    changed: bool
    diffs: tuple[WorkerDiff, ...]
    op_id: str
    dry_run: bool = False
    # True when the apply's request id matched one the master had already
    # committed: this is that apply's result, nothing was applied again.
    replayed: bool = False
    # The unpinned VMs this apply places or moves (not those that keep
    # their worker), each with its reason; () for a replay.
    placed: tuple[VmPlacement, ...] = ()
    # The rollout the apply started ("" for none: docs/ROLLOUTS.md).
    rollout_id: str = ""


@dataclass(frozen=True, slots=True)
class WorkerConnection:
    """The master's view of one worker."""

    worker_id: str
    connected: bool
    since_unix_ms: int  # when it (dis)connected; 0: never seen
    desired_generation: int
    status: WorkerStatus | None  # last reported, None before the first report
    last_report_unix_ms: int
    vm_count: int
    desired_vms: tuple[VmAssignment, ...] = ()
    info: WorkerInfo | None = None  # as it last registered; None: never connected
    # ready, lost (lease expired), cordoned or draining (procurator.core.drain);
    # None from a master older than cordon and drain.
    state: WorkerState | None = None
    renewed_unix_ms: int = 0  # its lease's last renewal (database clock); 0: never
    renewed_ago_ms: int = -1  # how long ago, on the database's clock; -1: unknown
    mode: WorkerMode | None = None  # cordoned or draining, with a drain's progress
    handoffs: int = 0  # its VMs being handed off to other workers now


@dataclass(frozen=True, slots=True)
class FleetStatus:
    generation: int
    workers: tuple[WorkerConnection, ...]
    # The master's change index when it answered: pass it back to block
    # until something changes (``ControlClient.status(wait_index=...)``).
    change_index: int = 0


@dataclass(frozen=True, slots=True)
class VmDescription:
    """Everything the master knows about one VM (``procurator describe``)."""

    vm_id: str
    fleet_generation: int
    worker_id: str  # assigned to; "" when not desired anywhere
    desired_generation: int  # of that worker's assignment; 0 when not desired
    desired_op_id: str  # op id of the apply that made that assignment
    desired: VmAssignment | None
    observed_by: str  # the worker whose last status shows the VM; "" if none
    worker_connected: bool
    observed_generation: int  # of the assigned worker (else of observed_by)
    status: VmStatus | None
    events: tuple[WorkerEvent, ...] = ()
    change_index: int = 0  # as in FleetStatus
    # Its move under way, else its newest over (None: it has none kept).
    move: Move | None = None
