"""Moves: one VM from its worker (the *source*) to another (the *target*),
the pure parts (docs/SNAPSHOTS.md, "Moves"; issue 30).

A move is state in the store (``Move``: one row per move, schema version
9), asked for by an operator on any master and driven by the leader
through its phases, each a generation fenced by the leader's epoch:

- ``pending``: recorded by ``procurator move``; nothing has changed yet.
  Its refusal counted the target's room with the moves under way then;
  the leader counts it again before the prepare (``ahead_of``: the moves
  recorded before it, and those past ``pending``), so moves recorded at
  once on two masters, or an apply that filled the target meanwhile,
  cannot overfill it: the later one fails, naming the target's room.
- ``preparing``: a generation gives the target, in what it is sent, the
  VM's image to realise and root (``Assignment.prepare``); the VM keeps
  running on the source. Done once the target reports the image ``ready``.
- ``stopping``: a generation sets the VM's desired power to ``stopped``
  in the source's assignment; the source stops it (stop ladder) and keeps
  its directory. Done once the source reports the VM ``stopped`` in a
  status of that generation or newer.
- ``transferring``: a generation names the transfer to both (the
  source's and the target's ``Assignment.transfers``, with a one-time
  token and the target's transfer address); the source sends the VM's
  writable disk copies, the target checks and keeps them. Done once the
  target reports the whole set ``received``.
- ``switching``: a generation moves the VM, with the power it had before
  the move, from the source's assignment to the target's; the source's
  copy becomes its pending removal and the target boots the VM from the
  disks it received (the target is still sent its transfer: the VM's
  first prepare there takes the received set only for this op). Done once
  the target reports it ``running`` (``stopped``, ``paused``: as its
  power asks).
- ``done`` / ``failed`` (with a reason): over. The newest ``MOVES_KEPT``
  that are over are kept.

Invariants (what ``step`` keeps):

- **Never on two workers.** The VM is in exactly one stored assignment at
  every moment: the source's until the switch, the target's from it. The
  switch is committed only once the source has reported the VM stopped,
  so the target's boot never overlaps the source's guest. A target that
  restarts before the switch has nothing to start: the VM is not in its
  assignment.
- **A failure before the switch leaves the VM on the source**: a lost
  target or source, the deadline passed, the image failing to prepare.
  If the move had stopped it, a generation puts back the power it had
  (``revert``): the source restarts it.
- **An apply wins.** The stored assignment is the truth: if the VM left
  the source, was replaced (another image than ``image``, the one the
  move prepares), or its power is not what the move set (an apply during
  the stop or the transfer puts the fleet file's back), the move fails and
  changes nothing more.
- After the switch (a live move: after the source's ``sent``) the move
  is past the point of no return: a target that
  does not report the VM running by the deadline fails the move, and the
  VM stays the target's (its supervisor and healing go on as for any VM).

Live moves (``MoveKind.LIVE``; ``check_move`` refuses one unless both
ends' workers say their VMM driver moves running VMs, the same driver;
the workers' part: ``procurator.worker.move_service``):

- ``preparing``: a generation gives the target the VM's image to prepare
  and a live transfer naming the VM as the source's assignment has it,
  with the move's token (made here: the incoming VMM checks it on every
  stream); the target starts an *incoming* VMM for it (never booted on its
  own, not counted as running, killed by a restart of the target, which
  then reports its side failed). Done once the target reports the
  transfer ``ready`` with where it listens (``TransferProgress.memory``,
  ``disks``).
- ``migrating``: a generation gives the source the transfer with those
  addresses; it runs ``send_migration`` on the running guest, reporting
  its bytes (``N%``), then ``sent`` once the call returned (its guest is
  stopped for good, the target holds the whole state), or ``failed`` (its
  guest runs on: the driver undid the migration).
- ``cancelling``: the move failed while migrating (its deadline passed,
  an apply changed the VM, the target was lost or lost its incoming VM)
  with the source connected: a generation sends the source its transfer
  without a peer (``DiskTransfer.peer`` ""), which asks it to stop
  migrating; the target keeps its incoming VMM. The move ends by the
  source's verdict, whenever it comes: ``sent`` (too late to stop: past
  QEMU's switchover, or the stream through) switches (the move is done,
  late); ``failed`` (the driver undid the migration, the guest runs on
  there) fails it, saying why it was cancelled. A connected source that
  never answers leaves the move in this phase, visible
  (``ProcuratorMoveStuck``) and safe: the VM is in no other assignment,
  and both ends keep what the switch would need. Only a lost source fails
  it at once (see below).
- ``switching``, ``done``: as a cold move's; the VM keeps the power it
  has in the stored assignment (a live move never changes it). The target
  lets its incoming VMM run (``finish_incoming``) for the op of the
  transfer it is still sent; a target that has none any more (it
  restarted after the switch) boots the VM cold from its disk copies.

The point of no return is the source's ``sent`` (or the target's
``received``, for a driver in ``TARGET_COMPLETES_LIVE`` only:
cloud-hypervisor's target resumes the VM itself when the stream completes,
before the source's call returns). A target's ``received`` is acted on
only where it is its driver's documented completion signal (``step``'s
``target_driver``: the target worker's registered VMM driver): a QEMU
target's guest runs only at ``finish_incoming``, so only the source's
``send_migration`` returning proves its guest stopped for good, and the
restarted source's undo of a migration it stopped in (docs/SNAPSHOTS.md)
is safe only because nothing but that ``sent`` switches a QEMU move. From
it the only step
is the switch, whatever else is true by then (the deadline, a worker lost)
and whichever leader reads the reports: a master killed between the
source's report and the switch leaves both in the store (statuses are
stored), and the next leader switches. Resuming the source instead is not
safe: cloud-hypervisor's target already runs the guest, and a QEMU target
holds disks the source gave up. Before it, a failure fails the move
with no revert (the guest never stopped on the source), and the fail's
generation stops the target's incoming VMM, but never behind the back of
a source that may still complete the migration: that would stop the
target's incoming VMM while the source goes on, and a source that then
finishes gives up its VMM with its "sent" mark, leaving the VM stopped
everywhere (``send_migration``'s own timeout, 300 s by default, is no
bound on it: the move's ``--timeout`` may be shorter). So once migrating,
a failure with the source connected asks it to cancel (``cancelling``)
and the source's verdict decides. A lost source fails the move at once:
its worker is dead or cut off, and its migration cannot complete without
it (QEMU waits at its pre-switchover pause for a ``migrate-continue`` only
the worker sends; cloud-hypervisor's stream runs through the worker's
relay, which died with it); the restarted worker finds the mark of a
migration it stopped in and abandons it (``abandon_migration``, the
guest resumes there once the move has failed). A source only cut off
(alive, its lease lost) could still finish in the window before its
driver's next step; its status then says what the operator must do
(``procurator.worker.move_service``).

What is not carried yet: the VM's snapshots.

Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from procurator.core.models import (
    Assignment,
    Phase,
    PowerState,
    PrepareState,
    TransferProgress,
    TransferState,
    VmAssignment,
    WorkerFacts,
    WorkerState,
    WorkerStatus,
)
from procurator.core.placement import worker_room

__all__ = [
    "DEFAULT_MOVE_TIMEOUT_S",
    "MAX_MOVE_TIMEOUT_S",
    "MOVES_KEPT",
    "TARGET_COMPLETES_LIVE",
    "Move",
    "MoveAction",
    "MoveKind",
    "MovePhase",
    "MoveStep",
    "advance",
    "ahead_of",
    "check_move",
    "move_json",
    "shortfall",
    "step",
    "transfer_progress",
]

MOVES_KEPT = 100
"""Moves kept once over (the newest); one under way is always kept."""

DEFAULT_MOVE_TIMEOUT_S = 600
"""How long a move may take before the leader fails it (``--timeout``)."""

MAX_MOVE_TIMEOUT_S = 86_400


class MoveKind(enum.Enum):
    COLD = "cold"  # stop on the source, start on the target
    LIVE = "live"  # migrate the running guest


class MovePhase(enum.Enum):
    PENDING = "pending"
    PREPARING = "preparing"
    STOPPING = "stopping"
    TRANSFERRING = "transferring"
    MIGRATING = "migrating"  # live moves only
    CANCELLING = "cancelling"  # live moves only: the source is asked to stop migrating
    SWITCHING = "switching"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class Move:
    """One move (see the module docstring). ``generation``: the one that
    began the current phase (0 while ``pending``): a worker's status of an
    older observed generation says nothing about the phase. ``power``: the
    VM's desired power when the move was asked for, put back on the source
    by a revert and kept on the target by the switch."""

    vm_id: str
    source: str
    target: str
    kind: MoveKind
    phase: MovePhase
    op_id: str
    started_unix_ms: int
    deadline_unix_ms: int
    power: PowerState = PowerState.RUNNING
    generation: int = 0
    updated_unix_ms: int = 0
    reason: str = ""
    # The transfer's one-time token (set when it begins; never shown,
    # not even in a repr that a log or an error message formats).
    token: str = dataclasses.field(default="", repr=False)
    # Shown only (never stored): how far a transfer is, "N%" of the bytes.
    progress: str = ""
    # The VM's image when the move was asked for: what the target prepares.
    image: str = ""

    @property
    def over(self) -> bool:
        return self.phase in (MovePhase.DONE, MovePhase.FAILED)

    @property
    def switched(self) -> bool:
        """Past the switch: the VM is the target's."""
        return self.phase in (MovePhase.SWITCHING, MovePhase.DONE)


