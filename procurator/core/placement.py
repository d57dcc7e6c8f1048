"""The scheduler: on which worker each unpinned VM of a fleet runs.

``place(fleet, workers, previous) -> Placement | Unplaceable`` is a pure
function (no clock, no randomness, no I/O; iteration never depends on the
order of a set of strings, so ``PYTHONHASHSEED`` cannot change an answer).
The master feeds it facts from its store and carries out its answer; the
whole design, with examples, is docs/SCHEDULING.md.

What it promises:

- **Capacity**: on no worker do the VMs (pinned and placed) need more than
  it offers: ``floor(host vCPUs * cpu_overcommit)`` vCPUs,
  ``floor(host MiB * memory_overcommit)`` MiB, and ``capacity.max_vms`` VMs
  (else ``LIMITS.max_vms_per_worker``). Pinned VMs are counted first and
  are never refused: a worker they overfill gets a warning and no unpinned
  VM (the pin is the operator's decision; today's pinned fleets apply as
  before). A pinned VM that declares no ``vcpus``/``memory_mib`` counts as
  0 (the master does not read images), with a warning. A VM moving to a
  worker (``WorkerFacts.incoming``: a move under way, not yet switched)
  counts on it right after its pinned VMs, and on its source as any VM
  there does, so no placement hands out the room a move holds.
  ``worker_room`` is that count for one worker (``procurator describe
  worker``: used and total of each resource).
- **Constraints**: an unpinned VM only runs on a worker whose labels include
  every ``key = value`` of its ``constraints``.
- **States**: new VMs go only to ``ready`` workers. A ``cordoned`` worker
  keeps its VMs; a ``draining`` one loses all its unpinned VMs; a ``lost``
  one loses its ``reschedule`` VMs and keeps its ``wait`` VMs (listed in
  ``Placement.unavailable`` with the pinned VMs of lost workers). A worker
  absent from ``workers`` is gone: its VMs are placed anew.
- **Stability**: an unpinned VM keeps the worker ``previous`` gives it
  (also a VM that was pinned there before) unless that worker is gone,
  draining or lost (and the VM says ``reschedule``), its labels no longer
  match, or the VM no longer fits; one that must leave its worker while
  it is moving goes to its move's target (ready, its labels matching),
  where it already counts. Kept VMs are counted before anything is
  placed, those whose resources did not change first, so a change to other
  unpinned VMs — added, removed, resized — never moves a VM (pinned VMs
  count before all of them: a pinned VM that grows can). Placing never
  moves a VM to make room, and nothing is rebalanced when workers are added.
- **Spread**: a VM of a ``spread`` group goes to a fitting worker holding
  the fewest VMs of its group, so a group shares no worker while the
  fitting workers outnumber it, and otherwise is as even as they allow.
  Spread decides where VMs being placed go; it never moves a kept VM.
- **Choice**: among the fitting workers (fewest of the group first), the
  strategy ranks by free amount of the *ranking resource* — memory or
  vCPUs, whichever the fleet needs the larger share of — then of the other:
  ``binpack`` takes the least free (best fit), ``spread`` the most free.
  Between workers ranked equal, one that has realised the VM's image wins
  (a move downloads nothing), then the lower worker id.
- **Refusal**: if any VM fits nowhere, the answer is ``Unplaceable``,
  naming every such VM with what it needs, the best worker's free capacity
  and how many workers its constraints and worker states excluded.

The algorithm: count pinned and kept VMs, then place the rest, the most
constrained first (fewest ready workers whose labels match), then the
largest (by the ranking resource, then the other; a spread group's VMs of
one size one after another; then by id). Each distinct set of constraints
has a
*pool*: its ready workers in a list sorted by the strategy's key
``(±free ranking, ±free other, rank)``, so the workers that fit the ranking
resource are a bisected slice and the first in it that fits the rest is the
answer — O(log W) plus the entries skipped. A placement moves one worker in
each pool that holds it (a C-level list insert). A worker that cannot take
even the smallest VM left is dropped from every pool, so full workers are
not scanned again. A spread group with many members on its pool gets, while
its run lasts, one such list per member count (workers holding 0, 1, 2, ...
of it). 100,000 VMs onto 1,000 workers takes about a second here
(``python -m bench --only placement``; docs/SCHEDULING.md).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from procurator.core.errors import ValidationError
from procurator.core.models import (
    Fleet,
    OnWorkerLost,
    Placement,
    PlacementReason,
    PlacementStrategy,
    Shortfall,
    UnpinnedVm,
    Unplaceable,
    VmAssignment,
    VmPlacement,
    WorkerFacts,
    WorkerState,
)
from procurator.core.validation import LIMITS, check_overcommit

__all__ = ["Room", "WorkerRoom", "offered", "place", "unplaceable_error", "worker_room"]

# A spread group with at least this many VMs placed gets per-count lists
# for its run (see _Scheduler._grouped); below it, skipping its holders
# while scanning the pool is cheaper. Changes speed only, never the answer.
_LEVELS_FROM = 8

_Key = tuple[int, int, int]
_NOTHING: frozenset[int] = frozenset()


def place(
    fleet: Fleet,
    workers: Iterable[WorkerFacts],
    previous: Mapping[str, Iterable[VmAssignment]] | None = None,
) -> Placement | Unplaceable:
    """Place ``fleet``'s unpinned VMs on ``workers`` (every worker the master
    knows, lost ones included: one missing is *gone*). ``previous`` is what
    each worker was assigned before (worker id -> its VMs, pinned and
    placed: the master's current assignments), for stability.

    ``fleet`` must be valid (``validate_fleet``). Raises ``ValueError`` for
    workers given twice or an overcommit ratio out of range."""
    return _Scheduler(fleet, tuple(workers), previous or {}).run()


def offered(facts: WorkerFacts) -> tuple[int, int, int]:
    """What a worker offers placement: ``floor(host vCPUs *
    cpu_overcommit)`` vCPUs, ``floor(host MiB * memory_overcommit)`` MiB
    and ``capacity.max_vms`` VMs (else ``LIMITS.max_vms_per_worker``)."""
    return (
        int(facts.capacity.vcpus * facts.cpu_overcommit),
        int(facts.capacity.memory_mib * facts.memory_overcommit),
        facts.capacity.max_vms or LIMITS.max_vms_per_worker,
    )


@dataclass(frozen=True, slots=True)
class Room:
    """One resource of a worker as placement counts it: ``total`` what it
    offers, ``used`` what its VMs and those moving to it take; ``free``
    is negative when pinned VMs overfill it."""

    used: int
    total: int

    @property
    def free(self) -> int:
        return self.total - self.used


@dataclass(frozen=True, slots=True)
class WorkerRoom:
    """A worker's room as ``place`` sees it before it places anything
    (``worker_room``); ``undeclared``: its VMs (moving in included) that
    declare no vcpus or memory_mib, counted as 0 of them."""

    vcpus: Room
    memory_mib: Room
    vms: Room
    undeclared: int = 0


def worker_room(facts: WorkerFacts, vms: Iterable[VmAssignment]) -> WorkerRoom:
    """The room of the worker ``facts`` describes, holding ``vms`` (its
    assignment's, pinned and unpinned) and the VMs moving to it
    (``facts.incoming``), which hold their room until their move ends."""
    cpu, mem, count = offered(facts)
    holding = [*vms, *facts.incoming]
    return WorkerRoom(
        Room(sum(vm.vcpus for vm in holding), cpu),
        Room(sum(vm.memory_mib for vm in holding), mem),
        Room(len(holding), count),
        sum(1 for vm in holding if not vm.vcpus or not vm.memory_mib),
    )


def unplaceable_error(answer: Unplaceable) -> ValidationError:
    """The error an apply is refused with: one detail line per VM."""
    return ValidationError(answer.message, details=[s.message for s in answer.vms])


# ---------------------------------------------------------------- formatting


def _mib(value: int) -> str:
    value = max(value, 0)
    return f"{value // 1024} GiB" if value and value % 1024 == 0 else f"{value} MiB"


def _resources(vcpus: int, memory_mib: int) -> str:
    return f"{max(vcpus, 0)} vCPU/{_mib(memory_mib)}"


def _labels_match(labels: Mapping[str, str], constraints: Sequence[tuple[str, str]]) -> bool:
    return all(labels.get(key) == value for key, value in constraints)


# ---------------------------------------------------------------- the index


class _Pool:
    """Workers sorted by the strategy's key ``(sign * free ranking resource,
    sign * free other resource, rank)``: ascending order is preference
    order (``sign`` is +1 for binpack, -1 for spread). ``members`` are the
    ranks in ``keys``."""

    __slots__ = ("keys", "members", "owner")

    def __init__(self, owner: _Scheduler, keys: list[_Key]) -> None:
        self.owner = owner
        self.keys = keys  # sorted
        self.members = {key[2] for key in keys}

    def add(self, key: _Key) -> None:
        insort(self.keys, key)
        self.members.add(key[2])

    def remove(self, key: _Key) -> None:
        keys = self.keys
        index = bisect_left(keys, key)
        assert keys[index] == key, "a pool lost track of a worker's key"
        del keys[index]
        self.members.discard(key[2])

    def first_fit(
        self, need_p: int, need_s: int, skip: Mapping[int, int] | frozenset[int], image: set[int]
    ) -> int:
        """The rank of the preferred worker that fits (not in ``skip``), or
        -1. Among workers with its exact key but for the rank, one in
        ``image`` (holding the VM's image) wins."""
        s = self.owner
        keys, free_s, free_n = self.keys, s.free_s, s.free_n
        if s.sign > 0:
            i, hi = bisect_left(keys, (need_p,)), len(keys)
        else:
            i, hi = 0, bisect_left(keys, (1 - need_p,))
        while i < hi:
            key = keys[i]
            rank = key[2]
            if free_s[rank] >= need_s and free_n[rank] > 0 and rank not in skip:
                if image and rank not in image:
                    holder = self._holder_tied(key, i, hi, skip, image)
                    if holder >= 0:
                        return holder
                return rank
            i += 1
        return -1

    def _holder_tied(
        self,
        key: _Key,
        i: int,
        hi: int,
        skip: Mapping[int, int] | frozenset[int],
        image: set[int],
    ) -> int:
        """The lowest-ranked worker after position ``i`` with ``key``'s free
        amounts that holds the image and can take a VM, or -1. Equal free
        amounts mean the same fit but for the VM count, checked here. Walks
        the tied run or the holders, whichever is shorter."""
        s = self.owner
        keys, free_n = self.keys, s.free_n
        end = bisect_left(keys, (key[0], key[1] + 1), i + 1, hi)
        if end - i - 1 <= len(image):
            for t in range(i + 1, end):
                rank = keys[t][2]
                if rank in image and free_n[rank] > 0 and rank not in skip:
                    return rank
            return -1
        best = -1
        members, free_p, free_s, sign = self.members, s.free_p, s.free_s, s.sign
        for rank in image:
            if (
                rank > key[2]
                and (best < 0 or rank < best)
                and rank in members
                and sign * free_p[rank] == key[0]
                and sign * free_s[rank] == key[1]
                and free_n[rank] > 0
                and rank not in skip
            ):
                best = rank
        return best


@dataclass(slots=True)
class _ToPlace:
    unpinned: UnpinnedVm
    need_p: int  # of the ranking resource
    need_s: int  # of the other one
    reason: PlacementReason
    previous_worker: str = ""
    detail: str = ""


# ---------------------------------------------------------------- the run


class _Scheduler:
    """One call of ``place``: the state it builds and throws away."""

    def __init__(
        self,
        fleet: Fleet,
        workers: tuple[WorkerFacts, ...],
        previous: Mapping[str, Iterable[VmAssignment]],
    ) -> None:
        self.fleet = fleet
        self.facts = sorted(workers, key=lambda w: w.worker_id)
        self.rank: dict[str, int] = {}
        for index, facts in enumerate(self.facts):
            if facts.worker_id in self.rank:
                raise ValueError(f"worker {facts.worker_id!r} is given twice")
            for name in ("cpu_overcommit", "memory_overcommit"):
                if (problem := check_overcommit(getattr(facts, name))) is not None:
                    raise ValueError(f"worker {facts.worker_id!r}: {name}: {problem}")
            self.rank[facts.worker_id] = index
        self.previous = previous
        self.labels = [dict(f.labels) for f in self.facts]
        self.state = [f.state for f in self.facts]
        # Free vCPUs, MiB and VM slots; vcpus/memory become the ranking
        # ("p") and the other ("s") resource once the fleet is known.
        offers = [offered(f) for f in self.facts]
        self.free_cpu = [cpu for cpu, _, _ in offers]
        self.free_mem = [mem for _, mem, _ in offers]
        self.free_n = [count for _, _, count in offers]
        self.allocatable = list(zip(self.free_cpu, self.free_mem, strict=True))
        # VM id -> the rank of the worker it is moving to.
        self.moving_to = {vm.id: rank for rank, f in enumerate(self.facts) for vm in f.incoming}
        self.free_p: list[int] = []
        self.free_s: list[int] = []
        self.sign = -1 if fleet.placement.strategy is PlacementStrategy.SPREAD else 1
        self.unavailable: list[str] = []
        self.warnings: list[str] = []
        self.decided: list[VmPlacement] = []
        self.group_counts: dict[str, dict[int, int]] = {}
        self.pools: dict[tuple[tuple[str, str], ...], _Pool] = {}
        # Ready workers by label set, and the matches per set of constraints.
        self.classes: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for rank, facts in enumerate(self.facts):
            if facts.state is WorkerState.READY:
                self.classes.setdefault(tuple(sorted(facts.labels)), []).append(rank)
        self.eligible: dict[tuple[tuple[str, str], ...], list[int]] = {}
        self.pools_of: list[list[_Pool]] = [[] for _ in self.facts]
        # The current spread group's per-count lists, for (group, constraints).
        self.levels: dict[int, _Pool] | None = None
        self.levels_for: tuple[str, tuple[tuple[str, str], ...]] = ("", ())
        self.min_p = self.min_s = 0

    # -- the steps ------------------------------------------------------------

    def run(self) -> Placement | Unplaceable:
        self._count_pinned()
        self._count_incoming()
        to_place = self._keep_or_release()
        ranked_by = self._choose_ranking(to_place)
        failed = self._place_all(to_place)
        if failed:
            return Unplaceable(tuple(sorted(self._shortfalls(failed), key=lambda s: s.vm_id)))
        return Placement(
            vms=tuple(sorted(self.decided, key=lambda p: p.vm_id)),
            unavailable=tuple(sorted(self.unavailable)),
            warnings=tuple(self.warnings),
            ranked_by=ranked_by,
        )

    def _count_pinned(self) -> None:
        undeclared: dict[int, int] = {}
        for worker_id, vms in self.fleet.workers:
            rank = self.rank.get(worker_id)
            if rank is None:
                continue  # not known yet: it gets its VMs when it registers
            for vm in vms:
                self.free_cpu[rank] -= vm.vcpus
                self.free_mem[rank] -= vm.memory_mib
                self.free_n[rank] -= 1
                if not vm.vcpus or not vm.memory_mib:
                    undeclared[rank] = undeclared.get(rank, 0) + 1
            if self.state[rank] is WorkerState.LOST:
                self.unavailable.extend(vm.id for vm in vms)
            if min(self.free_cpu[rank], self.free_mem[rank], self.free_n[rank]) < 0:
                cpu, mem = self.allocatable[rank]
                self.warnings.append(
                    f"worker {worker_id}: its pinned VMs need more than it offers "
                    f"({_resources(cpu - self.free_cpu[rank], mem - self.free_mem[rank])} in "
                    f"{len(vms)} VM(s); it offers {_resources(cpu, mem)} and "
                    f"{self.free_n[rank] + len(vms)} VMs): it takes no unpinned VM"
                )
        if self.fleet.unpinned:
            for rank, count in sorted(undeclared.items()):
                self.warnings.append(
                    f"worker {self.facts[rank].worker_id}: {count} pinned VM(s) declare no "
                    "vcpus/memory_mib and count as 0 against its capacity"
                )

    def _count_incoming(self) -> None:
        """Count the VMs moving to each worker against its capacity (they
        hold that room until their move ends)."""
        for rank, facts in enumerate(self.facts):
            for vm in facts.incoming:
                self.free_cpu[rank] -= vm.vcpus
                self.free_mem[rank] -= vm.memory_mib
                self.free_n[rank] -= 1

    def _previous_index(self) -> dict[str, tuple[str, int, int]]:
        """VM id -> (worker id, vcpus, memory_mib) it had before. A VM listed
        twice keeps the lower worker id."""
        index: dict[str, tuple[str, int, int]] = {}
        for worker_id in sorted(self.previous):
            for vm in self.previous[worker_id]:
                index.setdefault(vm.id, (worker_id, vm.vcpus, vm.memory_mib))
        return index

    def _keep_or_release(self) -> list[_ToPlace]:
        """Decide which unpinned VMs stay where they were (and count them);
        return the others with the reason they need a worker."""
        before = self._previous_index() if self.previous else {}
        to_place: list[_ToPlace] = []
        # Per worker: (resources changed?, VM id, VM): the unchanged first.
        staying: dict[int, list[tuple[bool, str, UnpinnedVm]]] = {}

        def release(u: UnpinnedVm, reason: PlacementReason, worker: str, detail: str) -> None:
            target = self.moving_to.get(u.id)
            if (
                target is not None
                and self.state[target] is WorkerState.READY
                and _labels_match(self.labels[target], u.constraints)
            ):
                # Moving already: its move's target holds its room.
                if u.spread:
                    counts = self.group_counts.setdefault(u.spread, {})
                    counts[target] = counts.get(target, 0) + 1
                target_id = self.facts[target].worker_id
                self.decided.append(VmPlacement(u.id, target_id, reason, worker, detail))
                return
            to_place.append(_ToPlace(u, 0, 0, reason, worker, detail))

        for u in self.fleet.unpinned:
            had = before.get(u.id)
            if had is None:
                release(u, PlacementReason.NEW, "", "")
                continue
            worker_id, vcpus, memory = had
            rank = self.rank.get(worker_id)
            if rank is None:
                release(u, PlacementReason.WORKER_GONE, worker_id, "")
                continue
            state = self.state[rank]
            if state is WorkerState.LOST:
                if u.on_worker_lost is OnWorkerLost.WAIT:
                    # Never moved while its worker may still run it.
                    self.decided.append(
                        VmPlacement(u.id, worker_id, PlacementReason.KEPT, worker_id)
                    )
                    self.unavailable.append(u.id)
                else:
                    release(u, PlacementReason.WORKER_LOST, worker_id, "")
            elif state is WorkerState.DRAINING:
                release(u, PlacementReason.WORKER_DRAINING, worker_id, "")
            elif not _labels_match(self.labels[rank], u.constraints):
                missing = [f"{k}={v}" for k, v in u.constraints if self.labels[rank].get(k) != v]
                release(u, PlacementReason.CONSTRAINTS, worker_id, "lacks " + ", ".join(missing))
            else:
                changed = (vcpus, memory) != (u.vm.vcpus, u.vm.memory_mib)
                staying.setdefault(rank, []).append((changed, u.id, u))
        for rank in sorted(staying):
            worker_id = self.facts[rank].worker_id
            for _, _, u in sorted(staying[rank], key=lambda item: item[:2]):
                cpu, mem = u.vm.vcpus, u.vm.memory_mib
                free_cpu, free_mem = self.free_cpu[rank], self.free_mem[rank]
                if free_cpu >= cpu and free_mem >= mem and self.free_n[rank] > 0:
                    self.free_cpu[rank] -= cpu
                    self.free_mem[rank] -= mem
                    self.free_n[rank] -= 1
                    if u.spread:
                        counts = self.group_counts.setdefault(u.spread, {})
                        counts[rank] = counts.get(rank, 0) + 1
                    self.decided.append(
                        VmPlacement(u.id, worker_id, PlacementReason.KEPT, worker_id)
                    )
                else:
                    detail = (
                        f"needs {_resources(cpu, mem)}, {worker_id} has "
                        f"{_resources(free_cpu, free_mem)} free"
                        if self.free_n[rank] > 0
                        else f"{worker_id} holds its limit of VMs"
                    )
                    release(u, PlacementReason.NO_LONGER_FITS, worker_id, detail)
        return to_place

    def _choose_ranking(self, to_place: list[_ToPlace]) -> str:
        """Rank by the resource the fleet needs the larger share of, over
        the ready workers' offer (memory on a tie); fill in the needs."""
        need_cpu = need_mem = 0
        for _, vms in self.fleet.workers:
            for vm in vms:
                need_cpu += vm.vcpus
                need_mem += vm.memory_mib
        for u in self.fleet.unpinned:
            need_cpu += u.vm.vcpus
            need_mem += u.vm.memory_mib
        offer_cpu = offer_mem = 0
        for rank, (cpu, mem) in enumerate(self.allocatable):
            if self.state[rank] is WorkerState.READY:
                offer_cpu += cpu
                offer_mem += mem
        # need_mem / offer_mem >= need_cpu / offer_cpu, without division.
        by_memory = need_mem * offer_cpu >= need_cpu * offer_mem
        if by_memory:
            self.free_p, self.free_s = self.free_mem, self.free_cpu
        else:
            self.free_p, self.free_s = self.free_cpu, self.free_mem
        for item in to_place:
            cpu, mem = item.unpinned.vm.vcpus, item.unpinned.vm.memory_mib
            item.need_p, item.need_s = (mem, cpu) if by_memory else (cpu, mem)
        if to_place:
            self.min_p = min(item.need_p for item in to_place)
            self.min_s = min(item.need_s for item in to_place)
        return "memory" if by_memory else "vcpus"

    # -- placing ----------------------------------------------------------------

    def _key(self, rank: int) -> _Key:
        sign = self.sign
        return (sign * self.free_p[rank], sign * self.free_s[rank], rank)

    def _alive(self, rank: int) -> bool:
        """Can the worker still take the smallest VM left to place?"""
        return (
            self.free_p[rank] >= self.min_p
            and self.free_s[rank] >= self.min_s
            and self.free_n[rank] > 0
        )

    def _eligible(self, constraints: tuple[tuple[str, str], ...]) -> list[int]:
        """The ready workers whose labels match, by rank: matched once per
        distinct label set, not once per worker."""
        found = self.eligible.get(constraints)
        if found is None:
            found = sorted(
                rank
                for labels, ranks in self.classes.items()
                if _labels_match(dict(labels), constraints)
                for rank in ranks
            )
            self.eligible[constraints] = found
        return found

    def _pool(self, constraints: tuple[tuple[str, str], ...]) -> _Pool:
        pool = self.pools.get(constraints)
        if pool is None:
            ranks = [rank for rank in self._eligible(constraints) if self._alive(rank)]
            pool = _Pool(self, sorted(self._key(rank) for rank in ranks))
            for rank in ranks:
                self.pools_of[rank].append(pool)
            self.pools[constraints] = pool
        return pool

    def _place_all(self, to_place: list[_ToPlace]) -> list[_ToPlace]:
        wanted = {item.unpinned.vm.nix_store_path for item in to_place}
        holders: dict[str, set[int]] = {}
        for rank, facts in enumerate(self.facts):
            for path in facts.images & wanted:  # order does not matter: sets
                holders.setdefault(path, set()).add(rank)
        # The most constrained first (fewest workers to choose from), then
        # the largest: what only a few workers can take gets them before
        # VMs that could have gone anywhere fill them.
        choice = {u.constraints: len(self._eligible(u.constraints)) for u in self.fleet.unpinned}
        to_place.sort(
            key=lambda t: (
                choice[t.unpinned.constraints],
                -t.need_p,
                -t.need_s,
                t.unpinned.spread,
                t.unpinned.id,
            )
        )
        failed: list[_ToPlace] = []
        no_holders: set[int] = set()
        for item in to_place:
            u = item.unpinned
            pool = self._pool(u.constraints)
            image = holders.get(u.vm.nix_store_path, no_holders)
            if u.spread:
                rank = self._grouped(item, pool, image)
            else:
                rank = pool.first_fit(item.need_p, item.need_s, _NOTHING, image)
            if rank < 0:
                failed.append(item)
                continue
            self._take(rank, item)
            self.decided.append(
                VmPlacement(
                    u.id,
                    self.facts[rank].worker_id,
                    item.reason,
                    item.previous_worker,
                    item.detail,
                )
            )
        return failed

    def _grouped(self, item: _ToPlace, pool: _Pool, image: set[int]) -> int:
        """A spread group's VM: the preferred fitting worker among those
        holding the fewest of its group. Small groups: scan the pool past
        the workers holding some (level 0), then build the levels if none
        fits. Large groups: per-count lists (``levels``), kept while VMs
        of this group and pool are placed one after another."""
        group = item.unpinned.spread
        counts = self.group_counts.setdefault(group, {})
        run = (group, item.unpinned.constraints)
        if self.levels_for != run:
            self.levels, self.levels_for = None, run
        if self.levels is None:
            if len(counts) < _LEVELS_FROM:
                rank = pool.first_fit(item.need_p, item.need_s, counts, image)
                if rank >= 0 or not counts:
                    return rank
            self.levels = self._build_levels(pool, counts)
        for _, level in sorted(self.levels.items()):
            rank = level.first_fit(item.need_p, item.need_s, _NOTHING, image)
            if rank >= 0:
                return rank
        return -1

    def _build_levels(self, pool: _Pool, counts: dict[int, int]) -> dict[int, _Pool]:
        by_count: dict[int, list[_Key]] = {}
        for key in pool.keys:  # sorted, so every level is too
            by_count.setdefault(counts.get(key[2], 0), []).append(key)
        return {count: _Pool(self, keys) for count, keys in by_count.items()}

    def _take(self, rank: int, item: _ToPlace) -> None:
        """Count ``item`` on ``rank``; move the worker in every list that
        holds it (or drop it when it cannot take the smallest VM left)."""
        old = self._key(rank)
        self.free_p[rank] -= item.need_p
        self.free_s[rank] -= item.need_s
        self.free_n[rank] -= 1
        alive = self._alive(rank)
        new = self._key(rank)
        for pool in self.pools_of[rank]:
            pool.remove(old)
            if alive:
                pool.add(new)
        group = item.unpinned.spread
        levels = self.levels
        if levels is not None and (group, item.unpinned.constraints) != self.levels_for:
            # Another VM moved a worker: the lists are stale, the run is over.
            self.levels = levels = None
            self.levels_for = ("", ())
        if group:
            counts = self.group_counts[group]
            count = counts.get(rank, 0)
            counts[rank] = count + 1
            if levels is not None:
                levels[count].remove(old)
                if not levels[count].keys:
                    del levels[count]
                if alive:
                    levels.setdefault(count + 1, _Pool(self, [])).add(new)

    # -- refusing -----------------------------------------------------------------

    def _shortfalls(self, failed: list[_ToPlace]) -> list[Shortfall]:
        """One line per VM that fits nowhere, against the free capacity the
        VMs that did fit leave (computed once per kind of VM)."""
        said: dict[tuple[int, int, tuple[tuple[str, str], ...]], str] = {}
        result = []
        for item in failed:
            vm = item.unpinned.vm
            kind = (vm.vcpus, vm.memory_mib, item.unpinned.constraints)
            if kind not in said:
                said[kind] = self._why_not(vm.vcpus, vm.memory_mib, item.unpinned.constraints)
            result.append(
                Shortfall(
                    vm.id,
                    vm.vcpus,
                    vm.memory_mib,
                    f"{vm.id}: needs {_resources(vm.vcpus, vm.memory_mib)}; {said[kind]}",
                )
            )
        return result

    def _why_not(self, cpu: int, mem: int, constraints: tuple[tuple[str, str], ...]) -> str:
        excluded: dict[str, int] = {}
        best, best_score = -1, -2.0
        for rank in range(len(self.facts)):
            state = self.state[rank]
            if state is not WorkerState.READY:
                excluded[state.value] = excluded.get(state.value, 0) + 1
                continue
            labels = self.labels[rank]
            unmet = next((f"{k}={v}" for k, v in constraints if labels.get(k) != v), None)
            if unmet is not None:
                name = f"by constraint {unmet}"
                excluded[name] = excluded.get(name, 0) + 1
                continue
            # How much of the VM it could hold (a worker at its VM limit: none).
            score = (
                max(min(self.free_cpu[rank] / cpu, self.free_mem[rank] / mem), 0.0)
                if self.free_n[rank] > 0
                else -1.0
            )
            if score > best_score:
                best, best_score = rank, score
        parts = []
        if best >= 0:
            name = self.facts[best].worker_id
            if self.free_n[best] > 0:
                free = _resources(self.free_cpu[best], self.free_mem[best])
                parts.append(f"best worker {name} has {free} free")
            else:
                parts.append(f"best worker {name} holds its limit of VMs")
        elif not self.facts:
            parts.append("no worker is known")
        else:
            parts.append("no worker can take it")
        for reason, count in sorted(excluded.items(), key=lambda item: (-item[1], item[0])):
            noun = "worker" if count == 1 else "workers"
            if reason.startswith("by "):
                parts.append(f"{count} {noun} excluded {reason}")
            else:
                parts.append(f"{count} {noun} {reason}")
        return "; ".join(parts)
