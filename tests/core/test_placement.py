"""The scheduler (``core.placement.place``): table tests of each rule, a
cross-check of its indexes against a naive scan of every worker, and
properties over random fleets (capacity, constraints, spread, stability,
determinism), plus determinism across processes with different hash seeds."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from procurator.core.errors import ValidationError
from procurator.core.fleet import resolve_fleet, validate_fleet
from procurator.core.models import (
    Capacity,
    Fleet,
    OnWorkerLost,
    Placement,
    PlacementPolicy,
    PlacementReason,
    PlacementStrategy,
    UnpinnedVm,
    Unplaceable,
    VmAssignment,
    VmPlacement,
    WorkerFacts,
    WorkerState,
)
from procurator.core.placement import place, unplaceable_error
from procurator.core.validation import LIMITS

REPO = Path(__file__).resolve().parents[2]
READY, CORDONED, DRAINING, LOST = (
    WorkerState.READY,
    WorkerState.CORDONED,
    WorkerState.DRAINING,
    WorkerState.LOST,
)
BINPACK, SPREAD = PlacementStrategy.BINPACK, PlacementStrategy.SPREAD


def image(n: int) -> str:
    return f"/nix/store/{n:032d}-vm-{n}"


def vm(
    vm_id: str,
    vcpus: int = 1,
    memory_gib: float = 1,
    *,
    img: int = 0,
    constraints: dict[str, str] | None = None,
    spread: str = "",
    on_lost: OnWorkerLost = OnWorkerLost.RESCHEDULE,
) -> UnpinnedVm:
    return UnpinnedVm(
        VmAssignment(
            vm_id, f"h-{vm_id}", image(img), vcpus=vcpus, memory_mib=int(memory_gib * 1024)
        ),
        tuple(sorted((constraints or {}).items())),
        spread,
        on_lost,
    )


def pinned(vm_id: str, vcpus: int = 0, memory_gib: float = 0, img: int = 0) -> VmAssignment:
    return VmAssignment(
        vm_id, f"h-{vm_id}", image(img), vcpus=vcpus, memory_mib=int(memory_gib * 1024)
    )


def worker(
    worker_id: str,
    vcpus: int = 8,
    memory_gib: int = 16,
    *,
    state: WorkerState = READY,
    labels: dict[str, str] | None = None,
    images: Iterable[int] = (),
    cpu_overcommit: float = 1.0,
    memory_overcommit: float = 1.0,
    max_vms: int = 0,
) -> WorkerFacts:
    return WorkerFacts(
        worker_id,
        Capacity(vcpus, memory_gib * 1024, max_vms),
        cpu_overcommit,
        memory_overcommit,
        tuple(sorted((labels or {}).items())),
        state,
        frozenset(image(i) for i in images),
    )


def fleet(
    *unpinned: UnpinnedVm,
    pins: Mapping[str, Sequence[VmAssignment]] | None = None,
    strategy: PlacementStrategy = BINPACK,
) -> Fleet:
    return Fleet(
        tuple(
            sorted((w, tuple(sorted(vms, key=lambda v: v.id))) for w, vms in (pins or {}).items())
        ),
        tuple(sorted(unpinned, key=lambda u: u.id)),
        PlacementPolicy(strategy),
    )


def placed(answer: Placement | Unplaceable) -> Placement:
    assert isinstance(answer, Placement), answer
    return answer


def where(answer: Placement | Unplaceable) -> dict[str, str]:
    return placed(answer).as_dict()


def previous_of(f: Fleet, answer: Placement | Unplaceable) -> dict[str, tuple[VmAssignment, ...]]:
    """What the master's assignments are after applying ``answer``."""
    return resolve_fleet(f, placed(answer)).as_dict()


# ---------------------------------------------------------------- strategies


def test_binpack_fills_the_fullest_worker_that_fits() -> None:
    f = fleet(vm("a", 2, 4), vm("b", 2, 4), vm("c", 2, 4))
    workers = [worker("w1"), worker("w2"), worker("w3", 8, 8)]
    # Largest first, all equal: the smallest worker fits them best, then the
    # next-fullest one.
    assert where(place(f, workers)) == {"a": "w3", "b": "w3", "c": "w1"}


def test_spread_takes_the_emptiest_worker() -> None:
    f = fleet(vm("a", 2, 4), vm("b", 2, 4), vm("c", 2, 4), strategy=SPREAD)
    workers = [worker("w1"), worker("w2"), worker("w3", 8, 8)]
    assert where(place(f, workers)) == {"a": "w1", "b": "w2", "c": "w1"}


