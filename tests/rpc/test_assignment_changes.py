"""Assignment changes on the wire: ``Node.pushChanges`` between a real
master server and a real worker dialer on a loopback socket, its
conversion, and what an older worker (no ``pushChanges``) answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from rpchelpers import schema_without, served

from procurator.core.assignments import AssignmentChanges, AssignmentUpdate
from procurator.core.errors import UnsupportedError, ValidationError
from procurator.core.models import Assignment, PowerState, VmAssignment, WorkerInfo
from procurator.rpc.bridge import TRAVERSAL_LIMIT_WORDS, Bridge
from procurator.rpc.clients import CapnpMasterDialer
from procurator.rpc.convert import assignment_changes_from_reader, fill_assignment_changes
from procurator.rpc.master_server import RemoteNode
from procurator.rpc.schema import load_schema

_schema = load_schema()
PATH = "/nix/store/" + "b" * 32 + "-web"


def entry(vm_id: str, power: PowerState = PowerState.RUNNING) -> VmAssignment:
    return VmAssignment(vm_id, "b" * 32, PATH, power, vcpus=2 if vm_id == "web-2" else 0)


CHANGES = AssignmentChanges(
    "host-a", 7, 9, "op-9", (entry("web-1"), entry("web-2", PowerState.PAUSED)), ("web-3",)
)


def test_changes_survive_the_wire() -> None:
    message = _schema.AssignmentChanges.new_message()
    fill_assignment_changes(message, CHANGES)
    with _schema.AssignmentChanges.from_bytes(
        message.to_bytes(), traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS
    ) as reader:
        assert assignment_changes_from_reader(reader) == CHANGES


@pytest.mark.parametrize(
    ("changes", "where"),
    [
        (AssignmentChanges("host-a", 9, 9), "changes: assignment changes from generation 9 to 9"),
        (
            AssignmentChanges("host-a", 1, 2, upserted=(entry("web-1"),), removed=("web-1",)),
            "changes: assignment changes both change and remove VM 'web-1'",
        ),
        (AssignmentChanges("host-a", 1, 2, removed=("../etc",)), "changes.removed[0]: "),
        (
            AssignmentChanges("host-a", 1, 2, upserted=(VmAssignment("web-1", "x/y", PATH),)),
            "changes.upserted[0].hash: ",
        ),
    ],
)
def test_malformed_changes_are_refused_naming_the_field(
    changes: AssignmentChanges, where: str
) -> None:
    message = _schema.AssignmentChanges.new_message()
    fill_assignment_changes(message, changes)
    with pytest.raises(ValidationError) as caught:
        assignment_changes_from_reader(message)
    assert any(line.startswith(where) for line in caught.value.details), caught.value.details


class Backend:
    """Serves registrations only: what the tests need of a master."""

    def __init__(self) -> None:
        self.nodes: list[RemoteNode] = []
        self.registered = trio.Event()

    async def register(self, info: WorkerInfo, node: RemoteNode) -> int:
        self.nodes.append(node)
        self.registered.set()
        return len(self.nodes)

    async def unregister(self, token: int) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


async def test_changes_reach_the_worker_and_its_refusals_come_back_typed(
    bridge: Bridge,
) -> None:
    backend = Backend()
    received: list[AssignmentUpdate] = []

    async def on_push(update: AssignmentUpdate) -> None:
        received.append(update)

    async with served(bridge, backend) as address:  # type: ignore[arg-type]
        session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), on_push)
        try:
            (node,) = backend.nodes
            await node.push(Assignment("host-a", 7, (entry("web-3"),), "op-7"))
            await node.push_changes(CHANGES)
            assert received == [Assignment("host-a", 7, (entry("web-3"),), "op-7"), CHANGES]
            with pytest.raises(ValidationError, match="is for worker 'host-b', this is 'host-a'"):
                await node.push_changes(AssignmentChanges("host-b", 9, 10))
            with pytest.raises(ValidationError, match="do not move forward"):
                await node.push_changes(AssignmentChanges("host-a", 10, 10))
            assert len(received) == 2
        finally:
            await session.aclose()


# A worker from before ``pushChanges``: its own process (a capnp schema may be
# loaded once per process) with the schema as it was, serving ``push`` only.
# Cap'n Proto itself answers a method its schema does not have: UNIMPLEMENTED.
_OLDER_WORKER = """
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])


class Node(schema.Node.Server):
    async def push(self, assignment, **kwargs):
        return None


async def main():
    stream = await capnp.AsyncIoStream.create_connection("127.0.0.1", int(sys.argv[2]))
    client = capnp.TwoPartyClient(stream)
    request = client.bootstrap().cast_as(schema.Master).register_request()
    request.info.workerId = "host-a"
    request.node = Node()
    response = await request.send()
    assert response.result.which() == "session"
    print("registered", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run():
    async with capnp.kj_loop():
        await main()

asyncio.run(run())
"""


async def test_an_older_worker_answers_changes_unsupported(bridge: Bridge, tmp_path: Path) -> None:
    """The master learns from the answer that it must push whole
    assignments to it."""
    backend = Backend()
    script = tmp_path / "older_worker.py"
    script.write_text(_OLDER_WORKER)
    async with served(bridge, backend) as address:  # type: ignore[arg-type]
        with subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(schema_without(tmp_path, "pushChanges @1")),
                str(address.port),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        ) as worker:
            try:
                with trio.fail_after(30):
                    await backend.registered.wait()
                (node,) = backend.nodes
                await node.push(Assignment("host-a", 1, ()))
                with pytest.raises(UnsupportedError, match="does not implement"):
                    await node.push_changes(AssignmentChanges("host-a", 1, 2))
            finally:
                assert worker.stdin is not None
                worker.stdin.close()
                worker.wait(timeout=30)
