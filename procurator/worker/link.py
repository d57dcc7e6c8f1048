"""The worker's link to the master: register, receive, pull, report.

The worker dials the master (NAT- and firewall-friendly), registers with its
``WorkerInfo`` and a ``Node`` callback through which the master pushes
assignments, pulls its assignment on every (re)connect and on a periodic full
resync (so a lost push is healed), and reports status, metrics and events.

Invariants:

- **The worker never depends on the master being there.** ``run`` reports
  ready at once (``task_status.started()`` does not wait for the first
  registration: a worker restarting during a master outage must go on
  running its VMs) and then reconnects forever with exponential backoff plus
  jitter: the worker's one retry policy (``procurator.core.backoff``), built
  from ``LinkSettings``. ``wait_connected`` is there for whoever needs the master.
- **Assignments are delivered newest-first, serially, latest-wins.** Pushes
  and pulls both feed one slot; an update whose generation is not newer
  than the newest seen is ignored (pushes may arrive late or twice); the
  handler gets one update at a time and, if several arrive meanwhile, one
  that has the effect of all of them. A push is acknowledged as soon as it
  is in the slot, so a slow reconciler never makes the master's push time
  out.
- **After a whole assignment, updates carry what changed**
  (``procurator.core.assignments.AssignmentChanges``): changes whose base is
  the newest generation seen are taken (and composed with an update still
  in the slot); changes to any other generation are not guessed at: the
  link pulls the whole assignment at once instead (so does every
  (re)connect and every resync), and a handler that finds changes do not
  fit what it holds (``on_assignment`` answers False) gets the whole
  assignment the same way.
- **Status is latest-wins and coalesced**: a burst of publications while a
  report is in flight yields one more report, with the latest status;
  after a reconnect the latest status is sent again.
- **A session's first status report is whole; every later one carries
  only what changed** since the status the master acknowledged last on
  that session (``procurator.core.status.StatusOutbox``). A refused change
  report is followed by a whole status at once; a master that does not
  take change reports gets whole ones for the rest of the session.
- **Metrics are dropped, never queued**, when the master is slow or away
  (only the newest unsent set is kept; ``metrics_dropped`` counts the rest).
- **Events are buffered up to a bound**; when it overflows the oldest are
  dropped and counted (``events_dropped``). Sent events leave the buffer only
  once the master acknowledged them (or refused them for good).
- **Status and events share one call in flight.** A status change report
  and the events queued meanwhile cross in one ``report_status_and_events``
  (a burst of starts reports both for the same VMs: half the calls, each a
  hop into the master's event loop). Its status part is answered first: when
  it is refused the events were not looked at, and they go again, alone,
  after the whole status. A master without the combined call (older) gets
  the two calls, one after the other, for the rest of the session. So
  events may wait behind a status report (a whole one too), and one
  ``call_timeout`` bounds both parts of a combined call.
- A call that hangs longer than ``call_timeout`` ends the session: the
  connection is closed and the link reconnects. A metrics report that
  crosses as several calls (a big one, in slices) is bounded call by call,
  not as a whole.
- **Several masters** (masters sharing one database, docs/HA.md): a
  :class:`FailoverDialer` dials them in turn, one per attempt, in the order
  given, starting after the master last tried, so a worker whose master
  died is on the next one after one reconnect pause (jittered, growing only
  while every master fails). The newest generation seen survives the
  switch: the new master is asked for what changed since it.
- **The fence** (``procurator.core.fence``; only with an ``on_fence``
  handler): every answer of a master (a registration, a pull, an
  acknowledged report) is *contact*; while connected the link pulls at
  least every ``heartbeat_interval(fence_after)`` seconds, so a healthy
  link hears from its master four times per fence delay. After
  ``fence_after`` seconds without contact, the link drops the update it
  has not delivered, hands ``on_fence(True, seconds)`` to the handler
  (which pauses its ``reschedule`` VMs) and asks for the whole assignment.
  Until a whole assignment from a master arrives, changes are not taken;
  that assignment is delivered first, then ``on_fence(False, seconds)``:
  the handler never resumes a fenced VM on an assignment older than the
  fence. The fence's timing against the masters' lease is in
  ``procurator.core.fence``: ``fence_after`` + the pause < 2/3 of a lease.

Everything here runs on trio; the ``publish_*`` methods are synchronous and
must be called from the trio thread. The connection itself is a
:class:`MasterDialer` port (``procurator.rpc.clients.CapnpMasterDialer`` in
production, a fake in tests), so this module knows no RPC library.
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import math
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import trio

from procurator.core.assignments import AssignmentChanges, AssignmentUpdate, compose
from procurator.core.backoff import RestartPolicy, RestartState
from procurator.core.defaults import DEFAULT_RESYNC_INTERVAL
from procurator.core.errors import (
    PermanentError,
    ProcuratorError,
    UnavailableError,
    UnsupportedError,
)
from procurator.core.fence import (
    DEFAULT_FENCE_AFTER,
    check_fence_after,
    fence_due,
    heartbeat_interval,
)
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    PreparedImage,
    TransferProgress,
    VmEvent,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges, StatusOutbox
from procurator.logs import log_context

__all__ = [
    "FailoverDialer",
    "LinkSettings",
    "MasterDialer",
    "MasterLink",
    "MasterSession",
    "OnAssignment",
    "OnFence",
    "OnUpdate",
]

logger = logging.getLogger(__name__)

# What a dialer hands every pushed update to (whole, or changes).
OnAssignment = Callable[[AssignmentUpdate], Awaitable[None]]
# What the link delivers updates to, one at a time; it answers False when
# changes do not fit what it holds (the link then fetches the whole).
OnUpdate = Callable[[AssignmentUpdate], Awaitable[bool]]
# What the link tells of the fence: (fenced, seconds without a master).
OnFence = Callable[[bool, float], Awaitable[None]]
_T = TypeVar("_T")


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


class MasterSession(Protocol):
    """One live registration with the master."""

    @property
    def connected(self) -> bool: ...

    async def wait_disconnected(self) -> None:
        """Return once the connection is known to be broken."""
        ...

    async def get_assignment(self, known_generation: int) -> Assignment | None:
        """The current assignment, or None if ``known_generation`` is newest."""
        ...

    async def report_status(self, status: WorkerStatus) -> None: ...

    async def report_status_changes(self, changes: StatusChanges) -> None:
        """What changed since the status last acknowledged on this session."""
        ...

    async def report_metrics(self, samples: Sequence[MetricSample], *, call_timeout: float) -> None:
        """Report every series the worker has now; the report may cross as
        several calls, each failing with ``trio.TooSlowError`` past
        ``call_timeout`` seconds."""
        ...

    async def report_events(self, events: Sequence[VmEvent]) -> None: ...

    async def report_status_and_events(
        self, changes: StatusChanges, events: Sequence[VmEvent]
    ) -> PermanentError | None:
        """``report_status_changes`` then ``report_events`` in one call:
        raises as the first (the events were then not taken;
        ``UnsupportedError``: the master has no such call, it took nothing),
        answers the events' refusal for good, or None."""
        ...

    async def aclose(self) -> None: ...


