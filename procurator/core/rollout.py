"""Rollouts: the pure state machine that replaces VMs in health-gated
batches (issue 28, docs/ROLLOUTS.md).

``step(rollout, assigned, statuses, now_ms)`` reads a rollout's durable
state, what each touched VM is assigned now, what its worker reports
(health, observed hash, prepared images) and the time, and answers the
next durable state and what the assignments must be (``Step.want``,
``Step.prepare``). The master's leader feeds it and carries the answer
out: it *first* stores the new rollout state, *then* commits a generation
making the assignments what ``want`` says (fenced by its epoch). So the
state always says what is intended before it happens, and a master that
dies between the two finds, on the next step, the same ``want`` and
commits it then: nothing is replaced twice, nothing is forgotten.

Phases::

    preparing ──► switching ──► done
        │            │  ▲
        │            ▼  │ promote (or auto_promote)
        │      awaiting promotion
        ▼            │
      failed ◄───────┤ (a VM not healthy in time, auto_revert false)
                     ▼
                 reverting ──► reverted (auto_revert, or ``undo``)

- **Preparing.** Every worker of ``Rollout.prepare`` realises and roots
  the new images (``Assignment.prepare``) and reports them
  (``WorkerStatus.prepared``); nothing running changes. Once every path
  is ``ready`` everywhere, the rollout switches. A path ``failed`` on a
  worker fails the rollout here (the worker and path named), as does a
  prepare not done within the longest ``healthy_deadline`` of its VMs.
- **Switching.** A VM is *touched* once the rollout asks for its new
  assignment (``switching``); it counts as unavailable until it is
  ``healthy``: its worker reports its new hash running with
  ``Health.HEALTHY`` (the worker judges: the check passed continuously
  for ``min_healthy_ms``; kind ``none`` means running). At most
  ``max_parallel`` VMs of a group are ``switching`` at any moment; a
  group is the spread group (VMs without one form one group, ""). Its
  ``max_parallel`` is the smallest of its VMs' policies. A VM not healthy
  within its ``healthy_deadline`` of being switched, or whose new hash
  failed for good on its worker, is ``failed``.
- **A failure.** With the failed VM's ``auto_revert``, the rollout goes
  ``reverting``: every touched VM is assigned its previous entry again
  (exactly the one it had before the rollout), untouched VMs stay, and
  once every touched VM is assigned its old entry the rollout is
  ``reverted``. Without it, the rollout stops ``failed``: touched VMs keep
  their new entry, untouched ones their old.
- **Canaries** (``canary = N``): the first N VMs of each group (by id)
  are replaced first, in place (no new ids: a canary is one of the
  group's VMs, so placement, addresses and identities stay as they are);
  once they are all healthy the rollout waits for ``promote`` unless every
  group with canaries has ``auto_promote``.
- **Pause** (``Rollout.paused``, ``procurator rollout pause``): no new
  batch starts; VMs in flight are still judged, and a failure still
  reverts. ``undo`` reverts like a failure does (touched VMs back to
  their previous entries), from any phase that is not over.
- **Added and removed VMs** of the apply that started the rollout are not
  gated: they are committed with its first generation (a new VM has no
  old version to keep available; a removed one is going). Only VMs whose
  entry is *replaced* (a new hash) are in a rollout. Entries changed
  otherwise (power, resources under the same hash) are also committed at
  once.

Invariants (``tests/rollout``, table and property tests): never more than
``max_parallel`` VMs of a group ``switching``; a VM's state only moves
forward (waiting → switching → healthy | failed), so no VM is replaced
twice; ``want`` in ``reverting``/``reverted`` holds exactly the old entry
of every touched VM and nothing else; a terminal phase never changes.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from procurator.core.models import (
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    PowerState,
    PrepareState,
    RolloutPolicy,
    VmAssignment,
    VmStatus,
    WorkerStatus,
)

__all__ = [
    "TERMINAL",
    "Rollout",
    "RolloutAction",
    "RolloutPhase",
    "RolloutView",
    "RolloutVm",
    "RolloutVmView",
    "Step",
    "VmState",
    "act",
    "counts",
    "decode",
    "encode",
    "group_limits",
    "plan",
    "prepared_count",
    "promote",
    "set_paused",
    "step",
    "undo",
    "view",
]


class RolloutPhase(enum.Enum):
    PREPARING = "preparing"
    SWITCHING = "switching"
    AWAITING_PROMOTION = "awaiting promotion"
    REVERTING = "reverting"
    DONE = "done"
    FAILED = "failed"
    REVERTED = "reverted"


TERMINAL = frozenset({RolloutPhase.DONE, RolloutPhase.FAILED, RolloutPhase.REVERTED})


class VmState(enum.Enum):
    WAITING = "waiting"  # still on its old entry, not asked to switch
    SWITCHING = "switching"  # asked for its new entry; not healthy yet
    HEALTHY = "healthy"  # its new entry ran healthy: done with it
    FAILED = "failed"  # not healthy within its deadline, or failed for good


@dataclass(frozen=True, slots=True)
class RolloutVm:
    """One VM the rollout replaces: its entry before (``old``) and after
    (``new``), on ``worker_id``, in spread ``group`` ("" for none)."""

    vm_id: str
    worker_id: str
    old: VmAssignment
    new: VmAssignment
    policy: RolloutPolicy
    group: str = ""
    state: VmState = VmState.WAITING
    switched_ms: int = 0  # when it was asked to switch (its deadline runs from there)
    canary: bool = False
    message: str = ""  # why it failed


@dataclass(frozen=True, slots=True)
class Rollout:
    """A rollout's durable state (the store keeps it; docs/ROLLOUTS.md)."""

    id: str
    op_id: str  # the apply that started it
    vms: tuple[RolloutVm, ...]  # sorted by (group, canary first, vm id)
    # worker id -> the new store paths it prepares, sorted.
    prepare: tuple[tuple[str, tuple[str, ...]], ...] = ()
    phase: RolloutPhase = RolloutPhase.PREPARING
    started_ms: int = 0
    generation_before: int = 0  # the fleet's generation before its apply
    paused: bool = False
    promoted: bool = False
    batches: int = 0  # batches started
    reason: str = ""  # why it failed, reverted or waits
    ended_ms: int = 0

    @property
    def over(self) -> bool:
        return self.phase in TERMINAL


