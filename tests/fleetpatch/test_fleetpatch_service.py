"""Fleet patches through the master service (in process, real SQLite): a
patched apply stores, places, diffs and numbers exactly what a whole apply
of the same file does; a stale base costs a resend, never a change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from procurator.core.control import ApplyResult
from procurator.core.errors import StaleGenerationError, ValidationError
from procurator.core.fleet import parse_fleet
from procurator.core.fleetpatch import FleetParts, FleetPatch, PatchAnswer, make_patch, patch_rounds
from procurator.core.models import Assignment, Capacity, Fleet, WorkerInfo
from procurator.master.service import MasterService
from procurator.master.store import FleetStore

_IMAGE = "/nix/store/" + "a" * 32 + "-web"
_OTHER = "/nix/store/" + "b" * 32 + "-web"


class _Node:
    """A worker's Node that takes every push (the master's view is what
    these tests compare)."""

    _ids = iter(range(1, 1_000_000))

    def __init__(self) -> None:
        self.connection_id = next(self._ids)

    async def push(self, assignment: Assignment) -> None:
        pass

    async def push_changes(self, changes: object) -> None:
        pass

    async def aclose(self) -> None:
        pass


@asynccontextmanager
async def _master(db: Path, workers: int = 3) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(db) as store, trio.open_nursery() as nursery:
        service = MasterService(store)
        await nursery.start(service.run)
        for i in range(workers):
            info = WorkerInfo(f"w-{i}", capacity=Capacity(vcpus=8, memory_mib=8192))
            await service.register(info, _Node())
        yield service
        nursery.cancel_scope.cancel()


def _power(vm_id: str) -> str:
    return "paused" if vm_id.endswith("p") else "running"


def _file(pinned: dict[str, list[tuple[str, str]]], unpinned: list[str], extra: str = "") -> Fleet:
    """A parsed fleet file; a VM whose id ends in "p" is paused."""
    lines = []
    for worker, vms in pinned.items():
        entries = ", ".join(
            f'{{ id = "{vm}", image = "{image}", power = "{_power(vm)}" }}' for vm, image in vms
        )
        lines.append(f"[workers.{worker}]\nvms = [ {entries} ]\n")
    for vm in unpinned:
        lines.append(
            f'[[vms]]\nid = "{vm}"\nimage = "{_IMAGE}"\n'
            'vcpus = 2\nmemory_mib = 1024\nspread = "g"\n'
        )
    return parse_fleet("\n".join(lines) + extra)


async def _patched(service: MasterService, fleet: Fleet, **kwargs: object) -> ApplyResult:
    sends: list[FleetPatch] = []

    async def send(patch: FleetPatch) -> PatchAnswer:
        sends.append(patch)
        return await service.apply_patch(patch, **kwargs)  # type: ignore[arg-type]

    result = await patch_rounds(FleetParts.of(fleet), send)
    assert result is not None
    return result


def _stored(service: MasterService) -> dict[str, tuple[int, tuple[object, ...]]]:
    return {w: (a.generation, a.vms) for w, a in service._assignments.items()}


_STEPS = [
    _file({"w-0": [("a1", _IMAGE), ("a2", _IMAGE)], "w-1": [("b1", _IMAGE)]}, ["u1", "u2"]),
    # One VM paused on one worker.
    _file({"w-0": [("a1", _IMAGE), ("a2p", _IMAGE)], "w-1": [("b1", _IMAGE)]}, ["u1", "u2"]),
    # A replacement under a rollout, an unpinned VM more, a worker gone.
    _file({"w-0": [("a1", _OTHER), ("a2p", _IMAGE)]}, ["u1", "u2", "u3"], "[rollout]\n"),
    # The same file again: a no-op.
    _file({"w-0": [("a1", _OTHER), ("a2p", _IMAGE)]}, ["u1", "u2", "u3"], "[rollout]\n"),
    # A VM moves between workers; the rollout is superseded.
    _file({"w-0": [("a1", _OTHER)], "w-2": [("a2p", _IMAGE)]}, ["u1"]),
]


async def test_a_patched_apply_is_a_whole_apply_of_the_same_file(tmp_path: Path) -> None:
    async with _master(tmp_path / "whole.db") as whole, _master(tmp_path / "patch.db") as patched:
        for index, fleet in enumerate(_STEPS):
            kwargs = {"request_id": f"req-{index}", "supersede": index >= 3}
            dry = [
                await whole.apply(fleet, dry_run=True),
                await _patched(patched, fleet, dry_run=True),
            ]
            results = [await whole.apply(fleet, **kwargs), await _patched(patched, fleet, **kwargs)]  # type: ignore[arg-type]
            for a, b in (dry, results):
                assert (a.generation, a.changed, a.diffs, a.dry_run, a.placed) == (
                    b.generation,
                    b.changed,
                    b.diffs,
                    b.dry_run,
                    b.placed,
                )
                assert bool(a.rollout_id) == bool(b.rollout_id)
            assert _stored(whole) == _stored(patched)
            assert await whole._store.placement() == await patched._store.placement()
            # A retry of the same request id is recognised either way (the
            # digest recorded is the same), also across the two paths.
            again = await _patched(whole, fleet, **kwargs)
            assert again.replayed and again.generation == results[0].generation
            again = await patched.apply(fleet, **kwargs)  # type: ignore[arg-type]
            assert again.replayed and again.generation == results[1].generation


async def test_a_stale_base_costs_a_resend_and_loses_nothing(tmp_path: Path) -> None:
    async with _master(tmp_path / "m.db") as service:
        mine = _file({"w-0": [("a1", _IMAGE)], "w-1": [("b1", _IMAGE)]}, [])
        await service.apply(mine)
        # The client reads what the master holds (digests only) ...
        client = FleetParts.of(_file({"w-0": [("a1", _OTHER)], "w-1": [("b1", _IMAGE)]}, []))
        first = await service.apply_patch(make_patch(client))
        assert first.result is None and first.missing == ("w-0",)
        # ... another apply changes w-1 in between ...
        theirs = _file({"w-0": [("a1", _IMAGE)], "w-1": [("b1", _OTHER), ("b2", _IMAGE)]}, [])
        await service.apply(theirs)
        # ... and the client's patch with w-0 alone is not merged with it:
        # the master no longer holds the w-1 it was told of.
        second = await service.apply_patch(make_patch(client, first.missing))
        assert second.result is None and second.missing == ("w-1",)
        final = await service.apply_patch(make_patch(client, ("w-0", "w-1")))
        assert final.result is not None and final.result.changed
        assert service._assignments["w-0"].vms[0].nix_store_path == _OTHER
        assert [(vm.id, vm.nix_store_path) for vm in service._assignments["w-1"].vms] == [
            ("b1", _IMAGE)
        ]
        # With --expect-generation the stale base is the caller's error, as
        # for a whole apply.
        with pytest.raises(StaleGenerationError):
            await service.apply_patch(make_patch(client), expected_generation=1)


async def test_a_restarted_master_asks_for_every_part(tmp_path: Path) -> None:
    fleet = _file({"w-0": [("a1", _IMAGE)]}, ["u1"])
    async with _master(tmp_path / "m.db") as service:
        await _patched(service, fleet)
    async with _master(tmp_path / "m.db") as service:
        answer = await service.apply_patch(make_patch(FleetParts.of(fleet)))
        assert answer.missing == ("", "w-0")
        result = await _patched(service, fleet)
        assert not result.changed


async def test_a_hostile_patch_changes_nothing(tmp_path: Path) -> None:
    async with _master(tmp_path / "m.db") as service:
        await service.apply(_file({"w-0": [("a1", _IMAGE)], "w-1": [("b1", _IMAGE)]}, []))
        generation = service.generation
        # b1 duplicated onto the patched w-0 while the unpatched w-1 keeps it.
        held = service._assignments
        dup = FleetParts.of(
            Fleet(
                (
                    ("w-0", (*held["w-0"].vms, held["w-1"].vms[0])),
                    ("w-1", held["w-1"].vms),
                )
            )
        )
        with pytest.raises(ValidationError) as refused:
            await service.apply_patch(make_patch(dup, ["w-0"]))
        assert refused.value.details == (
            "workers.w-0.vms: VM id 'b1' is used more than once (also in worker 'w-1')",
        )
        assert refused.value.op_id
        assert service.generation == generation


async def test_unchanged_workers_share_their_lists_with_the_assignments(tmp_path: Path) -> None:
    """What keeps a patched apply's diff per changed worker: an unchanged
    part is the very list its worker's assignment was made from, so the
    diff passes it in O(1) (``diff_fleets``), also after a rollout-less
    commit rebuilt the changed workers' lists (``core.rollout.plan``)."""
    async with _master(tmp_path / "m.db") as service:
        files = [
            _file({"w-0": [("a1", _IMAGE)], "w-1": [("b1", _IMAGE)], "w-2": [("c1", _IMAGE)]}, []),
            _file({"w-0": [("a1p", _IMAGE)], "w-1": [("b1", _IMAGE)], "w-2": [("c1", _IMAGE)]}, []),
        ]
        for fleet in [*files, *files]:
            await _patched(service, fleet)
            held = service._applied
            assert isinstance(held, FleetParts)
            assert all(service._assignments[w].vms is held.workers[w] for w in held.workers)


