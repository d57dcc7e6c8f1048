"""Status reports that carry only what changed.

A worker's status names every VM it has, so on a host of a thousand VMs a
one-VM change used to cost a thousand-entry message each time its status
moved (stopping, starting, running): ~3 ms to build, ~9 ms for the master to
read and validate, and a report in flight holds up the next. So a worker
reports its whole status once per session, and from then on only what
changed since the status the master acknowledged last (``StatusChanges``).

Invariants (the link in ``procurator.worker.link`` and the master in
``procurator.master.service`` keep them):

- Changes apply to the status the master acknowledged last *on the same
  session*, in the order they were sent: the link has at most one report in
  flight, and every session starts with a full status. A master that holds
  no full status from the session refuses changes; the worker then sends a
  full status, so nothing is ever merged into a stale base.
- An entry in ``changed`` is a VM's whole status: it replaces the entry of
  that id, or adds one. ``removed`` names VMs no longer reported. No id is in
  both, or twice in either; a removed id must be in the base.
- The order of ``WorkerStatus.vms`` carries no meaning: merging keeps the
  base's order, replaces changed entries in place, appends new ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from procurator.core.errors import ValidationError
from procurator.core.models import VmStatus, WorkerStatus

__all__ = ["StatusChanges", "apply_status_changes", "status_changes"]


@dataclass(frozen=True, slots=True)
class StatusChanges:
    """What changed in a worker's status since the one last acknowledged."""

    worker_id: str
    observed_generation: int
    changed: tuple[VmStatus, ...] = ()
    removed: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """How many VM entries this report carries (changed and removed)."""
        return len(self.changed) + len(self.removed)


def status_changes(base: WorkerStatus, status: WorkerStatus) -> StatusChanges:
    """What turns ``base`` into ``status``. Entries are compared by identity
    first (the reconciler reuses the status object of a VM whose inputs did
    not change), then by value."""
    before = {vm.id: vm for vm in base.vms}
    changed = []
    for vm in status.vms:
        old = before.pop(vm.id, None)
        if old is not vm and old != vm:
            changed.append(vm)
    return StatusChanges(
        worker_id=status.worker_id,
        observed_generation=status.observed_generation,
        changed=tuple(changed),
        removed=tuple(before),
    )


def apply_status_changes(base: WorkerStatus, changes: StatusChanges) -> WorkerStatus:
    """``base`` with ``changes`` merged in; ``ValidationError`` naming the
    problem when they do not fit it (see the module docstring)."""
    if changes.worker_id != base.worker_id:
        raise ValidationError(
            f"status changes of worker {changes.worker_id!r} cannot apply to "
            f"the status of {base.worker_id!r}"
        )
    replacing: dict[str, VmStatus] = {}
    for vm in changes.changed:
        if vm.id in replacing:
            raise ValidationError(f"status changes name VM {vm.id!r} twice")
        replacing[vm.id] = vm
    removing = set(changes.removed)
    if len(removing) != len(changes.removed):
        raise ValidationError("status changes remove a VM twice")
    if both := removing & replacing.keys():
        raise ValidationError(f"status changes both change and remove VM {min(both)!r}")
    vms = []
    for vm in base.vms:
        if vm.id in removing:
            removing.discard(vm.id)
        else:
            vms.append(replacing.pop(vm.id, vm))
    if removing:
        raise ValidationError(
            f"status changes remove VM {min(removing)!r}, which the last status did not report"
        )
    vms.extend(replacing.values())  # new VMs, in the order sent
    return WorkerStatus(base.worker_id, changes.observed_generation, tuple(vms))
