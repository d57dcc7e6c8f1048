"""What procurator measures: the metric catalogue, the plain-data snapshots
the exporters read, and the compact sample form workers report to the master.

Pure: no I/O, no Prometheus library. The worker exporter
(``procurator.worker.metrics``) and the master exporter
(``procurator.master.metrics``) both turn the same grouped rows into
Prometheus families, so the two expositions (a worker scraped directly, or
its figures relayed by the master with a ``worker`` label) can never
disagree on a name, a type, a label set or a HELP text.

Invariants:

- Every metric either exporter exposes is in ``CATALOGUE``; names follow
  Prometheus conventions (``procurator_`` prefix, base units ``_seconds`` /
  ``_bytes``, counters end in ``_total``) and every one has HELP text.
- Label values are bounded: VM ids, device ids set in the image's config,
  phases, and small fixed sets of kinds/endpoints. Never an operation id.
- A ``MetricSample`` carries the VM id apart from its labels (``vmId`` on
  the wire), so a receiver can group by VM without parsing labels.
- ``group_samples`` never emits two rows with the same label values for one
  metric (Prometheus rejects a whole scrape for a duplicate series); a
  sample that does not fit the catalogue is counted and dropped, never
  exposed.
- Snapshots are immutable values: a producer builds a new one and hands it
  over; consumers may keep references and read them from any thread.
- **Reports to the master are changes after a session's first whole one**
  (``MetricsReport``): the worker's ``ReportedSeries`` knows what the master
  holds of it on one session (the series of the last acknowledged report)
  and turns each new set of samples into the series that are new or moved
  plus the series that ended; the master's ``apply_metrics_report`` applies
  that to what it holds, or refuses it whole (no base on this session, an
  ended series it does not hold) without touching what it holds, and the
  worker then sends a whole report. After every acknowledged report the
  master holds exactly ``series_of`` the samples the worker last reported.
  A report names each series at most once.
- **A big report crosses as bounded slices** (``report_slices``): each
  carries at most ``MAX_SERIES_PER_SLICE`` series (moved plus ended), the
  first keeps the report's kind (whole or a change), the rest are changes,
  and applying them in order leaves the master exactly what the one report
  would. Both ends' Cap'n Proto threads encode / decode one slice at a time,
  so the session's other calls (status, events, the master's pushes) pass
  between slices instead of waiting behind ~180,000 series. The worker
  marks the base delivered only when the last slice is acknowledged; a
  slice refused or lost makes the next report whole.
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.jail import Confinement
from procurator.core.models import Phase
from procurator.core.move import Move
from procurator.core.rollout import RolloutView

__all__ = [
    "CATALOGUE",
    "MAX_SERIES_PER_SLICE",
    "MAX_SERIES_PER_WORKER",
    "PHASES",
    "U64_MAX",
    "Family",
    "FleetView",
    "MetricKind",
    "MetricSample",
    "MetricSpec",
    "MetricsReport",
    "ProcessUsage",
    "ReportedSeries",
    "Scope",
    "SeriesKey",
    "VmSnapshot",
    "WorkerSnapshot",
    "WorkerView",
    "apply_metrics_report",
    "group_samples",
    "http_sd_groups",
    "parse_metrics_url",
    "report_slices",
    "series_key",
    "series_of",
    "vm_figure_samples",
    "vm_samples",
    "vm_settled_samples",
    "vms_by_phase",
]

log = logging.getLogger(__name__)

U64_MAX = 2**64 - 1
"""cloud-hypervisor reports an unset counter (latency before the first
request) as u64::MAX; such a value is never a measurement."""

PHASES: tuple[str, ...] = tuple(p.value for p in Phase)


class MetricKind(enum.Enum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


class Scope(enum.Enum):
    """Whose figure a metric is, which decides its implicit labels."""

    VM = "vm"  # one series per VM: label ``vm`` (plus ``worker`` when relayed)
    WORKER = "worker"  # worker-wide (plus ``worker`` when relayed)
    MASTER = "master"  # computed by the master itself


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One metric as exposed. ``name`` is the sample name (a counter's
    includes ``_total``); ``labels`` are those beyond the implicit
    ``worker``/``vm``. ``states`` marks a one-hot metric: its last label
    takes each of these values, 1 for the current one and 0 for the rest."""

    name: str
    kind: MetricKind
    help: str
    scope: Scope
    labels: tuple[str, ...] = ()
    reported: bool = False  # carried to the master in MetricsReport
    states: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        """The family name (a counter's without ``_total``)."""
        if self.kind is MetricKind.COUNTER:
            return self.name.removesuffix("_total")
        return self.name


def _spec(
    name: str,
    kind: MetricKind,
    scope: Scope,
    help: str,
    labels: tuple[str, ...] = (),
    *,
    reported: bool = False,
    states: tuple[str, ...] = (),
) -> MetricSpec:
    return MetricSpec(name, kind, help, scope, labels, reported, states)


