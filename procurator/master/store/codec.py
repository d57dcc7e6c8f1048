"""Values the store keeps as text or bytes: diffs (replayed to a retried
apply), worker info and VM statuses (JSON, so a newer release's extra field
is kept by no column change and ignored by an older one), a worker's
progress on the images it prepares and the health checks sent with VMs
(JSON, for the rollout's columns); and the JSON of a fleet dump
(``procurator master export / import``), read back checked.

A VM status's ``health`` is written only when it is not ``unchecked``, so
the text of a status without one is what older releases wrote (a whole
report rewrites no row that did not change)."""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from procurator.core.errors import ValidationError
from procurator.core.models import (
    Capacity,
    Health,
    HealthCheck,
    HealthKind,
    OnWorkerLost,
    Phase,
    PlacementStrategy,
    PowerChange,
    PowerState,
    PreparedImage,
    PrepareState,
    TransferProgress,
    TransferState,
    VmAssignment,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
)
from procurator.core.validation import (
    check_group_name,
    check_hash,
    check_label_key,
    check_label_value,
    check_request_id,
    check_store_path,
    check_vm_id,
    check_worker_id,
)
from procurator.master.store.model import FleetDump, PlacementRecord, UnpinnedRules, WorkerDump

__all__ = [
    "DUMP_FORMAT",
    "decode_diffs",
    "decode_dump",
    "decode_health_check",
    "decode_info",
    "decode_prepared",
    "decode_rules",
    "decode_transfers",
    "decode_vm_status",
    "encode_diffs",
    "encode_dump",
    "encode_health_check",
    "encode_info",
    "encode_prepared",
    "encode_rules",
    "encode_transfers",
    "encode_vm_status",
]

_POWER = {p.value: p for p in PowerState}
_PHASE = {p.value: p for p in Phase}
_ON_WORKER_LOST = {o.value: o for o in OnWorkerLost}
_HEALTH = {h.value: h for h in Health}
_HEALTH_KIND = {k.value: k for k in HealthKind}
_PREPARE_STATE = {p.value: p for p in PrepareState}
_TRANSFER_STATE = {t.value: t for t in TransferState}


def encode_diffs(diffs: Sequence[WorkerDiff]) -> bytes:
    """Diffs as compressed JSON: a replay prints them again. Compressed
    because a big apply names thousands of VM ids."""
    rows = [
        {
            "worker_id": d.worker_id,
            "added": d.added,
            "replaced": d.replaced,
            "removed": d.removed,
            "updated": d.updated,
            "power": [[c.vm_id, c.before.value, c.after.value] for c in d.power_changed],
        }
        for d in diffs
    ]
    return zlib.compress(json.dumps(rows, separators=(",", ":")).encode())


def decode_diffs(blob: bytes) -> tuple[WorkerDiff, ...]:
    rows = json.loads(zlib.decompress(blob))
    return tuple(
        WorkerDiff(
            worker_id=row["worker_id"],
            added=tuple(row["added"]),
            replaced=tuple(row["replaced"]),
            removed=tuple(row["removed"]),
            updated=tuple(row["updated"]),
            power_changed=tuple(
                PowerChange(vm_id, _POWER[before], _POWER[after])
                for vm_id, before, after in row["power"]
            ),
        )
        for row in rows
    )


