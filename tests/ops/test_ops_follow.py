"""``procurator events --follow`` across a master restart: the follower
reconnects and goes on after the last event it printed — through a real
Cap'n Proto server on a unix socket, stopped and started again."""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from procurator.cli import ops
from procurator.core.errors import UnsupportedError
from procurator.core.fleet import parse_fleet
from procurator.core.models import EventKind, VmEvent, WorkerInfo
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.master_server import serve_master

IMAGE = "/nix/store/" + "a" * 32 + "-vm"


class _Node:
    connection_id = 1

    async def push(self, assignment: object) -> None:
        return None

    async def push_changes(self, changes: object) -> None:
        # An older worker: the master pushes it whole assignments.
        raise UnsupportedError("Node.pushChanges: not implemented by this fake")

    async def aclose(self) -> None:
        return None


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = trio.current_time() + 30
    while not condition():
        assert trio.current_time() < deadline, f"no {what} after 30 s"
        await trio.sleep(0.02)


async def test_follow_reconnects_after_a_master_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    for name in ("PROCURATOR_TLS_CERT", "PROCURATOR_TLS_KEY", "PROCURATOR_TLS_CA"):
        monkeypatch.delenv(name, raising=False)
    sock = tmp_path / "m.sock"
    address = parse_address(f"unix:{sock}")
    args = argparse.Namespace(
        master=f"unix:{sock}",
        tls_cert=None,
        tls_key=None,
        tls_ca=None,
        insecure=False,
        vm="",
        limit=100,
        follow=True,
        json=True,
        interval=0.05,
    )

    def printed() -> list[str]:
        return [json.loads(line)["message"] for line in out.getvalue().splitlines()]

    async def master(store: FleetStore, message: str, *, task_status: trio.TaskStatus) -> None:
        async with open_bridge() as bridge, trio.open_nursery() as nursery:
            service = MasterService(store)
            await nursery.start(service.run)
            await nursery.start(serve_master, bridge, service, address)
            # A worker reports events only of VMs assigned to it.
            await service.apply(
                parse_fleet(f'[workers.host-a]\nvms = [{{ id = "web-1", image = "{IMAGE}" }}]\n')
            )
            token = await service.register(WorkerInfo("host-a"), _Node())
            await service.report_events(token, [VmEvent("web-1", EventKind.BOOTED, message)])
            task_status.started(nursery.cancel_scope)
            await trio.sleep_forever()

    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as outer:
        first = await outer.start(master, store, "before the restart")
        outer.start_soon(ops._events, args)
        await _until(lambda: printed() == ["before the restart"], "the first event")
        first.cancel()  # the master goes away
        await _until(lambda: "reconnecting" in err.getvalue(), "the follower noticing")
        await outer.start(master, store, "after the restart")
        await _until(lambda: len(printed()) == 2, "the event after the restart")
        outer.cancel_scope.cancel()
    assert printed() == ["before the restart", "after the restart"]  # each once