_G, _C, _H = MetricKind.GAUGE, MetricKind.COUNTER, MetricKind.HISTOGRAM
_VM, _WORKER, _MASTER = Scope.VM, Scope.WORKER, Scope.MASTER

_SPECS: tuple[MetricSpec, ...] = (
    # -- per VM (worker exposition; relayed by the master) ------------------
    _spec(
        "procurator_vm_phase", _G, _VM,
        "Lifecycle phase of the VM: 1 for its current phase, 0 for the others.",
        ("phase",), reported=True, states=PHASES,
    ),
    _spec(
        "procurator_vm_info", _G, _VM,
        "The VM's image and address (value always 1): image hash, Nix store path, address.",
        ("hash", "store_path", "address"), reported=True,
    ),
    _spec(
        "procurator_vm_restarts_total", _C, _VM,
        "Times the worker restarted the VM's VMM after it exited unexpectedly.",
        reported=True,
    ),
    _spec(
        "procurator_vm_boot_duration_seconds", _G, _VM,
        "Seconds from starting the VM's VMM until the VM ran, at its last boot.",
        reported=True,
    ),
    _spec(
        "procurator_vm_cpu_seconds_total", _C, _VM,
        "User and system CPU time of the VM's VMM process, guest vCPU threads included.",
        reported=True,
    ),
    _spec(
        "procurator_vm_resident_memory_bytes", _G, _VM,
        "Resident memory of the VM's VMM process, guest memory it has touched included.",
        reported=True,
    ),
    _spec(
        "procurator_vm_confinement", _G, _VM,
        "Whether a layer of the VMM's jail holds, read from the OS (1) or not (0): its own "
        "uid, mount and pid namespaces, a seccomp filter, memory.max, cpu.max, pids.max.",
        ("layer",), reported=True,
    ),
    _spec(
        "procurator_vm_memory_limit_bytes", _G, _VM,
        "memory.max of the VMM's cgroup (the guest's memory plus the VMM's overhead); absent "
        "when no memory limit holds.",
        reported=True,
    ),
    _spec(
        "procurator_vm_cpu_limit_cpus", _G, _VM,
        "cpu.max of the VMM's cgroup, in CPUs; absent when no CPU limit holds.",
        reported=True,
    ),
    _spec(
        "procurator_vm_pids_limit", _G, _VM,
        "pids.max of the VMM's cgroup (tasks, threads included); absent when no task limit "
        "holds.",
        reported=True,
    ),
    _spec(
        "procurator_vm_disk_read_bytes_total", _C, _VM,
        "Bytes the guest read from a virtio disk (VMM counter read_bytes).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_disk_write_bytes_total", _C, _VM,
        "Bytes the guest wrote to a virtio disk (VMM counter write_bytes).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_disk_read_ops_total", _C, _VM,
        "Read requests the guest completed on a virtio disk (VMM counter read_ops).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_disk_write_ops_total", _C, _VM,
        "Write requests the guest completed on a virtio disk (VMM counter write_ops).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_network_receive_bytes_total", _C, _VM,
        "Bytes the guest received on a virtio-net device (VMM counter rx_bytes).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_network_transmit_bytes_total", _C, _VM,
        "Bytes the guest transmitted on a virtio-net device (VMM counter tx_bytes).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_network_receive_frames_total", _C, _VM,
        "Frames the guest received on a virtio-net device (VMM counter rx_frames).",
        ("device",), reported=True,
    ),
    _spec(
        "procurator_vm_network_transmit_frames_total", _C, _VM,
        "Frames the guest transmitted on a virtio-net device (VMM counter tx_frames).",
        ("device",), reported=True,
    ),
    # -- worker-wide --------------------------------------------------------
    _spec(
        "procurator_worker_vms", _G, _WORKER,
        "VMs on this worker by phase.",
        ("phase",), reported=True,
    ),
    _spec(
        "procurator_worker_observed_generation", _G, _WORKER,
        "Newest assignment generation this worker has fully applied.",
        reported=True,
    ),
    _spec(
        "procurator_worker_errors_total", _C, _WORKER,
        "Errors the worker met, by kind.",
        ("kind",), reported=True,
    ),
    _spec(
        "procurator_worker_metrics_poll_timestamp_seconds", _G, _WORKER,
        "Unix time of the last refresh of the per-VM figures (VM state, /proc, VMM counters).",
    ),
    _spec(
        "procurator_reconcile_pass_duration_seconds", _H, _WORKER,
        "Duration of one reconcile pass (observe, plan, start actions).",
    ),
    _spec(
        "procurator_reconcile_actions_started_total", _C, _WORKER,
        "Actions (create, replace, power change, remove) reconcile passes started.",
    ),
    _spec(
        "procurator_vmm_api_call_duration_seconds", _H, _WORKER,
        "Latency of calls to the VMM API, by endpoint.",
        ("endpoint",),
    ),
    _spec(
        "procurator_vmm_api_call_failures_total", _C, _WORKER,
        "Calls to the VMM API that failed (error status, timeout, VMM gone), by endpoint.",
        ("endpoint",),
    ),
    _spec(
        "procurator_image_realise_duration_seconds", _H, _WORKER,
        "Time to validate and realise a VM image's Nix store path before boot.",
    ),
    _spec(
        "procurator_worker_vms_health", _G, _WORKER,
        "VMs on this worker by guest health (unchecked, pending, healthy, unhealthy).",
        ("health",),
    ),
    _spec(
        "procurator_health_checks_total", _C, _WORKER,
        "Guest health checks the worker made, by kind (none, tcp, http) and result "
        "(pass, fail).",
        ("kind", "result"),
    ),
    _spec(
        "procurator_worker_health_monitor_errors_total", _C, _WORKER,
        "Guest health checks that broke with an unexpected error (a bug in the worker); "
        "each VM's health reads pending until a check of it works again.",
    ),
    _spec(
        "procurator_worker_prepared_images", _G, _WORKER,
        "Images the worker's assignment asks it to prepare (realise and root without "
        "running), by state (pending, ready, failed).",
        ("state",),
    ),
    _spec(
        "procurator_worker_turn_threads", _G, _WORKER,
        "Threads running VM supervisors' turns now, by state (busy, idle).",
        ("state",),
    ),
    _spec(
        "procurator_worker_turns_waiting", _G, _WORKER,
        "Supervisor turns due (a wake, a deadline) and not yet taken by a thread.",
    ),
    _spec(
        "procurator_worker_turn_wait_seconds", _G, _WORKER,
        "How long the first supervisor turn in line has waited for a thread (0: none waits).",
    ),
    _spec(
        "procurator_worker_turn_stalls_total", _C, _WORKER,
        "Times turns waited 0.25 s with no thread taking one (every thread stuck, or a "
        "thread refused), so that the pool started a thread for each waiting turn it could.",
    ),
    # -- master (fleet view) -------------------------------------------------
    _spec(
        "procurator_master_workers_connected", _G, _MASTER,
        "Workers connected to the master now.",
    ),
    _spec(
        "procurator_master_worker_connected", _G, _MASTER,
        "1 while the worker is connected to the master, else 0.",
        ("worker",),
    ),
    _spec(
        "procurator_master_worker_state", _G, _MASTER,
        "1 for the worker's state (ready, lost: its lease expired, cordoned, draining), "
        "0 for the others.",
        ("worker", "state"),
    ),
    _spec(
        "procurator_master_rollout_phase", _G, _MASTER,
        "1 for the phase of the rollout under way (preparing, switching, awaiting promotion, "
        "reverting, done, failed, reverted), 0 for the others (docs/ROLLOUTS.md).",
        ("rollout", "phase"),
    ),
    _spec(
        "procurator_master_rollout_batches", _G, _MASTER,
        "Batches the rollout has started.",
        ("rollout",),
    ),
    _spec(
        "procurator_master_rollout_vms", _G, _MASTER,
        "The rollout's VMs by state (waiting, switching: switched and not yet healthy, "
        "healthy, failed).",
        ("rollout", "state"),
    ),
    _spec(
        "procurator_master_rollout_prepared_workers", _G, _MASTER,
        "Workers that report every new image of the rollout prepared.",
        ("rollout",),
    ),
    _spec(
        "procurator_master_rollout_prepare_workers", _G, _MASTER,
        "Workers the rollout asks to prepare its new images.",
        ("rollout",),
    ),
    _spec(
        "procurator_master_moves", _G, _MASTER,
        "Moves under way by phase (pending, preparing, stopping, transferring, switching), "
        "as the leader last drove them; 0 on a master that does not lead (docs/SNAPSHOTS.md).",
        ("phase",),
    ),
    _spec(
        "procurator_master_move_phase_age_seconds", _G, _MASTER,
        "Seconds the move of the VM under way has been in its current phase (on the leader).",
        ("vm", "phase", "source", "target"),
    ),
    _spec(
        "procurator_master_worker_desired_generation", _G, _MASTER,
        "Generation of the assignment the master wants the worker to run.",
        ("worker",),
    ),
    _spec(
        "procurator_master_worker_observed_generation", _G, _MASTER,
        "Newest generation the worker reported as fully applied.",
        ("worker",),
    ),
    _spec(
        "procurator_master_worker_vms", _G, _MASTER,
        "VMs on the worker by phase, as last reported to the master.",
        ("worker", "phase"),
    ),
    _spec(
        "procurator_master_worker_last_report_timestamp_seconds", _G, _MASTER,
        "Unix time of the worker's last report to the master.",
        ("worker",),
    ),
    _spec(
        "procurator_master_worker_last_report_age_seconds", _G, _MASTER,
        "Seconds since the worker last reported to the master.",
        ("worker",),
    ),
    _spec(
        "procurator_master_relayed_samples_invalid", _G, _MASTER,
        "Samples in the worker's last metrics report that the master cannot relay "
        "(unknown name or labels: version skew).",
        ("worker",),
    ),
    # -- master (its own work; procurator.master.metrics.MasterInstruments) --
    _spec(
        "procurator_master_rpc_calls_total", _C, _MASTER,
        "Calls the master handled, by method (wire name; waitChange is the blocking part "
        "of a status or describeVm read).",
        ("method",),
    ),
    _spec(
        "procurator_master_rpc_errors_total", _C, _MASTER,
        "Calls the master answered with an error, by method and error code.",
        ("method", "code"),
    ),
    _spec(
        "procurator_master_store_operation_duration_seconds", _H, _MASTER,
        "Duration of the master's database operations (load, commit), failed ones included.",
        ("operation",),
    ),
    _spec(
        "procurator_master_store_errors_total", _C, _MASTER,
        "Database operations that failed (not a stale-generation refusal), by operation "
        "and error code.",
        ("operation", "code"),
    ),
    _spec(
        "procurator_master_moves_ended_total", _C, _MASTER,
        "Moves this master process ended while leading, by outcome (done, failed); it "
        "starts at 0 on every start of the master.",
        ("outcome",),
    ),
    _spec(
        "procurator_master_apply_to_observed_seconds", _H, _MASTER,
        "Seconds from an apply that changed a worker's assignment until that worker "
        "reported the apply's generation (or a newer one) as observed.",
    ),
)  # fmt: skip

