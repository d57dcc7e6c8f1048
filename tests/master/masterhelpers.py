"""What the master's service tests share: a fake worker ``Node``, a wall
clock the test moves, and a ``MasterService`` on a real SQLite store that a
test can stop and start again on the same database (a master restart)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from procurator.core.models import Assignment
from procurator.master.service import DesiredStateStore, MasterService
from procurator.master.store import FleetStore


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
    what it keeps across a restart is what the store holds."""

    def __init__(
        self, nursery: trio.Nursery, db: Path, clock: WallClock, *, report_grace: float = 300.0
    ) -> None:
        self._nursery = nursery
        self.db = db
        self.clock = clock
        self.report_grace = report_grace
        self.service: MasterService | None = None
        self._scope: trio.CancelScope | None = None
        self._stopped = trio.Event()

    async def start(
        self, wrap: Callable[[FleetStore], DesiredStateStore] | None = None
    ) -> MasterService:
        """Start a master; ``wrap`` puts a store of its own between the
        service and the real one."""
        stopped = self._stopped = trio.Event()

        async def run(task_status: trio.TaskStatus[MasterService]) -> None:
            try:
                with trio.CancelScope() as scope:
                    self._scope = scope
                    async with await FleetStore.open(self.db) as store:
                        service = MasterService(
                            wrap(store) if wrap is not None else store,
                            wall_clock=self.clock,
                            report_grace=self.report_grace,
                        )
                        async with trio.open_nursery() as nursery:
                            await nursery.start(service.run)
                            task_status.started(service)
            finally:
                stopped.set()

        self.service = await self._nursery.start(run)
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