class MoveAction(enum.Enum):
    """What the leader does next with a move (``step``)."""

    WAIT = "wait"  # nothing yet
    PREPARE = "prepare"  # a generation: the target prepares the image
    STOP = "stop"  # a generation: the source's copy desired stopped
    TRANSFER = "transfer"  # a generation: the source sends the disks to the target
    MIGRATE = "migrate"  # a generation (live): the source migrates the VM to the target
    CANCEL = "cancel"  # a generation (live): the source stops migrating, then says how it ended
    SWITCH = "switch"  # a generation: the VM moves to the target
    DONE = "done"  # the row only
    FAIL = "fail"  # the row, and with ``revert`` a generation


@dataclass(frozen=True, slots=True)
class MoveStep:
    action: MoveAction
    reason: str = ""
    # FAIL: put the VM's power back on the source (the move had stopped it).
    revert: bool = False


def move_json(move: Move) -> dict[str, object]:
    """A move as ``move status --json`` prints it."""
    return {
        "vm_id": move.vm_id,
        "source": move.source,
        "target": move.target,
        "kind": move.kind.value,
        "phase": move.phase.value,
        "op_id": move.op_id,
        "started_unix_ms": move.started_unix_ms,
        "updated_unix_ms": move.updated_unix_ms,
        "deadline_unix_ms": move.deadline_unix_ms,
        "generation": move.generation,
        "reason": move.reason,
        "progress": move.progress,
    }


