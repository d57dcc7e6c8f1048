"""A drain moves VMs live where both ends can (procurator.master.drain.
live_or_handoff), and hands the rest off: the decision (pure), and a drain
through a MasterService on a real SQLite store with workers simulated in
process (tests/moves/livesim.py): never more live moves in flight than the
drain allows, its progress counted, a VM whose live move failed handed off
instead."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
from livesim import LiveSim

from procurator.core.drain import Handoff, ModeAction, WorkerMode
from procurator.core.models import Fleet, UnpinnedVm, VmAssignment, WorkerInfo, WorkerState
from procurator.core.move import Move, MoveKind, MovePhase, advance
from procurator.master.drain import live_or_handoff
from procurator.master.service import MasterService
from procurator.master.store import Fence, FencedError, FleetStore, Store

IMAGE = "/nix/store/" + "d" * 32 + "-vm"
CH = ("cloud-hypervisor", True)


def test_a_vm_goes_live_where_both_ends_can_else_by_handoff() -> None:
    mode = WorkerMode(WorkerState.DRAINING, "op-d", 1_000)
    starts = [
        Handoff(vm, "a", target, "op-d", 0, 2_000)
        for vm, target in (("v1", "b"), ("v2", "c"), ("v3", "d"), ("v4", "e"), ("v5", "b"))
    ]
    failed_before = Move("v5", "a", "b", MoveKind.LIVE, MovePhase.FAILED, "op-x", 500, 0)
    failed_now = Move("v4", "a", "e", MoveKind.LIVE, MovePhase.FAILED, "op-y", 1_500, 0)
    live, handoff = live_or_handoff(
        starts,
        modes={"a": mode},
        moves=[failed_before, failed_now],
        vmms={"a": CH, "b": CH, "c": ("qemu", True), "d": ("cloud-hypervisor", False), "e": CH},
        transfers=["b", "c", "d", "e"],
    )
    # v1 and v5 live (v5's live move failed before this drain began); v2:
    # another driver, v3: the target moves no running VM, v4: its live
    # move failed in this drain.
    assert [h.vm_id for h in live] == ["v1", "v5"]
    assert [h.vm_id for h in handoff] == ["v2", "v3", "v4"]
    # A target without a transfer address takes no moves.
    live, handoff = live_or_handoff(
        starts[:1], modes={"a": mode}, moves=[], vmms={"a": CH, "b": CH}, transfers=[]
    )
    assert (live, [h.vm_id for h in handoff]) == ([], ["v1"])


def web(vm_id: str) -> UnpinnedVm:
    return UnpinnedVm(VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=1, memory_mib=512))


async def test_a_drain_moves_its_vms_live_one_at_a_time_and_hands_off_a_failed_one(
    tmp_path: Path,
) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store, push_timeout=1.0, worker_lease=60, leader_lease=1.0)
        await nursery.start(service.run)
        a = LiveSim(service, "host-a", sends="sent")
        await a.start(nursery)
        await service.apply(Fleet((), (web("web-1"), web("web-2"), web("web-3"))))
        b = LiveSim(service, "host-b")
        await b.start(nursery)
        change = await service.change_worker_mode("host-a", ModeAction.DRAIN, 1)
        assert change.mode is not None and change.mode.total == 3
        under_way: list[int] = []
        with trio.fail_after(60):  # a hang guard
            while True:
                moves = await service.moves()
                under_way.append(sum(not m.over for m in moves))
                done = [m for m in moves if m.phase is MovePhase.DONE]
                if len(done) == 2:
                    # The third one's migration fails: handed off instead.
                    a.sends = "failed"
                status = await service.fleet_status()
                (drained,) = [w for w in status.workers if w.worker_id == "host-a"]
                if drained.mode is not None and drained.mode.state is WorkerState.CORDONED:
                    break
                await trio.sleep(0.02)
        moves = await service.moves()
        assert sorted(m.phase.value for m in moves) == ["done", "done", "failed"], moves
        assert all(m.kind is MoveKind.LIVE and m.target == "host-b" for m in moves)
        assert max(under_way) == 1  # max unavailable: one at a time
        assert drained.mode is not None and (drained.mode.moved, drained.mode.total) == (3, 3)
        with trio.fail_after(10):
            while b.running != {"web-1", "web-2", "web-3"}:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_the_store_counts_a_vm_a_drain_moved_off_its_worker(store: Store) -> None:
    epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
    assert epoch is not None
    fence = Fence("leader", "m1", epoch)
    await store.register("host-a", "m1", WorkerInfo("host-a"), unix_ms=1, lease_ms=60_000)
    drain = await store.change_mode("host-a", ModeAction.DRAIN, op_id="op-d", unix_ms=1)
    assert drain.mode is not None
    assert await store.drain_moved(fence, "host-a", "op-d")
    assert not await store.drain_moved(fence, "host-a", "op-other")  # not that worker's drain
    mode = (await store.worker("host-a")).mode
    assert mode is not None and mode.moved == 1 and mode.state is WorkerState.DRAINING
    with pytest.raises(FencedError):
        await store.drain_moved(Fence("leader", "m0", 0), "host-a", "op-d")
    # A move ending done counts in the drain in the same transaction.
    move = Move("v1", "host-a", "host-b", MoveKind.LIVE, MovePhase.PENDING, "op-m", 2, 10_000)
    await store.start_move(move)
    switching = dataclasses.replace(move, phase=MovePhase.SWITCHING)
    await store.put_move(fence, switching, move, drain="op-d")  # not done: not counted
    await store.put_move(
        fence, advance(switching, MovePhase.DONE, now_ms=3), switching, drain="op-d"
    )
    mode = (await store.worker("host-a")).mode
    assert mode is not None and mode.moved == 2


class _SlowDrainCount:
    """The master's store (our port), except that a drain's count of a
    move, written on its own after the move's row said done, waits until
    the drain duty has had its chance to end the drain (bounded): the
    window between the two writes, made wide."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.drain_ended = trio.Event()

    def __getattr__(self, name: str) -> object:
        return getattr(self._store, name)

    async def update_drain(
        self, fence: Fence, worker_id: str, op_id: str, *, blocked: str = "", finished: bool = False
    ) -> bool:
        ended = await self._store.update_drain(
            fence, worker_id, op_id, blocked=blocked, finished=finished
        )
        if finished:
            self.drain_ended.set()
        return ended

    async def drain_moved(self, fence: Fence, worker_id: str, op_id: str) -> bool:
        with trio.move_on_after(5):
            await self.drain_ended.wait()
        return await self._store.drain_moved(fence, worker_id, op_id)


