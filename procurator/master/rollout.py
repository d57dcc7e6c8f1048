"""The master's side of rollouts (issue 28, docs/ROLLOUTS.md): what an
apply starts, what workers are sent, and the leader's step, around the
pure state machine (``procurator.core.rollout``).

- **Starting.** A person's apply that replaces VMs in place (same worker,
  new hash) whose fleet opts them into rollouts (``[rollout]``, or their
  own or their group's settings: ``Fleet.rollout_for``) starts a rollout
  instead of switching them
  (``begin``): its generation commits the fleet with those VMs still on
  their old entries (added, removed and otherwise changed VMs go at once:
  they are not gated) and the rollout, in one transaction
  (``Store.commit(rollout=...)``), guarded: a person's apply while a
  rollout is under way is refused unless it supersedes it. The rollout's
  id is derived from the apply's op id (``op-X`` starts ``ro-X``), so
  logs, events and ``describe`` link them.
- **What workers are sent** (``with_rollout``): while a rollout is under
  way, each of its workers gets the new images to prepare
  (``Assignment.prepare``) and each of its VMs its health check
  (``VmAssignment.health``, never part of the VM's identity). Added when
  an assignment is sent, like the fence marks: stored assignments carry
  neither, so diffs and generations never see them; every generation the
  rollout commits touches the workers concerned, so they are pushed.
- **Driving** is a singleton duty of the leader (``MasterService``'s
  ``_drive_rollout``): read the rollout under way from the store, feed
  ``step`` the assignments and the statuses the master caches, then
  commit what ``Step.want`` asks (a generation fenced by the leader's
  epoch, with the rollout's new state in the same transaction), or store
  the new state alone when nothing is to be assigned. A master killed at
  any point leaves the store with a generation and the rollout state that
  goes with it: the next leader continues from there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from procurator.core.models import Assignment, Fleet, RolloutPolicy, VmAssignment
from procurator.core.rollout import Rollout, plan

__all__ = ["begin", "rollout_id_of", "with_rollout"]


def rollout_id_of(op_id: str) -> str:
    """The id of the rollout an apply with ``op_id`` starts."""
    return "ro-" + op_id.removeprefix("op-")


def begin(
    request: Fleet,
    before: Mapping[str, Sequence[VmAssignment]],
    changes: Mapping[str, Sequence[VmAssignment]],
    *,
    op_id: str,
    now_ms: int,
    generation: int,
) -> tuple[Rollout | None, dict[str, tuple[VmAssignment, ...]]]:
    """The rollout an apply of ``request`` starts (None: none, it
    switches at once) and the VM lists its generation commits for the
    workers in ``changes`` (their new lists; ``before``: as stored). The
    settings of each VM come from ``request`` (``Fleet.rollout_for``, with
    the spread group of an unpinned VM)."""
    groups = {u.id: u.spread for u in request.unpinned}

    def policy_of(vm_id: str) -> tuple[RolloutPolicy | None, str]:
        group = groups.get(vm_id, "")
        return request.rollout_for(vm_id, group), group

    return plan(
        rollout_id_of(op_id),
        op_id,
        before,
        changes,
        policy_of,
        now_ms=now_ms,
        generation_before=generation,
    )


def with_rollout(assignment: Assignment, rollout: Rollout | None) -> Assignment:
    """``assignment`` as sent while ``rollout`` is under way: the images its
    worker prepares and the health checks of the rollout's VMs on it (see
    the module docstring). The same object when nothing is added."""
    if rollout is None or rollout.over:
        return assignment
    worker_id = assignment.worker_id
    checks = {vm.vm_id: vm.policy.health for vm in rollout.vms if vm.worker_id == worker_id}
    prepare = dict(rollout.prepare).get(worker_id, ())
    if not checks and not prepare:
        return assignment
    vms = tuple(
        dataclasses.replace(vm, health=checks[vm.id]) if vm.id in checks else vm
        for vm in assignment.vms
    )
    return dataclasses.replace(assignment, vms=vms, prepare=prepare)
