"""Metrics reports as changes (procurator.core.metrics): the worker's
``ReportedSeries`` turns each set of samples into a whole report or a change,
the master's ``apply_metrics_report`` applies it; after every acknowledged
report the master holds exactly the worker's series, and a change it cannot
apply is refused with what it holds untouched."""

from __future__ import annotations

import random

import pytest

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.metrics import (
    MetricSample,
    MetricsReport,
    ReportedSeries,
    SeriesKey,
    VmSnapshot,
    WorkerSnapshot,
    apply_metrics_report,
    series_key,
    series_of,
)
from procurator.core.models import Phase
from procurator.worker.metrics import WorkerMetrics


def _deliver(
    worker: ReportedSeries,
    held: dict[SeriesKey, MetricSample] | None,
    samples: list[MetricSample],
) -> tuple[MetricsReport, dict[SeriesKey, MetricSample]]:
    report = worker.report(samples)
    held = apply_metrics_report(held, report)
    worker.delivered(takes_changes=True)
    return report, held


def test_a_session_reports_whole_first_then_only_what_moved_or_ended() -> None:
    worker = ReportedSeries("host-a")
    phase = MetricSample("procurator_vm_phase", 1.0, "web-1", (("phase", "running"),))
    cpu = MetricSample("procurator_vm_cpu_seconds_total", 1.5, "web-1")
    rx = MetricSample(
        "procurator_vm_network_receive_bytes_total", 10.0, "web-1", (("device", "n"),)
    )
    gone = MetricSample("procurator_vm_restarts_total", 0.0, "web-2")
    first, held = _deliver(worker, None, [phase, cpu, rx, gone])
    assert first.whole and first.samples == (phase, cpu, rx, gone) and first.ended == ()

    # The same objects, a new object of the same value, one moved figure,
    # one series gone and one new.
    cpu_again = MetricSample("procurator_vm_cpu_seconds_total", 1.5, "web-1")
    rx_moved = MetricSample(
        "procurator_vm_network_receive_bytes_total", 42.0, "web-1", (("device", "n"),)
    )
    new = MetricSample("procurator_vm_restarts_total", 0.0, "web-3")
    second, held = _deliver(worker, held, [phase, cpu_again, rx_moved, new])
    assert not second.whole
    assert set(second.samples) == {rx_moved, new}  # in no particular order
    assert second.ended == (series_key(gone),)
    assert held == series_of([phase, cpu_again, rx_moved, new])

    # Nothing moved: an empty change.
    third, held = _deliver(worker, held, [phase, cpu_again, rx_moved, new])
    assert (third.whole, third.samples, third.ended) == (False, (), ())
    # A phase left: its series ends, the new phase's is new.
    stopped = MetricSample("procurator_vm_phase", 1.0, "web-1", (("phase", "stopped"),))
    fourth, held = _deliver(worker, held, [stopped, cpu_again, rx_moved, new])
    assert fourth.samples == (stopped,) and fourth.ended == (series_key(phase),)
    assert held == series_of([stopped, cpu_again, rx_moved, new])


def test_the_master_holds_exactly_the_workers_series_after_every_report() -> None:
    """Random sample sets, reusing objects as the poller does (a VM that did
    not change keeps its samples), replacing some with equal or moved
    values, dropping and adding series; refusals and an older master in
    between."""
    rng = random.Random(31)
    keys = [(f"procurator_m{n % 5}", f"vm-{n // 5}", (("device", f"d{n % 3}"),)) for n in range(60)]
    current: dict[SeriesKey, MetricSample] = {}
    worker = ReportedSeries("host-a")
    held: dict[SeriesKey, MetricSample] | None = None
    changes = 0
    for step in range(300):
        for key in rng.sample(keys, 12):
            roll = rng.random()
            if roll < 0.25:
                current.pop(key, None)
            elif roll < 0.5 and key in current:
                # A new object, same value: not a change.
                current[key] = MetricSample(key[0], current[key].value, key[1], key[2])
            else:
                current[key] = MetricSample(key[0], float(rng.randrange(4)), key[1], key[2])
        samples = list(current.values())
        rng.shuffle(samples)
        report = worker.report(samples)
        if step % 37 == 36:
            worker.refused()  # refused, or may not have arrived: whole next
            continue
        if step % 53 == 52:
            held = None  # the master restarted: its next change is refused
        try:
            held = apply_metrics_report(held, report)
        except ValidationError:
            assert not report.whole
            worker.refused()
            report = worker.report(samples)
            assert report.whole
            held = apply_metrics_report(held, report)
        changes += not report.whole
        worker.delivered(takes_changes=True)
        assert held == current
    assert changes > 200


