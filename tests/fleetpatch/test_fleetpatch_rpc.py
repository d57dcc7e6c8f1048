"""Fleet patches over the wire (real sockets, a real master service on
SQLite): the control client sends a one-VM change as one worker's part and
gets the whole apply's answer; an older client's whole apply still works;
against an older master (a peer process without ``applyPatch``) the client
applies the whole fleet."""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.fleet import parse_fleet
from procurator.core.fleetpatch import (
    FleetParts,
    FleetPatch,
    PatchAnswer,
    PatchRequest,
    make_patch,
)
from procurator.core.models import Fleet
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import ControlClient, open_control
from procurator.rpc.master_server import MasterBackend, serve_master

OLD_MASTER = Path(__file__).with_name("oldmaster.py")
_A = "/nix/store/" + "a" * 32 + "-web"
_B = "/nix/store/" + "b" * 32 + "-web"


def _fleet(paused: str = "", workers: int = 4) -> Fleet:
    lines = []
    for w in range(workers):
        entries = ", ".join(
            f'{{ id = "w{w}-vm{i}", image = "{_A}", '
            f'power = "{"paused" if f"w{w}-vm{i}" == paused else "running"}" }}'
            for i in range(3)
        )
        lines.append(f"[workers.host-{w}]\nvms = [ {entries} ]\n")
    return parse_fleet("\n".join(lines))


@contextlib.asynccontextmanager
async def _served(bridge: Bridge, backend: MasterBackend) -> AsyncIterator[Address]:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(serve_master, bridge, backend, parse_address("127.0.0.1:0"))
        )
        yield address
        nursery.cancel_scope.cancel()


class _Recording:
    """The master service, with a record of the patches it was sent (a
    wrapper of our own port, ``MasterBackend``)."""

    def __init__(self, service: MasterService) -> None:
        self.service = service
        self.patches: list[FleetPatch] = []
        self.address = parse_address("127.0.0.1:0")  # where it is served (_recorded)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    async def apply_patch(self, patch: FleetPatch, **kwargs: Any) -> PatchAnswer:
        self.patches.append(patch)
        return await self.service.apply_patch(patch, **kwargs)


@contextlib.asynccontextmanager
async def _recorded(
    db: Path, bridge: Bridge
) -> AsyncIterator[tuple[MasterService, _Recording, ControlClient]]:
    """A master service on SQLite, served with a record of its patches,
    and a control client of it."""
    async with await FleetStore.open(db) as store, trio.open_nursery() as nursery:
        service = MasterService(store)
        await nursery.start(service.run)
        recording = _Recording(service)
        served = _served(bridge, recording)  # type: ignore[arg-type]
        async with served as address, open_control(bridge, address) as client:
            recording.address = address
            yield service, recording, client
        nursery.cancel_scope.cancel()


async def test_a_one_vm_change_carries_one_workers_part(tmp_path: Path, bridge: Bridge) -> None:
    async with _recorded(tmp_path / "m.db", bridge) as (_, recording, client):
        first = await client.apply(_fleet(), request_id="req-1")
        # Nothing held yet: digests, then every part.
        assert [len(p.sent.workers) for p in recording.patches] == [0, 4]
        recording.patches.clear()
        dry = await client.apply(_fleet("w2-vm1"), dry_run=True)
        change = await client.apply(_fleet("w2-vm1"), request_id="req-2")
        # The client applied the fleet before: the changed part goes at once.
        assert [[w for w, _ in p.sent.workers] for p in recording.patches] == [
            ["host-2"],
            ["host-2"],
        ]
        assert not any(p.settings_sent for p in recording.patches)
        assert change.generation == first.generation + 1 and change.changed
        assert dry.diffs == change.diffs and dry.dry_run
        assert [(d.worker_id, d.power_changed[0].vm_id) for d in change.diffs] == [
            ("host-2", "w2-vm1")
        ]
        # The same file again: held whole, applied in one call, a no-op.
        recording.patches.clear()
        same = await client.apply(_fleet("w2-vm1"))
        assert len(recording.patches) == 1 and not same.changed
        # A retry of req-2 (the client lost the answer) is a replay.
        again = await client.apply(_fleet("w2-vm1"), request_id="req-2")
        assert again.replayed and again.generation == change.generation
        # An older client's whole apply works, and a patch builds on it.
        recording.patches.clear()
        whole = await client.apply(_fleet(workers=3), whole=True)
        assert not recording.patches and whole.changed
        assert [d.worker_id for d in whole.diffs] == ["host-2", "host-3"]
        back = await client.apply(_fleet(workers=4))
        assert [[w for w, _ in p.sent.workers] for p in recording.patches] == [[], ["host-3"]]
        assert [d.worker_id for d in back.diffs] == ["host-3"]