def test_workers_are_ranked_by_the_resource_the_fleet_needs_most() -> None:
    # CPU-heavy VMs: vCPUs decide the fit ranking, memory breaks ties.
    f = fleet(vm("a", 4, 1), vm("b", 4, 1))
    workers = [worker("w1", 8, 64), worker("w2", 6, 2)]
    answer = placed(place(f, workers))
    assert answer.ranked_by == "vcpus"
    assert answer.as_dict() == {"a": "w2", "b": "w1"}
    f = fleet(vm("a", 1, 8), vm("b", 1, 8))
    answer = placed(place(f, [worker("w1", 2, 64), worker("w2", 64, 10)]))
    assert answer.ranked_by == "memory"
    assert answer.as_dict() == {"a": "w2", "b": "w1"}


def test_overcommit_scales_what_a_worker_offers() -> None:
    f = fleet(*(vm(f"v{i}", 4, 1) for i in range(4)))
    # 4 host CPUs at 4.0 take four 4-vCPU VMs; memory at 1.0 takes 4 GiB.
    assert set(where(place(f, [worker("w", 4, 4, cpu_overcommit=4.0)])).values()) == {"w"}
    answer = place(f, [worker("w", 4, 4, cpu_overcommit=3.9)])
    assert isinstance(answer, Unplaceable)
    assert [s.vm_id for s in answer.vms] == ["v3"]
    # Memory below 1.0 holds some back for the host: floor(4096 * 0.9) MiB.
    answer = place(f, [worker("w", 4, 4, cpu_overcommit=4.0, memory_overcommit=0.9)])
    assert isinstance(answer, Unplaceable)
    assert answer.vms[0].message == "v3: needs 4 vCPU/1 GiB; best worker w has 4 vCPU/614 MiB free"


def test_a_workers_vm_limit_holds() -> None:
    f = fleet(*(vm(f"v{i}", 1, 0.25) for i in range(5)))
    answer = where(place(f, [worker("w1", max_vms=2), worker("w2", max_vms=3)]))
    assert sorted(answer.values()) == ["w1", "w1", "w2", "w2", "w2"]
    refused = place(f, [worker("w1", max_vms=2), worker("w2", max_vms=2)])
    assert isinstance(refused, Unplaceable)
    assert refused.vms[0].message.endswith("best worker w1 holds its limit of VMs")


# ---------------------------------------------------------------- constraints, states


def test_constraints_pick_workers_by_label() -> None:
    workers = [
        worker("w1", labels={"zone": "a", "kvm": "true"}),
        worker("w2", labels={"zone": "b"}),
        worker("w3", labels={"zone": "b", "kvm": "true", "rack": "7"}),
    ]
    vms = (vm("a", constraints={"zone": "b"}), vm("b", constraints={"zone": "b", "kvm": "true"}))
    # The most constrained first: b (one worker to choose from), then a.
    assert where(place(fleet(*vms), workers)) == {"a": "w3", "b": "w3"}
    assert where(place(fleet(*vms, strategy=SPREAD), workers)) == {"a": "w2", "b": "w3"}
    answer = place(fleet(*vms), [*workers[:2], replace(workers[2], state=CORDONED)])
    assert isinstance(answer, Unplaceable)
    assert [s.message for s in answer.vms] == [
        "b: needs 1 vCPU/1 GiB; no worker can take it; 1 worker excluded by constraint "
        "kvm=true; 1 worker excluded by constraint zone=b; 1 worker cordoned"
    ]


def test_the_most_constrained_vms_are_placed_first() -> None:
    """Unconstrained VMs could go anywhere; placed first (they are larger),
    binpack would fill the one zone-b worker with them."""
    f = fleet(vm("big-1", 4, 8), vm("big-2", 4, 8), vm("small", 1, 1, constraints={"zone": "b"}))
    workers = [worker("w1", labels={"zone": "b"}), worker("w2"), worker("w3")]
    assert where(place(f, workers)) == {"big-1": "w1", "big-2": "w2", "small": "w1"}


def test_an_unplaceable_fleet_names_each_vm_and_its_shortfall() -> None:
    f = fleet(
        vm("web-7", 4, 8, constraints={"zone": "b"}),
        vm("web-8", 4, 8, constraints={"zone": "b"}),
        vm("db-1", 65, 1),
        vm("ok", 1, 1),  # goes to host-c: shortfalls count what fits
    )
    workers = [
        worker("host-a", 16, 64, labels={"zone": "a"}),
        worker("host-b", 16, 64, labels={"zone": "a"}),
        worker("host-c", 2, 16, labels={"zone": "b"}),
        worker("host-d", 64, 64, labels={"zone": "a"}),
        worker("host-e", 2, 16, labels={"zone": "a"}),
        worker("host-f", 64, 64, labels={"zone": "b"}, state=CORDONED),
        worker("host-g", 64, 64, labels={"zone": "b"}, state=LOST),
    ]
    answer = place(f, workers)
    assert isinstance(answer, Unplaceable)
    assert answer.message == "3 VM(s) cannot be placed; nothing was applied"
    assert [s.message for s in answer.vms] == [
        "db-1: needs 65 vCPU/1 GiB; best worker host-d has 64 vCPU/64 GiB free; "
        "1 worker cordoned; 1 worker lost",
        "web-7: needs 4 vCPU/8 GiB; best worker host-c has 1 vCPU/15 GiB free; "
        "4 workers excluded by constraint zone=b; 1 worker cordoned; 1 worker lost",
        "web-8: needs 4 vCPU/8 GiB; best worker host-c has 1 vCPU/15 GiB free; "
        "4 workers excluded by constraint zone=b; 1 worker cordoned; 1 worker lost",
    ]
    error = unplaceable_error(answer)
    assert isinstance(error, ValidationError)
    assert error.details == tuple(s.message for s in answer.vms)
    nowhere = place(fleet(vm("x", constraints={"gpu": "yes"})), workers[:1])
    assert isinstance(nowhere, Unplaceable)
    assert nowhere.vms[0].message == (
        "x: needs 1 vCPU/1 GiB; no worker can take it; 1 worker excluded by constraint gpu=yes"
    )
    alone = place(fleet(vm("x")), [])
    assert isinstance(alone, Unplaceable)
    assert alone.vms[0].message == "x: needs 1 vCPU/1 GiB; no worker is known"


