"""The master's side of placement: facts from its store, the scheduler's
answer turned into assignments (docs/SCHEDULING.md, issue 27).

``core.placement.place`` is pure; this module decides what it is fed.

- **Facts.** Every worker the store knows, or that an assignment names, is
  passed (none is *gone*): capacity, labels and overcommit ratios as it
  last reported them at registration (``WorkerInfo``), its state, and the
  store paths of the VMs it is assigned as the images it holds (it
  realised them, or is realising them: a move towards it downloads
  nothing). A worker whose session is connected (to any master) is
  ``ready``; one registered but not connected is ``cordoned`` — it keeps
  its VMs and takes no new ones — until the leader declares it ``lost``
  (``heal``); one never registered offers nothing (``cordoned``, no
  capacity). So an apply never moves a VM off a worker that may still run
  it: only healing does, after the worker's lease expired.
- **Previous placement** is the stored assignments: an unpinned VM keeps
  the worker it is assigned to (stability), and every master computes the
  same answer from the same store.
- **Refusal.** A fleet with a VM that fits nowhere is refused whole with
  ``ValidationError`` (``unplaceable_error``): one line per VM and its
  shortfall; nothing is stored.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from procurator.core.fleet import resolve_fleet
from procurator.core.models import (
    Assignment,
    Capacity,
    Fleet,
    Placement,
    Unplaceable,
    WorkerFacts,
    WorkerInfo,
    WorkerState,
)
from procurator.core.placement import place, unplaceable_error

__all__ = ["KnownWorker", "resolve", "worker_facts"]


@dataclass(frozen=True, slots=True)
class KnownWorker:
    """A worker as the master's store shows it: what it said at its latest
    registration (None: never registered) and whether that session is
    connected."""

    worker_id: str
    info: WorkerInfo | None
    connected: bool
    lost: bool = False  # the leader declared its lease expired (healing)


def worker_facts(
    known: Iterable[KnownWorker], assignments: Mapping[str, Assignment]
) -> list[WorkerFacts]:
    """The scheduler's view of every worker in ``known`` or ``assignments``."""
    by_id = {k.worker_id: k for k in known}
    facts = []
    for worker_id in sorted(set(by_id) | set(assignments)):
        worker = by_id.get(worker_id)
        assignment = assignments.get(worker_id)
        images = (
            frozenset(vm.nix_store_path for vm in assignment.vms) if assignment else frozenset()
        )
        info = worker.info if worker is not None else None
        if worker is not None and worker.lost:
            state = WorkerState.LOST
        elif worker is not None and worker.connected and info is not None:
            state = WorkerState.READY
        else:
            state = WorkerState.CORDONED
        if info is None:
            facts.append(WorkerFacts(worker_id, Capacity(), 1.0, 1.0, (), state, images))
            continue
        facts.append(
            WorkerFacts(
                worker_id,
                info.capacity,
                info.cpu_overcommit,
                info.memory_overcommit,
                info.labels,
                state,
                images,
            )
        )
    return facts


def resolve(
    fleet: Fleet, facts: Iterable[WorkerFacts], assignments: Mapping[str, Assignment]
) -> tuple[Fleet, Placement | None]:
    """``fleet`` with its unpinned VMs placed (a fleet without any is
    returned as it is, with no placement: pinned fleets apply exactly as
    before). Raises ``ValidationError`` when some VM fits nowhere."""
    if not fleet.unpinned:
        return fleet, None
    answer = place(fleet, facts, {w: a.vms for w, a in assignments.items()})
    if isinstance(answer, Unplaceable):
        raise unplaceable_error(answer)
    return resolve_fleet(fleet, answer), answer
