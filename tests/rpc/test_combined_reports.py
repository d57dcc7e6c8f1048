"""``WorkerSession.reportStatusAndEvents`` on the wire: a real master (and a
scripted backend, for each part's errors) behind a real socket, and a worker
link against an older master that has no such call."""

from __future__ import annotations

import functools
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from rpchelpers import schema_without, served
from test_wire_errors import ScriptedBackend

from procurator.core.assignments import AssignmentUpdate
from procurator.core.errors import (
    NotFoundError,
    ProcuratorError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
)
from procurator.core.models import (
    EventKind,
    Fleet,
    Phase,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer, open_control
from procurator.worker.link import LinkSettings, MasterLink

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]
FAST = LinkSettings(resync_interval=30, call_timeout=5.0, backoff_initial=0.05, backoff_max=0.2)


async def _ignore(update: AssignmentUpdate) -> None:
    return None


async def test_status_changes_and_events_cross_in_one_call(
    bridge: Bridge, master: Any, fleet_of: FleetOf
) -> None:
    async with open_control(bridge, master.address) as control:
        for tag in "ab":  # host-a's generations 1 and 2
            await control.apply(fleet_of({"host-a": [(f"web-{i}", tag) for i in range(3)]}))
    session = await CapnpMasterDialer(bridge, master.address).connect(WorkerInfo("host-a"), _ignore)
    try:
        web = tuple(VmStatus(f"web-{i}", Phase.RUNNING, observed_hash="a" * 32) for i in range(3))
        await session.report_status(WorkerStatus("host-a", 1, web))
        failed = VmStatus("web-1", Phase.FAILED, message="image refused", op_id="op-1")
        crashed = VmEvent("web-1", EventKind.CRASHED, "exit 1", "op-1", 5)
        refused = await session.report_status_and_events(
            StatusChanges("host-a", 2, changed=(failed,)), [crashed]
        )
        assert refused is None
        async with open_control(bridge, master.address) as control:
            (worker,) = (await control.status()).workers
            assert worker.status == WorkerStatus("host-a", 2, (web[0], failed, web[2]))
            assert [e.event for e in await control.events("web-1")] == [crashed]

            # Status changes refused: the events are not looked at.
            booted = VmEvent("web-2", EventKind.BOOTED, "up", "op-2", 6)
            with pytest.raises(ValidationError, match="did not report"):
                await session.report_status_and_events(
                    StatusChanges("host-a", 2, removed=("web-9",)), [booted]
                )
            assert await control.events("web-2") == ()
            (worker,) = (await control.status()).workers
            assert worker.status == WorkerStatus("host-a", 2, (web[0], failed, web[2]))

            # Events refused: the status changes are taken all the same.
            stranger = VmEvent("db-1", EventKind.BOOTED, "up", "op-3", 7)
            refused = await session.report_status_and_events(
                StatusChanges("host-a", 2, removed=("web-2",)), [booted, stranger]
            )
            assert isinstance(refused, UnauthorizedError) and "'db-1'" in refused.message
            assert refused.op_id.startswith("op-")
            assert await control.events("web-2") == ()  # none of the batch stored
            (worker,) = (await control.status()).workers
            assert worker.status == WorkerStatus("host-a", 2, (web[0], failed))

            # An event that does not decode costs the events, not the status.
            unreadable = VmEvent("web-0", EventKind.BOOTED, "up", "x" * 65, 8)
            restarted = VmStatus("web-0", Phase.RUNNING, observed_hash="a" * 32, restarts=1)
            refused = await session.report_status_and_events(
                StatusChanges("host-a", 2, changed=(restarted,)), [unreadable]
            )
            assert isinstance(refused, ValidationError)
            assert any("events[0].opId" in detail for detail in refused.details), refused.details
            assert await control.events("web-0") == ()
            (worker,) = (await control.status()).workers
            assert worker.status == WorkerStatus("host-a", 2, (restarted, failed))
    finally:
        await session.aclose()


