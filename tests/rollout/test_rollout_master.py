"""Rollouts driven by the master (procurator.master.rollout): MasterService
on a real SQLite store, its leader's duty at a short interval, workers as
fake ``Node``s that report what a worker would (health, prepared images)
from what they were pushed."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.core.models import (
    Assignment,
    EventKind,
    Fleet,
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    PreparedImage,
    PrepareState,
    RolloutPolicy,
    VmAssignment,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.rollout import Rollout, RolloutPhase, VmState
from procurator.master.metrics import MasterMetrics
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.master.store.model import RolloutActiveError

OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"
CHECK = HealthCheck(HealthKind.TCP, 22, min_healthy_ms=1000)


class FakeWorker:
    """Reports, for the newest assignment it was pushed, each VM running
    its hash with the health ``health(vm)`` says, and each image to
    prepare as ``prepare(path)`` says."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.node = FakeNode()
        self.token = 0
        self.health: Callable[[VmAssignment], Health] = lambda vm: Health.HEALTHY
        self.prepare: Callable[[str], PrepareState] = lambda path: PrepareState.READY

    async def register(self, service: MasterService) -> None:
        self.token = await service.register(WorkerInfo(self.worker_id, "1.0"), self.node)

    @property
    def assignment(self) -> Assignment | None:
        return self.node.pushed[-1] if self.node.pushed else None

    async def report(self, service: MasterService) -> None:
        assignment = self.assignment
        if assignment is None:
            return
        vms = tuple(
            VmStatus(vm.id, Phase.RUNNING, vm.hash, observed_power=vm.power, health=self.health(vm))
            for vm in assignment.vms
        )
        prepared = tuple(PreparedImage(p, self.prepare(p)) for p in assignment.prepare)
        await service.report_status(
            self.token,
            WorkerStatus(self.worker_id, assignment.generation, vms, prepared),
        )


def entry(vm_id: str, path: str) -> VmAssignment:
    return VmAssignment(vm_id, path[11:43], path)


def fleet(path: str, n: int = 6, policy: RolloutPolicy | None = None) -> Fleet:
    workers: dict[str, list[VmAssignment]] = {}
    for i in range(n):
        workers.setdefault(f"w{i % 2}", []).append(entry(f"vm-{i}", path))
    return Fleet(
        tuple((w, tuple(vms)) for w, vms in sorted(workers.items())),
        rollout=policy or RolloutPolicy(max_parallel=2, health=CHECK, healthy_deadline_ms=2000),
    )


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(
            store, push_timeout=1.0, worker_lease=5.0, leader_lease=1.0, rollout_interval=0.02
        )
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


@pytest.fixture
async def workers(service: MasterService) -> list[FakeWorker]:
    found = [FakeWorker("w0"), FakeWorker("w1")]
    for worker in found:
        await worker.register(service)
    await service.apply(fleet(OLD))
    return found


async def run_until(
    service: MasterService,
    workers: list[FakeWorker],
    rollout_id: str,
    done: Callable[[Rollout], bool],
    sample: Callable[[], None] = lambda: None,
) -> Rollout:
    """Let the fake workers report until the rollout satisfies ``done``."""
    with trio.fail_after(30):  # a hang guard
        while True:
            for worker in workers:
                await worker.report(service)
            sample()
            rollout = await service._store.rollout(rollout_id)
            assert rollout is not None
            if done(rollout):
                return rollout
            await trio.sleep(0.01)


def on_new(workers: list[FakeWorker]) -> dict[str, bool]:
    return {vm.id: vm.nix_store_path == NEW for w in workers for vm in w.assignment.vms}  # type: ignore[union-attr]


async def start(service: MasterService, policy: RolloutPolicy | None = None) -> str:
    result = await service.apply(fleet(NEW, policy=policy))
    started = await service._store.rollout()
    assert started is not None and started.op_id == result.op_id
    return started.id


