"""The move's state machine and its refusals (procurator.core.move): pure,
table tests over stored assignments, statuses and time."""

from __future__ import annotations

import dataclasses

import pytest

from procurator.core.models import (
    Assignment,
    Phase,
    PowerState,
    PreparedImage,
    PrepareState,
    TransferProgress,
    TransferState,
    VmAssignment,
    VmStatus,
    WorkerState,
    WorkerStatus,
)
from procurator.core.move import (
    Move,
    MoveAction,
    MoveKind,
    MovePhase,
    MoveStep,
    advance,
    check_move,
    step,
    transfer_progress,
)

PATH = "/nix/store/" + "c" * 32 + "-c"
VM = VmAssignment("a", "h1", PATH, PowerState.RUNNING, 1, 128)
STOPPED = dataclasses.replace(VM, power=PowerState.STOPPED)
MOVE = Move("a", "w1", "w2", MoveKind.COLD, MovePhase.PENDING, "op-m", 0, 1_000, image=PATH)
REPLACED = dataclasses.replace(VM, hash="h2", nix_store_path="/nix/store/" + "d" * 32 + "-d")


def on(worker: str, *vms: VmAssignment) -> dict[str, Assignment]:
    return {
        worker: Assignment(worker, 5, vms),
        ("w2" if worker == "w1" else "w1"): Assignment("x", 5),
    }


def status(
    worker: str, generation: int, phase: Phase | None = None, *prepared: PreparedImage
) -> WorkerStatus:
    vms = () if phase is None else (VmStatus("a", phase, observed_hash="h1"),)
    return WorkerStatus(worker, generation, vms, prepared=prepared)


def decide(
    move: Move,
    assignments: dict[str, Assignment],
    now: int = 10,
    lost: tuple[str, ...] = (),
    **statuses: WorkerStatus,
) -> MoveStep:
    return step(move, assignments=assignments, statuses=statuses, lost=lost, now_ms=now)


def received(worker: str, generation: int, op_id: str) -> WorkerStatus:
    done = TransferProgress("a", op_id, TransferState.RECEIVED)
    return WorkerStatus(worker, generation, (), (), (done,))


PREPARING = advance(MOVE, MovePhase.PREPARING, now_ms=1, generation=6)
STOPPING = advance(MOVE, MovePhase.STOPPING, now_ms=2, generation=7)
TRANSFERRING = advance(MOVE, MovePhase.TRANSFERRING, now_ms=2, generation=7)
SWITCHING = advance(MOVE, MovePhase.SWITCHING, now_ms=3, generation=8)