@dataclass(frozen=True, slots=True)
class Step:
    """The answer of ``step``: the new durable state, the entries the
    rollout's VMs must be assigned (vm id -> entry: commit those that
    differ from what is assigned) and what happened, for events and logs
    (one line each)."""

    rollout: Rollout
    want: Mapping[str, VmAssignment]
    notes: tuple[str, ...] = ()

    @property
    def prepare(self) -> dict[str, tuple[str, ...]]:
        """The paths each worker must keep prepared: the new images, until
        the rollout is over (a VM not switched yet needs its image kept
        from the garbage collector until it is)."""
        return {} if self.rollout.over else dict(self.rollout.prepare)


def group_limits(vms: tuple[RolloutVm, ...]) -> dict[str, int]:
    """Group -> its ``max_parallel``: the smallest of its VMs' (at least 1)."""
    limits: dict[str, int] = {}
    for vm in vms:
        limit = max(1, vm.policy.max_parallel)
        limits[vm.group] = min(limits.get(vm.group, limit), limit)
    return limits


def counts(rollout: Rollout) -> dict[VmState, int]:
    found = dict.fromkeys(VmState, 0)
    for vm in rollout.vms:
        found[vm.state] += 1
    return found


def set_paused(rollout: Rollout, paused: bool) -> Rollout:
    return rollout if rollout.over else replace(rollout, paused=paused)


def promote(rollout: Rollout) -> Rollout:
    if rollout.over:
        return rollout
    return replace(rollout, promoted=True, reason="")