async def test_each_part_of_a_combined_call_answers_typed(bridge: Bridge) -> None:
    changes = StatusChanges("host-a", 0)
    events = [VmEvent("web-1", EventKind.BOOTED)]
    cases: list[tuple[dict[str, BaseException], type[Exception] | None, type[Exception] | None]] = [
        # (what the backend raises, what the call raises, what it answers)
        ({}, None, None),
        ({"report_events": NotFoundError("no such VM")}, None, NotFoundError),
        ({"report_status_changes": ValidationError("does not fit")}, ValidationError, None),
        # The events' temporary failure raises: they are sent again.
        ({"report_events": UnavailableError("the store is away")}, UnavailableError, None),
        # A bug in the events' part is their internal error (the status
        # part stands); it raises, as any internal error does.
        ({"report_events": RuntimeError("bug")}, ProcuratorError, None),
    ]
    for fail, raises, answers in cases:
        backend = ScriptedBackend(fail)
        async with served(bridge, backend) as address:  # type: ignore[arg-type]
            dialer = CapnpMasterDialer(bridge, address)
            session = await dialer.connect(WorkerInfo("host-a"), _ignore)
            try:
                if raises is not None:
                    with pytest.raises(raises) as caught:
                        await session.report_status_and_events(changes, events)
                    error = caught.value
                    assert isinstance(error, ProcuratorError) and type(error) is raises
                    (cause,) = fail.values()
                    if isinstance(cause, ProcuratorError):
                        assert error.message == cause.message
                    else:
                        assert error.code == "internal"
                        assert error.message.startswith("reportStatusAndEvents: events: ")
                    continue
                refused = await session.report_status_and_events(changes, events)
                if answers is None:
                    assert refused is None, fail
                else:
                    assert type(refused) is answers
                    assert refused.message == "no such VM"
            finally:
                await session.aclose()


_OLDER_MASTER = """
import asyncio, sys
import capnp

schema = capnp.load(sys.argv[1])
log = open(sys.argv[2], "a", buffering=1)


class Session(schema.WorkerSession.Server):
    async def getAssignment(self, knownGeneration, _context, **kwargs):
        _context.results.changed = False

    async def reportStatus(self, status, _context, **kwargs):
        log.write(f"reportStatus {status.observedGeneration}\\n")
        _context.results.result.ok = None

    async def reportStatusChanges(self, changes, _context, **kwargs):
        log.write(f"reportStatusChanges {changes.observedGeneration}\\n")
        _context.results.result.ok = None

    async def reportEvents(self, events, _context, **kwargs):
        log.write("reportEvents " + " ".join(e.vmId for e in events) + "\\n")
        _context.results.result.ok = None


class Master(schema.Master.Server):
    async def register(self, info, node, _context, **kwargs):
        _context.results.result.session = Session()


async def serve(stream):
    await capnp.TwoPartyServer(stream, bootstrap=Master()).on_disconnect()


async def main():
    server = await capnp.AsyncIoStream.create_server(serve, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def run():
    async with capnp.kj_loop():
        await main()

asyncio.run(run())
"""


async def test_a_link_to_an_older_master_reports_status_changes_and_events_apart(
    bridge: Bridge, tmp_path: Path
) -> None:
    script, log = tmp_path / "older_master.py", tmp_path / "calls.log"
    script.write_text(_OLDER_MASTER)
    schema = schema_without(tmp_path, "reportStatusAndEvents @5")
    with subprocess.Popen(
        [sys.executable, str(script), str(schema), str(log)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as older:
        try:
            assert older.stdout is not None
            with trio.fail_after(30):
                line = await trio.to_thread.run_sync(older.stdout.readline, abandon_on_cancel=True)
            port = int(line)
            link = MasterLink(
                CapnpMasterDialer(bridge, parse_address(f"127.0.0.1:{port}")),
                WorkerInfo("host-a"),
                lambda update: _true(),
                settings=FAST,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(link.run)
                await link.wait_connected()
                link.publish_status(WorkerStatus("host-a", 1))
                for generation, vm_id in ((2, "web-1"), (3, "web-2")):
                    await _wait_calls(log, 2 * generation - 3)
                    # A new VM's event and status in one trio turn, as a
                    # burst publishes them.
                    link.publish_events([VmEvent(vm_id, EventKind.BOOTED)])
                    link.publish_status_changes(
                        StatusChanges(
                            "host-a", generation, changed=(VmStatus(vm_id, Phase.RUNNING),)
                        )
                    )
                calls = await _wait_calls(log, 5)
                assert link.connected
                nursery.cancel_scope.cancel()
            # The combined call was answered unimplemented and taken apart.
            assert calls == [
                "reportStatus 1",
                "reportStatusChanges 2",
                "reportEvents web-1",
                "reportStatusChanges 3",
                "reportEvents web-2",
            ]
        finally:
            assert older.stdin is not None
            older.stdin.close()
            try:
                await trio.to_thread.run_sync(functools.partial(older.wait, timeout=30))
            finally:
                older.kill()  # a no-op once it has exited


async def _true() -> bool:
    return True


async def _wait_calls(log: Path, lines: int) -> list[str]:
    """The older master's calls, once it has logged ``lines`` of them."""
    with trio.fail_after(30):
        while not log.exists() or len(log.read_text().splitlines()) < lines:
            await trio.sleep(0.02)
    return log.read_text().splitlines()
