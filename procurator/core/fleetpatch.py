"""Fleet patches: an apply that carries only the parts of the fleet that changed.

A fleet file is cut into **parts**: one per worker (its pinned VMs, named by
the worker id) and the *settings* part (named ``""``: the unpinned VMs, the
placement strategy and the rollout settings). Each part has a **digest**,
SHA-256 of its canonical JSON (below), computed the same way by the client
and the master. A patched apply (``Control.applyPatch``) lists every part of
the client's fleet with its digest and carries the contents of some of them;
the master takes the others from the parts of the fleet it last applied
(``FleetParts``, keyed by digest), and answers which parts it does not hold
(``missing``; nothing is applied) so the client sends those. The fleet the
master assembles is exactly the client's file whatever the master applied in
between: parts are content-addressed, so a stale cache costs a resend, never
a merge. Everything after the assembly (placement, the diff, rollouts, the
commit, request ids) is the whole apply's own path.

Canonical JSON (``separators=(",", ":")``, UTF-8):

- a worker part: ``[worker_id, [[id, hash, image, power, vcpus,
  memory_mib], ...]]``, VMs sorted by id;
- the settings part: ``[unpinned, strategy, rollout, group_rollouts,
  vm_rollouts]`` where ``unpinned`` is ``[[id, hash, image, power, vcpus,
  memory_mib, [[key, value], ...], spread, on_worker_lost], ...]`` sorted by
  id, a rollout policy is ``[max_parallel, [kind, port, path, expect,
  min_healthy_ms, interval_ms], healthy_deadline_ms, canary, auto_revert,
  auto_promote]`` (``null`` for none) and the named ones ``[[name,
  policy], ...]`` sorted by name.

The whole fleet's request digest (``request_digest``, what a request id is
recorded with) is composed from the worker parts' canonical JSON, so a
patched apply and a whole apply of one file record the same digest, and it
is the digest this master recorded before patches existed.

Validation of a patch (``assemble``) keeps every rule of ``validate_fleet``:
the rules about one part (ids, images, hashes, resources, a worker's VM
count, rollout bounds) run on the parts sent only, with ``validate_fleet``
itself; the fleet-wide ones run incrementally: VM ids unique across parts
(the sent parts' VMs against an index of the cached fleet's, ``owners``),
the number of workers and of VMs (counts per part). Placement, rollouts and
quotas are the apply's and see the whole assembled fleet.

What keeps the rest of the apply per changed worker: an unchanged part is
the very list the worker's assignment was made from (the master's commit
keeps the lists it was given when no VM waits on a rollout), so the diff
passes it by identity; a fleet with no unpinned VMs skips the scheduler's
facts. What stays O(the fleet) is C-speed copying and hashing: the VM-id
index's copy, and with a request id the request digest (SHA-256 over the
parts' canonical JSON).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from procurator.core.control import ApplyResult
from procurator.core.errors import ValidationError
from procurator.core.fleet import validate_fleet
from procurator.core.models import (
    Fleet,
    PlacementPolicy,
    RolloutPolicy,
    UnpinnedVm,
    VmAssignment,
)
from procurator.core.validation import LIMITS, check_worker_id

__all__ = [
    "SETTINGS_PART",
    "Assembled",
    "FleetParts",
    "FleetPatch",
    "PatchAnswer",
    "PatchRequest",
    "assemble",
    "make_patch",
    "patch_rounds",
]

SETTINGS_PART = ""
"""The name of the settings part (worker ids are never empty)."""

_DIGEST_BYTES = 32
PATCH_ROUNDS = 3
"""Sends of one patch at most: digests only, then what the master asked
for, then once more if another apply replaced what it held in between."""


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _vm_row(vm: VmAssignment) -> list[Any]:
    return [vm.id, vm.hash, vm.nix_store_path, vm.power.value, vm.vcpus, vm.memory_mib]


def worker_json(worker_id: str, vms: Iterable[VmAssignment]) -> bytes:
    """A worker part's canonical JSON (also the worker's element of the
    request digest)."""
    return _dumps([worker_id, sorted(_vm_row(vm) for vm in vms)])


def _unpinned_rows(unpinned: Iterable[UnpinnedVm]) -> list[list[Any]]:
    return sorted(
        [
            *_vm_row(u.vm),
            [list(pair) for pair in u.constraints],
            u.spread,
            u.on_worker_lost.value,
        ]
        for u in unpinned
    )


def _policy(policy: RolloutPolicy | None) -> list[Any] | None:
    if policy is None:
        return None
    health = policy.health
    return [
        policy.max_parallel,
        [
            health.kind.value,
            health.port,
            health.path,
            health.expect,
            health.min_healthy_ms,
            health.interval_ms,
        ],
        policy.healthy_deadline_ms,
        policy.canary,
        policy.auto_revert,
        policy.auto_promote,
    ]


def settings_json(fleet: Fleet) -> bytes:
    """The settings part's canonical JSON."""
    return _dumps(
        [
            _unpinned_rows(fleet.unpinned),
            fleet.placement.strategy.value,
            _policy(fleet.rollout),
            [[name, _policy(p)] for name, p in sorted(fleet.group_rollouts, key=lambda x: x[0])],
            [[name, _policy(p)] for name, p in sorted(fleet.vm_rollouts, key=lambda x: x[0])],
        ]
    )


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class FleetParts:
    """A fleet cut into parts: what the master keeps of the fleet it last
    applied, and what a client computes of its file. Immutable; ``patched``
    makes the next one, sharing what did not change."""

    workers: Mapping[str, tuple[VmAssignment, ...]]
    settings: Fleet  # the fleet's other fields (its ``workers`` empty)
    canonical: Mapping[str, bytes]  # worker id -> its canonical JSON
    digests: Mapping[str, bytes]  # part name -> SHA-256 (settings: SETTINGS_PART)
    # VM id -> the name of the part that has it (pinned: the worker's id;
    # unpinned: SETTINGS_PART).
    owners: Mapping[str, str]

    @classmethod
    def of(cls, fleet: Fleet) -> FleetParts:
        """O(the fleet): once per whole apply, or per client."""
        canonical = {w: worker_json(w, vms) for w, vms in fleet.workers}
        digests = {w: _digest(c) for w, c in canonical.items()}
        settings = _settings_of(fleet)
        digests[SETTINGS_PART] = _digest(settings_json(settings))
        owners = {u.id: SETTINGS_PART for u in fleet.unpinned}
        for worker_id, vms in fleet.workers:
            owners.update((vm.id, worker_id) for vm in vms)
        return cls(dict(fleet.workers), settings, canonical, digests, owners)

    def fleet(self) -> Fleet:
        """The whole fleet (O(workers): the parts' tuples are shared)."""
        return Fleet(
            tuple(sorted(self.workers.items())),
            self.settings.unpinned,
            self.settings.placement,
            self.settings.rollout,
            self.settings.group_rollouts,
            self.settings.vm_rollouts,
        )

    def request_digest(self) -> str:
        """What an apply of this fleet records with its request id: equal
        to ``procurator.master.service.fleet_digest`` of the whole fleet,
        computed from the parts' canonical JSON (no re-encoding)."""
        workers = b"[" + b",".join(self.canonical[w] for w in sorted(self.canonical)) + b"]"
        settings = self.settings
        if not settings.unpinned and settings.placement == PlacementPolicy():
            # A pinned fleet's digest is what it was before unpinned VMs existed.
            return hashlib.sha256(workers).hexdigest()
        whole = b"".join(
            (
                b"[",
                workers,
                b",",
                _dumps(_unpinned_rows(settings.unpinned)),
                b",",
                _dumps(settings.placement.strategy.value),
                b"]",
            )
        )
        return hashlib.sha256(whole).hexdigest()


