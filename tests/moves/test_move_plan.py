"""What each step of a move writes (procurator.master.move.plan_move) and
what its workers are sent while it lasts (with_moves): pure."""

from __future__ import annotations

import dataclasses

from procurator.core.models import Assignment, DiskTransfer, PowerState, VmAssignment
from procurator.core.move import Move, MoveAction, MoveKind, MovePhase, MoveStep, advance
from procurator.master.move import plan_move, with_moves

PATH = "/nix/store/" + "p" * 32 + "-p"
VM = VmAssignment("a", "h1", PATH, PowerState.RUNNING, 1, 128)
OTHER = VmAssignment("b", "h2", PATH, PowerState.RUNNING, 1, 128)
MOVE = Move("a", "w1", "w2", MoveKind.COLD, MovePhase.PENDING, "op-m", 0, 1_000, image=PATH)
FLEET = {"w1": Assignment("w1", 5, (OTHER, VM)), "w2": Assignment("w2", 5, ())}
TOKEN = "f" * 32


def stopped(vm: VmAssignment) -> VmAssignment:
    return dataclasses.replace(vm, power=PowerState.STOPPED)


def test_each_step_writes_its_phase_and_the_assignments_it_changes() -> None:
    plan = plan_move(MOVE, MoveStep(MoveAction.PREPARE), FLEET, now_ms=1)
    assert plan is not None and plan.move.phase is MovePhase.PREPARING
    assert plan.changes == {"w2": ()}
    preparing = advance(MOVE, MovePhase.PREPARING, now_ms=1, generation=6)
    plan = plan_move(preparing, MoveStep(MoveAction.STOP), FLEET, now_ms=2)
    assert plan is not None and plan.changes == {"w1": (OTHER, stopped(VM))}
    fleet = {**FLEET, "w1": Assignment("w1", 6, (OTHER, stopped(VM)))}
    stopping = advance(MOVE, MovePhase.STOPPING, now_ms=2, generation=7)
    plan = plan_move(stopping, MoveStep(MoveAction.TRANSFER), fleet, now_ms=3, token=TOKEN)
    assert plan is not None and plan.move.token == TOKEN
    assert plan.changes == {"w1": (OTHER, stopped(VM)), "w2": ()}
    transferring = dataclasses.replace(plan.move, generation=8)
    plan = plan_move(transferring, MoveStep(MoveAction.SWITCH), fleet, now_ms=4)
    # The VM leaves the source with the power it had before the move.
    assert plan is not None and plan.changes == {"w1": (OTHER,), "w2": (VM,)}
    switching = advance(MOVE, MovePhase.SWITCHING, now_ms=4, generation=9)
    plan = plan_move(switching, MoveStep(MoveAction.DONE), FLEET, now_ms=5)
    assert plan is not None and plan.changes == {} and plan.move.phase is MovePhase.DONE
    assert plan_move(switching, MoveStep(MoveAction.WAIT), FLEET, now_ms=5) is None


def test_a_failure_before_the_switch_tells_both_and_a_revert_restarts_the_source() -> None:
    fleet = {**FLEET, "w1": Assignment("w1", 6, (OTHER, stopped(VM)))}
    transferring = advance(MOVE, MovePhase.TRANSFERRING, now_ms=2, generation=7)
    plan = plan_move(transferring, MoveStep(MoveAction.FAIL, "late", revert=True), fleet, now_ms=3)
    assert plan is not None and plan.move.phase is MovePhase.FAILED
    assert plan.move.reason == "late" and plan.changes == {"w1": (OTHER, VM), "w2": ()}
    assert plan.message.endswith("failed: late; it is running on w1 again")
    # An apply took the VM: nothing is put back, both still hear of the end.
    plan = plan_move(transferring, MoveStep(MoveAction.FAIL, "apply"), FLEET, now_ms=3)
    assert plan is not None and plan.changes == {"w1": (OTHER, VM), "w2": ()}


def test_the_workers_are_sent_the_image_to_prepare_and_the_transfer() -> None:
    preparing = advance(MOVE, MovePhase.PREPARING, now_ms=1, generation=6)
    sent = with_moves(FLEET["w2"], [preparing], FLEET, {"w2": "10.0.0.2:7400"})
    assert sent.prepare == (PATH,) and sent.transfers == ()
    assert with_moves(FLEET["w1"], [preparing], FLEET, {}) is FLEET["w1"]
    transferring = dataclasses.replace(
        advance(MOVE, MovePhase.TRANSFERRING, now_ms=2, generation=8), token=TOKEN
    )
    addresses = {"w2": "10.0.0.2:7400"}
    assert with_moves(FLEET["w1"], [transferring], FLEET, addresses).transfers == (
        DiskTransfer("a", "op-m", False, TOKEN, "10.0.0.2:7400"),
    )
    target = with_moves(FLEET["w2"], [transferring], FLEET, addresses)
    assert target.transfers == (DiskTransfer("a", "op-m", True, TOKEN),)
    assert target.prepare == (PATH,)  # rooted until the VM's own root takes over
    # Switching: the source sends nothing more; the target keeps hearing
    # of its transfer until the move is done, the only op whose received
    # disks the VM's first prepare there may take (also after a restart).
    switching = dataclasses.replace(transferring, phase=MovePhase.SWITCHING, generation=9)
    assert with_moves(FLEET["w1"], [switching], FLEET, addresses) is FLEET["w1"]
    target = with_moves(FLEET["w2"], [switching], FLEET, addresses)
    assert target.transfers == (DiskTransfer("a", "op-m", True, TOKEN),)
    assert target.prepare == ()  # the VM's own root now
    for over in (MovePhase.DONE, MovePhase.FAILED):
        ended = dataclasses.replace(switching, phase=over)
        assert with_moves(FLEET["w2"], [ended], FLEET, addresses) is FLEET["w2"]
