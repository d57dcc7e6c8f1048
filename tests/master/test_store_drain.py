"""The store's part of cordon, drain and handoffs (schema version 6), on
both adapters: SQLite (a file) and PostgreSQL (a real server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from procurator.core.drain import Handoff, ModeAction, WorkerMode
from procurator.core.errors import NotFoundError, StaleGenerationError, ValidationError
from procurator.core.models import (
    Capacity,
    OnWorkerLost,
    PlacementStrategy,
    PowerState,
    VmAssignment,
    WorkerInfo,
    WorkerState,
)
from procurator.master.store import Fence, FencedError, Removal, Store, open_store
from procurator.master.store.model import PlacementRecord, UnpinnedRules

PATH = "/nix/store/" + "d" * 32 + "-d"


def vm(vm_id: str) -> VmAssignment:
    return VmAssignment(vm_id, "h", PATH, PowerState.RUNNING, 1, 128)


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    target = (
        str(tmp_path / "m.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    )
    opened = await open_store(target)
    try:
        yield opened
    finally:
        await opened.aclose()


RULES = UnpinnedRules((), "", OnWorkerLost.RESCHEDULE)


async def two_workers(store: Store) -> int:
    """w1 runs unpinned u1, u2 and pinned p1; w2 runs nothing (registered)."""
    generation = await store.commit(
        expected_generation=0,
        changes={"w1": [vm("p1"), vm("u1"), vm("u2")]},
        before={},
        op_id="op-apply",
        unix_ms=1,
        placement=PlacementRecord({"u1": RULES, "u2": RULES}, PlacementStrategy.BINPACK),
    )
    await store.register(
        "w2", "m1", WorkerInfo("w2", capacity=Capacity(4, 4096)), unix_ms=1, lease_ms=60_000
    )
    return generation


async def leader(store: Store) -> Fence:
    """m1 leads: the fence of a leader's writes (handoffs, drains)."""
    epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
    assert epoch is not None
    return Fence("leader", "m1", epoch)


async def test_cordon_uncordon_and_drain_are_durable_idempotent_and_move_the_version(
    store: Store,
) -> None:
    await two_workers(store)
    before = (await store.worker("w1")).version
    change = await store.change_mode("w1", ModeAction.CORDON, op_id="op-c", unix_ms=5)
    assert change.changed and change.mode == WorkerMode(WorkerState.CORDONED, "op-c", 5)
    after = await store.worker("w1")
    assert after.mode == change.mode and after.version > before
    again = await store.change_mode("w1", ModeAction.CORDON, op_id="op-c2", unix_ms=6)
    assert not again.changed and again.mode == change.mode
    assert (await store.worker("w1")).version == after.version

    drain = await store.change_mode(
        "w1", ModeAction.DRAIN, op_id="op-d", unix_ms=7, max_unavailable=2
    )
    # Two unpinned VMs to move; the pinned one stays, and says so.
    assert drain.mode == WorkerMode(WorkerState.DRAINING, "op-d", 7, 2, 0, 2)
    assert "1 pinned VM(s) stay" in drain.message
    assert (await store.load()).workers["w1"].mode == drain.mode

    ready = await store.change_mode("w1", ModeAction.UNCORDON, op_id="op-u", unix_ms=8)
    assert ready.changed and ready.mode is None and "ended at 0/2" in ready.message
    assert (await store.worker("w1")).mode is None
    assert not (await store.change_mode("w1", ModeAction.UNCORDON, op_id="x", unix_ms=9)).changed


async def test_an_unknown_worker_or_a_bad_bound_is_refused_and_changes_nothing(
    store: Store,
) -> None:
    await two_workers(store)
    with pytest.raises(NotFoundError, match="'w9' is unknown"):
        await store.change_mode("w9", ModeAction.CORDON, op_id="op", unix_ms=1)
    with pytest.raises(ValidationError, match="max unavailable must be"):
        await store.change_mode("w1", ModeAction.DRAIN, op_id="op", unix_ms=1, max_unavailable=0)
    assert (await store.worker("w1")).mode is None
    assert "w9" not in (await store.load()).workers


