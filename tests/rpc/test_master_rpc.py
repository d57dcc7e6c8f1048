"""Master, worker link and control client over real sockets, in one process."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from rpchelpers import served_service
from testnames import free_port

from procurator.core.assignments import (
    AssignmentChanges,
    AssignmentUpdate,
    apply_assignment_changes,
)
from procurator.core.control import FleetStatus
from procurator.core.errors import (
    ProcuratorError,
    StaleGenerationError,
    UnavailableError,
    ValidationError,
)
from procurator.core.models import (
    Assignment,
    EventKind,
    Fleet,
    Phase,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import Bridge, connect
from procurator.rpc.clients import CapnpMasterDialer, open_control
from procurator.rpc.master_server import serve_master
from procurator.rpc.schema import load_schema
from procurator.worker.link import LinkSettings, MasterLink

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]
MasterFactory = Callable[[trio.Nursery, Path, str], Any]

FAST = LinkSettings(resync_interval=0.5, call_timeout=5.0, backoff_initial=0.05, backoff_max=0.2)


class Received:
    def __init__(self) -> None:
        self.assignments: list[Assignment] = []
        self._changed = trio.Event()

    async def __call__(self, update: AssignmentUpdate) -> bool:
        if isinstance(update, AssignmentChanges):
            # As a worker does: changes apply to the assignment it holds.
            update = apply_assignment_changes(self.assignments[-1], update)
        self.assignments.append(update)
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_generation(self, generation: int) -> Assignment:
        with trio.fail_after(20):
            while not self.assignments or self.assignments[-1].generation < generation:
                await self._changed.wait()
        return self.assignments[-1]


async def start_link(
    nursery: trio.Nursery, bridge: Bridge, address: Address, worker_id: str
) -> tuple[MasterLink, Received]:
    received = Received()
    link = MasterLink(
        CapnpMasterDialer(bridge, address), WorkerInfo(worker_id), received, settings=FAST
    )
    await nursery.start(link.run)
    return link, received


async def test_apply_pushes_to_the_connected_worker_only_when_affected(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    async with trio.open_nursery() as nursery:
        link_a, got_a = await start_link(nursery, bridge, master.address, "host-a")
        link_b, got_b = await start_link(nursery, bridge, master.address, "host-b")
        with trio.fail_after(20):
            await link_a.wait_connected()
            await link_b.wait_connected()
        async with open_control(bridge, master.address) as control:
            first = await control.apply(
                fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")]})
            )
            assert first.changed and first.generation == 1
            assert [d.worker_id for d in first.diffs] == ["host-a", "host-b"]
            assert (await got_a.wait_generation(1)).vms[0].id == "web-1"
            await got_b.wait_generation(1)

            # Only host-a changes: host-b is not contacted.
            second = await control.apply(
                fleet_of({"host-a": [("web-1", "c")], "host-b": [("db-1", "b")]})
            )
            assert second.generation == 2
            assert second.diffs[0].replaced == ("web-1",)
            pushed = await got_a.wait_generation(2)
            assert pushed.op_id == second.op_id
            assert [a.generation for a in got_b.assignments] == [1]

            # A no-op apply keeps the generation.
            same = await control.apply(
                fleet_of({"host-a": [("web-1", "c")], "host-b": [("db-1", "b")]})
            )
            assert (same.changed, same.generation) == (False, 2)
        nursery.cancel_scope.cancel()


async def test_offline_worker_gets_its_assignment_on_connect(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    async with open_control(bridge, master.address) as control:
        result = await control.apply(fleet_of({"host-c": [("web-9", "d")]}))
        status = await control.status()
    (worker,) = status.workers
    assert (worker.worker_id, worker.connected, worker.since_unix_ms) == ("host-c", False, 0)
    async with trio.open_nursery() as nursery:
        _, got = await start_link(nursery, bridge, master.address, "host-c")
        assignment = await got.wait_generation(result.generation)
        assert [vm.id for vm in assignment.vms] == ["web-9"]
        nursery.cancel_scope.cancel()


async def test_status_reports_reach_fleet_status(bridge: Bridge, master, fleet_of: FleetOf) -> None:
    async with trio.open_nursery() as nursery:
        link, got = await start_link(nursery, bridge, master.address, "host-a")
        async with open_control(bridge, master.address) as control:
            result = await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
            await got.wait_generation(result.generation)
            link.publish_status(WorkerStatus("host-a", result.generation))
            link.publish_events([VmEvent("web-1", EventKind.BOOTED, "up", result.op_id, 1)])
            with trio.fail_after(20):
                while True:
                    (worker,) = (await control.status()).workers
                    events = await control.events("web-1")
                    if worker.status is not None and events:
                        break
                    await trio.sleep(0.05)
            assert worker.connected
            assert worker.status.observed_generation == result.generation
            assert events[0].worker_id == "host-a"
            assert events[0].event.kind is EventKind.BOOTED
        nursery.cancel_scope.cancel()


async def test_status_changes_cross_the_wire_and_merge(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    # The VMs and generations host-a reports must be its own (two applies: 1, 2).
    async with open_control(bridge, master.address) as control:
        for tag in "ab":
            await control.apply(fleet_of({"host-a": [(f"web-{i}", tag) for i in range(3)]}))
    session = await CapnpMasterDialer(bridge, master.address).connect(WorkerInfo("host-a"), _ignore)
    try:
        with pytest.raises(ValidationError, match="before a full status"):
            await session.report_status_changes(StatusChanges("host-a", 1))
        web = [VmStatus(f"web-{i}", Phase.RUNNING, observed_hash="a" * 32) for i in range(3)]
        await session.report_status(WorkerStatus("host-a", 1, tuple(web)))
        failed = VmStatus("web-1", Phase.FAILED, message="image refused", op_id="op-1")
        await session.report_status_changes(
            StatusChanges("host-a", 2, changed=(failed,), removed=("web-2",))
        )
        async with open_control(bridge, master.address) as control:
            (worker,) = (await control.status()).workers
        assert worker.status == WorkerStatus("host-a", 2, (web[0], failed))
    finally:
        await session.aclose()


async def test_stale_expected_generation_is_refused(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    async with open_control(bridge, master.address) as control:
        base = await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
        results: list[object] = []

        async def racer(tag: str) -> None:
            try:
                results.append(
                    await control.apply(
                        fleet_of({"host-a": [("web-1", tag)]}),
                        expected_generation=base.generation,
                    )
                )
            except StaleGenerationError as exc:
                results.append(exc)

        async with trio.open_nursery() as nursery:
            for tag in "bcdf":
                nursery.start_soon(racer, tag)
        stale = [r for r in results if isinstance(r, StaleGenerationError)]
        assert len(stale) == 3
        assert "nothing was applied" in str(stale[0])
        assert (await control.status()).generation == base.generation + 1


async def test_invalid_fleet_over_the_wire_is_refused_without_change(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    async with open_control(bridge, master.address) as control:
        await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
        path = "/nix/store/" + "b" * 32 + "-x"
        duplicate = Fleet(
            (
                ("host-a", (VmAssignment("web-1", "h1", path),)),
                ("host-b", (VmAssignment("web-1", "h2", path),)),
            )
        )
        with pytest.raises(ValidationError) as info:
            await control.apply(duplicate)
        assert any("'web-1' is used more than once" in d for d in info.value.details)
        bad_path = Fleet((("host-a", (VmAssignment("web-1", "h1", "/tmp/evil"),)),))
        with pytest.raises(ValidationError) as info:
            await control.apply(bad_path)
        assert any("workers[0].vms[0].nixStorePath" in d for d in info.value.details)
        status = await control.status()
        assert status.generation == 1


async def test_master_restart_keeps_state_and_workers_come_back(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    async with trio.open_nursery() as nursery:
        link, got = await start_link(nursery, bridge, master.address, "host-a")
        async with open_control(bridge, master.address) as control:
            first = await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
        await got.wait_generation(first.generation)

        await master.stop()
        with trio.fail_after(20):
            while link.connected:
                await trio.sleep(0.01)
        await master.start()
        with trio.fail_after(20):
            await link.wait_connected()

        async with open_control(bridge, master.address) as control:
            status = await control.status()
            assert status.generation == first.generation
            second = await control.apply(fleet_of({"host-a": [("web-1", "a"), ("web-2", "b")]}))
        assert second.generation == first.generation + 1
        assert len((await got.wait_generation(second.generation)).vms) == 2
        nursery.cancel_scope.cancel()


async def test_garbage_on_the_master_port_does_not_hurt_others(
    bridge: Bridge, master, fleet_of: FleetOf
) -> None:
    async with open_control(bridge, master.address) as control:
        await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
        for payload in (
            b"\xff" * 64,
            b"GET / HTTP/1.1\r\n\r\n",
            b"\x00\x00\x00\x00\xff\xff\xff\x7f",
        ):
            stream = await trio.open_tcp_stream(master.address.host, master.address.port)
            await stream.send_all(payload * 50)
            await stream.aclose()
        # A half-open connection that sends a huge segment table and stalls.
        stuck = socket.create_connection((master.address.host, master.address.port))
        try:
            stuck.sendall(b"\x00\x00\x00\x00\xff\xff\xff\x0f")
            status = await control.status()
            assert status.generation == 1
        finally:
            stuck.close()
        assert (await control.status()).generation == 1


async def test_unreachable_master_is_unavailable(bridge: Bridge) -> None:
    with pytest.raises(UnavailableError, match="Connection refused"):
        async with open_control(bridge, f"127.0.0.1:{free_port()}"):
            pass


async def test_unix_socket_address(
    bridge: Bridge, tmp_path: Path, fleet_of: FleetOf, master_factory: MasterFactory
) -> None:
    sock = tmp_path / "master.sock"
    async with trio.open_nursery() as nursery:
        running = master_factory(nursery, tmp_path / "m.db", f"unix:{sock}")
        address = await running.start()
        assert address.unix_path == str(sock)
        _, got = await start_link(nursery, bridge, address, "host-u")
        async with open_control(bridge, f"unix:{sock}") as control:
            result = await control.apply(fleet_of({"host-u": [("web-1", "a")]}))
        await got.wait_generation(result.generation)
        nursery.cancel_scope.cancel()
    assert not sock.exists()


class BrokenBackend:
    """A backend with a bug in every method but ``apply`` validation."""

    def __init__(self) -> None:
        self.calls = 0

    async def apply(self, fleet: Fleet, **_: Any) -> Any:
        self.calls += 1
        raise RuntimeError("bug in apply")

    async def apply_patch(self, patch: Any, **_: Any) -> Any:
        # The control client applies through patches (core.fleetpatch).
        self.calls += 1
        raise RuntimeError("bug in apply")

    async def fleet_status(self) -> Any:
        self.calls += 1
        raise RuntimeError("bug in status")

    async def recent_events(self, vm_id: str = "", limit: int = 100) -> Any:
        raise ValidationError("no such thing")

    async def register(self, info: WorkerInfo, node: Any) -> int:
        raise RuntimeError("bug in register")

    async def unregister(self, token: int) -> None:
        return None


async def test_a_failing_handler_does_not_kill_the_server(
    bridge: Bridge, fleet_of: FleetOf, caplog: pytest.LogCaptureFixture
) -> None:
    backend = BrokenBackend()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(serve_master, bridge, backend, parse_address("127.0.0.1:0"))
        async with open_control(bridge, address) as control:
            for _ in range(2):
                with pytest.raises(ProcuratorError, match="internal error"):
                    await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
                with pytest.raises(ProcuratorError, match=r"Control\.status: internal error"):
                    await control.status()
            with pytest.raises(ValidationError, match=r"^no such thing \(op op-"):
                await control.events()
        with pytest.raises(ProcuratorError, match="internal error"):
            await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
        assert backend.calls == 4
        assert "bug in apply" in caplog.text
        nursery.cancel_scope.cancel()


async def _ignore(assignment: Assignment) -> None:
    return None


# ---------------------------------------------------------------- blocking reads


async def _until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():
            await trio.sleep(0.01)


async def test_blocking_reads_answer_on_the_report_not_before(
    tmp_path: Path, bridge: Bridge, fleet_of: FleetOf
) -> None:
    async with served_service(tmp_path, bridge) as (service, address):
        session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
        try:
            async with open_control(bridge, address) as control:
                result = await control.apply(fleet_of({"host-a": [("web-1", "a")]}))
                first = await control.status()
                assert first.change_index == service.change_index
                answers: list[Any] = []

                async def read_status() -> None:
                    answers.append(await control.status(wait_index=first.change_index, wait=30))

                async def read_vm() -> None:
                    answers.append(
                        await control.describe_vm("web-1", wait_index=first.change_index, wait=30)
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_status)
                    nursery.start_soon(read_vm)
                    await _until(lambda: service.waiting == 2)
                    await trio.sleep(0.2)
                    assert answers == []  # nothing changed yet: both still wait
                    running = VmStatus("web-1", Phase.RUNNING, observed_hash="a" * 32)
                    await session.report_status(
                        WorkerStatus("host-a", result.generation, (running,))
                    )
                status = next(a for a in answers if isinstance(a, FleetStatus))
                described = next(a for a in answers if not isinstance(a, FleetStatus))
                assert status.change_index > first.change_index
                assert status.workers[0].status is not None
                assert status.workers[0].status.observed_generation == result.generation
                assert described.status == running
                # No change within the wait: the same index comes back.
                again = await control.status(wait_index=status.change_index, wait=0.1)
                assert again.change_index == status.change_index
        finally:
            await session.aclose()


async def test_a_waiting_read_that_goes_away_is_forgotten(tmp_path: Path, bridge: Bridge) -> None:
    async with served_service(tmp_path, bridge) as (service, address):
        async with open_control(bridge, address) as control:
            index = (await control.status()).change_index
            with trio.move_on_after(0.2):
                await control.status(wait_index=index, wait=60)
            # The client cancelled its call: the master stops waiting for it.
            await _until(lambda: service.waiting == 0)

        # ... and when the connection closes under a waiting call.
        held: dict[str, Any] = {}

        async def send_and_hold() -> None:  # capnp thread
            held["conn"] = conn = await connect(address, lambda reason: None)
            master = conn.bootstrap(load_schema().Master)
            control_ = (await master.control()).result.control
            held["call"] = control_.status(waitIndex=index, waitMs=60_000)

        async def close() -> None:  # capnp thread
            held.pop("conn").close()  # the call still held: the close ends it
            held.pop("call", None)

        await bridge.run(send_and_hold)
        try:
            await _until(lambda: service.waiting == 1)
        finally:
            await bridge.run(close)
        await _until(lambda: service.waiting == 0)
        assert service.change_index == index