@pytest.mark.parametrize(
    ("move", "assignments", "statuses", "expected"),
    [
        # pending: prepare.
        (MOVE, on("w1", VM), {}, MoveStep(MoveAction.PREPARE)),
        # preparing: wait for the target's report of the phase's generation.
        (
            PREPARING,
            on("w1", VM),
            {"w2": status("w2", 5, None, PreparedImage(PATH, PrepareState.READY))},
            MoveStep(MoveAction.WAIT),
        ),
        (
            PREPARING,
            on("w1", VM),
            {"w2": status("w2", 6, None, PreparedImage(PATH))},
            MoveStep(MoveAction.WAIT),
        ),
        (
            PREPARING,
            on("w1", VM),
            {"w2": status("w2", 6, None, PreparedImage(PATH, PrepareState.READY))},
            MoveStep(MoveAction.STOP),
        ),
        (
            PREPARING,
            on("w1", VM),
            {
                "w2": status(
                    "w2", 6, None, PreparedImage(PATH, PrepareState.FAILED, "no substituter")
                )
            },
            MoveStep(MoveAction.FAIL, "worker w2 cannot prepare the image: no substituter"),
        ),
        # stopping: wait for the source to report the VM stopped.
        (
            STOPPING,
            on("w1", STOPPED),
            {"w1": status("w1", 6, Phase.STOPPED)},
            MoveStep(MoveAction.WAIT),
        ),
        (
            STOPPING,
            on("w1", STOPPED),
            {"w1": status("w1", 7, Phase.STOPPING)},
            MoveStep(MoveAction.WAIT),
        ),
        (
            STOPPING,
            on("w1", STOPPED),
            {"w1": status("w1", 7, Phase.STOPPED)},
            MoveStep(MoveAction.TRANSFER),
        ),
        # transferring: switch once the target has the whole set for this op.
        (
            TRANSFERRING,
            on("w1", STOPPED),
            {"w2": received("w2", 7, "op-other")},
            MoveStep(MoveAction.WAIT),
        ),
        (
            TRANSFERRING,
            on("w1", STOPPED),
            {"w2": received("w2", 6, "op-m")},
            MoveStep(MoveAction.WAIT),
        ),
        (
            TRANSFERRING,
            on("w1", STOPPED),
            {"w2": received("w2", 7, "op-m")},
            MoveStep(MoveAction.SWITCH),
        ),
        # switching: done once the target runs it.
        (
            SWITCHING,
            on("w2", VM),
            {"w2": status("w2", 7, Phase.RUNNING)},
            MoveStep(MoveAction.WAIT),
        ),
        (
            SWITCHING,
            on("w2", VM),
            {"w2": status("w2", 8, Phase.STARTING)},
            MoveStep(MoveAction.WAIT),
        ),
        (
            SWITCHING,
            on("w2", VM),
            {"w2": status("w2", 8, Phase.RUNNING)},
            MoveStep(MoveAction.DONE),
        ),
        # One moved while stopped: done once the target has it stopped
        # (prepared, with the disks it received), not before.
        (SWITCHING, on("w2", STOPPED), {}, MoveStep(MoveAction.WAIT)),
        (
            SWITCHING,
            on("w2", STOPPED),
            {"w2": status("w2", 8, Phase.PENDING)},
            MoveStep(MoveAction.WAIT),
        ),
        (
            SWITCHING,
            on("w2", STOPPED),
            {"w2": status("w2", 8, Phase.STOPPED)},
            MoveStep(MoveAction.DONE),
        ),
        # An apply wins: the VM left the source, or its power changed.
        (
            PREPARING,
            on("w1"),
            {},
            MoveStep(MoveAction.FAIL, "the VM left worker w1's assignment (an apply)"),
        ),
        (
            STOPPING,
            on("w1", VM),
            {},
            MoveStep(MoveAction.FAIL, "the VM's power was changed during the move (an apply)"),
        ),
        (
            SWITCHING,
            on("w1", VM),
            {},
            MoveStep(MoveAction.FAIL, "the VM left the target's assignment (an apply)"),
        ),
        (
            PREPARING,
            on("w1", REPLACED),
            {},
            MoveStep(MoveAction.FAIL, "the VM was replaced during the move (an apply)"),
        ),
        # Over: nothing.
        (advance(MOVE, MovePhase.DONE, now_ms=4), on("w2", VM), {}, MoveStep(MoveAction.WAIT)),
    ],
)
def test_each_phase_waits_for_its_own_report(
    move: Move,
    assignments: dict[str, Assignment],
    statuses: dict[str, WorkerStatus],
    expected: MoveStep,
) -> None:
    assert decide(move, assignments, **statuses) == expected


def test_a_worker_lost_or_the_deadline_before_the_switch_fails_and_reverts_only_a_stop() -> None:
    assert decide(PREPARING, on("w1", VM), lost=("w2",)) == MoveStep(
        MoveAction.FAIL, "the target worker w2 is lost"
    )
    assert decide(STOPPING, on("w1", STOPPED), lost=("w1",)) == MoveStep(
        MoveAction.FAIL, "the source worker w1 is lost", revert=True
    )
    assert decide(STOPPING, on("w1", STOPPED), now=1_000) == MoveStep(
        MoveAction.FAIL, "not done before the deadline (in phase stopping)", revert=True
    )
    # Past the switch nothing goes back: the VM stays the target's.
    late = decide(SWITCHING, on("w2", VM), now=1_000, lost=("w2",))
    assert late.action is MoveAction.FAIL and not late.revert
    assert "stays assigned there" in late.reason
    assert decide(SWITCHING, on("w2", VM), lost=("w1",)) == MoveStep(MoveAction.WAIT)