async def test_an_apply_prepares_first_then_replaces_in_health_gated_batches(
    service: MasterService, workers: list[FakeWorker]
) -> None:
    for worker in workers:
        worker.prepare = lambda path: PrepareState.PENDING
    rollout = await start(service)
    with trio.fail_after(10):
        while any(w.assignment is None or not w.assignment.prepare for w in workers):
            await trio.sleep(0.01)
    # Prepare first: the images to prepare and the checks are sent, and
    # nothing is replaced.
    for worker in workers:
        assert worker.assignment is not None
        assert worker.assignment.prepare == (NEW,)
        assert {vm.nix_store_path for vm in worker.assignment.vms} == {OLD}
        assert {vm.health for vm in worker.assignment.vms} == {CHECK}
    for _ in range(20):
        for worker in workers:
            await worker.report(service)
        await trio.sleep(0.02)
    assert not any(on_new(workers).values())
    # Prepared: the batches go, never more than 2 VMs switched and not healthy.
    healthy_after: dict[str, int] = {}

    def health(vm: VmAssignment) -> Health:
        if vm.nix_store_path != NEW:
            return Health.HEALTHY
        healthy_after[vm.id] = healthy_after.get(vm.id, 3) - 1
        return Health.HEALTHY if healthy_after[vm.id] <= 0 else Health.PENDING

    worst = 0

    def sample() -> None:
        nonlocal worst
        unavailable = sum(
            1
            for w in workers
            for vm in w.assignment.vms  # type: ignore[union-attr]
            if vm.nix_store_path == NEW and healthy_after.get(vm.id, 3) > 0
        )
        worst = max(worst, unavailable)

    for worker in workers:
        worker.prepare = lambda path: PrepareState.READY
        worker.health = health
    scraped = MasterMetrics(service.fleet_view).exposition().decode()
    assert f'procurator_master_rollout_phase{{phase="preparing",rollout="{rollout}"}} 1.0' in (
        scraped
    )
    assert f'procurator_master_rollout_prepare_workers{{rollout="{rollout}"}} 2.0' in scraped
    assert f'procurator_master_rollout_vms{{rollout="{rollout}",state="waiting"}} 6.0' in scraped
    done = await run_until(service, workers, rollout, lambda r: r.over, sample)
    assert done.phase is RolloutPhase.DONE
    scraped = MasterMetrics(service.fleet_view).exposition().decode()
    assert f'procurator_master_rollout_phase{{phase="done",rollout="{rollout}"}} 1.0' in scraped
    assert f'procurator_master_rollout_vms{{rollout="{rollout}",state="healthy"}} 6.0' in scraped
    # A sliding window: a batch per slot freed, at least 6 / max_parallel.
    assert 3 <= done.batches <= 6
    assert worst == 2
    with trio.fail_after(10):
        while not all(on_new(workers).values()) or any(w.assignment.prepare for w in workers):  # type: ignore[union-attr]
            await trio.sleep(0.01)


async def test_a_vm_never_healthy_reverts_the_touched_vms_with_an_event_naming_the_cause(
    service: MasterService, workers: list[FakeWorker]
) -> None:
    for worker in workers:
        worker.health = lambda vm: Health.UNHEALTHY if vm.nix_store_path == NEW else Health.HEALTHY
    rollout = await start(service)
    done = await run_until(service, workers, rollout, lambda r: r.over)
    assert done.phase is RolloutPhase.REVERTED
    assert done.reason.startswith("VM vm-0 on w0: not healthy within 2 s of its switch")
    touched = sorted(vm.vm_id for vm in done.vms if vm.state is not VmState.WAITING)
    assert touched == ["vm-0", "vm-1"]  # the first batch only
    with trio.fail_after(10):
        while any(on_new(workers).values()):
            await trio.sleep(0.01)
    events = [e.event for e in await service.recent_events("vm-0")]
    (revert,) = [e for e in events if e.kind is EventKind.WARNING]
    assert f"of rollout {rollout}" in revert.message
    assert "not healthy within 2 s" in revert.message
    assert revert.op_id.startswith("op-")


