"""The leader's drain duty, decided: which handoffs complete, which are
called off, which start, and which drains are blocked or finished
(docs/SCHEDULING.md, ``procurator.core.drain``).

``plan_drains`` is a pure function of what the master holds (assignments,
workers' modes and reported statuses, handoffs, the stored placement
rules); ``MasterService._drain`` feeds it and commits its answer, one
generation per drain op id, fenced by the leader's epoch. A pass that
finds nothing to do writes nothing, so the duty can run often.

- **Complete** a handoff once its target reports the VM ``running`` with
  the hash the source's assignment wants, in a status of the generation
  that started the handoff or newer (an older report says nothing of it).
- **Call off** a handoff whose drain is over (uncordon, or another drain
  of the worker), whose VM left its source's assignment (an apply removed
  it), or whose target is lost: the original keeps running.
- **In flight** for a drain: its handoffs under way, and its VMs whose
  handoff completed but whose original the drained worker has not yet
  confirmed stopping (its pending removals): until then the VM runs
  twice. ``max_unavailable`` bounds them together.
- **Start** handoffs for each draining worker: the scheduler places the
  stored fleet with that worker ``draining`` and every VM in handoff
  already on its target (so capacity counts it, and the scheduler keeps
  it there), and every VM of a move under way counted on its target too
  (``worker_facts``: ``WorkerFacts.incoming``); the answer's moves off the
  worker, in its order, are the candidates, and ``next_batch`` takes as many as keep the drain's
  handoffs in flight at most ``max_unavailable``. Pinned VMs stay.
- **Live moves first** (``live_or_handoff``): a VM to start whose both
  ends' workers move running VMs with the same VMM driver (and the
  target takes moves: a transfer address) goes by a live move
  (``procurator move --live``, docs/SNAPSHOTS.md), which never runs it
  twice; else, or once a live move of it failed during this drain (the
  source refused it: a cloud-hypervisor VM with writable disks, say), by
  a handoff. Moves under way off a draining worker count as in flight.
- **Blocked**: when a VM of the drained worker fits nowhere, the drain
  starts nothing more and says why (the scheduler's shortfall line);
  handoffs in flight go on. Each pass tries again, so it resumes when room
  appears. **Finished**: no unpinned VM left on the worker and nothing in
  flight: the worker stays cordoned, with its progress.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from procurator.core.drain import Handoff, WorkerMode, next_batch
from procurator.core.models import (
    Assignment,
    Phase,
    Unplaceable,
    VmAssignment,
    WorkerFacts,
    WorkerState,
    WorkerStatus,
)
from procurator.core.move import Move, MoveKind, MovePhase
from procurator.core.placement import place
from procurator.master.scheduling import stored_fleet
from procurator.master.store.model import PlacementRecord

__all__ = ["DrainPlan", "live_or_handoff", "plan_drains"]


@dataclass
class DrainPlan:
    """What one pass of the drain duty does (see the module docstring).
    ``blocked``: worker id -> why its drain cannot go on ("": it can
    again), only where that changes."""

    complete: list[Handoff] = field(default_factory=list)
    cancel: list[Handoff] = field(default_factory=list)
    start: list[Handoff] = field(default_factory=list)
    blocked: dict[str, str] = field(default_factory=dict)
    finished: list[str] = field(default_factory=list)


def _running_there(status: WorkerStatus | None, vm: VmAssignment, since: int) -> bool:
    if status is None or status.observed_generation < since:
        return False
    return any(
        s.id == vm.id and s.phase is Phase.RUNNING and s.observed_hash == vm.hash
        for s in status.vms
    )


def plan_drains(
    *,
    assignments: Mapping[str, Assignment],
    modes: Mapping[str, WorkerMode],
    statuses: Mapping[str, WorkerStatus | None],
    handoffs: Iterable[Handoff],
    facts: Iterable[WorkerFacts],
    record: PlacementRecord,
    now_ms: int,
    stopping: Mapping[str, int] | None = None,
) -> DrainPlan:
    """One pass of the drain duty. ``facts``: every worker as the
    scheduler sees it for a drain (``worker_facts(..., drain=True)``);
    ``stopping``: by worker, the VMs taken off it that it has not yet
    confirmed stopping (its pending removals)."""
    plan = DrainPlan()
    facts = tuple(facts)
    lost = {f.worker_id for f in facts if f.state is WorkerState.LOST}
    vms_of = {w: {vm.id: vm for vm in a.vms} for w, a in assignments.items()}
    staying: list[Handoff] = []
    for h in sorted(handoffs, key=lambda h: h.vm_id):
        mode = modes.get(h.source)
        vm = vms_of.get(h.source, {}).get(h.vm_id)
        if (
            vm is None
            or mode is None
            or mode.state is not WorkerState.DRAINING
            or mode.op_id != h.op_id
            or h.target in lost
        ):
            plan.cancel.append(h)
        elif _running_there(statuses.get(h.target), vm, h.generation):
            plan.complete.append(h)
        else:
            staying.append(h)
    draining = {
        w: m for w, m in sorted(modes.items()) if m.state is WorkerState.DRAINING and w not in lost
    }
    if not draining:
        return plan
    # The fleet as it will be once the handoffs that stay have completed.
    previous = {w: list(a.vms) for w, a in assignments.items()}
    moving = {h.vm_id: h for h in (*staying, *plan.complete)}
    for h in moving.values():
        vm = vms_of[h.source][h.vm_id]
        previous[h.source] = [v for v in previous[h.source] if v.id != h.vm_id]
        previous.setdefault(h.target, []).append(vm)
    fleet = stored_fleet({w: Assignment(w, 0, tuple(vms)) for w, vms in previous.items()}, record)
    # In flight: a handoff under way, or completed and its original not yet
    # confirmed stopped (the VM still runs twice until then).
    stopping = stopping or {}
    in_flight = {
        w: sum(1 for h in (*staying, *plan.complete) if h.source == w) + stopping.get(w, 0)
        for w in draining
    }
    left = {w: [v.id for v in previous.get(w, ()) if v.id in record.unpinned] for w in draining}
    for worker_id in draining:
        if not left[worker_id] and not any(h.source == worker_id for h in staying):
            plan.finished.append(worker_id)
    active = [w for w in draining if left[w] and w not in plan.finished]
    stopped: dict[str, str] = {}
    while active:
        # A drain whose VM fits nowhere is blocked; the others are placed
        # again without it (its worker then counts as cordoned).
        scheduled = tuple(
            f if f.state is not WorkerState.DRAINING or f.worker_id in active else _cordoned(f)
            for f in facts
        )
        answer = place(fleet, scheduled, previous)
        if not isinstance(answer, Unplaceable):
            break
        owners = {v.id: w for w in active for v in previous.get(w, ())}
        hit = {owners[s.vm_id]: s.message for s in answer.vms if s.vm_id in owners}
        if not hit:
            # Something other than the drained VMs fits nowhere (the
            # fleet changed under the drain): block every drain for now.
            hit = {w: answer.message for w in active}
        for worker_id, why in hit.items():
            stopped.setdefault(worker_id, why)
        active = [w for w in active if w not in stopped]
    else:
        answer = None
    for worker_id, mode in draining.items():
        why = stopped.get(worker_id, "")
        if why != mode.blocked and worker_id not in plan.finished:
            plan.blocked[worker_id] = why
    if answer is None:
        return plan
    for worker_id in active:
        moves = [
            p
            for p in answer.vms
            if p.moved and p.previous_worker == worker_id and p.vm_id not in moving
        ]
        chosen = set(
            next_batch(
                [p.vm_id for p in moves], in_flight[worker_id], draining[worker_id].max_unavailable
            )
        )
        plan.start.extend(
            Handoff(p.vm_id, worker_id, p.worker_id, draining[worker_id].op_id, 0, now_ms)
            for p in moves
            if p.vm_id in chosen
        )
    return plan


def _cordoned(facts: WorkerFacts) -> WorkerFacts:
    return replace(facts, state=WorkerState.CORDONED)


def live_or_handoff(
    starts: Iterable[Handoff],
    *,
    modes: Mapping[str, WorkerMode],
    moves: Iterable[Move],
    vmms: Mapping[str, tuple[str, bool]],
    transfers: Iterable[str],
) -> tuple[list[Handoff], list[Handoff]]:
    """``starts`` split into those that go by a live move and those that go
    by a handoff (see the module docstring). ``moves``: the moves the
    store keeps (under way and the newest over); ``vmms``: each worker's
    VMM driver and whether it moves running VMs; ``transfers``: the
    workers that take moves (a transfer address)."""
    takes = set(transfers)
    live: list[Handoff] = []
    handoff: list[Handoff] = []
    moves = tuple(moves)
    for h in starts:
        mode = modes.get(h.source)
        since = mode.since_unix_ms if mode is not None else 0
        failed = any(
            (m.vm_id, m.source, m.kind, m.phase)
            == (h.vm_id, h.source, MoveKind.LIVE, MovePhase.FAILED)
            and m.started_unix_ms >= since
            for m in moves
        )
        source = vmms.get(h.source, ("", False))
        target = vmms.get(h.target, ("", False))
        able = source[1] and target[1] and source[0] == target[0] and h.target in takes
        (live if able and not failed else handoff).append(h)
    return live, handoff
