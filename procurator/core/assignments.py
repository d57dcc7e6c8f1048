"""Assignment updates that carry only what changed.

A worker's assignment names every VM it runs, so on a host of ten thousand
VMs a one-VM change used to cost a ten-thousand-entry message (~2 MB), its
encoding on the master and its decoding and validation on the worker
(10-30 ms), and a diff of the whole thing against what runs. So after a
worker has a whole assignment, it can be sent ``AssignmentChanges``
(``Node.pushChanges``): the generation the changes apply to
(``base_generation``), the new one, and only the entries added or changed
(whole) and the ids removed. The worker's link and reconciler take them;
the master sends them once the worker is known to hold a whole assignment
(``procurator.master.service``, "Pushing changes").

Invariants (the worker's link and reconciler keep them):

- Changes apply only to the assignment of exactly ``base_generation``. A
  worker holding another generation (it lost a push, or the changes raced a
  pull) does not guess: it takes note and asks for the whole assignment
  (``WorkerSession.getAssignment``), which is also what every (re)connect
  and every periodic resync uses. So a lost or reordered update delays a
  change until the next pull at worst, and never corrupts an assignment.
- An entry in ``upserted`` is a VM's whole desired entry: it replaces the
  entry of that id, or adds one. ``removed`` names VMs no longer assigned;
  an id the base does not assign is ignored (a composed update may name a
  VM added and removed again). No id is in both, or twice in either.
- Changes compose: two consecutive updates are one update from the first's
  base to the second's generation (``compose``), so a worker that takes
  updates latest-wins never drops one.
- The order of ``Assignment.vms`` carries no meaning: applying keeps the
  base's order, replaces changed entries in place, appends new ones.
- ``prepare`` (the store paths to realise and root without running them:
  a rollout's first phase) is short and travels whole: every update
  carries the new assignment's list, which replaces the base's (an empty
  one clears it). ``transfers`` (a move's disk transfers) travel the same
  way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from procurator.core.errors import ValidationError
from procurator.core.models import Assignment, DiskTransfer, VmAssignment

__all__ = [
    "AssignmentChanges",
    "AssignmentUpdate",
    "apply_assignment_changes",
    "assignment_changes",
    "compose",
]


@dataclass(frozen=True, slots=True)
class AssignmentChanges:
    """What turns a worker's assignment of ``base_generation`` into the one
    of ``generation`` (see the module docstring)."""

    worker_id: str
    base_generation: int
    generation: int
    op_id: str = ""
    upserted: tuple[VmAssignment, ...] = ()
    removed: tuple[str, ...] = ()
    # Whole: the new assignment's ``prepare`` (replaces the base's).
    prepare: tuple[str, ...] = ()
    # Whole: the new assignment's ``transfers`` (replaces the base's).
    transfers: tuple[DiskTransfer, ...] = ()

    @property
    def size(self) -> int:
        """How many VM entries this update carries (upserted and removed)."""
        return len(self.upserted) + len(self.removed)

    def vm_ids(self) -> Iterable[str]:
        """Every VM id the update touches."""
        for vm in self.upserted:
            yield vm.id
        yield from self.removed

    def check(self) -> None:
        """Raise ``ValidationError`` naming the problem when the update is
        not well formed on its own (an id twice, a generation that does not
        move forward)."""
        if self.generation <= self.base_generation:
            raise ValidationError(
                f"assignment changes from generation {self.base_generation} to "
                f"{self.generation} do not move forward"
            )
        seen: set[str] = set()
        for vm in self.upserted:
            if vm.id in seen:
                raise ValidationError(f"assignment changes name VM {vm.id!r} twice")
            seen.add(vm.id)
        removing = set(self.removed)
        if len(removing) != len(self.removed):
            raise ValidationError("assignment changes remove a VM twice")
        if both := removing & seen:
            raise ValidationError(f"assignment changes both change and remove VM {min(both)!r}")
        if len(set(self.prepare)) != len(self.prepare):
            raise ValidationError("assignment changes name a path to prepare twice")


# What a worker's link delivers to its handler: a whole assignment, or the
# changes to the one delivered before.
AssignmentUpdate = Assignment | AssignmentChanges


def assignment_changes(base: Assignment, new: Assignment) -> AssignmentChanges:
    """What turns ``base`` into ``new`` (O(VMs); entries compared by
    identity first, then value)."""
    if base.worker_id != new.worker_id:
        raise ValueError(f"assignments of {base.worker_id!r} and {new.worker_id!r}")
    before = {vm.id: vm for vm in base.vms}
    upserted = []
    for vm in new.vms:
        old = before.pop(vm.id, None)
        if old is not vm and old != vm:
            upserted.append(vm)
    return AssignmentChanges(
        worker_id=new.worker_id,
        base_generation=base.generation,
        generation=new.generation,
        op_id=new.op_id,
        upserted=tuple(upserted),
        removed=tuple(before),
        prepare=new.prepare,
        transfers=new.transfers,
    )


def apply_assignment_changes(base: Assignment, changes: AssignmentChanges) -> Assignment:
    """``base`` with ``changes`` applied (O(VMs)); ``ValidationError``
    naming the problem when they do not fit it."""
    if changes.worker_id != base.worker_id:
        raise ValidationError(
            f"assignment changes of worker {changes.worker_id!r} cannot apply to the "
            f"assignment of {base.worker_id!r}"
        )
    if changes.base_generation != base.generation:
        raise ValidationError(
            f"assignment changes apply to generation {changes.base_generation}, "
            f"not {base.generation}"
        )
    changes.check()
    replacing = {vm.id: vm for vm in changes.upserted}
    removing = frozenset(changes.removed)
    vms = [replacing.pop(vm.id, vm) for vm in base.vms if vm.id not in removing]
    vms.extend(replacing.values())  # new VMs, in the order sent
    return Assignment(
        base.worker_id,
        changes.generation,
        tuple(vms),
        changes.op_id,
        changes.prepare,
        changes.transfers,
    )


def compose(first: AssignmentUpdate, then: AssignmentChanges) -> AssignmentUpdate:
    """One update with the effect of ``first`` followed by ``then`` (whose
    base must be ``first``'s generation): a whole assignment stays whole
    (O(VMs)); two changes become one (O(changes))."""
    if then.base_generation != first.generation:
        raise ValueError(
            f"changes from generation {then.base_generation} do not follow "
            f"generation {first.generation}"
        )
    if isinstance(first, Assignment):
        return apply_assignment_changes(first, then)
    entries: dict[str, VmAssignment | None] = {vm.id: vm for vm in first.upserted}
    for vm_id in first.removed:
        entries[vm_id] = None
    for vm in then.upserted:
        entries[vm.id] = vm
    for vm_id in then.removed:
        entries[vm_id] = None
    return AssignmentChanges(
        worker_id=then.worker_id,
        base_generation=first.base_generation,
        generation=then.generation,
        op_id=then.op_id,
        upserted=tuple(vm for vm in entries.values() if vm is not None),
        removed=tuple(vm_id for vm_id, vm in entries.items() if vm is None),
        prepare=then.prepare,
        transfers=then.transfers,
    )