CATALOGUE: Mapping[str, MetricSpec] = {s.name: s for s in _SPECS}
"""Every metric procurator exposes, by sample name, in exposition order."""

# vm.counters keys -> metric. Latency counters (read_latency_min/max/avg...)
# are deliberately not exported: their unit is undocumented in the VMM's API
# and min/max/average-since-boot figures do not aggregate across scrapes.
_DEVICE_COUNTERS: Mapping[str, str] = {
    "read_bytes": "procurator_vm_disk_read_bytes_total",
    "write_bytes": "procurator_vm_disk_write_bytes_total",
    "read_ops": "procurator_vm_disk_read_ops_total",
    "write_ops": "procurator_vm_disk_write_ops_total",
    "rx_bytes": "procurator_vm_network_receive_bytes_total",
    "tx_bytes": "procurator_vm_network_transmit_bytes_total",
    "rx_frames": "procurator_vm_network_receive_frames_total",
    "tx_frames": "procurator_vm_network_transmit_frames_total",
}

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


# -- snapshots ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """Resource use of one VMM process, read from ``/proc``."""

    cpu_seconds: float  # user + system, all threads
    rss_bytes: int


@dataclass(frozen=True, slots=True)
class VmSnapshot:
    """What the worker knows about one VM at one instant.

    ``pid`` / ``pid_start_ticks`` identify the VMM process (0: none running;
    start ticks 0: do not check identity); the metrics poller reads its
    ``/proc`` figures into ``usage``, sources leave it None. ``counters``
    is ``vm.counters`` as the driver returned it: device id -> counter ->
    value (empty when the VM does not run).
    """

    id: str
    phase: Phase
    hash: str = ""
    store_path: str = ""
    address: str = ""
    restarts: int = 0
    pid: int = 0
    pid_start_ticks: int = 0
    boot_seconds: float | None = None
    counters: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    usage: ProcessUsage | None = None
    confinement: Confinement | None = None  # what the running VMM is confined by


