"""Fleet files: parse, validate, diff, and resolve a placement into them.

A fleet file names, per worker, the VMs pinned to it, and lists the VMs the
scheduler places (``core.placement``; docs/SCHEDULING.md)::

    [workers.host-a]
    vms = [ { id = "web-1", image = "/nix/store/<32 chars>-web-vm" } ]

    [placement]
    strategy = "binpack"          # or "spread"

    [[vms]]
    id = "web-7"
    image = "/nix/store/<32 chars>-web-vm"
    vcpus = 4                     # required for unpinned VMs
    memory_mib = 8192             # required for unpinned VMs
    constraints = { zone = "b" }  # worker labels that must match
    spread = "web"                # VMs of a group go to different workers
    on_worker_lost = "reschedule" # or "wait"
    rollout = { max_parallel = 2 } # this VM's own rollout settings

    [rollout]                     # replaced VMs roll (docs/ROLLOUTS.md)
    max_parallel = 5              # per spread group, VMs being replaced at once
    health = { http = "/healthz", port = 8080, expect = 200 }  # or { tcp = 22 }, "none"
    min_healthy_time = "10s"      # passed continuously this long: healthy
    healthy_deadline = "5m"       # not healthy by then: the rollout fails
    canary = 1                    # the first N of each group, then a pause
    auto_revert = true
    auto_promote = false

    [rollout.groups.web]          # a spread group's own settings
    max_parallel = 2

Durations are seconds (a number) or a string with a unit: "500ms", "10s",
"5m", "1h". An override (a group's, a VM's) takes the fleet-wide settings
and changes the keys it names; a VM's wins over its group's. Rollouts are
opted into: a VM is replaced by a rollout when the file has a
``[rollout]`` section (even an empty one: the defaults), or the VM or its
group has its own settings; other VMs are replaced at once, as before.

TOML and JSON (what ``nix eval --json`` emits) share one structure. The whole
file is checked before anything is stored: every problem is collected (not
only the first) and reported with where it is (``workers.host-a.vms[2].id``,
``vms[3].constraints.zone`` and, for TOML and JSON, the line). The same
``validate_fleet`` runs again on the master for fleets that arrive over the
wire, so no client can bypass it.

Unpinned VMs (``[[vms]]``, ``[placement]``) travel whole to the master,
which places them (``procurator.master.scheduling``, docs/SCHEDULING.md).

Invariants: VM ids are unique across pinned and unpinned VMs; a ``Fleet``
has its workers sorted by id, each worker's VMs and the unpinned VMs sorted
by VM id, constraints sorted by key. ``diff_fleets`` takes only a resolved
fleet (no unpinned VMs): ``resolve_fleet`` merges a placement into it.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.models import (
    Assignment,
    Fleet,
    HealthCheck,
    HealthKind,
    OnWorkerLost,
    Placement,
    PlacementPolicy,
    PlacementStrategy,
    PowerChange,
    PowerState,
    RolloutPolicy,
    UnpinnedVm,
    VmAssignment,
    WorkerDiff,
)
from procurator.core.validation import (
    LIMITS,
    MAX_HTTP_PATH_LENGTH,
    check_group_name,
    check_hash,
    check_http_path,
    check_label_key,
    check_label_value,
    check_store_path,
    check_vm_id,
    check_worker_id,
    default_hash,
)

__all__ = [
    "diff_assignments",
    "diff_fleets",
    "parse_fleet",
    "resolve_fleet",
    "validate_fleet",
]

_TOP_KEYS = ("workers", "vms", "placement", "rollout")
_VM_KEYS = frozenset({"id", "image", "hash", "power", "vcpus", "memory_mib", "rollout"})
_UNPINNED_KEYS = _VM_KEYS | {"constraints", "spread", "on_worker_lost"}
_POWER = {p.value: p for p in PowerState}
_ON_WORKER_LOST = {o.value: o for o in OnWorkerLost}
_STRATEGY = {s.value: s for s in PlacementStrategy}


class _Problems:
    def __init__(self, source: str, text: str) -> None:
        self.source = source
        self._lines = text.splitlines()
        self.items: list[str] = []
        # Some problem is a limit exceeded: the file is refused with
        # ``LimitExceededError`` (every problem listed), as the same limit met
        # on the wire is, so a client tells "too big" from "wrong" by the class.
        self.over_limit = False

    def error(self, what: str) -> ValidationError:
        """The refusal listing every problem (see ``over_limit``)."""
        kind = LimitExceededError if self.over_limit else ValidationError
        return kind(
            f"{what}: {len(self.items)} problem(s), nothing was applied", details=self.items
        )

    def line_of(self, needle: str) -> int | None:
        """Best effort: the first line that mentions ``needle`` (an id)."""
        if not needle:
            return None
        # Quoted ("web-1", 'web-1') or as a TOML table name ([workers.host-a],
        # [placement], [[vms]]).
        quoted = re.escape(needle)
        pattern = re.compile(
            rf"[\"']{quoted}[\"']|\[workers\.{quoted}[\].]|^\s*\[\[?\s*{quoted}\s*\]"
        )
        for number, line in enumerate(self._lines, 1):
            if pattern.search(line):
                return number
        return None

    def add(self, where: str, problem: str, *, near: str = "", limit: bool = False) -> None:
        self.over_limit |= limit
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
        raise problems.error(f"{source or 'fleet'}")
    return fleet


def _from_data(data: Any, problems: _Problems) -> Fleet:
    if not isinstance(data, dict):
        problems.add("(top level)", "must be a table/object with a 'workers' key")
        return Fleet()
    for key in data:
        if key not in _TOP_KEYS:
            problems.add(
                str(key),
                f"unknown key (allowed at the top level: {', '.join(_TOP_KEYS)})",
                near=str(key),
            )
    pinned = _pinned_from_data(data.get("workers", {}), problems)
    unpinned = _unpinned_from_data(data.get("vms", []), problems)
    policy = _policy_from_data(data.get("placement", {}), problems)
    rollout, groups, per_vm = _rollouts_from_data(data, problems)
    fleet = Fleet(pinned, unpinned, policy, rollout, groups, per_vm)
    _check_fleet_wide(fleet, problems)
    return fleet


def _pinned_from_data(
    workers: Any, problems: _Problems
) -> tuple[tuple[str, tuple[VmAssignment, ...]], ...]:
    if not isinstance(workers, dict):
        problems.add("workers", "must be a table/object keyed by worker id")
        return ()
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
    return tuple(sorted(result))


def _unpinned_from_data(entries: Any, problems: _Problems) -> tuple[UnpinnedVm, ...]:
    if not isinstance(entries, list):
        problems.add("vms", "must be a list of VM entries ([[vms]] tables)", near="vms")
        return ()
    result = []
    for index, entry in enumerate(entries):
        vm = _unpinned_vm_from_data(entry, f"vms[{index}]", problems)
        if vm is not None:
            result.append(vm)
    return tuple(sorted(result, key=lambda u: u.id))


def _policy_from_data(section: Any, problems: _Problems) -> PlacementPolicy:
    if not isinstance(section, dict):
        problems.add(
            "placement", "must be a table/object like { strategy = ... }", near="placement"
        )
        return PlacementPolicy()
    for key in section:
        if key != "strategy":
            problems.add(
                f"placement.{key}",
                "unknown key (only 'strategy' is allowed; overcommit ratios are set in each "
                "worker's configuration)",
                near="placement",
            )
    text = section.get("strategy", PlacementStrategy.BINPACK.value)
    strategy = _STRATEGY.get(text) if isinstance(text, str) else None
    if strategy is None:
        problems.add(
            "placement.strategy",
            f"{text!r} is not one of {sorted(_STRATEGY)}",
            near=text if isinstance(text, str) else "placement",
        )
        return PlacementPolicy()
    return PlacementPolicy(strategy)


_ROLLOUT_KEYS = (
    "max_parallel",
    "health",
    "min_healthy_time",
    "healthy_deadline",
    "canary",
    "auto_revert",
    "auto_promote",
)
_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)\s*$")
# Bounds of the rollout settings (ms for durations).
_MAX_PARALLEL = 10_000
_MAX_MIN_HEALTHY_MS = 3_600_000
_MAX_DEADLINE_MS = 86_400_000


def _duration_ms(value: Any) -> int | None:
    """Seconds (a number) or "<number><ms|s|m|h>" in ms; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return round(value * 1000) if value >= 0 else None
    if isinstance(value, str) and (match := _DURATION.match(value)):
        return round(float(match[1]) * _UNITS_MS[match[2]])
    return None


