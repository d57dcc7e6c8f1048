"""The worker's Prometheus exporter: per-VM figures, worker-wide histograms
and counters, the compact report for the master, and the ``/proc`` reader.

Shape:

- A *poller* (``WorkerMetrics.run_poller``, a trio service) calls a blocking
  ``source`` (the VmManager's snapshot of its VMs, counters included) in a
  worker thread, reads each VMM process' CPU time and resident memory from
  ``/proc``, builds the per-VM samples a report sends, and publishes the
  whole snapshot at once when every VM is done.
- A poll works in *slices* (``POLL_SLICE`` VMs, one short worker-thread
  call each) spread over ``POLL_SPREAD`` of its interval, sleeping in trio
  between them: no poll holds the GIL for an O(fleet) burst, so a change
  that arrives during a poll waits for one slice at most (at 4,000 VMs a
  poll in one piece held it ~0.7 s: docs/BENCHMARKS.md, issue 31). The
  first poll is not spread (the worker's start waits for it). Each VM's
  figures are still read once an interval; a poll publishes them all at
  once, at most ``POLL_SPREAD`` of an interval after it began, stamped
  with its start (``taken_at``): a published figure is at most 1.5
  intervals old (the ``ProcuratorWorkerMetricsPollStale`` alert allows 2
  minutes; 22.5 s at the default 15 s).
- A VM whose snapshot (figures included) equals the one of the last poll
  keeps its samples: only VMs that changed are built again, and of a VM
  whose figures alone moved (its VMM's CPU time, memory, device counters:
  a running guest's counters tick) only the samples of the figures that
  moved; the settled ones (phase, info, restarts, boot time, confinement:
  most of a VM's samples) are kept (issue 31 target 3: rebuilding them was
  most of an idle 1,000-VM poll's CPU). A kept sample is the same object
  from poll to poll, which is how the report to the master finds what
  moved (``procurator.core.metrics.ReportedSeries``). The samples
  are the same values either way, so the report and a scrape carry what
  they would without the reuse. ``/proc`` is read only for VMs with a
  VMM process (``pid`` set).
- ``collect()`` (run by the HTTP server's threads on every scrape) does no
  I/O and no per-VM work: it yields the families the last ``update``
  published plus a handful of worker-wide figures. A scrape therefore never
  touches ``/proc``, a VMM socket or a lock held across I/O, and costs the
  same whether a VMM hangs or not.
- Event hooks (``observe_reconcile_pass``, ``observe_api_call``,
  ``count_error``, ``observe_realise``, ``set_observed_generation``) are
  cheap and thread-safe: the reconciler (trio thread) and the threads
  driving the VmManager's supervisors' turns call them directly.
- Every instance owns its ``CollectorRegistry``; nothing touches
  prometheus_client's global registry.
- The VMs exported are the worker's VMs as its status reports them
  (``vm_snapshots``): a VM held incoming for a live move (its incoming VMM
  waiting for the source's state) is no VM of this worker's yet, so it is
  in no per-VM series and not counted in ``procurator_worker_vms``, whose
  phases are then the ones the master counts from the status
  (``procurator_master_worker_vms``); during the move the VM is counted
  once, on its source. Its VMM's resources show in the host's own figures.

Concurrency: the published state is one immutable ``_Published`` value
swapped by a single attribute assignment, so readers (scrapes,
``to_report``) never lock for it. ``_lock`` guards only the small event
dicts; it is a leaf lock: never held while calling out, never taken with
another lock held. Label values of events are bounded: past
``MAX_LABEL_VALUES`` distinct endpoints (or error kinds) new ones are
counted as ``other``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from functools import partial
from operator import attrgetter

import trio
from prometheus_client import CollectorRegistry, Histogram, generate_latest, make_wsgi_app
from prometheus_client.metrics_core import Metric

from procurator.core.errors import ProcuratorError, UnavailableError
from procurator.core.metrics import (
    CATALOGUE,
    MetricKind,
    MetricSample,
    ProcessUsage,
    Scope,
    VmSnapshot,
    WorkerSnapshot,
    group_samples,
    vm_figure_samples,
    vm_settled_samples,
    vms_by_phase,
)
from procurator.core.models import Health, Phase, PrepareState
from procurator.prometheus import HttpServer, run_http_server, to_metric
from procurator.worker.turns import TurnPoolStats
from procurator.worker.vmrecord import VmObservation

__all__ = [
    "MAX_LABEL_VALUES",
    "POLL_SLICE",
    "POLL_SPREAD",
    "UsageReader",
    "VmSource",
    "WorkerMetrics",
    "read_process_usage",
    "vm_snapshots",
]

log = logging.getLogger(__name__)
_WHAT = "worker metrics"  # how its HTTP server is named in errors and logs


def vm_snapshots(
    observations: Iterable[VmObservation],
    counters: Mapping[str, Mapping[str, Mapping[str, int]]],
) -> list[VmSnapshot]:
    """The metrics' view of the VmManager's ``observations`` (with the
    ``counters`` its supervisors polled, by VM id): the VMs the status
    reports, so none held incoming for a live move (the module docstring)."""
    return [
        VmSnapshot(
            id=o.vm_id,
            phase=o.phase,
            hash=o.observed_hash or o.desired_hash,
            store_path=o.image,
            address=o.address,
            restarts=o.restarts,
            pid=o.pid or 0,
            counters=counters.get(o.vm_id, {}),
            confinement=o.confinement,
            boot_seconds=o.boot_seconds,
        )
        for o in observations
        if not o.incoming
    ]


MAX_LABEL_VALUES = 32
"""Distinct endpoints / error kinds tracked before folding into ``other``."""

POLL_SLICE = 200
"""VMs a poll handles in one worker-thread call (~10-20 ms of CPU at 200:
one ``/proc`` read pair and, for a VM that changed, its samples)."""

POLL_SPREAD = 0.5
"""The share of the interval a poll's slices are spread over: a poll
publishes at most this much of an interval after it began."""

VmSource = Callable[[], Iterable[VmSnapshot]]
"""Blocking, thread-safe: every VM of the worker right now (``usage`` unset)."""

UsageReader = Callable[[int, int], ProcessUsage | None]
"""(pid, start ticks or 0) -> usage, or None when that process is gone."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_REALISE_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
_PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_API_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