def undo(rollout: Rollout, why: str = "undone by an operator") -> Rollout:
    """Revert every touched VM (``reverting``), unless the rollout is over
    or reverting already."""
    if rollout.over or rollout.phase is RolloutPhase.REVERTING:
        return rollout
    return replace(rollout, phase=RolloutPhase.REVERTING, reason=why)


def _touched(vm: RolloutVm) -> bool:
    return vm.state is not VmState.WAITING


def _want(rollout: Rollout) -> dict[str, VmAssignment]:
    reverting = rollout.phase in (RolloutPhase.REVERTING, RolloutPhase.REVERTED)
    want: dict[str, VmAssignment] = {}
    for vm in rollout.vms:
        if not _touched(vm):
            continue
        want[vm.vm_id] = vm.old if reverting else vm.new
    return want


def _verdict(vm: RolloutVm, status: VmStatus | None, now_ms: int) -> tuple[VmState, str]:
    """A switching VM's state from its worker's report and the time."""
    if status is not None and status.observed_hash == vm.new.hash:
        if status.health is Health.HEALTHY:
            return VmState.HEALTHY, ""
        if status.phase in (Phase.FAILED, Phase.CRASH_LOOP):
            return VmState.FAILED, f"{status.phase.value}: {status.message}".rstrip(": ")
    if now_ms - vm.switched_ms >= vm.policy.healthy_deadline_ms:
        if status is None:
            seen = "no status"
        elif status.observed_hash != vm.new.hash:
            seen = f"still {status.phase.value} on hash {status.observed_hash or '(none)'}"
        else:
            seen = f"health {status.health.value}" + (
                f" ({status.message})" if status.message else ""
            )
        return VmState.FAILED, (
            f"not healthy within {vm.policy.healthy_deadline_ms / 1000:g} s of its switch: {seen}"
        )
    return VmState.SWITCHING, ""


def _prepared(
    rollout: Rollout, workers: Mapping[str, WorkerStatus], now_ms: int
) -> tuple[bool, str]:
    """(every path ready on every worker, the first failure or "")."""
    ready = True
    for worker_id, paths in rollout.prepare:
        status = workers.get(worker_id)
        reported = {p.path: p for p in status.prepared} if status is not None else {}
        for path in paths:
            image = reported.get(path)
            if image is None or image.state is PrepareState.PENDING:
                ready = False
            elif image.state is PrepareState.FAILED:
                return False, f"worker {worker_id} cannot prepare {path}: {image.message}"
    if not ready:
        deadline = max((vm.policy.healthy_deadline_ms for vm in rollout.vms), default=0)
        if now_ms - rollout.started_ms >= deadline:
            waiting = prepared_count(rollout, workers)
            return False, (
                f"prepare not done within {deadline / 1000:g} s "
                f"({waiting} of {len(rollout.prepare)} workers ready)"
            )
    return ready, ""


def prepared_count(rollout: Rollout, workers: Mapping[str, WorkerStatus]) -> int:
    """How many of the rollout's workers report every path ready."""
    done = 0
    for worker_id, paths in rollout.prepare:
        status = workers.get(worker_id)
        ready = (
            {p.path for p in status.prepared if p.state is PrepareState.READY}
            if status is not None
            else set()
        )
        done += set(paths) <= ready
    return done


