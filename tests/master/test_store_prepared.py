"""A worker's prepared images (``WorkerStatus.prepared``, schema version 8)
are stored with its status, so that the leader of a rollout sees them
whichever master holds the worker's session (issue 28).

The store's part on both adapters (reusing ``test_store_contract``'s
fixtures), then two real ``MasterService``s on one PostgreSQL database
(``test_ha_service.masters``): the worker's session on the master that does
not lead, the rollout's prepare phase judged by the one that does."""

from __future__ import annotations

import trio
from masterhelpers import FakeNode
from test_ha_service import eventually, masters
from test_store_contract import Db, db, registered, reopened, running, status_write, store

from procurator.core.models import (
    Assignment,
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
from procurator.core.rollout import RolloutPhase
from procurator.master.service import MasterService
from procurator.master.store import Store

__all__ = ["db", "store"]  # the fixtures, imported to be used here

OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"


async def test_prepared_images_are_stored_whole_with_each_status(db: Db, store: Store) -> None:
    session = await registered(store, "w")
    pending = (PreparedImage(OLD, PrepareState.READY), PreparedImage(NEW, PrepareState.PENDING))
    await store.write_status(
        status_write("w", session, 0, running("a"), whole=True, prepared=pending)
    )
    worker = await store.worker("w")
    assert worker.status is not None and worker.status.prepared == pending
    # A change report carries them whole too: this replaces the list.
    failed = (PreparedImage(NEW, PrepareState.FAILED, "nix: no such path"),)
    await store.write_status(status_write("w", session, 1, running("b"), prepared=failed))
    worker = await store.worker("w")
    assert worker.status is not None and worker.status.prepared == failed
    assert (await store.load()).workers["w"] == worker
    # ...and an empty one clears it.
    await store.write_status(status_write("w", session, 2))
    worker = await store.worker("w")
    assert worker.status is not None and worker.status.prepared == ()
    assert sorted(v.id for v in worker.status.vms) == ["a", "b"]


async def test_a_status_stored_before_version_8_reads_with_nothing_prepared(
    db: Db, store: Store
) -> None:
    session = await registered(store, "w")
    await store.write_status(status_write("w", session, 3, running("a"), whole=True))
    await store.aclose()
    # Back to version 7: worker_state had no prepared column.
    db.script(
        "ALTER TABLE worker_state DROP COLUMN prepared; "
        "UPDATE meta SET value = 7 WHERE key = 'schema_version';"
    )
    store = await db.open()
    try:
        worker = await store.worker("w")
        assert worker.status is not None
        assert (worker.status.observed_generation, worker.status.prepared) == (3, ())
        ready = (PreparedImage(NEW, PrepareState.READY),)
        await store.write_status(status_write("w", session, 4, prepared=ready))
        store = await reopened(db, store)
        worker = await store.worker("w")
        assert worker.status is not None and worker.status.prepared == ready
    finally:
        await store.aclose()


def web_fleet(path: str) -> Fleet:
    vms = tuple(VmAssignment(f"vm-{i}", path[11:43], path) for i in range(2))
    check = HealthCheck(HealthKind.TCP, 22, min_healthy_ms=1000)
    policy = RolloutPolicy(max_parallel=2, health=check, healthy_deadline_ms=5000)
    return Fleet((("w", vms),), rollout=policy)


async def report(service: MasterService, token: int, node: FakeNode) -> None:
    """What a worker whose images all prepare would report, through the
    master holding its session."""
    assignment: Assignment = node.pushed[-1]
    vms = tuple(
        VmStatus(vm.id, Phase.RUNNING, vm.hash, observed_power=vm.power, health=Health.HEALTHY)
        for vm in assignment.vms
    )
    prepared = tuple(PreparedImage(p, PrepareState.READY) for p in assignment.prepare)
    await service.report_status(token, WorkerStatus("w", assignment.generation, vms, prepared))


async def test_a_leader_sees_the_images_prepared_on_a_worker_of_another_master(
    pg_url: str,
) -> None:
    async with masters(pg_url, 1, rollout_interval=0.02) as group:
        (leader,) = group.services

        async def leads() -> bool:
            return leader.leadership.leading

        await eventually(leads, "the first master leads")
        other = await group.start(rollout_interval=0.02)
        assert not other.leadership.leading
        node = FakeNode()
        token = await other.register(WorkerInfo("w", "1.0"), node)
        await other.apply(web_fleet(OLD))
        result = await other.apply(web_fleet(NEW))
        rollout = await other._store.rollout()
        assert rollout is not None and rollout.op_id == result.op_id
        with trio.fail_after(30):  # a hang guard: without the store, it stays in prepare
            while not rollout.over:
                if node.pushed:
                    await report(other, token, node)
                await trio.sleep(0.02)
                rollout = await other._store.rollout(rollout.id)
                assert rollout is not None
        assert rollout.phase is RolloutPhase.DONE
        assert not other.leadership.leading
        assert {vm.nix_store_path for vm in node.pushed[-1].vms} == {NEW}