async def test_a_handoff_starts_completes_and_counts_for_its_drain(store: Store) -> None:
    g1 = await two_workers(store)
    await store.change_mode("w1", ModeAction.DRAIN, op_id="op-d", unix_ms=2)
    fence = await leader(store)
    w2: list[VmAssignment] = []
    handoff = Handoff("u1", "w1", "w2", "op-d", 0, 3)
    g2 = await store.commit_handoffs(
        fence=fence,
        expected_generation=g1,
        changes={"w2": w2},
        before={},
        op_id="op-d",
        unix_ms=3,
        start=[handoff],
    )
    started = (await store.handoffs())["u1"]
    assert started == Handoff("u1", "w1", "w2", "op-d", g2, 3)
    stored = await store.load()
    # The VM stays its source's until the handoff completes; the target's
    # assignment moved to the new generation (so it hears of it).
    assert [v.id for v in stored.assignments["w1"].vms] == ["p1", "u1", "u2"]
    assert stored.assignments["w2"].generation == g2

    # A second handoff of the same VM is refused whole.
    with pytest.raises(Exception, match="in a handoff already"):
        await store.commit_handoffs(
            fence=fence,
            expected_generation=g2,
            changes={},
            before={},
            op_id="op-d",
            unix_ms=4,
            start=[handoff],
        )
    assert (await store.load()).generation == g2

    g3 = await store.commit_handoffs(
        fence=fence,
        expected_generation=g2,
        changes={"w1": [vm("p1"), vm("u2")], "w2": [vm("u1")]},
        before={"w1": [vm("p1"), vm("u1"), vm("u2")], "w2": []},
        op_id="op-d",
        unix_ms=5,
        end=[started],
    )
    stored = await store.load()
    assert await store.handoffs() == {}
    assert [v.id for v in stored.assignments["w2"].vms] == ["u1"]
    assert stored.workers["w1"].removals["u1"] == Removal(g3)
    assert stored.workers["w1"].mode is not None
    assert (stored.workers["w1"].mode.moved, stored.workers["w1"].mode.total) == (1, 2)

    # A stale generation or a fence that is over: nothing written.
    with pytest.raises(StaleGenerationError):
        await store.commit_handoffs(
            fence=fence, expected_generation=g2, changes={}, before={}, op_id="x", unix_ms=6
        )
    with pytest.raises(FencedError):
        await store.commit_handoffs(
            fence=Fence("leader", "m1", fence.epoch + 1),
            expected_generation=g3,
            changes={},
            before={},
            op_id="x",
            unix_ms=6,
            start=[Handoff("u2", "w1", "w2", "op-d", 0, 6)],
        )
    assert await store.handoffs() == {} and (await store.load()).generation == g3


async def test_a_cancelled_handoff_is_its_targets_pending_removal(store: Store) -> None:
    g1 = await two_workers(store)
    fence = await leader(store)
    g2 = await store.commit_handoffs(
        fence=fence,
        expected_generation=g1,
        changes={"w2": []},
        before={},
        op_id="op-d",
        unix_ms=3,
        start=[Handoff("u1", "w1", "w2", "op-d", 0, 3)],
    )
    started = (await store.handoffs())["u1"]
    g3 = await store.commit_handoffs(
        fence=fence,
        expected_generation=g2,
        changes={"w2": []},
        before={"w2": []},
        op_id="op-u",
        unix_ms=4,
        cancel=[started],
    )
    stored = await store.load()
    assert await store.handoffs() == {}
    assert stored.workers["w2"].removals["u1"] == Removal(g3)
    assert [v.id for v in stored.assignments["w1"].vms] == ["p1", "u1", "u2"]


async def test_a_drain_is_blocked_and_finished_by_the_leader_only(store: Store) -> None:
    await two_workers(store)
    await store.change_mode("w1", ModeAction.DRAIN, op_id="op-d", unix_ms=2)
    fence = await leader(store)
    assert await store.update_drain(fence, "w1", "op-d", blocked="u2: fits nowhere")
    mode = (await store.worker("w1")).mode
    assert mode is not None and mode.blocked == "u2: fits nowhere"
    assert not await store.update_drain(fence, "w1", "op-other", finished=True)
    with pytest.raises(FencedError):
        await store.update_drain(Fence("leader", "m2", fence.epoch), "w1", "op-d", finished=True)
    assert await store.update_drain(fence, "w1", "op-d", finished=True)
    mode = (await store.worker("w1")).mode
    assert mode is not None and mode.state is WorkerState.CORDONED


async def test_a_handoff_called_off_leaves_a_vm_its_target_holds_now(store: Store) -> None:
    # The source was lost and a heal placed the VM on the handoff's target:
    # calling the handoff off must not make the target stop its own VM.
    g1 = await two_workers(store)
    fence = await leader(store)
    g2 = await store.commit_handoffs(
        fence=fence,
        expected_generation=g1,
        changes={"w2": []},
        before={},
        op_id="op-d",
        unix_ms=3,
        start=[Handoff("u1", "w1", "w2", "op-d", 0, 3)],
    )
    g3 = await store.commit(
        expected_generation=g2,
        changes={"w1": [vm("p1"), vm("u2")], "w2": [vm("u1")]},
        before={"w1": [vm("p1"), vm("u1"), vm("u2")], "w2": []},
        op_id="op-heal",
        unix_ms=4,
        fence=fence,
    )
    await store.commit_handoffs(
        fence=fence,
        expected_generation=g3,
        changes={"w2": [vm("u1")]},
        before={"w2": [vm("u1")]},
        op_id="op-d",
        unix_ms=5,
        cancel=[(await store.handoffs())["u1"]],
    )
    stored = await store.load()
    assert "u1" not in stored.workers["w2"].removals
    assert [v.id for v in stored.assignments["w2"].vms] == ["u1"]