def check_move(
    vm_id: str,
    target: str,
    *,
    kind: MoveKind,
    assignments: Mapping[str, Assignment],
    target_state: WorkerState | None,
    target_connected: bool = True,
    target_transfers: bool = True,
    moving: Mapping[str, str],
    handed_off: Iterable[str],
    in_rollout: Iterable[str],
    target_shortfall: str | None,
    constraints: Sequence[tuple[str, str]] = (),
    target_labels: Sequence[tuple[str, str]] = (),
    vmms: Mapping[str, tuple[str, bool]] | None = None,
) -> tuple[str, VmAssignment] | str:
    """The move's source and the VM as its source's assignment has it, or
    why ``vm_id`` cannot move to ``target`` (one line for the operator).
    ``moving``: the VMs moving, with their moves' op ids;
    ``target_state``: None for a worker the master never heard of;
    ``target_transfers``: whether the target takes disks (it has a
    transfer address); ``target_shortfall``: why the VM does not fit on
    the target (None: it fits); ``constraints``: an unpinned VM's, which
    the target's ``target_labels`` must match (else the next apply would
    move it back); ``vmms``: each registered worker's VMM driver and whether
    it moves running VMs (``WorkerInfo.driver``, ``live_moves``), which a
    live move needs on both ends, the same driver on both."""
    found = [(w, vm) for w, a in sorted(assignments.items()) for vm in a.vms if vm.id == vm_id]
    if not found:
        return f"VM {vm_id} is not in the fleet"
    source, vm = found[0]
    if vm_id in moving:
        return f"VM {vm_id} is moving already (move {moving[vm_id]}: `procurator moves {vm_id}`)"
    if vm_id in set(handed_off):
        return f"VM {vm_id} is in a drain's handoff; wait for it to finish"
    if vm_id in set(in_rollout):
        return f"VM {vm_id} is in the rollout under way; wait for it to finish"
    if target == source:
        return f"VM {vm_id} is on worker {target} already"
    if target_state is None:
        return f"worker {target} is unknown: it never registered and has no VMs assigned"
    if target_state is not WorkerState.READY:
        return f"worker {target} is {target_state.value}: it takes no VMs"
    if not target_connected:
        return f"worker {target} is not connected to any master: it cannot prepare the VM"
    if not target_transfers:
        return (
            f"worker {target} takes no moves: it runs without --transfer-listen "
            "(where it would receive the VM's disks)"
        )
    if target_shortfall is not None:
        return f"VM {vm_id} does not fit on worker {target}: {target_shortfall}"
    labels = dict(target_labels)
    if unmet := [f"{k}={v}" for k, v in constraints if labels.get(k) != v]:
        return (
            f"worker {target} does not match VM {vm_id}'s constraints ({', '.join(unmet)}): "
            "the next apply would move it back"
        )
    if kind is MoveKind.LIVE and (refused := _live_refusal(vm_id, source, target, vmms or {})):
        return refused
    return source, vm


