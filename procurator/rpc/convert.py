"""Cap'n Proto messages <-> procurator models. Capnp thread only.

Invariants:

- **Everything read from the wire is validated** here, with the same rules
  (``procurator.core.validation``) and bounds (``LIMITS``) as fleet files:
  ids, store paths, hashes, text lengths, list lengths. A bad value raises
  ``ValidationError`` whose details name the field
  (``assignment.vms[3].nixStorePath: ...``); list lengths are checked before
  anything is built, so a hostile peer cannot make us allocate much.
- **Big lists are built and read field by field** (no ``to_dict`` /
  ``from_dict``, which are 5-20x slower), each reader field read once, so the
  cumulative traversal limit is not spent twice.
- Enums cross as their enumerant names, which are the ``.value`` of our
  Python enums; an enumerant unknown to this build (a newer peer) reads as the
  first value of the enum, as the schema's evolution rules say.
- **A message that does not decode is the sender's fault.** Reading a field
  of the wrong type, a text without its NUL or not UTF-8, a pointer out of
  bounds raises ``capnp.KjException`` or ``UnicodeDecodeError`` at whatever
  field the converters happen to read; :func:`malformed_error` turns that
  into ``ValidationError`` (``LimitExceededError`` for the traversal limit)
  naming the field, found by walking the message by its schema. The walk
  runs only on that failure path, so the hot paths stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

import capnp

from procurator.core.assignments import AssignmentChanges
from procurator.core.control import (
    ApplyRequest,
    ApplyResult,
    FleetStatus,
    VmDescription,
    WorkerConnection,
    WorkerEvent,
)
from procurator.core.drain import ModeChange, WorkerMode
from procurator.core.errors import (
    LimitExceededError,
    ProcuratorError,
    ValidationError,
    error_from_code,
)
from procurator.core.fleetpatch import FleetPatch, PatchAnswer, PatchRequest
from procurator.core.metrics import (
    CATALOGUE,
    MAX_SERIES_PER_WORKER,
    MetricSample,
    MetricsReport,
    SeriesKey,
)
from procurator.core.models import (
    Assignment,
    Capacity,
    DiskTransfer,
    EventKind,
    Fleet,
    Health,
    HealthCheck,
    HealthKind,
    OnWorkerLost,
    Phase,
    PlacementPolicy,
    PlacementReason,
    PlacementStrategy,
    PowerChange,
    PowerState,
    PreparedImage,
    PrepareState,
    RolloutPolicy,
    TransferProgress,
    TransferState,
    UnpinnedVm,
    VmAssignment,
    VmEvent,
    VmPlacement,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerState,
    WorkerStatus,
)
from procurator.core.move import Move, MoveKind, MovePhase
from procurator.core.rollout import RolloutView, RolloutVmView
from procurator.core.snapshot import SnapshotAction, SnapshotInfo, SnapshotRequest
from procurator.core.status import StatusChanges
from procurator.core.validation import (
    LIMITS,
    MAX_HTTP_PATH_LENGTH,
    check_group_name,
    check_hash,
    check_http_path,
    check_label_key,
    check_label_value,
    check_overcommit,
    check_request_id,
    check_snapshot_name,
    check_store_path,
    check_vm_id,
    check_worker_id,
)

__all__ = [
    "MAX_EVENTS_PER_REPORT",
    "MAX_SAMPLES_PER_REPORT",
    "READ_ERRORS",
    "apply_request_from_reader",
    "apply_result_from_reader",
    "assignment_changes_from_reader",
    "assignment_from_reader",
    "describe_result_from_reader",
    "error_from_reader",
    "events_from_reader",
    "fill_apply_request",
    "fill_apply_result",
    "fill_assignment",
    "fill_assignment_changes",
    "fill_describe_result",
    "fill_error",
    "fill_events",
    "fill_fleet",
    "fill_fleet_status",
    "fill_metrics",
    "fill_patch_answer",
    "fill_patch_request",
    "fill_snapshot_list",
    "fill_snapshot_request",
    "fill_snapshot_result",
    "fill_status_changes",
    "fill_worker_events",
    "fill_worker_info",
    "fill_worker_status",
    "fleet_from_reader",
    "fleet_status_from_reader",
    "malformed_error",
    "metrics_from_reader",
    "patch_answer_from_reader",
    "patch_request_from_reader",
    "snapshot_list_from_reader",
    "snapshot_request_from_reader",
    "snapshot_result_from_reader",
    "status_changes_from_reader",
    "worker_events_from_reader",
    "worker_info_from_reader",
    "worker_status_from_reader",
]

MAX_EVENTS_PER_REPORT = 10_000
MAX_SAMPLES_PER_REPORT = MAX_SERIES_PER_WORKER
MAX_LABELS_PER_SAMPLE = 32
MAX_DETAILS = 1_000
_MAX_PROBLEMS = 50  # stop collecting after this many; one is enough to refuse

_METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,199}")
_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]{0,99}")

E = TypeVar("E", PowerState, Phase, EventKind, Health, HealthKind, PrepareState)


def _enum_table(enum: type[E], names: Sequence[str]) -> list[E]:
    """Capnp ordinal -> our enum member (the schema order is the source)."""
    by_value = {member.value: member for member in enum}
    return [by_value[name] for name in names]


# The schema's enumerants in ordinal order; checked against the schema by
# the tests so a new enumerant cannot be forgotten here.
POWER_NAMES = ("running", "paused", "stopped")
PHASE_NAMES = (
    "unknown",
    "pending",
    "realising",
    "starting",
    "running",
    "paused",
    "stopping",
    "stopped",
    "failed",
    "crashLoop",
    "removing",
)
EVENT_KIND_NAMES = (
    "unknown",
    "created",
    "booted",
    "crashed",
    "restarted",
    "replaced",
    "stopped",
    "failed",
    "readopted",
    "removed",
    "paused",
    "resumed",
    "warning",
    "snapshotted",
    "restored",
    "rescheduled",
    "moving",
)
ERROR_CODE_NAMES = (
    "internal",
    "invalid",
    "staleGeneration",
    "notFound",
    "unauthorized",
    "limitExceeded",
    "unavailable",
)
ON_WORKER_LOST_NAMES = ("reschedule", "wait")
HEALTH_KIND_NAMES = ("none", "tcp", "http")
HEALTH_NAMES = ("unchecked", "pending", "healthy", "unhealthy")
PREPARE_STATE_NAMES = ("pending", "ready", "failed")
STRATEGY_NAMES = ("binpack", "spread")
REASON_NAMES = (
    "new",
    "kept",
    "workerGone",
    "workerLost",
    "workerDraining",
    "constraints",
    "noLongerFits",
)
_POWER = _enum_table(PowerState, POWER_NAMES)
# Read strictly: an unknown one (a newer client's) is refused, not guessed.
_ON_WORKER_LOST = [OnWorkerLost(name) for name in ON_WORKER_LOST_NAMES]
_STRATEGY = [PlacementStrategy(name) for name in STRATEGY_NAMES]
_REASON = [
    PlacementReason.NEW,
    PlacementReason.KEPT,
    PlacementReason.WORKER_GONE,
    PlacementReason.WORKER_LOST,
    PlacementReason.WORKER_DRAINING,
    PlacementReason.CONSTRAINTS,
    PlacementReason.NO_LONGER_FITS,
]  # in REASON_NAMES' order
_PHASE = _enum_table(Phase, PHASE_NAMES)
# An unknown check in a worker's assignment (a newer master's) reads as
# ``none``: the VM running is its check, as the schema's evolution rules
# read an unknown enumerant. In a fleet sent to the master it is refused
# (``_health_check(strict=True)``): there it would drop a rollout's gate.
_HEALTH_KIND = _enum_table(HealthKind, HEALTH_KIND_NAMES)
_HEALTH = _enum_table(Health, HEALTH_NAMES)
_PREPARE_STATE = _enum_table(PrepareState, PREPARE_STATE_NAMES)
_EVENT_KIND = _enum_table(EventKind, EVENT_KIND_NAMES)


def _enum(table: Sequence[E], field: Any) -> E:
    raw: int = field.raw
    return table[raw] if 0 <= raw < len(table) else table[0]


class _Problems:
    """Collects ``where: problem`` lines; raises them as one error:
    ``LimitExceededError`` when any of them is a bound exceeded (a string
    too long, too many labels), else ``ValidationError``."""

    __slots__ = ("items", "over_limit", "what")

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: list[str] = []
        self.over_limit = False

    def add(self, where: str, problem: str) -> None:
        if len(self.items) < _MAX_PROBLEMS:
            self.items.append(f"{where}: {problem}")

    def exceeded(self, where: str, problem: str) -> None:
        self.over_limit = True
        self.add(where, problem)

    def text(self, where: str, value: str, *, limit: int = LIMITS.max_text) -> str:
        if len(value) > limit:
            self.exceeded(where, f"longer than {limit} characters")
            return value[:limit]
        return value

    def raise_if_any(self) -> None:
        if self.items:
            error = LimitExceededError if self.over_limit else ValidationError
            raise error(
                f"invalid {self.what} received: {len(self.items)} problem(s)",
                details=self.items,
            )


def _check_length(count: int, limit: int, where: str) -> None:
    if count > limit:
        raise LimitExceededError(f"{where}: {count} entries exceed the limit of {limit}")


# ---------------------------------------------------------------- assignments


def _vms_from_reader(
    items: Any,
    where: str,
    problems: _Problems,
    *,
    limit: int = LIMITS.max_vms_per_worker,
    reschedule: bool = False,
) -> tuple[VmAssignment, ...]:
    # ``reschedule``: read the entries' fence mark and health check (a
    # worker's assignment only; a fleet's or a description's entries never
    # carry them).
    # The hot path of every apply and every push (1,000 entries: ~7 -> ~2.5
    # ms): ``_get`` skips the attribute protocol, ``resources`` is read only
    # when set (``_fill_vms`` leaves it unset for 0/0), and a store path or
    # hash already valid in this list is not matched again (a fleet shares
    # few images). The checks are the same as a fleet file's.
    _check_length(len(items), limit, where)
    vms: list[VmAssignment] = []
    append = vms.append
    power_table = _POWER
    powers = len(power_table)
    valid_hashes: set[str] = set()
    valid_paths: set[str] = set()
    for index, item in enumerate(items):
        get = item._get
        vm_id: str = get("id")
        vm_hash: str = get("hash")
        path: str = get("nixStorePath")
        raw: int = get("power").raw
        power = power_table[raw] if 0 <= raw < powers else power_table[0]
        vcpus = memory = 0
        if item._has("resources"):
            resources = get("resources")
            vcpus = resources.vcpus
            memory = resources.memoryMib
            if vcpus and not 1 <= vcpus <= LIMITS.max_vcpus:
                problems.add(f"{where}[{index}].resources.vcpus", f"{vcpus} is out of range")
            if memory and not LIMITS.min_memory_mib <= memory <= LIMITS.max_memory_mib:
                problems.add(f"{where}[{index}].resources.memoryMib", f"{memory} is out of range")
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{where}[{index}].id", problem)
        if vm_hash not in valid_hashes:
            if (problem := check_hash(vm_hash)) is None:
                valid_hashes.add(vm_hash)
            else:
                problems.add(f"{where}[{index}].hash", problem)
        if path not in valid_paths:
            if (problem := check_store_path(path)) is None:
                valid_paths.add(path)
            else:
                problems.add(f"{where}[{index}].nixStorePath", problem)
        health = (
            _health_check(get("health"), f"{where}[{index}].health", problems)
            if reschedule and item._has("health")
            else None
        )
        append(
            VmAssignment(
                vm_id,
                vm_hash,
                path,
                power,
                vcpus,
                memory,
                reschedule and bool(get("reschedule")),
                health,
            )
        )
    return tuple(vms)


def _health_check(
    reader: Any, where: str, problems: _Problems, *, strict: bool = False
) -> HealthCheck:
    """A VM's health check, checked: tcp and http need a port; http a path
    that starts with "/" (no spaces or control characters: it goes into a
    request line, quoted) and an HTTP status (0 reads as 200, the default).
    ``strict``: a kind this release does not know is refused (a fleet's
    rollout settings), else it reads as ``none`` (a worker's assignment)."""
    raw_kind: int = reader.kind.raw
    if strict and not 0 <= raw_kind < len(_HEALTH_KIND):
        problems.add(
            f"{where}.kind",
            f"unknown health check kind (enumerant {raw_kind}; this master knows "
            f"{', '.join(HEALTH_KIND_NAMES)}): refused rather than read as none, "
            "which would take the rollout's health gate away",
        )
    kind = _enum(_HEALTH_KIND, reader.kind)
    port: int = reader.port
    path: str = reader.path
    expect: int = reader.expect or 200
    if kind is not HealthKind.NONE and port == 0:
        problems.add(f"{where}.port", f"a {kind.value} check needs a port (1-65535)")
    if kind is HealthKind.HTTP:
        if len(path) > MAX_HTTP_PATH_LENGTH:
            problems.exceeded(f"{where}.path", f"longer than {MAX_HTTP_PATH_LENGTH} characters")
        elif (problem := check_http_path(path)) is not None:
            problems.add(f"{where}.path", problem)
        if not 100 <= expect <= 599:
            problems.add(f"{where}.expect", f"{expect} is not an HTTP status (100-599)")
    elif path:
        problems.text(f"{where}.path", path, limit=MAX_HTTP_PATH_LENGTH)
    return HealthCheck(
        kind=kind,
        port=port,
        path=path[:MAX_HTTP_PATH_LENGTH],
        expect=expect,
        min_healthy_ms=reader.minHealthyMs,
        interval_ms=reader.intervalMs,
    )


def _fill_health_check(builder: Any, check: HealthCheck) -> None:
    builder.kind = check.kind.value
    builder.port = check.port
    builder.path = check.path
    builder.expect = check.expect
    builder.minHealthyMs = check.min_healthy_ms
    builder.intervalMs = check.interval_ms


def _paths_from_reader(items: Any, where: str, problems: _Problems) -> tuple[str, ...]:
    """A list of store paths (``Assignment.prepare``): each valid, none twice."""
    _check_length(len(items), LIMITS.max_vms_per_worker, where)
    paths: list[str] = []
    seen: set[str] = set()
    for index, path in enumerate(items):
        if (problem := check_store_path(path)) is not None:
            problems.add(f"{where}[{index}]", problem)
        elif path in seen:
            problems.add(f"{where}[{index}]", f"{path} is named twice")
        seen.add(path)
        paths.append(path)
    return tuple(paths)


def _fill_paths(builder: Any, name: str, paths: Sequence[str]) -> None:
    items = builder.init(name, len(paths))
    for index, path in enumerate(paths):
        items[index] = path


def _fill_vms(items: Any, vms: Sequence[VmAssignment]) -> None:
    for entry, vm in zip(items, vms, strict=True):
        entry.id = vm.id
        entry.hash = vm.hash
        entry.nixStorePath = vm.nix_store_path
        if vm.power is not PowerState.RUNNING:
            entry.power = vm.power.value
        if vm.vcpus or vm.memory_mib:
            resources = entry.resources
            resources.vcpus = vm.vcpus
            resources.memoryMib = vm.memory_mib
        if vm.reschedule:
            entry.reschedule = True
        if vm.health is not None:
            _fill_health_check(entry.health, vm.health)


def assignment_from_reader(reader: Any, where: str = "assignment") -> Assignment:
    problems = _Problems(where)
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)
    generation: int = reader.generation
    op_id = problems.text(f"{where}.opId", reader.opId, limit=64)
    vms = _vms_from_reader(reader.vms, f"{where}.vms", problems, reschedule=True)
    prepare = _paths_from_reader(reader.prepare, f"{where}.prepare", problems)
    transfers = _transfers_from_reader(reader.transfers, f"{where}.transfers", problems)
    problems.raise_if_any()
    return Assignment(worker_id, generation, vms, op_id, prepare, transfers)


