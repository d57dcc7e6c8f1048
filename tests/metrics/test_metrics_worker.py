"""The worker exporter: real HTTP output checked by promtool, scrapes that do
no I/O, the poller, the report for the master, the HTTP server's life."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterable
from dataclasses import replace

import httpx
import prometheus_client
import pytest
import trio
from metricshelpers import promtool_check, realistic_vms
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from procurator.core.errors import PermanentError, UnavailableError
from procurator.core.metrics import (
    CATALOGUE,
    PHASES,
    MetricKind,
    ProcessUsage,
    VmSnapshot,
    WorkerSnapshot,
    group_samples,
)
from procurator.core.models import Phase
from procurator.worker.metrics import MAX_LABEL_VALUES, POLL_SPREAD, WorkerMetrics
from procurator.worker.turns import TurnPoolStats
from procurator.worker.vmm.process import pid_start_ticks

NOW = 1_763_000_000.0


def _fed_metrics() -> WorkerMetrics:
    metrics = WorkerMetrics(clock=lambda: NOW)
    metrics.update(WorkerSnapshot(vms=realistic_vms(), taken_at=NOW))
    metrics.observe_reconcile_pass(0.004, 2)
    metrics.observe_reconcile_pass(0.020)
    for endpoint, seconds, ok in [
        ("vmm.ping", 0.0004, True),
        ("vm.create", 0.012, True),
        ("vm.boot", 0.3, True),
        ("vm.info", 0.002, True),
        ("vm.counters", 0.001, True),
        ("vm.power-button", 5.0, False),
    ]:
        metrics.observe_api_call(endpoint, seconds, ok)
    metrics.count_error("unavailable")
    metrics.count_error("unavailable")
    metrics.count_error("invalid")
    metrics.observe_realise(2.5)
    metrics.set_observed_generation(41)
    metrics.watch_turns(
        lambda: TurnPoolStats(threads=5, idle=2, waiting=7, oldest_wait=0.75, stalls=1)
    )
    return metrics


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def _get(url: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url, **kwargs)  # type: ignore[arg-type]


async def test_http_output_passes_promtool_and_carries_the_snapshot(promtool: str) -> None:
    metrics = _fed_metrics()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(metrics.run_http, "127.0.0.1", 0)
        assert server.port > 0
        response = await _get(server.url("/metrics"))
        nursery.cancel_scope.cancel()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    checked = await trio.to_thread.run_sync(promtool_check, promtool, response.content)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    text = response.text
    samples = _samples(text)
    vms = realistic_vms()
    for vm in vms:
        one_hot = {p: samples[("procurator_vm_phase", frozenset({("vm", vm.id), ("phase", p)}))]
                   for p in PHASES}  # fmt: skip
        assert one_hot == {p: float(p == vm.phase.value) for p in PHASES}
        info = frozenset(
            {
                ("vm", vm.id),
                ("hash", vm.hash),
                ("store_path", vm.store_path),
                ("address", vm.address),
            }
        )
        assert samples[("procurator_vm_info", info)] == 1.0
        assert samples[("procurator_vm_restarts_total", frozenset({("vm", vm.id)}))] == vm.restarts
    running = next(vm for vm in vms if vm.phase is Phase.RUNNING)
    assert running.usage is not None
    key = frozenset({("vm", running.id)})
    assert samples[("procurator_vm_cpu_seconds_total", key)] == running.usage.cpu_seconds
    assert samples[("procurator_vm_resident_memory_bytes", key)] == running.usage.rss_bytes
    disk = frozenset({("vm", running.id), ("device", "disk0")})
    assert (
        samples[("procurator_vm_disk_read_bytes_total", disk)]
        == (running.counters["disk0"]["read_bytes"])
    )
    assert "latency" not in text
    assert "18446744073709551615" not in text and "1.8446744073709552e+19" not in text
    assert samples[("procurator_worker_vms", frozenset({("phase", "running")}))] == 2
    assert samples[("procurator_worker_observed_generation", frozenset())] == 41
    assert samples[("procurator_worker_errors_total", frozenset({("kind", "unavailable")}))] == 2
    assert samples[("procurator_reconcile_pass_duration_seconds_count", frozenset())] == 2
    assert samples[("procurator_reconcile_actions_started_total", frozenset())] == 2
    failures = frozenset({("endpoint", "vm.power-button")})
    assert samples[("procurator_vmm_api_call_failures_total", failures)] == 1
    assert samples[("procurator_image_realise_duration_seconds_count", frozenset())] == 1
    assert samples[("procurator_worker_metrics_poll_timestamp_seconds", frozenset())] == NOW
    # The supervisors' turn pool, read at the scrape.
    assert samples[("procurator_worker_turn_threads", frozenset({("state", "busy")}))] == 3
    assert samples[("procurator_worker_turn_threads", frozenset({("state", "idle")}))] == 2
    assert samples[("procurator_worker_turns_waiting", frozenset())] == 7
    assert samples[("procurator_worker_turn_wait_seconds", frozenset())] == 0.75
    assert samples[("procurator_worker_turn_stalls_total", frozenset())] == 1


async def test_openmetrics_output_parses_strictly() -> None:
    """Prometheus asks for OpenMetrics first; prometheus_client's parser of
    it is strict (EOF marker, suffixes, types)."""
    metrics = _fed_metrics()
    with metrics.serve("127.0.0.1", 0) as server:
        response = await _get(
            server.url("/metrics"),
            headers={"Accept": "application/openmetrics-text; version=1.0.0"},
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    families = {f.name for f in openmetrics_families(response.text)}
    assert {"procurator_vm_phase", "procurator_vm_restarts", "procurator_vm_info"} <= families


def test_every_exposed_family_is_in_the_catalogue_with_its_help() -> None:
    families = {
        f.name: f for f in text_string_to_metric_families(_fed_metrics().exposition().decode())
    }
    by_family = {spec.family: spec for spec in CATALOGUE.values()}
    for name, family in families.items():
        if name.endswith("_created"):  # prometheus_client's companions of histograms
            continue
        assert name in by_family, name
        assert family.documentation == by_family[name].help
        assert family.type == by_family[name].kind.value


def test_own_registry_only() -> None:
    _fed_metrics()
    global_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not [n for n in global_names if n.startswith("procurator")]


def test_collect_and_report_do_no_io(io_recorder: object) -> None:
    metrics = _fed_metrics()
    with io_recorder.recording() as events:  # type: ignore[attr-defined]
        collected = list(metrics.collect())
        report = metrics.to_report()
    assert events == []
    # ...and the recorder does see I/O, so the empty list means something.
    with io_recorder.recording() as events:  # type: ignore[attr-defined]
        open("/proc/self/stat").close()
    assert events and events[0][0] == "open"
    assert any(m.name == "procurator_vm_phase" for m in collected)
    assert report


class CountingUsageReader:
    """A fake of the UsageReader port: answers from a table, counts calls."""

    def __init__(self, usage: dict[int, ProcessUsage]) -> None:
        self.usage = usage
        self.calls: list[tuple[int, int]] = []

    def __call__(self, pid: int, start_ticks: int) -> ProcessUsage | None:
        self.calls.append((pid, start_ticks))
        return self.usage.get(pid)


def _source(vms: Iterable[VmSnapshot]) -> list[VmSnapshot]:
    return [replace(vm, usage=None) for vm in vms]


async def test_proc_is_read_by_the_poller_only() -> None:
    vms = realistic_vms()
    reader = CountingUsageReader({vm.pid: ProcessUsage(3.0, 2**20) for vm in vms if vm.pid})
    metrics = WorkerMetrics(clock=lambda: NOW)
    metrics.refresh(lambda: _source(vms), read_usage=reader)
    polled = len(reader.calls)
    assert polled == sum(1 for vm in vms if vm.pid)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(metrics.run_http, "127.0.0.1", 0)
        for _ in range(3):
            assert (await _get(server.url("/metrics"))).status_code == 200
        nursery.cancel_scope.cancel()
    assert len(reader.calls) == polled
    metrics.refresh(lambda: _source(vms), read_usage=reader)
    assert len(reader.calls) == 2 * polled


def test_scrape_shows_the_snapshot_not_the_live_process(sleeper: subprocess.Popen[bytes]) -> None:
    """With the real reader: the figures of a process stay what the last
    poll read, even after it is gone; the next poll drops them."""
    ticks = pid_start_ticks(sleeper.pid)
    assert ticks is not None
    vm = VmSnapshot(id="web", phase=Phase.RUNNING, pid=sleeper.pid, pid_start_ticks=ticks)
    metrics = WorkerMetrics()
    metrics.refresh(lambda: [vm])
    rss = next(s for s in metrics.to_report() if s.name == "procurator_vm_resident_memory_bytes")
    assert rss.value > 0
    sleeper.kill()
    sleeper.wait(timeout=10)
    key = ("procurator_vm_resident_memory_bytes", frozenset({("vm", "web")}))
    assert _samples(metrics.exposition().decode())[key] == rss.value
    metrics.refresh(lambda: [vm])
    assert key not in _samples(metrics.exposition().decode())


def test_scrapes_build_the_per_vm_families_once_per_snapshot() -> None:
    """A poll builds only the report's samples; the first scrape after it
    builds the families, later scrapes of the same poll reuse them, and a
    new poll's scrape shows the new figures."""
    metrics = _fed_metrics()
    first = list(metrics.collect())
    again = list(metrics.collect())
    per_vm = [m for m in first if m.name.startswith("procurator_vm_")]
    assert per_vm and all(any(a is m for a in again) for m in per_vm)
    vms = realistic_vms()
    metrics.update(WorkerSnapshot(vms=(replace(vms[0], restarts=7), *vms[1:]), taken_at=NOW))
    after = list(metrics.collect())
    assert not any(a is m for a in after for m in per_vm)
    restarts = next(m for m in after if m.name == "procurator_vm_restarts")
    assert 7.0 in {s.value for s in restarts.samples}