@dataclass(frozen=True, slots=True)
class WorkerSnapshot:
    """All VMs of a worker at one instant; ``taken_at`` is Unix time."""

    vms: tuple[VmSnapshot, ...] = ()
    taken_at: float = 0.0


@dataclass(frozen=True, slots=True)
class MetricSample:
    """One numeric sample in the compact report form (``MetricSample`` in
    ``schema/procurator.capnp``). ``vm_id`` is "" for worker-wide samples;
    ``labels`` are the metric's own labels (never ``vm`` or ``worker``)."""

    name: str
    value: float
    vm_id: str = ""
    labels: tuple[tuple[str, str], ...] = ()


SeriesKey = tuple[str, str, tuple[tuple[str, str], ...]]
"""One series of a metric: (sample name, VM id or "", its own labels)."""

MAX_SERIES_PER_WORKER = 200_000
"""The most series a master holds of one worker (and so the most samples
one report may carry): bounds a worker's share of the master's memory."""


MAX_SERIES_PER_SLICE = 2_000
"""The most series (moved plus ended) one ``reportMetrics`` call carries:
a bigger report crosses as several (``report_slices``), so no one call
holds a Cap'n Proto thread for long (~2 ms to encode or decode 2,000)."""


def series_key(sample: MetricSample) -> SeriesKey:
    """The series ``sample`` is a value of."""
    return (sample.name, sample.vm_id, sample.labels)