def _settings_of(fleet: Fleet) -> Fleet:
    return Fleet(
        (),
        fleet.unpinned,
        fleet.placement,
        fleet.rollout,
        fleet.group_rollouts,
        fleet.vm_rollouts,
    )


@dataclass(frozen=True, slots=True)
class FleetPatch:
    """``Control.applyPatch``'s fleet: every part by name and digest, sorted
    by name (the settings part first), and the contents of the parts sent:
    ``sent.workers`` are the worker parts sent, ``sent``'s other fields the
    settings part when ``settings_sent``."""

    parts: tuple[tuple[str, bytes], ...]
    sent: Fleet = field(default_factory=Fleet)
    settings_sent: bool = False


def make_patch(parts: FleetParts, send: Iterable[str] = ()) -> FleetPatch:
    """The patch of a client's fleet carrying the contents of the parts
    named in ``send`` (none: digests only, what a first attempt sends)."""
    wanted = set(send)
    unknown = wanted - parts.digests.keys()
    if unknown:
        raise ValueError(f"not parts of this fleet: {sorted(unknown)[:5]}")
    settings = parts.settings
    settings_sent = SETTINGS_PART in wanted
    sent = Fleet(
        tuple(sorted((w, parts.workers[w]) for w in wanted if w != SETTINGS_PART)),
        *(
            (
                settings.unpinned,
                settings.placement,
                settings.rollout,
                settings.group_rollouts,
                settings.vm_rollouts,
            )
            if settings_sent
            else ()
        ),
    )
    return FleetPatch(tuple(sorted(parts.digests.items())), sent, settings_sent)


