"""The worker freezes its long-lived objects for CPython's cyclic collector
once its fleet holds still, and again after churn (procurator.worker.heap,
issue 31 target 3: an idle 1,000-VM worker's full collections walked
~200,000 objects every ~2 minutes, ~0.1 s of CPU each).

The freeze's hazard is memory: a cycle among frozen objects is never
freed. The bound is checked with the real collector and VM-like objects
that each hold a cycle; the whole path (a start, then a removal) with real
``procurator master`` and ``worker`` processes and the fake VMM."""

from __future__ import annotations

import gc
import re
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from fleethelpers import AddImage, add_image, nix_env, running_fake_fleet
from publisherhelpers import RecordingPublisher

from procurator.worker.heap import CPythonCollector, LongLivedHeap, Mark, refreeze_due
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions

__all__ = ["add_image", "nix_env"]  # fixtures, for the process test


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """The test process as it was: nothing frozen before or after."""
    assert gc.get_freeze_count() == 0
    try:
        yield
    finally:
        gc.unfreeze()


def _marks(*ids: str, pid: int = 1) -> frozenset[Mark]:
    return frozenset((vm_id, pid) for vm_id in ids)


def test_the_first_freeze_waits_for_a_fleet_that_holds_still() -> None:
    a, ab = _marks("a"), _marks("a", "b")
    assert not refreeze_due(None, None, frozenset())  # the first poll
    assert refreeze_due(None, frozenset(), frozenset())  # empty, and still
    assert not refreeze_due(None, a, ab)  # growing: a start's burst
    assert refreeze_due(None, ab, ab)


def test_a_refreeze_takes_a_tenth_of_churn_when_still_two_tenths_gone_at_once() -> None:
    fleet = [f"vm-{i}" for i in range(1000)]
    frozen = _marks(*fleet)
    # 49 VMs replaced (a new pid each): 98 marks of churn, under 100.
    changed = _marks(*fleet[49:]) | _marks(*fleet[:49], pid=2)
    assert not refreeze_due(frozen, changed, changed)
    changed = _marks(*fleet[50:]) | _marks(*fleet[:50], pid=2)
    assert refreeze_due(frozen, changed, changed)
    # Not still: only gone marks count, and only from 200.
    assert not refreeze_due(frozen, frozenset(), _marks(*fleet[199:]))
    assert refreeze_due(frozen, frozenset(), _marks(*fleet[200:]))
    # Growth alone never forces one: its objects are no garbage.
    grown = frozen | _marks(*(f"new-{i}" for i in range(5000)))
    assert not refreeze_due(frozen, frozen, grown)
    assert refreeze_due(frozen, grown, grown)
    # A fleet frozen empty: the first VM is enough, once still.
    assert refreeze_due(frozenset(), _marks("a"), _marks("a"))


class _Busy(CPythonCollector):
    """The real collector, but while ``busy`` its ``collect`` returns at
    once as CPython's does when another thread's collection is under way."""

    def __init__(self) -> None:
        self.busy = False
        self.collects = 0

    def collect(self) -> int:
        self.collects += 1
        return 0 if self.busy else super().collect()


def test_a_refreeze_whose_collection_did_not_run_is_tried_again(unfrozen: None) -> None:
    collector = _Busy()
    heap = LongLivedHeap(collector)
    fleet = [f"vm-{i}" for i in range(10)]
    assert heap.settle(_marks(*fleet)) is None
    assert heap.settle(_marks(*fleet)) is not None  # still: the first freeze
    collector.busy = True
    rest = _marks(*fleet[2:])  # two tenths gone: a refreeze at once
    assert heap.settle(rest) is None
    assert collector.collects == 2 and gc.get_freeze_count() > 0  # frozen as it was
    collector.busy = False
    done = heap.settle(rest)  # the churn still counts
    assert done is not None and done.gone == 2
    heap.release()


class _VmState:
    """Stands for a VM's long-lived objects: it holds a cycle (as a thread
    and its target, a supervisor and its bound methods do)."""

    def __init__(self) -> None:
        self.me = self
        self.payload = bytearray(1024)


