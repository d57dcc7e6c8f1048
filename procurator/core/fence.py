"""The worker-side fence: a worker cut off from every master stops running
the VMs the master may place elsewhere (docs/SCHEDULING.md, issue 27).

Healing (``procurator.master.scheduling``) re-places a lost worker's
``on_worker_lost = "reschedule"`` VMs once its lease expired. A lost worker
is not necessarily dead: partitioned from the masters, or with its masters
gone, it would go on running those VMs, and each would run twice. So the
master marks each such VM in the assignment it sends
(``VmAssignment.reschedule``), and a worker that has not heard from any
master for ``fence_after`` seconds *fences* them: their desired power
becomes ``PAUSED`` (``fenced_entry``) until a master answers again. ``wait``
VMs (unmarked, and every VM of an older master) keep running.

Invariants:

- **The timing.** The master declares a worker lost a whole lease after it
  last heard of it; when the master holding the worker's session dies or
  freezes, that is the session's last renewal, which may be up to a third
  of a lease (the renewal period) before the worker's last answer from
  that master. So the worker's VMs are re-placed no earlier than
  ``2/3 x lease`` after the worker's last contact, and the fence must have
  taken hold by then::

      fence_after + time to fence a VM < 2/3 x worker lease

  With the defaults, 12 s + one VMM API call (the pause; its timeout is
  5 s) < 20 s (the master's ``--worker-lease`` 30 s). The pauses go
  through the reconciler, ``--concurrency`` VMs at a time. ``check_fence_after``
  enforces the relation where both figures are known; a worker does not
  know its masters' lease, so ``--fence-after`` documents it.
- **Pause, not power-off.** Pausing a VM is one VMM call whose time is
  bounded; a power-off is the stop ladder (up to ``--stop-grace``, 30 s by
  default, then more), which no lease could wait for. A paused VM runs
  nothing: no guest CPU, no I/O. Its durable state stays.
- **Contact first, then the current assignment.** A fence ends only when
  a whole assignment pulled (or pushed) after a master answered again has
  been handed over (``procurator.worker.link``): a VM the master moved
  away is then removed, one still assigned resumes. No fenced VM resumes
  on an assignment older than the fence.
- Only ``RUNNING`` entries are fenced: a VM desired paused or stopped is
  already not running.
- **A restart while cut off.** The mark is recorded in each VM's durable
  ``vm.json`` (``VmSpec.reschedule``), so a worker restarted while no
  master answers, which holds no assignment, fences the VMs it re-adopted
  that the mark names (``WorkerRuntime._fence_recovered``).
"""

from __future__ import annotations

import dataclasses
import math

from procurator.core.models import PowerState, VmAssignment

__all__ = [
    "DEFAULT_FENCE_AFTER",
    "FENCE_POWER",
    "check_fence_after",
    "fence_due",
    "fence_message",
    "fenced_entry",
    "fences",
    "heartbeat_interval",
]

# Below 2/3 of the master's default --worker-lease (30 s) with room for
# the pause and for clocks that run at slightly different rates.
DEFAULT_FENCE_AFTER = 12.0
FENCE_POWER = PowerState.PAUSED


def check_fence_after(fence_after: float, *, worker_lease: float | None = None) -> float:
    """``fence_after`` if it is a usable fence delay, else ``ValueError``
    naming the problem: positive and finite, and below ``2/3`` of
    ``worker_lease`` when that is known (see the module docstring)."""
    if not math.isfinite(fence_after) or fence_after <= 0:
        raise ValueError(f"the fence delay must be a positive number of seconds, not {fence_after}")
    if worker_lease is not None and not fence_after < 2 * worker_lease / 3:
        raise ValueError(
            f"a fence after {fence_after:g} s comes too late for a worker lease of "
            f"{worker_lease:g} s: the master may re-place a worker's VMs 2/3 of a lease "
            f"({2 * worker_lease / 3:g} s) after the worker last heard from it"
        )
    return fence_after


def heartbeat_interval(fence_after: float) -> float:
    """How often a connected worker must hear from a master so that a
    healthy link never fences: four chances per fence delay."""
    return fence_after / 4


def fence_due(last_contact: float, now: float, fence_after: float) -> bool:
    """Has the worker gone ``fence_after`` seconds without a master's
    answer (times on one monotonic clock)?"""
    return now - last_contact >= fence_after


def fences(reschedule: bool, power: PowerState) -> bool:
    """Does the fence pause a VM so marked and desired ``power``? Only a
    ``reschedule`` one desired running (a ``wait`` VM keeps running; one
    desired paused or stopped already runs nothing)."""
    return reschedule and power is PowerState.RUNNING


def fenced_entry(vm: VmAssignment) -> VmAssignment | None:
    """What ``vm``'s desired entry becomes while the worker is fenced, or
    None when the fence leaves it as it is (``fences``)."""
    if not fences(vm.reschedule, vm.power):
        return None
    return dataclasses.replace(vm, power=FENCE_POWER)


def fence_message(seconds: float) -> str:
    """The event a fenced VM gets."""
    return (
        f"fenced: no master for {seconds:.0f} s; the master may reschedule it "
        "(paused until a master answers)"
    )
