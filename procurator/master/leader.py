"""Singleton duties: what only one master may do at a time, under a leader
lease held in the database, fenced.

A duty is a coroutine ``duty(fence)`` that the master runs every
``interval`` seconds while it leads (``Leadership.run_duty``); every write
it makes goes through a store method that takes the ``Fence`` and checks
it inside that write's transaction (``_sql.check_fence``), so a master
that lost the lease — paused past it (SIGSTOP, a VM migration, a long GC),
or cut off from the database — cannot act after another took over: its
write fails with ``FencedError`` and changes nothing. The master's own view
of whether it leads is only an optimisation (it skips duties when it knows
it does not lead); the database decides.

Invariants:

- The lease is one row (``leases``: holder, epoch, expiry) changed with
  conditional UPDATEs on the database's clock, never the masters' clocks:
  taken only when expired (``acquire_lease``: the epoch grows by one),
  renewed only while live and by its holder in the same epoch. So at most
  one holder per epoch, and epochs never repeat.
- The leader renews every ``lease / 3`` seconds; it stops calling itself
  leader when a renewal is refused, or when ``lease`` seconds passed on its
  monotonic clock since the last renewal it saw succeed (the database being
  unreachable), whichever comes first. A follower tries to take the lease
  every ``lease / 3`` seconds, so a dead leader is replaced within about
  ``4/3 lease``.
- A duty that finds itself fenced makes this master a follower at once.
- Stopping releases the lease (expiry set to now), so a restart or a
  rolling upgrade hands over at once rather than after ``lease``.

Later duties (placement and healing, rollouts) use the same mechanism:
another ``run_duty`` and store methods that take a ``Fence``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable

import trio

from procurator.core.errors import ProcuratorError, UnavailableError
from procurator.master.store.model import Fence, FencedError
from procurator.master.store.port import Store

__all__ = ["LEADER_LEASE", "Duty", "Leadership"]

logger = logging.getLogger(__name__)

LEADER_LEASE = "leader"

Duty = Callable[[Fence], Awaitable[None]]


class Leadership:
    """See the module docstring. Start with ``await nursery.start(l.run)``."""

    def __init__(self, store: Store, holder: str, *, lease: float = 15.0) -> None:
        if not lease > 0 or not math.isfinite(lease):
            raise ValueError(f"the leader lease must be a positive number of seconds, not {lease}")
        self._store = store
        self.holder = holder
        self.lease = lease
        self._lease_ms = max(1, round(lease * 1000))
        self._fence: Fence | None = None
        self._renewed_at = 0.0  # trio.current_time() of the last renewal that worked
        self._changed = trio.Event()

    @property
    def fence(self) -> Fence | None:
        """The fence to write under, while this master believes it leads."""
        if self._fence is not None and trio.current_time() - self._renewed_at >= self.lease:
            self._step_down("its lease ran out without a renewal it could see")
        return self._fence

    @property
    def leading(self) -> bool:
        return self.fence is not None

    async def wait_leading(self) -> Fence:
        """Return the fence once this master leads."""
        while (fence := self.fence) is None:
            await self._changed.wait()
        return fence

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _step_down(self, why: str) -> None:
        if self._fence is None:
            return
        logger.warning("no longer the leader (epoch %d): %s", self._fence.epoch, why)
        self._fence = None
        self._notify()

    def fenced(self, fence: Fence, exc: FencedError) -> None:
        """A write under ``fence`` was refused: another master leads."""
        if self._fence == fence:
            self._step_down(str(exc))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._renew_or_acquire()
                await trio.sleep(self.lease / 3)
        finally:
            fence, self._fence = self._fence, None
            if fence is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await self._store.release_lease(fence)
                        logger.info("released the leader lease (epoch %d)", fence.epoch)
                    except ProcuratorError as exc:
                        logger.info("could not release the leader lease: %s", exc)

    async def _renew_or_acquire(self) -> None:
        began = trio.current_time()
        fence = self.fence
        try:
            if fence is not None:
                if await self._store.renew_lease(fence, lease_ms=self._lease_ms):
                    self._renewed_at = began
                else:
                    self._step_down("the database refused to renew the lease (it expired)")
                return
            epoch = await self._store.acquire_lease(
                LEADER_LEASE, self.holder, lease_ms=self._lease_ms
            )
        except UnavailableError as exc:
            logger.debug("leader lease: %s", exc)
            return
        if epoch is not None:
            self._fence = Fence(LEADER_LEASE, self.holder, epoch)
            self._renewed_at = began
            logger.info("this master leads now (epoch %d)", epoch)
            self._notify()

    async def run_duty(self, name: str, interval: float, duty: Duty) -> None:
        """Run ``duty`` every ``interval`` seconds while leading, until
        cancelled. Its failures are logged; a fenced one ends the lead."""
        while True:
            fence = await self.wait_leading()
            try:
                await duty(fence)
            except FencedError as exc:
                logger.warning("%s: %s", name, exc)
                self.fenced(fence, exc)
                continue
            except UnavailableError as exc:
                logger.info("%s: %s", name, exc)
            except ProcuratorError as exc:
                logger.warning("%s failed: %s", name, exc)
            await trio.sleep(interval)