@dataclass(frozen=True, slots=True)
class Assembled:
    """``assemble``'s answer: the parts of the client's whole fleet, or the
    names of the parts the master must be sent (then ``parts`` is None)."""

    parts: FleetParts | None
    missing: tuple[str, ...] = ()


def assemble(cached: FleetParts | None, patch: FleetPatch) -> Assembled:
    """The client's whole fleet from ``patch`` and the ``cached`` parts, or
    what is missing. Raises ``ValidationError`` for a patch that breaks a
    fleet rule (module docstring) or is malformed: a part listed twice or
    out of order, a bad worker id or digest, contents sent for a part not
    listed or that do not match its digest. The cost is the parts sent
    plus O(parts listed)."""
    problems: list[str] = []
    names = [name for name, _ in patch.parts]
    listed = dict(patch.parts)
    if names != sorted(listed):
        problems.append("patch.parts: names must be unique and sorted")
    if SETTINGS_PART not in listed:
        problems.append("patch.parts: the settings part (named '') is not listed")
    if len(listed) > LIMITS.max_workers + 1:
        problems.append(
            f"patch.parts: {len(listed) - 1} workers exceed the limit of {LIMITS.max_workers}"
        )
    for name, digest in patch.parts:
        if name != SETTINGS_PART and (problem := check_worker_id(name)) is not None:
            problems.append(f"patch.parts[{name!r}]: {problem}")
        if len(digest) != _DIGEST_BYTES:
            problems.append(f"patch.parts[{name!r}]: a digest is {_DIGEST_BYTES} bytes")
    _raise(problems)

    sent_names = [w for w, _ in patch.sent.workers]
    if patch.settings_sent:
        sent_names.append(SETTINGS_PART)
    elif _settings_of(patch.sent) != Fleet():
        problems.append("patch.fleet: settings sent without settingsSent")
    # The sent parts' own rules, as a fleet file's (ids, images, resources,
    # a worker's VM count, duplicates among them, rollout bounds).
    try:
        validate_fleet(patch.sent)
    except ValidationError as exc:
        problems.extend(exc.details)
    sent = FleetParts.of(patch.sent)
    sent_digests = {name: sent.digests[name] for name in sent_names}
    for name, digest in sent_digests.items():
        if name not in listed:
            problems.append(f"patch.fleet: part {name!r} is sent but not listed")
        elif digest != listed[name]:
            problems.append(f"patch.fleet: part {name!r} does not match its digest")
    _raise(problems)

    if cached is None:  # nothing held (a master that applied nothing since it started)
        cached = FleetParts({}, Fleet(), {}, {}, {})
    missing = tuple(
        name
        for name, digest in patch.parts
        if name not in sent_digests and cached.digests.get(name) != digest
    )
    if missing:
        return Assembled(None, missing)

    # Fleet-wide rules, incrementally: a sent part's VM id may be owned in
    # the cached fleet only by a part this patch replaces or drops.
    kept = [name for name in listed if name not in sent_names]
    for name in sent_names:
        vms = [u.vm for u in patch.sent.unpinned] if name == SETTINGS_PART else sent.workers[name]
        for vm in vms:
            owner = cached.owners.get(vm.id)
            if owner is not None and owner != name and owner in listed and owner not in sent_names:
                where = f"workers.{name}.vms" if name else "vms"
                other = f"worker {owner!r}" if owner else "vms"
                problems.append(
                    f"{where}: VM id {vm.id!r} is used more than once (also in {other})"
                )
    total = sum(len(sent.workers[w]) for w in sent.workers) + len(patch.sent.unpinned)
    total += sum(len(cached.workers[w]) for w in kept if w != SETTINGS_PART)
    if SETTINGS_PART in kept:
        total += len(cached.settings.unpinned)
    if total > LIMITS.max_vms_total:
        problems.append(f"workers: {total} VMs exceed the fleet limit of {LIMITS.max_vms_total}")
    _raise(problems)

    workers = {w: cached.workers[w] for w in kept if w != SETTINGS_PART}
    workers.update(sent.workers)
    canonical = {w: cached.canonical[w] for w in kept if w != SETTINGS_PART}
    canonical.update(sent.canonical)
    digests = {name: listed[name] for name in listed}
    settings = sent.settings if patch.settings_sent else cached.settings
    # The index follows the parts that changed: a copy (C speed), less the
    # VMs of the parts replaced or dropped, plus the sent parts'.
    owners = dict(cached.owners)
    for name in cached.digests:
        if name in listed and name not in sent_names:
            continue
        gone = (
            [u.vm for u in cached.settings.unpinned]
            if name == SETTINGS_PART
            else cached.workers[name]
        )
        for vm in gone:
            if owners.get(vm.id) == name:
                del owners[vm.id]
    owners.update(sent.owners)
    return Assembled(FleetParts(workers, settings, canonical, digests, owners))


