"""The master exporter and its HTTP endpoint: fleet metrics, relayed worker
figures, service discovery, errors."""

from __future__ import annotations

import logging
import threading

import httpx
import pytest
import trio
from metricshelpers import promtool_check, realistic_vms
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from procurator.core.errors import UnavailableError
from procurator.core.metrics import (
    CATALOGUE,
    PHASES,
    FleetView,
    MetricSample,
    WorkerSnapshot,
    WorkerView,
)
from procurator.core.models import Phase
from procurator.master.http import run_master_http, serve_master_http
from procurator.master.metrics import MasterMetrics
from procurator.worker.metrics import WorkerMetrics

NOW = 1_763_000_000.0


def _report(vm_count: int = 22) -> tuple[MetricSample, ...]:
    worker = WorkerMetrics()
    worker.update(WorkerSnapshot(vms=realistic_vms(vm_count), taken_at=NOW))
    worker.set_observed_generation(7)
    worker.count_error("unavailable")
    return tuple(worker.to_report())


class FakeFleet:
    """The master's state, as the view callable sees it; swappable."""

    def __init__(self, view: FleetView) -> None:
        self.view = view
        self.calls = 0
        self.fail: Exception | None = None

    def __call__(self) -> FleetView:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        return self.view


def _fleet() -> FleetView:
    return FleetView(
        (
            WorkerView(
                "w1",
                connected=True,
                desired_generation=8,
                observed_generation=7,
                last_report_unix=NOW - 4.0,
                vms_by_phase={Phase.RUNNING: 2, Phase.CRASH_LOOP: 1},
                samples=_report(),
                metrics_url="http://10.0.0.1:9101/metrics",
            ),
            WorkerView(
                "w2",
                connected=False,
                desired_generation=8,
                observed_generation=5,
                last_report_unix=NOW - 300.0,
                vms_by_phase={Phase.STOPPED: 3},
                samples=_report(3),
                metrics_url="http://10.0.0.2:9101/metrics",
            ),
            WorkerView("w3", connected=True, desired_generation=8),  # never reported
        )
    )


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_master_output_passes_promtool_and_relays(promtool: str) -> None:
    metrics = MasterMetrics(FakeFleet(_fleet()), clock=lambda: NOW)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_master_http, metrics, "127.0.0.1", 0)
        async with httpx.AsyncClient() as client:
            response = await client.get(server.url("/metrics"))
        nursery.cancel_scope.cancel()
    assert response.status_code == 200
    checked = await trio.to_thread.run_sync(promtool_check, promtool, response.content)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    samples = _samples(response.text)

    def worker(name: str, worker_id: str, **labels: str) -> float:
        return samples[(name, frozenset({("worker", worker_id), *labels.items()}))]

    assert samples[("procurator_master_workers_connected", frozenset())] == 2
    assert worker("procurator_master_worker_connected", "w2") == 0
    assert worker("procurator_master_worker_desired_generation", "w1") == 8
    assert worker("procurator_master_worker_observed_generation", "w2") == 5
    assert worker("procurator_master_worker_vms", "w1", phase="crashLoop") == 1
    assert worker("procurator_master_worker_vms", "w3", phase="running") == 0
    assert worker("procurator_master_worker_last_report_age_seconds", "w1") == 4.0
    assert worker("procurator_master_worker_last_report_timestamp_seconds", "w2") == NOW - 300
    assert (
        "procurator_master_worker_last_report_age_seconds",
        frozenset({("worker", "w3")}),
    ) not in samples
    assert worker("procurator_master_relayed_samples_invalid", "w1") == 0
    # Relayed: per-VM figures with worker and vm, one-hot phases expanded.
    for vm in realistic_vms():
        phases = {p: worker("procurator_vm_phase", "w1", vm=vm.id, phase=p) for p in PHASES}
        assert phases == {p: float(p == vm.phase.value) for p in PHASES}
    vm = realistic_vms()[4]  # running, with counters
    assert vm.phase is Phase.RUNNING
    assert (
        worker("procurator_vm_disk_read_bytes_total", "w1", vm=vm.id, device="disk0")
        == (vm.counters["disk0"]["read_bytes"])
    )
    assert worker("procurator_vm_restarts_total", "w2", vm="vm-02") == 2
    assert worker("procurator_worker_observed_generation", "w1") == 7
    assert worker("procurator_worker_errors_total", "w1", kind="unavailable") == 1