def series_of(samples: Iterable[MetricSample]) -> dict[SeriesKey, MetricSample]:
    """``samples`` by series (a repeated series keeps its last sample, as
    ``group_samples`` does)."""
    return {(s.name, s.vm_id, s.labels): s for s in samples}


@dataclass(frozen=True, slots=True)
class MetricsReport:
    """One ``reportMetrics`` (``MetricsReport`` in the schema). Whole: every
    series the worker has, in ``samples``. A change (``whole`` False): the
    series that are new or whose value moved since the report the master
    last acknowledged on this session, and the series that ``ended`` since."""

    worker_id: str
    samples: tuple[MetricSample, ...]
    ended: tuple[SeriesKey, ...] = ()
    whole: bool = True


class ReportedSeries:
    """What the master holds of this worker's series on one session, as the
    worker knows it: turns each new set of samples into a report, whole or
    a change (module docstring). One per session; not thread-safe (the
    sender's thread only); one report at a time: ``report``, then
    ``delivered`` or ``refused``.

    Cheap where reports are big and moves are few. The worker's samples
    come in a stable order (VM by VM, each VM's in the same order) and a
    sample whose value did not move is the very object reported last time
    (the worker's poller keeps them, ``procurator.worker.metrics``). So
    while the samples are as many as last time, they are compared with the
    last report's position by position by identity (a C loop), and only the
    samples that are new objects are looked at: when each is of the series
    its position held, the change is those whose value moved, and nothing
    ended. Anything else (a VM added or removed, a phase left) is compared
    by series, O(samples). A report that named a series twice (a bug of its
    maker) is followed by whole ones: a change could not say which of the
    two the master keeps.
    """

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._takes_changes = False
        # The samples of the last acknowledged report, each of another
        # series: what the master holds. None: no base, the next is whole.
        self._reported: tuple[MetricSample, ...] | None = None
        # The report in flight, the samples it was made of, and whether
        # they are each of another series (None: not known yet).
        self._sent: tuple[MetricsReport, tuple[MetricSample, ...], bool | None] | None = None

    @property
    def has_base(self) -> bool:
        """Whether the next report can be a change."""
        return self._reported is not None and self._takes_changes

    def report(self, samples: Sequence[MetricSample]) -> MetricsReport:
        """The report of ``samples`` (every series the worker has now): a
        change when the master acknowledged a report of this session and
        said it takes changes, else whole."""
        current = tuple(samples)
        reported = self._reported
        if reported is None or not self._takes_changes:
            report = MetricsReport(self.worker_id, current)
            self._sent = (report, current, None)
            return report
        changed = _moved_in_place(reported, current)
        if changed is not None:
            report = MetricsReport(self.worker_id, changed, whole=False)
            self._sent = (report, current, True)  # the same series as reported
            return report
        held = series_of(reported)
        now = series_of(current)
        changed = tuple(
            s for key, s in now.items() if (was := held.get(key)) is None or was.value != s.value
        )
        ended = tuple(held.keys() - now.keys())
        report = MetricsReport(self.worker_id, changed, ended, whole=False)
        self._sent = (report, current, len(now) == len(current))
        return report

    def delivered(self, *, takes_changes: bool) -> None:
        """The master acknowledged the report in flight; ``takes_changes``:
        its answer says it takes change reports."""
        if self._sent is None:
            raise RuntimeError("no metrics report in flight")
        _, current, distinct = self._sent
        self._sent = None
        self._takes_changes = takes_changes
        if not takes_changes:
            self._reported = None  # an older master: every report is whole
            return
        if distinct is None:
            distinct = len(series_of(current)) == len(current)
        self._reported = current if distinct else None

    def refused(self) -> None:
        """The report in flight was refused, or may not have arrived: the
        master's series are not known any more, the next report is whole."""
        self._sent = None
        self._reported = None


