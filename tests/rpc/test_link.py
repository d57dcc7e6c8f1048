"""MasterLink logic against a fake dialer, on trio's MockClock (no bridge)."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
import trio.testing

from procurator.core.assignments import AssignmentChanges, AssignmentUpdate
from procurator.core.errors import (
    PermanentError,
    ProcuratorError,
    UnavailableError,
    UnsupportedError,
    ValidationError,
)
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    EventKind,
    Phase,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges, apply_status_changes
from procurator.worker.link import LinkSettings, MasterLink, OnAssignment


class FakeSession:
    def __init__(self, master: FakeMaster, on_push: OnAssignment) -> None:
        self.master = master
        self.on_push = on_push
        self._gone = trio.Event()
        self.block_reports = False
        self.status: WorkerStatus | None = None

    @property
    def connected(self) -> bool:
        return not self._gone.is_set()

    def drop(self) -> None:
        self._gone.set()

    async def wait_disconnected(self) -> None:
        await self._gone.wait()

    def _check(self) -> None:
        if self._gone.is_set():
            raise UnavailableError("connection lost")

    async def get_assignment(self, known_generation: int) -> Assignment | None:
        self._check()
        self.master.pulls.append(known_generation)
        current = self.master.assignment
        return None if current.generation == known_generation else current

    async def report_status(self, status: WorkerStatus) -> None:
        self._check()
        if self.master.slow_reports:
            await self.master.release_reports.wait()
        self.status = status
        self.master.whole.append(status)
        self.master.statuses.append(status)
        self.master.order.append("whole")

    async def report_status_changes(self, changes: StatusChanges) -> None:
        """As the master does: merged into this session's last status."""
        self._check()
        self.master.changes.append(changes)
        if self.master.changes_refusal is not None:
            raise self.master.changes_refusal
        if self.status is None:
            raise ValidationError("no full status on this session")
        self.status = apply_status_changes(self.status, changes)
        self.master.statuses.append(self.status)

    async def report_metrics(self, samples: Sequence[MetricSample], *, call_timeout: float) -> None:
        """As the real session: the report crosses as
        ``master.metrics_calls`` calls (a big one, in slices), each bounded
        by ``call_timeout`` and taking ``master.metrics_call_seconds``."""
        self._check()
        if self.master.slow_reports:
            await self.master.release_reports.wait()
        for _ in range(self.master.metrics_calls):
            with trio.fail_after(call_timeout):
                await trio.sleep(self.master.metrics_call_seconds)
        self.master.metrics.append(tuple(samples))

    async def report_events(self, events: Sequence[VmEvent]) -> None:
        self._check()
        if self.master.refuse_events:
            raise ValidationError("bad events")
        self.master.events.extend(events)
        self.master.order.append("events")

    async def report_status_and_events(
        self, changes: StatusChanges, events: Sequence[VmEvent]
    ) -> PermanentError | None:
        """As the master does: the changes (raising: the events are not
        looked at), then the events (their refusal answered)."""
        self._check()
        self.master.together.append((changes, tuple(events)))
        if self.master.slow_reports:
            await self.master.release_reports.wait()
            self._check()
        if self.master.no_together:
            raise UnsupportedError("reportStatusAndEvents: the peer does not implement it")
        await self.report_status_changes(changes)
        try:
            await self.report_events(events)
        except PermanentError as exc:
            return exc
        return None

    async def aclose(self) -> None:
        self._gone.set()


class FakeMaster:
    def __init__(self) -> None:
        self.up = False
        self.assignment = Assignment("host-a", 0)
        self.sessions: list[FakeSession] = []
        self.attempts: list[float] = []
        self.pulls: list[int] = []
        self.statuses: list[WorkerStatus] = []  # as merged, one per report
        self.whole: list[WorkerStatus] = []  # whole reports
        self.changes: list[StatusChanges] = []  # change reports (refused too)
        self.changes_refusal: ProcuratorError | None = None
        self.metrics: list[tuple[MetricSample, ...]] = []
        self.events: list[VmEvent] = []
        self.slow_reports = False
        self.release_reports = trio.Event()
        self.metrics_calls = 1
        self.metrics_call_seconds = 0.0
        self.refuse_events = False
        # Combined reports (refused ones too); an older master has none.
        self.together: list[tuple[StatusChanges, tuple[VmEvent, ...]]] = []
        self.no_together = False
        self.order: list[str] = []  # whole status reports and events taken, in turn

    async def connect(self, info: WorkerInfo, on_push: OnAssignment) -> FakeSession:
        self.attempts.append(trio.current_time())
        if not self.up:
            raise UnavailableError("connection refused")
        session = FakeSession(self, on_push)
        self.sessions.append(session)
        return session