def test_an_idle_worker_reports_an_empty_change_and_a_removed_vm_ends() -> None:
    """Through the worker's exporter: what ``to_report`` hands the link."""
    metrics = WorkerMetrics(clock=lambda: 100.0)
    vms = tuple(
        VmSnapshot(f"web-{i}", Phase.RUNNING, hash="h", counters={"net0": {"rx_bytes": i}})
        for i in range(3)
    )
    metrics.update(WorkerSnapshot(vms, 1.0))
    worker = ReportedSeries("host-a")
    first, held = _deliver(worker, None, metrics.to_report())
    assert first.whole
    metrics.update(WorkerSnapshot(vms, 2.0))
    idle, held = _deliver(worker, held, metrics.to_report())
    assert (idle.whole, idle.samples, idle.ended) == (False, (), ())
    ticked = VmSnapshot("web-0", Phase.RUNNING, hash="h", counters={"net0": {"rx_bytes": 7}})
    metrics.update(WorkerSnapshot((ticked, vms[1]), 3.0))
    change, held = _deliver(worker, held, metrics.to_report())
    moved = {(s.name, s.vm_id, dict(s.labels).get("phase"), s.value) for s in change.samples}
    assert moved == {
        ("procurator_vm_network_receive_bytes_total", "web-0", None, 7.0),
        ("procurator_worker_vms", "", "running", 2.0),
    }
    assert {vm_id for _, vm_id, _ in change.ended} == {"web-2"}
    assert held == series_of(metrics.to_report())


def test_an_older_master_gets_whole_reports() -> None:
    worker = ReportedSeries("host-a")
    sample = MetricSample("procurator_worker_observed_generation", 3.0)
    for _ in range(3):
        assert worker.report([sample]).whole
        worker.delivered(takes_changes=False)  # its answer has no takesChanges
    assert not worker.has_base


def test_a_change_the_master_cannot_apply_is_refused_and_changes_nothing() -> None:
    a = MetricSample("procurator_vm_restarts_total", 1.0, "web-1")
    b = MetricSample("procurator_vm_restarts_total", 2.0, "web-2")
    other = ("procurator_vm_restarts_total", "web-9", ())
    with pytest.raises(ValidationError, match="no base"):
        apply_metrics_report(None, MetricsReport("host-a", (a,), whole=False))
    held = series_of([a, b])
    before = dict(held)
    refused = [
        MetricsReport("host-a", (), (other,), whole=False),  # not held
        MetricsReport("host-a", (a,), (series_key(a),), whole=False),  # ended and reported
        MetricsReport("host-a", (a, a), (), whole=False),  # twice
        MetricsReport("host-a", (), (series_key(a), series_key(a)), whole=False),
    ]
    for report in refused:
        with pytest.raises(ValidationError):
            apply_metrics_report(held, report)
        assert held == before
    with pytest.raises(LimitExceededError):
        apply_metrics_report(
            held,
            MetricsReport("host-a", (MetricSample("x", 1.0, "web-3"),), whole=False),
            max_series=2,
        )
    assert held == before
    with pytest.raises(LimitExceededError):
        apply_metrics_report(None, MetricsReport("host-a", (a, b)), max_series=1)
    # A whole report replaces whatever was held, base or not.
    assert apply_metrics_report(held, MetricsReport("host-a", (b,))) == series_of([b])


def test_a_report_that_names_a_series_twice_is_followed_by_whole_ones() -> None:
    """A bug of the report's maker: which of the two the master keeps is
    the order of a whole report's samples, which a change cannot say."""
    worker = ReportedSeries("host-a")
    one = MetricSample("procurator_vm_restarts_total", 1.0, "web-1")
    twin = MetricSample("procurator_vm_restarts_total", 2.0, "web-1")
    other = MetricSample("procurator_vm_restarts_total", 0.0, "web-2")
    _, held = _deliver(worker, None, [one, twin, other])
    assert held == series_of([twin, other])
    report, held = _deliver(worker, held, [one, other])  # the twin went
    assert report.whole and held == series_of([one, other])
    report, held = _deliver(worker, held, [one, other])
    assert not report.whole and report.samples == report.ended == ()
    # A series named twice in a change: the other series' end is not lost.
    again = MetricSample("procurator_vm_restarts_total", 5.0, "web-1")
    report, held = _deliver(worker, held, [one, again])
    assert not report.whole and report.ended == (series_key(other),)
    assert series_key(other) not in held
    assert _deliver(worker, held, [one, again])[0].whole
