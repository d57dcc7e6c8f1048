"""Metrics reports as changes over the wire: a real ``MasterService`` on a
real SQLite store and socket, the worker's real ``CapnpMasterSession``. A
session's first report is whole, later ones carry what moved or ended; a
restarted master gets a whole report on the new session; a change the
master holds no base for is refused and the whole report follows in the
same call, leaving the master with exactly the worker's series. A report
of more than ``MAX_SERIES_PER_SLICE`` series crosses as several calls, which
compose to what the one report would leave, let the session's other calls
pass between them, and when one is refused the next report is whole."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from rpchelpers import served

from procurator.core.errors import ValidationError
from procurator.core.metrics import MAX_SERIES_PER_SLICE, MetricSample, MetricsReport, series_of
from procurator.core.models import Assignment, Fleet, VmEvent, WorkerInfo
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import Address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer, CapnpMasterSession, open_control
from procurator.rpc.convert import fill_metrics, metrics_from_reader
from procurator.rpc.schema import load_schema

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]


class Recording:
    """The master's backend port over a real ``MasterService``, recording
    the metrics reports it is handed (and what it answered)."""

    def __init__(self, service: MasterService) -> None:
        self.service = service
        self.reports: list[tuple[MetricsReport, str]] = []
        # The metrics and events calls in the order they arrived.
        self.arrivals: list[str] = []
        # Awaited when a metrics call arrives, before it is applied.
        self.on_metrics: Callable[[int], Awaitable[None]] | None = None
        # The metrics call (counted from 0) refused, as a master without the
        # base would refuse it.
        self.refuse_call: int | None = None

    async def report_events(self, token: int, events: Sequence[VmEvent]) -> None:
        self.arrivals.append("events")
        await self.service.report_events(token, events)

    async def report_metrics(self, token: int, report: MetricsReport) -> None:
        call = self.arrivals.count("metrics")
        self.arrivals.append("metrics")
        if self.on_metrics is not None:
            await self.on_metrics(call)
        try:
            if call == self.refuse_call:
                raise ValidationError("refused on purpose: this master lost the base")
            await self.service.report_metrics(token, report)
        except Exception as exc:
            self.reports.append((report, type(exc).__name__))
            raise
        self.reports.append((report, "ok"))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    def held(self) -> dict[Any, MetricSample]:
        return series_of(self.service.worker_metrics()["host-a"][1])

    def kinds(self) -> list[tuple[str, str]]:
        kinds = [("whole" if r.whole else "change", answer) for r, answer in self.reports]
        self.reports.clear()
        return kinds


@contextlib.asynccontextmanager
async def served_master(
    service: MasterService, bridge: Bridge
) -> AsyncIterator[tuple[Recording, Address]]:
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        master = Recording(service)
        async with served(bridge, master) as address:  # type: ignore[arg-type]
            yield master, address
        nursery.cancel_scope.cancel()


async def _ignore(assignment: Assignment) -> None:
    return None


@contextlib.asynccontextmanager
async def _reporting(
    tmp_path: Path, bridge: Bridge
) -> AsyncIterator[tuple[Recording, CapnpMasterSession]]:
    """A real master on SQLite, served, and a session of worker host-a's
    with it (closed after)."""
    async with (
        await FleetStore.open(tmp_path / "m.db") as store,
        served_master(MasterService(store), bridge) as (master, address),
    ):
        session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
        try:
            yield master, session
        finally:
            await session.aclose()


def _vm(name: str, vm_id: str, value: float) -> MetricSample:
    return MetricSample(name, value, vm_id)


async def test_changes_cross_the_wire_and_a_lost_base_gets_the_whole_report(
    tmp_path: Path, bridge: Bridge, fleet_of: FleetOf
) -> None:
    cpu1 = _vm("procurator_vm_cpu_seconds_total", "web-1", 1.0)
    cpu2 = _vm("procurator_vm_cpu_seconds_total", "web-2", 2.0)
    gen = MetricSample("procurator_worker_observed_generation", 1.0)
    async with await FleetStore.open(tmp_path / "m.db") as store:
        service = MasterService(store)
        async with served_master(service, bridge) as (master, address):
            async with open_control(bridge, address) as control:
                await control.apply(fleet_of({"host-a": [("web-1", "a"), ("web-2", "b")]}))
            dialer = CapnpMasterDialer(bridge, address)
            session = await dialer.connect(WorkerInfo("host-a"), _ignore)
            try:
                await session.report_metrics([cpu1, cpu2, gen])
                assert master.kinds() == [("whole", "ok")]
                moved = _vm("procurator_vm_cpu_seconds_total", "web-1", 1.5)
                await session.report_metrics([moved, cpu2, gen])
                assert master.reports[0][0].samples == (moved,)
                assert master.kinds() == [("change", "ok")]
                assert master.held() == series_of([moved, cpu2, gen])
                await session.report_metrics([moved, gen])  # web-2's series ended
                assert master.reports[0][0].ended == (
                    ("procurator_vm_cpu_seconds_total", "web-2", ()),
                )
                assert master.kinds() == [("change", "ok")]
                assert master.held() == series_of([moved, gen])
            finally:
                await session.aclose()
    # The master restarts: it holds nothing of the worker, whose new
    # session reports whole first.
    async with await FleetStore.open(tmp_path / "m.db") as store:
        service = MasterService(store)
        async with served_master(service, bridge) as (master, address):
            dialer = CapnpMasterDialer(bridge, address)
            fresh = await dialer.connect(WorkerInfo("host-a"), _ignore)
            try:
                await fresh.report_metrics([moved, gen])
                assert master.kinds() == [("whole", "ok")]
                assert master.held() == series_of([moved, gen])
            finally:
                await fresh.aclose()
            # A session whose worker believes the master holds its last
            # report when it does not (the base of an earlier session: what
            # a master restart under a live session would leave): the
            # change is refused, the whole report follows in the same call.
            later = await dialer.connect(WorkerInfo("host-a"), _ignore)
            try:
                # The lost base, on purpose: this session given the last one's.
                later._series = fresh._series
                back = _vm("procurator_vm_cpu_seconds_total", "web-2", 3.0)
                await later.report_metrics([moved, back, gen])
                assert master.kinds() == [("change", "ValidationError"), ("whole", "ok")]
                assert master.held() == series_of([moved, back, gen])
                # ...and changes again from there.
                await later.report_metrics([moved, gen])
                assert master.kinds() == [("change", "ok")]
                assert master.held() == series_of([moved, gen])
            finally:
                await later.aclose()


def _worker_series(count: int, value: float = 1.0) -> list[MetricSample]:
    """``count`` worker-wide series (no VM to assign), each of its own label."""
    return [
        MetricSample("procurator_worker_reconcile_seconds_total", value, "", (("n", str(n)),))
        for n in range(count)
    ]


async def test_a_big_report_crosses_as_bounded_slices_that_compose(
    tmp_path: Path, bridge: Bridge
) -> None:
    big = _worker_series(2 * MAX_SERIES_PER_SLICE + 500)
    async with _reporting(tmp_path, bridge) as (master, session):
        await session.report_metrics(big)
        assert master.kinds() == [("whole", "ok"), ("change", "ok"), ("change", "ok")]
        assert master.held() == series_of(big)
        # A change as big: half the series moved, the rest ended.
        half = len(big) // 2
        moved = _worker_series(half, value=2.0)
        await session.report_metrics(moved)
        sizes = [len(r.samples) + len(r.ended) for r, _ in master.reports]
        assert sizes == [MAX_SERIES_PER_SLICE, MAX_SERIES_PER_SLICE, len(big) - 4_000]
        assert master.kinds() == [("change", "ok")] * 3
        assert master.held() == series_of(moved)


async def test_the_sessions_other_calls_pass_between_a_big_reports_slices(
    tmp_path: Path, bridge: Bridge
) -> None:
    big = _worker_series(3 * MAX_SERIES_PER_SLICE)
    async with _reporting(tmp_path, bridge) as (master, session):

        async def report_events_meanwhile(call: int) -> None:
            # An events report sent once the big report is under way, by
            # the same worker session, is answered before the big
            # report's last call arrives: it did not wait behind it.
            if call == 0:
                await session.report_events([])

        master.on_metrics = report_events_meanwhile
        await session.report_metrics(big)
        assert master.arrivals == ["metrics", "events", "metrics", "metrics"]
        assert master.held() == series_of(big)


async def test_a_refused_slice_leaves_no_base_and_the_whole_report_follows(
    tmp_path: Path, bridge: Bridge
) -> None:
    big = _worker_series(2 * MAX_SERIES_PER_SLICE + 10)
    async with _reporting(tmp_path, bridge) as (master, session):
        # A whole report's second slice refused: the call fails, the
        # master holds part of it, and the next report is whole.
        master.refuse_call = 1
        try:
            await session.report_metrics(big)
        except ValidationError:
            pass
        else:
            raise AssertionError("the refused slice did not fail the report")
        assert master.kinds() == [("whole", "ok"), ("change", "ValidationError")]
        master.refuse_call = None
        master.arrivals.clear()
        await session.report_metrics(big)
        assert master.kinds() == [("whole", "ok"), ("change", "ok"), ("change", "ok")]
        assert master.held() == series_of(big)
        # A change's second slice refused: the whole report follows
        # in the same call.
        master.arrivals.clear()
        master.refuse_call = 1
        moved = _worker_series(len(big), value=3.0)
        await session.report_metrics(moved)
        assert master.kinds() == [
            ("change", "ok"),
            ("change", "ValidationError"),
            ("whole", "ok"),
            ("change", "ok"),
            ("change", "ok"),
        ]
        assert master.held() == series_of(moved)
        master.refuse_call = None
        master.arrivals.clear()
        await session.report_metrics(big)
        assert [kind for kind, _ in master.kinds()] == ["change"] * 3
        assert master.held() == series_of(big)


async def test_a_hung_call_of_a_report_fails_it_and_the_next_is_whole(
    tmp_path: Path, bridge: Bridge
) -> None:
    """``call_timeout`` bounds a report's calls: a master that hangs on one
    fails the report (``TooSlowError``), and the next report is whole.
    That the bound is per call, not over a big report's slices together,
    is tests/rpc/test_link.py's, on trio's mock clock: real time here only
    waits out a call that never ends."""
    big = _worker_series(2 * MAX_SERIES_PER_SLICE + 10)
    async with _reporting(tmp_path, bridge) as (master, session):
        unhang = trio.Event()

        async def hang(call: int) -> None:
            await unhang.wait()

        master.on_metrics = hang
        with pytest.raises(trio.TooSlowError):
            await session.report_metrics(big, call_timeout=0.5)
        assert master.arrivals == ["metrics"]
        # The hung call ends (or was cancelled when the worker gave
        # up on it): either way the worker holds no base now.
        unhang.set()
        await trio.testing.wait_all_tasks_blocked()
        master.kinds()
        master.on_metrics = None
        await session.report_metrics(big, call_timeout=3600)
        assert master.kinds() == [("whole", "ok"), ("change", "ok"), ("change", "ok")]
        assert master.held() == series_of(big)


class _OlderMasterSession(CapnpMasterSession):
    """A session with a master that predates changes: the real master's
    answers, read as an older master's (no ``takesChanges``)."""

    async def _send_metrics(self, report: MetricsReport, call_timeout: float | None) -> bool:
        await super()._send_metrics(report, call_timeout)
        return False


