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

The master's own work is measured by ``MasterInstruments``, fed by two
decorators the composition root (``procurator.app.master``) puts around the ports
it wires: ``InstrumentedBackend`` around the service the RPC server calls
(calls and errors by method and code; the time from an apply to each
affected worker's observing it) and ``InstrumentedStore`` around the
database (operation durations, failures; and the moves ended, by outcome,
as the store takes a move's last phase). Decorating the ports, rather than
counting inside the RPC server or the service, keeps the counting in one
place and leaves both untouched; what it cannot see: a request refused by
the RPC layer itself before it reaches the service (undecodable, or an
unauthorized certificate), and applies made before a master restart.

Moves (docs/SNAPSHOTS.md, "Moves"): the view carries the moves under way as
the leader's move duty last stepped them (none on a master that does not
lead), exported by phase and with each one's time in its phase; the moves
ended are counted per process, from 0 at every start (a reset Prometheus'
``increase()`` takes in its stride): after a failover the new leader counts
those it ends, so alerts sum over masters.
"""

from __future__ import annotations

import collections
import functools
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from procurator.core.control import ApplyResult
from procurator.core.errors import ProcuratorError, StaleGenerationError
from procurator.core.metrics import (
    CATALOGUE,
    FleetView,
    MetricSample,
    Scope,
    WorkerView,
    group_samples,
    http_sd_groups,
)
from procurator.core.models import Phase, WorkerState
from procurator.core.move import Move, MovePhase
from procurator.core.rollout import RolloutPhase, RolloutView, VmState
from procurator.master.service import MasterService
from procurator.master.store import Store
from procurator.prometheus import to_metric

__all__ = [
    "MAX_PENDING_APPLIES",
    "RPC_METHODS",
    "STORE_OPERATIONS",
    "FleetViewSource",
    "InstrumentedBackend",
    "InstrumentedStore",
    "MasterInstruments",
    "MasterMetrics",
]

MAX_PENDING_APPLIES = 64
"""Applies per worker waiting to be observed that are remembered for the
apply-to-observed histogram; older ones are forgotten (never observed)."""

RPC_METHODS = (
    "apply",
    "applyPatch",
    "status",
    "waitChange",
    "describeVm",
    "events",
    "register",
    "getAssignment",
    "reportStatus",
    "reportStatusChanges",
    "reportMetrics",
    "reportEvents",
    "reportStatusAndEvents",
)
"""The ``method`` label values ``InstrumentedBackend`` counts under."""

STORE_OPERATIONS = ("load", "commit")
"""Store operations whose error series exist from the start (any other
coroutine method of the store is timed too, under its own name)."""

# Series that exist from the start at 0, so that ``increase()`` sees the
# first error (a counter born at 1 shows no increase): every method's calls
# and internal errors, every store operation's errors by the codes a store
# raises.
_INITIAL_ERROR_CODES = ("internal",)
_INITIAL_STORE_ERROR_CODES = ("unavailable", "internal")

_STORE_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_APPLY_TO_OBSERVED_BUCKETS = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip

FleetViewSource = Callable[[], FleetView]

_WORKER_STATES = tuple(s.value for s in WorkerState)


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
        instruments: MasterInstruments | None = None,
    ) -> None:
        self._view = view
        self._clock = clock
        self._instruments = instruments
        self.registry = registry if registry is not None else CollectorRegistry()
        # worker id -> (the samples tuple validated, its metrics, dropped).
        # Guarded by _lock, a leaf lock held only for dict access.
        self._relay_cache: dict[str, tuple[tuple[MetricSample, ...], list[Metric], int]] = {}
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
        if view.rollout is not None:
            yield from _rollout_metrics(view.rollout)
        yield from _move_metrics(view.moves, now)
        if self._instruments is not None:
            yield from self._instruments.collect()
        yield from self._relayed_metrics(workers)

    def _fleet_metrics(self, workers: list[WorkerView], now: float) -> Iterator[Metric]:
        connected_count = _metric("procurator_master_workers_connected")
        connected_count.add_sample(
            connected_count.name, {}, float(sum(1 for w in workers if w.connected))
        )
        yield connected_count
        connected = _metric("procurator_master_worker_connected")
        state = _metric("procurator_master_worker_state")
        desired = _metric("procurator_master_worker_desired_generation")
        observed = _metric("procurator_master_worker_observed_generation")
        vms = _metric("procurator_master_worker_vms")
        reported_at = _metric("procurator_master_worker_last_report_timestamp_seconds")
        age = _metric("procurator_master_worker_last_report_age_seconds")
        for worker in workers:
            labels = {"worker": worker.worker_id}
            connected.add_sample(connected.name, labels, 1.0 if worker.connected else 0.0)
            for value in _WORKER_STATES:
                state.add_sample(
                    state.name,
                    {"worker": worker.worker_id, "state": value},
                    1.0 if worker.state == value else 0.0,
                )
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
        yield from (connected, state, desired, observed, vms, reported_at, age)

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
        metrics = [to_metric(family) for family in families]
        with self._lock:
            self._relay_cache[worker.worker_id] = (worker.samples, metrics, dropped)
        return metrics, dropped


# -- the master's own work --------------------------------------------------------


def _rollout_metrics(rollout: RolloutView) -> Iterator[Metric]:
    labels = {"rollout": rollout.id}
    phase = _metric("procurator_master_rollout_phase")
    for value in RolloutPhase:
        phase.add_sample(
            phase.name,
            {**labels, "phase": value.value},
            1.0 if rollout.phase == value.value else 0.0,
        )
    batches = _metric("procurator_master_rollout_batches")
    batches.add_sample(batches.name, labels, float(rollout.batches))
    vms = _metric("procurator_master_rollout_vms")
    for state in VmState:
        vms.add_sample(vms.name, {**labels, "state": state.value}, float(rollout.count(state)))
    prepared = _metric("procurator_master_rollout_prepared_workers")
    prepared.add_sample(prepared.name, labels, float(rollout.prepared_workers))
    prepare = _metric("procurator_master_rollout_prepare_workers")
    prepare.add_sample(prepare.name, labels, float(rollout.prepare_workers))
    yield from (phase, batches, vms, prepared, prepare)


_MOVE_PHASES_UNDER_WAY = tuple(p for p in MovePhase if p not in (MovePhase.DONE, MovePhase.FAILED))
_MOVE_OUTCOMES = (MovePhase.DONE.value, MovePhase.FAILED.value)


def _move_metrics(moves: tuple[Move, ...], now: float) -> Iterator[Metric]:
    """The moves under way: how many by phase (every phase from the start,
    at 0), and each one's time in its phase (``now``: Unix time), labelled
    by VM (one move at a time per VM) and never by op id."""
    by_phase = collections.Counter(m.phase for m in moves)
    count = _metric("procurator_master_moves")
    for phase in _MOVE_PHASES_UNDER_WAY:
        count.add_sample(count.name, {"phase": phase.value}, float(by_phase[phase]))
    age = _metric("procurator_master_move_phase_age_seconds")
    for move in sorted(moves, key=lambda m: m.vm_id):
        since_ms = move.updated_unix_ms or move.started_unix_ms
        age.add_sample(
            age.name,
            {
                "vm": move.vm_id,
                "phase": move.phase.value,
                "source": move.source,
                "target": move.target,
            },
            max(0.0, now - since_ms / 1000),
        )
    yield from (count, age)


def _error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, ProcuratorError) else "internal"


class MasterInstruments:
    """Figures of the master's own work, for ``MasterMetrics(instruments=)``.

    Fed on the trio thread (through ``InstrumentedBackend`` and
    ``InstrumentedStore``), read by scrapes on the HTTP server's threads.
    ``_lock`` guards the counter dicts and is a leaf lock (held for dict
    access only); the histograms are prometheus_client's own, thread-safe,
    and registered nowhere (``collect`` hands them to the exporter). The
    pending applies are touched only on the trio thread.

    Label values are bounded: methods are the decorator's fixed names,
    codes the error taxonomy's (``procurator.core.errors``), operations
    ``load`` and ``commit``. ``clock`` is monotonic time, for durations."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._calls: dict[str, int] = dict.fromkeys(RPC_METHODS, 0)
        self._errors: dict[tuple[str, str], int] = {
            (method, code): 0 for method in RPC_METHODS for code in _INITIAL_ERROR_CODES
        }
        self._store_errors: dict[tuple[str, str], int] = {
            (operation, code): 0
            for operation in STORE_OPERATIONS
            for code in _INITIAL_STORE_ERROR_CODES
        }
        self._store_duration = self._histogram(
            "procurator_master_store_operation_duration_seconds", _STORE_BUCKETS
        )
        self._moves_ended: dict[str, int] = dict.fromkeys(_MOVE_OUTCOMES, 0)
        self._apply_to_observed = self._histogram(
            "procurator_master_apply_to_observed_seconds", _APPLY_TO_OBSERVED_BUCKETS
        )
        # worker id -> (generation, applied at) of applies it has not observed
        # yet, oldest first. Trio thread only.
        self._pending: dict[str, collections.deque[tuple[int, float]]] = {}

    @staticmethod
    def _histogram(name: str, buckets: tuple[float, ...]) -> Histogram:
        spec = CATALOGUE[name]
        return Histogram(name, spec.help, labelnames=spec.labels, buckets=buckets, registry=None)

    def backend(self, service: MasterService) -> InstrumentedBackend:
        """``service`` as the RPC server should call it: every call counted."""
        return InstrumentedBackend(service, self)

    def store(self, store: Store) -> InstrumentedStore:
        """``store`` as the service should use it: every operation timed."""
        return InstrumentedStore(store, self)

    def now(self) -> float:
        """The instruments' monotonic clock, in seconds."""
        return self._clock()

    # -- feeding (trio thread) ------------------------------------------------

    def count_call(self, method: str, error: BaseException | None = None) -> None:
        with self._lock:
            self._calls[method] = self._calls.get(method, 0) + 1
            if error is not None:
                key = (method, _error_code(error))
                self._errors[key] = self._errors.get(key, 0) + 1

    def count_error(self, method: str, error: BaseException) -> None:
        """An error a counted call answered without raising it (a part of
        the call's results)."""
        with self._lock:
            key = (method, _error_code(error))
            self._errors[key] = self._errors.get(key, 0) + 1

    def observe_store(
        self, operation: str, seconds: float, error: BaseException | None = None
    ) -> None:
        self._store_duration.labels(operation).observe(max(0.0, seconds))
        # A stale generation is optimistic concurrency doing its job, not
        # the database failing.
        if error is not None and not isinstance(error, StaleGenerationError):
            key = (operation, _error_code(error))
            with self._lock:
                self._store_errors[key] = self._store_errors.get(key, 0) + 1

    def move_written(self, move: Move, before: Move) -> None:
        """The store took ``move`` in place of ``before``: count it once
        when that ended it."""
        if move.over and not before.over:
            with self._lock:
                self._moves_ended[move.phase.value] += 1

    def applied(self, result: ApplyResult) -> None:
        """An apply committed: each worker it changed now has a generation
        to observe."""
        if result.dry_run or not result.changed or result.replayed:
            return  # nothing new to observe
        now = self.now()
        for diff in result.diffs:
            pending = self._pending.get(diff.worker_id)
            if pending is None:
                pending = self._pending[diff.worker_id] = collections.deque(
                    maxlen=MAX_PENDING_APPLIES
                )
            pending.append((result.generation, now))

    def observed(self, worker_id: str, generation: int) -> None:
        """``worker_id`` reported ``generation`` observed: every apply up to
        it reached that worker now."""
        pending = self._pending.get(worker_id)
        if not pending:
            return
        now = self.now()
        while pending and pending[0][0] <= generation:
            _, applied_at = pending.popleft()
            self._apply_to_observed.observe(max(0.0, now - applied_at))
        if not pending:
            del self._pending[worker_id]

    # -- reading (any thread) -----------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            calls = sorted(self._calls.items())
            errors = sorted(self._errors.items())
            store_errors = sorted(self._store_errors.items())
            moves_ended = sorted(self._moves_ended.items())
        calls_total = _metric("procurator_master_rpc_calls_total")
        for method, count in calls:
            calls_total.add_sample(
                "procurator_master_rpc_calls_total", {"method": method}, float(count)
            )
        yield calls_total
        errors_total = _metric("procurator_master_rpc_errors_total")
        for (method, code), count in errors:
            errors_total.add_sample(
                "procurator_master_rpc_errors_total", {"method": method, "code": code}, float(count)
            )
        yield errors_total
        yield from self._store_duration.collect()
        store_errors_total = _metric("procurator_master_store_errors_total")
        for (operation, code), count in store_errors:
            store_errors_total.add_sample(
                "procurator_master_store_errors_total",
                {"operation": operation, "code": code},
                float(count),
            )
        yield store_errors_total
        yield from self._apply_to_observed.collect()
        ended = _metric("procurator_master_moves_ended_total")
        for outcome, count in moves_ended:
            ended.add_sample(
                "procurator_master_moves_ended_total", {"outcome": outcome}, float(count)
            )
        yield ended


class InstrumentedBackend:
    """The master service as the RPC server calls it (it fits
    ``procurator.rpc.master_server.MasterBackend``): every coroutine method
    is counted under its wire method name (``_WIRE_NAMES``; one not listed
    there under its own name), errors by code. An apply that changed the
    fleet, and a status report, also feed the apply-to-observed histogram.

    Attributes pass through (``__getattr__``), so the decorator follows the
    port as it grows instead of having to be changed with it; each wrapper
    is made once and kept. The RPC server looks methods up on the capnp
    thread: two threads making the same wrapper at once is harmless (the
    wrappers are alike; the last one is kept). The wrappers themselves run
    on the trio thread, and feed the histogram with no checkpoint between
    the service's answer and the feeding, so an apply is recorded before any
    worker can report having observed it."""

    def __init__(self, service: MasterService, instruments: MasterInstruments) -> None:
        self._service = service
        self._instruments = instruments

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._service, name)
        if name.startswith("_") or name in _UNCOUNTED or not inspect.iscoroutinefunction(attr):
            return attr
        method = _WIRE_NAMES.get(name, name)
        instruments = self._instruments
        after = _AFTER.get(name)

        @functools.wraps(attr)
        async def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                result = await attr(*args, **kwargs)
            except Exception as exc:
                instruments.count_call(method, exc)
                raise
            instruments.count_call(method)
            if after is not None:
                after(instruments, args, kwargs, result)
            return result

        setattr(self, name, counted)
        return counted


