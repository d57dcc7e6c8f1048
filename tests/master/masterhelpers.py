"""What the master's service tests share: a fake worker ``Node``, a wall
clock the test moves, and a ``MasterService`` on a real SQLite store that a
test can stop and start again on the same database (a master restart),
optionally serving Cap'n Proto on a real socket, and a store that makes the
master die right after a commit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from procurator.core.errors import UnsupportedError
from procurator.core.models import Assignment
from procurator.master.service import MasterService
from procurator.master.store import FleetStore, Store
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import Bridge
from procurator.rpc.master_server import serve_master


class FakeNode:
    """A worker's Node: records pushes; can be made to hang."""

    _ids = iter(range(1, 1_000_000))

    def __init__(self, *, hang: bool = False) -> None:
        self.connection_id = next(self._ids)
        self.pushed: list[Assignment] = []
        self.hang = hang
        self.closed = False

    async def push(self, assignment: Assignment) -> None:
        if self.hang:
            await trio.sleep_forever()
        self.pushed.append(assignment)

    async def push_changes(self, changes: object) -> None:
        # An older worker: the master pushes it whole assignments.
        raise UnsupportedError("Node.pushChanges: not implemented by this fake")

    async def aclose(self) -> None:
        self.closed = True


class WallClock:
    """A wall clock (seconds) that moves only when the test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RestartableService:
    """A ``MasterService`` on ``db`` that can be stopped and started again:
    what it keeps across a restart is what the store holds. With a
    ``bridge`` it also serves Cap'n Proto on ``listen`` (``address`` is
    where; a restart listens there again)."""

    def __init__(
        self,
        nursery: trio.Nursery,
        db: Path,
        clock: WallClock,
        *,
        report_grace: float = 300.0,
        bridge: Bridge | None = None,
        listen: str = "127.0.0.1:0",
    ) -> None:
        self.nursery = nursery
        self.db = db
        self.clock = clock
        self.report_grace = report_grace
        self.bridge = bridge
        self.listen = listen
        self.address: Address | None = None
        self.service: MasterService | None = None
        self.store: Store | None = None  # what the service was given
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(self, wrap: Callable[[Store], Any] | None = None) -> MasterService:
        """Start a master; ``wrap`` puts a store of its own between the
        service and the real one."""
        stopped = self._stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[MasterService]) -> None:
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    async with await FleetStore.open(self.db) as store:
                        self.store = wrap(store) if wrap is not None else store
                        service = MasterService(
                            self.store,
                            wall_clock=self.clock,
                            report_grace=self.report_grace,
                        )
                        async with trio.open_nursery() as nursery:
                            await nursery.start(service.run)
                            if self.bridge is not None:
                                self.address = await nursery.start(
                                    serve_master, self.bridge, service, parse_address(self.listen)
                                )
                                self.listen = str(self.address)
                            task_status.started(service)
            finally:
                stopped.set()

        self.service = await self.nursery.start(run)
        return self.service

    async def stop(self) -> None:
        """Stop the master (as if it died: nothing more is answered)."""
        assert self._scope is not None
        self._scope.cancel()
        self._scope = None
        await self._stopped.wait()

    async def restart(self) -> MasterService:
        await self.stop()
        return await self.start()


class PassThroughStore:
    """A store that passes every call through to ``store``: a test's
    wrapper overrides the calls it watches or bends."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class DiesAfterCommit(PassThroughStore):
    """The master's store, for a master that dies right after its commit:
    the apply is stored, the answer is never sent (the commit never
    returns; the test then stops the master). Everything else passes
    through to the real store."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.committed = trio.Event()

    async def commit(self, **kwargs: Any) -> int:
        await self._store.commit(**kwargs)
        self.committed.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")
