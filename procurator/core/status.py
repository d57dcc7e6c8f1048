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
- ``prepared`` (the worker's progress on its assignment's ``prepare``
  paths) is short and travels whole: every report carries it, and a
  report's list replaces the base's. The worker's preparer publishes it on
  its own (``StatusOutbox.publish_prepared``); the VMs' publications leave
  it as it is. ``transfers`` (a move's disk transfers) travel the same way
  (``publish_transfers``).

``StatusMerger`` is the master's: it merges each report into what the
last one left in O(changes) (``apply_status_changes`` walks every VM, as
the merger still does for a report that removes VMs).
``StatusOutbox`` is the worker's side of it, and keeps a report's cost
proportional to what changed, whatever the fleet: the reconciler publishes
the entries it recomputed (``publish_changes``), the outbox keeps the whole
status by VM id, the ids changed since the last report was taken, and what
the master acknowledged on this session; a report carries only the entries
of changed ids that differ from the acknowledged ones. Only a session's
first report, a report after a refusal and a report to a master that takes
no change reports are whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from procurator.core.errors import ValidationError
from procurator.core.models import PreparedImage, TransferProgress, VmStatus, WorkerStatus

__all__ = [
    "StatusChanges",
    "StatusMerger",
    "StatusOutbox",
    "apply_status_changes",
    "status_changes",
]


@dataclass(frozen=True, slots=True)
class StatusChanges:
    """What changed in a worker's status since the one last acknowledged."""

    worker_id: str
    observed_generation: int
    changed: tuple[VmStatus, ...] = ()
    removed: tuple[str, ...] = ()
    # Whole: replaces the base's ``WorkerStatus.prepared``.
    prepared: tuple[PreparedImage, ...] = ()
    # Whole: replaces the base's ``WorkerStatus.transfers``.
    transfers: tuple[TransferProgress, ...] = ()

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
        prepared=status.prepared,
        transfers=status.transfers,
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
    return WorkerStatus(
        base.worker_id,
        changes.observed_generation,
        tuple(vms),
        changes.prepared,
        changes.transfers,
    )


class StatusMerger:
    """``apply_status_changes`` for one status after another, in O(changes)
    plus a copy of the list (C speed) instead of a Python pass over every
    VM: it keeps the positions of the VMs of the status it merged last, so
    the next merge into *that* status (the master's session merges each
    report into what the last one left) replaces entries in place. A merge
    into any other status (the last merged was not stored, a whole report
    came between), or one that removes VMs, takes the plain path and
    re-indexes. Same result, same errors. One owner (not thread-safe)."""

    def __init__(self) -> None:
        self._last: WorkerStatus | None = None
        self._index: dict[str, int] = {}

    def merge(self, base: WorkerStatus, changes: StatusChanges) -> WorkerStatus:
        if changes.removed or changes.worker_id != base.worker_id:
            merged = apply_status_changes(base, changes)
            self._last = None
            return merged
        if self._last is not base:
            self._index = {vm.id: i for i, vm in enumerate(base.vms)}
            self._last = base
        index = self._index
        changed = changes.changed
        if len({vm.id for vm in changed}) != len(changed):
            return apply_status_changes(base, changes)  # raises, naming the VM
        vms = list(base.vms)
        for vm in changed:
            at = index.get(vm.id)
            if at is None:
                index[vm.id] = len(vms)
                vms.append(vm)
            else:
                vms[at] = vm
        merged = WorkerStatus(
            base.worker_id,
            changes.observed_generation,
            tuple(vms),
            changes.prepared,
            changes.transfers,
        )
        self._last = merged
        return merged


class StatusOutbox:
    """A worker's status as it reports it to the master, one session at a
    time (see the module docstring). Not thread-safe: one owner (the
    worker's link, on the trio thread).

    A report is *taken* (``take``), then exactly one of: ``delivered`` (the
    master acknowledged it), ``undelivered`` (it may not have arrived: what
    it carried is news again) or ``refused`` (the master holds no status of
    ours now: the next report is whole). ``new_session`` forgets what the
    master holds: the next report is whole."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self._vms: dict[str, VmStatus] = {}
        self._generation = 0
        self._published = False  # anything to report at all
        # Ids whose entry may differ from what the master holds (an ordered set).
        self._dirty: dict[str, None] = {}
        # What the master holds from this session; None: nothing.
        self._acked: dict[str, VmStatus] | None = None
        self._acked_generation = -1
        # The preparer's progress (whole), and what the master holds of it.
        self._prepared: tuple[PreparedImage, ...] = ()
        self._acked_prepared: tuple[PreparedImage, ...] | None = None
        # The moves' transfers (whole), and what the master holds of them.
        self._transfers: tuple[TransferProgress, ...] = ()
        self._acked_transfers: tuple[TransferProgress, ...] | None = None
        # A whole report was refused: send the next one only when there is news.
        self._held = False
        # The report taken and not settled yet: whole (a snapshot) or changes.
        self._in_flight: WorkerStatus | StatusChanges | None = None
        self._snapshot: dict[str, VmStatus] | None = None

    # -- what the worker publishes ------------------------------------------

    def publish(self, status: WorkerStatus) -> None:
        """Replace the whole status (O(VMs): for callers that only have a
        whole one). Entries are compared by identity first, then value."""
        self._check_worker(status.worker_id)
        old = self._vms
        new: dict[str, VmStatus] = {}
        for vm in status.vms:
            new[vm.id] = vm
            before = old.pop(vm.id, None)
            if before is not vm and before != vm:
                self._dirty[vm.id] = None
        for vm_id in old:  # no longer reported
            self._dirty[vm_id] = None
        self._vms = new
        self._generation = status.observed_generation
        self._published = True

    def publish_changes(self, changes: StatusChanges) -> None:
        """Merge what changed (O(changes)); a removed id that is not
        reported is ignored."""
        self._check_worker(changes.worker_id)
        vms = self._vms
        for vm in changes.changed:
            vms[vm.id] = vm
            self._dirty[vm.id] = None
        for vm_id in changes.removed:
            if vms.pop(vm_id, None) is not None:
                self._dirty[vm_id] = None
        self._generation = changes.observed_generation
        self._published = True

    def publish_prepared(self, prepared: tuple[PreparedImage, ...]) -> None:
        """Replace the preparer's progress (whole; it is short). It goes
        with the next report, but does not make one on its own before the
        VMs' status is first published (an empty status would tell the
        master the worker runs nothing)."""
        self._prepared = prepared

    def publish_transfers(self, transfers: tuple[TransferProgress, ...]) -> None:
        """Replace the moves' transfers' progress (whole; it is short), as
        ``publish_prepared``."""
        self._transfers = transfers

    def whole(self) -> WorkerStatus:
        """The whole status as published (O(VMs))."""
        return WorkerStatus(
            self.worker_id,
            self._generation,
            tuple(self._vms.values()),
            self._prepared,
            self._transfers,
        )

    @property
    def observed_generation(self) -> int:
        return self._generation

    # -- what the link sends ------------------------------------------------

    @property
    def has_news(self) -> bool:
        """Whether a report should be sent now (none is in flight)."""
        if not self._published or self._in_flight is not None:
            return False
        if self._acked is None:
            return not self._held or bool(self._dirty)
        return (
            bool(self._dirty)
            or self._generation != self._acked_generation
            or self._prepared != self._acked_prepared
            or self._transfers != self._acked_transfers
        )

    def take(self, *, changes: bool = True) -> WorkerStatus | StatusChanges | None:
        """The next report: what changed since the acknowledged status, or
        the whole status when the master holds none of this session's (or
        ``changes`` is False: a master that takes whole reports only).
        None when there is nothing to send."""
        if not self.has_news:
            return None
        acked = self._acked
        if acked is None or not changes:
            self._dirty.clear()
            self._held = False
            self._snapshot = dict(self._vms)
            report: WorkerStatus | StatusChanges = self.whole()
        else:
            changed: list[VmStatus] = []
            removed: list[str] = []
            vms = self._vms
            for vm_id in self._dirty:
                current = vms.get(vm_id)
                before = acked.get(vm_id)
                if current is None:
                    if before is not None:
                        removed.append(vm_id)
                elif current is not before and current != before:
                    changed.append(current)
            self._dirty.clear()
            if (
                not changed
                and not removed
                and self._generation == self._acked_generation
                and self._prepared == self._acked_prepared
                and self._transfers == self._acked_transfers
            ):
                return None
            report = StatusChanges(
                self.worker_id,
                self._generation,
                tuple(changed),
                tuple(removed),
                self._prepared,
                self._transfers,
            )
        self._in_flight = report
        return report

    def delivered(self) -> None:
        """The report taken was acknowledged: the master holds it now."""
        report, self._in_flight = self._take_in_flight()
        if isinstance(report, WorkerStatus):
            assert self._snapshot is not None
            self._acked, self._snapshot = self._snapshot, None
        else:
            acked = self._acked
            assert acked is not None  # changes are only taken against a base
            for vm in report.changed:
                acked[vm.id] = vm
            for vm_id in report.removed:
                acked.pop(vm_id, None)
        self._acked_generation = report.observed_generation
        self._acked_prepared = report.prepared
        self._acked_transfers = report.transfers

    def undelivered(self) -> None:
        """The report taken may not have arrived (the call failed or was
        cancelled): what it carried is news again. Whether the master took
        it is unknown, so a whole report follows on the next session (the
        link starts every session with ``new_session``)."""
        report, self._in_flight = self._take_in_flight()
        self._snapshot = None
        if isinstance(report, WorkerStatus):
            self._acked = None
        else:
            for vm in report.changed:
                self._dirty[vm.id] = None
            for vm_id in report.removed:
                self._dirty[vm_id] = None
            self._acked_generation = -1  # send the generation again too
            self._acked_prepared = None  # and what was prepared
            self._acked_transfers = None  # and the transfers

    def refused(self) -> None:
        """The master refused the report taken and holds no status of this
        session now. After refused changes the whole status follows at
        once; after a refused whole status, only once there is news (the
        same status would be refused again)."""
        report, self._in_flight = self._take_in_flight()
        self._snapshot = None
        self._acked = None
        self._held = isinstance(report, WorkerStatus)

    def new_session(self) -> None:
        """A new session: the master holds nothing of it (and nothing is in
        flight); the next report is whole."""
        self._in_flight = None
        self._snapshot = None
        self._acked = None
        self._held = False

    def _take_in_flight(self) -> tuple[WorkerStatus | StatusChanges, None]:
        report = self._in_flight
        if report is None:
            raise RuntimeError("no status report is in flight")
        return report, None

    def _check_worker(self, worker_id: str) -> None:
        if worker_id != self.worker_id:
            raise ValueError(
                f"status of worker {worker_id!r} published for worker {self.worker_id!r}"
            )
