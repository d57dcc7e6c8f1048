"""A big metrics report crosses as bounded slices (``report_slices``):
each carries at most the bound's series, the first keeps the report's kind,
and applying them in order leaves the master exactly what the one report
would have left, whole or a change, with ended series and a whole report
that names a series twice."""

from __future__ import annotations

import random

import pytest

from procurator.core.metrics import (
    MetricSample,
    MetricsReport,
    SeriesKey,
    apply_metrics_report,
    report_slices,
    series_of,
)


def _samples(vms: int, value: float = 1.0) -> list[MetricSample]:
    return [
        MetricSample(name, value + index, f"vm-{index}")
        for index in range(vms)
        for name in ("procurator_vm_cpu_seconds_total", "procurator_vm_memory_bytes")
    ]


def _apply_all(
    held: dict[SeriesKey, MetricSample] | None, slices: list[MetricsReport]
) -> dict[SeriesKey, MetricSample]:
    for part in slices:
        held = apply_metrics_report(held, part)
    assert held is not None
    return held


def _series_count(part: MetricsReport) -> int:
    return len(part.samples) + len(part.ended)


def test_a_whole_report_slices_into_a_whole_first_then_changes_that_compose() -> None:
    samples = _samples(1_000)  # 2,000 series
    report = MetricsReport("host-a", tuple(samples))
    slices = report_slices(report, 300)
    assert [part.whole for part in slices] == [True] + [False] * (len(slices) - 1)
    assert [_series_count(part) for part in slices] == [300] * 6 + [200]
    # Over what a session held before (a whole report replaces it).
    before = series_of([*_samples(5, value=9.0), MetricSample("gone", 1.0, "vm-x")])
    assert _apply_all(before, slices) == apply_metrics_report(None, report)


def test_a_change_with_moved_and_ended_series_slices_into_changes_that_compose() -> None:
    rng = random.Random(31)
    samples = _samples(1_000)
    held = series_of(samples)
    moved = tuple(
        MetricSample(s.name, s.value + 0.5, s.vm_id, s.labels) for s in rng.sample(samples, 700)
    )
    keys = list(held.keys() - series_of(moved).keys())
    ended = tuple(rng.sample(keys, 450))
    change = MetricsReport("host-a", moved, ended, whole=False)
    slices = report_slices(change, 400)
    assert not any(part.whole for part in slices)
    assert all(_series_count(part) <= 400 for part in slices)
    assert sum(_series_count(part) for part in slices) == 1_150
    expected = apply_metrics_report(dict(held), change)
    assert _apply_all(dict(held), slices) == expected


def test_a_change_of_ended_series_only_slices_too() -> None:
    held = series_of(_samples(100))
    change = MetricsReport("host-a", (), tuple(held)[:150], whole=False)
    slices = report_slices(change, 64)
    assert [_series_count(part) for part in slices] == [64, 64, 22]
    assert _apply_all(dict(held), slices) == apply_metrics_report(dict(held), change)


def test_a_whole_report_that_names_a_series_twice_keeps_its_last_sample() -> None:
    samples = _samples(10)
    again = MetricSample(samples[0].name, 99.0, samples[0].vm_id)
    report = MetricsReport("host-a", (*samples, again))
    slices = report_slices(report, 4)
    assert _apply_all(None, slices) == apply_metrics_report(None, report)


def test_a_report_within_the_bound_is_its_own_one_slice() -> None:
    report = MetricsReport("host-a", tuple(_samples(3)))
    assert report_slices(report, 6) == [report]
    assert report_slices(MetricsReport("host-a", ()), 6) == [MetricsReport("host-a", ())]
    with pytest.raises(ValueError, match="at least one series"):
        report_slices(report, 0)
