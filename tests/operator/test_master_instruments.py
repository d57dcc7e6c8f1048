"""The master's own figures (``MasterInstruments``): calls and errors by
method and code, database operations and their failures, and the time from
an apply to each affected worker observing it. A real ``MasterService`` on
a real SQLite store, decorated as ``procurator.app.master`` wires them, with a
hand-written worker node and a hand-driven clock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from operatorhelpers import run_promtool
from prometheus_client.parser import text_string_to_metric_families
from rpcfixtures import make_fleet

from procurator.core.errors import (
    NotFoundError,
    StaleGenerationError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedError,
)
from procurator.core.metrics import CATALOGUE, FleetView
from procurator.core.models import Assignment, EventKind, VmEvent, WorkerInfo, WorkerStatus
from procurator.core.status import StatusChanges
from procurator.master.metrics import (
    MAX_PENDING_APPLIES,
    RPC_METHODS,
    InstrumentedBackend,
    MasterInstruments,
    MasterMetrics,
)
from procurator.master.service import MasterService
from procurator.master.store import FleetStore


class Node:
    """A worker's node that takes every push."""

    connection_id = 1

    async def push(self, assignment: Assignment) -> None:
        pass

    async def push_changes(self, changes: object) -> None:
        # An older worker: the master pushes it whole assignments.
        raise UnsupportedError("Node.pushChanges: not implemented by this fake")

    async def aclose(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Master:
    instruments: MasterInstruments
    backend: InstrumentedBackend
    store: FleetStore
    clock: Clock

    def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        text = MasterMetrics(FleetView, instruments=self.instruments).exposition().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def value(self, name: str, **labels: str) -> float:
        return self.samples()[(name, frozenset(labels.items()))]


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[Master]:
    clock = Clock()
    instruments = MasterInstruments(clock=clock)
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(instruments.store(store))
        await nursery.start(service.run)
        yield Master(instruments, instruments.backend(service), store, clock)
        nursery.cancel_scope.cancel()


async def test_calls_and_errors_are_counted_by_method_and_code(master: Master) -> None:
    backend = master.backend
    token = await backend.register(WorkerInfo("host-a"), Node())
    await backend.apply(make_fleet({"host-a": [("web-1", "a")]}))
    await backend.fleet_status()
    with pytest.raises(NotFoundError):
        await backend.describe_vm("nope")
    with pytest.raises(StaleGenerationError):
        await backend.apply(make_fleet({"host-a": [("web-1", "b")]}), expected_generation=99)
    await backend.report_status(token, WorkerStatus("host-a", 0))

    assert master.value("procurator_master_rpc_calls_total", method="apply") == 2
    assert master.value("procurator_master_rpc_calls_total", method="register") == 1
    assert master.value("procurator_master_rpc_calls_total", method="status") == 1
    assert master.value("procurator_master_rpc_calls_total", method="describeVm") == 1
    assert master.value("procurator_master_rpc_calls_total", method="reportStatus") == 1
    # describe_vm reads the events itself: that is not a call of `events`.
    assert master.value("procurator_master_rpc_calls_total", method="events") == 0
    errors = {
        labels: value
        for (name, labels), value in master.samples().items()
        if name == "procurator_master_rpc_errors_total" and value
    }
    assert errors == {
        frozenset({("method", "describeVm"), ("code", "notFound")}): 1,
        frozenset({("method", "apply"), ("code", "staleGeneration")}): 1,
    }
    # Every method's calls and internal errors exist from the start, at 0.
    for method in RPC_METHODS:
        assert ("procurator_master_rpc_calls_total", frozenset({("method", method)})) in (
            master.samples()
        )


async def test_apply_to_observed_is_timed_per_worker_and_generation(master: Master) -> None:
    backend, clock = master.backend, master.clock
    a = await backend.register(WorkerInfo("host-a"), Node())
    b = await backend.register(WorkerInfo("host-b"), Node())
    first = await backend.apply(make_fleet({"host-a": [("web-1", "a")], "host-b": [("db-1", "a")]}))
    clock.now += 2
    second = await backend.apply(
        make_fleet({"host-a": [("web-1", "b")], "host-b": [("db-1", "a")]})
    )
    await backend.apply(
        make_fleet({"host-a": [("web-1", "b")], "host-b": [("db-1", "a")]}), dry_run=True
    )
    clock.now += 3
    # host-a skips straight to the second generation: both applies reached it.
    await backend.report_status(a, WorkerStatus("host-a", second.generation))
    clock.now += 10
    # host-b reports through the changes-only call.
    await backend.report_status(b, WorkerStatus("host-b", 0))
    await backend.report_status_changes(b, StatusChanges("host-b", first.generation))
    # Observing again observes nothing new.
    await backend.report_status(a, WorkerStatus("host-a", second.generation))

    name = "procurator_master_apply_to_observed_seconds"
    assert master.value(f"{name}_count") == 3
    assert master.value(f"{name}_sum") == (2 + 3) + 3 + (2 + 3 + 10)
    assert master.value(f"{name}_bucket", le="2.5") == 0
    assert master.value(f"{name}_bucket", le="5.0") == 2
    assert master.value(f"{name}_bucket", le="15.0") == 3


async def test_a_combined_report_is_one_call_and_its_events_refusal_an_error(
    master: Master,
) -> None:
    backend, clock = master.backend, master.clock
    token = await backend.register(WorkerInfo("host-a"), Node())
    applied = await backend.apply(make_fleet({"host-a": [("web-1", "a")]}))
    await backend.report_status(token, WorkerStatus("host-a", 0))
    clock.now += 4
    booted = VmEvent("web-1", EventKind.BOOTED)
    changes = StatusChanges("host-a", applied.generation)
    assert await backend.report_status_and_events(token, changes, [booted]) is None
    refused = await backend.report_status_and_events(
        token, changes, [VmEvent("db-9", EventKind.BOOTED)]
    )
    assert isinstance(refused, UnauthorizedError)

    calls = "procurator_master_rpc_calls_total"
    assert master.value(calls, method="reportStatusAndEvents") == 2
    assert master.value(calls, method="reportStatusChanges") == 0
    assert master.value(calls, method="reportEvents") == 0
    errors = "procurator_master_rpc_errors_total"
    assert master.value(errors, method="reportStatusAndEvents", code="unauthorized") == 1
    # Its status part observed the apply.
    assert master.value("procurator_master_apply_to_observed_seconds_sum") == 4


async def test_pending_applies_per_worker_are_bounded(master: Master) -> None:
    token = await master.backend.register(WorkerInfo("host-a"), Node())
    for i in range(MAX_PENDING_APPLIES + 5):
        result = await master.backend.apply(make_fleet({"host-a": [("web-1", "ab"[i % 2])]}))
    await master.backend.report_status(token, WorkerStatus("host-a", result.generation))
    count = master.value("procurator_master_apply_to_observed_seconds_count")
    assert count == MAX_PENDING_APPLIES


async def test_a_failing_database_is_counted(master: Master) -> None:
    assert (
        master.value("procurator_master_store_errors_total", operation="commit", code="unavailable")
        == 0
    )
    assert (
        master.value("procurator_master_store_operation_duration_seconds_count", operation="load")
        == 1
    )
    await master.backend.apply(make_fleet({"host-a": [("web-1", "a")]}))
    await master.store.aclose()  # the database goes away under the master
    with pytest.raises(UnavailableError):
        await master.backend.apply(make_fleet({"host-a": [("web-1", "b")]}))
    assert (
        master.value("procurator_master_store_errors_total", operation="commit", code="unavailable")
        == 1
    )
    assert (
        master.value("procurator_master_store_operation_duration_seconds_count", operation="commit")
        == 2
    )
    assert (
        master.value("procurator_master_rpc_errors_total", method="apply", code="unavailable") == 1
    )


def test_exposition_passes_promtool_and_names_only_catalogued_families(promtool: str) -> None:
    instruments = MasterInstruments()
    instruments.count_call("apply", NotFoundError("x"))
    instruments.observe_store("commit", 0.01)
    text = MasterMetrics(FleetView, instruments=instruments).exposition()
    checked = run_promtool("check", "metrics", stdin=text.decode())
    assert checked.returncode == 0, checked.stdout + checked.stderr
    by_family = {spec.family: spec for spec in CATALOGUE.values()}
    for family in text_string_to_metric_families(text.decode()):
        if family.name.endswith("_created"):  # prometheus_client's companions of histograms
            continue
        assert family.name in by_family, family.name
        assert family.documentation == by_family[family.name].help
