"""The worker's long-lived objects and CPython's cyclic garbage collector.

Why (docs/BENCHMARKS.md, "the idle worker's collector", issue 31 target
3): a worker holding 1,000 VMs holds ~200,000 objects tracked by the
collector that live as long as their VMs (records, supervisors and their
threads, the metrics poll's kept samples) or the process (modules).
CPython's collector runs a *full* collection, a walk over all of them,
whenever ten younger collections passed and the objects promoted since the
last one exceed a quarter of the long-lived ones; an idle 1,000-VM worker
met both every 1-3.5 minutes, and each cost 83-107 ms of CPU on whichever
thread allocated when it tripped (the metrics poll's, or trio's): 1.4-1.8
ms/s in a 60 s window that held one, nothing in the others, the whole
difference between the windows that read under and over 1 % of a core.

What: once the fleet holds still, the worker collects once and *freezes*
(``gc.freeze``) every object alive: the collector never scans frozen
objects again, so a full collection walks only what was made since. "Holds
still" is the same VMs with the same VMM processes at two polls in a row
(``settle``, called by the metrics poll with each VM's ``(vm_id, pid)``):
after the start-up's re-adoption, after a burst of starts has ended.

The trade-off, and its bound: reference counting still frees every frozen
object that becomes unreachable without a cycle, but a *cycle* among frozen
objects that becomes garbage is never freed while it stays frozen. What
turns long-lived objects into garbage is a VM going away: removed, or its
VMM replaced or restarted (a new pid: its supervisor's state for the old
one). So the marks gone since the last freeze are counted, and the heap is
frozen again (unfreeze, one full collection, freeze) once the marks gone
plus the marks new reach a tenth of the marks frozen then (at least one)
and the fleet holds still, or at once when the marks gone alone reach two
tenths, however busy the fleet: of the VMs' own objects, what is held
uncollectable is never more than two tenths of a fleet's worth of gone
VMs' cycles. (Any other object alive at a freeze that later becomes cyclic
garbage is held until the next refreeze, and only VM churn brings one:
that is bounded by what was alive at the freeze, not by the churn. None
is known: a reconnect's old master session, the likeliest, is freed by
reference counting.) A refreeze whose collection did not run (another
thread's was under way) is no freeze: tried again at the next poll, its
churn still counted. Marks new count too
because their objects, not frozen yet, are walked by every full collection
until they are. A refreeze costs one full collection, what the collector
did by itself every two minutes before, and happens only after that much
churn (at 1,000 VMs: 100 VMs removed or added, or 50 replaced or
restarted, once still). Measured at 1,000 VMs (docs/BENCHMARKS.md):
removing 500 left no cycle at all (the refreeze found 0 unreachable
objects), replacing 100 left 73 objects; the bound guards against a cycle
a later change may add more than against today's.

Process-wide: ``gc.freeze`` and ``gc.unfreeze`` act on the whole process,
and a worker process runs one ``LongLivedHeap`` (``release`` unfreezes at
the worker's close, so an in-process worker of a test leaves the test's
process as it found it; two in one process only undo each other's freezes).

Threads: ``settle`` runs on the metrics poll's thread (one poll at a time),
``release`` on trio's after the poll ended; ``_lock`` makes them safe
anyway. It is held across the collection, whose finalizers may take other
locks; nothing takes ``_lock`` while holding another lock, so it is first
in any order.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CHURN_FRACTION",
    "CPythonCollector",
    "Collector",
    "Freeze",
    "LongLivedHeap",
    "Mark",
    "refreeze_due",
]

log = logging.getLogger(__name__)

# A VM and its VMM process: (vm_id, pid or None).
Mark = tuple[str, int | None]

# Marks gone plus new since the last freeze, as a fraction of the marks
# frozen, that make a still fleet freeze again (twice as many gone: at once).
CHURN_FRACTION = 0.1


class Collector(Protocol):
    """The cyclic collector's controls (``CPythonCollector``: the ``gc``
    module's; tests may pass a recording fake)."""

    def collect(self) -> int: ...

    def freeze(self) -> None: ...

    def unfreeze(self) -> None: ...

    def frozen(self) -> int: ...

    def full_collections(self) -> int:
        """How many full (generation 2) collections ran so far."""
        ...


class CPythonCollector:
    """The ``gc`` module's collector."""

    def collect(self) -> int:
        return gc.collect()

    def freeze(self) -> None:
        gc.freeze()

    def unfreeze(self) -> None:
        gc.unfreeze()

    def frozen(self) -> int:
        return gc.get_freeze_count()

    def full_collections(self) -> int:
        return int(gc.get_stats()[2]["collections"])


def refreeze_due(
    frozen: frozenset[Mark] | None, last: frozenset[Mark] | None, now: frozenset[Mark]
) -> bool:
    """Whether to freeze the heap now, given the marks frozen last time
    (None: never frozen), those of the last poll and those of this one
    (module docstring)."""
    still = now == last
    if frozen is None:
        return still
    gone = len(frozen - now)
    new = len(now - frozen)
    bound = max(1, int(len(frozen) * CHURN_FRACTION))
    return (still and gone + new >= bound) or gone >= 2 * bound


@dataclass(frozen=True)
class Freeze:
    """What one (re)freeze did."""

    vms: int
    gone: int  # marks frozen last time that are gone (0 for the first)
    new: int  # marks new since the last freeze (all of them for the first)
    collected: int  # unreachable objects the collection found
    frozen: int  # objects frozen now
    cpu_seconds: float  # the calling thread's CPU time for all of it


class LongLivedHeap:
    """Freezes the worker's long-lived objects when its fleet holds still,
    and again after enough churn (module docstring)."""

    def __init__(self, collector: Collector | None = None) -> None:
        self._collector = collector if collector is not None else CPythonCollector()
        self._lock = threading.Lock()
        self._frozen: frozenset[Mark] | None = None
        self._last: frozenset[Mark] | None = None

    def settle(self, marks: Iterable[Mark]) -> Freeze | None:
        """One poll's view of the fleet: freeze the heap if due (the
        freeze it did, else None)."""
        now = frozenset(marks)
        with self._lock:
            last, self._last = self._last, now
            frozen = self._frozen
            if not refreeze_due(frozen, last, now):
                return None
            began = time.thread_time()
            full = self._collector.full_collections()
            self._collector.unfreeze()
            collected = self._collector.collect()
            self._collector.freeze()
            if self._collector.full_collections() == full:
                # ``gc.collect`` returns at once while another thread's
                # collection is under way (one whose finalizer let go of the
                # GIL): nothing was collected, so the gone VMs' cycles are
                # frozen again. Not counted as a freeze: tried again at the
                # next poll, the churn since the last one still counted.
                log.debug("no full collection ran (another was under way): refreeze postponed")
                return None
            self._frozen = now
            done = Freeze(
                vms=len(now),
                gone=len(frozen - now) if frozen is not None else 0,
                new=len(now - frozen) if frozen is not None else len(now),
                collected=collected,
                frozen=self._collector.frozen(),
                cpu_seconds=time.thread_time() - began,
            )
        log.info(
            "froze the worker's long-lived objects: %d VMs (%d gone, %d new since the last "
            "freeze), %d objects frozen, %d unreachable collected, %.0f ms of CPU",
            done.vms,
            done.gone,
            done.new,
            done.frozen,
            done.collected,
            done.cpu_seconds * 1000,
        )
        return done

    def release(self) -> None:
        """Unfreeze everything (the worker closes): the collector scans
        the whole heap again."""
        with self._lock:
            if self._frozen is not None:
                self._collector.unfreeze()
            self._frozen = None
            self._last = None