def test_a_proc_failure_loses_only_that_vms_usage() -> None:
    def reader(pid: int, start_ticks: int) -> ProcessUsage | None:
        if pid == 1:
            raise UnavailableError("cannot read /proc figures of pid 1: permission denied")
        return ProcessUsage(1.0, 4096)

    metrics = WorkerMetrics()
    snapshot = metrics.refresh(
        lambda: [VmSnapshot("a", Phase.RUNNING, pid=1), VmSnapshot("b", Phase.RUNNING, pid=2)],
        read_usage=reader,
    )
    assert [vm.usage for vm in snapshot.vms] == [None, ProcessUsage(1.0, 4096)]
    assert ("procurator_worker_errors_total", 1.0, "", (("kind", "proc_read"),)) in [
        (s.name, s.value, s.vm_id, s.labels) for s in metrics.to_report()
    ]


async def test_poller_refreshes_and_survives_failing_sources(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0
    polled = trio.Event()

    def source() -> list[VmSnapshot]:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise UnavailableError("VmManager is shutting down")
        if calls == 3:
            raise RuntimeError("bug in the source")
        if calls >= 5:
            trio.from_thread.run_sync(polled.set)
        return [VmSnapshot(f"vm-{calls}", Phase.RUNNING)]

    metrics = WorkerMetrics()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: metrics.run_poller(
                    source, interval=0.01, task_status=task_status
                )
            )
            # started() comes after the first poll: figures exist.
            assert [vm.id for vm in metrics.snapshot.vms] == ["vm-1"]
            await polled.wait()
            nursery.cancel_scope.cancel()
    assert metrics.snapshot.vms[0].id.startswith("vm-")
    errors = {s.labels: s.value for s in metrics.to_report() if s.name.endswith("errors_total")}
    assert errors == {(("kind", "metrics_poll"),): 2.0}
    assert "VmManager is shutting down" in caplog.text
    assert "bug in the source" in caplog.text