def _dump(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def encode_info(info: WorkerInfo) -> str:
    cap = info.capacity
    return _dump(
        {
            "version": info.version,
            "capacity": {"vcpus": cap.vcpus, "memory_mib": cap.memory_mib, "max_vms": cap.max_vms},
            "metrics_url": info.metrics_url,
            "driver": info.driver,
            "labels": dict(info.labels),
            "cpu_overcommit": info.cpu_overcommit,
            "memory_overcommit": info.memory_overcommit,
            "transfer_address": info.transfer_address,
            "live_moves": info.live_moves,
            "transfer_tls": info.transfer_tls,
        }
    )


def decode_info(worker_id: str, text: str) -> WorkerInfo:
    data = json.loads(text) if text else {}
    cap = data.get("capacity", {})
    return WorkerInfo(
        worker_id=worker_id,
        version=data.get("version", ""),
        capacity=Capacity(cap.get("vcpus", 0), cap.get("memory_mib", 0), cap.get("max_vms", 0)),
        metrics_url=data.get("metrics_url", ""),
        driver=data.get("driver", ""),
        labels=tuple(sorted(data.get("labels", {}).items())),
        cpu_overcommit=data.get("cpu_overcommit", 1.0),
        memory_overcommit=data.get("memory_overcommit", 1.0),
        transfer_address=data.get("transfer_address", ""),
        live_moves=bool(data.get("live_moves", False)),
        transfer_tls=bool(data.get("transfer_tls", False)),
    )


def encode_rules(rules: UnpinnedRules) -> str:
    """An unpinned VM's placement rules (``PlacementRecord``)."""
    return _dump(
        {
            "constraints": dict(rules.constraints),
            "spread": rules.spread,
            "on_worker_lost": rules.on_worker_lost.value,
        }
    )


def decode_rules(text: str) -> UnpinnedRules:
    data = json.loads(text)
    return UnpinnedRules(
        tuple(sorted(data.get("constraints", {}).items())),
        data.get("spread", ""),
        # An unknown value (a newer release's) waits: never moved by mistake.
        _ON_WORKER_LOST.get(data.get("on_worker_lost", ""), OnWorkerLost.WAIT),
    )


def encode_vm_status(vm: VmStatus) -> str:
    data = {
        "phase": vm.phase.value,
        "hash": vm.observed_hash,
        "message": vm.message,
        "restarts": vm.restarts,
        "address": vm.address,
        "power": vm.observed_power.value,
        "op": vm.op_id,
    }
    if vm.health is not Health.UNCHECKED:
        data["health"] = vm.health.value
    return _dump(data)


def decode_vm_status(vm_id: str, text: str) -> VmStatus:
    data = json.loads(text)
    return VmStatus(
        id=vm_id,
        phase=_PHASE.get(data.get("phase", ""), Phase.UNKNOWN),
        observed_hash=data.get("hash", ""),
        message=data.get("message", ""),
        restarts=data.get("restarts", 0),
        address=data.get("address", ""),
        observed_power=_POWER.get(data.get("power", ""), PowerState.STOPPED),
        op_id=data.get("op", ""),
        # An unknown value (a newer release's) reads as not checked.
        health=_HEALTH.get(data.get("health", ""), Health.UNCHECKED),
    )


def encode_health_check(check: HealthCheck | None) -> str:
    """A VM's health check ("" for none)."""
    if check is None:
        return ""
    return _dump(
        {
            "kind": check.kind.value,
            "port": check.port,
            "path": check.path,
            "expect": check.expect,
            "min_healthy_ms": check.min_healthy_ms,
            "interval_ms": check.interval_ms,
        }
    )


def decode_health_check(text: str) -> HealthCheck | None:
    if not text:
        return None
    data = json.loads(text)
    default = HealthCheck()
    return HealthCheck(
        # An unknown kind (a newer release's) reads as none, as on the wire.
        kind=_HEALTH_KIND.get(data.get("kind", ""), HealthKind.NONE),
        port=data.get("port", default.port),
        path=data.get("path", default.path),
        expect=data.get("expect", default.expect),
        min_healthy_ms=data.get("min_healthy_ms", default.min_healthy_ms),
        interval_ms=data.get("interval_ms", default.interval_ms),
    )


def encode_prepared(prepared: Sequence[PreparedImage]) -> str:
    """A worker's ``WorkerStatus.prepared`` ("" for none)."""
    if not prepared:
        return ""
    return _dump(
        {"prepared": [[image.path, image.state.value, image.message] for image in prepared]}
    )


def encode_transfers(transfers: Sequence[TransferProgress]) -> str:
    """A worker's ``WorkerStatus.transfers`` ("" for none). A live move's
    target's addresses go under a key of their own ("listening", by
    position), which a release older than live moves ignores."""
    if not transfers:
        return ""
    data: dict[str, object] = {
        "transfers": [
            [t.vm_id, t.op_id, t.state.value, t.done, t.total, t.message] for t in transfers
        ]
    }
    if listening := {str(i): [t.memory, t.disks] for i, t in enumerate(transfers) if t.memory}:
        data["listening"] = listening
    return _dump(data)


def decode_transfers(text: str) -> tuple[TransferProgress, ...]:
    if not text:
        return ()
    data = json.loads(text)
    listening = data.get("listening", {})
    return tuple(
        # An unknown state (a newer release's) reads as pending: never received by mistake.
        TransferProgress(
            vm_id,
            op_id,
            _TRANSFER_STATE.get(state, TransferState.PENDING),
            done,
            total,
            message,
            *listening.get(str(i), ("", "")),
        )
        for i, (vm_id, op_id, state, done, total, message) in enumerate(data["transfers"])
    )


def decode_prepared(text: str) -> tuple[PreparedImage, ...]:
    if not text:
        return ()
    return tuple(
        # An unknown state (a newer release's) reads as pending: never ready by mistake.
        PreparedImage(path, _PREPARE_STATE.get(state, PrepareState.PENDING), message)
        for path, state, message in json.loads(text)["prepared"]
    )


# ---------------------------------------------------------------- dumps

DUMP_FORMAT = "procurator-fleet-dump"
DUMP_VERSION = 1


def encode_dump(dump: FleetDump) -> dict[str, Any]:
    """``dump`` as JSON data (``procurator master export``)."""
    return {
        "format": DUMP_FORMAT,
        "version": DUMP_VERSION,
        "generation": dump.generation,
        "event_seq": dump.event_seq,
        "workers": [
            {
                "worker_id": w.worker_id,
                "generation": w.generation,
                "op_id": w.op_id,
                "vms": [
                    {
                        "id": vm.id,
                        "hash": vm.hash,
                        "nix_store_path": vm.nix_store_path,
                        "power": vm.power.value,
                        "vcpus": vm.vcpus,
                        "memory_mib": vm.memory_mib,
                    }
                    for vm in w.vms
                ],
            }
            for w in dump.workers
        ],
        "applies": [list(row) for row in dump.applies],
        "requests": [
            {
                "request_id": request_id,
                "generation": generation,
                "fleet_digest": digest,
                "diffs": base64.b64encode(diffs).decode(),
            }
            for request_id, generation, digest, diffs in dump.requests
        ],
        "removals": [list(row) for row in dump.removals],
        "placement": {
            "strategy": dump.placement.strategy.value,
            "unpinned": {
                vm_id: json.loads(encode_rules(rules))
                for vm_id, rules in sorted(dump.placement.unpinned.items())
            },
        },
    }


class _Reader:
    """Reads a dump's JSON data, each problem a ``ValidationError`` naming
    the field (``source: workers[2].vms[0].power: ...``)."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, where: str, problem: str) -> NoReturn:
        raise ValidationError(f"{self.source}: {where}: {problem}; nothing was imported")

    def integer(self, value: Any, where: str, *, nullable: bool = False) -> Any:
        if value is None and nullable:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            self.fail(where, f"must be a whole number >= 0, not {value!r}")
        return value

    def text(self, value: Any, where: str, check: Callable[[str], str | None] | None = None) -> Any:
        if not isinstance(value, str):
            self.fail(where, f"must be a string, not {value!r}")
        if check is not None and (problem := check(value)) is not None:
            self.fail(where, problem)
        return value

    def items(self, value: Any, where: str) -> list[Any]:
        if not isinstance(value, list):
            self.fail(where, f"must be a list, not {type(value).__name__}")
        return value

    def row(self, value: Any, where: str, size: int) -> list[Any]:
        row = self.items(value, where)
        if len(row) != size:
            self.fail(where, f"must have {size} entries, not {len(row)}")
        return row


def decode_dump(data: Any, source: str) -> FleetDump:
    """A dump from JSON data (``procurator master import``), checked."""
    r = _Reader(source)
    if not isinstance(data, dict) or data.get("format") != DUMP_FORMAT:
        r.fail("format", f'not a procurator fleet dump (no "format": "{DUMP_FORMAT}")')
    if data.get("version") != DUMP_VERSION:
        r.fail(
            "version", f"this procurator reads version {DUMP_VERSION}, not {data.get('version')!r}"
        )
    workers = []
    for i, w in enumerate(r.items(data.get("workers"), "workers")):
        at = f"workers[{i}]"
        if not isinstance(w, dict):
            r.fail(at, "must be an object")
        vms = []
        for j, vm in enumerate(r.items(w.get("vms"), f"{at}.vms")):
            vat = f"{at}.vms[{j}]"
            if not isinstance(vm, dict):
                r.fail(vat, "must be an object")
            power = vm.get("power")
            if power not in _POWER:
                r.fail(f"{vat}.power", f"must be one of {sorted(_POWER)}, not {power!r}")
            vms.append(
                VmAssignment(
                    r.text(vm.get("id"), f"{vat}.id", check_vm_id),
                    r.text(vm.get("hash"), f"{vat}.hash", check_hash),
                    r.text(vm.get("nix_store_path"), f"{vat}.nix_store_path", check_store_path),
                    _POWER[power],
                    r.integer(vm.get("vcpus"), f"{vat}.vcpus"),
                    r.integer(vm.get("memory_mib"), f"{vat}.memory_mib"),
                )
            )
        workers.append(
            WorkerDump(
                r.text(w.get("worker_id"), f"{at}.worker_id", check_worker_id),
                r.integer(w.get("generation"), f"{at}.generation"),
                r.text(w.get("op_id"), f"{at}.op_id"),
                tuple(vms),
            )
        )
    applies = []
    for i, row in enumerate(r.items(data.get("applies"), "applies")):
        g, op, ms, changed, req = r.row(row, f"applies[{i}]", 5)
        applies.append(
            (
                r.integer(g, f"applies[{i}][0]"),
                r.text(op, f"applies[{i}][1]"),
                r.integer(ms, f"applies[{i}][2]"),
                r.integer(changed, f"applies[{i}][3]"),
                r.text(req, f"applies[{i}][4]"),
            )
        )
    requests = []
    for i, entry in enumerate(r.items(data.get("requests"), "requests")):
        at = f"requests[{i}]"
        if not isinstance(entry, dict):
            r.fail(at, "must be an object")
        try:
            diffs = base64.b64decode(r.text(entry.get("diffs"), f"{at}.diffs"), validate=True)
            decode_diffs(diffs)
        except (ValueError, KeyError, TypeError, zlib.error) as exc:
            r.fail(f"{at}.diffs", f"not the diffs of an apply ({exc})")
        requests.append(
            (
                r.text(entry.get("request_id"), f"{at}.request_id", check_request_id),
                r.integer(entry.get("generation"), f"{at}.generation"),
                r.text(entry.get("fleet_digest"), f"{at}.fleet_digest"),
                diffs,
            )
        )
    removals = []
    for i, row in enumerate(r.items(data.get("removals"), "removals")):
        w, vm, g, acked = r.row(row, f"removals[{i}]", 4)
        removals.append(
            (
                r.text(w, f"removals[{i}][0]", check_worker_id),
                r.text(vm, f"removals[{i}][1]", check_vm_id),
                r.integer(g, f"removals[{i}][2]"),
                r.integer(acked, f"removals[{i}][3]", nullable=True),
            )
        )
    return FleetDump(
        generation=r.integer(data.get("generation"), "generation"),
        workers=tuple(workers),
        applies=tuple(applies),
        requests=tuple(requests),
        removals=tuple(removals),
        event_seq=r.integer(data.get("event_seq", 0), "event_seq"),
        placement=_placement_from_dump(r, data.get("placement", {})),
    )


def _placement_from_dump(r: _Reader, data: Any) -> PlacementRecord:
    """The ``placement`` of a dump (absent from a dump of a release that
    placed no VM: an empty record)."""
    if not isinstance(data, dict):
        r.fail("placement", "must be an object")
    strategies = {s.value: s for s in PlacementStrategy}
    strategy = data.get("strategy", PlacementStrategy.BINPACK.value)
    if strategy not in strategies:
        r.fail("placement.strategy", f"must be one of {sorted(strategies)}, not {strategy!r}")
    unpinned = data.get("unpinned", {})
    if not isinstance(unpinned, dict):
        r.fail("placement.unpinned", "must be an object")
    rules = {}
    for vm_id, entry in unpinned.items():
        at = f"placement.unpinned.{vm_id}"
        r.text(vm_id, at, check_vm_id)
        if not isinstance(entry, dict):
            r.fail(at, "must be an object")
        constraints = entry.get("constraints", {})
        if not isinstance(constraints, dict):
            r.fail(f"{at}.constraints", "must be an object")
        for key, value in constraints.items():
            r.text(key, f"{at}.constraints", check_label_key)
            r.text(value, f"{at}.constraints.{key}", check_label_value)
        spread = entry.get("spread", "")
        if spread:
            r.text(spread, f"{at}.spread", check_group_name)
        lost = entry.get("on_worker_lost")
        if lost not in _ON_WORKER_LOST:
            r.fail(
                f"{at}.on_worker_lost", f"must be one of {sorted(_ON_WORKER_LOST)}, not {lost!r}"
            )
        rules[vm_id] = decode_rules(json.dumps(entry))
    return PlacementRecord(rules, strategies[strategy])