def _rollouts_from_data(
    data: Mapping[str, Any], problems: _Problems
) -> tuple[
    RolloutPolicy | None,
    tuple[tuple[str, RolloutPolicy], ...],
    tuple[tuple[str, RolloutPolicy], ...],
]:
    """``[rollout]`` (None: the file has none), its ``groups`` and each VM
    entry's ``rollout``."""
    section = data.get("rollout", {})
    if not isinstance(section, dict):
        problems.add(
            "rollout", "must be a table/object like { max_parallel = ... }", near="rollout"
        )
        section = {}
    fleet_wide = _rollout_from_data(
        {k: v for k, v in section.items() if k != "groups"}, "rollout", RolloutPolicy(), problems
    )
    given = fleet_wide if "rollout" in data else None
    groups: list[tuple[str, RolloutPolicy]] = []
    raw_groups = section.get("groups", {})
    if not isinstance(raw_groups, dict):
        problems.add(
            "rollout.groups", "must be a table/object keyed by spread group", near="groups"
        )
        raw_groups = {}
    raw_vms = data.get("vms")
    used = {
        entry.get("spread")
        for entry in (raw_vms if isinstance(raw_vms, list) else [])
        if isinstance(entry, dict)
    }
    for name, body in raw_groups.items():
        where = f"rollout.groups.{name}"
        if (problem := check_group_name(name)) is not None:
            problems.add(where, problem, near=str(name))
            continue
        if name not in used:
            problems.add(where, "no VM is in this spread group (a typo?)", near=str(name))
        groups.append((name, _rollout_from_data(body, where, fleet_wide, problems, near=name)))
    per_vm: list[tuple[str, RolloutPolicy]] = []
    workers = data.get("workers")
    entries: list[tuple[str, Any]] = []
    if isinstance(workers, dict):
        for worker_id, body in workers.items():
            if isinstance(body, dict) and isinstance(body.get("vms"), list):
                entries.extend(
                    (f"workers.{worker_id}.vms[{i}]", e) for i, e in enumerate(body["vms"])
                )
    if isinstance(data.get("vms"), list):
        entries.extend((f"vms[{i}]", e) for i, e in enumerate(data["vms"]))
    by_group = dict(groups)
    for where, entry in entries:
        if not isinstance(entry, dict) or "rollout" not in entry:
            continue
        vm_id = entry.get("id")
        if not isinstance(vm_id, str):
            continue  # reported with the entry
        group = entry.get("spread")
        base = by_group.get(group, fleet_wide) if isinstance(group, str) else fleet_wide
        per_vm.append(
            (vm_id, _rollout_from_data(entry["rollout"], f"{where}.rollout", base, problems, vm_id))
        )
    return given, tuple(sorted(groups)), tuple(sorted(per_vm))