# -- /proc ----------------------------------------------------------------------


def _read_small(path: str) -> bytes:
    """A /proc file of one short line, whole: the kernel hands these
    out in one read (``stat`` is ~300 bytes, ``statm`` ~30)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def read_process_usage(pid: int, start_ticks: int = 0) -> ProcessUsage | None:
    """CPU time (user + system, all threads) and resident memory of ``pid``
    from ``/proc/<pid>/stat`` and ``/proc/<pid>/statm``. (``stat`` has an
    ``rss`` field too, but on current kernels it is an approximate per-CPU
    sum: 0 for a process that just grew. ``statm`` is exact, as ``VmRSS``.)

    Returns None when the process is gone, is a zombie, or (``start_ticks``
    given) is not the process that started then: its pid was recycled.
    Raises ``UnavailableError`` naming the pid and file for any other
    failure to read ``/proc``."""
    stat_path = f"/proc/{pid}/stat"
    statm_path = f"/proc/{pid}/statm"
    try:
        # One os.read each, no file object: the poller reads two files per
        # VMM per poll (8 of 24 µs a VMM went to the buffered file objects).
        stat = _read_small(stat_path)
        statm = _read_small(statm_path)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ESRCH):
            return None
        raise UnavailableError(
            f"cannot read /proc figures of pid {pid}: {exc.strerror} ({exc.filename})"
        ) from exc
    try:
        # The command name (field 2) is in parentheses and may hold spaces
        # or parentheses itself: split after the last ')'.
        fields = stat.rsplit(b")", 1)[1].split()
        state = fields[0]
        utime, stime, started = int(fields[11]), int(fields[12]), int(fields[19])
        resident_pages = int(statm.split()[1])
    except (IndexError, ValueError) as exc:
        raise UnavailableError(f"cannot parse {stat_path} / {statm_path}: {exc}") from exc
    if state in (b"Z", b"X"):
        return None
    if start_ticks and started != start_ticks:
        return None
    # statm is read after stat: a pid recycled in between (microseconds,
    # with the pid space to wrap around first) is not worth a re-read.
    return ProcessUsage(
        cpu_seconds=(utime + stime) / _CLOCK_TICKS,
        rss_bytes=resident_pages * _PAGE_SIZE,
    )


# -- the exporter ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Published:
    """Everything a report reads, built once per ``update``; a scrape's
    per-VM families are built from ``samples`` by the first scrape after."""

    snapshot: WorkerSnapshot
    samples: tuple[MetricSample, ...]  # per-VM, compact form
    phases: dict[Phase, int]


def _bounded(value: str, seen: set[str]) -> str:
    """``value`` if tracked (or room is left), else ``other``. Caller holds
    the lock guarding ``seen``."""
    if value in seen:
        return value
    if len(seen) < MAX_LABEL_VALUES:
        seen.add(value)
        return value
    return "other"


def _seconds(value: float) -> float | None:
    """A duration fit to observe: finite, negatives (clock steps) as 0."""
    if not math.isfinite(value):
        return None
    return max(0.0, value)


_Built = dict[str, tuple[VmSnapshot, tuple[MetricSample, ...], tuple[MetricSample, ...]]]
"""VM id -> the snapshot its samples were built from, its settled samples
(``vm_settled_samples``) and all its samples."""


_FIGURE_FIELDS = ("usage", "counters")
_FIELD_NAMES = tuple(f.name for f in fields(VmSnapshot))
_settled_fields = attrgetter(*(n for n in _FIELD_NAMES if n not in _FIGURE_FIELDS))
"""A snapshot's fields but its figures, as a tuple: compared as a whole, the
way the dataclass's ``__eq__`` compares, without ``replace``'s per-field
walk (4-6 µs a VM a poll: a third of the poll's Python at 1,000 VMs)."""
_all_fields = attrgetter(*_FIELD_NAMES)
_USAGE_AT = _FIELD_NAMES.index("usage")


def _with_usage(vm: VmSnapshot, usage: ProcessUsage | None) -> VmSnapshot:
    """``replace(vm, usage=usage)``, field by field in the class's order."""
    values = list(_all_fields(vm))
    values[_USAGE_AT] = usage
    return VmSnapshot(*values)


def _samples_of(vm: VmSnapshot, previous: _Built, built: _Built) -> tuple[MetricSample, ...]:
    """``vm``'s samples: the previous poll's when the VM's snapshot is the
    same (figures included); when only its figures moved (``usage``,
    ``counters``: a running VM's counters tick), the previous settled
    samples and its figures' samples, built anew where their value moved;
    else all built anew. Recorded in ``built``."""
    kept = previous.get(vm.id)
    if kept is not None and kept[0] == vm:
        entry = kept
    else:
        if kept is not None and _settled_fields(kept[0]) == _settled_fields(vm):
            settled = kept[1]
            # The figures that did not move keep their sample too.
            figures = vm_figure_samples(vm, kept[2][len(settled) :])
        else:
            settled = tuple(vm_settled_samples(vm))
            figures = vm_figure_samples(vm)
        entry = (vm, settled, settled + tuple(figures))
    built[vm.id] = entry
    return entry[2]


class _Poll:
    """One poll under way: the VMs the source listed, handled a slice at a
    time by ``WorkerMetrics._step_poll`` (blocking: a worker thread), then
    published whole by ``WorkerMetrics._end_poll``. Slices run one after
    the other (never two threads on one poll); the published state is
    untouched until the end."""

    def __init__(self, vms: list[VmSnapshot], previous: _Built, began: float) -> None:
        self.began = began  # Unix time, before the first figure was read
        self.pending = vms
        self.done = 0
        self.previous = previous
        self.built: _Built = {}
        self.vms: list[VmSnapshot] = []
        self.samples: list[MetricSample] = []

    @property
    def finished(self) -> bool:
        return self.done >= len(self.pending)

    def slices(self, size: int) -> int:
        return max(1, math.ceil(len(self.pending) / size))


class WorkerMetrics:
    """The worker's metrics: feed it (hooks, ``update`` / ``run_poller``),
    expose it (``serve`` / ``run_http``), report it (``to_report``).

    ``clock`` gives Unix time for snapshot timestamps (tests inject one)."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self._clock = clock
        self._lock = threading.Lock()  # leaf lock: guards the event dicts below
        self._errors: dict[str, int] = {}
        self._error_kinds: set[str] = set()
        self._api_failures: dict[str, int] = {}
        self._endpoints: set[str] = set()
        self._actions_started = 0
        self._observed_generation = 0
        # Guest health (procurator.worker.health) and images to prepare
        # (procurator.worker.prepare): counts by label, replaced whole.
        self._health_checks: dict[tuple[str, str], int] = {}
        self._vms_by_health: dict[str, int] = {}
        self._health_monitor_errors = 0
        self._prepared: dict[str, int] = {}
        self._turns: Callable[[], TurnPoolStats] | None = None
        self._published = _Published(WorkerSnapshot(), (), vms_by_phase(()))
        # The samples of each VM as the last publish built them, from the
        # snapshot they were built of: reused while a VM does not change.
        # Replaced whole by each publish (one assignment: no lock).
        self._built: _Built = {}
        # The per-VM families of one _Published, built by the first scrape
        # that needs them (most polls are never scraped: a poll every 15 s,
        # a scrape every 15-60 s). Leaf lock, held while building (CPU only).
        self._families_lock = threading.Lock()
        self._families: tuple[_Published, tuple[Metric, ...]] | None = None
        self.registry.register(self)
        self._reconcile_pass = self._histogram(
            "procurator_reconcile_pass_duration_seconds", _PASS_BUCKETS
        )
        self._api_call = self._histogram("procurator_vmm_api_call_duration_seconds", _API_BUCKETS)
        self._api_call_children: dict[str, Histogram] = {}
        self._realise = self._histogram(
            "procurator_image_realise_duration_seconds", _REALISE_BUCKETS
        )

    def _histogram(self, name: str, buckets: tuple[float, ...]) -> Histogram:
        spec = CATALOGUE[name]
        return Histogram(
            name, spec.help, labelnames=spec.labels, buckets=buckets, registry=self.registry
        )

    # -- event hooks (thread-safe, cheap) ------------------------------------

    def observe_reconcile_pass(self, seconds: float, actions_started: int = 0) -> None:
        """One reconcile pass took ``seconds``; fits ``Reconciler.on_pass``."""
        observed = _seconds(seconds)
        if observed is not None:
            self._reconcile_pass.observe(observed)
        if actions_started > 0:
            with self._lock:
                self._actions_started += actions_started

    def observe_api_call(self, endpoint: str, seconds: float, ok: bool) -> None:
        """One VMM API call (``endpoint`` like ``vm.boot``) and its outcome."""
        with self._lock:
            endpoint = _bounded(endpoint, self._endpoints)
            if not ok:
                self._api_failures[endpoint] = self._api_failures.get(endpoint, 0) + 1
            # The endpoint's child, found once (``labels`` checks, joins
            # and locks at every call); as bounded as the endpoints.
            child = self._api_call_children.get(endpoint)
        if child is None:  # made outside the leaf lock: labels() takes its own
            made = self._api_call.labels(endpoint)
            with self._lock:
                child = self._api_call_children.setdefault(endpoint, made)
        observed = _seconds(seconds)
        if observed is not None:
            child.observe(observed)

    def count_error(self, kind: str) -> None:
        """One error of ``kind``: a small fixed vocabulary (an error ``code``
        such as ``unavailable``, or ``metrics_poll``, ``proc_read``...),
        never a message or an id."""
        with self._lock:
            kind = _bounded(kind, self._error_kinds)
            self._errors[kind] = self._errors.get(kind, 0) + 1

    def observe_realise(self, seconds: float) -> None:
        """Validating and realising one image's store path took ``seconds``."""
        observed = _seconds(seconds)
        if observed is not None:
            self._realise.observe(observed)

    def set_observed_generation(self, generation: int) -> None:
        with self._lock:
            self._observed_generation = generation

    def count_health_check(self, kind: str, passed: bool) -> None:
        """One guest health check of ``kind`` (none, tcp, http) was made."""
        key = (kind, "pass" if passed else "fail")
        with self._lock:
            self._health_checks[key] = self._health_checks.get(key, 0) + 1

    def count_health_monitor_error(self) -> None:
        """One guest health check broke (procurator.worker.health)."""
        with self._lock:
            self._health_monitor_errors += 1

    def set_vms_by_health(self, counts: Mapping[Health, int]) -> None:
        """The worker's VMs by guest health now."""
        by_value = {health.value: count for health, count in counts.items()}
        with self._lock:
            self._vms_by_health = by_value

    def watch_turns(self, stats: Callable[[], TurnPoolStats] | None) -> None:
        """Read the supervisors' turn pool (``TurnPool.stats``) at each
        scrape; None: stop."""
        with self._lock:
            self._turns = stats

    def set_prepared(self, counts: Mapping[PrepareState, int]) -> None:
        """The images to prepare by state now."""
        by_value = {state.value: count for state, count in counts.items()}
        with self._lock:
            self._prepared = by_value

    # -- the snapshot ------------------------------------------------------------

    def update(self, snapshot: WorkerSnapshot) -> None:
        """Publish a new snapshot of the worker's VMs (from any thread).
        Builds the per-VM samples (what a report sends; a VM that did not
        change since the last publish keeps its samples); the families a
        scrape exposes are built from them once, by the first scrape."""
        previous = self._built
        built: _Built = {}
        samples = tuple(s for vm in snapshot.vms for s in _samples_of(vm, previous, built))
        self._publish(snapshot, samples, built)

    def _publish(
        self, snapshot: WorkerSnapshot, samples: tuple[MetricSample, ...], built: _Built
    ) -> None:
        self._built = built
        self._published = _Published(
            snapshot=snapshot, samples=samples, phases=vms_by_phase(snapshot.vms)
        )

    def _vm_families(self) -> tuple[Metric, ...]:
        """The per-VM families of the last snapshot, built once per snapshot."""
        published = self._published
        with self._families_lock:
            if self._families is not None and self._families[0] is published:
                return self._families[1]
            families, dropped = group_samples(published.samples)
            if (
                dropped
            ):  # vm_settled_samples and vm_figure_samples only make catalogue samples: a bug if not
                log.error("%d per-VM samples did not fit the metric catalogue", dropped)
            metrics = tuple(to_metric(f) for f in families)
            self._families = (published, metrics)
            return metrics

    @property
    def snapshot(self) -> WorkerSnapshot:
        """The snapshot published last."""
        return self._published.snapshot

    def refresh(
        self, source: VmSource, *, read_usage: UsageReader = read_process_usage
    ) -> WorkerSnapshot:
        """One poll in one piece, blocking (run it in a thread): ask
        ``source`` for the VMs, read each VMM's ``/proc`` figures, publish.
        Errors of ``source`` propagate; a ``/proc`` failure only loses that
        VM's usage figures (and counts a ``proc_read`` error)."""
        poll = self._begin_poll(source)
        while not poll.finished:
            self._step_poll(poll, POLL_SLICE, read_usage)
        return self._end_poll(poll)

    def _begin_poll(self, source: VmSource) -> _Poll:
        """List the VMs (blocking: the source locks the VmManager's map)."""
        began = self._clock()
        return _Poll(list(source()), self._built, began)

    def _step_poll(self, poll: _Poll, size: int, read_usage: UsageReader) -> None:
        """Handle the next ``size`` VMs of ``poll`` (blocking: ``/proc``)."""
        end = min(poll.done + size, len(poll.pending))
        for listed in poll.pending[poll.done : end]:
            # /proc only for a VM whose VMM process runs
            vm = listed if listed.pid <= 0 else _with_usage(listed, self._usage(listed, read_usage))
            poll.vms.append(vm)
            poll.samples.extend(_samples_of(vm, poll.previous, poll.built))
        poll.done = end

    def _usage(self, vm: VmSnapshot, read_usage: UsageReader) -> ProcessUsage | None:
        try:
            return read_usage(vm.pid, vm.pid_start_ticks)
        except ProcuratorError as exc:
            log.warning("no CPU/memory figures for VM %s (pid %d): %s", vm.id, vm.pid, exc)
            self.count_error("proc_read")
            return None

    def _end_poll(self, poll: _Poll) -> WorkerSnapshot:
        # Stamped with the poll's start: its oldest figure's age, the one an
        # alert on procurator_worker_metrics_poll_timestamp_seconds means.
        snapshot = WorkerSnapshot(vms=tuple(poll.vms), taken_at=poll.began)
        self._publish(snapshot, tuple(poll.samples), poll.built)
        return snapshot

    async def _poll_in_slices(
        self,
        source: VmSource,
        read_usage: UsageReader,
        limiter: trio.CapacityLimiter | None,
        *,
        size: int,
        spread: float,
    ) -> None:
        """One poll, a slice per worker-thread call, slice k starting no
        earlier than k * ``spread`` / slices after the poll began (0: one
        after the other). Between two slices no thread of the poll runs:
        the GIL is free for a change."""
        run = partial(trio.to_thread.run_sync, limiter=limiter)
        began = trio.current_time()
        poll = await run(self._begin_poll, source)
        pause = spread / poll.slices(size)
        step = partial(self._step_poll, poll, size, read_usage)
        done = 0
        while True:
            await run(step)
            done += 1
            if poll.finished:
                break
            await trio.sleep_until(began + done * pause)  # a checkpoint when past
        await run(self._end_poll, poll)

    async def run_poller(
        self,
        source: VmSource,
        *,
        interval: float = 15.0,
        read_usage: UsageReader = read_process_usage,
        limiter: trio.CapacityLimiter | None = None,
        slice_size: int = POLL_SLICE,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Poll every ``interval`` seconds until cancelled, each poll in
        slices of ``slice_size`` VMs spread over ``POLL_SPREAD`` of the
        interval (module docstring); reports started after the first poll
        (so figures exist), which is not spread. A failed poll keeps the
        last figures (``procurator_worker_metrics_poll_timestamp_seconds``
        shows their age) and counts a ``metrics_poll`` error."""
        if not interval > 0:
            raise ValueError(f"metrics poll interval must be positive, not {interval}")
        if slice_size < 1:
            raise ValueError(f"metrics poll slice must be at least 1 VM, not {slice_size}")
        started = False
        while True:
            began = trio.current_time()
            try:
                await self._poll_in_slices(
                    source,
                    read_usage,
                    limiter,
                    size=slice_size,
                    spread=interval * POLL_SPREAD if started else 0.0,
                )
            except ProcuratorError as exc:
                log.warning("metrics poll failed, keeping the last figures: %s", exc)
                self.count_error("metrics_poll")
            except Exception:
                # A bug in a source must not take the worker (and its
                # reconciler) down with it: log it loudly, try next time.
                log.exception("metrics poll raised an unexpected error")
                self.count_error("metrics_poll")
            if not started:
                task_status.started()
                started = True
            await trio.sleep_until(began + interval)

    # -- outputs -------------------------------------------------------------------

    def to_report(self) -> list[MetricSample]:
        """The compact sample list for ``Worker.reportMetrics``: every per-VM
        figure of the last snapshot plus the worker's observed generation,
        VMs by phase and errors by kind. No histograms. No I/O. The samples
        of a VM kept since the last publish are the very objects of the
        last call: the link's session finds what moved by identity first
        and sends the master only that (``procurator.core.metrics.
        ReportedSeries``)."""
        published = self._published
        with self._lock:
            generation = self._observed_generation
            errors = sorted(self._errors.items())
        out = list(published.samples)
        out.append(MetricSample("procurator_worker_observed_generation", float(generation)))
        out.extend(
            MetricSample("procurator_worker_vms", float(count), "", (("phase", phase.value),))
            for phase, count in published.phases.items()
        )
        out.extend(
            MetricSample("procurator_worker_errors_total", float(count), "", (("kind", kind),))
            for kind, count in errors
        )
        return out

    def exposition(self) -> bytes:
        """The text exposition format (what ``/metrics`` serves by default)."""
        return generate_latest(self.registry)

    def serve(self, host: str = "0.0.0.0", port: int = 9301) -> HttpServer:
        """Serve the exposition on ``host:port`` (port 0: any free port; see
        ``HttpServer.port``) until ``close``; it answers on every path,
        ``/metrics`` by convention. Raises ``PermanentError`` when the
        address cannot be bound."""
        return HttpServer(make_wsgi_app(self.registry), host, port, what=_WHAT)

    async def run_http(
        self,
        host: str = "0.0.0.0",
        port: int = 9301,
        *,
        task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """``serve`` as a trio service: ``server = await nursery.start(
        metrics.run_http, host, port)``; stops when cancelled."""
        await run_http_server(
            make_wsgi_app(self.registry), host, port, what=_WHAT, task_status=task_status
        )

    # -- the registry's collector interface ----------------------------------------

    def describe(self) -> list[Metric]:
        """Names ``collect`` produces, for the registry's clash check and
        ``?name[]=`` filtering (histograms are registered on their own)."""
        return [
            Metric(spec.family, spec.help, spec.kind.value)
            for spec in CATALOGUE.values()
            if spec.scope in (Scope.VM, Scope.WORKER) and spec.kind is not MetricKind.HISTOGRAM
        ]

    def collect(self) -> Iterator[Metric]:
        """Called by the registry on every scrape. No I/O; the first scrape
        after an ``update`` builds the per-VM families, later ones reuse
        them."""
        yield from self._vm_families()
        yield from self._worker_metrics()

    def _worker_metrics(self) -> Iterator[Metric]:
        published = self._published
        with self._lock:
            generation = self._observed_generation
            errors = sorted(self._errors.items())
            failures = sorted(self._api_failures.items())
            actions = self._actions_started
            health_checks = sorted(self._health_checks.items())
            by_health = sorted(self._vms_by_health.items())
            monitor_errors = self._health_monitor_errors
            prepared = sorted(self._prepared.items())
            turns = self._turns

        def metric(name: str) -> Metric:
            spec = CATALOGUE[name]
            return Metric(spec.family, spec.help, spec.kind.value)

        vms = metric("procurator_worker_vms")
        for phase, count in published.phases.items():
            vms.add_sample(vms.name, {"phase": phase.value}, float(count))
        yield vms
        observed = metric("procurator_worker_observed_generation")
        observed.add_sample(observed.name, {}, float(generation))
        yield observed
        errors_total = metric("procurator_worker_errors_total")
        for kind, count in errors:
            errors_total.add_sample("procurator_worker_errors_total", {"kind": kind}, count)
        yield errors_total
        if published.snapshot.taken_at > 0:
            polled = metric("procurator_worker_metrics_poll_timestamp_seconds")
            polled.add_sample(polled.name, {}, published.snapshot.taken_at)
            yield polled
        started = metric("procurator_reconcile_actions_started_total")
        started.add_sample("procurator_reconcile_actions_started_total", {}, float(actions))
        yield started
        failed = metric("procurator_vmm_api_call_failures_total")
        for endpoint, count in failures:
            failed.add_sample(
                "procurator_vmm_api_call_failures_total", {"endpoint": endpoint}, count
            )
        yield failed
        if by_health:
            health = metric("procurator_worker_vms_health")
            for value, count in by_health:
                health.add_sample(health.name, {"health": value}, float(count))
            yield health
        checks = metric("procurator_health_checks_total")
        for (kind, result), count in health_checks:
            checks.add_sample(
                "procurator_health_checks_total", {"kind": kind, "result": result}, float(count)
            )
        yield checks
        broke = metric("procurator_worker_health_monitor_errors_total")
        broke.add_sample("procurator_worker_health_monitor_errors_total", {}, float(monitor_errors))
        yield broke
        if prepared:
            images = metric("procurator_worker_prepared_images")
            for value, count in prepared:
                images.add_sample(images.name, {"state": value}, float(count))
            yield images
        if turns is not None:
            yield from _turn_metrics(turns(), metric)


def _turn_metrics(stats: TurnPoolStats, metric: Callable[[str], Metric]) -> Iterator[Metric]:
    """The supervisors' turn pool (``procurator.worker.turns``) as families."""
    threads = metric("procurator_worker_turn_threads")
    threads.add_sample(threads.name, {"state": "busy"}, float(stats.threads - stats.idle))
    threads.add_sample(threads.name, {"state": "idle"}, float(stats.idle))
    yield threads
    waiting = metric("procurator_worker_turns_waiting")
    waiting.add_sample(waiting.name, {}, float(stats.waiting))
    yield waiting
    wait = metric("procurator_worker_turn_wait_seconds")
    wait.add_sample(wait.name, {}, stats.oldest_wait)
    yield wait
    stalls = metric("procurator_worker_turn_stalls_total")
    stalls.add_sample("procurator_worker_turn_stalls_total", {}, float(stats.stalls))
    yield stalls