def _big(changed: str = "", size: int = 300) -> Fleet:
    entries = ",\n".join(
        f'{{ id = "vm-{i:04d}", image = "{_B if f"vm-{i:04d}" == changed else _A}" }}'
        for i in range(size)
    )
    return parse_fleet(f"[workers.host-0]\nvms = [\n{entries}\n]\n")


async def test_a_one_vm_change_carries_one_chunk(tmp_path: Path, bridge: Bridge) -> None:
    """A worker of 300 VMs: a one-VM change sends one chunk of it (the
    worker id repeated once per chunk sent in the patch's fleet), and the
    master's assignment is the client's file."""
    async with _recorded(tmp_path / "m.db", bridge) as (service, recording, client):
        first = await client.apply(_big())
        chunks = len(recording.patches[0].parts) - 1
        assert chunks > 2 and [len(p.sent.workers) for p in recording.patches] == [0, chunks]
        recording.patches.clear()
        change = await client.apply(_big("vm-0150"), request_id="req-1")
        assert [len(p.sent.workers) for p in recording.patches] == [1]
        ((worker, vms),) = recording.patches[0].sent.workers
        assert worker == "host-0" and "vm-0150" in {vm.id for vm in vms} and len(vms) < 150
        assert change.generation == first.generation + 1
        assert [(d.worker_id, d.replaced) for d in change.diffs] == [("host-0", ("vm-0150",))]
        assert service._assignments["host-0"].vms == _big("vm-0150").workers[0][1]
        # The request digest is the whole file's: a whole retry replays.
        again = await client.apply(_big("vm-0150"), request_id="req-1", whole=True)
        assert again.replayed and again.generation == change.generation


async def test_after_its_own_apply_a_client_sends_the_changed_chunk_at_once(
    tmp_path: Path, bridge: Bridge
) -> None:
    """The control client remembers the digests of the fleet it applied:
    the next one-VM change is one call carrying the one changed chunk (the
    round of digests alone is skipped). When another client applied in
    between, the hint is wrong and costs the rounds it would without one,
    never a wrong fleet; a dry run or a whole apply leaves nothing wrong."""
    async with _recorded(tmp_path / "m.db", bridge) as (service, recording, client):
        first = await client.apply(_big())
        recording.patches.clear()
        change = await client.apply(_big("vm-0150"))
        ((patch,),) = [recording.patches]
        ((worker, vms),) = patch.sent.workers
        assert worker == "host-0" and "vm-0150" in {vm.id for vm in vms} and len(vms) < 150
        assert [(d.worker_id, d.replaced) for d in change.diffs] == [("host-0", ("vm-0150",))]
        assert change.generation == first.generation + 1
        # A dry run does not move what the master holds: still one call after it.
        recording.patches.clear()
        dry = await client.apply(_big("vm-0151"), dry_run=True)
        assert dry.dry_run and len(recording.patches) == 1
        recording.patches.clear()
        await client.apply(_big("vm-0152"))
        assert [len(p.sent.workers) for p in recording.patches] == [
            _new_chunks(_big("vm-0150"), _big("vm-0152"))
        ]
        # Another client applies: this one's hint is stale.
        async with open_control(bridge, recording.address) as other:
            await other.apply(_big("vm-0007"))
        recording.patches.clear()
        back = await client.apply(_big("vm-0152"))
        assert [(d.worker_id, d.replaced) for d in back.diffs] == [
            ("host-0", ("vm-0007", "vm-0152"))
        ]
        # It believed every chunk held; the master asked for the two it lacks.
        assert [len(p.sent.workers) for p in recording.patches] == [0, 2]
        assert service._assignments["host-0"].vms == _big("vm-0152").workers[0][1]
        # After a whole apply the client starts from digests again.
        await client.apply(_big("vm-0153"), whole=True)
        recording.patches.clear()
        await client.apply(_big("vm-0154"))
        assert [len(p.sent.workers) for p in recording.patches] == [
            0,
            _new_chunks(_big("vm-0153"), _big("vm-0154")),
        ]


