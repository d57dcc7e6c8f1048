"""Values the store keeps as text or bytes: diffs (replayed to a retried
apply), worker info and VM statuses (JSON, so a newer release's extra field
is kept by no column change and ignored by an older one)."""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from typing import Any

from procurator.core.models import (
    Capacity,
    Phase,
    PowerChange,
    PowerState,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
)

__all__ = [
    "decode_diffs",
    "decode_info",
    "decode_vm_status",
    "encode_diffs",
    "encode_info",
    "encode_vm_status",
]

_POWER = {p.value: p for p in PowerState}
_PHASE = {p.value: p for p in Phase}


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
    )


def encode_vm_status(vm: VmStatus) -> str:
    return _dump(
        {
            "phase": vm.phase.value,
            "hash": vm.observed_hash,
            "message": vm.message,
            "restarts": vm.restarts,
            "address": vm.address,
            "power": vm.observed_power.value,
            "op": vm.op_id,
        }
    )


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
    )
