"""Moves in the master (issue 30): the leader drives a move through its
phases, each a generation; refusals name their reason; a failure before
the switch leaves the VM on its source. MasterService on a real SQLite
store, workers simulated in process (each does at once what it is sent:
prepares the images, runs the VMs desired running, stops the others, and
reports it)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.core.drain import ModeAction
from procurator.core.errors import NotFoundError, UnavailableError, ValidationError
from procurator.core.models import (
    Assignment,
    Capacity,
    DiskTransfer,
    EventKind,
    Fleet,
    Phase,
    PowerState,
    PreparedImage,
    PrepareState,
    TransferProgress,
    TransferState,
    UnpinnedVm,
    VmAssignment,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.move import Move, MoveKind, MovePhase
from procurator.master.service import MasterService
from procurator.master.store import FleetStore, Store, open_store

IMAGE = "/nix/store/" + "d" * 32 + "-vm"
LEASE = 1.0


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, push_timeout=1.0, worker_lease=LEASE, leader_lease=LEASE)
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


class Runs:
    """Every VM running on each simulated worker, checked at each change:
    no VM ever runs on two workers."""

    def __init__(self) -> None:
        self.on: dict[str, set[str]] = {}
        self.twice: list[str] = []

    def set(self, worker_id: str, running: set[str]) -> None:
        self.on[worker_id] = running
        for vm_id in running:
            holders = [w for w, vms in self.on.items() if vm_id in vms]
            if len(holders) > 1:
                self.twice.append(f"{vm_id} on {holders}")


class SimWorker:
    """A worker that takes each assignment it is sent at once: prepares
    its images (ready, or failed for ``bad_images``), runs the VMs desired
    running, stops the others, and reports that at the generation.
    ``going`` cleared: it holds what it has (a VMM slow to stop)."""

    def __init__(self, service: MasterService, worker_id: str, runs: Runs) -> None:
        self.service = service
        self.worker_id = worker_id
        self.runs = runs
        self.node = FakeNode()
        self.token = 0
        self.bad_images: set[str] = set()
        self.no_transfers = False  # registers without a transfer address
        self.labels: tuple[tuple[str, str], ...] = ()
        self.receiving = True  # cleared: the disks it is sent never arrive
        self.transfers: list[DiskTransfer] = []  # every one it was sent
        self.going = trio.Event()
        self.going.set()

    async def start(self, nursery: trio.Nursery) -> None:
        self.token = await self.service.register(
            WorkerInfo(
                self.worker_id,
                "1.0",
                Capacity(4, 4096, 0),
                labels=self.labels,
                transfer_address="" if self.no_transfers else "127.0.0.1:7400",
            ),
            self.node,
        )
        assignment, _ = await self.service.get_assignment(self.token, 0)
        await self._take(assignment)
        nursery.start_soon(self._follow)

    async def _follow(self) -> None:
        seen = len(self.node.pushed)
        while True:
            # The hold is checked and the newest push taken with no
            # checkpoint in between: ``await going.wait()`` on a set event
            # still yields, and a test that held the worker meanwhile (a
            # fresh ``going``) saw the push it meant to hold taken anyway.
            while len(self.node.pushed) == seen or not self.going.is_set():
                await trio.sleep(0.01)
            seen = len(self.node.pushed)
            await self._take(self.node.pushed[-1])

    async def take_again(self) -> None:
        """Report again what it was last sent (its state changed)."""
        await self._take(self.node.pushed[-1])

    async def _take(self, assignment: Assignment) -> None:
        running = {vm.id for vm in assignment.vms if vm.power is PowerState.RUNNING}
        self.runs.set(self.worker_id, running)
        status = WorkerStatus(
            self.worker_id,
            assignment.generation,
            tuple(
                VmStatus(
                    vm.id,
                    Phase.RUNNING if vm.id in running else Phase.STOPPED,
                    vm.hash,
                    observed_power=vm.power,
                )
                for vm in assignment.vms
            ),
            tuple(
                PreparedImage(
                    path, PrepareState.FAILED if path in self.bad_images else PrepareState.READY
                )
                for path in assignment.prepare
            ),
            # The disks arrive at once (procurator.worker.move_transfer's
            # own tests send real ones).
            tuple(
                TransferProgress(
                    t.vm_id,
                    t.op_id,
                    (TransferState.RECEIVED if self.receiving else TransferState.PENDING)
                    if t.receive
                    else TransferState.SENT,
                )
                for t in assignment.transfers
            ),
        )
        self.transfers.extend(t for t in assignment.transfers if t not in self.transfers)
        with contextlib.suppress(UnavailableError):
            await self.service.report_status(self.token, status)


def web(vm_id: str) -> UnpinnedVm:
    return UnpinnedVm(VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=1, memory_mib=1024))


async def where(service: MasterService) -> dict[str, list[str]]:
    status = await service.fleet_status()
    found: dict[str, list[str]] = {}
    for w in status.workers:
        for v in w.desired_vms:
            found.setdefault(v.id, []).append(w.worker_id)
    return found


async def wait_over(service: MasterService, vm_id: str) -> Move:
    with trio.fail_after(30):  # a hang guard
        while True:
            (move, *_) = await service.moves(vm_id)
            if move.over:
                return move
            await trio.sleep(0.05)


async def lab(service: MasterService, nursery: trio.Nursery) -> tuple[Runs, SimWorker, SimWorker]:
    """host-a runs web-1 (unpinned) and pin-1 (pinned); host-b is empty."""
    runs = Runs()
    a, b = SimWorker(service, "host-a", runs), SimWorker(service, "host-b", runs)
    await a.start(nursery)
    pinned = VmAssignment("pin-1", "h-pin", IMAGE, vcpus=1, memory_mib=1024)
    await service.apply(Fleet((("host-a", (pinned,)),), (web("web-1"),)))
    await b.start(nursery)
    return runs, a, b


async def test_a_cold_move_goes_through_its_phases_and_the_vm_never_runs_twice(
    service: MasterService,
) -> None:
    async with trio.open_nursery() as nursery:
        runs, a, b = await lab(service, nursery)
        move = await service.move("web-1", "host-b")
        assert move.phase is MovePhase.PENDING and move.source == "host-a"
        done = await wait_over(service, "web-1")
        assert done.phase is MovePhase.DONE, done.reason
        assert (await where(service))["web-1"] == ["host-b"]
        with trio.fail_after(10):
            while "web-1" not in runs.on["host-b"]:
                await trio.sleep(0.01)
        assert "web-1" not in runs.on["host-a"] and runs.twice == []
        # Each phase is an event with the move's op id (stored after the
        # phase commits: the move can be seen over before its last event).
        with trio.fail_after(10):  # a hang guard
            while True:
                events = [
                    e
                    for e in await service.recent_events("web-1")
                    if e.event.kind is EventKind.MOVING
                ]
                if events and " moved " in events[-1].event.message:
                    break
                await trio.sleep(0.01)
        assert all(e.event.op_id == move.op_id for e in events)
        assert [e.event.message.split(": ")[1].split(" ")[0] for e in events] == [
            "preparing",
            "stopping",
            "transferring",
            "switching",
            "VM",
        ]
        # Both sides were named the transfer, with one token, the source
        # the target's address.
        (sent,) = a.transfers
        (received,) = b.transfers
        assert (sent.receive, received.receive) == (False, True)
        assert sent.token == received.token and len(sent.token) == 32
        assert (sent.peer, sent.op_id) == ("127.0.0.1:7400", move.op_id)
        # A pinned VM moves too: pinned to the target from now on.
        await service.move("pin-1", "host-b")
        assert (await wait_over(service, "pin-1")).phase is MovePhase.DONE
        assert (await where(service))["pin-1"] == ["host-b"] and runs.twice == []
        # The fleet file wins: applied again as it was, it pins pin-1 to
        # host-a (an ordinary relocation); web-1, unpinned, stays.
        pinned = VmAssignment("pin-1", "h-pin", IMAGE, vcpus=1, memory_mib=1024)
        await service.apply(Fleet((("host-a", (pinned,)),), (web("web-1"),)))
        assert await where(service) == {"pin-1": ["host-a"], "web-1": ["host-b"]}
        nursery.cancel_scope.cancel()


async def test_refusals_say_why_and_change_nothing(service: MasterService) -> None:
    async with trio.open_nursery() as nursery:
        _, _, b = await lab(service, nursery)
        generation = service.generation
        with pytest.raises(NotFoundError, match="VM nope is not in the fleet"):
            await service.move("nope", "host-b")
        cases = {
            "host-a": "VM web-1 is on worker host-a already",
            "host-z": "worker host-z is unknown",
        }
        for target, why in cases.items():
            with pytest.raises(ValidationError, match=why):
                await service.move("web-1", target)
        # A live move reads what each end's worker said of its VMM driver.
        with pytest.raises(ValidationError, match="the source worker host-a cannot move a run"):
            await service.move("web-1", "host-b", kind=MoveKind.LIVE)
        await service.change_worker_mode("host-b", ModeAction.CORDON)
        with pytest.raises(ValidationError, match="worker host-b is cordoned"):
            await service.move("web-1", "host-b")
        await service.change_worker_mode("host-b", ModeAction.UNCORDON)
        # A worker that takes no disks (run without --transfer-listen).
        c = SimWorker(service, "host-c", Runs())
        c.no_transfers = True
        await c.start(nursery)
        with pytest.raises(ValidationError, match="worker host-c takes no moves: it runs without"):
            await service.move("web-1", "host-c")
        assert service.generation == generation and await service.moves() == ()
        # One move at a time per VM.
        b.going = trio.Event()  # host-b prepares nothing: the move stays
        first = await service.move("web-1", "host-b")
        with pytest.raises(ValidationError, match=f"VM web-1 is moving already .*{first.op_id}"):
            await service.move("web-1", "host-b")
        # A full target: host-b offers 4 vCPUs, and four 1-vCPU VMs are
        # pinned there now.
        pinned_a = VmAssignment("pin-1", "h-pin", IMAGE, vcpus=1, memory_mib=1024)
        fill = tuple(
            VmAssignment(f"fill-{i}", f"h-fill-{i}", IMAGE, vcpus=1, memory_mib=512)
            for i in range(4)
        )
        await service.apply(Fleet((("host-a", (pinned_a,)), ("host-b", fill)), (web("web-1"),)))
        with pytest.raises(ValidationError, match="pin-1 does not fit on worker host-b: needs 1"):
            await service.move("pin-1", "host-b")
        assert [m.op_id for m in await service.moves()] == [first.op_id]
        nursery.cancel_scope.cancel()


async def test_a_failure_before_the_switch_leaves_the_vm_running_on_its_source(
    tmp_path: Path,
) -> None:
    # The master's wall clock, moved on by the test once the move is where
    # it wants the deadline to pass (a short real deadline raced the
    # prepare phase under load).
    ahead = [0.0]
    async with (
        await FleetStore.open(tmp_path / "m.db") as store,
        trio.open_nursery() as nursery,
    ):
        service = MasterService(
            store,
            push_timeout=1.0,
            worker_lease=LEASE,
            leader_lease=LEASE,
            wall_clock=lambda: time.time() + ahead[0],
        )
        await nursery.start(service.run)
        runs, a, b = await lab(service, nursery)
        # The image fails to prepare on the target.
        b.bad_images.add(IMAGE)
        await service.move("web-1", "host-b")
        failed = await wait_over(service, "web-1")
        assert failed.phase is MovePhase.FAILED
        assert failed.reason == "worker host-b cannot prepare the image"
        assert (await where(service))["web-1"] == ["host-a"] and "web-1" in runs.on["host-a"]
        # The deadline passes while the source is stopping the VM: it is
        # started again there.
        b.bad_images.clear()
        a.going = trio.Event()
        await service.move("web-1", "host-b", timeout_s=600)
        with trio.fail_after(10):
            while (await service.moves("web-1"))[0].phase is not MovePhase.STOPPING:
                await trio.sleep(0.02)
        # The source holds; the deadline passes: the stop is reverted.
        ahead[0] = 601.0
        failed = await wait_over(service, "web-1")
        a.going.set()
        assert failed.phase is MovePhase.FAILED, failed
        assert failed.reason == "not done before the deadline (in phase stopping)"
        with trio.fail_after(10):
            while "web-1" not in runs.on["host-a"]:
                await trio.sleep(0.01)
        assert (await where(service))["web-1"] == ["host-a"]
        assert "web-1" not in runs.on["host-b"] and runs.twice == []
        nursery.cancel_scope.cancel()


async def test_a_drain_starts_no_handoff_of_a_moving_vm(service: MasterService) -> None:
    async with trio.open_nursery() as nursery:
        runs, _, b = await lab(service, nursery)
        b.going = trio.Event()  # host-b holds: the move stays before its stop
        move = await service.move("web-1", "host-b")
        await service.change_worker_mode("host-a", ModeAction.DRAIN)
        with trio.fail_after(10):
            while (await service.moves("web-1"))[0].phase is not MovePhase.PREPARING:
                await trio.sleep(0.02)
        await trio.sleep(1.5)  # three passes of the drain duty (each 0.5 s): none hands it off
        status = await service.fleet_status()
        (a,) = [w for w in status.workers if w.worker_id == "host-a"]
        assert a.handoffs == 0 and a.mode is not None and a.mode.moved == 0
        b.going.set()
        done = await wait_over(service, "web-1")
        assert done.phase is MovePhase.DONE and done.op_id == move.op_id, done
        assert (await where(service))["web-1"] == ["host-b"] and runs.twice == []
        nursery.cancel_scope.cancel()


async def test_a_move_goes_on_after_a_master_restart_in_its_stop(tmp_path: Path) -> None:
    runs = Runs()
    for run in range(2):
        async with (
            await FleetStore.open(tmp_path / "m.db") as store,
            trio.open_nursery() as nursery,
        ):
            master = MasterService(store, worker_lease=30.0, leader_lease=LEASE)
            await nursery.start(master.run)
            a, b = SimWorker(master, "host-a", runs), SimWorker(master, "host-b", runs)
            await a.start(nursery)
            await b.start(nursery)
            if run == 0:
                await master.apply(Fleet((), (web("web-1"),)))
                with trio.fail_after(10):
                    while "web-1" not in runs.on["host-a"]:
                        await trio.sleep(0.01)
                # host-a holds the stop: the master stops with the move in it.
                a.going = trio.Event()
                await master.move("web-1", "host-b")
                with trio.fail_after(10):
                    while (await master.moves("web-1"))[0].phase is not MovePhase.STOPPING:
                        await trio.sleep(0.02)
                assert "web-1" in runs.on["host-a"]
            else:
                done = await wait_over(master, "web-1")
                assert done.phase is MovePhase.DONE, done
                assert (await where(master))["web-1"] == ["host-b"]
                assert runs.on["host-b"] == {"web-1"} and runs.twice == []
            nursery.cancel_scope.cancel()


async def test_a_move_goes_on_after_its_leader_dies_and_through_another_masters_sessions(
    pg_url: str,
) -> None:
    """Two masters on one PostgreSQL store: both workers' sessions on the
    one that does not lead; the leader dies (its lease runs out) while the
    move transfers; the other master's leader takes it to done."""
    runs = Runs()
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
        a, b = SimWorker(other, "host-a", runs), SimWorker(other, "host-b", runs)
        await a.start(nursery)
        await b.start(nursery)
        await other.apply(Fleet((), (web("web-1"),)))
        with trio.fail_after(30):
            while "web-1" not in runs.on["host-a"]:
                await trio.sleep(0.02)
        b.receiving = False  # the transfer waits
        move = await other.move("web-1", "host-b")
        with trio.fail_after(30):
            while (await other.moves("web-1"))[0].phase is not MovePhase.TRANSFERRING:
                await trio.sleep(0.02)
        scopes[leader].cancel()  # dies: its lease runs out
        b.receiving = True
        await b.take_again()
        done = await wait_over(other, "web-1")
        assert done.phase is MovePhase.DONE and done.op_id == move.op_id, done
        assert other.leadership.leading
        assert (await where(other))["web-1"] == ["host-b"] and runs.twice == []
        nursery.cancel_scope.cancel()