def _live_refusal(
    vm_id: str, source: str, target: str, vmms: Mapping[str, tuple[str, bool]]
) -> str:
    """Why ``vm_id`` cannot move live from ``source`` to ``target`` ("":
    it can)."""
    cold = "move it cold, without --live"
    for worker, role in ((source, "source"), (target, "target")):
        driver, live = vmms.get(worker, ("", False))
        if not live:
            what = f"its VMM driver {driver}" if driver else "it"
            return (
                f"the {role} worker {worker} cannot move a running VM: {what} does not "
                f"say it can (a worker older than live moves, or not connected): {cold}"
            )
    drivers = vmms[source][0], vmms[target][0]
    if drivers[0] != drivers[1]:
        return (
            f"VM {vm_id} cannot move live from {source} ({drivers[0]}) to {target} "
            f"({drivers[1]}): both ends must run the same VMM driver; {cold}"
        )
    return ""


def shortfall(vm: VmAssignment, facts: WorkerFacts, assigned: Sequence[VmAssignment]) -> str | None:
    """Why ``vm`` does not fit on the worker of ``facts`` beside the VMs
    ``assigned`` to it and those moving to it (``facts.incoming``: a move
    under way holds its room from its start until it ends) (None: it
    fits), counted as the scheduler counts (``procurator.core.placement``:
    host capacity times the overcommit ratios, resources as the
    assignments state them: ``worker_room``)."""
    room = worker_room(facts, assigned)
    cpu, mem, slots = room.vcpus.free, room.memory_mib.free, room.vms.free
    if vm.vcpus <= cpu and vm.memory_mib <= mem and slots > 0:
        return None
    return (
        f"needs {vm.vcpus} vCPU/{vm.memory_mib} MiB; it has {max(cpu, 0)} vCPU/"
        f"{max(mem, 0)} MiB and {max(slots, 0)} VM slot(s) free"
    )


_SETTLED = {
    PowerState.RUNNING: Phase.RUNNING,
    PowerState.PAUSED: Phase.PAUSED,
    PowerState.STOPPED: Phase.STOPPED,
}
"""The phase a worker reports a VM in once it has what its power asks."""


def _reported(status: WorkerStatus | None, vm_id: str, since: int) -> tuple[bool, Phase | None]:
    """Whether ``status`` speaks of generation ``since`` or newer, and the
    phase it shows ``vm_id`` in (None: not shown)."""
    if status is None or status.observed_generation < since:
        return False, None
    return True, next((s.phase for s in status.vms if s.id == vm_id), None)


def ahead_of(move: Move, moves: Iterable[Move]) -> list[Move]:
    """Of ``moves``, those under way whose VMs hold room on their targets
    ahead of the pending ``move``: every one past ``pending``, and the
    pending ones recorded before it (by start time, then op id)."""
    order = (move.started_unix_ms, move.op_id)
    return [
        m
        for m in moves
        if not m.over
        and m.op_id != move.op_id
        and (m.phase is not MovePhase.PENDING or (m.started_unix_ms, m.op_id) < order)
    ]


TARGET_COMPLETES_LIVE = frozenset({"cloud-hypervisor"})
"""The VMM drivers (``WorkerInfo.driver``) whose live move's target
reporting ``received`` completes the move (its VMM resumed the guest
itself); a target of any other is not taken at its word (the module
docstring)."""