def test_worker_states() -> None:
    f = fleet(
        vm("on-cordoned"),
        vm("on-draining"),
        vm("on-draining-wait", on_lost=OnWorkerLost.WAIT),
        vm("on-lost"),
        vm("on-lost-wait", on_lost=OnWorkerLost.WAIT),
        vm("on-gone", on_lost=OnWorkerLost.WAIT),
        vm("new"),
        pins={"lost": [pinned("pinned-on-lost", 1, 1)], "cordoned": [pinned("pinned", 1, 1)]},
    )
    previous = {
        "cordoned": [pinned("on-cordoned", 1, 1)],
        "draining": [pinned("on-draining", 1, 1), pinned("on-draining-wait", 1, 1)],
        "lost": [pinned("on-lost", 1, 1), pinned("on-lost-wait", 1, 1)],
        "gone": [pinned("on-gone", 1, 1)],
    }
    workers = [
        worker("cordoned", state=CORDONED),
        worker("draining", state=DRAINING),
        worker("lost", state=LOST),
        worker("ready"),
    ]
    answer = placed(place(f, workers, previous))
    assert {p.vm_id: (p.worker_id, p.reason, p.previous_worker) for p in answer.vms} == {
        "on-cordoned": ("cordoned", PlacementReason.KEPT, "cordoned"),
        "on-draining": ("ready", PlacementReason.WORKER_DRAINING, "draining"),
        "on-draining-wait": ("ready", PlacementReason.WORKER_DRAINING, "draining"),
        "on-lost": ("ready", PlacementReason.WORKER_LOST, "lost"),
        "on-lost-wait": ("lost", PlacementReason.KEPT, "lost"),
        "on-gone": ("ready", PlacementReason.WORKER_GONE, "gone"),
        "new": ("ready", PlacementReason.NEW, ""),
    }
    assert answer.unavailable == ("on-lost-wait", "pinned-on-lost")
    assert [m.vm_id for m in answer.moves] == [
        "on-draining",
        "on-draining-wait",
        "on-gone",
        "on-lost",
    ]


def test_pinned_vms_count_and_are_never_refused() -> None:
    f = fleet(
        vm("a", 2, 2),
        pins={"w1": [pinned("p1", 6, 15), pinned("p2")], "w2": [pinned("big", 16, 32)]},
    )
    answer = placed(place(f, [worker("w1"), worker("w2"), worker("w3")]))
    assert answer.as_dict() == {"a": "w3"}  # w1 has 1 GiB left, w2 is overfull
    assert answer.warnings == (
        "worker w2: its pinned VMs need more than it offers (16 vCPU/32 GiB in 1 VM(s); it "
        "offers 8 vCPU/16 GiB and 20000 VMs): it takes no unpinned VM",
        "worker w1: 1 pinned VM(s) declare no vcpus/memory_mib and count as 0 against its capacity",
    )
    # A fleet of pinned VMs only places nothing and warns of nothing it did not before.
    only_pinned = placed(place(fleet(pins={"w1": [pinned("p2")]}), [worker("w1")]))
    assert only_pinned == Placement()


def test_a_vm_moved_from_pinned_to_unpinned_stays_where_it_was() -> None:
    before = {"w2": [pinned("web-1", 2, 2)]}
    answer = placed(place(fleet(vm("web-1", 2, 2)), [worker("w1"), worker("w2")], before))
    assert answer.vms == (VmPlacement("web-1", "w2", PlacementReason.KEPT, "w2"),)


# ---------------------------------------------------------------- stability


def test_kept_vms_stay_and_new_ones_fit_around_them() -> None:
    f = fleet(vm("a", 4, 8), vm("b", 4, 8))
    workers = [worker("w1"), worker("w2", 16, 32)]
    first = place(f, workers)
    assert where(first) == {"a": "w1", "b": "w1"}
    grown = fleet(vm("a", 4, 8), vm("b", 4, 8), vm("c", 2, 2), vm("d", 8, 16))
    second = placed(place(grown, workers, previous_of(f, first)))
    assert second.as_dict() == {"a": "w1", "b": "w1", "c": "w2", "d": "w2"}
    assert [p.reason for p in second.vms] == [PlacementReason.KEPT] * 2 + [PlacementReason.NEW] * 2
    assert not second.moves


