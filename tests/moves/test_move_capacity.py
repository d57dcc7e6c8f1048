"""A VM moving to a worker counts against that worker's capacity from its
move's commit until the move ends, and on its source until the switch
(docs/SCHEDULING.md "What counts against capacity", issue 30/27): every
decision fed from ``procurator.master.scheduling.worker_facts`` sees it
(``move``'s refusal, the drain duty, an apply), and the leader counts a
pending move again before its prepare, so two moves recorded at once (two
masters) cannot overfill a target. Pure: the master's view built from
stored assignments and moves, as the master builds it; one MasterService
on a real SQLite store with workers simulated in process (livesim)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import trio
from livesim import LiveSim

from procurator.core.drain import WorkerMode
from procurator.core.models import (
    Assignment,
    Capacity,
    Fleet,
    UnpinnedVm,
    VmAssignment,
    WorkerFacts,
    WorkerInfo,
    WorkerState,
)
from procurator.core.move import (
    Move,
    MoveAction,
    MoveKind,
    MovePhase,
    MoveStep,
    ahead_of,
    check_move,
    shortfall,
    step,
)
from procurator.master.drain import DrainPlan, plan_drains
from procurator.master.scheduling import KnownWorker, resolve, worker_facts
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.master.store.model import PlacementRecord, UnpinnedRules

IMAGE = "/nix/store/" + "c" * 32 + "-vm"
CORDONED = WorkerMode(WorkerState.CORDONED, "op-c", 1)
DRAINING = WorkerMode(WorkerState.DRAINING, "op-d", 1, max_unavailable=2)


def vm(vm_id: str) -> VmAssignment:
    return VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=1, memory_mib=512)


def worker(worker_id: str, memory_mib: int, mode: WorkerMode | None = None) -> KnownWorker:
    """A connected worker offering ``memory_mib`` (room for that many 512
    MiB VMs / 512) and plenty of vCPUs."""
    info = WorkerInfo(worker_id, capacity=Capacity(16, memory_mib, 0), transfer_address="t:1")
    return KnownWorker(worker_id, info, True, mode=mode)


def assignments(**vms: Iterable[str]) -> dict[str, Assignment]:
    return {w: Assignment(w, 1, tuple(vm(v) for v in ids)) for w, ids in vms.items()}


def move(vm_id: str, source: str, target: str, phase: MovePhase, kind: MoveKind) -> Move:
    return Move(vm_id, source, target, kind, phase, "op-" + vm_id, 1, 10**12, generation=2)


def facts_of(
    known: list[KnownWorker],
    fleet: dict[str, Assignment],
    moves: Iterable[Move],
    *,
    drain: bool = False,
) -> dict[str, WorkerFacts]:
    return {f.worker_id: f for f in worker_facts(known, fleet, moves=moves, drain=drain)}


def refusal(vm_id: str, target: str, fleet: dict[str, Assignment], moves: list[Move]) -> str:
    """What ``procurator move`` answers, fed as the master feeds it."""
    known = [worker("host-s", 4096), worker("host-t", 1024)]
    facts = facts_of(known, fleet, moves)
    moving = {m.vm_id: m.op_id for m in moves if not m.over}
    source_vm = next(v for a in fleet.values() for v in a.vms if v.id == vm_id)
    answer = check_move(
        vm_id,
        target,
        kind=MoveKind.COLD,
        assignments=fleet,
        target_state=WorkerState.READY,
        moving=moving,
        handed_off=(),
        in_rollout=(),
        target_shortfall=shortfall(source_vm, facts[target], fleet[target].vms),
    )
    return answer if isinstance(answer, str) else ""


def test_a_second_move_to_a_target_with_room_for_one_is_refused_naming_capacity() -> None:
    # host-t offers 1024 MiB and holds t1 (512): room for one more VM.
    fleet = assignments(**{"host-s": ["x", "y"], "host-t": ["t1"]})
    assert refusal("y", "host-t", fleet, []) == ""
    for kind in MoveKind:
        first = move("x", "host-s", "host-t", MovePhase.PREPARING, kind)
        why = refusal("y", "host-t", fleet, [first])
        assert why == (
            "VM y does not fit on worker host-t: needs 1 vCPU/512 MiB; it has 14 vCPU/0 MiB "
            "and 19998 VM slot(s) free"
        ), kind
        # The moving VM still counts on its source until the switch.
        source = facts_of([worker("host-s", 1024)], fleet, [first])["host-s"]
        assert shortfall(vm("z"), source, fleet["host-s"].vms) is not None
        # A failed move stops counting on its target.
        failed = move("x", "host-s", "host-t", MovePhase.FAILED, kind)
        assert refusal("y", "host-t", fleet, [failed]) == ""
    # Switched: x is the target's (its assignment holds it), counted once.
    switched = move("x", "host-s", "host-t", MovePhase.SWITCHING, MoveKind.LIVE)
    after = assignments(**{"host-s": ["y"], "host-t": ["t1", "x"]})
    assert facts_of([worker("host-t", 1024)], after, [switched])["host-t"].incoming == ()
    assert "does not fit on worker host-t" in refusal("y", "host-t", after, [switched])


def drain_pass(moves: list[Move], fleet: dict[str, Assignment]) -> DrainPlan:
    """One pass of the drain duty over host-d (draining), host-t (the only
    ready worker: room for two VMs) and host-w (cordoned)."""
    known = [
        worker("host-d", 4096, DRAINING),
        worker("host-t", 1024),
        worker("host-w", 4096, CORDONED),
    ]
    return plan_drains(
        assignments=fleet,
        modes={"host-d": DRAINING, "host-w": CORDONED},
        statuses={},
        handoffs=(),
        facts=facts_of(known, fleet, moves, drain=True).values(),
        record=PlacementRecord({v: UnpinnedRules() for v in ("a", "b", "c", "x")}),
        now_ms=5,
    )


def test_a_drain_does_not_fill_a_target_that_a_move_under_way_holds() -> None:
    fleet = assignments(**{"host-d": ["a"], "host-t": ["t1"], "host-w": ["x"]})
    assert [h.vm_id for h in drain_pass([], fleet).start] == ["a"]
    # x moving to host-t (an operator's `procurator move`) takes its last
    # room: the drain starts nothing and says why (docs: blocked), until
    # the move ends.
    for kind in MoveKind:
        moving = move("x", "host-w", "host-t", MovePhase.PREPARING, kind)
        plan = drain_pass([moving], fleet)
        assert plan.start == [], kind
        assert plan.blocked["host-d"].startswith("a: needs 1 vCPU/512 MiB; best worker"), plan
        over = move("x", "host-w", "host-t", MovePhase.FAILED, kind)
        assert [h.vm_id for h in drain_pass([over], fleet).start] == ["a"]


def test_a_drains_own_live_moves_count_once_and_fill_the_target_one_by_one() -> None:
    fleet = assignments(**{"host-d": ["a", "b"], "host-t": []})
    plan = drain_pass([], fleet)
    assert [(h.vm_id, h.target) for h in plan.start] == [("a", "host-t"), ("b", "host-t")]
    # a and b on their way to host-t (its room for two): the next pass
    # counts each there once, so the drain is not blocked by its own moves
    # (the service gives a moving VM no handoff).
    both = [move(v, "host-d", "host-t", MovePhase.MIGRATING, MoveKind.LIVE) for v in "ab"]
    plan = drain_pass(both, fleet)
    assert "host-d" not in plan.blocked, plan.blocked
    assert {(h.vm_id, h.target) for h in plan.start} == {("a", "host-t"), ("b", "host-t")}
    # A third VM of the drain has no room while they move.
    fleet = assignments(**{"host-d": ["a", "b", "c"], "host-t": []})
    plan = drain_pass(both, fleet)
    assert plan.start == [] and plan.blocked["host-d"].startswith("c: needs"), plan


def test_an_apply_places_a_new_vm_beside_a_target_full_with_its_incoming_move() -> None:
    # host-a holds t1 and x is moving to it (full); host-b is empty. Binpack
    # would take host-a, the best fit, if x did not count there.
    stored = assignments(**{"host-a": ["t1"], "host-b": [], "host-w": ["x"]})
    known = [worker("host-a", 1024), worker("host-b", 1024), worker("host-w", 4096, CORDONED)]
    fleet = Fleet(
        (("host-a", (vm("t1"),)), ("host-w", (vm("x"),))),
        (UnpinnedVm(vm("new")),),
    )
    moving = move("x", "host-w", "host-a", MovePhase.TRANSFERRING, MoveKind.COLD)
    for moves, where in (([], "host-a"), ([moving], "host-b")):
        facts = worker_facts(known, stored, moves=moves)
        _, placement = resolve(fleet, facts, stored)
        assert placement is not None
        assert [(p.vm_id, p.worker_id) for p in placement.vms] == [("new", where)], moves


def test_the_view_names_each_targets_incoming_vms_as_their_source_has_them() -> None:
    stored = assignments(**{"host-s": ["x", "y", "z"], "host-t": []})
    moves = [
        move("y", "host-s", "host-t", MovePhase.STOPPING, MoveKind.COLD),
        move("x", "host-s", "host-t", MovePhase.PENDING, MoveKind.LIVE),
        move("z", "host-s", "host-t", MovePhase.DONE, MoveKind.COLD),
        move("gone", "host-s", "host-t", MovePhase.PREPARING, MoveKind.COLD),
    ]
    facts = facts_of([worker("host-t", 1024)], stored, moves)
    assert facts["host-t"].incoming == (vm("x"), vm("y"))
    assert facts["host-s"].incoming == ()


def test_the_leader_fails_a_pending_move_whose_room_went_to_one_ahead_of_it() -> None:
    fleet = assignments(**{"host-s": ["x", "y"], "host-t": ["t1"]})
    first = move("x", "host-s", "host-t", MovePhase.PENDING, MoveKind.LIVE)
    second = replace(first, vm_id="y", op_id="op-y", started_unix_ms=2)
    # Both recorded at once (two masters' refusals each saw only the
    # other's absence): the one recorded first is ahead, whatever its phase.
    assert ahead_of(second, [first, second]) == [first]
    assert ahead_of(first, [first, second]) == []
    assert ahead_of(first, [first, replace(second, phase=MovePhase.PREPARING)]) == [
        replace(second, phase=MovePhase.PREPARING)
    ]
    known = [worker("host-s", 4096), worker("host-t", 1024)]
    for m in (first, second):
        facts = facts_of(known, fleet, ahead_of(m, [first, second]))
        room = shortfall(vm(m.vm_id), facts["host-t"], fleet["host-t"].vms)
        answer = step(m, assignments=fleet, statuses={}, lost=(), now_ms=5, target_shortfall=room)
        if m is first:
            assert answer == MoveStep(MoveAction.PREPARE)
        else:
            assert answer.action is MoveAction.FAIL and not answer.revert
            assert answer.reason.startswith("VM y does not fit on worker host-t any more: needs")
    # Only a pending move is refused so: one under way keeps its room.
    going = replace(second, phase=MovePhase.PREPARING)
    answer = step(going, assignments=fleet, statuses={}, lost=(), now_ms=5, target_shortfall="x")
    assert answer.action is MoveAction.WAIT


async def test_a_master_fails_the_later_of_two_moves_recorded_at_once_into_room_for_one(
    tmp_path: Path,
) -> None:
    big = {v: VmAssignment(v, "h-" + v, IMAGE, vcpus=1, memory_mib=2048) for v in ("x", "y", "t1")}
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store, push_timeout=1.0, worker_lease=60, leader_lease=1.0)
        await nursery.start(service.run)
        for sim in (LiveSim(service, "host-s"), LiveSim(service, "host-t")):
            await sim.start(nursery)  # 4096 MiB each
        await service.apply(Fleet((("host-s", (big["x"], big["y"])), ("host-t", (big["t1"],))), ()))
        # What two masters' `move`s at once leave in the store: each
        # refusal saw host-t with room for one.
        for vm_id, started in (("x", 1), ("y", 2)):
            pending = Move(
                vm_id,
                "host-s",
                "host-t",
                MoveKind.LIVE,
                MovePhase.PENDING,
                "op-" + vm_id,
                started,
                10**13,
                image=IMAGE,
            )
            await store.start_move(pending)
        with trio.fail_after(30):  # a hang guard
            while any(m.phase is MovePhase.PENDING for m in await service.moves()):
                await trio.sleep(0.02)
        phases = {m.vm_id: (m.phase, m.reason) for m in await service.moves()}
        assert phases["x"][0] is not MovePhase.FAILED, phases
        assert phases["y"][0] is MovePhase.FAILED, phases
        assert phases["y"][1].startswith("VM y does not fit on worker host-t any more"), phases
        nursery.cancel_scope.cancel()