def step(
    move: Move,
    *,
    assignments: Mapping[str, Assignment],
    statuses: Mapping[str, WorkerStatus | None],
    lost: Iterable[str],
    now_ms: int,
    target_shortfall: str | None = None,
    target_driver: str = "",
) -> MoveStep:
    """What the leader does next with ``move``, from the stored
    assignments, the workers' latest statuses, the lost workers and the
    time (see the module docstring). ``target_shortfall``: for a pending
    move, why its VM does not fit on the target beside what is there and
    the moves ``ahead_of`` it (None: it fits). ``target_driver``: the VMM
    driver of the move's target worker ("": unknown); a live move switches
    on its target's ``received`` only for one in ``TARGET_COMPLETES_LIVE``.
    Idempotent: asked again over
    the same facts it answers the same, so a leader killed between
    deciding and committing decides the same again."""
    if move.over:
        return MoveStep(MoveAction.WAIT)
    if move.phase is MovePhase.PENDING and target_shortfall is not None:
        return MoveStep(
            MoveAction.FAIL,
            f"VM {move.vm_id} does not fit on worker {move.target} any more: {target_shortfall}",
        )
    lost = set(lost)
    source_vm = next((v for v in _vms(assignments, move.source) if v.id == move.vm_id), None)
    if move.kind is MoveKind.LIVE and not move.switched:
        completes = target_driver in TARGET_COMPLETES_LIVE
        return _live_step(move, source_vm, statuses, lost, now_ms, target_completes=completes)
    if move.switched:
        ok, phase = _reported(statuses.get(move.target), move.vm_id, move.generation)
        target_vm = next((v for v in _vms(assignments, move.target) if v.id == move.vm_id), None)
        if target_vm is None:
            return MoveStep(MoveAction.FAIL, "the VM left the target's assignment (an apply)")
        # Done once the target reports the VM as assigned (also one moved
        # while stopped or paused: its prepare there took the received
        # disks, which the target keeps only while it is sent the transfer,
        # that is until the move is done).
        wanted = _SETTLED[target_vm.power]
        if ok and phase is wanted:
            return MoveStep(MoveAction.DONE)
        if now_ms >= move.deadline_unix_ms:
            return MoveStep(
                MoveAction.FAIL,
                f"worker {move.target} did not report the VM {wanted.value} before the "
                f"deadline; it stays assigned there",
            )
        return MoveStep(MoveAction.WAIT)
    stopped_by_us = move.phase in (MovePhase.STOPPING, MovePhase.TRANSFERRING)
    if source_vm is None:
        return MoveStep(
            MoveAction.FAIL, f"the VM left worker {move.source}'s assignment (an apply)"
        )
    if move.image and source_vm.nix_store_path != move.image:
        return MoveStep(
            MoveAction.FAIL, "the VM was replaced during the move (an apply)", revert=stopped_by_us
        )
    expected_power = PowerState.STOPPED if stopped_by_us else move.power
    if source_vm.power is not expected_power:
        return MoveStep(MoveAction.FAIL, "the VM's power was changed during the move (an apply)")
    for worker, role in ((move.target, "target"), (move.source, "source")):
        if worker in lost:
            return MoveStep(
                MoveAction.FAIL, f"the {role} worker {worker} is lost", revert=stopped_by_us
            )
    if now_ms >= move.deadline_unix_ms:
        last = _transfer_trouble(move, statuses)
        return MoveStep(
            MoveAction.FAIL,
            f"not done before the deadline (in phase {move.phase.value}{last})",
            revert=stopped_by_us,
        )
    if move.phase is MovePhase.PENDING:
        return MoveStep(MoveAction.PREPARE)
    if move.phase is MovePhase.PREPARING:
        target = statuses.get(move.target)
        if target is None or target.observed_generation < move.generation:
            return MoveStep(MoveAction.WAIT)
        image = next((p for p in target.prepared if p.path == source_vm.nix_store_path), None)
        if image is None or image.state is PrepareState.PENDING:
            return MoveStep(MoveAction.WAIT)
        if image.state is PrepareState.FAILED:
            why = f": {image.message}" if image.message else ""
            return MoveStep(MoveAction.FAIL, f"worker {move.target} cannot prepare the image{why}")
        return MoveStep(MoveAction.STOP)
    if move.phase is MovePhase.STOPPING:
        # The source's status of the stop's generation (or newer) shows
        # the VM stopped (or no longer shows it: nothing runs).
        ok, phase = _reported(statuses.get(move.source), move.vm_id, move.generation)
        if ok and phase in (Phase.STOPPED, None):
            return MoveStep(MoveAction.TRANSFER)
        return MoveStep(MoveAction.WAIT)
    # TRANSFERRING: the target has the whole set of disks (sizes and
    # sha256 checked, stored) for this move.
    target = statuses.get(move.target)
    if target is not None and target.observed_generation >= move.generation:
        for t in target.transfers:
            if (t.vm_id, t.op_id, t.state) == (move.vm_id, move.op_id, TransferState.RECEIVED):
                return MoveStep(MoveAction.SWITCH)
    return MoveStep(MoveAction.WAIT)