def step(
    rollout: Rollout,
    assigned: Mapping[str, VmAssignment],
    workers: Mapping[str, WorkerStatus],
    now_ms: int,
) -> Step:
    """The next durable state and what to assign (see the module
    docstring). ``assigned``: vm id -> its entry in the stored fleet now;
    ``workers``: worker id -> its latest status (the rollout's VMs are
    looked up on the worker each is assigned to)."""
    notes: list[str] = []
    phase = rollout.phase
    if rollout.over:
        return Step(rollout, _want(rollout))
    if phase is RolloutPhase.PREPARING:
        ready, failure = _prepared(rollout, workers, now_ms)
        if failure:
            done = replace(rollout, phase=RolloutPhase.FAILED, reason=failure, ended_ms=now_ms)
            return Step(done, {}, (f"rollout {rollout.id} failed in prepare: {failure}",))
        if not ready:
            return Step(rollout, {})
        rollout = replace(rollout, phase=RolloutPhase.SWITCHING, reason="")
        phase = rollout.phase
        notes.append(f"rollout {rollout.id}: every worker prepared the new images")
    statuses = _statuses(rollout, workers)
    # Judge the VMs in flight (also while reverting: the verdicts are kept
    # for status, though nothing waits on them).
    vms = list(rollout.vms)
    failed: list[RolloutVm] = []
    for i, vm in enumerate(vms):
        if vm.state is not VmState.SWITCHING:
            continue
        if assigned.get(vm.vm_id) != vm.new:
            continue  # its switch is not committed yet: judged from the commit on
        state, message = _verdict(vm, statuses.get(vm.vm_id), now_ms)
        if state is not VmState.SWITCHING:
            vms[i] = replace(vm, state=state, message=message)
            notes.append(f"VM {vm.vm_id}: {state.value}" + (f": {message}" if message else ""))
            if state is VmState.FAILED:
                failed.append(vms[i])
    rollout = replace(rollout, vms=tuple(vms))
    if phase is RolloutPhase.REVERTING:
        return _reverting(rollout, assigned, now_ms, notes)
    if failed:
        first = failed[0]
        why = f"VM {first.vm_id} on {first.worker_id}: {first.message}"
        if first.policy.auto_revert:
            rollout = replace(rollout, phase=RolloutPhase.REVERTING, reason=why)
            notes.append(f"rollout {rollout.id} reverts: {why}")
            return _reverting(rollout, assigned, now_ms, notes)
        rollout = replace(rollout, phase=RolloutPhase.FAILED, reason=why, ended_ms=now_ms)
        notes.append(f"rollout {rollout.id} failed: {why}")
        return Step(rollout, _want(rollout), tuple(notes))
    if all(vm.state is VmState.HEALTHY for vm in rollout.vms):
        rollout = replace(rollout, phase=RolloutPhase.DONE, reason="", ended_ms=now_ms)
        notes.append(f"rollout {rollout.id} done: {len(rollout.vms)} VM(s) replaced")
        return Step(rollout, _want(rollout), tuple(notes))
    return _switch(rollout, now_ms, notes)


def _statuses(rollout: Rollout, workers: Mapping[str, WorkerStatus]) -> dict[str, VmStatus]:
    """Each switching VM's status, as reported by the worker it is on (a
    report of another worker about it is not its)."""
    on = {vm.vm_id: vm.worker_id for vm in rollout.vms if vm.state is VmState.SWITCHING}
    found: dict[str, VmStatus] = {}
    for worker_id in set(on.values()):
        status = workers.get(worker_id)
        if status is not None:
            found.update((v.id, v) for v in status.vms if on.get(v.id) == worker_id)
    return found


def _canaries_waiting(rollout: Rollout) -> bool:
    """Canaries are all healthy and some group wants a promotion."""
    canaries = [vm for vm in rollout.vms if vm.canary]
    if not canaries or rollout.promoted:
        return False
    if any(vm.state is not VmState.HEALTHY for vm in canaries):
        return False
    return not all(vm.policy.auto_promote for vm in canaries)


