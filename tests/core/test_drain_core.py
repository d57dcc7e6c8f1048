"""The pure parts of cordon and drain (procurator.core.drain): the batch a
drain starts, a mode change's answer, a worker's state."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procurator.core.drain import (
    ModeAction,
    WorkerMode,
    change_mode,
    check_max_unavailable,
    next_batch,
    worker_state,
)
from procurator.core.errors import ValidationError
from procurator.core.models import WorkerState

MOVES = ["web-1", "web-2", "web-3"]


@pytest.mark.parametrize(
    ("in_flight", "bound", "batch"),
    [
        (0, 1, ["web-1"]),
        (0, 2, ["web-1", "web-2"]),
        (0, 5, MOVES),
        (1, 1, []),
        (1, 2, ["web-1"]),
        (3, 2, []),  # a bound lowered mid-drain: wait for handoffs to finish
    ],
)
def test_a_batch_tops_the_handoffs_in_flight_up_to_the_bound(
    in_flight: int, bound: int, batch: list[str]
) -> None:
    assert next_batch(MOVES, in_flight, bound) == batch


@given(
    moves=st.lists(st.text("abc", min_size=1, max_size=3), unique=True, max_size=20),
    in_flight=st.integers(0, 30),
    bound=st.integers(1, 30),
)
def test_a_batch_never_passes_the_bound_and_takes_the_first_moves(
    moves: list[str], in_flight: int, bound: int
) -> None:
    batch = next_batch(moves, in_flight, bound)
    assert in_flight + len(batch) <= max(bound, in_flight)
    assert batch == moves[: len(batch)]
    # As many as allowed: a drain never idles with room and moves left.
    assert len(batch) == min(len(moves), max(0, bound - in_flight))


CORDONED = WorkerMode(WorkerState.CORDONED, "op-c", 1)
DRAINING = WorkerMode(WorkerState.DRAINING, "op-d", 1, 2, 1, 4)


@pytest.mark.parametrize(
    ("current", "action", "bound", "changed", "after", "message"),
    [
        (None, ModeAction.CORDON, 1, True, CORDONED, "worker w cordoned: it takes no new VMs"),
        (CORDONED, ModeAction.CORDON, 1, False, CORDONED, "worker w is cordoned already"),
        (DRAINING, ModeAction.CORDON, 1, False, DRAINING, "worker w is draining already"),
        (None, ModeAction.UNCORDON, 1, False, None, "worker w is ready already"),
        (CORDONED, ModeAction.UNCORDON, 1, True, None, "worker w uncordoned: it takes new VMs"),
        (
            DRAINING,
            ModeAction.UNCORDON,
            1,
            True,
            None,
            "worker w uncordoned: it takes new VMs (drain op-d ended at 1/4 moved)",
        ),
        (
            CORDONED,
            ModeAction.DRAIN,
            3,
            True,
            WorkerMode(WorkerState.DRAINING, "op-c", 1, 3, 0, 4),
            "worker w draining (op op-c): 4 unpinned VM(s) to move, at most 3 at once; "
            "1 pinned VM(s) stay",
        ),
        (
            DRAINING,
            ModeAction.DRAIN,
            2,
            False,
            DRAINING,
            "worker w is draining already (op op-d, 1/4 moved)",
        ),
        (
            DRAINING,
            ModeAction.DRAIN,
            5,
            True,
            WorkerMode(WorkerState.DRAINING, "op-d", 1, 5, 1, 4),
            "worker w: drain op-d goes on with max unavailable 5",
        ),
    ],
)
def test_a_mode_change_is_idempotent_and_says_what_it_did(
    current: WorkerMode | None,
    action: ModeAction,
    bound: int,
    changed: bool,
    after: WorkerMode | None,
    message: str,
) -> None:
    op = "op-c" if action is not ModeAction.UNCORDON else "op-u"
    answer = change_mode(
        "w", current, action, op_id=op, now_ms=1, max_unavailable=bound, total=4, pinned=1
    )
    assert (answer.changed, answer.mode, answer.message) == (changed, after, message)


def test_a_drain_bound_is_checked() -> None:
    assert check_max_unavailable(0) == "max unavailable must be 1-1000, not 0"
    assert check_max_unavailable(1000) is None
    with pytest.raises(ValidationError, match="not 1001"):
        change_mode("w", None, ModeAction.DRAIN, op_id="o", now_ms=1, max_unavailable=1001)


def test_lost_wins_over_a_mode_and_no_mode_is_ready() -> None:
    assert worker_state(CORDONED, lost=True) is WorkerState.LOST
    assert worker_state(DRAINING, lost=False) is WorkerState.DRAINING
    assert worker_state(None, lost=False) is WorkerState.READY
