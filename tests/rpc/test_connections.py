"""How long the master keeps a connection: the deadlines of
``ConnectionDeadlines`` (short ones here, so the tests need not wait the
defaults out; tests/faults/test_wire_garbage.py holds the defaults), the
long-lived worker connection, and TCP keepalive."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from rpchelpers import served_service

from procurator.core.errors import UnavailableError, ValidationError
from procurator.core.models import Assignment, WorkerInfo, WorkerStatus
from procurator.rpc.bridge import Bridge, connect
from procurator.rpc.clients import CapnpMasterDialer, open_control
from procurator.rpc.master_server import ConnectionDeadlines
from procurator.rpc.schema import load_schema

SHORT = ConnectionDeadlines(
    first_call=0.5,
    idle=0.5,
    sweep_interval=0.1,
    keepalive_idle=7,
    keepalive_interval=3,
    keepalive_count=2,
)


def master(tmp_path: Path, bridge: Bridge) -> Any:
    return served_service(tmp_path, bridge, deadlines=SHORT)


async def _ignore(assignment: Assignment) -> None:
    return None


async def _closed_by_master(stream: trio.SocketStream) -> None:
    with trio.fail_after(30):
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass  # reset: closed too


async def test_a_connection_that_never_calls_is_closed(tmp_path: Path, bridge: Bridge) -> None:
    async with master(tmp_path, bridge) as (_, address):
        silent = await trio.open_tcp_stream(address.host, address.port)
        half = await trio.open_tcp_stream(address.host, address.port)
        await half.send_all(b"\x00\x00\x00\x00\x10\x00\x00\x00")  # 16 words announced
        await _closed_by_master(silent)
        await _closed_by_master(half)
        await silent.aclose()
        await half.aclose()


async def test_an_idle_control_connection_is_closed_but_not_a_waiting_one(
    tmp_path: Path, bridge: Bridge
) -> None:
    async with (
        master(tmp_path, bridge) as (service, address),
        open_control(bridge, address) as control,
    ):
        first = await control.status()
        # A blocking read longer than the idle deadline is a call in flight:
        # the connection stays, and the read is answered when its wait ends.
        answered = await control.status(wait_index=first.change_index, wait=4 * SHORT.idle)
        assert answered.change_index == first.change_index == service.change_index
        # Idle past the deadline, with no worker registered: closed.
        await trio.sleep(SHORT.idle + 10 * SHORT.sweep_interval)
        with pytest.raises(UnavailableError):
            await control.status()


async def test_a_worker_connection_is_long_lived(tmp_path: Path, bridge: Bridge) -> None:
    """A registered worker is quiet between resyncs: no idle deadline."""
    async with master(tmp_path, bridge) as (_, address):
        session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
        try:
            await trio.sleep(SHORT.idle + 10 * SHORT.sweep_interval)
            assert session.connected
            await session.report_status(WorkerStatus("host-a", 0))
            async with open_control(bridge, address) as control:
                (worker,) = (await control.status()).workers
            assert worker.connected
        finally:
            await session.aclose()


async def test_a_peer_that_goes_away_is_noticed_without_pycapnp(
    tmp_path: Path, bridge: Bridge
) -> None:
    """A worker whose peer closed is unregistered by the sweep (the peer's
    FIN is seen by ``poll``), whatever Cap'n Proto noticed."""
    async with master(tmp_path, bridge) as (_, address):
        held: dict[str, Any] = {}

        async def register() -> None:  # capnp thread
            schema = load_schema()

            class Node(schema.Node.Server):  # type: ignore[misc, name-defined]
                async def push(self, **_: Any) -> None:
                    pass

            conn = await connect(address, lambda reason: None)
            request = conn.bootstrap(schema.Master).register_request()
            request.info.workerId = "host-a"
            request.node = Node()
            held["session"] = (await request.send()).result.session
            held["conn"] = conn

        async def close() -> None:  # capnp thread
            held.pop("session", None)
            held.pop("conn").close()

        await bridge.run(register)
        async with open_control(bridge, address) as control:
            (worker,) = (await control.status()).workers
            assert worker.connected
            await bridge.run(close)
            with trio.fail_after(30):
                while any(w.connected for w in (await control.status()).workers):
                    await trio.sleep(0.05)


def test_deadlines_are_checked() -> None:
    with pytest.raises(ValidationError, match="idle must be a positive"):
        ConnectionDeadlines(idle=0)
    with pytest.raises(ValidationError, match="keepalive_count must be at least 1"):
        ConnectionDeadlines(keepalive_count=0)


async def test_tcp_keepalive_is_on(tmp_path: Path, bridge: Bridge) -> None:
    """A peer that vanishes without a FIN (power loss, a partition) makes
    the master's socket fail after the keepalive probes: they are on, with
    the deadlines' timings (as the kernel reports them)."""
    async with master(tmp_path, bridge) as (_, address):
        session = await CapnpMasterDialer(bridge, address).connect(WorkerInfo("host-a"), _ignore)
        try:
            shown = await trio.to_thread.run_sync(
                lambda: (
                    subprocess.run(
                        ["ss", "-tnoH", "state", "established", f"( sport = :{address.port} )"],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
            )
        finally:
            await session.aclose()
    (line,) = shown.splitlines()
    assert "timer:(keepalive," in line, line
    # The time to the first probe: 7 s here (Linux's default would be
    # 7,200). ss prints its unit oddly ("6.996ms" for 6.996 s): the number
    # is what counts.
    left = line.split("timer:(keepalive,", 1)[1].split(",", 1)[0].rstrip("msec")
    assert 0 < float(left) <= SHORT.keepalive_idle, line