async def test_a_poll_in_slices_lets_a_change_through_and_exports_every_vm(
    mock_clock: trio.testing.MockClock,
) -> None:
    """A poll (after the first) works a slice of VMs per thread call and
    sleeps in between: a worker-thread operation that starts while a poll is
    mid-way completes with the poll parked after its slice, not behind the
    rest of it (the clock does not move: only ordering is asserted). The
    poll publishes whole: mid-way a scrape shows the last poll's figures of
    every VM, after one interval the new ones of every VM."""
    interval, size = 60.0, 2
    vms = [VmSnapshot(f"vm-{i}", Phase.RUNNING, pid=100 + i) for i in range(5)]
    cpu = 1.0
    reads: list[int] = []
    mid_poll = trio.Event()

    def read_usage(pid: int, start_ticks: int) -> ProcessUsage:
        reads.append(pid)
        if len(reads) == len(vms) + size:  # the second poll's first slice is done
            trio.from_thread.run_sync(mid_poll.set)
        return ProcessUsage(cpu, 4096)

    def cpu_of_every_vm() -> dict[str, float]:
        text = _samples(metrics.exposition().decode())
        return {
            dict(labels)["vm"]: value
            for (name, labels), value in text.items()
            if name == "procurator_vm_cpu_seconds_total"
        }

    metrics = WorkerMetrics()
    changed_after: list[int] = []
    polls: list[int] = []  # reads done when each poll began
    third_poll = trio.Event()

    def source() -> list[VmSnapshot]:
        polls.append(len(reads))
        if len(polls) == 3:  # the second poll has published
            trio.from_thread.run_sync(third_poll.set)
        return vms

    def change() -> None:  # stands for a manager operation on its thread
        changed_after.append(len(reads))

    async with trio.open_nursery() as nursery:
        await nursery.start(
            lambda task_status: metrics.run_poller(
                source,
                interval=interval,
                read_usage=read_usage,
                slice_size=size,
                task_status=task_status,
            )
        )
        assert len(reads) == len(vms)  # the first poll, in one go
        assert cpu_of_every_vm() == {vm.id: 1.0 for vm in vms}
        cpu = 2.0
        mock_clock.jump(interval)  # the second poll begins
        await mid_poll.wait()
        await trio.to_thread.run_sync(change)
        assert changed_after == [len(vms) + size]
        await trio.testing.wait_all_tasks_blocked()
        assert len(reads) == len(vms) + size  # parked between slices
        assert cpu_of_every_vm() == {vm.id: 1.0 for vm in vms}  # nothing half-published
        # One interval after it began: the second poll's slices are all
        # due (they are spread over POLL_SPREAD of it) and the third begins.
        assert POLL_SPREAD < 1
        mock_clock.jump(interval)
        await third_poll.wait()
        assert polls == [0, len(vms), 2 * len(vms)]
        assert cpu_of_every_vm() == {vm.id: 2.0 for vm in vms}
        nursery.cancel_scope.cancel()