def _rollout_from_data(
    section: Any, where: str, base: RolloutPolicy, problems: _Problems, near: str = "rollout"
) -> RolloutPolicy:
    """``base`` with the keys ``section`` names."""
    if not isinstance(section, dict):
        problems.add(where, "must be a table/object like { max_parallel = ... }", near=near)
        return base
    for key in section:
        if key not in _ROLLOUT_KEYS:
            problems.add(
                f"{where}.{key}", f"unknown key (allowed: {', '.join(_ROLLOUT_KEYS)})", near=near
            )

    def count(key: str, lo: int, fallback: int) -> int:
        value = section.get(key, fallback)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not lo <= value <= _MAX_PARALLEL
        ):
            problems.add(
                f"{where}.{key}",
                f"must be an integer in {lo}..{_MAX_PARALLEL}, not {value!r}",
                near=near,
            )
            return fallback
        return value

    def flag(key: str, fallback: bool) -> bool:
        value = section.get(key, fallback)
        if not isinstance(value, bool):
            problems.add(f"{where}.{key}", f"must be true or false, not {value!r}", near=near)
            return fallback
        return value

    policy = replace(
        base,
        max_parallel=count("max_parallel", 1, base.max_parallel),
        canary=count("canary", 0, base.canary),
        auto_revert=flag("auto_revert", base.auto_revert),
        auto_promote=flag("auto_promote", base.auto_promote),
    )
    health = policy.health
    if "health" in section:
        # A new check keeps the inherited min_healthy_time unless it is given.
        check = _health_from_data(section["health"], f"{where}.health", problems, near)
        health = replace(check, min_healthy_ms=health.min_healthy_ms)
    if "min_healthy_time" in section:
        ms = _duration_ms(section["min_healthy_time"])
        if ms is None or ms > _MAX_MIN_HEALTHY_MS:
            problems.add(
                f"{where}.min_healthy_time",
                f'must be a duration of at most 1h (seconds, or like "10s"), '
                f"not {section['min_healthy_time']!r}",
                near=near,
            )
        else:
            health = replace(health, min_healthy_ms=ms)
    policy = replace(policy, health=health)
    if "healthy_deadline" in section:
        ms = _duration_ms(section["healthy_deadline"])
        if ms is None or not 1000 <= ms <= _MAX_DEADLINE_MS:
            problems.add(
                f"{where}.healthy_deadline",
                f'must be a duration from 1s to 24h (seconds, or like "5m"), '
                f"not {section['healthy_deadline']!r}",
                near=near,
            )
        else:
            policy = replace(policy, healthy_deadline_ms=ms)
    if policy.health.min_healthy_ms >= policy.healthy_deadline_ms:
        problems.add(
            where,
            f"min_healthy_time ({policy.health.min_healthy_ms / 1000:g} s) must be shorter than "
            f"healthy_deadline ({policy.healthy_deadline_ms / 1000:g} s): no VM could be healthy "
            "in time",
            near=near,
        )
    return policy