async def test_openmetrics_output_parses_strictly() -> None:
    with serve_master_http(MasterMetrics(FakeFleet(_fleet())), "127.0.0.1", 0) as server:
        async with httpx.AsyncClient() as client:
            response = await client.get(
                server.url("/metrics"),
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name for f in openmetrics_families(response.text)}
    assert {"procurator_master_worker_vms", "procurator_vm_phase"} <= families


def test_every_exposed_family_is_in_the_catalogue_with_its_help() -> None:
    text = MasterMetrics(FakeFleet(_fleet())).exposition().decode()
    by_family = {spec.family: spec for spec in CATALOGUE.values()}
    for family in text_string_to_metric_families(text):
        assert family.name in by_family, family.name
        assert family.documentation == by_family[family.name].help


def test_samples_that_do_not_fit_are_counted_not_relayed() -> None:
    skewed = (
        MetricSample("procurator_vm_restarts_total", 1.0, "a"),
        MetricSample("procurator_vm_from_the_future_total", 1.0, "a"),
        MetricSample("procurator_vm_disk_read_bytes_total", 1.0, "a", (("disk", "x"),)),
    )
    view = FleetView((WorkerView("w1", connected=True, samples=skewed),))
    text = MasterMetrics(FakeFleet(view)).exposition().decode()
    samples = _samples(text)
    assert (
        samples[("procurator_master_relayed_samples_invalid", frozenset({("worker", "w1")}))] == 2
    )
    assert "from_the_future" not in text
    assert (
        samples[("procurator_vm_restarts_total", frozenset({("worker", "w1"), ("vm", "a")}))] == 1
    )


def test_a_new_report_replaces_the_relayed_figures() -> None:
    fleet = FakeFleet(
        FleetView(
            (
                WorkerView(
                    "w1", True, samples=(MetricSample("procurator_vm_restarts_total", 1.0, "a"),)
                ),
                WorkerView(
                    "w2", True, samples=(MetricSample("procurator_vm_restarts_total", 9.0, "z"),)
                ),
            )
        )
    )
    metrics = MasterMetrics(fleet)
    restarts = ("procurator_vm_restarts_total", frozenset({("worker", "w1"), ("vm", "a")}))
    assert _samples(metrics.exposition().decode())[restarts] == 1
    fleet.view = FleetView(
        (WorkerView("w1", True, samples=(MetricSample("procurator_vm_restarts_total", 2.0, "a"),)),)
    )
    samples = _samples(metrics.exposition().decode())
    assert samples[restarts] == 2
    assert not [labels for name, labels in samples if ("worker", "w2") in labels]


async def test_sd_healthz_and_errors(caplog: pytest.LogCaptureFixture) -> None:
    fleet = FakeFleet(_fleet())
    metrics = MasterMetrics(fleet)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(run_master_http, metrics, "127.0.0.1", 0)
        async with httpx.AsyncClient() as client:
            sd = await client.get(server.url("/sd"))
            health = await client.get(server.url("/healthz"))
            missing = await client.get(server.url("/nope"))
            post = await client.post(server.url("/sd"))
            fleet.fail = UnavailableError("master state is loading")
            unavailable = await client.get(server.url("/sd"))
            fleet.fail = RuntimeError("bug in the view")
            with caplog.at_level(logging.ERROR, logger="procurator.master.http"):
                broken = await client.get(server.url("/sd"))
            fleet.fail = None
            healed = await client.get(server.url("/sd"))
        nursery.cancel_scope.cancel()
    assert sd.status_code == 200
    assert sd.headers["content-type"] == "application/json"
    assert sd.json() == [
        {
            "targets": ["10.0.0.1:9101"],
            "labels": {"worker": "w1", "__scheme__": "http", "__metrics_path__": "/metrics"},
        },
        {
            "targets": ["10.0.0.2:9101"],
            "labels": {"worker": "w2", "__scheme__": "http", "__metrics_path__": "/metrics"},
        },
    ]
    assert (health.status_code, health.text) == (200, "ok\n")
    assert missing.status_code == 404
    assert post.status_code == 405
    assert unavailable.status_code == 503
    assert "master state is loading" in unavailable.text
    assert broken.status_code == 500
    assert "bug in the view" in caplog.text
    assert healed.status_code == 200


def test_server_closes_cleanly() -> None:
    before = {t.name for t in threading.enumerate()}
    server = serve_master_http(MasterMetrics(FakeFleet(_fleet())), "127.0.0.1", 0)
    with httpx.Client() as client:
        assert client.get(server.url("/healthz")).status_code == 200
    server.close()
    server.close()
    assert {t.name for t in threading.enumerate()} - before == set()
    with pytest.raises(httpx.ConnectError), httpx.Client() as client:
        client.get(server.url("/healthz"))
