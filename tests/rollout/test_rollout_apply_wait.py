"""``apply --wait`` follows the rollout the apply started
(procurator.cli.apply._follow_rollout): a line per change of progress,
exit 0 when done, 7 when failed or reverted, 3 at the deadline. The
master is a hand-written fake of the two control calls it makes."""

from __future__ import annotations

import argparse
import io

import trio

from procurator.cli.apply import _follow_rollout
from procurator.cli.exits import EXIT_OK, EXIT_ROLLOUT_FAILED, EXIT_TIMEOUT
from procurator.core.control import FleetStatus
from procurator.core.rollout import RolloutView, RolloutVmView


def shown(phase: str, prepared: int = 0, batches: int = 0, *states: str) -> RolloutView:
    vms = tuple(RolloutVmView(f"vm-{i}", "w0", state) for i, state in enumerate(states))
    return RolloutView(
        "ro-1", "op-1", phase, "VM vm-1 on w0: not healthy" if phase == "reverted" else "",
        batches=batches, prepared_workers=prepared, prepare_workers=2, vms=vms,
    )  # fmt: skip


class FakeControl:
    """Answers ``rollout`` from a script, one answer per status change."""

    def __init__(self, answers: list[RolloutView]) -> None:
        self.answers = answers
        self.index = 0

    async def rollout(self, rollout_id: str) -> RolloutView:
        await trio.lowlevel.checkpoint()  # as a call over the wire
        assert rollout_id == "ro-1"
        return self.answers[min(self.index, len(self.answers) - 1)]

    async def status(self, *, wait_index: int = 0, wait: float = 0.0) -> FleetStatus:
        await trio.sleep(0.001)  # as a blocking read that a change answers
        self.index += 1
        return FleetStatus(1, (), self.index)


ARGS = argparse.Namespace(interval=0.01)


async def follow(answers: list[RolloutView], deadline: float = 10.0) -> tuple[int, str]:
    out = io.StringIO()
    code = await _follow_rollout(
        FakeControl(answers),  # type: ignore[arg-type]
        "ro-1",
        trio.current_time() + deadline,
        out,
        ARGS,
    )
    return code, out.getvalue()


async def test_progress_is_printed_once_per_change_and_done_is_exit_0() -> None:
    code, out = await follow(
        [
            shown("preparing", 0),
            shown("preparing", 0),
            shown("preparing", 2),
            shown("switching", 2, 1, "switching", "switching", "waiting"),
            shown("done", 2, 2, "healthy", "healthy", "healthy"),
        ]
    )
    assert code == EXIT_OK
    assert out.splitlines() == [
        "rollout ro-1: preparing: prepared 0/2 workers",
        "rollout ro-1: preparing: prepared 2/2 workers",
        "rollout ro-1: switching: batch 1: 1 waiting, 2 switching, 0 healthy, 0 failed",
        "rollout ro-1: done: batch 2: 0 waiting, 0 switching, 3 healthy, 0 failed",
    ]


async def test_a_reverted_rollout_is_exit_7() -> None:
    code, _ = await follow([shown("switching", 2, 1, "switching"), shown("reverted", 2, 1)])
    assert code == EXIT_ROLLOUT_FAILED == 7


async def test_the_deadline_is_exit_3() -> None:
    code, _ = await follow([shown("preparing", 0)], deadline=0.2)
    assert code == EXIT_TIMEOUT