async def test_workers_in_chunks_share_their_lists_and_assemble_the_file(tmp_path: Path) -> None:
    """Workers of 200 VMs, listed in chunks: a one-VM change on one of them
    sends one chunk, stores exactly the file, and the unchanged worker (its
    chunks the very ones held) keeps its assignment's list."""
    big = {f"w-{w}": [(f"v{w}-{i:03d}", _IMAGE) for i in range(200)] for w in range(2)}
    changed = {**big, "w-0": [(vm, _OTHER if vm == "v0-100" else i) for vm, i in big["w-0"]]}
    async with _master(tmp_path / "m.db") as service:
        sends: list[FleetPatch] = []

        async def send(patch: FleetPatch) -> PatchAnswer:
            sends.append(patch)
            return await service.apply_patch(patch)

        for pinned in (big, changed, big):
            sends.clear()
            fleet = _file(pinned, [])
            result = await patch_rounds(FleetParts.of(fleet), send)
            assert result is not None and result.changed
            assert {w: a.vms for w, a in service._assignments.items()} == dict(fleet.workers)
            held = service._applied
            assert isinstance(held, FleetParts) and len(held.chunks["w-1"]) > 1
            assert all(service._assignments[w].vms is held.workers[w] for w in held.workers)
        # The last change: one chunk of w-0 sent, w-1 untouched.
        assert [[w for w, _ in p.sent.workers] for p in sends] == [[], ["w-0"]]
        assert [d.worker_id for d in result.diffs] == ["w-0"]