def fill_assignment(builder: Any, assignment: Assignment) -> None:
    builder.workerId = assignment.worker_id
    builder.generation = assignment.generation
    builder.opId = assignment.op_id
    _fill_vms(builder.init("vms", len(assignment.vms)), assignment.vms)
    if assignment.prepare:
        _fill_paths(builder, "prepare", assignment.prepare)
    if assignment.transfers:
        _fill_transfers(builder, assignment.transfers)


def _transfers_from_reader(items: Any, where: str, problems: _Problems) -> tuple[DiskTransfer, ...]:
    """``Assignment.transfers``: each VM once, tokens of 32 hex digits, a
    source's peer a HOST:PORT (a live source's may be "": cancelled)."""
    _check_length(len(items), LIMITS.max_vms_per_worker, where)
    found: list[DiskTransfer] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        vm_id: str = item.vmId
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{at}.vmId", problem)
        elif vm_id in seen:
            problems.add(f"{at}.vmId", f"VM {vm_id} is named twice")
        seen.add(vm_id)
        token: str = item.token
        if not _TOKEN_RE.fullmatch(token):
            problems.add(f"{at}.token", "must be 32 hex digits")
        peer = problems.text(f"{at}.peer", item.peer, limit=300)
        # A live source's transfer without a peer is its move's cancel
        # (procurator.core.move, "cancelling"): stop migrating.
        cancel = item.live and not item.receive and not peer
        if not item.receive and not cancel and not _PEER_RE.fullmatch(peer):
            problems.add(f"{at}.peer", f"must be HOST:PORT, not {peer[:64]!r}")
        op_id = problems.text(f"{at}.opId", item.opId, limit=64)
        disks = _address(
            problems.text(f"{at}.disks", item.disks, limit=300), f"{at}.disks", problems
        )
        incoming = (
            _vms_from_reader([item.incoming], f"{at}.incoming", problems, reschedule=True)[0]
            if item._has("incoming")
            else None
        )
        found.append(
            DiskTransfer(
                vm_id,
                op_id,
                bool(item.receive),
                token,
                peer,
                live=bool(item.live),
                disks=disks,
                incoming=incoming,
                peer_tls_worker=_tls_worker(item.peerTlsWorker, f"{at}.peerTlsWorker", problems),
            )
        )
    return tuple(found)


def _tls_worker(worker_id: str, where: str, problems: _Problems) -> str:
    """``DiskTransfer.peerTlsWorker``: "" or a worker id."""
    if worker_id and (problem := check_worker_id(worker_id)) is not None:
        problems.add(where, problem)
    return worker_id