def report_slices(
    report: MetricsReport, max_series: int = MAX_SERIES_PER_SLICE
) -> list[MetricsReport]:
    """``report`` as calls of at most ``max_series`` series each (samples
    plus ended), to be applied in order: the first is of ``report``'s kind
    (a whole one's first slice replaces what the master held), the rest are
    changes on top. Applied in order by ``apply_metrics_report`` they leave
    exactly what ``report`` would. A whole report that names a series twice
    keeps its last sample, as the master's whole apply would. A report
    within the bound is itself, the one slice."""
    if max_series < 1:
        raise ValueError(f"a metrics slice must carry at least one series, not {max_series}")
    samples = report.samples
    if report.whole and len(samples) > max_series:
        samples = tuple(series_of(samples).values())
    if len(samples) + len(report.ended) <= max_series:
        return [report]
    worker_id = report.worker_id
    slices = [
        MetricsReport(worker_id, samples[start : start + max_series], whole=False)
        for start in range(0, len(samples), max_series)
    ]
    # The ended series fill the last samples' slice, then slices of their own.
    room = max_series - len(slices[-1].samples) if slices else 0
    ended = report.ended
    if slices and room:
        last = slices[-1]
        slices[-1] = MetricsReport(worker_id, last.samples, ended[:room], whole=False)
        ended = ended[room:]
    slices += [
        MetricsReport(worker_id, (), ended[start : start + max_series], whole=False)
        for start in range(0, len(ended), max_series)
    ]
    first = slices[0]
    slices[0] = MetricsReport(worker_id, first.samples, first.ended, whole=report.whole)
    return slices


def _moved_in_place(
    reported: tuple[MetricSample, ...], current: tuple[MetricSample, ...]
) -> tuple[MetricSample, ...] | None:
    """The samples of ``current`` whose value moved, when each of its
    samples is of the series of ``reported``'s at the same position; else
    None."""
    if len(reported) != len(current):
        return None
    moved = []
    for index in itertools.compress(range(len(current)), map(operator.is_not, reported, current)):
        was, now = reported[index], current[index]
        if was.name != now.name or was.vm_id != now.vm_id or was.labels != now.labels:
            return None
        if was.value != now.value:
            moved.append(now)
    return tuple(moved)


def apply_metrics_report(
    held: dict[SeriesKey, MetricSample] | None,
    report: MetricsReport,
    *,
    max_series: int = MAX_SERIES_PER_WORKER,
) -> dict[SeriesKey, MetricSample]:
    """What the master holds of a worker after ``report``: a whole report's
    series; or ``held`` (what the session's reports left, None: nothing)
    with a change applied in place and returned. A change the master cannot
    apply raises ``ValidationError`` and leaves ``held`` as it was: there is
    no ``held`` (the session's first report, a restarted master), an ended
    series is not held, or a series is named twice. ``LimitExceededError``
    when the result would hold more than ``max_series``, ``held`` untouched
    too."""
    if report.whole:
        series = series_of(report.samples)
        if len(series) > max_series:
            raise LimitExceededError(
                f"a metrics report of worker {report.worker_id} holds {len(series)} series, "
                f"more than {max_series}"
            )
        return series
    if held is None:
        raise ValidationError(
            f"a metrics change of worker {report.worker_id} has no base: this master holds no "
            "report of the session yet; send a whole report"
        )
    changed = series_of(report.samples)
    ended = set(report.ended)
    if len(changed) != len(report.samples) or len(ended) != len(report.ended):
        raise ValidationError(f"a metrics change of worker {report.worker_id} names a series twice")
    for key in report.ended:
        if key not in held:
            raise ValidationError(
                f"a metrics change of worker {report.worker_id} ends series {_series_text(key)}, "
                "which this master does not hold: send a whole report"
            )
        if key in changed:
            raise ValidationError(
                f"a metrics change of worker {report.worker_id} both ends and reports series "
                f"{_series_text(key)}"
            )
    added = sum(1 for key in changed if key not in held)
    if len(held) - len(ended) + added > max_series:
        raise LimitExceededError(
            f"a metrics change of worker {report.worker_id} would leave "
            f"{len(held) - len(ended) + added} series, more than {max_series}"
        )
    for key in report.ended:
        del held[key]
    held.update(changed)
    return held


def _series_text(key: SeriesKey) -> str:
    name, vm_id, labels = key
    shown = [f'vm="{vm_id}"'] if vm_id else []
    shown += [f'{label}="{value}"' for label, value in labels]
    return f"{name}{{{','.join(shown)}}}"[:200]


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the master knows of one worker, for its exporter and service
    discovery. ``last_report_unix`` is the Unix time of the worker's last
    status or metrics report (None: never). ``samples`` are those of the
    worker's last ``MetricsReport``, relayed as they are."""

    worker_id: str
    connected: bool
    desired_generation: int = 0
    observed_generation: int = 0
    last_report_unix: float | None = None
    vms_by_phase: Mapping[Phase, int] = field(default_factory=dict)
    samples: tuple[MetricSample, ...] = ()
    metrics_url: str = ""
    state: str = "ready"  # procurator.core.drain.worker_state