def test_a_grown_vm_moves_not_its_unchanged_neighbour() -> None:
    """Unchanged VMs are counted first: growing one VM moves that VM only,
    whatever the ids' order."""
    f = fleet(vm("a", 2, 4), vm("b", 2, 4))
    workers = [worker("w1", 8, 8), worker("w2")]
    first = place(f, workers)
    assert where(first) == {"a": "w1", "b": "w1"}
    grown = fleet(vm("a", 2, 6), vm("b", 2, 4))
    answer = placed(place(grown, workers, previous_of(f, first)))
    (move,) = answer.moves
    assert (move.vm_id, move.previous_worker, move.worker_id) == ("a", "w1", "w2")
    assert move.reason is PlacementReason.NO_LONGER_FITS
    assert move.detail == "needs 2 vCPU/6 GiB, w1 has 6 vCPU/4 GiB free"


def test_a_vm_whose_worker_no_longer_matches_moves() -> None:
    f = fleet(vm("a", constraints={"zone": "b"}))
    before = {"w1": [pinned("a", 1, 1)]}
    workers = [worker("w1", labels={"zone": "a"}), worker("w2", labels={"zone": "b"})]
    (p,) = placed(place(f, workers, before)).vms
    assert (p.worker_id, p.reason, p.detail) == ("w2", PlacementReason.CONSTRAINTS, "lacks zone=b")


def test_a_smaller_worker_keeps_what_still_fits() -> None:
    f = fleet(vm("a", 1, 4), vm("b", 1, 4), vm("c", 1, 4))
    before = {"w1": [pinned(i, 1, 4) for i in "abc"]}
    workers = [worker("w1", 8, 8), worker("w2")]
    answer = placed(place(f, workers, before))
    assert answer.as_dict() == {"a": "w1", "b": "w1", "c": "w2"}
    assert answer.moves[0].reason is PlacementReason.NO_LONGER_FITS


# ---------------------------------------------------------------- images and spread


def test_equal_workers_tie_towards_the_one_holding_the_image() -> None:
    f = fleet(vm("a", img=1), vm("b", img=2), vm("c", img=3), strategy=SPREAD)
    workers = [worker("w1"), worker("w2", images=[2]), worker("w3", images=[1, 3])]
    assert where(place(f, workers)) == {"a": "w3", "b": "w2", "c": "w1"}
    # Only a tie: a worker ranked better by the strategy wins over the image.
    workers = [worker("w1", 9), worker("w2", images=[1, 2, 3]), worker("w3", images=[1])]
    assert where(place(f, workers)) == {"a": "w1", "b": "w2", "c": "w3"}


def test_the_image_tie_scans_the_shorter_of_ties_and_holders() -> None:
    # Many equal workers, few holders (walk the holders) and many holders,
    # few ties (walk the tied run): the same answer as the naive scan.
    workers = [worker(f"w{i:03d}", images=[1] if i in (70, 90) else []) for i in range(100)]
    assert where(place(fleet(vm("a", img=1), strategy=SPREAD), workers)) == {"a": "w070"}
    workers = [worker(f"w{i:03d}", images=[] if i < 2 else [1]) for i in range(100)]
    assert where(place(fleet(vm("a", img=1), strategy=SPREAD), workers)) == {"a": "w002"}
    workers = [
        worker(f"w{i:03d}", 7 if i < 3 else 8, images=[] if i < 2 else [1]) for i in range(100)
    ]
    assert where(place(fleet(vm("a", img=1)), workers)) == {"a": "w002"}
    workers[2] = replace(workers[2], capacity=Capacity(7, 16 * 1024, max_vms=0))
    assert where(place(fleet(vm("a", img=1)), workers)) == {"a": "w002"}


def test_a_spread_group_shares_no_worker_while_workers_last() -> None:
    f = fleet(*(vm(f"web-{i}", 1, 1, spread="web") for i in range(4)), vm("db", 1, 1))
    answer = where(place(f, [worker(f"w{i}") for i in range(4)]))
    assert sorted(answer[f"web-{i}"] for i in range(4)) == ["w0", "w1", "w2", "w3"]
    assert answer["db"] == "w0"  # binpack: not spread