async def _close_later(store: Store) -> None:
    try:
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


async def test_an_unpinned_vm_moves_only_where_its_constraints_hold(
    service: MasterService,
) -> None:
    async with trio.open_nursery() as nursery:
        runs = Runs()
        a, b = SimWorker(service, "host-a", runs), SimWorker(service, "host-b", runs)
        a.labels = (("zone", "a"),)
        await a.start(nursery)
        await b.start(nursery)
        zoned = UnpinnedVm(
            VmAssignment("db-1", "h-db", IMAGE, vcpus=1, memory_mib=1024),
            constraints=(("zone", "a"),),
        )
        await service.apply(Fleet((), (zoned,)))
        with pytest.raises(
            ValidationError,
            match=r"worker host-b does not match VM db-1's constraints \(zone=a\)",
        ):
            await service.move("db-1", "host-b")
        assert await service.moves() == ()
        nursery.cancel_scope.cancel()


async def test_the_target_is_sent_its_transfer_until_the_move_is_done_not_after(
    service: MasterService,
) -> None:
    async with trio.open_nursery() as nursery:
        _, _, b = await lab(service, nursery)
        b.going = trio.Event()  # host-b takes each push only when told
        move = await service.move("web-1", "host-b")
        with trio.fail_after(30):  # a hang guard
            # It takes every push but the switch's: the VM does not run yet.
            while not (pushed := b.node.pushed) or all(v.id != "web-1" for v in pushed[-1].vms):
                if pushed:
                    await b.take_again()
                await trio.sleep(0.01)
        assert (await service.moves("web-1"))[0].phase is MovePhase.SWITCHING
        # Switching: the target (also one restarted now, pulling) is still
        # sent the transfer, the only op whose disks the VM may take.
        pulled, _ = await service.get_assignment(b.token, 0)
        assert [(t.op_id, t.receive) for t in pulled.transfers] == [(move.op_id, True)]
        b.going.set()
        assert (await wait_over(service, "web-1")).phase is MovePhase.DONE
        # Done writes the row only, yet the target is no longer sent it.
        pulled, _ = await service.get_assignment(b.token, 0)
        assert pulled.transfers == ()
        # Nor when the VM moves back (host-b the source now: one transfer).
        back = await service.move("web-1", "host-a")
        assert (await wait_over(service, "web-1")).phase is MovePhase.DONE
        assert {t for t in b.transfers if t.op_id == back.op_id} == {
            t for t in b.transfers if t.op_id == back.op_id and not t.receive
        }
        nursery.cancel_scope.cancel()