async def test_a_drain_that_ends_as_its_last_move_is_done_counts_that_move(
    tmp_path: Path,
) -> None:
    # The move's row said done, then (a write apart) the drain counted it:
    # a drain pass in between saw no move under way and the worker empty,
    # and ended the drain '0 VM(s) moved'; the count came too late.
    async with await FleetStore.open(tmp_path / "m.db") as opened, trio.open_nursery() as nursery:
        store = _SlowDrainCount(opened)
        service = MasterService(store, push_timeout=1.0, worker_lease=60, leader_lease=1.0)  # type: ignore[arg-type]
        await nursery.start(service.run)
        a = LiveSim(service, "host-a", sends="sent")
        await a.start(nursery)
        await service.apply(Fleet((), (web("web-1"),)))
        b = LiveSim(service, "host-b")
        await b.start(nursery)
        await service.change_worker_mode("host-a", ModeAction.DRAIN, 1)
        with trio.fail_after(60):  # a hang guard
            while True:
                status = await service.fleet_status()
                (drained,) = [w for w in status.workers if w.worker_id == "host-a"]
                if drained.mode is not None and drained.mode.state is WorkerState.CORDONED:
                    break
                await trio.sleep(0.02)
        assert [m.phase for m in await service.moves()] == [MovePhase.DONE]
        assert (drained.mode.moved, drained.mode.total) == (1, 1), drained.mode
        nursery.cancel_scope.cancel()
