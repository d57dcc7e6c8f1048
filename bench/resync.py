"""4. Reconcile passes, in process: the periodic full pass with nothing to
do (the safety net), and the incremental pass a one-VM change costs.

What runs is the product's own code: ``Reconciler.run_pass`` over the real
``WorkerActuator.observe`` / ``observe_some``, which read a real
``VmManager``. The manager holds N *settled* VM records (running the
desired hash) injected straight into its map: no supervisor threads, no VMM
processes — observation never touches them, so a pass costs exactly what it
costs on a worker whose N VMs all run. Every full pass after the first
publishes nothing (the status is unchanged), as on an idle worker's
periodic full pass. The incremental pass handles one VM marked dirty (what
a VM's own change costs the reconciler; it finds it settled and reports
nothing), which must not grow with N.

Baseline, same run: the floor of any full pass — one dict lookup and one
hash comparison per desired VM, in plain Python.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import trio

from bench._harness import Row, Run, fmt_ratio, fmt_s, median
from procurator.core.confinement import ImageLimits
from procurator.core.models import Assignment, Phase, PowerState, VmAssignment
from procurator.core.reconcile import Reconciler
from procurator.core.status import StatusChanges
from procurator.nix.image import ImageManager
from procurator.nix.store import NixStore
from procurator.worker.actuator import WorkerActuator
from procurator.worker.manager import VmManager, VmObservation
from procurator.worker.vmrecord import VmRecord

NAME = "resync"
STORE_PATH = "/nix/store/" + "a" * 32 + "-bench-vm"
HASH = "a" * 32


class _NoDriver:
    """A VmmDriver that must never be called (nothing here acts)."""

    name = "cloud-hypervisor"

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the no-op resync benchmark called the VMM driver: {name}")


def _manager(state_dir: Path, n: int) -> VmManager:
    manager = VmManager(state_dir, _NoDriver())  # type: ignore[arg-type]
    for index in range(n):
        vm_id = f"vm-{index:05d}"
        record = VmRecord(vm_id, "cloud-hypervisor")
        record.obs = VmObservation(
            vm_id=vm_id,
            desired_hash=HASH,
            phase=Phase.RUNNING,
            power=PowerState.RUNNING,
            desired_power=PowerState.RUNNING,
            message=f"Running (pid {100000 + index})",
            pid=100000 + index,
            observed_hash=HASH,
            image=STORE_PATH,
            op_id="op-bench",
            driver="cloud-hypervisor",
        )
        manager._vms[vm_id] = record  # the map the real list() reads
    return manager


def _passes(run: Run, n: int, repeats: int) -> tuple[list[float], list[float], list[float], int]:
    """(full pass seconds, floor seconds, one-VM pass seconds, statuses
    published)."""
    state_dir = run.dir / f"resync-{n}"
    manager = _manager(state_dir, n)
    images = ImageManager(
        NixStore(),
        state_dir,
        limits=ImageLimits(max_vcpus=os.cpu_count() or 1, max_memory_mib=1024),
    )
    actuator = WorkerActuator(
        manager,
        images,
        None,
        limiter=trio.CapacityLimiter(8),
        serial_file=lambda vm_id: str(state_dir / vm_id / "serial.log"),
    )
    published: list[StatusChanges] = []
    reconciler = Reconciler(actuator=actuator, on_status=published.append, worker_id="bench")
    vms = tuple(VmAssignment(f"vm-{i:05d}", HASH, STORE_PATH) for i in range(n))
    reconciler.set_assignment(Assignment("bench", 1, vms, "op-bench"))
    desired = {vm.id: vm.hash for vm in vms}
    observed = {o.vm_id: o.observed_hash for o in manager.list()}
    times: list[float] = []
    floors: list[float] = []
    dirty: list[float] = []

    async def main() -> None:
        limiter = trio.CapacityLimiter(8)
        async with trio.open_nursery() as nursery:
            await reconciler.run_pass(nursery, limiter)  # the first pass publishes
            if reconciler.observed_generation != 1:
                raise RuntimeError("the settled VMs did not converge in the first pass")
            for _ in range(repeats):
                started = time.perf_counter()
                actions = await reconciler.run_pass(nursery, limiter, full=True)
                times.append(time.perf_counter() - started)
                if actions:
                    raise RuntimeError(f"a no-op pass started {actions} actions")
                started = time.perf_counter()
                _floor(desired, observed)
                floors.append(time.perf_counter() - started)
            for index in range(repeats * 10):
                reconciler.mark_dirty(f"vm-{index * 7919 % n:05d}")
                started = time.perf_counter()
                actions = await reconciler.run_pass(nursery, limiter)
                dirty.append(time.perf_counter() - started)
                if actions:
                    raise RuntimeError(f"a no-op one-VM pass started {actions} actions")

    trio.run(main)
    return times, floors, dirty, len(published)


def _floor(desired: dict[str, str], observed: dict[str, str]) -> int:
    differ = 0
    for vm_id, want in desired.items():
        if observed.get(vm_id) != want:
            differ += 1
    return differ


def measure(run: Run) -> list[Row]:
    rows = []
    one_vm: dict[int, float] = {}
    for n in (1000, 10_000):
        repeats = 10 if run.quick else 30
        times, floors, dirty, published = _passes(run, n, repeats)
        if published != 1:
            raise RuntimeError(f"no-op passes published {published - 1} extra statuses")
        p50, floor, one_vm[n] = median(times), median(floors), median(dirty)
        run.log(
            f"resync: {n} VMs: full pass {p50 * 1e3:.2f} ms, floor {floor * 1e3:.3f} ms, "
            f"one-VM pass {one_vm[n] * 1e6:.0f} µs"
        )
        rows.append(
            Row(
                NAME,
                f"no-op full reconcile pass, {n:,} VMs (median of {repeats})",
                fmt_s(p50),
                f"{fmt_s(floor)} dict-compare floor",
                fmt_ratio(p50, floor),
                "<= 20 ms at 10,000" if n == 10_000 else "",
            )
        )
    rows.append(
        Row(
            NAME,
            "pass over one VM marked dirty, 10,000 VMs",
            fmt_s(one_vm[10_000]),
            f"{fmt_s(one_vm[1000])} at 1,000 VMs",
            fmt_ratio(one_vm[10_000], one_vm[1000]),
            "flat",
        )
    )
    return rows