@pytest.mark.parametrize("size", [7, 40])  # below and above the per-count lists' threshold
@pytest.mark.parametrize("strategy", [BINPACK, SPREAD])
def test_a_large_spread_group_is_as_even_as_workers_allow(
    size: int, strategy: PlacementStrategy
) -> None:
    f = fleet(*(vm(f"web-{i:02d}", 1, 1, spread="web") for i in range(size)), strategy=strategy)
    workers = [
        worker("w0"),
        worker("w1"),
        worker("w2"),
        worker("full", 8, 1),
        worker("big", 64, 64),
    ]
    counts: dict[str, int] = {}
    for worker_id in where(place(f, workers)).values():
        counts[worker_id] = counts.get(worker_id, 0) + 1
    assert counts["full"] == 1  # 1 GiB: one VM
    if size == 7:
        assert sorted(counts[w] for w in ("w0", "w1", "w2", "big")) == [1, 1, 2, 2]
    else:  # w0..w2 take 8 (their vCPUs), big the rest
        assert [counts[w] for w in ("w0", "w1", "w2", "big")] == [8, 8, 8, 15]


def test_spread_decides_new_placements_and_moves_nothing() -> None:
    f = fleet(vm("a", spread="g"), vm("b", spread="g"))
    before = {"w1": [pinned("a", 1, 1), pinned("b", 1, 1)]}
    answer = placed(place(f, [worker("w1"), worker("w2")], before))
    assert answer.as_dict() == {"a": "w1", "b": "w1"} and not answer.moves


# ---------------------------------------------------------------- inputs


def test_bad_worker_facts_are_refused() -> None:
    with pytest.raises(ValueError, match="'w' is given twice"):
        place(fleet(), [worker("w"), worker("w")])
    for ratio in (0.0, -1.0, float("nan"), float("inf"), LIMITS.max_overcommit * 2):
        with pytest.raises(ValueError, match="cpu_overcommit"):
            place(fleet(), [worker("w", cpu_overcommit=ratio)])


# ---------------------------------------------------------------- the reference


def naive_place(f: Fleet, workers: Sequence[WorkerFacts]) -> dict[str, str] | None:
    """What ``place`` promises for a fleet placed from scratch, computed the
    slow way: every VM looks at every worker."""
    facts = sorted(workers, key=lambda w: w.worker_id)
    cpu = [int(w.capacity.vcpus * w.cpu_overcommit) for w in facts]
    mem = [int(w.capacity.memory_mib * w.memory_overcommit) for w in facts]
    n = [w.capacity.max_vms or LIMITS.max_vms_per_worker for w in facts]
    index = {w.worker_id: i for i, w in enumerate(facts)}
    for worker_id, vms in f.workers:
        if worker_id in index:
            for p in vms:
                cpu[index[worker_id]] -= p.vcpus
                mem[index[worker_id]] -= p.memory_mib
                n[index[worker_id]] -= 1
    ready = [i for i, w in enumerate(facts) if w.state is READY]
    need_cpu = sum(p.vcpus for _, vms in f.workers for p in vms) + sum(
        u.vm.vcpus for u in f.unpinned
    )
    need_mem = sum(p.memory_mib for _, vms in f.workers for p in vms) + sum(
        u.vm.memory_mib for u in f.unpinned
    )
    by_memory = need_mem * sum(cpu_of(w) for w in (facts[i] for i in ready)) >= need_cpu * sum(
        mem_of(w) for w in (facts[i] for i in ready)
    )
    primary, secondary = (mem, cpu) if by_memory else (cpu, mem)
    sign = -1 if f.placement.strategy is SPREAD else 1
    counts: dict[tuple[str, int], int] = {}

    def needs(u: UnpinnedVm) -> tuple[int, int]:
        return (u.vm.memory_mib, u.vm.vcpus) if by_memory else (u.vm.vcpus, u.vm.memory_mib)

    def choice(u: UnpinnedVm) -> int:
        return sum(
            1 for i in ready if all(dict(facts[i].labels).get(k) == v for k, v in u.constraints)
        )

    order = sorted(
        f.unpinned, key=lambda u: (choice(u), -needs(u)[0], -needs(u)[1], u.spread, u.id)
    )
    result = {}
    for u in order:
        p, s = needs(u)
        fits = [
            i
            for i in ready
            if primary[i] >= p
            and secondary[i] >= s
            and n[i] > 0
            and all(dict(facts[i].labels).get(k) == v for k, v in u.constraints)
        ]
        if not fits:
            return None
        best = min(
            fits,
            key=lambda i: (
                counts.get((u.spread, i), 0) if u.spread else 0,
                sign * primary[i],
                sign * secondary[i],
                u.vm.nix_store_path not in facts[i].images,
                i,
            ),
        )
        primary[best] -= p
        secondary[best] -= s
        n[best] -= 1
        counts[(u.spread, best)] = counts.get((u.spread, best), 0) + 1
        result[u.id] = facts[best].worker_id
    return result


def assert_as_naive(f: Fleet, workers: Sequence[WorkerFacts]) -> None:
    expected = naive_place(f, workers)
    answer = place(f, workers)
    if expected is None:
        assert isinstance(answer, Unplaceable)
    else:
        assert where(answer) == expected


def cpu_of(w: WorkerFacts) -> int:
    return int(w.capacity.vcpus * w.cpu_overcommit)