def test_reused_samples_are_rebuilt_when_a_vms_figures_change() -> None:
    """A VM whose snapshot did not change keeps its samples (the same
    objects); one whose settled fields changed (restarts) is built anew;
    one whose moving figures alone changed (counters, CPU time) keeps its
    settled samples and the samples of figures that did not move, and gets
    the moved ones built anew (issue 31 target 3); and a VM that is gone is
    dropped."""
    base = [
        VmSnapshot("same", Phase.RUNNING, pid=1, counters={"net0": {"rx_bytes": 5}}),
        VmSnapshot("restarted", Phase.RUNNING, pid=2),
        VmSnapshot("counted", Phase.RUNNING, pid=3, counters={"net0": {"rx_bytes": 5}}),
        VmSnapshot("busy", Phase.RUNNING, pid=4),
        VmSnapshot("gone", Phase.STOPPED),
    ]
    usage = {pid: ProcessUsage(1.0, 4096) for pid in (1, 2, 3, 4)}
    reader = CountingUsageReader(usage)
    metrics = WorkerMetrics(clock=lambda: NOW)
    metrics.refresh(lambda: base, read_usage=reader)
    before = {(s.vm_id, s.name, s.labels): s for s in metrics.to_report() if s.vm_id}

    usage[4] = ProcessUsage(1.5, 4096)
    after_vms = [
        base[0],
        replace(base[1], restarts=1),
        replace(base[2], counters={"net0": {"rx_bytes": 9}}),
        base[3],
    ]
    metrics.refresh(lambda: after_vms, read_usage=reader)
    after = {(s.vm_id, s.name, s.labels): s for s in metrics.to_report() if s.vm_id}

    assert {vm for vm, _, _ in after} == {"same", "restarted", "counted", "busy"}
    assert all(s is before[key] for key, s in after.items() if key[0] == "same")
    assert not any(s is before.get(key) for key, s in after.items() if key[0] == "restarted")
    # Of a VM whose figures moved, only the samples whose value moved are
    # new objects: what a change report carries (ReportedSeries).
    moved = {
        "counted": {"procurator_vm_network_receive_bytes_total"},
        "busy": {"procurator_vm_cpu_seconds_total"},
    }
    for vm, figures in moved.items():
        mine = {key: s for key, s in after.items() if key[0] == vm}
        assert all(s is before[key] for key, s in mine.items() if key[1] not in figures)
        assert not any(s is before[key] for key, s in mine.items() if key[1] in figures)
        assert any(key[1] == "procurator_vm_phase" for key in mine)
        assert any(key[1] == "procurator_vm_resident_memory_bytes" for key in mine)
    assert after["restarted", "procurator_vm_restarts_total", ()].value == 1.0
    counter = ("counted", "procurator_vm_network_receive_bytes_total", (("device", "net0"),))
    assert after[counter].value == 9.0
    assert after["busy", "procurator_vm_cpu_seconds_total", ()].value == 1.5
    # What the scrape shows is what the report carries.
    text = _samples(metrics.exposition().decode())
    assert text["procurator_vm_restarts_total", frozenset({("vm", "restarted")})] == 1.0
    assert text["procurator_vm_cpu_seconds_total", frozenset({("vm", "busy")})] == 1.5