class MasterDialer(Protocol):
    async def connect(self, info: WorkerInfo, on_push: OnAssignment) -> MasterSession:
        """Connect and register; ``on_push`` gets every pushed assignment.
        Raises ``TemporaryError`` when the master cannot be reached."""
        ...


@dataclass(frozen=True, slots=True)
class LinkSettings:
    resync_interval: float = DEFAULT_RESYNC_INTERVAL  # full pull this often while connected
    call_timeout: float = 10.0  # any single call to the master
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    backoff_multiplier: float = 2.0
    jitter: float = 0.2  # +-20 % of each delay
    max_buffered_events: int = 10_000
    event_batch: int = 1_000
    # Seconds without any master before the fence (procurator.core.fence).
    fence_after: float = DEFAULT_FENCE_AFTER

    def __post_init__(self) -> None:
        check_fence_after(self.fence_after)


class MasterLink:
    """See the module docstring. Start with ``await nursery.start(link.run)``."""

    def __init__(
        self,
        dialer: MasterDialer,
        info: WorkerInfo,
        on_assignment: OnUpdate,
        *,
        settings: LinkSettings | None = None,
        initial_generation: int = 0,
        rng: random.Random | None = None,
        on_fence: OnFence | None = None,
    ) -> None:
        self._dialer = dialer
        self.info = info
        self._on_assignment = on_assignment
        self.settings = settings or LinkSettings()
        s = self.settings
        self._reconnect = RestartPolicy(
            initial_delay=s.backoff_initial,
            multiplier=s.backoff_multiplier,
            max_delay=s.backoff_max,
            jitter=s.jitter,
        )
        self._rng = rng or random.Random()
        # Assignments: newest generation seen, slot for the deliverer.
        self._newest_generation = initial_generation
        self._pending: AssignmentUpdate | None = None
        self._pending_wake = trio.Event()
        # Set when only a whole assignment will do; wakes the resync loop.
        self._need_whole = False
        self._pull_now = trio.Event()
        # Connection state.
        self._connected = trio.Event()
        self._session: MasterSession | None = None
        # Status: the whole, and what the master has not acknowledged yet.
        self._outbox = StatusOutbox(info.worker_id)
        # Wakes the reports' sender: status or events to send.
        self._reports_wake = trio.Event()
        # Metrics: latest unsent set only.
        self._metrics: tuple[MetricSample, ...] | None = None
        self._metrics_wake = trio.Event()
        # Events: bounded buffer of (sequence number, event).
        self._events: collections.deque[tuple[int, VmEvent]] = collections.deque()
        self._event_seq = itertools.count(1)
        # The fence: last contact (trio clock; set in ``run``), whether
        # fenced, and what the deliverer still has to tell the handler.
        self._on_fence = on_fence
        self._last_contact = 0.0
        self._fenced = False
        self._lifted = trio.Event()
        self._fence_to_deliver: float | None = None
        self._lift_to_deliver: float | None = None
        self.fences = 0
        # Counters for the worker's own metrics.
        self.events_dropped = 0
        self.metrics_dropped = 0
        self.connects = 0
        self.assignments_ignored = 0
        self.whole_pulls = 0  # pulls because changes did not fit

    # ------------------------------------------------------------ public

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def newest_generation(self) -> int:
        """The newest generation received from the master (or the initial)."""
        return self._newest_generation

    @property
    def fenced(self) -> bool:
        """Fenced: no master answered for ``fence_after`` seconds, and no
        whole assignment has arrived since."""
        return self._fenced

    async def wait_connected(self) -> None:
        """Return once the link is registered with the master."""
        await self._connected.wait()

    def publish_status(self, status: WorkerStatus) -> None:
        """Report ``status``, whole (latest wins; coalesced; resent on
        reconnect). O(VMs): a handler that knows what changed calls
        ``publish_status_changes``."""
        self._outbox.publish(status)
        self._reports_wake.set()

    def publish_status_changes(self, changes: StatusChanges) -> None:
        """Report what changed in the status since the last publication
        (O(changes); coalesced like ``publish_status``)."""
        self._outbox.publish_changes(changes)
        self._reports_wake.set()

    def publish_prepared(self, prepared: tuple[PreparedImage, ...]) -> None:
        """Report the progress on the images the assignment asks to prepare
        (whole; it goes with the status, see ``StatusOutbox.publish_prepared``)."""
        self._outbox.publish_prepared(prepared)
        self._reports_wake.set()

    def publish_transfers(self, transfers: tuple[TransferProgress, ...]) -> None:
        """Report a move's disk transfers (whole; it goes with the status,
        see ``StatusOutbox.publish_transfers``)."""
        self._outbox.publish_transfers(transfers)
        self._reports_wake.set()

    def publish_metrics(self, samples: Sequence[MetricSample]) -> None:
        """Send ``samples`` when the master can take them; an unsent older
        set is dropped."""
        if self._metrics is not None:
            self.metrics_dropped += 1
        self._metrics = tuple(samples)
        self._metrics_wake.set()

    def publish_events(self, events: Sequence[VmEvent]) -> None:
        """Queue events for the master (bounded; the oldest are dropped)."""
        limit = self.settings.max_buffered_events
        for event in events:
            if len(self._events) >= limit:
                self._events.popleft()
                self.events_dropped += 1
            self._events.append((next(self._event_seq), event))
        if events:
            self._reports_wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ready at once (see the module docstring)."""
        self._last_contact = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._deliver_assignments)
            if self._on_fence is not None:
                nursery.start_soon(self._watch_contact)
            task_status.started()
            await self._connect_forever()

    # ------------------------------------------------------------ assignments

    async def _on_push(self, update: AssignmentUpdate) -> None:
        self._offer(update, "push")

    def _offer(self, update: AssignmentUpdate, source: str) -> None:
        if update.worker_id != self.info.worker_id:
            logger.error(
                "ignoring a %s for worker %r (this is %r)",
                source,
                update.worker_id,
                self.info.worker_id,
            )
            return
        newest = self._newest_generation
        whole = isinstance(update, Assignment)
        # A whole assignment asked for may be of the generation seen already.
        if update.generation < newest or (
            update.generation == newest and not (whole and self._need_whole)
        ):
            self.assignments_ignored += 1
            logger.debug(
                "ignoring %s of generation %d (have %d)", source, update.generation, newest
            )
            return
        if isinstance(update, AssignmentChanges) and (
            update.base_generation != newest or self._need_whole
        ):
            # Changes to an assignment this worker does not hold (a lost
            # update, or one that raced a pull): do not guess, fetch it whole.
            logger.info(
                "%s of generation %d changes generation %d, this worker has %d: "
                "fetching the whole assignment",
                source,
                update.generation,
                update.base_generation,
                newest,
            )
            self._ask_whole()
            return
        with log_context(op_id=update.op_id, generation=update.generation):
            if isinstance(update, Assignment):
                logger.info(
                    "received assignment generation %d (%s, op %s): %d VM(s)",
                    update.generation,
                    source,
                    update.op_id or "-",
                    len(update.vms),
                )
            else:
                logger.info(
                    "received assignment generation %d (%s, op %s): %d VM(s) changed, %d removed",
                    update.generation,
                    source,
                    update.op_id or "-",
                    len(update.upserted),
                    len(update.removed),
                )
        if whole:
            self._need_whole = False
            if self._fenced:
                self._lift_fence()
        self._newest_generation = update.generation
        pending = self._pending
        if pending is not None and isinstance(update, AssignmentChanges):
            update = compose(pending, update)
        self._pending = update
        self._pending_wake.set()

    def _ask_whole(self) -> None:
        if not self._need_whole:
            self.whole_pulls += 1
        self._need_whole = True
        self._pull_now.set()

    async def _deliver_assignments(self) -> None:
        while True:
            await self._pending_wake.wait()
            self._pending_wake = trio.Event()
            # In order: the fence, the whole assignment that ends it, the
            # end of the fence (_fence and _lift_fence keep it so).
            silent, self._fence_to_deliver = self._fence_to_deliver, None
            if silent is not None and self._on_fence is not None:
                await self._on_fence(True, silent)
            update, self._pending = self._pending, None
            taken = update is None or await self._on_assignment(update)
            silent, self._lift_to_deliver = self._lift_to_deliver, None
            if silent is not None and self._on_fence is not None:
                await self._on_fence(False, silent)
            if taken:
                continue
            assert update is not None
            if isinstance(update, AssignmentChanges):
                logger.warning(
                    "assignment changes to generation %d do not fit what this worker "
                    "holds: fetching the whole assignment",
                    update.generation,
                )
                self._ask_whole()
            else:  # a handler's bug: asking again would bring the same
                logger.error("the worker did not take assignment %d", update.generation)

    async def _pull(self, session: MasterSession) -> None:
        # Known generation 0 asks for the whole assignment, whatever it is.
        known = 0 if self._need_whole else self._newest_generation
        with trio.fail_after(self.settings.call_timeout):
            assignment = await session.get_assignment(known)
        self._contact()
        if assignment is not None:
            self._offer(assignment, "pull")

    # ------------------------------------------------------------ the fence

    def _contact(self) -> None:
        """A master answered."""
        self._last_contact = trio.current_time()

    async def _watch_contact(self) -> None:
        fence_after = self.settings.fence_after
        while True:
            if self._fenced:
                await self._lifted.wait()
                continue
            now = trio.current_time()
            if fence_due(self._last_contact, now, fence_after):
                self._fence(now - self._last_contact)
                continue
            # Contact only moves the deadline later: wake and look again.
            await trio.sleep_until(self._last_contact + fence_after)

    def _fence(self, silent: float) -> None:
        logger.warning(
            "no master answered for %.1f s: fencing this worker's reschedule VMs "
            "until a master sends the whole assignment",
            silent,
        )
        self.fences += 1
        self._fenced = True
        self._lifted = trio.Event()
        # What is not delivered yet is older than the fence: the whole
        # assignment a master sends next replaces it.
        self._pending = None
        self._fence_to_deliver = silent
        self._lift_to_deliver = None
        self._ask_whole()
        self._pending_wake.set()

    def _lift_fence(self) -> None:
        silent = trio.current_time() - self._last_contact
        self._fenced = False
        self._lifted.set()
        if self._fence_to_deliver is not None:
            self._fence_to_deliver = None  # never told: nothing to lift
        else:
            self._lift_to_deliver = silent
            self._pending_wake.set()
        logger.info("a master sent the whole assignment: the fence ends after it is taken")

    # ------------------------------------------------------------ connection

    def _backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` failures in a row (jittered)."""
        return self._reconnect.delay(failures, draw=self._rng.random())

    async def _connect_forever(self) -> None:
        retries = RestartState()
        while True:
            try:
                with trio.fail_after(self.settings.call_timeout):
                    session = await self._dialer.connect(self.info, self._on_push)
            except (ProcuratorError, trio.TooSlowError) as exc:
                retries = retries.failed(
                    self._reconnect, trio.current_time(), draw=self._rng.random()
                )
                await self._after_connect_failure(exc, retries)
                continue
            retries = RestartState()
            self._contact()
            self.connects += 1
            try:
                await self._serve(session)
            except* (ProcuratorError, trio.TooSlowError) as group:
                cause = _first_leaf(group)
                reason = str(cause) if isinstance(cause, ProcuratorError) else "a call timed out"
                logger.warning("lost the master: %s; reconnecting", reason)
            finally:
                self._session = None
                if self._connected.is_set():
                    self._connected = trio.Event()
                with trio.CancelScope(shield=True), trio.move_on_after(self.settings.call_timeout):
                    await session.aclose()
            # A session that worked: reconnect soon, but not in a tight loop.
            await trio.sleep(self._backoff(1))

    async def _after_connect_failure(self, exc: Exception, retries: RestartState) -> None:
        failures = retries.failures
        delay = retries.wait(trio.current_time())
        if isinstance(exc, PermanentError):
            # Retrying cannot help until someone changes the master or this
            # worker; keep trying, slowly, rather than give up on the VMs.
            delay = self.settings.backoff_max
            logger.error("the master refused worker %s: %s", self.info.worker_id, exc)
        else:
            log = logger.warning if failures == 1 else logger.debug
            log(
                "cannot reach the master (attempt %d): %s; retrying in %.1fs",
                failures,
                exc if isinstance(exc, ProcuratorError) else "timed out",
                delay,
            )
        await trio.sleep(delay)

    async def _serve(self, session: MasterSession) -> None:
        """Run one session until it breaks (raises) or is cancelled."""
        logger.info("registered with the master as %s", self.info.worker_id)
        self._session = session
        self._connected.set()
        # A new session: the master holds no status of it (it may even have
        # restarted), so the latest status goes whole.
        self._outbox.new_session()
        async with trio.open_nursery() as nursery:
            await self._pull(session)
            nursery.start_soon(self._resync, session)
            nursery.start_soon(self._send_reports, session)
            nursery.start_soon(self._send_metrics, session)
            await session.wait_disconnected()
            raise UnavailableError("the connection to the master broke")

    async def _resync(self, session: MasterSession) -> None:
        """Pull every ``resync_interval`` (with a fence, at least every
        ``heartbeat_interval``), and at once when the whole assignment is
        needed."""
        interval = self.settings.resync_interval
        if self._on_fence is not None:
            interval = min(interval, heartbeat_interval(self.settings.fence_after))
        while True:
            with trio.move_on_after(interval):
                await self._pull_now.wait()
            self._pull_now = trio.Event()
            await self._pull(session)

    async def _call(
        self,
        what: str,
        method: Callable[[_T], Awaitable[None]],
        argument: _T,
        *,
        bounded: bool = True,
    ) -> bool:
        """Make one report; False if the master refused it for good (it is
        then dropped: resending cannot help). Temporary failures raise and
        end the session. ``bounded``: within one ``call_timeout`` (False:
        ``method`` bounds each of its calls itself)."""
        refused = await self._refusal(method, argument, bounded=bounded)
        if refused is not None:
            logger.error("the master refused %s: %s", what, refused)
            return False
        return True

    async def _refusal(
        self, method: Callable[[_T], Awaitable[None]], argument: _T, *, bounded: bool = True
    ) -> PermanentError | None:
        """Make one report; the master's refusal for good, or None."""
        try:
            with trio.fail_after(self.settings.call_timeout if bounded else math.inf):
                await method(argument)
        except PermanentError as exc:
            self._contact()  # a refusal is an answer
            return exc
        self._contact()
        return None

    async def _send_reports(self, session: MasterSession) -> None:
        """Report the status and the events, one call in flight: a status
        change report and the events queued meanwhile go in one call
        (``report_status_and_events``), which in a burst of starts halves
        the calls; a whole status, or either alone, goes by itself."""
        outbox = self._outbox
        send_changes = True  # False once the master said it takes whole status reports only
        together = True  # False once the master said it has no combined call
        while True:
            report = outbox.take(changes=send_changes)
            batch = list(itertools.islice(self._events, self.settings.event_batch))
            if report is None and not batch:
                await self._reports_wake.wait()
                self._reports_wake = trio.Event()
                continue
            if together and batch and isinstance(report, StatusChanges):
                together = await self._send_together(session, report, batch)
                continue
            if report is not None:
                send_changes = await self._send_status(session, report) and send_changes
            if batch:
                await self._send_events(session, batch)

    async def _send_together(
        self, session: MasterSession, changes: StatusChanges, batch: list[tuple[int, VmEvent]]
    ) -> bool:
        """Send ``changes`` (taken from the outbox) and ``batch`` in one
        call; False when the master has no such call (it took nothing: both
        go again, apart)."""
        outbox = self._outbox
        events = [event for _, event in batch]
        events_refused: PermanentError | None = None

        async def both(_: None) -> None:
            nonlocal events_refused
            events_refused = await session.report_status_and_events(changes, events)

        try:
            refused = await self._refusal(both, None)
        except BaseException:
            # It may not have arrived, or its status part was taken and its
            # events failed for now: the session ends either way, and the
            # next one starts whole. The events are kept.
            outbox.undelivered()
            raise
        if isinstance(refused, UnsupportedError):
            logger.info("the master takes status changes and events in separate calls")
            outbox.undelivered()
            return False
        if refused is not None:
            # The master kept the status it had, and did not look at the
            # events: the whole status next, then the events alone.
            logger.warning("the master refused a status change report: %s", refused)
            outbox.refused()
            return True
        outbox.delivered()
        self._drop_sent(batch)
        if events_refused is not None:
            logger.error("the master refused an events report: %s", events_refused)
        return True

    async def _send_status(
        self, session: MasterSession, report: WorkerStatus | StatusChanges
    ) -> bool:
        """Send ``report`` (taken from the outbox); False when the master
        said it takes whole status reports only."""
        outbox = self._outbox
        try:
            if isinstance(report, StatusChanges):
                logger.debug(
                    "reporting status changes: generation %d, %d VM(s) changed",
                    report.observed_generation,
                    len(report.changed),
                )
                refused = await self._refusal(session.report_status_changes, report)
                if refused is not None:
                    # The master kept the status it had: make it whole.
                    outbox.refused()
                    if isinstance(refused, UnsupportedError):
                        logger.info("the master takes whole status reports only")
                        return False  # an older master
                    logger.warning("the master refused a status change report: %s", refused)
                    return True
            elif not await self._call("a status report", session.report_status, report):
                outbox.refused()  # it holds no status of ours
                return True
        except BaseException:
            outbox.undelivered()  # may not have arrived: send again later
            raise
        outbox.delivered()
        return True

    async def _send_metrics(self, session: MasterSession) -> None:
        while True:
            samples, self._metrics = self._metrics, None
            if samples is None:
                await self._metrics_wake.wait()
                self._metrics_wake = trio.Event()
                continue
            report = functools.partial(
                session.report_metrics, call_timeout=self.settings.call_timeout
            )
            await self._call("a metrics report", report, samples, bounded=False)

    async def _send_events(self, session: MasterSession, batch: list[tuple[int, VmEvent]]) -> None:
        await self._call("an events report", session.report_events, [e for _, e in batch])
        self._drop_sent(batch)

    def _drop_sent(self, batch: list[tuple[int, VmEvent]]) -> None:
        """Drop what was sent (or refused), wherever overflow left it."""
        last = batch[-1][0]
        while self._events and self._events[0][0] <= last:
            self._events.popleft()


class FailoverDialer:
    """A ``MasterDialer`` over several masters' dialers (see the module
    docstring): each ``connect`` dials the master after the one dialed
    last, starting with the first; the link's backoff paces the attempts."""

    def __init__(self, dialers: Sequence[MasterDialer]) -> None:
        if not dialers:
            raise ValueError("FailoverDialer needs at least one dialer")
        self._dialers = tuple(dialers)
        self._next = 0
        self._connected: int | None = None

    def _name(self, index: int) -> str:
        return str(getattr(self._dialers[index], "address", f"master {index + 1}"))

    async def connect(self, info: WorkerInfo, on_push: OnAssignment) -> MasterSession:
        index = self._next
        self._next = (index + 1) % len(self._dialers)
        # Its errors name the master (CapnpMasterDialer's do).
        session = await self._dialers[index].connect(info, on_push)
        if self._connected is not None and self._connected != index:
            logger.info(
                "failed over from the master at %s to the one at %s",
                self._name(self._connected),
                self._name(index),
            )
        self._connected = index
        return session