def _address(address: str, where: str, problems: _Problems) -> str:
    """``address``, which must be "" or HOST:PORT."""
    if address and not _PEER_RE.fullmatch(address):
        problems.add(where, f"must be HOST:PORT, not {address[:64]!r}")
    return address


def _fill_transfers(builder: Any, transfers: Sequence[DiskTransfer]) -> None:
    items = builder.init("transfers", len(transfers))
    for entry, transfer in zip(items, transfers, strict=True):
        entry.vmId = transfer.vm_id
        entry.opId = transfer.op_id
        entry.receive = transfer.receive
        entry.token = transfer.token
        entry.peer = transfer.peer
        if transfer.peer_tls_worker:
            entry.peerTlsWorker = transfer.peer_tls_worker
        if transfer.live:
            entry.live = True
            entry.disks = transfer.disks
            if transfer.incoming is not None:
                _fill_vms([entry.init("incoming")], [transfer.incoming])


_TOKEN_RE = re.compile(r"[0-9a-f]{32}")
_PEER_RE = re.compile(r"[A-Za-z0-9.:\[\]-]{1,255}:[0-9]{1,5}")
_TRANSFER_STATES = {s.value: s for s in TransferState}


def _progress_from_reader(
    items: Any, where: str, problems: _Problems
) -> tuple[TransferProgress, ...]:
    _check_length(len(items), LIMITS.max_vms_per_worker, where)
    found: list[TransferProgress] = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        vm_id: str = item.vmId
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{at}.vmId", problem)
        state = _TRANSFER_STATES.get(item.state)
        if state is None:
            problems.add(f"{at}.state", f"unknown transfer state {item.state[:32]!r}")
            state = TransferState.FAILED
        found.append(
            TransferProgress(
                vm_id,
                problems.text(f"{at}.opId", item.opId, limit=64),
                state,
                item.done,
                item.total,
                problems.text(f"{at}.message", item.message),
                _address(problems.text(f"{at}.memory", item.memory), f"{at}.memory", problems),
                _address(problems.text(f"{at}.disks", item.disks), f"{at}.disks", problems),
            )
        )
    return tuple(found)


def _fill_progress(builder: Any, transfers: Sequence[TransferProgress]) -> None:
    items = builder.init("transfers", len(transfers))
    for entry, progress in zip(items, transfers, strict=True):
        entry.vmId = progress.vm_id
        entry.opId = progress.op_id
        entry.state = progress.state.value
        entry.done = progress.done
        entry.total = progress.total
        entry.message = clip_text(progress.message)
        if progress.memory:
            entry.memory = progress.memory
            entry.disks = progress.disks


def assignment_changes_from_reader(reader: Any, where: str = "changes") -> AssignmentChanges:
    """Changes to a worker's assignment, validated: every field as in an
    assignment, and the update well formed on its own (a generation that
    moves forward, no id twice; ``AssignmentChanges.check``)."""
    problems = _Problems(where)
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)
    op_id = problems.text(f"{where}.opId", reader.opId, limit=64)
    upserted = _vms_from_reader(reader.upserted, f"{where}.upserted", problems, reschedule=True)
    ids = reader.removed
    _check_length(len(ids), LIMITS.max_vms_per_worker, f"{where}.removed")
    removed: list[str] = []
    for index, vm_id in enumerate(ids):
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{where}.removed[{index}]", problem)
        removed.append(vm_id)
    prepare = _paths_from_reader(reader.prepare, f"{where}.prepare", problems)
    transfers = _transfers_from_reader(reader.transfers, f"{where}.transfers", problems)
    problems.raise_if_any()
    changes = AssignmentChanges(
        worker_id,
        reader.baseGeneration,
        reader.generation,
        op_id,
        upserted,
        tuple(removed),
        prepare,
        transfers,
    )
    try:
        changes.check()
    except ValidationError as exc:
        raise ValidationError(
            f"invalid {where} received: 1 problem(s)", details=(f"{where}: {exc.message}",)
        ) from None
    return changes


def fill_assignment_changes(builder: Any, changes: AssignmentChanges) -> None:
    builder.workerId = changes.worker_id
    builder.baseGeneration = changes.base_generation
    builder.generation = changes.generation
    builder.opId = changes.op_id
    _fill_vms(builder.init("upserted", len(changes.upserted)), changes.upserted)
    removed = builder.init("removed", len(changes.removed))
    for index, vm_id in enumerate(changes.removed):
        removed[index] = vm_id
    if changes.prepare:
        _fill_paths(builder, "prepare", changes.prepare)
    if changes.transfers:
        _fill_transfers(builder, changes.transfers)


def fleet_from_reader(reader: Any, where: str = "fleet") -> Fleet:
    """A fleet as sent by a client, sorted by worker id and VM id. Only the
    per-field rules are checked here; fleet-wide ones (unique ids, totals) are
    ``validate_fleet``'s."""
    problems = _Problems(where)
    workers_reader = reader.workers
    _check_length(len(workers_reader), LIMITS.max_workers, f"{where}.workers")
    total = 0
    workers: list[tuple[str, tuple[VmAssignment, ...]]] = []
    for index, worker in enumerate(workers_reader):
        worker_id: str = worker.workerId
        if (problem := check_worker_id(worker_id)) is not None:
            problems.add(f"{where}.workers[{index}].workerId", problem)
        vms_reader = worker.vms
        total += len(vms_reader)
        _check_length(total, LIMITS.max_vms_total, f"{where} (all workers' VMs)")
        vms = _vms_from_reader(vms_reader, f"{where}.workers[{index}].vms", problems)
        workers.append((worker_id, tuple(sorted(vms, key=lambda vm: vm.id))))
    unpinned_reader = reader.unpinned
    total += len(unpinned_reader)
    _check_length(total, LIMITS.max_vms_total, f"{where} (all workers' VMs)")
    unpinned = _unpinned_from_reader(unpinned_reader, f"{where}.unpinned", problems)
    raw_strategy: int = reader.strategy.raw
    if not 0 <= raw_strategy < len(_STRATEGY):
        problems.add(f"{where}.strategy", f"unknown placement strategy {raw_strategy}")
        raw_strategy = 0
    rollout = (
        _rollout_settings(reader.rollout, f"{where}.rollout", problems)
        if reader._has("rollout")
        else None
    )
    named = [
        _named_rollouts(getattr(reader, field), f"{where}.{field}", problems)
        for field in ("groupRollouts", "vmRollouts")
    ]
    problems.raise_if_any()
    return Fleet(
        tuple(sorted(workers, key=lambda pair: pair[0])),
        tuple(sorted(unpinned, key=lambda u: u.id)),
        PlacementPolicy(_STRATEGY[raw_strategy]),
        rollout,
        named[0],
        named[1],
    )


def _named_rollouts(
    items: Any, where: str, problems: _Problems
) -> tuple[tuple[str, RolloutPolicy], ...]:
    """Rollout settings by group or VM name, sorted by name; a name given
    twice is refused (``Fleet.rollout_for`` could not tell them apart)."""
    _check_length(len(items), LIMITS.max_vms_total, where)
    named: dict[str, RolloutPolicy] = {}
    for index, item in enumerate(items):
        name = problems.text(f"{where}[{index}].name", item.name, limit=64)
        policy = _rollout_settings(item.settings, f"{where}[{index}] ({name})", problems)
        if name in named:
            problems.add(f"{where}[{index}].name", f"{name!r} is named twice")
        named[name] = policy
    return tuple(sorted(named.items(), key=lambda pair: pair[0]))


def _rollout_settings(reader: Any, where: str, problems: _Problems) -> RolloutPolicy:
    """Rollout settings as sent; their bounds are ``validate_fleet``'s."""
    health = (
        _health_check(reader.health, f"{where}.health", problems, strict=True)
        if reader._has("health")
        else HealthCheck()
    )
    return RolloutPolicy(
        max_parallel=reader.maxParallel,
        health=health,
        healthy_deadline_ms=reader.healthyDeadlineMs,
        canary=reader.canary,
        auto_revert=reader.autoRevert,
        auto_promote=reader.autoPromote,
    )


def _fill_rollout_settings(builder: Any, policy: RolloutPolicy) -> None:
    builder.maxParallel = policy.max_parallel
    _fill_health_check(builder.init("health"), policy.health)
    builder.healthyDeadlineMs = policy.healthy_deadline_ms
    builder.canary = policy.canary
    builder.autoRevert = policy.auto_revert
    builder.autoPromote = policy.auto_promote


def _unpinned_from_reader(items: Any, where: str, problems: _Problems) -> list[UnpinnedVm]:
    vms = _vms_from_reader([item.vm for item in items], where, problems, limit=LIMITS.max_vms_total)
    unpinned: list[UnpinnedVm] = []
    for index, (item, vm) in enumerate(zip(items, vms, strict=True)):
        at = f"{where}[{index}]"
        constraints_reader = item.constraints
        _check_length(len(constraints_reader), LIMITS.max_labels, f"{at}.constraints")
        constraints: dict[str, str] = {}
        for number, label in enumerate(constraints_reader):
            key: str = label.name
            value: str = label.value
            if (problem := check_label_key(key) or check_label_value(value)) is not None:
                problems.add(f"{at}.constraints[{number}]", problem)
            elif key in constraints:
                problems.add(f"{at}.constraints[{number}]", f"label {key!r} is given twice")
            constraints[key] = value
        spread: str = item.spread
        if spread and (problem := check_group_name(spread)) is not None:
            problems.add(f"{at}.spread", problem)
        raw: int = item.onWorkerLost.raw
        if not 0 <= raw < len(_ON_WORKER_LOST):
            problems.add(f"{at}.onWorkerLost", f"unknown value {raw}")
            raw = 0
        unpinned.append(
            UnpinnedVm(vm, tuple(sorted(constraints.items())), spread, _ON_WORKER_LOST[raw])
        )
    return unpinned