def _new_chunks(before: Fleet, after: Fleet) -> int:
    """How many of ``after``'s chunks ``before`` does not have."""
    return len(FleetParts.of(after).chunk_index.keys() - FleetParts.of(before).chunk_index.keys())


async def test_hostile_patches_are_refused_typed_over_the_wire(
    tmp_path: Path, bridge: Bridge
) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store)
        await nursery.start(service.run)
        served = _served(bridge, service)  # type: ignore[arg-type]
        async with served as address, open_control(bridge, address) as client:
            await client.apply(_fleet(workers=2))
            generation = service.generation
            held = service._assignments
            # A VM of the unpatched host-1 duplicated onto the patched host-0.
            dup = FleetParts.of(
                Fleet(
                    (
                        ("host-0", (*held["host-0"].vms, held["host-1"].vms[0])),
                        ("host-1", held["host-1"].vms),
                    )
                )
            )
            with pytest.raises(ValidationError) as refused:
                await client.apply_patch(PatchRequest(make_patch(dup, ["host-0"])))
            assert refused.value.details == (
                "workers.host-0.vms: VM id 'w1-vm0' is used more than once "
                "(also in worker 'host-1')",
            )
            assert refused.value.op_id.startswith("op-")
            # Contents under another part's digest; a digest of 3 bytes; a
            # worker the fleet never had, named by a digest nobody holds.
            good = make_patch(FleetParts.of(_fleet("w0-vm0", workers=2)), ["host-0"])
            lying = FleetPatch(good.parts, Fleet((("host-0", held["host-1"].vms),)))
            with pytest.raises(ValidationError, match="fleet patch: 1 problem"):
                await client.apply_patch(PatchRequest(lying))
            short = FleetPatch(tuple((n, d[:3]) for n, d in good.parts), good.sent)
            with pytest.raises(ValidationError) as refused:
                await client.apply_patch(PatchRequest(short))
            assert "patch.parts['host-0']: a digest is 32 bytes" in refused.value.details
            ghost = FleetPatch(tuple(sorted((*good.parts, ("host-9", bytes(32))))), good.sent)
            answer = await client.apply_patch(PatchRequest(ghost))
            assert answer.result is None and answer.missing == ("host-9",)
            # A part name beyond any text bound is refused as such.
            long_name = FleetPatch(((("x" * 5000), bytes(32)), *good.parts))
            with pytest.raises(LimitExceededError):
                await client.apply_patch(PatchRequest(long_name))
            assert service.generation == generation
        nursery.cancel_scope.cancel()


async def test_against_an_older_master_the_whole_fleet_is_applied(bridge: Bridge) -> None:
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda task_status: trio.run_process(
                [sys.executable, str(OLD_MASTER)],
                stdout=subprocess.PIPE,
                check=False,
                task_status=task_status,
            )
        )
        try:
            assert process.stdout is not None
            lines = _Lines(process.stdout)
            port = json.loads(await lines.next())["port"]
            async with open_control(bridge, f"127.0.0.1:{port}") as client:
                for _ in range(2):  # asked once, then whole at once
                    result = await client.apply(_fleet("w0-vm0", workers=2))
                    assert result.generation == 1 and result.op_id == "op-0123456789ab"
                    applied = json.loads(await lines.next())
                    assert applied == {
                        "workers": {
                            "host-0": ["w0-vm0", "w0-vm1", "w0-vm2"],
                            "host-1": ["w1-vm0", "w1-vm1", "w1-vm2"],
                        }
                    }
        finally:
            process.kill()


class _Lines:
    """Lines of a process's output, one at a time."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""

    async def next(self) -> str:
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            assert chunk, "the peer ended"
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()