def _live_step(
    move: Move,
    source_vm: VmAssignment | None,
    statuses: Mapping[str, WorkerStatus | None],
    lost: set[str],
    now_ms: int,
    *,
    target_completes: bool,
) -> MoveStep:
    """``step`` of a live move before its switch (see the module docstring,
    "Live moves"); ``target_completes``: its target's ``received`` is its
    driver's completion signal."""
    if move.phase in (MovePhase.MIGRATING, MovePhase.CANCELLING):
        return _migrating_step(
            move, source_vm, statuses, lost, now_ms, target_completes=target_completes
        )
    if source_vm is None:
        return MoveStep(
            MoveAction.FAIL, f"the VM left worker {move.source}'s assignment (an apply)"
        )
    if why := _live_trouble(move, source_vm, statuses, lost, now_ms):
        return MoveStep(MoveAction.FAIL, why)
    if move.phase is MovePhase.PENDING:
        return MoveStep(MoveAction.PREPARE)
    target = _progress(statuses.get(move.target), move)
    # PREPARING
    status = statuses.get(move.target)
    image = (
        next(
            (p for p in status.prepared if p.path == source_vm.nix_store_path),
            None,
        )
        if status is not None and status.observed_generation >= move.generation
        else None
    )
    if image is not None and image.state is PrepareState.FAILED:
        why = f": {image.message}" if image.message else ""
        return MoveStep(MoveAction.FAIL, f"worker {move.target} cannot prepare the image{why}")
    if target is not None and target.state is TransferState.FAILED:
        return MoveStep(
            MoveAction.FAIL,
            f"worker {move.target} cannot take the VM incoming: {target.message}",
        )
    if target is not None and target.state is TransferState.READY and target.memory:
        return MoveStep(MoveAction.MIGRATE)
    return MoveStep(MoveAction.WAIT)


def _live_trouble(
    move: Move,
    source_vm: VmAssignment,
    statuses: Mapping[str, WorkerStatus | None],
    lost: set[str],
    now_ms: int,
) -> str:
    """Why a live move before its switch cannot go on ("": it can): an
    apply changed the VM, a worker is lost, the deadline passed."""
    if move.image and source_vm.nix_store_path != move.image:
        return "the VM was replaced during the move (an apply)"
    if source_vm.power is not move.power:
        return "the VM's power was changed during the move (an apply)"
    for worker, role in ((move.target, "target"), (move.source, "source")):
        if worker in lost:
            return f"the {role} worker {worker} is lost"
    if now_ms >= move.deadline_unix_ms:
        last = _transfer_trouble(move, statuses)
        return f"not done before the deadline (in phase {move.phase.value}{last})"
    return ""


