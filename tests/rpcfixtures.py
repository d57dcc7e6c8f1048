"""Fixtures shared by the RPC and master tests: a bridge, an in-process
master on a real socket, fleets. Imported by their conftest.py files."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

from procurator.app.master import MasterConfig, run_master
from procurator.core.fleet import parse_fleet
from procurator.core.models import Fleet
from procurator.rpc.address import Address
from procurator.rpc.bridge import Bridge, open_bridge


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    async with open_bridge() as b:
        yield b


class RunningMaster:
    """An in-process master that a test can stop and start again."""

    def __init__(self, nursery: trio.Nursery, db: Path, listen: str) -> None:
        self._nursery = nursery
        self.db = db
        self.listen = listen
        self.address: Address | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self) -> Address:
        stopped = self._stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[Address]) -> None:
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    await run_master(
                        MasterConfig(listen=self.listen, db=self.db, push_timeout=2.0),
                        task_status=task_status,
                    )
            finally:
                stopped.set()

        self.address = await self._nursery.start(run)
        # Restart on the same port.
        self.listen = str(self.address)
        return self.address

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        self._scope = None
        # Until run_master returned: its store lock is released then, so a
        # restart on the same database cannot find it still held.
        await self._stopped.wait()


@pytest.fixture
def master_factory() -> type[RunningMaster]:
    return RunningMaster


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[RunningMaster]:
    async with trio.open_nursery() as nursery:
        running = RunningMaster(nursery, tmp_path / "master.db", "127.0.0.1:0")
        await running.start()
        yield running
        nursery.cancel_scope.cancel()


def store_path(tag: str, name: str = "vm") -> str:
    """A well-formed store path; ``tag`` (one nix base-32 letter) makes it unique."""
    return f"/nix/store/{tag * 32}-{name}"


def make_fleet(spec: dict[str, list[tuple[str, str]]]) -> Fleet:
    """{worker: [(vm id, tag)]} -> a parsed, validated fleet."""
    lines = []
    for worker, vms in spec.items():
        entries = ", ".join(f'{{ id = "{vm}", image = "{store_path(tag)}" }}' for vm, tag in vms)
        lines.append(f"[workers.{worker}]\nvms = [ {entries} ]\n")
    return parse_fleet("\n".join(lines))


@pytest.fixture
def fleet_of() -> Callable[[dict[str, list[tuple[str, str]]]], Fleet]:
    return make_fleet