async def test_an_older_master_gets_each_report_whole_in_one_call(
    tmp_path: Path, bridge: Bridge
) -> None:
    big = _worker_series(MAX_SERIES_PER_SLICE + 10)
    async with _reporting(tmp_path, bridge) as (master, session):
        session.__class__ = _OlderMasterSession
        # The first answer tells an older master: the whole report
        # follows in one call, as an older worker would send it.
        await session.report_metrics(big)
        sizes = [len(r.samples) for r, _ in master.reports]
        assert master.kinds() == [("whole", "ok"), ("whole", "ok")]
        assert sizes == [MAX_SERIES_PER_SLICE, len(big)]
        assert master.held() == series_of(big)
        # From then on each report is whole, in one call.
        moved = _worker_series(len(big), value=2.0)
        await session.report_metrics(moved)
        assert [len(r.samples) for r, _ in master.reports] == [len(big)]
        assert master.kinds() == [("whole", "ok")]
        assert master.held() == series_of(moved)


def test_a_reports_names_and_vm_ids_are_each_checked_wherever_they_recur() -> None:
    """The decoder checks a name or VM id once per report: a valid one is
    not checked again, an invalid one is refused at every place it is."""
    schema = load_schema()
    good = _vm("procurator_vm_cpu_seconds_total", "web-1", 1.0)
    bad_name = MetricSample("no-such name", 1.0, "web-1")
    bad_vm = _vm("procurator_vm_cpu_seconds_total", "Bad VM", 1.0)
    report = MetricsReport(
        "host-a",
        (good, bad_name, good, bad_vm, bad_name),
        (("procurator_vm_cpu_seconds_total", "Bad VM", (("bad label", "x"),)),),
        whole=False,
    )
    message = schema.MetricsReport.new_message()
    fill_metrics(message, report)
    with pytest.raises(ValidationError) as refused:
        metrics_from_reader(message.as_reader())
    assert [detail.split(":")[0] for detail in refused.value.details] == [
        "metrics.samples[1].name",
        "metrics.samples[3].vmId",
        "metrics.samples[4].name",
        "metrics.ended[0].vmId",
        "metrics.ended[0].labels",
    ]
    message = schema.MetricsReport.new_message()
    fill_metrics(message, MetricsReport("host-a", (good, good)))
    assert metrics_from_reader(message.as_reader()).samples == (good, good)


