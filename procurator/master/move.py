"""The leader's move duty, decided: what each step of a move writes
(docs/SNAPSHOTS.md, "Moves"; ``procurator.core.move`` decides the step).

``plan_move`` turns a step into the move's next state and the
assignments its generation changes; ``MasterService._drive_moves`` commits
that (``Store.commit_move``: one generation under the move's op id, fenced
by the leader's epoch, with the move's new phase in the same transaction)
and pushes the workers concerned. Like a rollout's, the plan is a pure
function of what is stored: a leader killed between deciding and
committing, or a failover, decides the same again from the store.

What each step's generation changes:

- ``prepare``: nothing in the stored assignments; the target's
  generation moves, so it is sent its assignment again, now with the VM's
  image among the paths to prepare (``with_moves``);
- ``stop``: the VM's desired power in the source's assignment becomes
  ``stopped``;
- ``transfer``: both workers' generations move; they are sent the
  transfer (``with_moves``: the source sends the disks to the target's
  transfer address with the move's token, the target takes them);
- ``switch``: the VM leaves the source's assignment (its pending removal
  there) and joins the target's, with the power it had before the move;
  the target is still sent its transfer until the move is done: the VM's
  first prepare there takes the received disks only for that op;
- ``fail`` before the switch: both workers' generations move (the target
  stops preparing the image and drops the disks it received, the source
  stops sending them), and with ``revert`` the source's VM gets its power
  back (it restarts);
- ``done``: the row only.

A live move (``procurator.core.move``, "Live moves"): ``prepare`` moves
the target's generation and begins the move's token; the target is sent,
from it through the switch, a live transfer (``DiskTransfer.live``) that
names the VM (``incoming``) until the switch; ``migrate`` moves the
source's generation, and the source is sent a live transfer to where the
target reported its incoming VMM listens (``with_moves`` reads it from
the target's latest status); ``cancel`` moves the source's generation,
and the source is sent its live transfer without a peer (``peer`` and
``disks`` ""), which asks it to stop migrating and report how it ended
(the target keeps its transfer: a source past the point of no return
still switches); ``switch`` moves the VM with its stored power; ``fail``
moves both generations and reverts nothing.

The cancel's wire shape needs no new field: a live source transfer
always had a peer (the migrate waits for the target's address), so none
means "stop". A worker older than it refuses such an assignment as
invalid (its peer must be HOST:PORT) and reconnects until the move ends:
it can report no verdict, so the move fails once the leader has lost it
(as it did before the cancel: upgrade the workers before moving VMs live
off them).

Pure: no clock, no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from procurator.core.models import (
    Assignment,
    DiskTransfer,
    PowerState,
    TransferState,
    VmAssignment,
    WorkerStatus,
)
from procurator.core.move import Move, MoveAction, MoveKind, MovePhase, MoveStep, advance

__all__ = ["MovePlan", "plan_move", "with_moves"]

_NEXT = {
    MoveAction.PREPARE: MovePhase.PREPARING,
    MoveAction.STOP: MovePhase.STOPPING,
    MoveAction.TRANSFER: MovePhase.TRANSFERRING,
    MoveAction.MIGRATE: MovePhase.MIGRATING,
    MoveAction.CANCEL: MovePhase.CANCELLING,
    MoveAction.SWITCH: MovePhase.SWITCHING,
    MoveAction.DONE: MovePhase.DONE,
    MoveAction.FAIL: MovePhase.FAILED,
}

_PREPARED_IN = (
    MovePhase.PREPARING,
    MovePhase.STOPPING,
    MovePhase.TRANSFERRING,
    MovePhase.MIGRATING,
    MovePhase.CANCELLING,
)
"""The phases in which the target keeps the VM's image prepared (rooted):
until the switch gives it the VM itself."""

_RECEIVED_IN = (MovePhase.TRANSFERRING, MovePhase.SWITCHING)
"""The phases in which the target is sent its transfer: it takes the disks
while transferring, and the VM's first prepare after the switch takes them
only for the op of that transfer (a set an earlier, failed move left is
never used), also after a restart of the target, until the move is done."""

_INCOMING_IN = (
    MovePhase.PREPARING,
    MovePhase.MIGRATING,
    MovePhase.CANCELLING,
    MovePhase.SWITCHING,
)
"""A live move's phases in which the target is sent its transfer: it holds
an incoming VMM from the prepare until the switch (also while the source
is asked to cancel: a source past the point of no return still switches
the VM to it), and the switch lets it run (``finish_incoming``) only for
the op of that transfer."""


@dataclass(frozen=True, slots=True)
class MovePlan:
    """The move after a step, and the assignments (worker -> its VMs, in
    id order) its generation writes; no ``changes`` means the row only."""

    move: Move
    changes: dict[str, tuple[VmAssignment, ...]]
    message: str


def plan_move(
    move: Move,
    step: MoveStep,
    assignments: Mapping[str, Assignment],
    *,
    now_ms: int,
    token: str = "",
) -> MovePlan | None:
    """What ``step`` of ``move`` writes (see the module docstring); None
    for ``wait``. ``token``: the one-time token a transfer begins with
    (the caller's randomness: this module is pure)."""
    if step.action is MoveAction.WAIT:
        return None
    after = advance(move, _NEXT[step.action], now_ms=now_ms, reason=step.reason)
    live = move.kind is MoveKind.LIVE
    if step.action is (MoveAction.PREPARE if live else MoveAction.TRANSFER):
        after = dataclasses.replace(after, token=token)
    current = {w: a.vms for w, a in assignments.items()}
    source = current.get(move.source, ())
    target = current.get(move.target, ())

    def with_power(vms: tuple[VmAssignment, ...], power: PowerState) -> tuple[VmAssignment, ...]:
        return tuple(dataclasses.replace(v, power=power) if v.id == move.vm_id else v for v in vms)

    changes: dict[str, tuple[VmAssignment, ...]] = {}
    where = f"{move.source} -> {move.target}"
    if step.action is MoveAction.PREPARE:
        changes[move.target] = target
        message = f"move {move.op_id}: preparing VM {move.vm_id}'s image on {move.target}"
    elif step.action is MoveAction.MIGRATE:
        changes[move.source] = source
        message = f"move {move.op_id}: migrating VM {move.vm_id}, running ({where})"
    elif step.action is MoveAction.CANCEL:
        changes[move.source] = source
        message = (
            f"move {move.op_id}: cancelling VM {move.vm_id}'s migration ({where}): "
            f"{step.reason}; waiting for {move.source} to say how it ended"
        )
    elif step.action is MoveAction.STOP:
        changes[move.source] = with_power(source, PowerState.STOPPED)
        message = f"move {move.op_id}: stopping VM {move.vm_id} on {move.source} ({where})"
    elif step.action is MoveAction.TRANSFER:
        # Both sides hear of the transfer with a generation of their own.
        changes[move.source] = source
        changes[move.target] = target
        message = f"move {move.op_id}: transferring VM {move.vm_id}'s disks ({where})"
    elif step.action is MoveAction.SWITCH:
        vm = next(v for v in source if v.id == move.vm_id)
        changes[move.source] = tuple(v for v in source if v.id != move.vm_id)
        # A live move never changed the VM's power: it keeps the stored one.
        moved = vm if live else dataclasses.replace(vm, power=move.power)
        changes[move.target] = tuple(sorted((*target, moved), key=lambda v: v.id))
        message = f"move {move.op_id}: switching VM {move.vm_id} to {move.target} ({where})"
    elif step.action is MoveAction.DONE:
        message = f"move {move.op_id}: VM {move.vm_id} moved {where}"
    else:
        if not move.switched:
            # Both hear of the end with a generation: the target stops
            # preparing (and drops what it received), the source stops
            # sending.
            changes[move.target] = target
            changes[move.source] = source
        if step.revert:
            changes[move.source] = with_power(source, move.power)
        back = f"; it is {move.power.value} on {move.source} again" if step.revert else ""
        message = f"move {move.op_id} of VM {move.vm_id} ({where}) failed: {step.reason}{back}"
    return MovePlan(after, changes, message)


def with_moves(
    assignment: Assignment,
    moves: Iterable[Move],
    assignments: Mapping[str, Assignment],
    addresses: Mapping[str, str],
    statuses: Mapping[str, WorkerStatus | None] | None = None,
    *,
    tls_targets: Collection[str] = frozenset(),
) -> Assignment:
    """``assignment`` as sent while ``moves`` are under way: the images of
    the VMs moving to its worker, before their switch, among the paths it
    prepares (beside a rollout's), and the transfers it takes part in
    (``addresses``: each worker's transfer address; ``statuses``: the
    workers' latest, where a live move's target says where its incoming
    VMM listens; ``tls_targets``: the workers whose transfer port serves
    TLS, which a cold move's source is told to require). The same object
    when nothing is added."""
    worker_id = assignment.worker_id
    paths = []
    transfers = []
    for move in moves:
        if move.kind is MoveKind.LIVE:
            if live := _live_transfer(move, worker_id, assignments, statuses or {}):
                transfers.append(live)
        elif move.phase is MovePhase.TRANSFERRING and worker_id == move.source:
            peer = addresses.get(move.target, "")
            # The source requires TLS of a target whose port serves it
            # (told here, never found out by trying: no downgrade).
            tls = move.target if move.target in tls_targets else ""
            transfers.append(
                DiskTransfer(move.vm_id, move.op_id, False, move.token, peer, peer_tls_worker=tls)
            )
        elif move.phase in _RECEIVED_IN and worker_id == move.target:
            transfers.append(DiskTransfer(move.vm_id, move.op_id, True, move.token))
        if move.target != worker_id or move.phase not in _PREPARED_IN:
            continue
        if move.image and move.image not in assignment.prepare:
            paths.append(move.image)
    if not paths and not transfers:
        return assignment
    prepare = tuple(dict.fromkeys((*assignment.prepare, *sorted(paths))))
    return dataclasses.replace(
        assignment,
        prepare=prepare,
        transfers=(*assignment.transfers, *sorted(transfers, key=lambda t: t.vm_id)),
    )


def _live_transfer(
    move: Move,
    worker_id: str,
    assignments: Mapping[str, Assignment],
    statuses: Mapping[str, WorkerStatus | None],
) -> DiskTransfer | None:
    """What ``worker_id`` is sent of live ``move``: the target, from the
    prepare through the switch, the VM to hold incoming (until the switch,
    which gives it the VM itself); the source, while migrating, where the
    target's incoming VMM listens, as the target reported it, and while
    cancelling, no peer (stop migrating)."""
    if worker_id == move.target and move.phase in _INCOMING_IN:
        vms = assignments[move.source].vms if move.source in assignments else ()
        vm = None if move.switched else next((v for v in vms if v.id == move.vm_id), None)
        return DiskTransfer(move.vm_id, move.op_id, True, move.token, live=True, incoming=vm)
    if worker_id == move.source and move.phase is MovePhase.CANCELLING:
        return DiskTransfer(move.vm_id, move.op_id, False, move.token, live=True)
    if worker_id == move.source and move.phase is MovePhase.MIGRATING:
        target = statuses.get(move.target)
        ready = next(
            (
                t
                for t in (target.transfers if target is not None else ())
                if (t.vm_id, t.op_id, t.state) == (move.vm_id, move.op_id, TransferState.READY)
            ),
            None,
        )
        if ready is None:
            return None  # not reported yet (never so once migrating began): nothing to send to
        return DiskTransfer(
            move.vm_id, move.op_id, False, move.token, ready.memory, live=True, disks=ready.disks
        )
    return None
