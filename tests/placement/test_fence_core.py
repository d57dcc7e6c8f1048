"""The worker-side fence, pure parts (procurator.core.fence): when it is
due, what it does to an entry, the master's marks, the wire, and the
reconciler fencing and unfencing the assignment it holds (against an
in-memory actuator, on trio's MockClock)."""

from __future__ import annotations

import argparse
import math
from dataclasses import replace
from typing import Any

import pytest
import trio
import trio.testing
from fencehelpers import Actuator

from procurator.cli import parsers
from procurator.core.assignments import AssignmentChanges
from procurator.core.fence import (
    DEFAULT_FENCE_AFTER,
    check_fence_after,
    fence_due,
    fence_message,
    fenced_entry,
    heartbeat_interval,
)
from procurator.core.models import (
    Assignment,
    EventKind,
    Fleet,
    OnWorkerLost,
    PowerState,
    VmAssignment,
    VmEvent,
)
from procurator.core.reconcile import Reconciler
from procurator.core.status import StatusChanges
from procurator.master.scheduling import with_fence_marks
from procurator.master.store.model import UnpinnedRules
from procurator.rpc import convert
from procurator.rpc.schema import load_schema
from procurator.worker.link import LinkSettings

PATH = "/nix/store/" + "a" * 32 + "-web"


def vm(vm_id: str, *, reschedule: bool = False, power: PowerState = PowerState.RUNNING) -> Any:
    return VmAssignment(vm_id, "h1", PATH, power, reschedule=reschedule)


# ---------------------------------------------------------------- timing