class Recorder:
    """The handler: records each update's generation (a whole assignment's
    plain, changes as ``(base, generation)``); takes changes only to the
    generation it holds, as the reconciler does."""

    def __init__(self) -> None:
        self.seen: list[int | tuple[int, int]] = []
        self.updates: list[AssignmentUpdate] = []
        self.generation = 0

    async def __call__(self, update: AssignmentUpdate) -> bool:
        self.updates.append(update)
        if isinstance(update, AssignmentChanges):
            self.seen.append((update.base_generation, update.generation))
            if update.base_generation != self.generation:
                return False
        else:
            self.seen.append(update.generation)
        self.generation = update.generation
        return True


SETTINGS = LinkSettings(
    resync_interval=10, call_timeout=5, backoff_initial=1, backoff_max=8, jitter=0.0
)


def make_link(master: FakeMaster, settings: LinkSettings = SETTINGS) -> tuple[MasterLink, Recorder]:
    recorder = Recorder()
    link = MasterLink(
        master, WorkerInfo("host-a"), recorder, settings=settings, rng=random.Random(1)
    )
    return link, recorder


async def test_ready_at_once_then_backs_off_exponentially(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    link, _ = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        assert not link.connected
        await trio.sleep(40)
        gaps = [b - a for a, b in zip(master.attempts, master.attempts[1:], strict=False)]
        assert gaps[:5] == [1, 2, 4, 8, 8]
        master.up = True
        with trio.fail_after(10):
            await link.wait_connected()
        nursery.cancel_scope.cancel()


async def test_jitter_spreads_delays() -> None:
    link, _ = make_link(FakeMaster(), LinkSettings(backoff_initial=1, jitter=0.5))
    delays = {link._backoff(1) for _ in range(20)}
    assert len(delays) > 1 and all(0.5 <= d <= 1.5 for d in delays)


async def test_pulls_on_connect_and_resyncs(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster()
    master.up = True
    master.assignment = Assignment("host-a", 3)
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(1)
        assert recorder.seen == [3]
        master.assignment = Assignment("host-a", 4)  # a lost push
        await trio.sleep(SETTINGS.resync_interval + 1)
        assert recorder.seen == [3, 4]
        assert master.pulls[:2] == [0, 3]
        nursery.cancel_scope.cancel()


async def test_old_and_duplicate_pushes_are_ignored(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster()
    master.up = True
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await link.wait_connected()
        push = master.sessions[0].on_push
        await push(Assignment("host-a", 5))
        await push(Assignment("host-a", 4))
        await push(Assignment("host-a", 5))
        await push(Assignment("host-b", 9))
        await trio.sleep(1)
        assert recorder.seen == [5]
        assert link.newest_generation == 5
        assert link.assignments_ignored == 2
        nursery.cancel_scope.cancel()


async def test_status_is_coalesced_and_resent_after_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    master.up = True
    link, _ = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await link.wait_connected()
        master.slow_reports = True
        link.publish_status(WorkerStatus("host-a", 1))
        await trio.sleep(0.1)
        for generation in range(2, 10):
            link.publish_status(WorkerStatus("host-a", generation))
        master.release_reports.set()
        await trio.sleep(1)
        assert [s.observed_generation for s in master.statuses] == [1, 9]
        master.sessions[0].drop()
        await trio.sleep(5)
        assert link.connected and len(master.sessions) == 2
        assert [s.observed_generation for s in master.statuses] == [1, 9, 9]
        with pytest.raises(ValueError, match="host-b"):
            link.publish_status(WorkerStatus("host-b", 1))
        nursery.cancel_scope.cancel()


def fleet_status(generation: int, **phases: Phase) -> WorkerStatus:
    """host-a with vm-0..vm-3 running, but those named in ``phases``."""
    return WorkerStatus(
        "host-a",
        generation,
        tuple(VmStatus(f"vm-{i}", phases.get(f"vm_{i}", Phase.RUNNING)) for i in range(4)),
    )


@contextlib.asynccontextmanager
async def reporting_link(master: FakeMaster) -> AsyncIterator[MasterLink]:
    """A link to ``master`` (up) that has reported ``fleet_status(1)``
    whole; cancelled on the way out."""
    master.up = True
    link, _ = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await link.wait_connected()
        link.publish_status(fleet_status(1))
        await trio.sleep(1)
        yield link
        nursery.cancel_scope.cancel()


async def test_after_a_whole_status_only_what_changed_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    async with reporting_link(master) as link:
        link.publish_status(fleet_status(1, vm_2=Phase.STARTING))
        await trio.sleep(1)
        link.publish_status(fleet_status(2))
        await trio.sleep(1)
        assert master.whole == [fleet_status(1)]
        assert [(c.observed_generation, [v.id for v in c.changed]) for c in master.changes] == [
            (1, ["vm-2"]),
            (2, ["vm-2"]),
        ]
        assert master.statuses[-1] == fleet_status(2)
        # A new session starts with a whole status again.
        master.sessions[0].drop()
        await trio.sleep(5)
        assert len(master.sessions) == 2 and master.whole == [fleet_status(1), fleet_status(2)]
        # After the first whole report of a session, changes are the only
        # path, even when every VM changed.
        failed = {f"vm_{i}": Phase.FAILED for i in range(4)}
        link.publish_status(fleet_status(3, **failed))
        await trio.sleep(1)
        assert len(master.whole) == 2 and len(master.changes[-1].changed) == 4
        assert master.statuses[-1] == fleet_status(3, **failed)
        # What the handler publishes as changes travels as they are.
        link.publish_status_changes(
            StatusChanges(
                "host-a", 4, changed=(VmStatus("vm-9", Phase.STARTING),), removed=("vm-0",)
            )
        )
        await trio.sleep(1)
        assert master.changes[-1] == StatusChanges(
            "host-a", 4, changed=(VmStatus("vm-9", Phase.STARTING),), removed=("vm-0",)
        )
        assert {v.id for v in master.statuses[-1].vms} == {"vm-1", "vm-2", "vm-3", "vm-9"}


@pytest.mark.parametrize("unsupported", [False, True])
async def test_a_refused_change_report_is_followed_by_a_whole_status(
    autojump_clock: trio.testing.MockClock, unsupported: bool
) -> None:
    master = FakeMaster()
    master.changes_refusal = (
        UnsupportedError("reportStatusChanges: the peer does not implement it")
        if unsupported
        else ValidationError("status changes remove VM 'vm-9', which the last status did not")
    )
    async with reporting_link(master) as link:
        link.publish_status(fleet_status(2, vm_1=Phase.FAILED))
        await trio.sleep(1)
        assert len(master.changes) == 1
        assert master.whole == [fleet_status(1), fleet_status(2, vm_1=Phase.FAILED)]
        link.publish_status(fleet_status(3, vm_1=Phase.FAILED))
        await trio.sleep(1)
        # An older master is not asked again on this session; any other
        # refusal was about that one report.
        assert len(master.changes) == (1 if unsupported else 2)
        assert master.whole[-1] == fleet_status(3, vm_1=Phase.FAILED)
        assert link.connected and len(master.sessions) == 1


def _burst(link: MasterLink, generation: int, vm_id: str) -> StatusChanges:
    """A new VM's status and its event, published in one trio turn (as the
    runtime does in a burst of starts); the changes published."""
    changes = StatusChanges("host-a", generation, changed=(VmStatus(vm_id, Phase.RUNNING),))
    link.publish_events([VmEvent(vm_id, EventKind.BOOTED)])
    link.publish_status_changes(changes)
    return changes


async def test_status_changes_and_the_events_queued_with_them_go_in_one_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    async with reporting_link(master) as link:
        changes = _burst(link, 2, "vm-5")
        await trio.sleep(1)
        assert master.together == [(changes, (VmEvent("vm-5", EventKind.BOOTED),))]
        assert master.changes == [changes]
        assert master.statuses[-1] == WorkerStatus(
            "host-a", 2, (*fleet_status(1).vms, *changes.changed)
        )
        assert master.events == [VmEvent("vm-5", EventKind.BOOTED)]
        # Either alone goes alone.
        link.publish_events([VmEvent("vm-6", EventKind.CRASHED)])
        await trio.sleep(1)
        link.publish_status(fleet_status(3, vm_2=Phase.FAILED))
        await trio.sleep(1)
        assert len(master.together) == 1 and len(master.changes) == 2
        assert [e.vm_id for e in master.events] == ["vm-5", "vm-6"]
        assert master.statuses[-1] == fleet_status(3, vm_2=Phase.FAILED)  # vm-5 removed


async def test_refused_status_changes_send_the_whole_status_then_their_events_alone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    async with reporting_link(master) as link:
        master.changes_refusal = ValidationError("status changes name VM 'vm-1' twice")
        _burst(link, 2, "vm-5")
        await trio.sleep(1)
        assert len(master.together) == 1
        # The master did not look at the events: they went after the
        # whole status, once.
        changes = master.changes[0]
        assert master.whole == [
            fleet_status(1),
            WorkerStatus("host-a", 2, (*fleet_status(1).vms, *changes.changed)),
        ]
        assert master.events == [VmEvent("vm-5", EventKind.BOOTED)]
        assert master.order == ["whole", "whole", "events"]
        assert link.connected and len(master.sessions) == 1


async def test_events_refused_in_a_combined_call_are_dropped_and_the_status_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    async with reporting_link(master) as link:
        master.refuse_events = True
        _burst(link, 2, "vm-5")
        await trio.sleep(1)
        master.refuse_events = False
        changes = _burst(link, 3, "vm-7")
        await trio.sleep(1)
        assert (
            [c for c, _ in master.together]
            == master.changes
            == [
                StatusChanges("host-a", 2, changed=(VmStatus("vm-5", Phase.RUNNING),)),
                changes,
            ]
        )
        assert master.whole == [fleet_status(1)]  # the status was taken: no whole again
        assert master.events == [VmEvent("vm-7", EventKind.BOOTED)]
        assert link.connected and len(master.sessions) == 1


async def test_an_older_master_gets_status_changes_and_events_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    master.no_together = True
    async with reporting_link(master) as link:
        first = _burst(link, 2, "vm-5")
        await trio.sleep(1)
        second = _burst(link, 3, "vm-6")
        await trio.sleep(1)
        # Asked once on this session; nothing of that call was taken.
        assert [c for c, _ in master.together] == [first]
        assert master.changes == [first, second] and master.whole == [fleet_status(1)]
        assert master.events == [
            VmEvent("vm-5", EventKind.BOOTED),
            VmEvent("vm-6", EventKind.BOOTED),
        ]


async def test_a_combined_call_lost_with_the_session_is_sent_again(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    async with reporting_link(master) as link:
        master.slow_reports = True  # the changes' report waits...
        _burst(link, 2, "vm-5")
        await trio.sleep(0.5)
        assert len(master.together) == 1 and master.events == []
        master.sessions[0].drop()  # ...and the connection breaks
        master.slow_reports = False
        master.release_reports.set()
        await trio.sleep(5)
        assert len(master.sessions) == 2
        # The next session starts whole, then sends the events (kept).
        assert master.whole[-1] == WorkerStatus(
            "host-a", 2, (*fleet_status(1).vms, VmStatus("vm-5", Phase.RUNNING))
        )
        assert master.events == [VmEvent("vm-5", EventKind.BOOTED)]


async def test_metrics_drop_and_events_buffer_while_away(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    link, _ = make_link(master, LinkSettings(max_buffered_events=3, event_batch=2, backoff_max=1))
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        link.publish_metrics([MetricSample("m", 1.0)])
        link.publish_metrics([MetricSample("m", 2.0)])
        link.publish_events([VmEvent(f"vm-{i}", EventKind.BOOTED) for i in range(5)])
        assert (link.metrics_dropped, link.events_dropped) == (1, 2)
        master.up = True
        await trio.sleep(5)
        assert master.metrics == [(MetricSample("m", 2.0),)]
        assert [e.vm_id for e in master.events] == ["vm-2", "vm-3", "vm-4"]
        # Refused events are dropped, not resent forever.
        master.refuse_events = True
        link.publish_events([VmEvent("vm-9", EventKind.CRASHED)])
        await trio.sleep(1)
        master.refuse_events = False
        link.publish_events([VmEvent("vm-10", EventKind.CRASHED)])
        await trio.sleep(1)
        assert [e.vm_id for e in master.events][-1] == "vm-10"
        assert "vm-9" not in [e.vm_id for e in master.events]
        nursery.cancel_scope.cancel()


async def test_a_hanging_call_ends_the_session(autojump_clock: trio.testing.MockClock) -> None:
    master = FakeMaster()
    master.up = True
    link, _ = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await link.wait_connected()
        master.slow_reports = True  # never released
        link.publish_status(WorkerStatus("host-a", 1))
        await trio.sleep(SETTINGS.call_timeout + 3)
        assert len(master.sessions) == 2
        assert not master.sessions[0].connected
        nursery.cancel_scope.cancel()


async def test_a_metrics_report_in_several_calls_is_bounded_call_by_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A big metrics report crosses as several calls: each one within the
    call timeout is progress, however long all of them take together; one
    call that hangs ends the session."""
    master = FakeMaster()
    master.up = True
    link, _ = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await link.wait_connected()
        master.metrics_calls = 3
        master.metrics_call_seconds = SETTINGS.call_timeout * 0.6
        sample = MetricSample("procurator_vms", 1.0)
        link.publish_metrics([sample])
        await trio.sleep(SETTINGS.call_timeout * 3)
        assert master.metrics == [(sample,)]
        assert len(master.sessions) == 1 and master.sessions[0].connected
        master.metrics_call_seconds = SETTINGS.call_timeout + 1
        link.publish_metrics([sample])
        await trio.sleep(SETTINGS.call_timeout * 2)
        assert len(master.sessions) == 2
        assert not master.sessions[0].connected
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- assignment changes


def changes(
    base: int, generation: int, *ids: str, removed: tuple[str, ...] = ()
) -> AssignmentChanges:
    upserted = tuple(VmAssignment(i, "a" * 32, f"/nix/store/{'a' * 32}-{i}") for i in ids)
    return AssignmentChanges("host-a", base, generation, f"op-{generation}", upserted, removed)


async def test_changes_to_the_newest_generation_are_delivered_and_composed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    master.up = True
    master.assignment = Assignment("host-a", 3)
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(1)
        push = master.sessions[0].on_push
        await push(changes(3, 4, "a"))
        await trio.sleep(1)
        # Two updates while the handler is busy arrive as one.
        await push(changes(4, 5, "b"))
        await push(changes(5, 6, "c", removed=("a",)))
        await push(changes(5, 6, "c"))  # a duplicate: ignored
        await trio.sleep(1)
        assert recorder.seen == [3, (3, 4), (4, 6)]
        last = recorder.updates[-1]
        assert isinstance(last, AssignmentChanges)
        assert [v.id for v in last.upserted] == ["b", "c"] and last.removed == ("a",)
        assert link.newest_generation == 6 and master.pulls == [0]
        nursery.cancel_scope.cancel()


async def test_changes_to_another_generation_fetch_the_whole_assignment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A lost update: the next one does not apply to what the worker has;
    it pulls the whole assignment at once, not at the next resync."""
    master = FakeMaster()
    master.up = True
    master.assignment = Assignment("host-a", 3)
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(1)
        master.assignment = Assignment("host-a", 5)  # 3 -> 4 was lost on the way
        await master.sessions[0].on_push(changes(4, 5, "b"))
        await trio.sleep(0.5)  # well before the resync
        assert recorder.seen == [3, 5]
        assert master.pulls == [0, 0]  # known generation 0: the whole one
        assert link.whole_pulls == 1
        # Changes from there on apply again.
        await master.sessions[0].on_push(changes(5, 6, "c"))
        await trio.sleep(0.5)
        assert recorder.seen == [3, 5, (5, 6)]
        nursery.cancel_scope.cancel()


async def test_changes_the_handler_cannot_apply_fetch_the_whole_assignment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    master.up = True
    master.assignment = Assignment("host-a", 3)
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(1)
        recorder.generation = 2  # the handler holds something else than the link thinks
        master.assignment = Assignment("host-a", 4)
        await master.sessions[0].on_push(changes(3, 4, "a"))
        await trio.sleep(0.5)
        # The whole assignment of the same generation is taken this once.
        assert recorder.seen == [3, (3, 4), 4]
        assert recorder.generation == 4 and link.whole_pulls == 1
        nursery.cancel_scope.cancel()


async def test_a_lost_update_is_healed_by_the_resync(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = FakeMaster()
    master.up = True
    master.assignment = Assignment("host-a", 3)
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(1)
        master.assignment = Assignment("host-a", 4)  # its update never arrives
        await trio.sleep(SETTINGS.resync_interval)
        assert recorder.seen == [3, 4]
        assert master.pulls == [0, 3]
        nursery.cancel_scope.cancel()


async def test_changes_go_on_across_a_reconnect(autojump_clock: trio.testing.MockClock) -> None:
    """A reconnect pulls with the newest generation seen: the master that
    has nothing newer answers "unchanged", and its later updates apply to
    what the worker holds."""
    master = FakeMaster()
    master.up = True
    master.assignment = Assignment("host-a", 3)
    link, recorder = make_link(master)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.run)
        await trio.sleep(1)
        await master.sessions[0].on_push(changes(3, 4, "a"))
        master.assignment = Assignment("host-a", 4)
        await trio.sleep(1)
        master.sessions[0].drop()
        await trio.sleep(5)
        assert len(master.sessions) == 2 and master.pulls == [0, 4]
        await master.sessions[1].on_push(changes(4, 5, "b"))
        await trio.sleep(1)
        assert recorder.seen == [3, (3, 4), (4, 5)]
        nursery.cancel_scope.cancel()