@pytest.mark.parametrize("still", [True, False], ids=["still", "never-still"])
def test_cycles_of_removed_vms_are_bounded_by_the_refreezes(still: bool, unfrozen: None) -> None:
    # A fleet of 100 frozen, then 3 VMs replaced by 3 others a round, 30
    # rounds: polled twice a round (the fleet holds still at the second),
    # a refreeze comes at 10 marks of churn; polled once (never still), at
    # 20 marks gone.
    heap = LongLivedHeap(CPythonCollector())
    states: weakref.WeakSet[_VmState] = weakref.WeakSet()
    fleet: dict[str, _VmState] = {}
    size, rounds, churn = 100, 30, 3
    bound = size // 10 if still else 2 * size // 10
    serial = 0

    def add() -> None:
        nonlocal serial
        serial += 1
        fleet[f"vm-{serial}"] = state = _VmState()
        states.add(state)

    def poll() -> None:
        heap.settle((vm_id, 1) for vm_id in fleet)

    try:
        for _ in range(size):
            add()
        poll()
        poll()  # still: the first freeze
        assert gc.get_freeze_count() > 0
        most_held = 0
        for _ in range(rounds):
            for vm_id in list(fleet)[:churn]:
                del fleet[vm_id]  # a frozen cycle turns garbage
            for _ in range(churn):
                add()
            poll()
            if still:
                poll()
            gc.collect()  # what the collector may free, freed
            most_held = max(most_held, len(states) - len(fleet))
        # 90 VMs went away; some of their cycles were held (frozen), never
        # more than the bound.
        assert 0 < most_held < bound
    finally:
        heap.release()
    gc.collect()
    assert len(states) == len(fleet)  # unfrozen: every gone VM's cycle freed


def test_without_a_refreeze_the_frozen_cycles_of_removed_vms_stay(unfrozen: None) -> None:
    # What the bound above is for: a heap frozen once holds on to every
    # removed VM's cycle.
    states: weakref.WeakSet[_VmState] = weakref.WeakSet()
    fleet = [_VmState() for _ in range(50)]
    states.update(fleet)
    gc.collect()
    gc.freeze()
    fleet.clear()
    gc.collect()
    assert len(states) == 50
    gc.unfreeze()
    gc.collect()
    assert len(states) == 0


async def test_the_worker_freezes_while_it_runs_and_unfreezes_at_close(
    tmp_path: Path, unfrozen: None
) -> None:
    # The worker's own runtime, in process, no VM: its fleet (empty) holds
    # still at the second poll.
    options = RuntimeOptions(
        driver="cloud-hypervisor",
        vmm_binary=sys.executable,
        network=False,
        jail=None,
        metrics_interval=0.05,
    )
    handler = ReconcilingHandler(
        worker_id="host-a",
        state_dir=tmp_path / "state",
        options=options,
        publisher=RecordingPublisher(),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(handler.run)
            with trio.fail_after(30):
                while gc.get_freeze_count() == 0:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        handler.close()
    assert gc.get_freeze_count() == 0


FROZE = re.compile(r"froze the worker's long-lived objects: (\d+) VMs \((\d+) gone, (\d+) new")


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


@pytest.mark.root
@pytest.mark.nix
def test_a_worker_freezes_after_a_start_and_again_after_a_removal(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("heap-vm", _config())
    with running_fake_fleet(tmp_path, nix_env, worker_args=("--metrics-interval", "0.5")) as fleet:

        def freezes() -> list[tuple[int, int, int]]:
            # (VMs, gone, new) of each freeze logged, from whole lines only:
            # the worker may be writing the last one.
            text = fleet.worker_log.read_text()
            found = FROZE.finditer(text[: text.rfind("\n") + 1])
            return [(int(m[1]), int(m[2]), int(m[3])) for m in found]

        fleet.wait_for("the first freeze", lambda: bool(freezes()))
        vms = ", ".join(f'{{ id = "vm-{i}", image = "{image}" }}' for i in range(4))
        fleet.apply_ok(f"[workers.host-a]\nvms = [ {vms} ]\n")
        # Once the four VMs run and the fleet holds still: frozen with them
        # (maybe after a freeze with some of them, the start's burst
        # having paused for a poll).
        fleet.wait_for("a freeze of the 4 VMs", lambda: freezes()[-1][0] == 4)
        started = len(freezes())
        fleet.apply_ok("[workers.host-a]\nvms = []\n")
        # Their objects are garbage now: the next freezes collect them (a
        # freeze may come between, of VMs stopped but not yet removed: a
        # mark of their own, gone again later).
        fleet.wait_for("a freeze after the removal", lambda: freezes()[-1][0] == 0)
        assert sum(gone for _, gone, _ in freezes()[started:]) >= 4, freezes()