def fill_fleet(builder: Any, fleet: Fleet) -> None:
    items = builder.init("workers", len(fleet.workers))
    for entry, (worker_id, vms) in zip(items, fleet.workers, strict=True):
        entry.workerId = worker_id
        _fill_vms(entry.init("vms", len(vms)), vms)
    unpinned = builder.init("unpinned", len(fleet.unpinned))
    for entry, u in zip(unpinned, fleet.unpinned, strict=True):
        _fill_vms([entry.vm], [u.vm])
        constraints = entry.init("constraints", len(u.constraints))
        for label, (key, value) in zip(constraints, u.constraints, strict=True):
            label.name = key
            label.value = value
        entry.spread = u.spread
        entry.onWorkerLost = u.on_worker_lost.value
    builder.strategy = fleet.placement.strategy.value
    if fleet.rollout is not None:
        _fill_rollout_settings(builder.init("rollout"), fleet.rollout)
    for field, named in (
        ("groupRollouts", fleet.group_rollouts),
        ("vmRollouts", fleet.vm_rollouts),
    ):
        items = builder.init(field, len(named))
        for entry, (name, policy) in zip(items, named, strict=True):
            entry.name = name
            _fill_rollout_settings(entry.init("settings"), policy)


# ---------------------------------------------------------------- status


def _worker_status(reader: Any, where: str, problems: _Problems) -> WorkerStatus:
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)
    generation: int = reader.observedGeneration
    items = reader.vms
    _check_length(len(items), LIMITS.max_vms_per_worker, f"{where}.vms")
    vms: list[VmStatus] = []
    for index, item in enumerate(items):
        vms.append(_vm_status(item, f"{where}.vms[{index}]", problems))
    prepared = _prepared_from_reader(reader.prepared, f"{where}.prepared", problems)
    transfers = _progress_from_reader(reader.transfers, f"{where}.transfers", problems)
    return WorkerStatus(worker_id, generation, tuple(vms), prepared, transfers)


def _prepared_from_reader(items: Any, where: str, problems: _Problems) -> tuple[PreparedImage, ...]:
    _check_length(len(items), LIMITS.max_vms_per_worker, where)
    prepared: list[PreparedImage] = []
    for index, item in enumerate(items):
        at = f"{where}[{index}]"
        path: str = item.path
        if (problem := check_store_path(path)) is not None:
            problems.add(f"{at}.path", problem)
        prepared.append(
            PreparedImage(
                path,
                _enum(_PREPARE_STATE, item.state),
                problems.text(f"{at}.message", item.message),
            )
        )
    return tuple(prepared)


def _fill_prepared(builder: Any, prepared: Sequence[PreparedImage]) -> None:
    items = builder.init("prepared", len(prepared))
    for entry, image in zip(items, prepared, strict=True):
        entry.path = image.path
        entry.state = image.state.value
        entry.message = clip_text(image.message)


def _vm_status(item: Any, at: str, problems: _Problems) -> VmStatus:
    vm_id: str = item.id
    if (problem := check_vm_id(vm_id)) is not None:
        problems.add(f"{at}.id", problem)
    observed_hash: str = item.observedHash
    if observed_hash and (problem := check_hash(observed_hash)) is not None:
        problems.add(f"{at}.observedHash", problem)
    return VmStatus(
        id=vm_id,
        phase=_enum(_PHASE, item.phase),
        observed_hash=observed_hash,
        message=problems.text(f"{at}.message", item.message),
        restarts=item.restarts,
        address=problems.text(f"{at}.address", item.address, limit=64),
        observed_power=_enum(_POWER, item.observedPower),
        op_id=problems.text(f"{at}.opId", item.opId, limit=64),
        health=_enum(_HEALTH, item.health),
    )


def worker_status_from_reader(reader: Any, where: str = "status") -> WorkerStatus:
    """A worker's report of its whole status: each VM named once (a
    worker keeps one entry per VM). A fleet status read from a master is
    not held to that (an older master may have taken such a report)."""
    problems = _Problems(where)
    status = _worker_status(reader, where, problems)
    seen: dict[str, int] = {}
    for index, vm in enumerate(status.vms):
        if (first := seen.setdefault(vm.id, index)) != index:
            problems.add(
                f"{where}.vms[{index}].id", f"VM {vm.id!r} is reported twice (vms[{first}])"
            )
    problems.raise_if_any()
    return status


def status_changes_from_reader(reader: Any, where: str = "changes") -> StatusChanges:
    problems = _Problems(where)
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)
    items = reader.changed
    _check_length(len(items), LIMITS.max_vms_per_worker, f"{where}.changed")
    changed = tuple(
        _vm_status(item, f"{where}.changed[{index}]", problems) for index, item in enumerate(items)
    )
    ids = reader.removed
    _check_length(len(ids), LIMITS.max_vms_per_worker, f"{where}.removed")
    removed: list[str] = []
    for index, vm_id in enumerate(ids):
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{where}.removed[{index}]", problem)
        removed.append(vm_id)
    prepared = _prepared_from_reader(reader.prepared, f"{where}.prepared", problems)
    transfers = _progress_from_reader(reader.transfers, f"{where}.transfers", problems)
    problems.raise_if_any()
    return StatusChanges(
        worker_id, reader.observedGeneration, changed, tuple(removed), prepared, transfers
    )


def fill_status_changes(builder: Any, changes: StatusChanges) -> None:
    builder.workerId = changes.worker_id
    builder.observedGeneration = changes.observed_generation
    items = builder.init("changed", len(changes.changed))
    for entry, vm in zip(items, changes.changed, strict=True):
        _fill_vm_status(entry, vm)
    removed = builder.init("removed", len(changes.removed))
    for index, vm_id in enumerate(changes.removed):
        removed[index] = vm_id
    if changes.prepared:
        _fill_prepared(builder, changes.prepared)
    if changes.transfers:
        _fill_progress(builder, changes.transfers)


_CLIPPED = " …[cut]"


def clip_text(text: str, limit: int = LIMITS.max_text) -> str:
    """``text`` cut to fit ``limit`` characters, saying so. For what a
    sender writes freely (messages with a VMM's log tail in them): the
    receiver refuses an over-long string, and with it the whole report."""
    if len(text) <= limit:
        return text
    return text[: limit - len(_CLIPPED)] + _CLIPPED


def fill_worker_status(builder: Any, status: WorkerStatus) -> None:
    builder.workerId = status.worker_id
    builder.observedGeneration = status.observed_generation
    items = builder.init("vms", len(status.vms))
    for entry, vm in zip(items, status.vms, strict=True):
        _fill_vm_status(entry, vm)
    if status.prepared:
        _fill_prepared(builder, status.prepared)
    if status.transfers:
        _fill_progress(builder, status.transfers)


def _fill_vm_status(entry: Any, vm: VmStatus) -> None:
    entry.id = vm.id
    entry.phase = vm.phase.value
    entry.observedHash = vm.observed_hash
    entry.message = clip_text(vm.message)
    entry.restarts = vm.restarts
    entry.address = vm.address
    entry.observedPower = vm.observed_power.value
    entry.opId = vm.op_id
    if vm.health is not Health.UNCHECKED:
        entry.health = vm.health.value


def worker_info_from_reader(reader: Any, where: str = "info") -> WorkerInfo:
    problems = _Problems(where)
    info = _worker_info(reader, where, problems)
    problems.raise_if_any()
    return info


def _worker_info(reader: Any, where: str, problems: _Problems) -> WorkerInfo:
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)
    capacity = reader.capacity
    labels_reader = reader.labels
    _check_length(len(labels_reader), LIMITS.max_labels, f"{where}.labels")
    labels: dict[str, str] = {}
    for index, label in enumerate(labels_reader):
        key: str = label.name
        value: str = label.value
        if (problem := check_label_key(key) or check_label_value(value)) is not None:
            problems.add(f"{where}.labels[{index}]", problem)
        elif key in labels:
            problems.add(f"{where}.labels[{index}]", f"label {key!r} is given twice")
        labels[key] = value
    overcommit = {}
    for name, attribute in (("cpuOvercommit", "cpu"), ("memoryOvercommit", "memory")):
        ratio: float = getattr(reader, name)
        if (problem := check_overcommit(ratio)) is not None:
            problems.add(f"{where}.{name}", problem)
        overcommit[attribute] = ratio
    return WorkerInfo(
        worker_id=worker_id,
        version=problems.text(f"{where}.version", reader.version, limit=128),
        capacity=Capacity(capacity.vcpus, capacity.memoryMib, capacity.maxVms),
        metrics_url=problems.text(f"{where}.metricsUrl", reader.metricsUrl),
        driver=problems.text(f"{where}.driver", reader.driver, limit=128),
        labels=tuple(sorted(labels.items())),
        cpu_overcommit=overcommit["cpu"],
        memory_overcommit=overcommit["memory"],
        transfer_address=_transfer_address(reader.transferAddress, where, problems),
        live_moves=bool(reader.liveMoves),
        transfer_tls=bool(reader.transferTls),
    )