def test_the_same_labels_in_another_order_are_one_series() -> None:
    """A series is keyed by its labels as a tuple: the decoder puts them in
    one order (the catalogue's, then unknown ones by name), so a sender that
    writes them in another order from one report to the next moves or ends
    the series it has, instead of adding a second one."""
    schema = load_schema()
    info = "procurator_vm_info"
    in_order = (("hash", "h1"), ("store_path", "/nix/store/x"), ("address", "10.0.0.2"))
    shuffled = (in_order[2], ("zz", "1"), in_order[0], ("aa", "2"), in_order[1])
    report = MetricsReport(
        "host-a",
        (
            MetricSample(info, 1.0, "web-1", in_order),
            MetricSample(info, 2.0, "web-1", in_order[::-1]),
            MetricSample(info, 3.0, "web-1", shuffled),
        ),
        ((info, "web-1", in_order[1:] + in_order[:1]),),
        whole=False,
    )
    message = schema.MetricsReport.new_message()
    fill_metrics(message, report)
    decoded = metrics_from_reader(message.as_reader())
    assert [s.labels for s in decoded.samples] == [
        in_order,
        in_order,
        (*in_order, ("aa", "2"), ("zz", "1")),
    ]
    assert decoded.ended == ((info, "web-1", in_order),)
    assert len(series_of(decoded.samples)) == 2
