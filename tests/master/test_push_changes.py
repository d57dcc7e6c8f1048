"""The master pushes a worker only what changed (``Node.pushChanges``): a
real ``MasterService`` on SQLite, served on a real loopback socket, and
real worker links (``MasterLink`` over ``CapnpMasterDialer``) whose handler
applies what it gets as a worker's reconciler does. Between the service
and a worker's real ``Node`` sits a recording wrapper (a fake of our own
``WorkerNode`` port): it can play an older worker (no ``pushChanges``) or
lose a push."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from procurator.core.assignments import (
    AssignmentChanges,
    AssignmentUpdate,
    apply_assignment_changes,
)
from procurator.core.errors import UnsupportedError, ValidationError
from procurator.core.models import Assignment, Fleet, PowerState, VmAssignment, WorkerInfo
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer
from procurator.rpc.master_server import RemoteNode, serve_master
from procurator.worker.link import LinkSettings, MasterLink

# No resync while a test runs, unless it asks for one: a delta bug must
# show, not be healed behind the test's back.
QUIET = LinkSettings(resync_interval=3600.0, call_timeout=10.0, backoff_initial=0.05)
HASHES = "abcdfghi"


def vm(vm_id: str, tag: str, power: PowerState = PowerState.RUNNING) -> VmAssignment:
    return VmAssignment(vm_id, tag * 32, f"/nix/store/{tag * 32}-vm", power)


def fleet(workers: dict[str, dict[str, VmAssignment]]) -> Fleet:
    return Fleet(tuple((w, tuple(vms.values())) for w, vms in sorted(workers.items())))


def renamed(vms: dict[str, VmAssignment], prefix: str) -> dict[str, VmAssignment]:
    """The same VMs under other ids (VM ids are unique fleet-wide)."""
    return {prefix + k: dataclasses.replace(v, id=prefix + k) for k, v in vms.items()}


class Wrapped:
    """A worker's real ``Node`` as the master sees it, recording what is
    sent; ``older``: answers ``push_changes`` as a worker from before it;
    ``lose``: that many next ``push_changes`` are acknowledged, not sent."""

    def __init__(self, node: RemoteNode, *, older: bool) -> None:
        self.node = node
        self.older = older
        self.lose = 0
        self.sent: list[AssignmentUpdate] = []
        self.lost: list[AssignmentChanges] = []
        self.lost_one = trio.Event()

    @property
    def connection_id(self) -> int:
        return self.node.connection_id

    async def push(self, assignment: Assignment) -> None:
        self.sent.append(assignment)
        await self.node.push(assignment)

    async def push_changes(self, changes: AssignmentChanges) -> None:
        if self.older:
            raise UnsupportedError("Node.pushChanges: an older worker")
        if self.lose:
            self.lose -= 1
            self.lost.append(changes)
            self.lost_one.set()
            return
        self.sent.append(changes)
        await self.node.push_changes(changes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)


class Backend:
    """The real service, with each worker's node wrapped on registration."""

    def __init__(self, service: MasterService, older: frozenset[str] = frozenset()) -> None:
        self.service = service
        self.older = older
        self.nodes: dict[str, Wrapped] = {}

    async def register(self, info: WorkerInfo, node: RemoteNode) -> int:
        wrapped = self.nodes[info.worker_id] = Wrapped(node, older=info.worker_id in self.older)
        return await self.service.register(info, wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)


class Worker:
    """A link's handler that holds the assignment as a reconciler does:
    changes apply to what it holds, or are refused (the link then pulls)."""

    def __init__(self) -> None:
        self.assignment: Assignment | None = None
        self.updates: list[AssignmentUpdate] = []
        self._changed = trio.Event()

    async def __call__(self, update: AssignmentUpdate) -> bool:
        self.updates.append(update)
        if isinstance(update, Assignment):
            self.assignment = update
        elif self.assignment is None:
            return False
        else:
            try:
                self.assignment = apply_assignment_changes(self.assignment, update)
            except ValidationError:
                return False
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_generation(self, generation: int) -> Assignment:
        with trio.fail_after(20):
            while self.assignment is None or self.assignment.generation < generation:
                await self._changed.wait()
        assert self.assignment.generation == generation
        return self.assignment

    def vms(self) -> dict[str, VmAssignment]:
        assert self.assignment is not None
        return {v.id: v for v in self.assignment.vms}


@pytest.fixture
async def served_backend(
    tmp_path: Path, bridge: Bridge
) -> AsyncIterator[tuple[Backend, Address, trio.Nursery]]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store)
        await nursery.start(service.run)
        backend = Backend(service, older=frozenset({"older"}))
        address = await nursery.start(
            serve_master,
            bridge,
            backend,  # type: ignore[arg-type]
            parse_address("127.0.0.1:0"),
        )
        yield backend, address, nursery
        nursery.cancel_scope.cancel()


async def connect(
    nursery: trio.Nursery,
    bridge: Bridge,
    address: Address,
    worker_id: str,
    settings: LinkSettings = QUIET,
) -> tuple[MasterLink, Worker]:
    worker = Worker()
    link = MasterLink(
        CapnpMasterDialer(bridge, address), WorkerInfo(worker_id), worker, settings=settings
    )
    await nursery.start(link.run)
    with trio.fail_after(20):
        await link.wait_connected()
    return link, worker