def _transfer_address(address: str, where: str, problems: _Problems) -> str:
    return _address(address, f"{where}.transferAddress", problems)


def fill_worker_info(builder: Any, info: WorkerInfo) -> None:
    builder.workerId = info.worker_id
    builder.version = info.version
    capacity = builder.capacity
    capacity.vcpus = info.capacity.vcpus
    capacity.memoryMib = info.capacity.memory_mib
    capacity.maxVms = info.capacity.max_vms
    builder.metricsUrl = info.metrics_url
    builder.driver = info.driver
    labels = builder.init("labels", len(info.labels))
    for entry, (key, value) in zip(labels, info.labels, strict=True):
        entry.name = key
        entry.value = value
    builder.cpuOvercommit = info.cpu_overcommit
    builder.memoryOvercommit = info.memory_overcommit
    builder.transferAddress = info.transfer_address
    builder.liveMoves = info.live_moves
    builder.transferTls = info.transfer_tls


# ---------------------------------------------------------------- events, metrics


def _event(reader: Any, where: str, problems: _Problems) -> VmEvent:
    vm_id: str = reader.vmId
    if (problem := check_vm_id(vm_id)) is not None:
        problems.add(f"{where}.vmId", problem)
    return VmEvent(
        vm_id=vm_id,
        kind=_enum(_EVENT_KIND, reader.kind),
        message=problems.text(f"{where}.message", reader.message),
        op_id=problems.text(f"{where}.opId", reader.opId, limit=64),
        unix_time_ms=reader.unixTimeMs,
    )


def _fill_event(builder: Any, event: VmEvent) -> None:
    builder.vmId = event.vm_id
    builder.kind = event.kind.value
    builder.message = clip_text(event.message)
    builder.opId = event.op_id
    builder.unixTimeMs = event.unix_time_ms


def events_from_reader(items: Any, where: str = "events") -> tuple[VmEvent, ...]:
    _check_length(len(items), MAX_EVENTS_PER_REPORT, where)
    problems = _Problems(where)
    events = tuple(_event(item, f"{where}[{i}]", problems) for i, item in enumerate(items))
    problems.raise_if_any()
    return events


def fill_events(items: Any, events: Sequence[VmEvent]) -> None:
    for entry, event in zip(items, events, strict=True):
        _fill_event(entry, event)


def worker_events_from_reader(items: Any, where: str = "events") -> tuple[WorkerEvent, ...]:
    _check_length(len(items), MAX_EVENTS_PER_REPORT, where)
    problems = _Problems(where)
    result = []
    for index, item in enumerate(items):
        worker_id: str = item.workerId
        if (problem := check_worker_id(worker_id)) is not None:
            problems.add(f"{where}[{index}].workerId", problem)
        event = _event(item.event, f"{where}[{index}]", problems)
        result.append(WorkerEvent(worker_id, event, item.seq))
    problems.raise_if_any()
    return tuple(result)


def fill_worker_events(items: Any, events: Sequence[WorkerEvent]) -> None:
    for entry, worker_event in zip(items, events, strict=True):
        entry.workerId = worker_event.worker_id
        entry.seq = worker_event.seq
        _fill_event(entry.event, worker_event.event)


def metrics_from_reader(reader: Any, where: str = "metrics") -> MetricsReport:
    """A ``MetricsReport``: whole, or a change with the series that ended
    (an older worker's reports read as whole: ``change`` is false)."""
    problems = _Problems(where)
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)
    items = reader.samples
    _check_length(len(items), MAX_SAMPLES_PER_REPORT, f"{where}.samples")
    whole = not reader.change
    ended_items = reader.ended
    if whole and len(ended_items):
        problems.add(f"{where}.ended", "a whole report ends no series")
    _check_length(len(ended_items), MAX_SAMPLES_PER_REPORT, f"{where}.ended")
    # Names and VM ids found valid in this report: each recurs once per VM
    # or per series of a VM, and is checked once.
    valid: tuple[set[str], set[str]] = (set(), set())
    samples: list[MetricSample] = []
    at = f"{where}.samples"
    for index, item in enumerate(items):
        name, vm_id, labels = _series_from_reader(item, at, index, problems, valid)
        samples.append(MetricSample(name, item.value, vm_id, labels))
    at = f"{where}.ended"
    ended = [
        _series_from_reader(item, at, index, problems, valid)
        for index, item in enumerate(ended_items)
    ]
    problems.raise_if_any()
    return MetricsReport(worker_id, tuple(samples), tuple(ended), whole=whole)


def _series_from_reader(
    item: Any, where: str, index: int, problems: _Problems, valid: tuple[set[str], set[str]]
) -> SeriesKey:
    """(name, vm id, labels) of a ``MetricSample`` or ``MetricSeries``, the
    ``index``-th of ``where``; ``valid``: the metric names and VM ids found
    valid so far in the report, kept up to date (the problems' paths are
    built only for a problem: this runs ~180,000 times a whole report)."""
    names, vm_ids = valid
    name: str = item.name
    if name not in names:
        if _METRIC_NAME_RE.fullmatch(name):
            names.add(name)
        else:
            problems.add(f"{where}[{index}].name", f"{name[:80]!r} is not a Prometheus metric name")
    vm_id: str = item.vmId
    if vm_id and vm_id not in vm_ids:
        if (problem := check_vm_id(vm_id)) is None:
            vm_ids.add(vm_id)
        else:
            problems.add(f"{where}[{index}].vmId", problem)
    labels_reader = item.labels
    if not len(labels_reader):
        return name, vm_id, ()
    at = f"{where}[{index}].labels"
    if len(labels_reader) > MAX_LABELS_PER_SAMPLE:
        problems.exceeded(at, f"more than {MAX_LABELS_PER_SAMPLE} labels")
        return name, vm_id, ()
    labels = []
    for label in labels_reader:
        label_name: str = label.name
        if not _LABEL_NAME_RE.fullmatch(label_name):
            problems.add(at, f"{label_name[:80]!r} is not a label name")
        labels.append((label_name, problems.text(at, label.value, limit=1024)))
    return name, vm_id, _in_series_order(name, labels)


