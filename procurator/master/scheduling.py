"""The master's side of placement: facts from its store, the scheduler's
answer turned into assignments (docs/SCHEDULING.md, issue 27).

``core.placement.place`` is pure; this module decides what it is fed.

- **Facts.** Every worker the store knows, or that an assignment names, is
  passed (none is *gone*): capacity, labels and overcommit ratios as it
  last reported them at registration (``WorkerInfo``), its state, and the
  store paths of the VMs it is assigned as the images it holds (it
  realised them, or is realising them: a move towards it downloads
  nothing). A worker whose session is connected (to any master) is
  ``ready``; one registered but not connected is ``cordoned`` — it keeps
  its VMs and takes no new ones — until the leader declares it ``lost``
  (``heal``); one never registered offers nothing (``cordoned``, no
  capacity). So an apply never moves a VM off a worker that may still run
  it: only healing does, after the worker's lease expired.
- **Moves.** A VM moving to a worker (a move under way, cold or live,
  from its commit until the switch: ``procurator.core.move``) is in its
  target's ``incoming``, as its source's assignment has it, so it counts
  against the target's capacity in every decision fed from here (an
  apply, healing, the drain duty, ``move``'s own refusal) while it still
  counts on its source, whose assignment holds it. At the switch it
  enters the target's assignment; a failed move stops counting there.
- **Previous placement** is the stored assignments: an unpinned VM keeps
  the worker it is assigned to (stability), and every master computes the
  same answer from the same store.
- **Refusal.** A fleet with a VM that fits nowhere is refused whole with
  ``ValidationError`` (``unplaceable_error``): one line per VM and its
  shortfall; nothing is stored.
- **Lost workers and healing.** A worker is ``lost`` (``is_lost``) once
  its session is not connected and a whole lease has passed since it was
  last heard of (its disconnection, or for a session that expired its last
  renewal: the store's ``since_unix_ms``), and only once the master
  deciding has itself been up for a whole lease (workers had the time to
  find it after it started). Not the cached ``expires_unix_ms``: renewals
  do not reach a master's cache, which keeps the expiry of the
  registration. An apply then moves the lost worker's
  ``reschedule`` VMs, and so does the leader's healing duty without an
  apply: it places the *stored* fleet again (``stored_fleet``: the
  assignments, and the ``PlacementRecord`` the last apply stored) with
  ``partial=True`` — a VM that fits nowhere stays where it is, unavailable,
  and the others are re-homed.
- **The fence marks.** What a worker receives marks each VM whose stored
  rule is ``on_worker_lost = "reschedule"`` (``with_fence_marks``:
  ``VmAssignment.reschedule``), so a worker cut off from every master
  pauses exactly the VMs healing may place elsewhere
  (``procurator.core.fence``). The marks are added when an assignment is
  sent (pushed or pulled), from the rules the store holds; stored and
  cached assignments carry none, so diffs and generations never see them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from procurator.core.drain import WorkerMode
from procurator.core.fleet import resolve_fleet
from procurator.core.models import (
    Assignment,
    Capacity,
    Fleet,
    OnWorkerLost,
    Placement,
    PlacementPolicy,
    UnpinnedVm,
    Unplaceable,
    VmAssignment,
    WorkerFacts,
    WorkerInfo,
    WorkerState,
)
from procurator.core.move import Move
from procurator.core.placement import place, unplaceable_error
from procurator.master.store.model import PlacementRecord, Registration, UnpinnedRules

__all__ = [
    "KnownWorker",
    "is_lost",
    "placement_record",
    "resolve",
    "stored_fleet",
    "with_fence_marks",
    "worker_facts",
]


def is_lost(
    registration: Registration | None, now_ms: int, *, lease_ms: int, up_since_ms: int
) -> bool:
    """Is a worker with ``registration`` lost (see the module docstring)?
    ``up_since_ms``: when the master deciding started serving."""
    return (
        registration is not None
        and not registration.connected
        and now_ms - registration.since_unix_ms >= lease_ms
        and now_ms - up_since_ms >= lease_ms
    )


@dataclass(frozen=True, slots=True)
class KnownWorker:
    """A worker as the master's store shows it: what it said at its latest
    registration (None: never registered) and whether that session is
    connected."""

    worker_id: str
    info: WorkerInfo | None
    connected: bool
    lost: bool = False  # the leader declared its lease expired (healing)
    mode: WorkerMode | None = None  # cordoned or draining (procurator.core.drain)


def worker_facts(
    known: Iterable[KnownWorker],
    assignments: Mapping[str, Assignment],
    *,
    moves: Iterable[Move],
    drain: bool = False,
) -> list[WorkerFacts]:
    """The scheduler's view of every worker in ``known`` or ``assignments``.
    A cordoned or draining worker (its mode) is ``cordoned``: it keeps its
    VMs and takes no new ones. Only the leader's drain duty (``drain``)
    sees a draining worker ``draining``, so that only it moves VMs off one,
    through handoffs and ``max_unavailable`` at a time: an apply or a heal
    during a drain moves nothing off the draining worker. ``moves``: the
    moves the store keeps; each under way and not yet switched puts its VM
    in its target's ``incoming`` (see the module docstring)."""
    by_id = {k.worker_id: k for k in known}
    incoming = _incoming(moves, assignments)
    facts = []
    for worker_id in sorted(set(by_id) | set(assignments)):
        worker = by_id.get(worker_id)
        assignment = assignments.get(worker_id)
        images = (
            frozenset(vm.nix_store_path for vm in assignment.vms) if assignment else frozenset()
        )
        info = worker.info if worker is not None else None
        if worker is not None and worker.lost:
            state = WorkerState.LOST
        elif worker is not None and worker.mode is not None:
            draining = drain and worker.mode.state is WorkerState.DRAINING
            state = WorkerState.DRAINING if draining else WorkerState.CORDONED
        elif worker is not None and worker.connected and info is not None:
            state = WorkerState.READY
        else:
            state = WorkerState.CORDONED
        moving_in = incoming.get(worker_id, ())
        if info is None:
            facts.append(WorkerFacts(worker_id, Capacity(), 1.0, 1.0, (), state, images, moving_in))
            continue
        facts.append(
            WorkerFacts(
                worker_id,
                info.capacity,
                info.cpu_overcommit,
                info.memory_overcommit,
                info.labels,
                state,
                images,
                moving_in,
            )
        )
    return facts