def _health_from_data(value: Any, where: str, problems: _Problems, near: str) -> HealthCheck:
    """ "none", { tcp = PORT }, or { http = PATH, port = PORT, expect = STATUS };
    an ``interval`` duration in either table."""
    keep = HealthCheck()
    if value == "none":
        return keep
    shape = '"none", { tcp = 22 } or { http = "/healthz", port = 8080, expect = 200 }'
    if not isinstance(value, dict) or ("tcp" in value) == ("http" in value):
        # A kind this release does not know is refused, never read as
        # "none": that would take the rollout's health gate away unseen.
        named = [value] if isinstance(value, str) else []
        if isinstance(value, dict) and "tcp" not in value and "http" not in value:
            named = [k for k in value if k not in ("port", "expect", "interval")]
        unknown = [k for k in named if k not in {kind.value for kind in HealthKind}]
        why = f" (unknown health check kind {unknown[0]!r})" if len(unknown) == 1 else ""
        problems.add(where, f"must be {shape}, not {value!r}{why}", near=near)
        return keep
    allowed = {"tcp", "interval"} if "tcp" in value else {"http", "port", "expect", "interval"}
    for key in value:
        if key not in allowed:
            problems.add(
                f"{where}.{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})", near=near
            )
    interval = 0
    if "interval" in value:
        ms = _duration_ms(value["interval"])
        if ms is None or not 100 <= ms <= _MAX_MIN_HEALTHY_MS:
            problems.add(
                f"{where}.interval",
                f"must be a duration from 100ms to 1h, not {value['interval']!r}",
                near=near,
            )
        else:
            interval = ms
    port_key = "tcp" if "tcp" in value else "port"
    port = value.get(port_key)
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        problems.add(
            f"{where}.{port_key}", f"must be a port number 1..65535, not {port!r}", near=near
        )
        port = 0
    if "tcp" in value:
        return HealthCheck(HealthKind.TCP, port, interval_ms=interval)
    path = value["http"]
    if not isinstance(path, str) or check_http_path(path) is not None:
        problems.add(
            f"{where}.http",
            f"must be a URL path starting with '/' (at most {MAX_HTTP_PATH_LENGTH} characters, "
            f"no spaces or control characters), not {path!r}",
            near=near,
        )
        path = "/"
    expect = value.get("expect", 200)
    if isinstance(expect, bool) or not isinstance(expect, int) or not 100 <= expect <= 599:
        problems.add(
            f"{where}.expect", f"must be an HTTP status 100..599, not {expect!r}", near=near
        )
        expect = 200
    return HealthCheck(HealthKind.HTTP, port, path, expect, interval_ms=interval)