def _in_series_order(name: str, labels: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """``labels`` in one order whatever order the sender wrote them in: the
    catalogue's for a known metric, then any other label by name. A series
    is keyed by its labels as a tuple (``series_key``: what the master
    holds, what ``ended`` names), so the same labels in two orders would
    otherwise be two series. A repeated label name stays repeated (adjacent):
    ``group_samples`` drops such a sample."""
    if len(labels) < 2:
        return tuple(labels)
    spec = CATALOGUE.get(name)
    order = spec.labels if spec is not None else ()
    if tuple(label_name for label_name, _ in labels) != order:
        rank = {label_name: i for i, label_name in enumerate(order)}
        labels.sort(key=lambda label: (rank.get(label[0], len(rank)), label[0]))
    return tuple(labels)


def fill_metrics(builder: Any, report: MetricsReport) -> None:
    builder.workerId = report.worker_id
    builder.change = not report.whole
    samples = report.samples
    items = builder.init("samples", len(samples))
    for entry, sample in zip(items, samples, strict=True):
        entry.name = sample.name
        entry.vmId = sample.vm_id
        entry.value = sample.value
        if sample.labels:
            _fill_labels(entry, sample.labels)
    if report.ended:
        ended = builder.init("ended", len(report.ended))
        for entry, (name, vm_id, labels) in zip(ended, report.ended, strict=True):
            entry.name = name
            entry.vmId = vm_id
            if labels:
                _fill_labels(entry, labels)


def _fill_labels(entry: Any, labels: tuple[tuple[str, str], ...]) -> None:
    items = entry.init("labels", len(labels))
    for label, (name, value) in zip(items, labels, strict=True):
        label.name = name
        label.value = value


# ---------------------------------------------------------------- control


def _diff_from_reader(reader: Any, where: str, problems: _Problems) -> WorkerDiff:
    worker_id: str = reader.workerId
    if (problem := check_worker_id(worker_id)) is not None:
        problems.add(f"{where}.workerId", problem)

    def ids(items: Any, name: str) -> tuple[str, ...]:
        _check_length(len(items), LIMITS.max_vms_per_worker, f"{where}.{name}")
        out = tuple(items)
        for index, vm_id in enumerate(out):
            if (problem := check_vm_id(vm_id)) is not None:
                problems.add(f"{where}.{name}[{index}]", problem)
        return out

    changes = reader.powerChanged
    _check_length(len(changes), LIMITS.max_vms_per_worker, f"{where}.powerChanged")
    return WorkerDiff(
        worker_id=worker_id,
        added=ids(reader.added, "added"),
        replaced=ids(reader.replaced, "replaced"),
        removed=ids(reader.removed, "removed"),
        power_changed=tuple(
            PowerChange(c.vmId, _enum(_POWER, getattr(c, "from")), _enum(_POWER, c.to))
            for c in changes
        ),
        updated=ids(reader.updated, "updated"),
    )


def _fill_diff(builder: Any, diff: WorkerDiff) -> None:
    builder.workerId = diff.worker_id
    for name, values in (
        ("added", diff.added),
        ("replaced", diff.replaced),
        ("removed", diff.removed),
        ("updated", diff.updated),
    ):
        if values:
            items = builder.init(name, len(values))
            for index, value in enumerate(values):
                items[index] = value
    if diff.power_changed:
        changes = builder.init("powerChanged", len(diff.power_changed))
        for entry, change in zip(changes, diff.power_changed, strict=True):
            entry.vmId = change.vm_id
            setattr(entry, "from", change.before.value)
            entry.to = change.after.value


def fill_apply_request(builder: Any, request: ApplyRequest) -> None:
    """``Control.apply``'s parameters."""
    fill_fleet(builder.init("fleet"), request.fleet)
    if request.expected_generation is not None:
        builder.expected.generation = request.expected_generation
    builder.dryRun = request.dry_run
    builder.requestId = request.request_id
    builder.supersede = request.supersede


def apply_request_from_reader(reader: Any) -> ApplyRequest:
    """``Control.apply``'s parameters, validated: the fleet field by field
    (``fleet_from_reader``), the request id by its rule."""
    fleet = fleet_from_reader(reader.fleet)
    expected = reader.expected
    request_id: str = reader.requestId
    if request_id and (problem := check_request_id(request_id)) is not None:
        raise ValidationError(f"requestId: {problem}", details=[f"requestId: {problem}"])
    return ApplyRequest(
        fleet=fleet,
        expected_generation=int(expected.generation) if expected.which() == "generation" else None,
        dry_run=bool(reader.dryRun),
        request_id=request_id,
        supersede=bool(reader.supersede),
    )


def fill_patch_request(builder: Any, request: PatchRequest) -> None:
    """``Control.applyPatch``'s parameters."""
    patch = request.patch
    parts = builder.patch.init("parts", len(patch.parts))
    for entry, (name, digest) in zip(parts, patch.parts, strict=True):
        entry.name = name
        entry.digest = digest
    fill_fleet(builder.patch.init("fleet"), patch.sent)
    builder.patch.settingsSent = patch.settings_sent
    if request.expected_generation is not None:
        builder.expected.generation = request.expected_generation
    builder.dryRun = request.dry_run
    builder.requestId = request.request_id
    builder.supersede = request.supersede


def patch_request_from_reader(reader: Any) -> PatchRequest:
    """``Control.applyPatch``'s parameters, each field by its rule (the
    patch's own rules are ``core.fleetpatch.assemble``'s)."""
    problems = _Problems("fleet patch")
    patch = reader.patch
    parts_reader = patch.parts
    _check_length(len(parts_reader), LIMITS.max_workers + 1, "patch.parts")
    parts = tuple(
        (
            problems.text(f"patch.parts[{index}].name", part.name, limit=LIMITS.max_text),
            bytes(part.digest),
        )
        for index, part in enumerate(parts_reader)
    )
    problems.raise_if_any()
    sent = fleet_from_reader(patch.fleet, "patch.fleet")
    request_id: str = reader.requestId
    if request_id and (problem := check_request_id(request_id)) is not None:
        raise ValidationError(f"requestId: {problem}", details=[f"requestId: {problem}"])
    expected = reader.expected
    return PatchRequest(
        FleetPatch(parts, sent, bool(patch.settingsSent)),
        expected_generation=int(expected.generation) if expected.which() == "generation" else None,
        dry_run=bool(reader.dryRun),
        request_id=request_id,
        supersede=bool(reader.supersede),
    )


def fill_patch_answer(results: Any, answer: PatchAnswer) -> None:
    """``Control.applyPatch``'s results: the result, or what is missing."""
    if answer.result is None:
        missing = results.init("missing", len(answer.missing))
        for index, name in enumerate(answer.missing):
            missing[index] = name
        # An answer with no result must not read as an empty fleet applied.
        fill_error(
            results.result.init("error"),
            ValidationError(f"the master does not hold {len(answer.missing)} part(s): send them"),
        )
    else:
        fill_apply_result(results.result, answer.result)


def patch_answer_from_reader(response: Any) -> PatchAnswer:
    """``Control.applyPatch``'s results (raises the master's error)."""
    missing_reader = response.missing
    _check_length(len(missing_reader), LIMITS.max_workers + 1, "missing")
    if len(missing_reader):
        problems = _Problems("answer")
        missing = tuple(
            problems.text(f"missing[{index}]", name) for index, name in enumerate(missing_reader)
        )
        problems.raise_if_any()
        return PatchAnswer(None, missing)
    return PatchAnswer(apply_result_from_reader(response.result))


def error_from_reader(reader: Any) -> ProcuratorError:
    """The typed error of an ``Error`` struct (unknown codes -> internal)."""
    raw: int = reader.code.raw
    code = ERROR_CODE_NAMES[raw] if 0 <= raw < len(ERROR_CODE_NAMES) else "internal"
    details_reader = reader.details
    details = [str(d)[: LIMITS.max_text] for d in list(details_reader)[:MAX_DETAILS]]
    return error_from_code(
        code, str(reader.message)[: LIMITS.max_text], details, str(reader.opId)[:64]
    )


def fill_error(builder: Any, error: ProcuratorError) -> None:
    code = error.code if error.code in ERROR_CODE_NAMES else "internal"
    builder.code = code
    builder.message = error.message[: LIMITS.max_text]
    details = error.details[:MAX_DETAILS]
    if details:
        items = builder.init("details", len(details))
        for index, line in enumerate(details):
            items[index] = line[: LIMITS.max_text]
    builder.opId = error.op_id


def apply_result_from_reader(reader: Any) -> ApplyResult:
    """The ``ok`` arm of an ``ApplyResult``; raises the typed error of the
    ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    ok = reader.ok
    problems = _Problems("apply result")
    diffs_reader = ok.diffs
    _check_length(len(diffs_reader), LIMITS.max_workers, "diffs")
    diffs = tuple(_diff_from_reader(d, f"diffs[{i}]", problems) for i, d in enumerate(diffs_reader))
    op_id = problems.text("opId", ok.opId, limit=64)
    placed_reader = ok.placed
    _check_length(len(placed_reader), LIMITS.max_vms_total, "placed")
    placed = []
    for index, item in enumerate(placed_reader):
        at = f"placed[{index}]"
        vm_id: str = item.vmId
        worker_id: str = item.workerId
        previous: str = item.previousWorker
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{at}.vmId", problem)
        if (problem := check_worker_id(worker_id)) is not None:
            problems.add(f"{at}.workerId", problem)
        if previous and (problem := check_worker_id(previous)) is not None:
            problems.add(f"{at}.previousWorker", problem)
        raw: int = item.reason.raw
        if not 0 <= raw < len(_REASON):
            problems.add(f"{at}.reason", f"unknown reason {raw}")
            raw = 0
        detail = problems.text(f"{at}.detail", item.detail)
        placed.append(VmPlacement(vm_id, worker_id, _REASON[raw], previous, detail))
    rollout_id = problems.text("rolloutId", ok.rolloutId, limit=64)
    problems.raise_if_any()
    return ApplyResult(
        ok.generation, ok.changed, diffs, op_id, ok.dryRun, ok.replayed, tuple(placed), rollout_id
    )


def fill_apply_result(builder: Any, result: ApplyResult) -> None:
    ok = builder.init("ok")
    ok.generation = result.generation
    ok.changed = result.changed
    ok.opId = result.op_id
    ok.dryRun = result.dry_run
    ok.replayed = result.replayed
    items = ok.init("diffs", len(result.diffs))
    for entry, diff in zip(items, result.diffs, strict=True):
        _fill_diff(entry, diff)
    placed = ok.init("placed", len(result.placed))
    for entry, vm in zip(placed, result.placed, strict=True):
        entry.vmId = vm.vm_id
        entry.workerId = vm.worker_id
        entry.previousWorker = vm.previous_worker
        entry.reason = REASON_NAMES[_REASON.index(vm.reason)]
        entry.detail = clip_text(vm.detail)
    ok.rolloutId = result.rollout_id


# ---------------------------------------------------------------- rollouts


def rollout_result_from_reader(reader: Any) -> RolloutView:
    """The ``ok`` arm of a ``RolloutResult``; raises the typed error of the
    ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    ok = reader.ok
    problems = _Problems("rollout")
    items = ok.vms
    _check_length(len(items), LIMITS.max_vms_total, "vms")
    vms = []
    for index, item in enumerate(items):
        at = f"vms[{index}]"
        vm_id: str = item.vmId
        if (problem := check_vm_id(vm_id)) is not None:
            problems.add(f"{at}.vmId", problem)
        vms.append(
            RolloutVmView(
                vm_id,
                problems.text(f"{at}.workerId", item.workerId, limit=64),
                problems.text(f"{at}.state", item.state, limit=32),
                bool(item.canary),
                problems.text(f"{at}.message", item.message),
                problems.text(f"{at}.oldPath", item.oldPath),
                problems.text(f"{at}.newPath", item.newPath),
            )
        )
    view = RolloutView(
        problems.text("id", ok.id, limit=64),
        problems.text("opId", ok.opId, limit=64),
        problems.text("phase", ok.phase, limit=32),
        problems.text("reason", ok.reason),
        bool(ok.paused),
        int(ok.batches),
        int(ok.startedUnixMs),
        int(ok.endedUnixMs),
        int(ok.preparedWorkers),
        int(ok.prepareWorkers),
        tuple(vms),
        problems.text("message", ok.message),
    )
    problems.raise_if_any()
    return view


def fill_rollout_result(builder: Any, view: RolloutView) -> None:
    ok = builder.init("ok")
    ok.id = view.id
    ok.opId = view.op_id
    ok.phase = view.phase
    ok.reason = clip_text(view.reason)
    ok.paused = view.paused
    ok.batches = view.batches
    ok.startedUnixMs = view.started_ms
    ok.endedUnixMs = view.ended_ms
    ok.preparedWorkers = view.prepared_workers
    ok.prepareWorkers = view.prepare_workers
    ok.message = clip_text(view.message)
    items = ok.init("vms", len(view.vms))
    for entry, vm in zip(items, view.vms, strict=True):
        entry.vmId = vm.vm_id
        entry.workerId = vm.worker_id
        entry.state = vm.state
        entry.canary = vm.canary
        entry.message = clip_text(vm.message)
        entry.oldPath = vm.old_path
        entry.newPath = vm.new_path


def fleet_status_from_reader(reader: Any) -> FleetStatus:
    problems = _Problems("fleet status")
    items = reader.workers
    _check_length(len(items), LIMITS.max_workers, "workers")
    workers = []
    for index, item in enumerate(items):
        where = f"workers[{index}]"
        worker_id: str = item.workerId
        if (problem := check_worker_id(worker_id)) is not None:
            problems.add(f"{where}.workerId", problem)
        status = (
            _worker_status(item.status, f"{where}.status", problems)
            if item._has("status")
            else None
        )
        desired_vms = _vms_from_reader(item.desiredVms, f"{where}.desiredVms", problems)
        info = _worker_info(item.info, f"{where}.info", problems) if item._has("info") else None
        workers.append(
            WorkerConnection(
                worker_id=worker_id,
                connected=item.connected,
                since_unix_ms=item.sinceUnixMs,
                desired_generation=item.desiredGeneration,
                status=status,
                last_report_unix_ms=item.lastReportUnixMs,
                vm_count=item.vmCount,
                desired_vms=desired_vms,
                info=info,
                state=_worker_state(item.state, f"{where}.state", problems),
                renewed_unix_ms=item.renewedUnixMs,
                renewed_ago_ms=item.renewedAgoMs,
                mode=(
                    worker_mode_from_reader(item.mode, f"{where}.mode", problems)
                    if item._has("mode")
                    else None
                ),
                handoffs=item.handoffs,
            )
        )
    problems.raise_if_any()
    return FleetStatus(reader.generation, tuple(workers), reader.changeIndex)


def fill_fleet_status(builder: Any, status: FleetStatus) -> None:
    builder.generation = status.generation
    builder.changeIndex = status.change_index
    items = builder.init("workers", len(status.workers))
    for entry, worker in zip(items, status.workers, strict=True):
        entry.workerId = worker.worker_id
        entry.connected = worker.connected
        entry.sinceUnixMs = worker.since_unix_ms
        entry.desiredGeneration = worker.desired_generation
        entry.lastReportUnixMs = worker.last_report_unix_ms
        entry.vmCount = worker.vm_count
        if worker.status is not None:
            fill_worker_status(entry.status, worker.status)
        if worker.desired_vms:
            _fill_vms(entry.init("desiredVms", len(worker.desired_vms)), worker.desired_vms)
        if worker.info is not None:
            fill_worker_info(entry.info, worker.info)
        entry.state = worker.state.value if worker.state is not None else ""
        entry.renewedUnixMs = worker.renewed_unix_ms
        entry.renewedAgoMs = worker.renewed_ago_ms
        if worker.mode is not None:
            fill_worker_mode(entry.mode, worker.mode)
        entry.handoffs = worker.handoffs


# ---------------------------------------------------------------- describe


def describe_result_from_reader(reader: Any) -> VmDescription:
    """The ``vm`` arm of a ``DescribeResult``; raises the typed error of the
    ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    vm = reader.vm
    problems = _Problems("VM description")
    vm_id: str = vm.vmId
    if (problem := check_vm_id(vm_id)) is not None:
        problems.add("vmId", problem)
    worker_id: str = vm.workerId
    observed_by: str = vm.observedBy
    for name, value in (("workerId", worker_id), ("observedBy", observed_by)):
        if value and (problem := check_worker_id(value)) is not None:
            problems.add(name, problem)
    desired = _vms_from_reader([vm.desired], "desired", problems)[0] if vm._has("desired") else None
    status = _vm_status(vm.status, "status", problems) if vm._has("status") else None
    events = worker_events_from_reader(vm.events)
    move = _move_from_reader(vm.move, problems, "move") if vm._has("move") else None
    description = VmDescription(
        vm_id=vm_id,
        fleet_generation=vm.fleetGeneration,
        worker_id=worker_id,
        desired_generation=vm.desiredGeneration,
        desired_op_id=problems.text("desiredOpId", vm.desiredOpId, limit=64),
        desired=desired,
        observed_by=observed_by,
        worker_connected=vm.workerConnected,
        observed_generation=vm.observedGeneration,
        status=status,
        events=events,
        change_index=vm.changeIndex,
        move=move,
    )
    problems.raise_if_any()
    return description


def fill_describe_result(builder: Any, description: VmDescription) -> None:
    vm = builder.init("vm")
    vm.vmId = description.vm_id
    vm.fleetGeneration = description.fleet_generation
    vm.changeIndex = description.change_index
    vm.workerId = description.worker_id
    vm.desiredGeneration = description.desired_generation
    vm.desiredOpId = description.desired_op_id
    if description.desired is not None:
        _fill_vms([vm.init("desired")], [description.desired])
    vm.observedBy = description.observed_by
    vm.workerConnected = description.worker_connected
    vm.observedGeneration = description.observed_generation
    if description.status is not None:
        _fill_vm_status(vm.init("status"), description.status)
    fill_worker_events(vm.init("events", len(description.events)), description.events)
    if description.move is not None:
        _fill_move(vm.init("move"), description.move)


# ---------------------------------------------------------------- snapshots

SNAPSHOT_ACTION_NAMES = ("create", "delete", "restore")
_SNAPSHOT_ACTION = [SnapshotAction(name) for name in SNAPSHOT_ACTION_NAMES]


def snapshot_request_from_reader(reader: Any) -> SnapshotRequest:
    """A ``SnapshotRequest``, checked (``SnapshotRequest.check``)."""
    raw: int = reader.action.raw
    if not 0 <= raw < len(_SNAPSHOT_ACTION):
        raise ValidationError(f"snapshot request: unknown action {raw}")
    problems = _Problems("snapshot request")
    request = SnapshotRequest(
        action=_SNAPSHOT_ACTION[raw],
        vm_id=problems.text("vmId", reader.vmId, limit=64),
        name=problems.text("name", reader.name, limit=64),
        force=reader.force,
        op_id=problems.text("opId", reader.opId, limit=64),
    )
    problems.raise_if_any()
    request.check()
    return request


def fill_snapshot_request(builder: Any, request: SnapshotRequest) -> None:
    builder.action = SNAPSHOT_ACTION_NAMES.index(request.action.value)
    builder.vmId = request.vm_id
    builder.name = request.name
    builder.force = request.force
    builder.opId = request.op_id


def _snapshot_from_reader(reader: Any, problems: _Problems, where: str) -> SnapshotInfo:
    info = SnapshotInfo(
        vm_id=problems.text(f"{where}.vmId", reader.vmId, limit=64),
        name=problems.text(f"{where}.name", reader.name, limit=64),
        hash=problems.text(f"{where}.hash", reader.hash, limit=128),
        image=problems.text(f"{where}.image", reader.image),
        size_bytes=reader.sizeBytes,
        created_unix_ms=reader.createdUnixMs,
        op_id=problems.text(f"{where}.opId", reader.opId, limit=64),
        driver=problems.text(f"{where}.driver", reader.driver, limit=64),
        worker_id=problems.text(f"{where}.workerId", reader.workerId, limit=64),
    )
    for field, problem in (
        ("vmId", check_vm_id(info.vm_id)),
        ("name", check_snapshot_name(info.name)),
        ("hash", check_hash(info.hash)),
        ("workerId", check_worker_id(info.worker_id) if info.worker_id else None),
    ):
        if problem is not None:
            problems.add(f"{where}.{field}", problem)
    return info


def _fill_snapshot(builder: Any, info: SnapshotInfo) -> None:
    builder.vmId = info.vm_id
    builder.name = info.name
    builder.hash = info.hash
    builder.image = info.image
    builder.sizeBytes = info.size_bytes
    builder.createdUnixMs = info.created_unix_ms
    builder.opId = info.op_id
    builder.driver = info.driver
    builder.workerId = info.worker_id


def snapshot_result_from_reader(reader: Any) -> SnapshotInfo:
    """The ``snapshot`` arm of a ``SnapshotResult``; raises the typed error
    of the ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    problems = _Problems("snapshot")
    info = _snapshot_from_reader(reader.snapshot, problems, "snapshot")
    problems.raise_if_any()
    return info


def fill_snapshot_result(builder: Any, info: SnapshotInfo) -> None:
    _fill_snapshot(builder.init("snapshot"), info)


def snapshot_list_from_reader(reader: Any) -> tuple[SnapshotInfo, ...]:
    """The ``snapshots`` arm of a ``SnapshotListResult``; raises the typed
    error of the ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    items = reader.snapshots
    _check_length(len(items), LIMITS.max_vms_per_worker, "snapshots")
    problems = _Problems("snapshot list")
    found = tuple(
        _snapshot_from_reader(item, problems, f"snapshots[{i}]") for i, item in enumerate(items)
    )
    problems.raise_if_any()
    return found


def fill_snapshot_list(builder: Any, infos: Sequence[SnapshotInfo]) -> None:
    entries = builder.init("snapshots", len(infos))
    for entry, info in zip(entries, infos, strict=True):
        _fill_snapshot(entry, info)


# ---------------------------------------------------------------- moves

_MOVE_KINDS = {k.value: k for k in MoveKind}
_MOVE_PHASES = {p.value: p for p in MovePhase}


def _fill_move(builder: Any, move: Move) -> None:
    builder.vmId = move.vm_id
    builder.source = move.source
    builder.target = move.target
    builder.kind = move.kind.value
    builder.phase = move.phase.value
    builder.opId = move.op_id
    builder.startedUnixMs = move.started_unix_ms
    builder.updatedUnixMs = move.updated_unix_ms
    builder.deadlineUnixMs = move.deadline_unix_ms
    builder.generation = move.generation
    builder.reason = clip_text(move.reason)
    builder.progress = move.progress


def _move_from_reader(reader: Any, problems: _Problems, where: str) -> Move | None:
    kind = _MOVE_KINDS.get(reader.kind)
    phase = _MOVE_PHASES.get(reader.phase)
    if kind is None:
        problems.add(f"{where}.kind", f"unknown move kind {reader.kind[:32]!r}")
    if phase is None:
        problems.add(f"{where}.phase", f"unknown move phase {reader.phase[:32]!r}")
    if kind is None or phase is None:
        return None
    return Move(
        problems.text(f"{where}.vmId", reader.vmId, limit=64),
        problems.text(f"{where}.source", reader.source, limit=64),
        problems.text(f"{where}.target", reader.target, limit=64),
        kind,
        phase,
        problems.text(f"{where}.opId", reader.opId, limit=64),
        reader.startedUnixMs,
        reader.deadlineUnixMs,
        generation=reader.generation,
        updated_unix_ms=reader.updatedUnixMs,
        reason=problems.text(f"{where}.reason", reader.reason),
        progress=problems.text(f"{where}.progress", reader.progress, limit=16),
    )


def fill_move_result(builder: Any, move: Move) -> None:
    _fill_move(builder.init("move"), move)


def move_from_reader(reader: Any) -> Move:
    """The ``move`` arm of a ``MoveResult``; raises the typed error of the
    ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    problems = _Problems("move")
    move = _move_from_reader(reader.move, problems, "move")
    problems.raise_if_any()
    assert move is not None
    return move


def fill_move_list(builder: Any, moves: Sequence[Move]) -> None:
    entries = builder.init("moves", len(moves))
    for entry, move in zip(entries, moves, strict=True):
        _fill_move(entry, move)


def move_list_from_reader(reader: Any) -> tuple[Move, ...]:
    """The ``moves`` arm of a ``MoveListResult``; raises the typed error of
    the ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    items = reader.moves
    _check_length(len(items), LIMITS.max_vms_per_worker, "moves")
    problems = _Problems("move list")
    found = [_move_from_reader(item, problems, f"moves[{i}]") for i, item in enumerate(items)]
    problems.raise_if_any()
    return tuple(m for m in found if m is not None)


# ---------------------------------------------------------------- cordon and drain

_WORKER_STATES = {s.value: s for s in WorkerState}


def _worker_state(text: str, where: str, problems: _Problems) -> WorkerState | None:
    """A worker's state ("" from an older master: None)."""
    if not text:
        return None
    state = _WORKER_STATES.get(text)
    if state is None:
        problems.add(where, f"unknown worker state {text[:32]!r}")
    return state


def worker_mode_from_reader(reader: Any, where: str, problems: _Problems) -> WorkerMode | None:
    state = _worker_state(reader.state, f"{where}.state", problems)
    if state not in (WorkerState.CORDONED, WorkerState.DRAINING):
        problems.add(f"{where}.state", "a worker mode is cordoned or draining")
        return None
    return WorkerMode(
        state,
        problems.text(f"{where}.opId", reader.opId, limit=64),
        reader.sinceUnixMs,
        reader.maxUnavailable,
        reader.moved,
        reader.total,
        problems.text(f"{where}.blocked", reader.blocked),
    )


def fill_worker_mode(builder: Any, mode: WorkerMode) -> None:
    builder.state = mode.state.value
    builder.opId = mode.op_id
    builder.sinceUnixMs = mode.since_unix_ms
    builder.maxUnavailable = mode.max_unavailable
    builder.moved = mode.moved
    builder.total = mode.total
    builder.blocked = clip_text(mode.blocked)


def mode_change_from_reader(reader: Any, worker_id: str) -> ModeChange:
    """The ``ok`` arm of a ``WorkerModeResult``; raises the typed error of
    the ``error`` arm."""
    if reader.which() == "error":
        raise error_from_reader(reader.error)
    ok = reader.ok
    problems = _Problems("worker mode")
    mode = worker_mode_from_reader(ok.mode, "mode", problems) if ok._has("mode") else None
    message = problems.text("message", ok.message)
    problems.raise_if_any()
    return ModeChange(worker_id, mode, ok.changed, message)


def fill_mode_change(builder: Any, change: ModeChange) -> None:
    ok = builder.init("ok")
    if change.mode is not None:
        fill_worker_mode(ok.mode, change.mode)
    ok.changed = change.changed
    ok.message = clip_text(change.message)


# ---------------------------------------------------------------- malformed messages

READ_ERRORS: tuple[type[Exception], ...] = (capnp.KjException, UnicodeDecodeError)
"""What reading a field of a malformed message raises (see
:func:`malformed_error`)."""

_TRAVERSAL = "traversal limit"
_NESTING = "nesting limit"


def malformed_error(reader: Any, exc: BaseException, where: str = "") -> ProcuratorError:
    """The error to answer for ``exc``, raised while reading ``reader`` (a
    struct reader, e.g. a call's parameters): ``ValidationError`` naming
    the first field of ``reader`` that cannot be read and why, or
    ``LimitExceededError`` when the message is beyond the reader's limits.
    ``where`` prefixes the field paths ("" for a call's parameters, whose
    field names are the parameter names)."""
    reason = _read_problem(exc)
    if _TRAVERSAL in reason or _NESTING in reason:
        # Walking the message again would only hit the same limit.
        problem = f"{where}: {reason}" if where else reason
        return LimitExceededError(f"malformed message: {problem}", details=[problem])
    try:
        found = _first_unreadable(reader, where)
    except READ_ERRORS as walk_failed:  # the walk itself cannot get in
        found = (where or "message", walk_failed)
    path, cause = found if found is not None else (where or "message", exc)
    problem = f"{path}: {_read_problem(cause)}"
    return ValidationError(f"malformed message: {problem}", details=[problem])


def _read_problem(exc: BaseException) -> str:
    """A short, stable phrase for why a field cannot be read (never a file
    name, a line number or a stack)."""
    if isinstance(exc, UnicodeDecodeError):
        return "text is not valid UTF-8"
    description = str(getattr(exc, "description", "") or exc)
    if "NUL" in description or "'\\0'" in description:
        # kj's own wording is cut at the NUL it quotes: say it plainly.
        return "text is not NUL-terminated"
    if "traversal limit" in description:
        return f"message exceeds the {_TRAVERSAL} (too large, or read more than once)"
    if "nesting limit" in description:
        return f"message exceeds the {_NESTING} (nested too deeply)"
    # kj words a failed check "expected <condition> [<values>]; <why>":
    # the why is the part for people.
    text = description.rsplit("; ", 1)[-1].strip().splitlines()[0] if description else ""
    if text.startswith("Schema mismatch: "):
        return "wrong type: " + text[len("Schema mismatch: ") :]
    if "out-of-bounds" in text:
        return "pointer out of bounds (corrupt message)"
    return f"unreadable: {text[:200]}" if text else "unreadable"


def _first_unreadable(reader: Any, where: str) -> tuple[str, BaseException] | None:
    """(path, exception) of the first field of struct ``reader`` (walked
    depth first, by its schema, union members only when active) whose read
    fails; None when every field reads."""
    schema = reader.schema
    active = reader.which() if schema.union_fields else None
    for name in schema.fieldnames:
        proto = schema.fields[name].proto
        if proto.discriminantValue != 0xFFFF and name != active:
            continue
        path = f"{where}.{name}" if where else name
        try:
            value = reader._get(name)
        except READ_ERRORS as exc:
            return path, exc
        if proto.which() == "group":
            found = _first_unreadable(value, path)
        else:
            found = _first_unreadable_value(value, proto.slot.type, path)
        if found is not None:
            return found
    return None


def _first_unreadable_value(value: Any, type_: Any, path: str) -> tuple[str, BaseException] | None:
    kind = type_.which()
    if kind == "struct":
        return _first_unreadable(value, path)
    if kind != "list":
        return None
    element = type_.list.elementType
    for index in range(len(value)):
        at = f"{path}[{index}]"
        try:
            item = value[index]
        except READ_ERRORS as exc:
            return at, exc
        found = _first_unreadable_value(item, element, at)
        if found is not None:
            return found
    return None