def _switch(rollout: Rollout, now_ms: int, notes: list[str]) -> Step:
    """Start the next batch where the groups' limits allow it."""
    canaries_pending = any(vm.canary and vm.state is not VmState.HEALTHY for vm in rollout.vms)
    if _canaries_waiting(rollout):
        healthy = sum(vm.canary for vm in rollout.vms)
        reason = f"{healthy} canary VM(s) healthy: waiting for `procurator rollout promote`"
        if rollout.phase is not RolloutPhase.AWAITING_PROMOTION:
            notes.append(f"rollout {rollout.id}: {reason}")
        rollout = replace(rollout, phase=RolloutPhase.AWAITING_PROMOTION, reason=reason)
        return Step(rollout, _want(rollout), tuple(notes))
    if rollout.phase is RolloutPhase.AWAITING_PROMOTION:
        notes.append(f"rollout {rollout.id}: canaries promoted")
        rollout = replace(rollout, phase=RolloutPhase.SWITCHING, reason="")
    if rollout.paused:
        return Step(rollout, _want(rollout), tuple(notes))
    limits = group_limits(rollout.vms)
    busy: dict[str, int] = {}
    for vm in rollout.vms:
        if vm.state is VmState.SWITCHING:
            busy[vm.group] = busy.get(vm.group, 0) + 1
    vms = list(rollout.vms)
    started: list[str] = []
    for i, vm in enumerate(vms):
        if vm.state is not VmState.WAITING:
            continue
        if canaries_pending and not vm.canary:
            continue  # the canaries go first, alone
        if busy.get(vm.group, 0) >= limits[vm.group]:
            continue
        busy[vm.group] = busy.get(vm.group, 0) + 1
        vms[i] = replace(vm, state=VmState.SWITCHING, switched_ms=now_ms)
        started.append(vm.vm_id)
    if started:
        rollout = replace(rollout, vms=tuple(vms), batches=rollout.batches + 1)
        notes.append(
            f"rollout {rollout.id}: batch {rollout.batches} switches {len(started)} VM(s): "
            + ", ".join(started[:10])
            + (" ..." if len(started) > 10 else "")
        )
    return Step(rollout, _want(rollout), tuple(notes))


def _reverting(
    rollout: Rollout, assigned: Mapping[str, VmAssignment], now_ms: int, notes: list[str]
) -> Step:
    """Every touched VM back to its old entry; reverted once the store
    assigns them all."""
    want = _want(rollout)
    if all(assigned.get(vm_id) == entry for vm_id, entry in want.items()):
        rollout = replace(rollout, phase=RolloutPhase.REVERTED, ended_ms=now_ms)
        notes.append(
            f"rollout {rollout.id} reverted: {len(want)} VM(s) back on their previous images"
        )
    return Step(rollout, want, tuple(notes))


def plan(
    rollout_id: str,
    op_id: str,
    before: Mapping[str, Sequence[VmAssignment]],
    after: Mapping[str, Sequence[VmAssignment]],
    policy_of: Callable[[str], tuple[RolloutPolicy | None, str]],
    *,
    now_ms: int,
    generation_before: int = 0,
) -> tuple[Rollout | None, dict[str, tuple[VmAssignment, ...]]]:
    """The rollout of an apply that changes ``before`` (worker id -> its
    VMs now) into ``after`` (the resolved fleet), and the VM lists its
    first generation commits: ``after`` with every VM replaced in place
    (same worker, new hash) kept on its old entry. None when no VM is
    replaced in place: the apply switches at once. ``policy_of(vm_id)``:
    the VM's policy (None: it is replaced at once) and spread group. A VM
    that moves to another worker and changes its hash is not gated (its
    old self is removed with the first generation, like any move)."""
    gated: list[RolloutVm] = []
    first: dict[str, tuple[VmAssignment, ...]] = {}
    for worker_id, vms in sorted(after.items()):
        old = {vm.id: vm for vm in before.get(worker_id, ())}
        kept: list[VmAssignment] = []
        held_back = False
        for entry in vms:
            previous = old.get(entry.id)
            policy, group = (
                policy_of(entry.id)
                if previous is not None and previous.hash != entry.hash
                else (None, "")
            )
            if previous is not None and policy is not None:
                gated.append(RolloutVm(entry.id, worker_id, previous, entry, policy, group))
                kept.append(previous)
                held_back = True
            else:
                kept.append(entry)
        # The very list when no VM waits on its old entry: a later apply
        # that shares it (a fleet patch) then diffs this worker in O(1).
        first[worker_id] = tuple(kept) if held_back else tuple(vms)
    if not gated:
        return None, first
    by_group: dict[str, list[RolloutVm]] = {}
    for item in sorted(gated, key=lambda v: (v.group, v.vm_id)):
        by_group.setdefault(item.group, []).append(item)
    ordered: list[RolloutVm] = []
    for group in sorted(by_group):
        members = by_group[group]
        n = max(vm.policy.canary for vm in members)
        # A group of canaries only would wait for nothing: at most all but one.
        n = min(max(0, n), len(members) - 1)
        marked = [replace(vm, canary=i < n) for i, vm in enumerate(members)]
        ordered.extend(sorted(marked, key=lambda v: (not v.canary, v.vm_id)))
    prepare: dict[str, set[str]] = {}
    for item in ordered:
        prepare.setdefault(item.worker_id, set()).add(item.new.nix_store_path)
    rollout = Rollout(
        rollout_id,
        op_id,
        tuple(ordered),
        tuple((w, tuple(sorted(paths))) for w, paths in sorted(prepare.items())),
        started_ms=now_ms,
        generation_before=generation_before,
    )
    return rollout, first


