"""Drains in the master (issue 27): the leader moves a draining worker's
unpinned VMs through handoffs, at most ``max_unavailable`` at once;
MasterService on a real SQLite store, workers simulated in process (each
runs at once whatever it is sent and reports it running)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import trio
from test_healing import IMAGE, LEASE, FakeNode, info, service, unpinned, where

from procurator.core.drain import ModeAction
from procurator.core.errors import UnavailableError
from procurator.core.models import (
    Assignment,
    EventKind,
    Fleet,
    Phase,
    PowerState,
    VmAssignment,
    VmStatus,
    WorkerState,
    WorkerStatus,
)
from procurator.master.service import MasterService
from procurator.master.store import FleetStore, Store, open_store

__all__ = ["service"]


class SimWorker:
    """A worker that runs whatever its latest assignment holds, at once,
    and reports it running at that generation."""

    def __init__(self, service: MasterService, worker_id: str, vcpus: int) -> None:
        self.service = service
        self.worker_id = worker_id
        self.vcpus = vcpus
        self.node = FakeNode()
        self.token = 0
        self.running: set[str] = set()
        # Called each time ``running`` changes (a test records the fleet then).
        self.on_change: Callable[[], None] = lambda: None
        # Set: takes what it is sent; cleared: holds it (a slow boot).
        self.going = trio.Event()
        self.going.set()

    async def start(self, nursery: trio.Nursery) -> None:
        self.token = await self.service.register(
            info(self.worker_id, self.vcpus, self.vcpus * 1024), self.node
        )
        assignment, _ = await self.service.get_assignment(self.token, 0)
        await self._take(assignment)
        nursery.start_soon(self._follow)

    async def _follow(self) -> None:
        seen = len(self.node.pushed)
        while True:
            while len(self.node.pushed) == seen:
                await trio.sleep(0.01)
            await self.going.wait()
            seen = len(self.node.pushed)
            await self._take(self.node.pushed[-1])

    async def _take(self, assignment: Assignment) -> None:
        self.running = {vm.id for vm in assignment.vms}
        self.on_change()
        with contextlib.suppress(UnavailableError):
            # The session ended (the test stops its master): a real worker
            # would register again.
            await self._report(assignment)

    async def _report(self, assignment: Assignment) -> None:
        await self.service.report_status(
            self.token,
            WorkerStatus(
                self.worker_id,
                assignment.generation,
                tuple(
                    VmStatus(vm.id, Phase.RUNNING, vm.hash, "", 0, "", PowerState.RUNNING, "")
                    for vm in assignment.vms
                ),
            ),
        )


def pinned_vm(vm_id: str) -> VmAssignment:
    return VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=1, memory_mib=1024)


async def wait_drain(service: MasterService, worker_id: str, *, or_blocked: bool = False) -> None:
    """Until the drain of ``worker_id`` is done (or blocked)."""
    with trio.fail_after(30):  # a hang guard
        while True:
            status = await service.fleet_status()
            w = next(w for w in status.workers if w.worker_id == worker_id)
            if w.mode is not None and (
                w.mode.state is WorkerState.CORDONED or (or_blocked and w.mode.blocked)
            ):
                return
            await service.wait_change(service.change_index, 0.2)


async def test_a_drain_moves_unpinned_vms_through_handoffs_never_more_than_the_bound(
    service: MasterService,
) -> None:
    async with trio.open_nursery() as nursery:
        a = SimWorker(service, "host-a", 8)
        await a.start(nursery)
        fleet = Fleet(
            (("host-a", (pinned_vm("pin-1"),)),),
            tuple(unpinned(f"web-{i}") for i in range(1, 6)),
        )
        await service.apply(fleet)
        b = SimWorker(service, "host-b", 8)
        await b.start(nursery)
        assert set((await where(service)).values()) == {"host-a"}

        both: list[int] = []
        neither: list[set[str]] = []

        def record() -> None:
            both.append(len(a.running & b.running))
            neither.append({f"web-{i}" for i in range(1, 6)} - a.running - b.running)

        a.on_change = b.on_change = record
        change = await service.change_worker_mode("host-a", ModeAction.DRAIN, 2)
        assert change.mode is not None and change.mode.total == 5
        assert change.message.endswith("at most 2 at once; 1 pinned VM(s) stay")
        await wait_drain(service, "host-a")
        nursery.cancel_scope.cancel()

    placed = await where(service)
    assert placed == {"pin-1": "host-a", **{f"web-{i}": "host-b" for i in range(1, 6)}}
    # Never more than two VMs on both workers at once, and at some moment
    # some were (the handoff overlaps); none was on neither (recorded at
    # every change of either worker).
    assert max(both) <= 2 and max(both) >= 1
    assert not any(neither), neither
    status = await service.fleet_status()
    mode = next(w.mode for w in status.workers if w.worker_id == "host-a")
    assert mode is not None and mode.state is WorkerState.CORDONED
    assert (mode.moved, mode.total, mode.blocked) == (5, 5, "")
    moves = [
        e
        for e in await service.recent_events()
        if e.event.kind is EventKind.RESCHEDULED and e.event.op_id == change.mode.op_id
    ]
    assert sorted(e.event.vm_id for e in moves) == [f"web-{i}" for i in range(1, 6)]
    assert moves[0].event.message == "moved from host-a to host-b (worker draining)"


async def test_a_vm_that_fits_nowhere_blocks_the_drain_and_uncordon_ends_it(
    service: MasterService,
) -> None:
    async with trio.open_nursery() as nursery:
        a = SimWorker(service, "host-a", 8)
        await a.start(nursery)
        await service.apply(Fleet((), (unpinned("web-1"), unpinned("web-2"))))
        b = SimWorker(service, "host-b", 1)  # room for one VM
        await b.start(nursery)
        change = await service.change_worker_mode("host-a", ModeAction.DRAIN)
        await wait_drain(service, "host-a", or_blocked=True)
        status = await service.fleet_status()
        mode = next(w.mode for w in status.workers if w.worker_id == "host-a")
        assert mode is not None and mode.state is WorkerState.DRAINING
        # Both fit on host-b alone, not together: the scheduler's answer for
        # the pair fails, and the drain starts nothing (nothing lost).
        assert mode.moved == 0
        assert mode.blocked.startswith("web-2: needs 1 vCPU/1 GiB; best worker host-b has 0 vCPU")
        assert a.running == {"web-1", "web-2"} and b.running == set()

        ended = await service.change_worker_mode("host-a", ModeAction.UNCORDON)
        assert ended.changed and "ended at 0/2 moved" in ended.message
        assert change.mode is not None
        nursery.cancel_scope.cancel()
    status = await service.fleet_status()
    assert {w.worker_id: w.state for w in status.workers} == {
        "host-a": WorkerState.READY,
        "host-b": WorkerState.READY,
    }


async def test_a_drain_goes_on_after_a_master_restart(tmp_path: Path) -> None:
    for run in range(2):
        async with (
            await FleetStore.open(tmp_path / "m.db") as store,
            trio.open_nursery() as nursery,
        ):
            master = MasterService(store, worker_lease=LEASE * 30, leader_lease=LEASE)
            await nursery.start(master.run)
            a = SimWorker(master, "host-a", 8)
            await a.start(nursery)
            if run == 0:
                await master.apply(Fleet((), tuple(unpinned(f"web-{i}") for i in range(3))))
            b = SimWorker(master, "host-b", 8)
            if run == 0:
                # host-b never reports: the first handoff waits for it, and
                # the master stops with it in flight.
                b.token = await master.register(info("host-b", 8, 8192), b.node)
                await master.change_worker_mode("host-a", ModeAction.DRAIN)
                with trio.fail_after(30):
                    while not master._handoffs:
                        await trio.sleep(0.01)
            else:
                await b.start(nursery)
                await wait_drain(master, "host-a")
                assert set((await where(master)).values()) == {"host-b"}
            nursery.cancel_scope.cancel()


async def test_a_drain_goes_on_after_its_leader_dies_and_through_another_masters_sessions(
    pg_url: str,
) -> None:
    async with trio.open_nursery() as nursery:
        scopes, services = [], []
        for index in range(2):
            store = await open_store(pg_url)
            service = MasterService(
                store,
                master_id=f"m{index}",
                sync_interval=0.2,
                worker_lease=30.0,
                leader_lease=1.0,
                push_timeout=2.0,
            )
            scope = trio.CancelScope()

            async def run(
                task_status: trio.TaskStatus[None], s: MasterService = service, c: object = scope
            ) -> None:
                with c:  # type: ignore[attr-defined]
                    await s.run(task_status=task_status)

            await nursery.start(run)
            nursery.start_soon(_close_later, store)
            scopes.append(scope)
            services.append(service)
        with trio.fail_after(30):  # a hang guard
            while not any(s.leadership.leading for s in services):
                await trio.sleep(0.05)
        leader = next(i for i, s in enumerate(services) if s.leadership.leading)
        other = services[1 - leader]
        # Both workers on the master that does not lead: the leader's
        # commits reach them through the other master's caches.
        a, b = SimWorker(other, "host-a", 8), SimWorker(other, "host-b", 8)
        await a.start(nursery)
        await other.apply(Fleet((), tuple(unpinned(f"web-{i}") for i in range(3))))
        b.going = trio.Event()  # host-b holds what it is sent: a handoff waits
        await b.start(nursery)
        await other.change_worker_mode("host-a", ModeAction.DRAIN)
        with trio.fail_after(30):
            while not b.node.pushed or not b.node.pushed[-1].vms:
                await trio.sleep(0.02)
        # The target was sent the VM beside its own (empty) assignment.
        assert [v.id for v in b.node.pushed[-1].vms] == ["web-0"]
        scopes[leader].cancel()  # dies: its lease runs out
        b.going.set()
        await wait_drain(other, "host-a")
        assert set((await where(other)).values()) == {"host-b"}
        with trio.fail_after(30):  # host-a stops its copies
            while a.running:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def _close_later(store: Store) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