def test_the_default_is_below_two_thirds_of_the_default_lease() -> None:
    assert check_fence_after(DEFAULT_FENCE_AFTER, worker_lease=30.0) == DEFAULT_FENCE_AFTER
    # A healthy link hears from its master several times per fence delay.
    assert heartbeat_interval(DEFAULT_FENCE_AFTER) * 4 == DEFAULT_FENCE_AFTER


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, math.nan])
def test_a_fence_delay_must_be_positive_and_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="positive number of seconds"):
        check_fence_after(bad)


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan", "soon"])
def test_the_worker_refuses_a_bad_fence_after(bad: str) -> None:
    parser = argparse.ArgumentParser()
    parsers.worker(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--id", "host-a", "--fence-after", bad])
    with pytest.raises(ValueError, match="positive number of seconds"):
        LinkSettings(fence_after=float(bad) if bad != "soon" else -1)


def test_a_fence_delay_must_come_before_healing_may() -> None:
    # Healing may start 2/3 of a lease after the worker's last contact.
    with pytest.raises(ValueError, match=r"too late for a worker lease of 30 s.*\(20 s\)"):
        check_fence_after(20.0, worker_lease=30.0)
    assert check_fence_after(19.5, worker_lease=30.0) == 19.5


def test_the_fence_is_due_after_fence_after_without_contact() -> None:
    assert not fence_due(100.0, 111.9, 12.0)
    assert fence_due(100.0, 112.0, 12.0)


# ---------------------------------------------------------------- entries


def test_only_reschedule_vms_desired_running_are_fenced() -> None:
    assert fenced_entry(vm("r", reschedule=True)) == vm(
        "r", reschedule=True, power=PowerState.PAUSED
    )
    assert fenced_entry(vm("w")) is None
    assert fenced_entry(vm("s", reschedule=True, power=PowerState.STOPPED)) is None
    assert fenced_entry(vm("p", reschedule=True, power=PowerState.PAUSED)) is None
    assert "no master for 12 s" in fence_message(12.0)


def test_the_master_marks_reschedule_vms_from_the_stored_rules() -> None:
    assignment = Assignment(
        "host-a", 4, (vm("r"), vm("w"), vm("pinned"), vm("stale", reschedule=True))
    )
    rules = {
        "r": UnpinnedRules((), "", OnWorkerLost.RESCHEDULE),
        "w": UnpinnedRules((), "", OnWorkerLost.WAIT),
    }
    sent = with_fence_marks(assignment, rules)
    assert [(v.id, v.reschedule) for v in sent.vms] == [
        ("r", True),
        ("w", False),
        ("pinned", False),
        ("stale", False),  # its rule is gone: no longer marked
    ]
    assert (sent.generation, sent.op_id) == (4, assignment.op_id)
    assert with_fence_marks(sent, rules) is sent  # nothing to change: no copy


# ---------------------------------------------------------------- wire

S = load_schema()


def _roundtrip(struct: Any, fill: Any, read: Any, value: Any) -> Any:
    builder = struct.new_message()
    fill(builder, value)
    with struct.from_bytes(builder.to_bytes()) as reader:
        return read(reader)


def test_the_mark_travels_in_assignments_and_changes() -> None:
    assignment = Assignment("host-a", 3, (vm("r", reschedule=True), vm("w")), "op-1")
    got = _roundtrip(
        S.Assignment, convert.fill_assignment, convert.assignment_from_reader, assignment
    )
    assert got == assignment
    changes = AssignmentChanges("host-a", 3, 4, "op-2", (vm("r", reschedule=True),), ("w",))
    got_changes = _roundtrip(
        S.AssignmentChanges,
        convert.fill_assignment_changes,
        convert.assignment_changes_from_reader,
        changes,
    )
    assert got_changes == changes


def test_a_fleet_never_carries_the_mark() -> None:
    # Only the master decides it, from the rules: a client's mark is dropped.
    fleet = Fleet((("host-a", (vm("r", reschedule=True),)),))
    got = _roundtrip(S.Fleet, convert.fill_fleet, convert.fleet_from_reader, fleet)
    assert got.workers == (("host-a", (vm("r"),)),)


# ---------------------------------------------------------------- reconciler


async def _run(reconciler: Reconciler, nursery: trio.Nursery) -> None:
    await nursery.start(reconciler.run)


async def test_the_reconciler_pauses_reschedule_vms_and_resumes_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actuator = Actuator()
    events: list[VmEvent] = []
    statuses: list[StatusChanges] = []
    reconciler = Reconciler(
        actuator=actuator, on_status=statuses.append, worker_id="host-a", on_event=events.append
    )
    assignment = Assignment("host-a", 2, (vm("r", reschedule=True), vm("w")), "op-1")
    async with trio.open_nursery() as nursery:
        await _run(reconciler, nursery)
        reconciler.set_assignment(assignment)
        await trio.sleep(1)
        assert actuator.powers() == {"r": PowerState.RUNNING, "w": PowerState.RUNNING}

        assert reconciler.fence(fence_message(12)) == ["r"]
        assert reconciler.fence("again") == []  # fenced already: nothing new
        await trio.sleep(1)
        assert actuator.powers() == {"r": PowerState.PAUSED, "w": PowerState.RUNNING}
        assert [(e.vm_id, e.kind) for e in events] == [("r", EventKind.PAUSED)]
        assert "fenced: no master for 12 s" in events[0].message
        # What the worker holds is still the master's assignment.
        assert reconciler.assignment == assignment
        assert reconciler.observed_generation == 2

        assert reconciler.unfence() == ["r"]
        await trio.sleep(1)
        assert actuator.powers() == {"r": PowerState.RUNNING, "w": PowerState.RUNNING}
        assert not reconciler.fenced
        nursery.cancel_scope.cancel()


async def test_while_fenced_new_entries_stay_fenced_until_unfence(
    autojump_clock: trio.testing.MockClock,
) -> None:
    actuator = Actuator()
    reconciler = Reconciler(actuator=actuator, on_status=lambda _: None, worker_id="host-a")
    async with trio.open_nursery() as nursery:
        await _run(reconciler, nursery)
        reconciler.set_assignment(Assignment("host-a", 2, (vm("r", reschedule=True), vm("w"))))
        await trio.sleep(1)
        reconciler.fence("fenced")
        # The master's current assignment, handed over before the fence
        # ends: r moved away (removed), r2 new here, w kept.
        reconciler.set_assignment(Assignment("host-a", 5, (vm("w"), vm("r2", reschedule=True))))
        await trio.sleep(1)
        assert actuator.powers() == {"r2": PowerState.PAUSED, "w": PowerState.RUNNING}
        # Changes while fenced are fenced too.
        reconciler.apply_changes(
            AssignmentChanges("host-a", 5, 6, "", (vm("r3", reschedule=True),), ())
        )
        await trio.sleep(1)
        assert actuator.powers()["r3"] is PowerState.PAUSED
        assert reconciler.unfence() == ["r2", "r3"]
        await trio.sleep(1)
        assert actuator.powers() == {
            "r2": PowerState.RUNNING,
            "r3": PowerState.RUNNING,
            "w": PowerState.RUNNING,
        }
        assert reconciler.assignment is not None
        assert all(v.power is PowerState.RUNNING for v in reconciler.assignment.vms)
        nursery.cancel_scope.cancel()


def test_a_paused_entry_is_the_only_change() -> None:
    entry = vm("r", reschedule=True)
    assert fenced_entry(entry) == replace(entry, power=PowerState.PAUSED)