# ---------------------------------------------------------------- stored form
#
# A rollout is stored as one JSON document (``encode`` / ``decode``): plain
# values only, so every store adapter keeps it as text. ``decode`` raises
# ``ValueError`` on anything it did not write.


def _entry_data(vm: VmAssignment) -> list[Any]:
    return [vm.id, vm.hash, vm.nix_store_path, vm.power.value, vm.vcpus, vm.memory_mib]


def _entry(data: Sequence[Any]) -> VmAssignment:
    vm_id, vm_hash, path, power, vcpus, memory = data
    return VmAssignment(
        str(vm_id), str(vm_hash), str(path), PowerState(power), int(vcpus), int(memory)
    )


def _policy_data(policy: RolloutPolicy) -> dict[str, Any]:
    health = policy.health
    return {
        "max_parallel": policy.max_parallel,
        "health": [
            health.kind.value,
            health.port,
            health.path,
            health.expect,
            health.min_healthy_ms,
            health.interval_ms,
        ],
        "healthy_deadline_ms": policy.healthy_deadline_ms,
        "canary": policy.canary,
        "auto_revert": policy.auto_revert,
        "auto_promote": policy.auto_promote,
    }


def _policy(data: Mapping[str, Any]) -> RolloutPolicy:
    kind, port, path, expect, min_healthy, interval = data["health"]
    return RolloutPolicy(
        int(data["max_parallel"]),
        HealthCheck(
            HealthKind(kind), int(port), str(path), int(expect), int(min_healthy), int(interval)
        ),
        int(data["healthy_deadline_ms"]),
        int(data["canary"]),
        bool(data["auto_revert"]),
        bool(data["auto_promote"]),
    )


def encode(rollout: Rollout) -> str:
    """The stored form of ``rollout`` (policies written once, shared by
    index: a 1,000-VM rollout has a handful of distinct ones)."""
    policies: list[RolloutPolicy] = []
    index: dict[RolloutPolicy, int] = {}
    vms = []
    for vm in rollout.vms:
        if vm.policy not in index:
            index[vm.policy] = len(policies)
            policies.append(vm.policy)
        vms.append(
            [
                vm.vm_id,
                vm.worker_id,
                _entry_data(vm.old),
                _entry_data(vm.new),
                index[vm.policy],
                vm.group,
                vm.state.value,
                vm.switched_ms,
                vm.canary,
                vm.message,
            ]
        )
    return json.dumps(
        {
            "v": 1,
            "id": rollout.id,
            "op_id": rollout.op_id,
            "policies": [_policy_data(p) for p in policies],
            "vms": vms,
            "prepare": [[w, list(paths)] for w, paths in rollout.prepare],
            "phase": rollout.phase.value,
            "started_ms": rollout.started_ms,
            "generation_before": rollout.generation_before,
            "paused": rollout.paused,
            "promoted": rollout.promoted,
            "batches": rollout.batches,
            "reason": rollout.reason,
            "ended_ms": rollout.ended_ms,
        },
        separators=(",", ":"),
    )