def _incoming(
    moves: Iterable[Move], assignments: Mapping[str, Assignment]
) -> dict[str, tuple[VmAssignment, ...]]:
    """By target worker, the VMs of the moves under way that have not
    switched yet, as their source's assignment has them (a VM that left it
    counts nowhere: its move fails at its next step)."""
    by_target: dict[str, list[VmAssignment]] = {}
    for move in moves:
        if move.over or move.switched:
            continue
        source = assignments.get(move.source)
        vm = next((v for v in source.vms if v.id == move.vm_id), None) if source else None
        if vm is not None:
            by_target.setdefault(move.target, []).append(vm)
    return {w: tuple(sorted(vms, key=lambda v: v.id)) for w, vms in by_target.items()}


def resolve(
    fleet: Fleet,
    facts: Iterable[WorkerFacts],
    assignments: Mapping[str, Assignment],
    *,
    partial: bool = False,
) -> tuple[Fleet, Placement | None]:
    """``fleet`` with its unpinned VMs placed (a fleet without any is
    returned as it is, with no placement: pinned fleets apply exactly as
    before). Raises ``ValidationError`` when some VM fits nowhere, unless
    ``partial`` (healing): then such a VM stays on the worker it is
    assigned to, listed in the placement's ``unavailable``, and the others
    are placed."""
    if not fleet.unpinned:
        return fleet, None
    facts = tuple(facts)
    previous = {w: a.vms for w, a in assignments.items()}
    answer = place(fleet, facts, previous)
    stuck: list[str] = []
    while isinstance(answer, Unplaceable) and partial:
        # Pin what fits nowhere where it is (it takes nothing from the
        # workers the others may go to) and place the rest again: the VMs
        # that fitted before fit again, with no less room.
        failed = {s.vm_id for s in answer.vms}
        where = {vm.id: w for w, vms in previous.items() for vm in vms if vm.id in failed}
        if failed - where.keys():
            break  # a VM that has no worker yet cannot wait on one
        stuck.extend(sorted(failed))
        pinned = {w: list(vms) for w, vms in fleet.workers}
        for u in fleet.unpinned:
            if u.id in failed:
                pinned.setdefault(where[u.id], []).append(u.vm)
        fleet = Fleet(
            tuple((w, tuple(sorted(vms, key=lambda v: v.id))) for w, vms in sorted(pinned.items())),
            tuple(u for u in fleet.unpinned if u.id not in failed),
            fleet.placement,
        )
        answer = place(fleet, facts, previous)
    if isinstance(answer, Unplaceable):
        raise unplaceable_error(answer)
    if stuck:
        answer = Placement(
            answer.vms,
            tuple(sorted({*answer.unavailable, *stuck})),
            (*answer.warnings, f"{len(stuck)} VM(s) fit on no worker and stay unavailable"),
            answer.ranked_by,
        )
    return resolve_fleet(fleet, answer), answer


def placement_record(fleet: Fleet) -> PlacementRecord:
    """What an apply of ``fleet`` stores for healing besides assignments."""
    return PlacementRecord(
        {u.id: UnpinnedRules(u.constraints, u.spread, u.on_worker_lost) for u in fleet.unpinned},
        fleet.placement.strategy,
    )


def stored_fleet(assignments: Mapping[str, Assignment], record: PlacementRecord) -> Fleet:
    """The fleet the store holds: the assigned VMs, unpinned where
    ``record`` has rules for them, pinned to their worker otherwise."""
    pinned: dict[str, list[VmAssignment]] = {}
    unpinned: list[UnpinnedVm] = []
    for worker_id, assignment in assignments.items():
        for vm in assignment.vms:
            rules = record.unpinned.get(vm.id)
            if rules is None:
                pinned.setdefault(worker_id, []).append(vm)
            else:
                unpinned.append(
                    UnpinnedVm(vm, rules.constraints, rules.spread, rules.on_worker_lost)
                )
    return Fleet(
        tuple((w, tuple(sorted(vms, key=lambda v: v.id))) for w, vms in sorted(pinned.items())),
        tuple(sorted(unpinned, key=lambda u: u.id)),
        PlacementPolicy(record.strategy),
    )


def with_fence_marks(assignment: Assignment, rules: Mapping[str, UnpinnedRules]) -> Assignment:
    """``assignment`` as sent to its worker: each VM whose rule in
    ``rules`` is ``reschedule`` marked (see the module docstring), the
    others unmarked. The same object when no mark changes (O(VMs))."""
    vms = []
    changed = False
    for vm in assignment.vms:
        rule = rules.get(vm.id)
        mark = rule is not None and rule.on_worker_lost is OnWorkerLost.RESCHEDULE
        if mark != vm.reschedule:
            vms.append(dataclasses.replace(vm, reschedule=mark))
            changed = True
        else:
            vms.append(vm)
    if not changed:
        return assignment
    return dataclasses.replace(assignment, vms=tuple(vms))