def _after_apply(
    instruments: MasterInstruments, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
) -> None:
    instruments.applied(result)


def _after_patch(
    instruments: MasterInstruments, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
) -> None:
    # A patch answered with the parts the master lacks applied nothing.
    if result.result is not None:
        instruments.applied(result.result)


def _after_report(
    instruments: MasterInstruments, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
) -> None:
    # report_status(token, status) / report_status_changes(token, changes):
    # both carry the worker id and its observed generation.
    for value in (*args, *kwargs.values()):
        if hasattr(value, "worker_id") and hasattr(value, "observed_generation"):
            instruments.observed(value.worker_id, value.observed_generation)
            return


_WIRE_NAMES = {
    "apply": "apply",
    "apply_patch": "applyPatch",
    "fleet_status": "status",
    "wait_change": "waitChange",
    "describe_vm": "describeVm",
    "recent_events": "events",
    "register": "register",
    "get_assignment": "getAssignment",
    "report_status": "reportStatus",
    "report_status_changes": "reportStatusChanges",
    "report_metrics": "reportMetrics",
    "report_events": "reportEvents",
    "report_status_and_events": "reportStatusAndEvents",
}


def _after_status_and_events(
    instruments: MasterInstruments, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
) -> None:
    _after_report(instruments, args, kwargs, result)
    if result is not None:  # the events' part answered an error
        instruments.count_error("reportStatusAndEvents", result)