def decode(text: str) -> Rollout:
    try:
        data = json.loads(text)
        if data.get("v") != 1:
            raise ValueError(f"unknown rollout format {data.get('v')!r}")
        policies = [_policy(p) for p in data["policies"]]
        vms = tuple(
            RolloutVm(
                str(vm_id),
                str(worker_id),
                _entry(old),
                _entry(new),
                policies[int(policy)],
                str(group),
                VmState(state),
                int(switched),
                bool(canary),
                str(message),
            )
            for vm_id, worker_id, old, new, policy, group, state, switched, canary, message in data[
                "vms"
            ]
        )
        return Rollout(
            str(data["id"]),
            str(data["op_id"]),
            vms,
            tuple((str(w), tuple(str(p) for p in paths)) for w, paths in data["prepare"]),
            RolloutPhase(data["phase"]),
            int(data["started_ms"]),
            int(data["generation_before"]),
            bool(data["paused"]),
            bool(data["promoted"]),
            int(data["batches"]),
            str(data["reason"]),
            int(data["ended_ms"]),
        )
    except (KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"not a stored rollout: {exc!r}") from None


# ---------------------------------------------------------------- what people see


@dataclass(frozen=True, slots=True)
class RolloutVmView:
    vm_id: str
    worker_id: str
    state: str  # a VmState's value
    canary: bool = False
    message: str = ""
    old_path: str = ""
    new_path: str = ""


@dataclass(frozen=True, slots=True)
class RolloutView:
    """A rollout as ``procurator rollout status`` shows it (and the wire's
    ``RolloutInfo`` carries it): ``id`` "" when there is none to show."""

    id: str = ""
    op_id: str = ""
    phase: str = ""  # a RolloutPhase's value
    reason: str = ""
    paused: bool = False
    batches: int = 0
    started_ms: int = 0
    ended_ms: int = 0
    prepared_workers: int = 0
    prepare_workers: int = 0
    vms: tuple[RolloutVmView, ...] = ()
    message: str = ""  # what the call did

    def count(self, state: VmState) -> int:
        return sum(vm.state == state.value for vm in self.vms)


def view(rollout: Rollout, workers: Mapping[str, WorkerStatus], message: str = "") -> RolloutView:
    return RolloutView(
        rollout.id,
        rollout.op_id,
        rollout.phase.value,
        rollout.reason,
        rollout.paused,
        rollout.batches,
        rollout.started_ms,
        rollout.ended_ms,
        prepared_count(rollout, workers),
        len(rollout.prepare),
        tuple(
            RolloutVmView(
                vm.vm_id,
                vm.worker_id,
                vm.state.value,
                vm.canary,
                vm.message,
                vm.old.nix_store_path,
                vm.new.nix_store_path,
            )
            for vm in rollout.vms
        ),
        message,
    )


class RolloutAction(enum.Enum):
    """What ``procurator rollout`` asks of a rollout."""

    STATUS = "status"
    PAUSE = "pause"
    RESUME = "resume"
    PROMOTE = "promote"
    UNDO = "undo"


def act(rollout: Rollout, action: RolloutAction) -> tuple[Rollout, str]:
    """``rollout`` after ``action``, and what it did, in one line."""
    if action is RolloutAction.STATUS:
        return rollout, ""
    if rollout.over:
        return (
            rollout,
            f"rollout {rollout.id} is over ({rollout.phase.value}): nothing to {action.value}",
        )
    if action is RolloutAction.PAUSE:
        after = set_paused(rollout, True)
        did = "paused: no new batch starts (VMs in flight are still judged)"
    elif action is RolloutAction.RESUME:
        after = set_paused(rollout, False)
        did = "resumed"
    elif action is RolloutAction.PROMOTE:
        after = promote(rollout)
        did = "promoted: the VMs after the canaries follow"
    else:
        after = undo(rollout)
        did = "reverting: its touched VMs go back to their previous images"
    if after == rollout:
        return rollout, f"rollout {rollout.id}: nothing changed ({rollout.phase.value})"
    return after, f"rollout {rollout.id} {did}"
