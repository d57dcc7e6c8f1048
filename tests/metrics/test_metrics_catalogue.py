"""The pure part: catalogue conventions, the compact sample form, grouping
and validation of reported samples, service discovery documents."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from metricshelpers import realistic_vms

from procurator.core.errors import ValidationError
from procurator.core.metrics import (
    CATALOGUE,
    PHASES,
    MetricKind,
    MetricSample,
    ProcessUsage,
    Scope,
    VmSnapshot,
    WorkerView,
    group_samples,
    http_sd_groups,
    parse_metrics_url,
    vm_samples,
    vms_by_phase,
)
from procurator.core.models import Phase


def test_catalogue_follows_prometheus_conventions() -> None:
    for name, spec in CATALOGUE.items():
        assert re.fullmatch(r"procurator_[a-z0-9_]+", name), name
        assert spec.help and spec.help.endswith("."), name
        assert (spec.kind is MetricKind.COUNTER) == name.endswith("_total"), name
        if spec.kind is MetricKind.HISTOGRAM:
            assert name.endswith("_seconds"), name
        # Base units only.
        assert not re.search(r"_(milli|micro|nano)seconds|_(ms|kb|kib|mb|mib)(_|$)", name), name
        # Bounded labels: never an operation id, never a free-form message.
        assert not {"op", "op_id", "message", "error"} & set(spec.labels), name
        if spec.reported:
            assert spec.scope in (Scope.VM, Scope.WORKER), name


def test_docs_name_every_metric() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"
    text = docs.read_text()
    missing = [name for name in CATALOGUE if name not in text]
    assert not missing, f"docs/METRICS.md does not mention {missing}"


def test_vm_samples_filter_what_cannot_be_a_measurement() -> None:
    vm = VmSnapshot(
        id="web",
        phase=Phase.RUNNING,
        hash="h" * 32,
        store_path="/nix/store/" + "a" * 32 + "-web",
        address="10.0.0.2",
        restarts=2,
        pid=42,
        boot_seconds=8.5,
        counters={
            "disk0": {
                "read_bytes": 10,
                "write_bytes": 2**64 - 1,  # sentinel
                "read_ops": -1,  # nonsense
                "write_ops": True,  # not a number
                "read_latency_min": 2**64 - 1,
                "read_latency_avg": 17,  # known key? no: latency is not exported
            },
            "net0": {"rx_bytes": 1, "tx_bytes": 2.5, "rx_frames": float("nan"), "tx_frames": 3},
            "odd": "not a mapping",
        },
        usage=ProcessUsage(cpu_seconds=1.5, rss_bytes=4096),
    )
    samples = {(s.name, s.labels): s for s in vm_samples(vm)}
    assert all(s.vm_id == "web" for s in samples.values())
    disk = ("device", "disk0")
    net = ("device", "net0")
    assert samples[("procurator_vm_disk_read_bytes_total", (disk,))].value == 10
    assert ("procurator_vm_disk_write_bytes_total", (disk,)) not in samples
    assert ("procurator_vm_disk_read_ops_total", (disk,)) not in samples
    assert ("procurator_vm_disk_write_ops_total", (disk,)) not in samples
    assert samples[("procurator_vm_network_transmit_bytes_total", (net,))].value == 2.5
    assert ("procurator_vm_network_receive_frames_total", (net,)) not in samples
    assert not [name for name, _ in samples if "latency" in name]
    assert samples[("procurator_vm_phase", (("phase", "running"),))].value == 1
    assert samples[("procurator_vm_cpu_seconds_total", ())].value == 1.5
    assert samples[("procurator_vm_resident_memory_bytes", ())].value == 4096
    assert samples[("procurator_vm_boot_duration_seconds", ())].value == 8.5
    assert samples[("procurator_vm_restarts_total", ())].value == 2
    info = samples[
        (
            "procurator_vm_info",
            (("hash", vm.hash), ("store_path", vm.store_path), ("address", "10.0.0.2")),
        )
    ]
    assert info.value == 1


def test_a_stopped_vm_has_no_usage_boot_or_device_series() -> None:
    names = {s.name for s in vm_samples(VmSnapshot(id="idle", phase=Phase.STOPPED))}
    assert names == {"procurator_vm_phase", "procurator_vm_info", "procurator_vm_restarts_total"}


def test_group_samples_expands_phase_one_hot_and_adds_prefix_labels() -> None:
    vms = realistic_vms()
    samples = [s for vm in vms for s in vm_samples(vm)]
    families, dropped = group_samples(samples, prefix=(("worker", "w1"),))
    assert dropped == 0
    by_name = {f.spec.name: f for f in families}
    phase = by_name["procurator_vm_phase"]
    assert phase.label_names == ("worker", "vm", "phase")
    assert len(phase.rows) == len(vms) * len(PHASES)
    for vm in vms:
        rows = {values[2]: value for values, value in phase.rows if values[1] == vm.id}
        assert rows == {p: (1.0 if p == vm.phase.value else 0.0) for p in PHASES}
    assert [f.spec.name for f in families] == [n for n in CATALOGUE if n in by_name]


def test_group_samples_drops_what_does_not_fit_and_deduplicates() -> None:
    good = MetricSample("procurator_vm_restarts_total", 1.0, "a")
    bad = [
        MetricSample("procurator_vm_made_up_total", 1.0, "a"),  # unknown name
        MetricSample("procurator_master_workers_connected", 1.0),  # not reportable
        MetricSample("procurator_vm_restarts_total", 1.0),  # per-VM without VM id
        MetricSample("procurator_worker_observed_generation", 3.0, "a"),  # stray VM id
        MetricSample("procurator_vm_restarts_total", math.nan, "a"),
        MetricSample("procurator_vm_restarts_total", 1.0, "a", (("device", "x"),)),
        MetricSample("procurator_vm_disk_read_bytes_total", 1.0, "a", (("disk", "x"),)),
        MetricSample(
            "procurator_vm_disk_read_bytes_total", 1.0, "a", (("device", "x"), ("device", "y"))
        ),
        MetricSample("procurator_vm_phase", 1.0, "a", (("phase", "dancing"),)),
    ]
    later = MetricSample("procurator_vm_restarts_total", 5.0, "a")
    families, dropped = group_samples([good, *bad, later])
    assert dropped == len(bad)
    assert len(families) == 1
    assert families[0].rows == [(("a",), 5.0)]


def test_group_samples_accepts_labels_in_any_order() -> None:
    sample = MetricSample(
        "procurator_vm_info", 1.0, "a", (("address", "x"), ("hash", "h"), ("store_path", "p"))
    )
    families, dropped = group_samples([sample])
    assert dropped == 0
    assert families[0].rows == [(("a", "h", "p", "x"), 1.0)]


def test_vms_by_phase_counts_every_phase() -> None:
    counts = vms_by_phase(realistic_vms(count=13))
    assert set(counts) == set(Phase)
    assert sum(counts.values()) == 13
    assert counts[Phase.UNKNOWN] == 2  # the 12th and 13th wrap around


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://10.0.0.5:9101/metrics", ("http", "10.0.0.5:9101", "/metrics")),
        ("https://worker-1.example:8443/m", ("https", "worker-1.example:8443", "/m")),
        ("http://[fd00::5]:9101/metrics", ("http", "[fd00::5]:9101", "/metrics")),
        ("http://w1", ("http", "w1:80", "/metrics")),
        ("https://w1/", ("https", "w1:443", "/")),
    ],
)
def test_parse_metrics_url(url: str, expected: tuple[str, str, str]) -> None:
    assert parse_metrics_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "10.0.0.5:9101",
        "ftp://w1/metrics",
        "http:///metrics",
        "http://w1:99999/metrics",
        "http://user:secret@w1/metrics",
        "http://w1/metrics?x=1",
    ],
)
def test_parse_metrics_url_refuses(url: str) -> None:
    with pytest.raises(ValidationError, match="metrics URL"):
        parse_metrics_url(url)


def test_http_sd_groups_shape() -> None:
    workers = [
        WorkerView("w2", connected=False, metrics_url="http://10.0.0.2:9101/metrics"),
        WorkerView("w1", connected=True, metrics_url="https://10.0.0.1:9443/custom"),
        WorkerView("w3", connected=True),  # no exporter
        WorkerView("w4", connected=True, metrics_url="not a url"),
    ]
    assert http_sd_groups(workers) == [
        {
            "targets": ["10.0.0.1:9443"],
            "labels": {"worker": "w1", "__scheme__": "https", "__metrics_path__": "/custom"},
        },
        {
            "targets": ["10.0.0.2:9101"],
            "labels": {"worker": "w2", "__scheme__": "http", "__metrics_path__": "/metrics"},
        },
    ]