@dataclass(frozen=True, slots=True)
class PatchRequest:
    """The parameters of ``Control.applyPatch``: ``Control.apply``'s, with
    a patch for the fleet."""

    patch: FleetPatch
    expected_generation: int | None = None  # None: any
    dry_run: bool = False
    request_id: str = ""
    supersede: bool = False


@dataclass(frozen=True, slots=True)
class PatchAnswer:
    """``Control.applyPatch``'s answer: the apply's result, or (``result``
    None) the parts the master does not hold; nothing was applied."""

    result: ApplyResult | None
    missing: tuple[str, ...] = ()


def _raise(problems: Sequence[str]) -> None:
    if problems:
        raise ValidationError(
            f"fleet patch: {len(problems)} problem(s), nothing was applied",
            details=list(problems),
        )


async def patch_rounds(
    parts: FleetParts, send: Callable[[FleetPatch], Awaitable[PatchAnswer]]
) -> ApplyResult | None:
    """A client's side of a patched apply of the fleet ``parts`` cut:
    digests first, then the parts the master asks for (the union of what
    it asked, so a part is never asked twice), at most ``PATCH_ROUNDS``
    sends. None: the master kept asking (applies in between kept replacing
    what it holds); the caller applies the whole fleet instead.
    ``ValidationError`` when the master asks for a part the patch did not
    name (a malformed answer: nothing more is sent)."""
    asked: set[str] = set()
    for _ in range(PATCH_ROUNDS):
        answer = await send(make_patch(parts, asked))
        if answer.result is not None:
            return answer.result
        unknown = set(answer.missing) - parts.digests.keys()
        if unknown:
            raise ValidationError(
                "invalid applyPatch answer received: the master asked for parts that are "
                "not parts of the fleet sent: "
                f"{sorted(unknown)[:5]}"
            )
        asked.update(answer.missing)
    return None