async def test_a_prepare_failure_stops_the_rollout_with_nothing_changed(
    service: MasterService, workers: list[FakeWorker]
) -> None:
    workers[1].prepare = lambda path: PrepareState.FAILED
    generation = service.generation
    rollout = await start(service)
    done = await run_until(service, workers, rollout, lambda r: r.over)
    assert done.phase is RolloutPhase.FAILED
    assert done.reason.startswith(f"worker w1 cannot prepare {NEW}")
    assert not any(on_new(workers).values())
    # The apply's generation and the one that drops the images to prepare.
    assert service.generation == generation + 2
    with trio.fail_after(10):
        while any(w.assignment.prepare for w in workers):  # type: ignore[union-attr]
            await trio.sleep(0.01)


async def test_an_apply_during_a_rollout_is_refused_unless_it_supersedes(
    service: MasterService, workers: list[FakeWorker]
) -> None:
    for worker in workers:
        worker.prepare = lambda path: PrepareState.PENDING
    first = await start(service)
    generation = service.generation
    with pytest.raises(RolloutActiveError, match=f"rollout {first} .* is under way"):
        await service.apply(fleet(NEW, n=7))
    assert service.generation == generation
    await service.apply(fleet(OLD, n=7), supersede=True)
    ended = await service._store.rollout(first)
    assert ended is not None and ended.phase is RolloutPhase.FAILED
    assert ended.reason.startswith("superseded by apply op-")


async def test_a_new_leader_continues_the_rollout_and_replaces_no_vm_twice(
    tmp_path: Path,
) -> None:
    """The master driving a rollout stops mid-way (its tasks cancelled where
    they stood, as a kill would leave them); another, on the same store,
    takes the lead and finishes it from what the store holds."""
    switched: dict[str, int] = {}

    def count_switches(workers: list[FakeWorker]) -> None:
        for worker in workers:
            seen: dict[str, str] = {}
            for pushed in worker.node.pushed:
                for vm in pushed.vms:
                    if seen.get(vm.id) == OLD and vm.nix_store_path == NEW:
                        switched[vm.id] = switched.get(vm.id, 0) + 1
                    seen[vm.id] = vm.nix_store_path

    async with await FleetStore.open(tmp_path / "m.db") as store:
        first = [FakeWorker("w0"), FakeWorker("w1")]
        async with trio.open_nursery() as nursery:
            svc = MasterService(
                store, push_timeout=1.0, worker_lease=5.0, leader_lease=1.0, rollout_interval=0.02
            )
            await nursery.start(svc.run)
            for worker in first:
                await worker.register(svc)
            await svc.apply(fleet(OLD))
            for worker in first:
                worker.health = lambda vm: (
                    Health.PENDING if vm.nix_store_path == NEW else Health.HEALTHY
                )
            # A deadline no restart comes near, however loaded the machine.
            rollout = await start(
                svc, RolloutPolicy(max_parallel=2, health=CHECK, healthy_deadline_ms=600_000)
            )
            # Until the first batch is switched (and stays unhealthy).
            await run_until(svc, first, rollout, lambda r: r.batches == 1)
            with trio.fail_after(10):  # and its workers were pushed it
                while sum(on_new(first).values()) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        count_switches(first)
        second = [FakeWorker("w0"), FakeWorker("w1")]
        async with trio.open_nursery() as nursery:
            svc = MasterService(
                store, push_timeout=1.0, worker_lease=5.0, leader_lease=1.0, rollout_interval=0.02
            )
            await nursery.start(svc.run)
            for worker in second:
                await worker.register(svc)
                assignment, _ = await svc.get_assignment(worker.token, 0)
                worker.node.pushed.append(assignment)
            done = await run_until(svc, second, rollout, lambda r: r.over)
            nursery.cancel_scope.cancel()
        count_switches(second)
    assert done.phase is RolloutPhase.DONE
    # A sliding window: a batch per slot freed, at least 6 / max_parallel.
    assert 3 <= done.batches <= 6
    # Each VM switched once: vm-0 and vm-1 by the first master, the others
    # by the second (which found vm-0 and vm-1 switched already).
    assert switched == {f"vm-{i}": 1 for i in range(6)}
