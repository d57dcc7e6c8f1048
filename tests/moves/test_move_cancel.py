"""A live move that fails while migrating (issue 30): the leader never
fails it behind the back of a source that may still complete it. With the
source connected, a deadline, an apply or a lost target asks the source
to cancel (``cancelling``), and the source's verdict ends the move; only
a lost source fails it at once. Pure: procurator.core.move's ``step`` and
procurator.master.move's plan and transfers."""

from __future__ import annotations

import dataclasses

import pytest

from procurator.core.errors import ValidationError
from procurator.core.models import (
    Assignment,
    DiskTransfer,
    PowerState,
    TransferProgress,
    TransferState,
    VmAssignment,
    WorkerStatus,
)
from procurator.core.move import (
    Move,
    MoveAction,
    MoveKind,
    MovePhase,
    MoveStep,
    advance,
    step,
)
from procurator.master.move import plan_move, with_moves
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

PATH = "/nix/store/" + "c" * 32 + "-c"
VM = VmAssignment("a", "h1", PATH, PowerState.RUNNING, 1, 128)
TOKEN = "ab" * 16
MOVE = dataclasses.replace(
    Move("a", "w1", "w2", MoveKind.LIVE, MovePhase.PENDING, "op-m", 0, 1_000, image=PATH),
    token=TOKEN,
)
MIGRATING = advance(MOVE, MovePhase.MIGRATING, now_ms=2, generation=7)
DEADLINE = "not done before the deadline (in phase migrating)"
CANCELLING = advance(MIGRATING, MovePhase.CANCELLING, now_ms=1_001, generation=9, reason=DEADLINE)
ON_SOURCE = {"w1": Assignment("w1", 5, (VM,)), "w2": Assignment("w2", 5)}


def reports(worker: str, generation: int, state: TransferState, **kw: object) -> WorkerStatus:
    progress = TransferProgress("a", "op-m", state, **kw)  # type: ignore[arg-type]
    return WorkerStatus(worker, generation, (), (), (progress,))


READY = reports("w2", 6, TransferState.READY, memory="10.0.0.2:7401")
SENDING = reports("w1", 7, TransferState.SENDING, done=30, total=120)


def decide(
    move: Move,
    *statuses: WorkerStatus,
    assignments: dict[str, Assignment] = ON_SOURCE,
    now: int = 10,
    lost: tuple[str, ...] = (),
) -> MoveStep:
    return step(
        move,
        assignments=assignments,
        statuses={s.worker_id: s for s in statuses},
        lost=lost,
        now_ms=now,
    )


def test_a_deadline_apply_or_lost_target_mid_migration_asks_the_source_to_cancel() -> None:
    assert decide(MIGRATING, READY, SENDING, now=1_000) == MoveStep(MoveAction.CANCEL, DEADLINE)
    lost = decide(MIGRATING, READY, SENDING, lost=("w2",))
    assert lost == MoveStep(MoveAction.CANCEL, "the target worker w2 is lost")
    paused = {"w1": Assignment("w1", 8, (dataclasses.replace(VM, power=PowerState.PAUSED),))}
    changed = decide(MIGRATING, READY, SENDING, assignments=paused)
    assert changed.action is MoveAction.CANCEL and "power was changed" in changed.reason
    # A target that lost its incoming VM: the source's stream breaks, and
    # its verdict still decides (it could have been through).
    gone = reports("w2", 7, TransferState.FAILED, message="the worker restarted")
    assert decide(MIGRATING, gone, SENDING) == MoveStep(
        MoveAction.CANCEL, "worker w2 lost the incoming VM: the worker restarted"
    )
    # The cancel: a generation for the source only, which is sent its
    # transfer without a peer; the target keeps its incoming VMM (a late
    # "sent" still switches to it) and the image.
    plan = plan_move(MIGRATING, MoveStep(MoveAction.CANCEL, DEADLINE), ON_SOURCE, now_ms=1_001)
    assert plan is not None and plan.changes == {"w1": (VM,)}
    assert plan.move.phase is MovePhase.CANCELLING and plan.move.reason == DEADLINE
    cancelling = dataclasses.replace(plan.move, generation=9)
    source = with_moves(ON_SOURCE["w1"], [cancelling], ON_SOURCE, {}, {"w2": READY})
    assert source.transfers == (DiskTransfer("a", "op-m", False, TOKEN, live=True),)
    target = with_moves(ON_SOURCE["w2"], [cancelling], ON_SOURCE, {}, {"w2": READY})
    assert target.transfers == (DiskTransfer("a", "op-m", True, TOKEN, live=True, incoming=VM),)
    assert target.prepare == (PATH,)