def test_the_same_facts_give_the_same_step() -> None:
    facts = {"w1": status("w1", 7, Phase.STOPPED)}
    assert decide(STOPPING, on("w1", STOPPED), **facts) == decide(
        STOPPING, on("w1", STOPPED), **facts
    )


def refusal(vm_id: str = "a", target: str = "w2", **kw: object) -> tuple[str, VmAssignment] | str:
    args: dict[str, object] = {
        "kind": MoveKind.COLD,
        "assignments": on("w1", VM),
        "target_state": WorkerState.READY,
        "moving": {},
        "handed_off": (),
        "in_rollout": (),
        "target_shortfall": None,
    }
    args.update(kw)
    return check_move(vm_id, target, **args)  # type: ignore[arg-type]


def test_refusals_name_the_reason() -> None:
    assert refusal() == ("w1", VM)
    assert refusal("zz") == "VM zz is not in the fleet"
    assert refusal(target="w1") == "VM a is on worker w1 already"
    assert refusal(target_state=None) == (
        "worker w2 is unknown: it never registered and has no VMs assigned"
    )
    assert refusal(target_state=WorkerState.LOST) == "worker w2 is lost: it takes no VMs"
    assert refusal(target_state=WorkerState.CORDONED) == "worker w2 is cordoned: it takes no VMs"
    assert refusal(moving={"a": "op-1"}) == (
        "VM a is moving already (move op-1: `procurator moves a`)"
    )
    assert "handoff" in str(refusal(handed_off=("a",)))
    assert "rollout" in str(refusal(in_rollout=("a",)))
    assert (
        refusal(target_shortfall="needs 1 vCPU") == "VM a does not fit on worker w2: needs 1 vCPU"
    )
    # A live move is refused for what a cold one is first.
    assert refusal(kind=MoveKind.LIVE, target_state=None) == (
        "worker w2 is unknown: it never registered and has no VMs assigned"
    )
    assert refusal(constraints=(("zone", "b"),), target_labels=(("zone", "a"),)) == (
        "worker w2 does not match VM a's constraints (zone=b): the next apply would move it back"
    )
    assert refusal(constraints=(("zone", "b"),), target_labels=(("zone", "b"),)) == ("w1", VM)
    assert "worker w2 takes no moves: it runs without --transfer-listen" in str(
        refusal(target_transfers=False)
    )


def test_a_live_move_needs_the_same_live_capable_driver_on_both_ends() -> None:
    def live(vmms: dict[str, tuple[str, bool]]) -> str:
        answer = refusal(kind=MoveKind.LIVE, vmms=vmms)
        assert isinstance(answer, str) and answer.endswith("move it cold, without --live")
        return answer

    qemu = ("qemu", True)
    assert refusal(kind=MoveKind.LIVE, vmms={"w1": qemu, "w2": qemu}) == ("w1", VM)

    assert live({"w2": qemu}).startswith(
        "the source worker w1 cannot move a running VM: it does not say it can"
    )
    assert live({"w1": qemu, "w2": ("qemu", False)}).startswith(
        "the target worker w2 cannot move a running VM: its VMM driver qemu does not say it can"
    )
    assert live({"w1": qemu, "w2": ("cloud-hypervisor", True)}).startswith(
        "VM a cannot move live from w1 (qemu) to w2 (cloud-hypervisor): both ends must run "
        "the same VMM driver"
    )


def test_a_transfers_progress_is_the_sources_bytes() -> None:
    sending = TransferProgress("a", "op-m", TransferState.SENDING, 25, 100)
    statuses = {"w1": WorkerStatus("w1", 7, (), (), (sending,))}
    assert transfer_progress(TRANSFERRING, statuses) == "25%"
    assert transfer_progress(TRANSFERRING, {}) == ""