def mem_of(w: WorkerFacts) -> int:
    return int(w.capacity.memory_mib * w.memory_overcommit)


# ---------------------------------------------------------------- random fleets

_LABELS = {"zone": ["a", "b"], "kvm": ["true"], "disk": ["ssd", "hdd"]}
_GROUPS = ["", "", "", "web", "db", "cache"]


@st.composite
def worker_sets(draw: st.DrawFn, max_workers: int = 10, min_size: int = 0) -> list[WorkerFacts]:
    """Workers of 0-16 CPUs and 0-64 GiB (``min_size`` up), mostly ready."""
    count = draw(st.integers(0 if not min_size else 1, max_workers))
    result = []
    for i in range(count):
        labels = {
            key: draw(st.sampled_from(values))
            for key, values in _LABELS.items()
            if draw(st.integers(0, 3))
        }
        result.append(
            worker(
                f"w{i:02d}",
                draw(st.integers(min_size, 16)),
                draw(st.integers(min_size * 4, 64)),
                state=draw(st.sampled_from([*[READY] * 7, CORDONED, DRAINING, LOST])),
                labels=labels,
                images=draw(st.sets(st.integers(0, 4), max_size=3)),
                cpu_overcommit=draw(st.sampled_from([1.0, 1.5, 4.0])),
                memory_overcommit=draw(st.sampled_from([0.9, 1.0, 1.25])),
                max_vms=draw(st.sampled_from([0, 0, 0, 2, 5])),
            )
        )
    return result


@st.composite
def unpinned_sets(draw: st.DrawFn, prefix: str = "v", max_vms: int = 30) -> list[UnpinnedVm]:
    count = draw(st.integers(0, max_vms))
    result = []
    for i in range(count):
        constraints = {
            key: draw(st.sampled_from(values))
            for key, values in _LABELS.items()
            if draw(st.integers(0, 11)) == 0
        }
        result.append(
            vm(
                f"{prefix}{i:03d}",
                draw(st.integers(1, 4)),
                draw(st.sampled_from([0.25, 0.5, 1, 2, 4])),
                img=draw(st.integers(0, 4)),
                constraints=constraints,
                spread=draw(st.sampled_from(_GROUPS)),
                on_lost=draw(st.sampled_from(list(OnWorkerLost))),
            )
        )
    return result


@st.composite
def pin_sets(draw: st.DrawFn, workers: Sequence[WorkerFacts]) -> dict[str, list[VmAssignment]]:
    ids = [w.worker_id for w in workers] + ["unknown"]
    pins: dict[str, list[VmAssignment]] = {}
    for i in range(draw(st.integers(0, 6))):
        resources = draw(st.sampled_from([(0, 0), (1, 1), (2, 4), (8, 16)]))
        pins.setdefault(draw(st.sampled_from(ids)), []).append(pinned(f"p{i}", *resources))
    return pins


def check_invariants(
    f: Fleet,
    workers: Sequence[WorkerFacts],
    answer: Placement,
    previous: Mapping[str, Sequence[VmAssignment]],
) -> None:
    facts = {w.worker_id: w for w in workers}
    assert [p.vm_id for p in answer.vms] == sorted(u.id for u in f.unpinned)
    by_id = {u.id: u for u in f.unpinned}
    before = {v.id: w for w, vms in previous.items() for v in vms}
    resolved = resolve_fleet(f, answer)
    validate_fleet(resolved)
    load: dict[str, list[int]] = {}
    for p in answer.vms:
        u = by_id[p.vm_id]
        w = facts[p.worker_id]
        if p.reason is PlacementReason.KEPT:
            assert p.worker_id == before[u.id] == p.previous_worker
            assert w.state in (READY, CORDONED, LOST)
            if w.state is LOST:
                assert u.on_worker_lost is OnWorkerLost.WAIT and u.id in answer.unavailable
                continue
        else:
            assert w.state is READY, p
        labels = dict(w.labels)
        assert all(labels.get(k) == v for k, v in u.constraints), p  # constraints hold
        total = load.setdefault(p.worker_id, [0, 0, 0])
        total[0] += u.vm.vcpus
        total[1] += u.vm.memory_mib
        total[2] += 1
    for worker_id, (placed_cpu, placed_mem, placed_n) in load.items():  # never over capacity
        w = facts[worker_id]
        pins = dict(f.workers).get(worker_id, ())
        cpu = placed_cpu + sum(v.vcpus for v in pins)
        mem = placed_mem + sum(v.memory_mib for v in pins)
        n = placed_n + len(pins)
        assert cpu <= cpu_of(w), (worker_id, cpu, cpu_of(w))
        assert mem <= mem_of(w), (worker_id, mem, mem_of(w))
        assert n <= (w.capacity.max_vms or LIMITS.max_vms_per_worker)
    for p in answer.vms:  # a VM moves only for a reason
        if p.vm_id in before and p.reason is not PlacementReason.KEPT:
            was = facts.get(before[p.vm_id])
            assert p.moved and p.previous_worker == before[p.vm_id]
            if was is None:
                assert p.reason is PlacementReason.WORKER_GONE
            elif p.reason is PlacementReason.NO_LONGER_FITS:
                assert was.state in (READY, CORDONED)
            else:
                expected = {
                    LOST: PlacementReason.WORKER_LOST,
                    DRAINING: PlacementReason.WORKER_DRAINING,
                }.get(was.state, PlacementReason.CONSTRAINTS)
                assert p.reason is expected, (p, was.state)