def test_a_lost_source_fails_a_migrating_move_at_once() -> None:
    """Its migration cannot complete without its worker (QEMU waits at
    the switchover for the worker's migrate-continue, cloud-hypervisor's
    stream runs through the worker's relay)."""
    for move in (MIGRATING, CANCELLING):
        answer = decide(move, READY, SENDING, lost=("w1",))
        assert answer.action is MoveAction.FAIL and not answer.revert
        assert answer.reason.endswith("the source worker w1 is lost"), answer


def test_a_cancelling_move_ends_by_the_sources_verdict_only() -> None:
    # No verdict yet: it waits, past the deadline, with the target lost.
    for kw in ({}, {"now": 9_000}, {"lost": ("w2",)}):
        assert decide(CANCELLING, READY, SENDING, **kw) == MoveStep(MoveAction.WAIT)  # type: ignore[arg-type]
    # A report of the migrate's generation, older than the cancel's, is
    # still the verdict: the source keeps it while the op is assigned.
    failed = reports("w1", 9, TransferState.FAILED, message="the move was cancelled")
    answer = decide(CANCELLING, READY, failed, now=9_000)
    assert answer == MoveStep(
        MoveAction.FAIL,
        f"{DEADLINE}; the migration cancelled on w1: the move was cancelled; the VM runs on there",
    )
    # Too late to cancel: the source sent it. The move is done, late: the
    # switch.
    sent = reports("w1", 9, TransferState.SENT, done=1, total=1)
    for kw in ({}, {"now": 9_000}, {"lost": ("w1",)}, {"lost": ("w2",)}):
        assert decide(CANCELLING, READY, sent, **kw) == MoveStep(MoveAction.SWITCH)  # type: ignore[arg-type]
    plan = plan_move(CANCELLING, MoveStep(MoveAction.SWITCH), ON_SOURCE, now_ms=9_001)
    assert plan is not None and plan.changes == {"w1": (), "w2": (VM,)}
    # The fail after a cancel: both hear of it (the target drops its
    # incoming VMM only now), and the source's VM keeps its power.
    plan = plan_move(CANCELLING, answer, ON_SOURCE, now_ms=9_001)
    assert plan is not None and plan.move.phase is MovePhase.FAILED
    assert plan.changes == {"w1": (VM,), "w2": ()}


def test_the_cancel_crosses_the_wire() -> None:
    """A live source's transfer without a peer is valid (the worker's
    link refused it, reconnecting until the move ended: the cancel never
    arrived); a cold source's still needs its peer."""
    schema = load_schema()

    def roundtrip(assignment: Assignment) -> Assignment:
        builder = schema.Assignment.new_message()
        convert.fill_assignment(builder, assignment)
        with schema.Assignment.from_bytes(builder.to_bytes()) as reader:
            return convert.assignment_from_reader(reader)

    cancel = Assignment(
        "w1", 9, (VM,), "op-m", (), (DiskTransfer("a", "op-m", False, TOKEN, live=True),)
    )
    assert roundtrip(cancel) == cancel
    cold = Assignment("w1", 9, (VM,), "op-m", (), (DiskTransfer("a", "op-m", False, TOKEN),))
    with pytest.raises(ValidationError, match=r"transfers\[0\].peer: must be HOST:PORT"):
        roundtrip(cold)
