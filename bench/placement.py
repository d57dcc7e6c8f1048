"""7. Placement: ``core.placement.place`` at fleet scale, in process.

10,000 unpinned VMs onto 100 workers and 100,000 onto 1,000 (``--quick``:
1,000 onto 10 and 10,000 onto 100), both strategies, on a synthetic fleet
that looks like a real one: workers of three sizes (32/64/96 CPUs with
4 GiB per CPU, CPU overcommit 4.0) in three zones, each holding 10 of 50
images; VMs of four sizes (1 vCPU/512 MiB to 4 vCPU/4 GiB) filling about
three quarters of the fleet, half of them in spread groups of three, a fifth
constrained to a zone. Baseline, same run and same inputs: a trivial
round-robin (VM i on worker i mod W, no capacity, no constraints), the
floor of any loop that names a worker per VM. Also: placing again with
nothing changed (every VM kept, the stability path), and placing again after
one worker is lost (its VMs move: the healing computation, not the healing).
Nomad reports thousands of placements a second; the target is that order.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from bench._harness import Row, Run, fmt_ratio, fmt_s, median
from procurator.core.fleet import resolve_fleet
from procurator.core.models import (
    Capacity,
    Fleet,
    Placement,
    PlacementPolicy,
    PlacementStrategy,
    UnpinnedVm,
    VmAssignment,
    WorkerFacts,
    WorkerState,
)
from procurator.core.placement import place

NAME = "placement"
_SIZES = ((1, 512), (1, 1024), (2, 2048), (4, 4096))
_WORKERS = ((32, 128 * 1024), (64, 256 * 1024), (96, 384 * 1024))


def synthetic(
    vms: int, workers: int, strategy: PlacementStrategy
) -> tuple[Fleet, list[WorkerFacts]]:
    """The same fleet for the same arguments (a seeded generator)."""
    rng = random.Random(27)
    images = [f"/nix/store/{i:032d}-image-{i}" for i in range(50)]
    facts = [
        WorkerFacts(
            f"host-{i:05d}",
            Capacity(*rng.choice(_WORKERS)),
            cpu_overcommit=4.0,
            labels=(("zone", "abc"[i % 3]),),
            images=frozenset(rng.sample(images, 10)),
        )
        for i in range(workers)
    ]
    unpinned = []
    for i in range(vms):
        vcpus, memory = rng.choice(_SIZES)
        unpinned.append(
            UnpinnedVm(
                VmAssignment(
                    f"vm-{i:06d}",
                    f"h{i}",
                    rng.choice(images),
                    vcpus=vcpus,
                    memory_mib=memory,
                ),
                (("zone", "abc"[i % 3]),) if i % 5 == 0 else (),
                f"svc-{i // 6}" if i % 2 == 0 else "",
            )
        )
    return Fleet((), tuple(unpinned), PlacementPolicy(strategy)), facts


def round_robin(fleet: Fleet, workers: list[WorkerFacts]) -> dict[str, str]:
    ids = [w.worker_id for w in workers]
    count = len(ids)
    return {u.id: ids[i % count] for i, u in enumerate(fleet.unpinned)}


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return median(times), result


def measure(run: Run) -> list[Row]:
    sizes = ((1_000, 10), (10_000, 100)) if run.quick else ((10_000, 100), (100_000, 1_000))
    rows = []
    for vms, workers in sizes:
        repeats = 5 if vms <= 10_000 else 3
        for strategy in PlacementStrategy:
            fleet, facts = synthetic(vms, workers, strategy)
            took, answer = _timed(lambda f=fleet, w=facts: place(f, w), repeats)
            if not isinstance(answer, Placement) or len(answer.vms) != vms:
                raise RuntimeError(f"{vms} VMs on {workers} workers were not placed: {answer}")
            if place(fleet, facts) != answer:
                raise RuntimeError("two placements of the same inputs differ")
            base, _ = _timed(lambda f=fleet, w=facts: round_robin(f, w), repeats)
            run.log(f"placement: {vms:,} VMs / {workers:,} workers, {strategy.value}: {took:.2f} s")
            rows.append(
                Row(
                    NAME,
                    f"place {vms:,} VMs onto {workers:,} workers ({strategy.value})",
                    f"{fmt_s(took)} ({vms / took:,.0f}/s)",
                    f"{fmt_s(base)} round-robin",
                    fmt_ratio(took, base),
                    "thousands/s (Nomad)",
                )
            )
        # The stability and healing paths, on the binpack placement.
        fleet, facts = synthetic(vms, workers, PlacementStrategy.BINPACK)
        answer = place(fleet, facts)
        assert isinstance(answer, Placement)
        previous = resolve_fleet(fleet, answer).as_dict()
        took, again = _timed(lambda f=fleet, w=facts, p=previous: place(f, w, p), repeats)
        if not isinstance(again, Placement) or again.moves:
            raise RuntimeError("placing the same fleet again moved VMs")
        rows.append(
            Row(
                NAME,
                f"place {vms:,} VMs again, nothing changed (all kept)",
                fmt_s(took),
                "",
                "",
                "",
            )
        )
        lost_id = max(previous, key=lambda w: len(previous[w]))
        lost = [replace(w, state=WorkerState.LOST) if w.worker_id == lost_id else w for w in facts]
        took, healed = _timed(lambda f=fleet, w=lost, p=previous: place(f, w, p), repeats)
        if not isinstance(healed, Placement) or len(healed.moves) != len(previous[lost_id]):
            raise RuntimeError(f"the lost worker's VMs did not all move: {healed}")
        rows.append(
            Row(
                NAME,
                f"place {vms:,} VMs after losing a worker ({len(healed.moves)} moves)",
                fmt_s(took),
                "",
                "",
                "",
            )
        )
    return rows