async def test_poller_refuses_a_nonsense_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        await WorkerMetrics().run_poller(list, interval=0)


def test_report_is_compact_and_relayable() -> None:
    metrics = _fed_metrics()
    report = metrics.to_report()
    names = {s.name for s in report}
    assert all(CATALOGUE[n].reported for n in names)
    assert not [n for n in names if CATALOGUE[n].kind is MetricKind.HISTOGRAM]
    # One phase sample per VM (the master expands it), not one per phase.
    assert sum(1 for s in report if s.name == "procurator_vm_phase") == len(realistic_vms())
    worker_level = {(s.name, s.labels): s.value for s in report if not s.vm_id}
    assert worker_level[("procurator_worker_observed_generation", ())] == 41
    assert worker_level[("procurator_worker_vms", (("phase", "crashLoop"),))] == 2
    assert worker_level[("procurator_worker_errors_total", (("kind", "invalid"),))] == 1
    _, dropped = group_samples(report, prefix=(("worker", "w1"),))
    assert dropped == 0


def test_event_labels_are_bounded_and_durations_sane() -> None:
    metrics = WorkerMetrics()
    for i in range(MAX_LABEL_VALUES + 5):
        metrics.observe_api_call(f"endpoint-{i}", 0.001, ok=False)
        metrics.count_error(f"kind-{i}")
    metrics.observe_realise(float("nan"))
    metrics.observe_reconcile_pass(-0.5)  # a clock step: counted as 0
    samples = _samples(metrics.exposition().decode())
    endpoints = {
        dict(labels)["endpoint"]
        for name, labels in samples
        if name == "procurator_vmm_api_call_failures_total"
    }
    assert len(endpoints) == MAX_LABEL_VALUES + 1
    assert (
        samples[("procurator_vmm_api_call_failures_total", frozenset({("endpoint", "other")}))] == 5
    )
    assert samples[("procurator_worker_errors_total", frozenset({("kind", "other")}))] == 5
    assert samples[("procurator_image_realise_duration_seconds_count", frozenset())] == 0
    assert samples[("procurator_reconcile_pass_duration_seconds_sum", frozenset())] == 0
    assert samples[("procurator_reconcile_pass_duration_seconds_count", frozenset())] == 1


def test_server_binds_any_port_and_frees_it_on_close() -> None:
    metrics = WorkerMetrics()
    server = metrics.serve("127.0.0.1", 0)
    port = server.port
    with httpx.Client() as client:
        assert client.get(server.url("/metrics")).status_code == 200
    server.close()
    server.close()  # idempotent
    with socket.create_server(("127.0.0.1", port)):  # the port is free again
        pass
    with pytest.raises(httpx.ConnectError), httpx.Client() as client:
        client.get(server.url("/metrics"))


def test_server_reports_an_address_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(PermanentError, match=f"127.0.0.1:{port}"):
            WorkerMetrics().serve("127.0.0.1", port)


def test_ipv6_loopback_url() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        server = WorkerMetrics().serve("::1", 0)
    except PermanentError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    with server:
        assert server.url("/metrics") == f"http://[::1]:{server.port}/metrics"
        with httpx.Client() as client:
            assert client.get(server.url("/metrics")).status_code == 200