_UNCOUNTED = frozenset({"run", "unregister"})  # the service's life; a connection that ended
_AFTER: dict[str, Callable[[MasterInstruments, tuple[Any, ...], dict[str, Any], Any], None]] = {
    "apply": _after_apply,
    "apply_patch": _after_patch,
    "report_status": _after_report,
    "report_status_changes": _after_report,
    "report_status_and_events": _after_status_and_events,
}


class InstrumentedStore:
    """The master's database as the service uses it (it fits
    ``procurator.master.store.Store``): every coroutine method is timed
    under its own name as the ``operation`` label, failures counted by code
    (``watch``, which runs as long as the master, is not); a move's write
    that ended it (``put_move``, ``commit_move``) is counted by outcome once
    it returned. Attributes pass
    through (``__getattr__``), as for ``InstrumentedBackend``."""

    def __init__(self, store: Store, instruments: MasterInstruments) -> None:
        self._store = store
        self._instruments = instruments

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name.startswith("_") or name in _UNTIMED or not inspect.iscoroutinefunction(attr):
            return attr
        instruments = self._instruments

        written = _MOVE_WRITES.get(name)

        @functools.wraps(attr)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = instruments.now()
            try:
                result = await attr(*args, **kwargs)
            except Exception as exc:
                instruments.observe_store(name, instruments.now() - began, exc)
                raise
            instruments.observe_store(name, instruments.now() - began)
            if written is not None:
                instruments.move_written(*written(*args, **kwargs))
            return result

        setattr(self, name, timed)
        return timed


_UNTIMED = frozenset({"aclose", "open", "watch"})


def _put_move(fence: object, move: Move, before: Move, **_: Any) -> tuple[Move, Move]:
    return move, before


def _commit_move(*, move: Move, move_before: Move, **_: Any) -> tuple[Move, Move]:
    return move, move_before


# The store's writes of a move's new phase (``Store.put_move``,
# ``Store.commit_move``): the (new, old) move of a call's arguments, for the
# moves ended. Counted once the write returned: a write refused (stale,
# fenced) ended nothing.
_MOVE_WRITES: dict[str, Callable[..., tuple[Move, Move]]] = {
    "put_move": _put_move,
    "commit_move": _commit_move,
}
