"""A master served in the test's own process, on a real loopback socket: the
RPC server over a backend of the test's choosing, or over a real
``MasterService`` on a real SQLite store."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import trio

from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import Bridge
from procurator.rpc.master_server import MasterBackend, serve_master


@contextlib.asynccontextmanager
async def served(bridge: Bridge, backend: MasterBackend, **options: Any) -> AsyncIterator[Address]:
    """``serve_master(bridge, backend, ..., **options)`` on a free port."""
    async with trio.open_nursery() as nursery:
        address = await nursery.start(
            functools.partial(serve_master, **options),
            bridge,
            backend,
            parse_address("127.0.0.1:0"),
        )
        yield address
        nursery.cancel_scope.cancel()


@contextlib.asynccontextmanager
async def served_service(
    tmp_path: Path, bridge: Bridge, **options: Any
) -> AsyncIterator[tuple[MasterService, Address]]:
    """A ``MasterService`` on ``tmp_path/m.db``, served as by :func:`served`."""
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store)
        await nursery.start(service.run)
        async with served(bridge, service, **options) as address:
            yield service, address
        nursery.cancel_scope.cancel()


def schema_without(tmp_path: Path, member: str) -> Path:
    """The project's schema as an older peer had it: without the interface
    member that starts with ``member`` (e.g. ``"pushChanges @1"``), written
    under ``tmp_path``."""
    text = (Path(__file__).resolve().parents[2] / "schema" / "procurator.capnp").read_text()
    start = text.index(f"  {member}")
    end = text.index("}", start)
    older = tmp_path / "procurator.capnp"
    older.write_text(text[:start] + text[end:])
    return older
