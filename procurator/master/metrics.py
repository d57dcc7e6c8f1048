"""The master's Prometheus exporter: the fleet as the master sees it, plus
every worker's reported per-VM figures relayed with a ``worker`` label, so a
small install can scrape the master alone.

Input is a callable returning a ``FleetView`` (``procurator.core.metrics``):
plain, immutable data the master's state already holds. It is called on
every scrape and every service-discovery request, from the HTTP server's
threads: it must be thread-safe and must not block (return a prebuilt
value, or build one under a short lock; never wait on the trio or capnp
thread).

Relaying is strict: a reported sample reaches the exposition only if the
catalogue knows its name and label names (a newer worker's extra metric is
dropped and counted in ``procurator_master_relayed_samples_invalid``, never
exposed half-typed), and duplicates collapse to one series. Validating a
report is the costly part of a scrape, so its result is cached per worker
and reused for as long as the view hands back the very same samples tuple
(reports arrive every few seconds; scrapes may be more frequent, and
several Prometheus servers may scrape at once).

Relayed samples are exposed as given: when a worker disconnects, whether
its last figures stay (marked stale by ``..._last_report_age_seconds``) or
go is the view's choice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from procurator.core.metrics import (
    CATALOGUE,
    Family,
    FleetView,
    SampleLike,
    Scope,
    WorkerView,
    group_samples,
    http_sd_groups,
)
from procurator.core.models import Phase

__all__ = ["FleetViewSource", "MasterMetrics"]

FleetViewSource = Callable[[], FleetView]


def _metric(name: str) -> Metric:
    spec = CATALOGUE[name]
    return Metric(spec.family, spec.help, spec.kind.value)


class MasterMetrics:
    """Collector (on its own registry) for the fleet view. ``clock`` gives
    Unix time, for the age of the workers' last reports."""

    def __init__(
        self,
        view: FleetViewSource,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._view = view
        self._clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        # worker id -> (the samples tuple validated, its metrics, dropped).
        # Guarded by _lock, a leaf lock held only for dict access.
        self._relay_cache: dict[str, tuple[tuple[SampleLike, ...], list[Metric], int]] = {}
        self._lock = threading.Lock()
        self.registry.register(self)

    def view(self) -> FleetView:
        return self._view()

    def sd_groups(self) -> list[dict[str, Any]]:
        """The Prometheus HTTP service discovery document (as JSON data)."""
        return http_sd_groups(self._view().workers)

    def exposition(self) -> bytes:
        """The text exposition format (what ``/metrics`` serves by default)."""
        return generate_latest(self.registry)

    # -- the registry's collector interface -------------------------------------

    def describe(self) -> list[Metric]:
        return [
            Metric(spec.family, spec.help, spec.kind.value)
            for spec in CATALOGUE.values()
            if spec.scope is Scope.MASTER or spec.reported
        ]

    def collect(self) -> Iterator[Metric]:
        view = self._view()
        now = self._clock()
        workers = sorted(view.workers, key=lambda w: w.worker_id)
        yield from self._fleet_metrics(workers, now)
        yield from self._relayed_metrics(workers)

    def _fleet_metrics(self, workers: list[WorkerView], now: float) -> Iterator[Metric]:
        connected_count = _metric("procurator_master_workers_connected")
        connected_count.add_sample(
            connected_count.name, {}, float(sum(1 for w in workers if w.connected))
        )
        yield connected_count
        connected = _metric("procurator_master_worker_connected")
        desired = _metric("procurator_master_worker_desired_generation")
        observed = _metric("procurator_master_worker_observed_generation")
        vms = _metric("procurator_master_worker_vms")
        reported_at = _metric("procurator_master_worker_last_report_timestamp_seconds")
        age = _metric("procurator_master_worker_last_report_age_seconds")
        for worker in workers:
            labels = {"worker": worker.worker_id}
            connected.add_sample(connected.name, labels, 1.0 if worker.connected else 0.0)
            desired.add_sample(desired.name, labels, float(worker.desired_generation))
            observed.add_sample(observed.name, labels, float(worker.observed_generation))
            for phase in Phase:
                vms.add_sample(
                    vms.name,
                    {"worker": worker.worker_id, "phase": phase.value},
                    float(worker.vms_by_phase.get(phase, 0)),
                )
            if worker.last_report_unix is not None:
                reported_at.add_sample(reported_at.name, labels, worker.last_report_unix)
                age.add_sample(age.name, labels, max(0.0, now - worker.last_report_unix))
        yield from (connected, desired, observed, vms, reported_at, age)

    def _relayed_metrics(self, workers: list[WorkerView]) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        invalid = _metric("procurator_master_relayed_samples_invalid")
        with self._lock:
            # Forget workers the view no longer lists.
            for gone in self._relay_cache.keys() - {w.worker_id for w in workers}:
                del self._relay_cache[gone]
        for worker in workers:
            metrics, dropped = self._relayed(worker)
            invalid.add_sample(invalid.name, {"worker": worker.worker_id}, float(dropped))
            for metric in metrics:
                into = merged.get(metric.name)
                if into is None:
                    into = merged[metric.name] = Metric(
                        metric.name, metric.documentation, metric.type
                    )
                into.samples.extend(metric.samples)
        yield invalid
        # Catalogue order, as on the workers.
        for spec in CATALOGUE.values():
            if spec.family in merged:
                yield merged[spec.family]

    def _relayed(self, worker: WorkerView) -> tuple[list[Metric], int]:
        """One worker's relayed families, validated once per report."""
        with self._lock:
            cached = self._relay_cache.get(worker.worker_id)
        if cached is not None and cached[0] is worker.samples:
            return cached[1], cached[2]
        families, dropped = group_samples(worker.samples, prefix=(("worker", worker.worker_id),))
        metrics = [_to_metric(family) for family in families]
        with self._lock:
            self._relay_cache[worker.worker_id] = (worker.samples, metrics, dropped)
        return metrics, dropped


def _to_metric(family: Family) -> Metric:
    """A prometheus_client family from grouped rows; never mutated after."""
    spec = family.spec
    metric = Metric(spec.family, spec.help, spec.kind.value)
    names = family.label_names
    for values, value in family.rows:
        metric.add_sample(spec.name, dict(zip(names, values, strict=True)), value)
    return metric
