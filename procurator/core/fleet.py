"""Fleet files: parse, validate, diff.

A fleet file names, per worker, the VMs it should run::

    [workers.host-a]
    vms = [ { id = "web-1", image = "/nix/store/<32 chars>-web-vm" } ]

TOML and JSON (what ``nix eval --json`` emits) share one structure. The whole
file is checked before anything is stored: every problem is collected (not
only the first) and reported with where it is (``workers.host-a.vms[2].id``
and, for TOML and JSON, the line). The same ``validate_fleet`` runs again on
the master for fleets that arrive over the wire, so no client can bypass it.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from typing import Any

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.models import (
    Assignment,
    Fleet,
    PowerChange,
    PowerState,
    VmAssignment,
    WorkerDiff,
)
from procurator.core.validation import (
    LIMITS,
    check_hash,
    check_store_path,
    check_vm_id,
    check_worker_id,
    default_hash,
)

__all__ = ["diff_assignments", "diff_fleets", "parse_fleet", "validate_fleet"]

_VM_KEYS = {"id", "image", "hash", "power", "vcpus", "memory_mib"}
_POWER = {p.value: p for p in PowerState}


class _Problems:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = text.splitlines()
        self.items: list[str] = []

    def line_of(self, needle: str) -> int | None:
        """Best effort: the first line that mentions ``needle`` (an id)."""
        if not needle:
            return None
        # Quoted ("web-1", 'web-1') or as a TOML table name ([workers.host-a]).
        quoted = re.escape(needle)
        pattern = re.compile(rf"[\"']{quoted}[\"']|\[workers\.{quoted}[\].]")
        for number, line in enumerate(self._lines, 1):
            if pattern.search(line):
                return number
        return None

    def add(self, where: str, problem: str, *, near: str = "") -> None:
        line = self.line_of(near)
        prefix = f"{self.source}:{line}: " if line else f"{self.source}: " if self.source else ""
        self.items.append(f"{prefix}{where}: {problem}")


def parse_fleet(text: str, *, fmt: str = "toml", source: str = "") -> Fleet:
    """Parse and validate a fleet file. Raises ``ValidationError`` listing
    every problem; returns a ``Fleet`` sorted by worker id otherwise."""
    if len(text.encode()) > LIMITS.max_fleet_file_bytes:
        raise LimitExceededError(f"fleet file is larger than {LIMITS.max_fleet_file_bytes} bytes")
    duplicates: list[str] = []

    def json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # JSON allows repeated keys (the last silently wins); a fleet file
        # that names a worker or a key twice is a mistake, as it is in TOML.
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                duplicates.append(key)
            obj[key] = value
        return obj

    try:
        if fmt == "toml":
            data: Any = tomllib.loads(text)
        elif fmt == "json":
            data = json.loads(text, object_pairs_hook=json_object)
        else:
            raise ValueError(f"unknown fleet format {fmt!r}")
    except tomllib.TOMLDecodeError as exc:
        raise ValidationError(f"{source or 'fleet'}: not valid TOML: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"{source or 'fleet'}:{exc.lineno}: not valid JSON: {exc.msg}"
        ) from None
    problems = _Problems(source, text)
    for key in duplicates:
        problems.add(str(key), "key given more than once", near=key)
    fleet = _from_data(data, problems)
    if problems.items:
        raise ValidationError(
            f"{source or 'fleet'}: {len(problems.items)} problem(s), nothing was applied",
            details=problems.items,
        )
    return fleet


def _from_data(data: Any, problems: _Problems) -> Fleet:
    if not isinstance(data, dict):
        problems.add("(top level)", "must be a table/object with a 'workers' key")
        return Fleet()
    for key in data:
        if key != "workers":
            problems.add(str(key), "unknown key (only 'workers' is allowed at the top level)")
    workers = data.get("workers", {})
    if not isinstance(workers, dict):
        problems.add("workers", "must be a table/object keyed by worker id")
        return Fleet()
    result: list[tuple[str, tuple[VmAssignment, ...]]] = []
    for worker_id, body in workers.items():
        where = f"workers.{worker_id}"
        if (problem := check_worker_id(worker_id)) is not None:
            problems.add(where, problem, near=str(worker_id))
            continue
        if not isinstance(body, dict):
            problems.add(where, "must be a table/object with a 'vms' list", near=worker_id)
            continue
        for key in body:
            if key != "vms":
                problems.add(f"{where}.{key}", "unknown key (only 'vms' is allowed)", near=key)
        entries = body.get("vms", [])
        if not isinstance(entries, list):
            problems.add(f"{where}.vms", "must be a list of VM entries", near=worker_id)
            continue
        vms = []
        for index, entry in enumerate(entries):
            vm = _vm_from_data(entry, f"{where}.vms[{index}]", problems)
            if vm is not None:
                vms.append(vm)
        result.append((worker_id, tuple(sorted(vms, key=lambda v: v.id))))
    fleet = Fleet(tuple(sorted(result)))
    _check_fleet_wide(fleet, problems)
    return fleet


def _int_field(
    entry: Mapping[str, Any], key: str, lo: int, hi: int, where: str, problems: _Problems, near: str
) -> int:
    value = entry.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(f"{where}.{key}", f"must be an integer, not {value!r}", near=near)
        return 0
    if value != 0 and not lo <= value <= hi:
        problems.add(f"{where}.{key}", f"{value} is out of range {lo}..{hi}", near=near)
        return 0
    return value


def _vm_from_data(entry: Any, where: str, problems: _Problems) -> VmAssignment | None:
    if not isinstance(entry, dict):
        problems.add(where, "must be a table/object like { id = ..., image = ... }")
        return None
    vm_id = entry.get("id")
    near = vm_id if isinstance(vm_id, str) else ""
    ok = True
    for key in entry:
        if key not in _VM_KEYS:
            problems.add(
                f"{where}.{key}",
                f"unknown key (allowed: {', '.join(sorted(_VM_KEYS))})",
                near=near,
            )
            ok = False
    if (problem := check_vm_id(vm_id)) is not None:
        problems.add(f"{where}.id", "missing" if vm_id is None else problem, near=near)
        ok = False
    image = entry.get("image")
    if (problem := check_store_path(image)) is not None:
        problems.add(f"{where}.image", "missing" if image is None else problem, near=near)
        ok = False
    power_text = entry.get("power", "running")
    power = _POWER.get(power_text) if isinstance(power_text, str) else None
    if power is None:
        problems.add(f"{where}.power", f"{power_text!r} is not one of {sorted(_POWER)}", near=near)
        ok = False
    vcpus = _int_field(entry, "vcpus", 1, LIMITS.max_vcpus, where, problems, near)
    memory = _int_field(
        entry, "memory_mib", LIMITS.min_memory_mib, LIMITS.max_memory_mib, where, problems, near
    )
    explicit_hash = entry.get("hash")
    if explicit_hash is not None and (problem := check_hash(explicit_hash)) is not None:
        problems.add(f"{where}.hash", problem, near=near)
        ok = False
    if not ok or power is None:
        return None
    assert isinstance(vm_id, str) and isinstance(image, str)
    return VmAssignment(
        id=vm_id,
        hash=explicit_hash if explicit_hash is not None else default_hash(image, vcpus, memory),
        nix_store_path=image,
        power=power,
        vcpus=vcpus,
        memory_mib=memory,
    )


def _check_fleet_wide(fleet: Fleet, problems: _Problems) -> None:
    if len(fleet.workers) > LIMITS.max_workers:
        problems.add(
            "workers", f"{len(fleet.workers)} workers exceed the limit of {LIMITS.max_workers}"
        )
    seen: dict[str, str] = {}
    total = 0
    for worker_id, vms in fleet.workers:
        total += len(vms)
        if len(vms) > LIMITS.max_vms_per_worker:
            problems.add(
                f"workers.{worker_id}.vms",
                f"{len(vms)} VMs exceed the limit of {LIMITS.max_vms_per_worker} per worker",
                near=worker_id,
            )
        for vm in vms:
            if vm.id in seen:
                other = seen[vm.id]
                problems.add(
                    f"workers.{worker_id}.vms",
                    f"VM id {vm.id!r} is used more than once"
                    + (f" (also on worker {other!r})" if other != worker_id else ""),
                    near=vm.id,
                )
            else:
                seen[vm.id] = worker_id
    if total > LIMITS.max_vms_total:
        problems.add("workers", f"{total} VMs exceed the fleet limit of {LIMITS.max_vms_total}")


def validate_fleet(fleet: Fleet) -> None:
    """Check a fleet built by other means (e.g. received over RPC) with the
    same rules as a parsed file. Raises ``ValidationError``."""
    problems = _Problems("", "")
    seen_workers: set[str] = set()
    for worker_id, vms in fleet.workers:
        where = f"workers.{worker_id}"
        if (problem := check_worker_id(worker_id)) is not None:
            problems.add(where, problem)
        if worker_id in seen_workers:
            problems.add(where, "worker listed more than once")
        seen_workers.add(worker_id)
        for index, vm in enumerate(vms):
            vm_where = f"{where}.vms[{index}]"
            for field_name, check, value in (
                ("id", check_vm_id, vm.id),
                ("image", check_store_path, vm.nix_store_path),
                ("hash", check_hash, vm.hash),
            ):
                if (problem := check(value)) is not None:
                    problems.add(f"{vm_where}.{field_name}", problem)
            if vm.vcpus and not 1 <= vm.vcpus <= LIMITS.max_vcpus:
                problems.add(f"{vm_where}.vcpus", f"{vm.vcpus} is out of range")
            if vm.memory_mib and not (
                LIMITS.min_memory_mib <= vm.memory_mib <= LIMITS.max_memory_mib
            ):
                problems.add(f"{vm_where}.memory_mib", f"{vm.memory_mib} is out of range")
    _check_fleet_wide(fleet, problems)
    if problems.items:
        raise ValidationError(
            f"fleet: {len(problems.items)} problem(s), nothing was applied",
            details=problems.items,
        )


def diff_assignments(
    worker_id: str, old: Iterable[VmAssignment], new: Iterable[VmAssignment]
) -> WorkerDiff:
    """How one worker's VM list changes. A VM is *replaced* when its hash
    changes; a power change alone never replaces it."""
    before = {vm.id: vm for vm in old}
    after = {vm.id: vm for vm in new}
    added, replaced, updated = [], [], []
    power: list[PowerChange] = []
    for vm_id, vm in after.items():
        prev = before.get(vm_id)
        if prev is None:
            added.append(vm_id)
            continue
        if prev.hash != vm.hash:
            replaced.append(vm_id)
            continue
        if prev.power != vm.power:
            power.append(PowerChange(vm_id, prev.power, vm.power))
        if (prev.nix_store_path, prev.vcpus, prev.memory_mib) != (
            vm.nix_store_path,
            vm.vcpus,
            vm.memory_mib,
        ):
            updated.append(vm_id)
    removed = [vm_id for vm_id in before if vm_id not in after]
    return WorkerDiff(
        worker_id=worker_id,
        added=tuple(sorted(added)),
        replaced=tuple(sorted(replaced)),
        removed=tuple(sorted(removed)),
        power_changed=tuple(sorted(power, key=lambda c: c.vm_id)),
        updated=tuple(sorted(updated)),
    )


def diff_fleets(old: Mapping[str, Assignment], new: Fleet) -> list[WorkerDiff]:
    """Per-worker diffs between the current assignments and a new fleet, for
    every worker whose assignment changes (workers absent from ``new`` lose
    all their VMs)."""
    new_map = new.as_dict()
    diffs = []
    for worker_id in sorted(set(old) | set(new_map)):
        current = old[worker_id].vms if worker_id in old else ()
        diff = diff_assignments(worker_id, current, new_map.get(worker_id, ()))
        if not diff.empty:
            diffs.append(diff)
    return diffs
