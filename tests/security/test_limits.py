"""Bounds on what a peer may send, and on how many may connect: over-limit
input is answered ``limitExceeded`` and never disturbs anyone else."""

from __future__ import annotations

import contextlib
import re
import resource
from pathlib import Path

import pytest
import trio
from sechelpers import MasterProcess, Pki, master_process, tls_master_args

from procurator.app import master as master_app
from procurator.cli import apply as apply_command
from procurator.core.errors import LimitExceededError, ProcuratorError
from procurator.core.metrics import MetricSample
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
from procurator.core.validation import LIMITS
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import Bridge, connect
from procurator.rpc.clients import CapnpMasterDialer, ControlClient, open_control
from procurator.rpc.convert import MAX_EVENTS_PER_REPORT, MAX_LABELS_PER_SAMPLE
from procurator.rpc.master_server import MAX_CONNECTIONS_PER_PEER, MAX_SESSIONS_PER_CONNECTION
from procurator.rpc.schema import load_schema

IMAGE = "/nix/store/" + "a" * 32 + "-web-vm"
HASH = "a" * 32


async def _nothing(assignment: Assignment) -> None:
    pass


def _status(*vms: VmStatus) -> WorkerStatus:
    return WorkerStatus("host-a", 0, vms)


async def test_over_limit_reports_are_refused_and_the_session_goes_on(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    # host-a reports web-1: it must be assigned to it.
    async with open_control(bridge, tls_master.address, tls=pki.files("control-ci")) as client:
        await client.apply(Fleet((("host-a", (VmAssignment("web-1", HASH, IMAGE),)),)))
    dialer = CapnpMasterDialer(bridge, tls_master.address, tls=pki.files("worker-host-a"))
    session = await dialer.connect(WorkerInfo("host-a"), _nothing)
    try:
        long_text = "x" * (LIMITS.max_text + 1)
        # A long message is cut by the sender rather than sent and refused
        # with its whole report (a raw over-long one is refused: test_convert).
        await session.report_status(_status(VmStatus("web-1", Phase.FAILED, message=long_text)))
        too_many = tuple(
            VmStatus(f"vm-{i}", Phase.PENDING) for i in range(LIMITS.max_vms_per_worker + 1)
        )
        with pytest.raises(LimitExceededError, match=r"status\.vms: 20001 entries exceed"):
            await session.report_status(_status(*too_many))
        labels = tuple((f"l{i}", "v") for i in range(MAX_LABELS_PER_SAMPLE + 1))
        with pytest.raises(LimitExceededError, match=r"labels: more than 32 labels"):
            await session.report_metrics([MetricSample("procurator_x", 1.0, "", labels)])
        with pytest.raises(LimitExceededError, match=r"labels: longer than 1024"):
            await session.report_metrics(
                [MetricSample("procurator_x", 1.0, "", (("l", long_text),))]
            )
        events = [VmEvent("web-1", EventKind.BOOTED)] * (MAX_EVENTS_PER_REPORT + 1)
        with pytest.raises(LimitExceededError, match=r"events: 10001 entries exceed"):
            await session.report_events(events)
        await session.report_events([VmEvent("web-1", EventKind.FAILED, message=long_text)])
        # The same session still works, and nothing over a limit was kept.
        await session.report_status(_status(VmStatus("web-1", Phase.PENDING)))
        await session.report_events([VmEvent("web-1", EventKind.CREATED)])
    finally:
        await session.aclose()
    async with open_control(bridge, tls_master.address, tls=pki.files("control-ci")) as client:
        (worker,) = (await client.status()).workers
        assert worker.status is not None
        assert [vm.id for vm in worker.status.vms] == ["web-1"]
        failed, created = await client.events()
        assert (failed.event.kind, created.event.kind) == (EventKind.FAILED, EventKind.CREATED)
        assert len(failed.event.message) == LIMITS.max_text


async def test_over_limit_apply_is_refused(
    tls_master: MasterProcess, pki: Pki, bridge: Bridge
) -> None:
    vms = tuple(VmAssignment(f"vm-{i}", HASH, IMAGE) for i in range(LIMITS.max_vms_per_worker + 1))
    async with open_control(bridge, tls_master.address, tls=pki.files("control-ci")) as client:
        # A client sends a big worker's VMs in chunks (core.fleetpatch): the
        # master counts them as it assembles the worker's list.
        with pytest.raises(
            LimitExceededError, match=r"workers\.host-a\.vms: 20001 VMs exceed the limit of 20000"
        ):
            await client.apply(Fleet((("host-a", vms),)))
        # The connection is still good, and nothing was stored.
        assert (await client.status()).generation == 0
        result = await client.apply(Fleet((("host-a", vms[:2]),)))
        assert result.generation == 1


async def _refused_for_the_cap(bridge: Bridge, master: MasterProcess, pki: Pki) -> None:
    with pytest.raises(LimitExceededError, match="at most 2 connections at once"):
        async with open_control(bridge, master.address, tls=pki.files("control-ci")):
            pass
    dialer = CapnpMasterDialer(bridge, master.address, tls=pki.files("worker-host-a"))
    with pytest.raises(LimitExceededError, match="at most 2 connections at once"):
        await dialer.connect(WorkerInfo("host-a"), _nothing)


async def test_connection_cap(tmp_path: Path, pki: Pki, bridge: Bridge) -> None:
    with master_process(tmp_path, *tls_master_args(pki, "--max-connections", "2")) as master:
        assert "at most 2 connections" in master.text()
        async with contextlib.AsyncExitStack() as held:
            clients: list[ControlClient] = [
                await held.enter_async_context(
                    open_control(bridge, master.address, tls=pki.files("control-ci"))
                )
                for _ in range(2)
            ]
            await _refused_for_the_cap(bridge, master, pki)
            # The connections in the cap are served as usual meanwhile.
            for client in clients:
                assert (await client.status()).generation == 0
        # Once they are gone, a new one is served (the master notices the
        # disconnects on its own time: retry until it has).
        with trio.fail_after(30):
            while True:
                try:
                    async with open_control(
                        bridge, master.address, tls=pki.files("control-ci")
                    ) as client:
                        assert (await client.status()).generation == 0
                        break
                except LimitExceededError:
                    await trio.sleep(0.05)
        assert (
            "refusing a connection: the master serves at most 2 connections at once"
            in master.text()
        )


async def test_one_identity_cannot_take_every_connection(
    tmp_path: Path, pki: Pki, bridge: Bridge
) -> None:
    """A stolen key opens connections until its own cap, not the master's:
    others (another worker, an operator) are still served."""
    with master_process(tmp_path, *tls_master_args(pki)) as master:
        async with contextlib.AsyncExitStack() as held:
            for _ in range(MAX_CONNECTIONS_PER_PEER):
                client = await held.enter_async_context(
                    open_control(bridge, master.address, tls=pki.files("control-ci"))
                )
                assert (await client.status()).generation == 0
            with pytest.raises(LimitExceededError, match="procurator://control/ci already has"):
                async with open_control(bridge, master.address, tls=pki.files("control-ci")):
                    pass
            dialer = CapnpMasterDialer(bridge, master.address, tls=pki.files("worker-host-b"))
            session = await dialer.connect(WorkerInfo("host-b"), _nothing)
            await session.aclose()


class _Node(load_schema().Node.Server):  # type: ignore[misc]
    async def push(self, **_: object) -> None:
        pass


async def _register_many(address: Address, count: int) -> list[str]:
    """Register host-a ``count`` times over one connection (capnp thread);
    each answer's arm, or the error code."""
    schema = load_schema()
    conn = await connect(address, lambda reason: None)
    try:
        master = conn.bootstrap(schema.Master)
        answers = []
        for _ in range(count):
            request = master.register_request()
            request.info.workerId = "host-a"
            request.node = _Node()
            result = (await request.send()).result
            answers.append(str(result.error.code) if result.which() == "error" else "session")
        return answers
    finally:
        conn.close()


async def test_registrations_per_connection_are_capped(tmp_path: Path, bridge: Bridge) -> None:
    with master_process(tmp_path, "--listen", "127.0.0.1:0") as master:
        address = parse_address(master.address)
        answers = await bridge.run(_register_many, address, MAX_SESSIONS_PER_CONNECTION + 1)
    assert answers == ["session"] * MAX_SESSIONS_PER_CONNECTION + ["limitExceeded"]


def test_master_raises_its_open_file_limit_and_warns_when_short(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The connection cap means nothing if the master runs out of file
    descriptors first (a soft limit of 1024 is common)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
        master_app._open_files_for(100)
        raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert raised == hard or hard == resource.RLIM_INFINITY
        assert "more than the open-file limit" not in caplog.text
        master_app._open_files_for(raised + 1)
        assert "--max-connections" in caplog.text and "LimitNOFILE" in caplog.text
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_huge_fleet_file_is_refused_without_being_read_whole(tmp_path: Path) -> None:
    # A sparse 1 TiB file: reading it whole would fail with MemoryError (or
    # take the machine down) before any size check could run.
    huge = tmp_path / "huge.toml"
    with open(huge, "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(LimitExceededError, match=re.escape(f"{huge}: fleet file is larger than")):
        apply_command._load_fleet(str(huge))
    # A file of exactly the limit is read and parsed (and refused as TOML,
    # not for its size).
    edge = tmp_path / "edge.toml"
    edge.write_bytes(b"x" * LIMITS.max_fleet_file_bytes)
    with pytest.raises(ProcuratorError) as caught:
        apply_command._load_fleet(str(edge))
    assert not isinstance(caught.value, LimitExceededError), caught.value