def check_spread(f: Fleet, workers: Sequence[WorkerFacts], answer: Placement) -> None:
    """A group's VMs share a worker only when no worker free of the group
    could have taken it (free capacity only shrinks and counts only grow
    while placing, so the end state is a fair witness)."""
    resolved = resolve_fleet(f, answer).as_dict()
    free = {}
    for w in workers:
        vms = resolved.get(w.worker_id, ())
        free[w.worker_id] = (
            cpu_of(w) - sum(v.vcpus for v in vms),
            mem_of(w) - sum(v.memory_mib for v in vms),
            (w.capacity.max_vms or LIMITS.max_vms_per_worker) - len(vms),
        )
    groups: dict[str, dict[str, int]] = {}
    home = answer.as_dict()
    for u in f.unpinned:
        if u.spread:
            counts = groups.setdefault(u.spread, {})
            counts[home[u.id]] = counts.get(home[u.id], 0) + 1
    for u in f.unpinned:
        if not u.spread or groups[u.spread][home[u.id]] < 2:
            continue
        for w in workers:
            if (
                w.state is READY
                and groups[u.spread].get(w.worker_id, 0) == 0
                and all(dict(w.labels).get(k) == v for k, v in u.constraints)
            ):
                cpu, mem, n = free[w.worker_id]
                assert not (cpu >= u.vm.vcpus and mem >= u.vm.memory_mib and n > 0), (
                    f"{u.id} shares {home[u.id]} with its group {u.spread}, "
                    f"but {w.worker_id} was free of it and could take it"
                )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), strategy=st.sampled_from(list(PlacementStrategy)))
def test_fresh_placements_match_the_naive_scan(
    data: st.DataObject, strategy: PlacementStrategy
) -> None:
    """The indexes (bisected pools, per-count lists, dropped full workers,
    tied runs) choose exactly what scanning every worker would."""
    workers = data.draw(worker_sets())
    f = fleet(*data.draw(unpinned_sets()), pins=data.draw(pin_sets(workers)), strategy=strategy)
    assert_as_naive(f, workers)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), strategy=st.sampled_from(list(PlacementStrategy)))
def test_big_groups_on_many_workers_match_the_naive_scan(
    data: st.DataObject, strategy: PlacementStrategy
) -> None:
    """Groups far larger than the per-count lists' threshold, interleaved
    with other VMs of the same size."""
    workers = [
        worker(f"w{i:02d}", data.draw(st.integers(1, 6)), data.draw(st.integers(1, 12)))
        for i in range(data.draw(st.integers(1, 12)))
    ]
    vms = [
        vm(
            f"v{i:03d}",
            data.draw(st.integers(1, 2)),
            data.draw(st.sampled_from([0.5, 1])),
            spread=data.draw(st.sampled_from(["", "a", "b"])),
            img=data.draw(st.integers(0, 1)),
        )
        for i in range(data.draw(st.integers(0, 60)))
    ]
    assert_as_naive(fleet(*vms, strategy=strategy), workers)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), strategy=st.sampled_from(list(PlacementStrategy)))
def test_placements_keep_every_promise(data: st.DataObject, strategy: PlacementStrategy) -> None:
    """Capacity (with overcommit), constraints and worker states hold, every
    move has its reason, spread groups share a worker only when they must;
    against random previous assignments, too."""
    workers = data.draw(worker_sets(min_size=2))
    unpinned = data.draw(unpinned_sets())
    f = fleet(*unpinned, pins=data.draw(pin_sets(workers)), strategy=strategy)
    homes = [w.worker_id for w in workers] + ["gone"]
    previous: dict[str, list[VmAssignment]] = {}
    for u in unpinned:
        if data.draw(st.booleans()):
            size = data.draw(st.sampled_from([(u.vm.vcpus, u.vm.memory_mib), (1, 256)]))
            previous.setdefault(data.draw(st.sampled_from(homes)), []).append(
                replace(u.vm, vcpus=size[0], memory_mib=size[1])
            )
    answer = place(f, workers, previous)
    if isinstance(answer, Unplaceable):
        assert answer.vms and {s.vm_id for s in answer.vms} <= {u.id for u in unpinned}
        for s in answer.vms:
            assert s.message.startswith(f"{s.vm_id}: needs ")
        return
    check_invariants(f, workers, answer, previous)
    if not previous:
        check_spread(f, workers, answer)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), strategy=st.sampled_from(list(PlacementStrategy)))