def _int_field(
    entry: Mapping[str, Any],
    key: str,
    lo: int,
    hi: int,
    where: str,
    problems: _Problems,
    near: str,
    *,
    zero_ok: bool = True,
) -> int:
    """``entry[key]`` within ``lo..hi``; 0 (also when absent) means "as the
    image says" unless ``zero_ok`` is false."""
    value = entry.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(f"{where}.{key}", f"must be an integer, not {value!r}", near=near)
        return 0
    if (value != 0 or not zero_ok) and not lo <= value <= hi:
        problems.add(f"{where}.{key}", f"{value} is out of range {lo}..{hi}", near=near)
        return 0
    return value


def _vm_from_data(
    entry: Any,
    where: str,
    problems: _Problems,
    *,
    keys: frozenset[str] = _VM_KEYS,
    resources_required: bool = False,
) -> VmAssignment | None:
    if not isinstance(entry, dict):
        problems.add(where, "must be a table/object like { id = ..., image = ... }")
        return None
    vm_id = entry.get("id")
    near = vm_id if isinstance(vm_id, str) else ""
    ok = True
    for key in entry:
        if key not in keys:
            problems.add(
                f"{where}.{key}",
                f"unknown key (allowed: {', '.join(sorted(keys))})",
                near=near,
            )
            ok = False
    if resources_required:
        for key in ("vcpus", "memory_mib"):
            if key not in entry:
                problems.add(
                    f"{where}.{key}", "missing (required for a VM the scheduler places)", near=near
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
    # A VM the scheduler places must say what it needs: no 0 ("the image's");
    # a missing one is reported above, once.
    zero_ok = not resources_required or "vcpus" not in entry
    vcpus = _int_field(entry, "vcpus", 1, LIMITS.max_vcpus, where, problems, near, zero_ok=zero_ok)
    memory = _int_field(
        entry,
        "memory_mib",
        LIMITS.min_memory_mib,
        LIMITS.max_memory_mib,
        where,
        problems,
        near,
        zero_ok=not resources_required or "memory_mib" not in entry,
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


def _unpinned_vm_from_data(entry: Any, where: str, problems: _Problems) -> UnpinnedVm | None:
    vm = _vm_from_data(entry, where, problems, keys=_UNPINNED_KEYS, resources_required=True)
    if not isinstance(entry, dict):
        return None
    near = entry["id"] if isinstance(entry.get("id"), str) else ""
    ok = True
    constraints = _constraints_from_data(entry.get("constraints", {}), where, problems, near)
    if constraints is None:
        ok = False
    spread = entry.get("spread", "")
    if "spread" in entry and (problem := check_group_name(spread)) is not None:
        problems.add(f"{where}.spread", problem, near=near)
        ok = False
    lost_text = entry.get("on_worker_lost", OnWorkerLost.RESCHEDULE.value)
    on_lost = _ON_WORKER_LOST.get(lost_text) if isinstance(lost_text, str) else None
    if on_lost is None:
        problems.add(
            f"{where}.on_worker_lost",
            f"{lost_text!r} is not one of {sorted(_ON_WORKER_LOST)}",
            near=near,
        )
        ok = False
    if vm is None or not ok:
        return None
    assert constraints is not None and on_lost is not None and isinstance(spread, str)
    return UnpinnedVm(vm, constraints, spread, on_lost)


def _constraints_from_data(
    value: Any, where: str, problems: _Problems, near: str
) -> tuple[tuple[str, str], ...] | None:
    if not isinstance(value, dict):
        problems.add(
            f"{where}.constraints",
            'must be a table/object of worker labels, like { zone = "b" }',
            near=near,
        )
        return None
    ok = True
    if len(value) > LIMITS.max_labels:
        problems.add(
            f"{where}.constraints",
            f"{len(value)} constraints exceed the limit of {LIMITS.max_labels}",
            near=near,
            limit=True,
        )
        ok = False
    for key, label in value.items():
        if (problem := check_label_key(key)) is not None:
            problems.add(f"{where}.constraints", problem, near=near)
            ok = False
        elif (problem := check_label_value(label)) is not None:
            problems.add(f"{where}.constraints.{key}", problem, near=near)
            ok = False
    return tuple(sorted(value.items())) if ok else None


def _check_fleet_wide(fleet: Fleet, problems: _Problems) -> None:
    if len(fleet.workers) > LIMITS.max_workers:
        problems.add(
            "workers",
            f"{len(fleet.workers)} workers exceed the limit of {LIMITS.max_workers}",
            limit=True,
        )
    seen: dict[str, str] = {}
    total = len(fleet.unpinned)
    for worker_id, vms in fleet.workers:
        total += len(vms)
        if len(vms) > LIMITS.max_vms_per_worker:
            problems.add(
                f"workers.{worker_id}.vms",
                f"{len(vms)} VMs exceed the limit of {LIMITS.max_vms_per_worker} per worker",
                near=worker_id,
                limit=True,
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
    for index, unpinned in enumerate(fleet.unpinned):
        if unpinned.id in seen:
            other = seen[unpinned.id]
            problems.add(
                f"vms[{index}].id",
                f"VM id {unpinned.id!r} is used more than once"
                + (f" (also pinned to worker {other!r})" if other else " (also in vms)"),
                near=unpinned.id,
            )
        else:
            seen[unpinned.id] = ""
    if total > LIMITS.max_vms_total:
        problems.add(
            "workers" if not fleet.unpinned else "vms",
            f"{total} VMs exceed the fleet limit of {LIMITS.max_vms_total}",
            limit=True,
        )


def _check_vm(vm: VmAssignment, where: str, problems: _Problems) -> None:
    for field_name, check, value in (
        ("id", check_vm_id, vm.id),
        ("image", check_store_path, vm.nix_store_path),
        ("hash", check_hash, vm.hash),
    ):
        if (problem := check(value)) is not None:
            problems.add(f"{where}.{field_name}", problem)
    if vm.vcpus and not 1 <= vm.vcpus <= LIMITS.max_vcpus:
        problems.add(f"{where}.vcpus", f"{vm.vcpus} is out of range")
    if vm.memory_mib and not (LIMITS.min_memory_mib <= vm.memory_mib <= LIMITS.max_memory_mib):
        problems.add(f"{where}.memory_mib", f"{vm.memory_mib} is out of range")


def _check_unpinned(unpinned: UnpinnedVm, where: str, problems: _Problems) -> None:
    _check_vm(unpinned.vm, where, problems)
    for key in ("vcpus", "memory_mib"):
        if not getattr(unpinned.vm, key):
            problems.add(f"{where}.{key}", "missing (required for a VM the scheduler places)")
    if len(unpinned.constraints) > LIMITS.max_labels:
        problems.add(
            f"{where}.constraints",
            f"{len(unpinned.constraints)} constraints exceed the limit of {LIMITS.max_labels}",
            limit=True,
        )
    keys = [key for key, _ in unpinned.constraints]
    if keys != sorted(set(keys)):
        problems.add(f"{where}.constraints", "keys must be unique and sorted")
    for key, value in unpinned.constraints:
        if (problem := check_label_key(key) or check_label_value(value)) is not None:
            problems.add(f"{where}.constraints", problem)
    if unpinned.spread and (problem := check_group_name(unpinned.spread)) is not None:
        problems.add(f"{where}.spread", problem)


def _check_rollouts(fleet: Fleet, problems: _Problems) -> None:
    """A fleet's rollout settings within the bounds a fleet file has."""
    policies = [("rollout", fleet.rollout)] if fleet.rollout is not None else []
    policies += [(f"rollout.groups.{name}", p) for name, p in fleet.group_rollouts]
    policies += [(f"rollout of VM {vm_id}", p) for vm_id, p in fleet.vm_rollouts]
    for where, policy in policies:
        health = policy.health
        if not 1 <= policy.max_parallel <= _MAX_PARALLEL:
            problems.add(where, f"max_parallel {policy.max_parallel} is out of range")
        if not 0 <= policy.canary <= _MAX_PARALLEL:
            problems.add(where, f"canary {policy.canary} is out of range")
        if not 1000 <= policy.healthy_deadline_ms <= _MAX_DEADLINE_MS:
            problems.add(where, f"healthy_deadline {policy.healthy_deadline_ms} ms is out of range")
        if not 0 <= health.min_healthy_ms < policy.healthy_deadline_ms:
            problems.add(where, "min_healthy_time must be shorter than healthy_deadline")
        if health.kind is not HealthKind.NONE and not 1 <= health.port <= 65535:
            problems.add(where, f"health check port {health.port} is out of range")
        if health.kind is HealthKind.HTTP and (problem := check_http_path(health.path)):
            problems.add(where, f"health check path: {problem}")


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
            _check_vm(vm, f"{where}.vms[{index}]", problems)
    for index, unpinned in enumerate(fleet.unpinned):
        _check_unpinned(unpinned, f"vms[{index}]", problems)
    _check_rollouts(fleet, problems)
    _check_fleet_wide(fleet, problems)
    if problems.items:
        raise problems.error("fleet")


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
    all their VMs). ``new`` must be resolved: its unpinned VMs placed
    (``resolve_fleet``), else they would count as removed."""
    if new.unpinned:
        raise ValueError(
            f"diff_fleets needs a resolved fleet: {len(new.unpinned)} unpinned VM(s) are not "
            "placed (core.placement.place, then resolve_fleet)"
        )
    new_map = new.as_dict()
    diffs = []
    for worker_id in sorted(set(old) | set(new_map)):
        current = old[worker_id].vms if worker_id in old else ()
        wanted = new_map.get(worker_id, ())
        if current is wanted:
            # The very list the assignment was made from (a fleet patch
            # shares the unchanged parts' lists): no change, and a diff of
            # it would cost O(its VMs) for nothing.
            continue
        diff = diff_assignments(worker_id, current, wanted)
        if not diff.empty:
            diffs.append(diff)
    return diffs


def resolve_fleet(fleet: Fleet, placement: Placement) -> Fleet:
    """The fleet with every unpinned VM pinned where ``placement`` puts it:
    what the master assigns, diffs and stores. ``placement`` must be the
    answer of ``place`` for this fleet (every unpinned VM, nothing else);
    ``ValueError`` otherwise."""
    where = placement.as_dict()
    unpinned_ids = {u.id for u in fleet.unpinned}
    if set(where) != unpinned_ids:
        missing = sorted(unpinned_ids - set(where))[:5]
        extra = sorted(set(where) - unpinned_ids)[:5]
        raise ValueError(
            f"the placement is not this fleet's: unplaced {missing}, not in the fleet {extra}"
        )
    merged: dict[str, list[VmAssignment]] = {w: list(vms) for w, vms in fleet.workers}
    for unpinned in fleet.unpinned:
        merged.setdefault(where[unpinned.id], []).append(unpinned.vm)
    workers = tuple(
        (worker_id, tuple(sorted(vms, key=lambda v: v.id)))
        for worker_id, vms in sorted(merged.items())
    )
    return replace(fleet, workers=workers, unpinned=())