def _migrating_step(
    move: Move,
    source_vm: VmAssignment | None,
    statuses: Mapping[str, WorkerStatus | None],
    lost: set[str],
    now_ms: int,
    *,
    target_completes: bool,
) -> MoveStep:
    """``step`` of a live move ``migrating`` or ``cancelling``: only the
    source's verdict ends it, but for a lost source (see the module
    docstring); ``target_completes``: as ``_live_step``'s."""
    # Past the point of no return, whatever else is true now: the
    # source's send_migration returned (its guest stopped for good) or
    # the target holds the whole state (cloud-hypervisor's own switch
    # resumed it there). Only the switch is safe from here, also for a
    # new leader reading these reports from the store, and also for a
    # move being cancelled (too late: it is done, late).
    sent = _progress(statuses.get(move.source), move)
    held = _target_progress(statuses.get(move.target), move)
    if (sent is not None and sent.state is TransferState.SENT) or (
        # Only where the driver says the target's "received" completes
        # it: QEMU's proves nothing of the source's guest (module docstring).
        target_completes and held is not None and held.state is TransferState.RECEIVED
    ):
        if source_vm is None:
            return MoveStep(
                MoveAction.FAIL,
                f"the VM left worker {move.source}'s assignment (an apply); the state it "
                f"migrated to {move.target} is dropped",
            )
        return MoveStep(MoveAction.SWITCH)
    cancelling = move.phase is MovePhase.CANCELLING
    # Why it was cancelled, before what the source says of it.
    why = f"{move.reason}; " if cancelling and move.reason else ""
    if sent is not None and sent.state is TransferState.FAILED:
        # The source's verdict: its driver undid the migration.
        done = "cancelled" if cancelling else "failed"
        return MoveStep(
            MoveAction.FAIL,
            f"{why}the migration {done} on {move.source}: {sent.message}; the VM runs on there",
        )
    if move.source in lost:
        # Its migration cannot complete without its worker (the module
        # docstring): nothing is left to wait for.
        return MoveStep(MoveAction.FAIL, f"{why}the source worker {move.source} is lost")
    if source_vm is None:
        # An apply took the VM off the source: its removal there ends the
        # guest, migrated or not; the apply asked for no VM there.
        return MoveStep(
            MoveAction.FAIL, f"{why}the VM left worker {move.source}'s assignment (an apply)"
        )
    if cancelling:
        return MoveStep(MoveAction.WAIT)  # for the source's verdict
    if trouble := _live_trouble(move, source_vm, statuses, lost, now_ms):
        return MoveStep(MoveAction.CANCEL, trouble)
    if held is not None and held.state is TransferState.FAILED:
        # A target that lost its incoming VMM (it restarted): the source's
        # stream breaks, its driver undoes the migration and says so.
        return MoveStep(
            MoveAction.CANCEL, f"worker {move.target} lost the incoming VM: {held.message}"
        )
    return MoveStep(MoveAction.WAIT)


def _progress(status: WorkerStatus | None, move: Move) -> TransferProgress | None:
    """What ``status`` says of ``move``'s transfer, if it is of the move's
    current phase's generation or newer (an older one says nothing of it)."""
    if status is None or status.observed_generation < move.generation:
        return None
    return next(
        (t for t in status.transfers if (t.vm_id, t.op_id) == (move.vm_id, move.op_id)), None
    )


def _target_progress(status: WorkerStatus | None, move: Move) -> TransferProgress | None:
    """What a live move's target says of it while it migrates: of any
    generation. The target got its transfer with the preparing generation,
    and ``migrate`` (and ``cancel``) move only the source's, so its status
    never reaches the move's generation; its report for the move's op id
    is of this move (a ``received`` or ``failed`` is of its incoming VM)."""
    if status is None:
        return None
    return next(
        (t for t in status.transfers if (t.vm_id, t.op_id) == (move.vm_id, move.op_id)), None
    )


def transfer_progress(move: Move, statuses: Mapping[str, WorkerStatus | None]) -> str:
    """``N%`` of a transferring (or migrating) move's bytes sent, as its
    source reports it ("" when it does not)."""
    source = statuses.get(move.source)
    for t in source.transfers if source is not None else ():
        if t.vm_id == move.vm_id and t.op_id == move.op_id and t.total:
            return f"{100 * t.done // t.total}%"
    return ""


def _transfer_trouble(move: Move, statuses: Mapping[str, WorkerStatus | None]) -> str:
    """``: <why>`` of the last failed attempt either side reports."""
    for worker in (move.source, move.target):
        status = statuses.get(worker)
        for t in status.transfers if status is not None else ():
            if t.vm_id == move.vm_id and t.op_id == move.op_id and t.message:
                return f": {worker}: {t.message}"
    return ""


def _vms(assignments: Mapping[str, Assignment], worker_id: str) -> tuple[VmAssignment, ...]:
    assignment = assignments.get(worker_id)
    return assignment.vms if assignment is not None else ()


def advance(
    move: Move, phase: MovePhase, *, now_ms: int, generation: int = 0, reason: str = ""
) -> Move:
    """``move`` in ``phase`` (a new ``generation`` when the phase began
    with one, else the old one is kept)."""
    return dataclasses.replace(
        move,
        phase=phase,
        updated_unix_ms=now_ms,
        generation=generation or move.generation,
        reason=reason or move.reason,
    )