def test_spread_groups_never_share_a_worker_when_enough_workers_exist(
    data: st.DataObject, strategy: PlacementStrategy
) -> None:
    workers = [worker(f"w{i:02d}", 64, 256) for i in range(data.draw(st.integers(1, 12)))]
    sizes = data.draw(st.lists(st.integers(1, len(workers)), min_size=1, max_size=4))
    vms = [
        vm(f"g{g}-{i:02d}", data.draw(st.integers(1, 4)), 1, spread=f"group-{g}")
        for g, size in enumerate(sizes)
        for i in range(size)
    ]
    answer = where(place(fleet(*vms, strategy=strategy), workers))
    for g, size in enumerate(sizes):
        homes = [answer[f"g{g}-{i:02d}"] for i in range(size)]
        assert len(set(homes)) == size, homes


@settings(max_examples=200, deadline=None)
@given(data=st.data(), strategy=st.sampled_from(list(PlacementStrategy)))
def test_an_unrelated_change_moves_no_vm(data: st.DataObject, strategy: PlacementStrategy) -> None:
    """Add VMs, remove VMs, change other VMs (image, size, constraints,
    group), add workers: every VM whose own entry did not change keeps its
    worker."""
    workers = data.draw(worker_sets(min_size=4))
    workers = [replace(w, state=data.draw(st.sampled_from([READY, CORDONED]))) for w in workers]
    pins = data.draw(pin_sets(workers))
    vms = data.draw(unpinned_sets(max_vms=20))
    f = fleet(*vms, pins=pins, strategy=strategy)
    first = place(f, workers)
    assume(isinstance(first, Placement))
    assert isinstance(first, Placement)
    changed = set(data.draw(st.sets(st.sampled_from([u.id for u in vms]))) if vms else set())
    removed = set(data.draw(st.sets(st.sampled_from([u.id for u in vms]))) if vms else set())
    new_vms = [
        vm(u.id, u.vm.vcpus + 1, 2, img=9, spread="other") if u.id in changed else u
        for u in vms
        if u.id not in removed
    ]
    new_vms += data.draw(unpinned_sets(prefix="n", max_vms=5))
    more_workers = workers + data.draw(st.lists(st.just(worker("x-new", 64, 64)), max_size=1))
    g = fleet(*new_vms, pins=pins, strategy=strategy)
    second = place(g, more_workers, previous_of(f, first))
    assume(isinstance(second, Placement))
    assert isinstance(second, Placement)
    before = first.as_dict()
    for p in second.vms:
        if p.vm_id in before and p.vm_id not in changed:
            assert p.worker_id == before[p.vm_id], p
            assert p.reason is PlacementReason.KEPT


@settings(max_examples=150, deadline=None)
@given(data=st.data(), strategy=st.sampled_from(list(PlacementStrategy)))
def test_the_answer_depends_on_the_inputs_not_their_order(
    data: st.DataObject, strategy: PlacementStrategy
) -> None:
    workers = data.draw(worker_sets())
    f = fleet(*data.draw(unpinned_sets()), pins=data.draw(pin_sets(workers)), strategy=strategy)
    previous = {
        w.worker_id: [pinned(u.id, u.vm.vcpus, u.vm.memory_mib / 1024)]
        for w, u in zip(workers, f.unpinned, strict=False)
    }
    answer = place(f, workers, previous)
    shuffled = list(workers)
    random.Random(data.draw(st.integers(0, 1000))).shuffle(shuffled)
    reordered = dict(reversed(list(previous.items())))
    assert place(f, shuffled, reordered) == answer
    assert place(f, workers, previous) == answer


_DETERMINISM = """
import json, random, sys
sys.path.insert(0, {tests!r})
from test_placement import fleet, vm, worker, pinned
from procurator.core.placement import place
rng = random.Random(7)
workers = [
    worker(f"host-{{i:03d}}", rng.choice([8, 16, 32]), rng.choice([64, 128]),
           labels={{"zone": rng.choice("abc")}}, images=rng.sample(range(6), 2),
           cpu_overcommit=4.0)
    for i in range(60)
]
vms = [
    vm(f"vm-{{i:04d}}", rng.randint(1, 4), rng.choice([0.5, 1, 2, 4]), img=rng.randrange(6),
       constraints={{"zone": rng.choice("abc")}} if rng.random() < 0.3 else None,
       spread=rng.choice(["", "", "web", "db", "cache"]))
    for i in range(1500)
]
answer = place(fleet(*vms, pins={{"host-000": [pinned("p", 2, 2)]}}), workers)
print(json.dumps(answer.as_dict(), sort_keys=True))
"""


def test_the_same_inputs_give_the_same_answer_in_another_process() -> None:
    """No answer depends on the order of a set of strings: two interpreters
    with different hash seeds agree."""
    code = _DETERMINISM.format(tests=str(Path(__file__).parent))
    outputs = []
    for seed in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    assert len(json.loads(outputs[0])) == 1500