def mutate(rng: random.Random, vms: dict[str, VmAssignment]) -> None:
    """One random change to a worker's VMs: add, remove, replace (new
    hash), or change the power of one."""
    vm_id = f"web-{rng.randrange(12)}"
    old = vms.get(vm_id)
    if old is None:
        vms[vm_id] = vm(vm_id, rng.choice(HASHES))
    elif (roll := rng.random()) < 0.3:
        del vms[vm_id]
    elif roll < 0.65:
        vms[vm_id] = vm(vm_id, rng.choice(HASHES.replace(old.hash[0], "")), old.power)
    else:
        power = rng.choice([p for p in PowerState if p is not old.power])
        vms[vm_id] = vm(vm_id, old.hash[0], power)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_changes_converge_exactly_like_whole_pushes(
    served_backend: tuple[Backend, Address, trio.Nursery], bridge: Bridge, seed: int
) -> None:
    """Random apply sequences, some in bursts the pusher coalesces: a
    worker that takes changes ends every step holding exactly the
    assignment an older worker, pushed whole assignments, holds."""
    backend, address, nursery = served_backend
    _, taker = await connect(nursery, bridge, address, "taker")
    _, older = await connect(nursery, bridge, address, "older")
    rng = random.Random(seed)
    vms = {f"web-{i}": vm(f"web-{i}", rng.choice(HASHES)) for i in range(8)}
    for _ in range(30):
        for _ in range(rng.choice([1, 1, 1, 2, 3])):  # a burst: applies back to back
            mutate(rng, vms)
            result = await backend.service.apply(
                fleet({"taker": vms, "older": renamed(vms, "old-")})
            )
        generation = result.generation
        await taker.wait_generation(generation)
        await older.wait_generation(generation)
        assert taker.vms() == vms
        assert older.vms() == renamed(vms, "old-")  # the same, pushed whole
    sent = backend.nodes["taker"].sent
    assert isinstance(sent[0], Assignment)  # the first push is whole
    changes = [u for u in sent if isinstance(u, AssignmentChanges)]
    assert len(changes) >= 20, sent  # then changes, whole only when no smaller
    assert all(c.size <= 3 for c in changes)  # a burst changes at most 3 VMs
    assert all(isinstance(u, Assignment) for u in backend.nodes["older"].sent)


async def test_an_older_worker_gets_whole_pushes_for_its_session(
    served_backend: tuple[Backend, Address, trio.Nursery], bridge: Bridge
) -> None:
    backend, address, nursery = served_backend
    _, older = await connect(nursery, bridge, address, "older")
    vms = {f"web-{i}": vm(f"web-{i}", "a") for i in range(5)}
    for step, tag in enumerate("bcd", start=1):
        vms["web-0"] = vm("web-0", tag)
        result = await backend.service.apply(fleet({"older": vms}))
        assert (await older.wait_generation(result.generation)).generation == step
        assert older.vms() == vms
    sent = backend.nodes["older"].sent
    assert [type(u) for u in sent] == [Assignment] * 3
    assert all(isinstance(u, Assignment) for u in older.updates)


async def test_a_lost_change_is_healed_by_the_next_one(
    served_backend: tuple[Backend, Address, trio.Nursery], bridge: Bridge
) -> None:
    backend, address, nursery = served_backend
    link, worker = await connect(nursery, bridge, address, "taker")
    node = backend.nodes["taker"]
    vms = {f"web-{i}": vm(f"web-{i}", "a") for i in range(5)}
    first = await backend.service.apply(fleet({"taker": vms}))
    await worker.wait_generation(first.generation)

    # Generation 2's changes are lost; generation 3's apply to 2, which the
    # worker does not hold: it pulls the whole assignment instead.
    node.lose = 1
    vms["web-1"] = vm("web-1", "b")
    await backend.service.apply(fleet({"taker": vms}))
    with trio.fail_after(20):  # lost, not coalesced with the next one
        await node.lost_one.wait()
    vms["web-2"] = vm("web-2", "c")
    third = await backend.service.apply(fleet({"taker": vms}))
    await worker.wait_generation(third.generation)
    assert worker.vms() == vms
    assert [c.generation for c in node.lost] == [2]
    assert link.whole_pulls == 1
    assert [(type(u), u.generation) for u in worker.updates] == [(Assignment, 1), (Assignment, 3)]

    # What the worker pulled is what it holds: changes again from there.
    vms["web-3"] = vm("web-3", "d")
    fourth = await backend.service.apply(fleet({"taker": vms}))
    await worker.wait_generation(fourth.generation)
    assert worker.vms() == vms
    assert worker.updates[-1] == node.sent[-1]
    assert isinstance(node.sent[-1], AssignmentChanges) and node.sent[-1].base_generation == 3


async def test_a_lost_last_change_is_healed_by_the_resync(
    served_backend: tuple[Backend, Address, trio.Nursery], bridge: Bridge
) -> None:
    backend, address, nursery = served_backend
    settings = LinkSettings(resync_interval=0.3, call_timeout=10.0, backoff_initial=0.05)
    _, worker = await connect(nursery, bridge, address, "taker", settings)
    node = backend.nodes["taker"]
    vms = {f"web-{i}": vm(f"web-{i}", "a") for i in range(5)}
    first = await backend.service.apply(fleet({"taker": vms}))
    await worker.wait_generation(first.generation)
    node.lose = 1
    del vms["web-4"]
    second = await backend.service.apply(fleet({"taker": vms}))
    await worker.wait_generation(second.generation)  # no later change reveals it
    assert worker.vms() == vms
    assert [c.generation for c in node.lost] == [2]
    assert isinstance(worker.updates[-1], Assignment)  # pulled whole
