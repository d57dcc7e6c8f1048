"""``procurator move --wait --timeout S`` and a live move its deadline
cancels (issue 30): the deadline finds it ``migrating``, the leader asks
the source to stop (``cancelling``) and the source's verdict ends it,
after S. Before, ``--wait`` stopped at S and exited 3 "not over" while the
move was about to end; it now follows such a move up to a stated grace
(``CANCEL_GRACE_S``), and says plainly what a verdict still missing then
means. A hand-written master (the ``MoveWatch`` port) whose move's phases
follow trio's clock (a MockClock: no real time passes)."""

from __future__ import annotations

import dataclasses

import pytest
import trio
import trio.testing

from procurator.cli import parsers
from procurator.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from procurator.cli.move import CANCEL_GRACE_S, wait_for_move
from procurator.core.control import FleetStatus
from procurator.core.models import PowerState
from procurator.core.move import Move, MoveKind, MovePhase

MOVE = Move(
    "vm-1",
    "host-a",
    "host-b",
    MoveKind.LIVE,
    MovePhase.MIGRATING,
    "op-1",
    1_000,
    31_000,
    PowerState.RUNNING,
    42,
)


class Master:
    """The move's phase at each time (seconds since the start): the last
    entry at or before now."""

    def __init__(self, script: list[tuple[float, MovePhase]], move: Move = MOVE) -> None:
        self.start = trio.current_time()
        self.script = script
        self.move = move

    def phase(self) -> MovePhase:
        now = trio.current_time() - self.start
        return [phase for at, phase in self.script if at <= now][-1]

    async def status(self, *, wait_index: int = 0, wait: float = 0.0) -> FleetStatus:
        # A blocking read: answers when the phase changes, or after wait.
        before = self.phase()
        with trio.move_on_after(wait):
            while self.phase() is before:
                await trio.sleep(0.1)
        return FleetStatus(1, (), change_index=wait_index + 1)

    async def moves(self, vm_id: str = "") -> tuple[Move, ...]:
        phase = self.phase()
        reason = "not done before the deadline" if phase is MovePhase.CANCELLING else ""
        return (dataclasses.replace(self.move, phase=phase, reason=reason),)


@pytest.mark.parametrize(
    ("verdict", "code"), [(MovePhase.FAILED, EXIT_FAILED), (MovePhase.DONE, EXIT_OK)]
)
async def test_wait_follows_a_cancelling_move_to_its_verdict(
    autojump_clock: trio.testing.MockClock,
    capsys: pytest.CaptureFixture[str],
    verdict: MovePhase,
    code: int,
) -> None:
    # --timeout 30: the deadline at 30 s, cancelling from 31 s, the
    # source's verdict at 40 s.
    master = Master([(0, MovePhase.MIGRATING), (31, MovePhase.CANCELLING), (40, verdict)])
    assert await wait_for_move(master, MOVE, 30.0, False) == code
    out = capsys.readouterr().out
    assert ": cancelling: not done before the deadline" in out, out
    assert f": {verdict.value}" in out and "not over" not in out, out


async def test_wait_says_what_a_cancelling_move_without_verdict_means(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    master = Master([(0, MovePhase.MIGRATING), (31, MovePhase.CANCELLING)])
    assert await wait_for_move(master, MOVE, 30.0, False, grace=60.0) == EXIT_TIMEOUT
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == (
        "move op-1: cancelling after 90 s: the source host-a has been asked to stop the "
        "migration and has not said how it ended; check `procurator moves vm-1`"
    ), last


async def test_wait_for_a_move_not_migrating_ends_at_its_timeout(
    autojump_clock: trio.testing.MockClock, capsys: pytest.CaptureFixture[str]
) -> None:
    cold = dataclasses.replace(MOVE, kind=MoveKind.COLD, phase=MovePhase.TRANSFERRING)
    master = Master([(0, MovePhase.TRANSFERRING), (45, MovePhase.DONE)], cold)
    started = trio.current_time()
    assert await wait_for_move(master, cold, 30.0, False) == EXIT_TIMEOUT
    assert trio.current_time() - started == pytest.approx(30.0)
    assert capsys.readouterr().out.splitlines()[-1] == "move op-1: not over after 30 s; it goes on"


def test_the_help_states_the_grace() -> None:
    assert CANCEL_GRACE_S == 60.0
    assert "up to 60 s more" in parsers._MOVE_DESCRIPTION