@dataclass(frozen=True, slots=True)
class FleetView:
    workers: tuple[WorkerView, ...] = ()
    # The rollout under way as this master last read it (the leader's is
    # current; docs/ROLLOUTS.md), None when there is none.
    rollout: RolloutView | None = None
    # The moves under way as the leader last drove them (docs/SNAPSHOTS.md,
    # "Moves"); empty on a master that does not lead.
    moves: tuple[Move, ...] = ()


# -- the compact form -----------------------------------------------------------


def _is_counter_value(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return math.isfinite(value) and 0 <= value < U64_MAX


def vm_samples(vm: VmSnapshot) -> list[MetricSample]:
    """The per-VM samples of one VM: ``vm_settled_samples`` then
    ``vm_figure_samples``. The phase is one sample (its current phase,
    value 1); exporters expand it to one-hot. Counters the catalogue does
    not know, and values that cannot be measurements (negative, u64::MAX
    sentinels, not numbers), are left out."""
    return vm_settled_samples(vm) + vm_figure_samples(vm)


def vm_settled_samples(vm: VmSnapshot) -> list[MetricSample]:
    """The samples of everything in ``vm`` but its moving figures (``usage``
    and ``counters``): what an idle VM keeps from poll to poll, so a poller
    builds them again only when one of those fields changed."""
    vm_id = vm.id
    out = [
        MetricSample("procurator_vm_phase", 1.0, vm_id, (("phase", vm.phase.value),)),
        MetricSample(
            "procurator_vm_info",
            1.0,
            vm_id,
            (("hash", vm.hash), ("store_path", vm.store_path), ("address", vm.address)),
        ),
        MetricSample("procurator_vm_restarts_total", float(vm.restarts), vm_id),
    ]
    boot = vm.boot_seconds
    if boot is not None and math.isfinite(boot) and boot >= 0:
        out.append(MetricSample("procurator_vm_boot_duration_seconds", boot, vm_id))
    if vm.confinement is not None:
        out += _confinement_samples(vm_id, vm.confinement)
    return out


def vm_figure_samples(vm: VmSnapshot, previous: Sequence[MetricSample] = ()) -> list[MetricSample]:
    """The samples of ``vm``'s moving figures: its VMM's CPU time and
    resident memory (``usage``) and its device counters. ``previous``: the
    VM's figure samples of an earlier poll; a sample of the series and value
    of the one at its position there is that very object (an idle VM's
    memory, a counter that did not tick), so a report finds what moved by
    identity (``ReportedSeries``)."""
    vm_id = vm.id
    out: list[MetricSample] = []
    kept = len(previous)

    def add(name: str, value: float, labels: tuple[tuple[str, str], ...] = ()) -> None:
        if len(out) < kept:
            was = previous[len(out)]
            if was.value == value and was.name == name and was.labels == labels:
                out.append(was)
                return
        out.append(MetricSample(name, value, vm_id, labels))

    if vm.usage is not None:
        add("procurator_vm_cpu_seconds_total", vm.usage.cpu_seconds)
        add("procurator_vm_resident_memory_bytes", float(vm.usage.rss_bytes))
    for device in sorted(vm.counters):
        counters = vm.counters[device]
        if not isinstance(counters, Mapping):
            continue
        labels = (("device", device),)
        for key, value in counters.items():
            name = _DEVICE_COUNTERS.get(key)
            if name is not None and _is_counter_value(value):
                add(name, float(value), labels)
    return out


def _confinement_samples(vm_id: str, seen: Confinement) -> list[MetricSample]:
    out = [
        MetricSample(
            "procurator_vm_confinement", 1.0 if held else 0.0, vm_id, (("layer", layer.value),)
        )
        for layer, held in seen.enforced().items()
    ]
    limits = seen.limits
    if limits.memory_bytes is not None:
        out.append(
            MetricSample("procurator_vm_memory_limit_bytes", float(limits.memory_bytes), vm_id)
        )
    if limits.cpus is not None:
        out.append(MetricSample("procurator_vm_cpu_limit_cpus", limits.cpus, vm_id))
    if limits.pids is not None:
        out.append(MetricSample("procurator_vm_pids_limit", float(limits.pids), vm_id))
    return out


def vms_by_phase(vms: Iterable[VmSnapshot]) -> dict[Phase, int]:
    """How many VMs are in each phase; every phase present, zeros included."""
    counts = dict.fromkeys(Phase, 0)
    for vm in vms:
        counts[vm.phase] += 1
    return counts


@dataclass(slots=True)
class Family:
    """Rows of one metric ready for exposition: ``label_names`` in order,
    each row a tuple of label values and the value."""

    spec: MetricSpec
    label_names: tuple[str, ...]
    rows: list[tuple[tuple[str, ...], float]]


def _label_values(
    labels: tuple[tuple[str, str], ...], names: tuple[str, ...]
) -> tuple[str, ...] | None:
    """The values of ``labels`` in the order of ``names``; None unless the
    label names are exactly ``names`` (each once)."""
    if len(labels) != len(names):
        return None
    if all(label[0] == name for label, name in zip(labels, names, strict=True)):
        return tuple(label[1] for label in labels)  # the usual case: in order
    by_name = dict(labels)
    if len(by_name) != len(names) or by_name.keys() != set(names):
        return None
    return tuple(by_name[name] for name in names)


def group_samples(
    samples: Iterable[MetricSample],
    *,
    prefix: Sequence[tuple[str, str]] = (),
) -> tuple[list[Family], int]:
    """Validate reported samples against the catalogue and group them into
    families, in catalogue order, expanding one-hot metrics. ``prefix``
    labels (``worker`` on the master) come first; per-VM samples get ``vm``
    next. Returns the families and how many samples were dropped: unknown or
    unreported names, wrong label names, a missing or stray VM id, a
    non-finite value, an unknown state. A repeated series keeps its last
    value."""
    prefix_names = tuple(name for name, _ in prefix)
    prefix_values = tuple(value for _, value in prefix)
    rows: dict[str, dict[tuple[str, ...], float]] = {}
    dropped = 0
    for sample in samples:
        spec = CATALOGUE.get(sample.name)
        if (
            spec is None
            or not spec.reported
            or (spec.scope is Scope.VM) != bool(sample.vm_id)
            or not math.isfinite(sample.value)
        ):
            dropped += 1
            continue
        values = _label_values(sample.labels, spec.labels)
        if values is None or (spec.states and values[-1] not in spec.states):
            dropped += 1
            continue
        head = (*prefix_values, sample.vm_id) if spec.scope is Scope.VM else prefix_values
        into = rows.get(spec.name)
        if into is None:
            into = rows[spec.name] = {}
        if spec.states:
            # One-hot: every state gets a row, 1 for the reported one. A
            # second sample for the same series overrides the first entirely.
            current = values[-1]
            fixed = (*head, *values[:-1])
            for state in spec.states:
                into[(*fixed, state)] = 1.0 if state == current else 0.0
        else:
            into[(*head, *values)] = sample.value
    families = []
    for name, by_labels in rows.items():
        spec = CATALOGUE[name]
        implicit = (*prefix_names, "vm") if spec.scope is Scope.VM else prefix_names
        families.append(Family(spec, (*implicit, *spec.labels), list(by_labels.items())))
    order = {name: i for i, name in enumerate(CATALOGUE)}
    families.sort(key=lambda f: order[f.spec.name])
    return families, dropped


# -- service discovery ----------------------------------------------------------


def parse_metrics_url(url: str) -> tuple[str, str, str]:
    """Split a worker's exporter URL into (scheme, host:port, path) for
    Prometheus. Raises ``ValidationError`` naming the URL when it is not an
    absolute http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"metrics URL {url!r} is not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValidationError(f"metrics URL {url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValidationError(f"metrics URL {url!r} names no host")
    if parts.username is not None or parts.password is not None:
        raise ValidationError(f"metrics URL {url!r} must not carry credentials")
    if parts.query or parts.fragment:
        raise ValidationError(f"metrics URL {url!r} must not have a query or fragment")
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"  # IPv6 literal
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    return parts.scheme, f"{host}:{port}", parts.path or "/metrics"


def http_sd_groups(workers: Iterable[WorkerView]) -> list[dict[str, Any]]:
    """The Prometheus HTTP service discovery document: one target group per
    worker that advertises an exporter, labelled ``worker``, sorted by worker
    id. Connected or not: a worker's exporter outlives its connection to the
    master, and Prometheus' own ``up`` tells whether it answers. Workers with
    an invalid URL are left out (and logged)."""
    groups: list[dict[str, Any]] = []
    for worker in sorted(workers, key=lambda w: w.worker_id):
        if not worker.metrics_url:
            continue
        try:
            scheme, target, path = parse_metrics_url(worker.metrics_url)
        except ValidationError as exc:
            log.warning("worker %s left out of service discovery: %s", worker.worker_id, exc)
            continue
        groups.append(
            {
                "targets": [target],
                "labels": {
                    "worker": worker.worker_id,
                    "__scheme__": scheme,
                    "__metrics_path__": path,
                },
            }
        )
    return groups


def _check_catalogue() -> None:
    """Import-time self-check: a bad entry is a programming error."""
    for spec in _SPECS:
        assert spec.name.startswith("procurator_"), spec.name
        assert spec.help, spec.name
        assert (spec.kind is MetricKind.COUNTER) == spec.name.endswith("_total"), spec.name
        assert all(_LABEL_NAME.match(label) for label in spec.labels), spec.name
        assert not spec.states or spec.labels, spec.name
    assert len(CATALOGUE) == len(_SPECS)


_check_catalogue()
