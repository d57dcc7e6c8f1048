"""The threads that run VM supervisors' turns: a few, not one per VM.

A VM's supervisor (``procurator.worker.supervisor``) is a loop of *turns*:
read the record, decide, perform one step. Most of a VM's life is a wait
(for a request, its VMM's exit, the sweep, a timed health check or the end
of a backoff), and a wait needs no thread: the supervisor *parks* (its
record says so) and its thread goes back to the pool. Whatever ends the
wait resumes it on a pool thread: a wake (``VmRecord.wake``: a request,
the sweep, the ``ExitWatcher``) or its deadline (``TurnPool.at``). A
caller that waits for the VM's answer anyway (``VmManager.ensure``)
drives the turns on its own thread instead, so a start or a replacement
crosses no thread at all between the caller and the supervisor.

What stays the same as with a thread per VM: one VMM per VM, owned by its
supervisor; one turn of a VM at a time (the record's ``parked`` flag hands
the VM to exactly one thread); a step that blocks (a launch, a hung VMM's
API call, the stop ladder) holds its own thread only. The pool hands work
to an idle thread, else starts one, up to ``cap``; past the cap, when no
pool thread has taken a turn for ``starve_after`` seconds while turns
wait (every thread is stuck, not merely busy with a backlog), the clock
thread starts a thread for *every* waiting turn at once, up to ``limit``
threads (logged). So hung VMMs delay the others' turns by ``starve_after``
once and cost a thread each, as before, and a long backlog of quick turns
(a recovery of 10,000 VMs) runs on ``cap`` threads. What changes: an idle
fleet of 10,000 VMs costs no thread per VM (their memory, their stacks,
their start handshakes), and a turn's failure is still its VM's alone (a
turn catches its own exceptions; the pool logs what escapes and carries on).

Threads: the pool's (``vm-turns``). Idle ones wait in a stack and work goes
to the one idle the shortest time, so under a steady trickle the surplus
at the bottom of the stack does time out: ``spare`` threads stay, the
others end after ``linger`` seconds without work. One clock thread
(``vm-turns-clock``) only moves due deadlines and starved work to the pool.
Lock: ``_lock`` (with each idle thread's condition and the clock's) guards
everything here; a leaf, never held while a turn runs or another lock is
taken.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["TurnPool", "TurnPoolStats"]

log = logging.getLogger(__name__)

Run = Callable[[], object]  # its result is ignored


@dataclass(frozen=True, slots=True)
class TurnPoolStats:
    """What the pool looks like now (``TurnPool.stats``; the worker's
    ``procurator_worker_turn_*`` metrics, docs/METRICS.md)."""

    threads: int  # pool threads alive (the clock thread not counted)
    idle: int  # of them, waiting for work
    waiting: int  # turns due and not taken by a thread yet
    oldest_wait: float  # seconds the first in line has waited (0: none waits)
    stalls: int  # times turns waited for starve_after with no thread taking one


class TurnPool:
    """See the module docstring. Thread-safe."""

    def __init__(
        self,
        *,
        cap: int = 16,
        limit: int = 1024,
        spare: int = 2,
        starve_after: float = 0.25,
        linger: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "vm-turns",
        thread: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        if not 1 <= cap <= limit or spare < 0 or starve_after <= 0 or linger <= 0:
            raise ValueError("TurnPool: 1 <= cap <= limit, spare >= 0, starve_after and linger > 0")
        self.cap = cap
        self.limit = limit
        self.spare = spare
        self.starve_after = starve_after
        self.linger = linger
        self.clock = clock
        self.name = name
        self._thread = thread  # makes the threads (a seam for tests)
        self._lock = threading.Lock()
        self._tick = threading.Condition(self._lock)  # the clock thread waits here
        self._ready: deque[tuple[float, Run]] = deque()  # (due since, run)
        self._timers: list[tuple[float, int, Run]] = []  # heap of (due, seq, run)
        self._seq = itertools.count()
        # Idle threads' conditions, the one idle the shortest time last.
        self._waiting: list[threading.Condition] = []
        # Threads on their way to the queue: started, or handed work while
        # idle, not yet back under the lock. Each takes a turn if one waits.
        self._coming = 0
        self._threads = 0  # pool threads alive (the clock thread not counted)
        # When a pool thread last took a turn or started: the pool is stuck
        # when that is ``starve_after`` ago while turns wait.
        self._progress = -math.inf
        self._closing = False
        self._clock: threading.Thread | None = None
        self._all: set[threading.Thread] = set()
        self.started = 0  # threads started so far (a figure for tests and benches)
        self.stalls = 0  # times every thread was stuck while turns waited

    # -- the API -----------------------------------------------------------------

    def submit(self, run: Run) -> None:
        """Run ``run`` on a pool thread soon. Never raises; ignored once
        closing (``VmManager.close`` waits for every supervisor first)."""
        with self._lock:
            if self._closing:
                return
            self._ready.append((self.clock(), run))
            if len(self._ready) <= self._coming:
                return  # a thread on its way takes it
            if self._waiting:
                self._hand_locked()
            elif self._threads < self.cap:
                if not self._start_locked():
                    self._tick.notify()  # the clock thread tries again
            else:
                self._ensure_clock()
                self._tick.notify()  # it watches for starvation

    def at(self, due: float, run: Run) -> None:
        """Submit ``run`` at ``due`` (the pool's clock). Not cancellable:
        ``run`` must find out itself whether it is still wanted."""
        with self._lock:
            if self._closing:
                return
            earliest = not self._timers or due < self._timers[0][0]
            heapq.heappush(self._timers, (due, next(self._seq), run))
            self._ensure_clock()
            if earliest:
                self._tick.notify()

    def threads(self) -> int:
        """Pool threads alive now (the clock thread not counted)."""
        with self._lock:
            return self._threads

    def stats(self) -> TurnPoolStats:
        """The pool now (for a scrape: one lock, no I/O). Deadlines already
        due count as waiting too: the clock thread has yet to move them (or
        could not be started)."""
        with self._lock:
            now = self.clock()
            overdue = [due for due, _, _ in self._timers if due <= now]
            firsts = [*overdue, self._ready[0][0]] if self._ready else overdue
            return TurnPoolStats(
                threads=self._threads,
                idle=len(self._waiting),
                waiting=len(self._ready) + len(overdue),
                oldest_wait=max(now - min(firsts), 0.0) if firsts else 0.0,
                stalls=self.stalls,
            )

    def close(self) -> None:
        """Drop what has not started, end every thread, wait for them."""
        with self._lock:
            self._closing = True
            self._ready.clear()
            self._timers.clear()
            for waiting in self._waiting:
                waiting.notify()
            self._waiting.clear()
            self._tick.notify_all()
            threads = list(self._all)
            clock = self._clock
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        if clock is not None and clock is not threading.current_thread():
            clock.join()

    # -- threads -----------------------------------------------------------------

    def _hand_locked(self) -> None:
        """Wake the thread idle the shortest time for the next turn."""
        self._waiting.pop().notify()
        self._coming += 1

    def _start_locked(self) -> bool:
        """Start a pool thread; False (logged) when the OS refuses one
        (``RuntimeError``: out of threads or memory). Nothing is lost: the
        work stays queued for a thread that frees up, and the clock thread
        tries again each ``starve_after``. Never raises, so a wake
        (``VmRecord.wake``, from the exit watcher's thread too) never fails."""
        thread = self._thread(target=self._serve, name=self.name, daemon=True)
        self._threads += 1
        self._coming += 1
        self._all.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:
            self._threads -= 1
            self._coming -= 1
            self._all.discard(thread)
            log.warning("cannot start a turn thread (%s); %d serve meanwhile", exc, self._threads)
            self._ensure_clock()
            return False
        self.started += 1
        self._progress = max(self._progress, self.clock())  # a thread fresh for work
        return True

    def _ensure_clock(self) -> None:
        if self._clock is not None:
            return
        clock = self._thread(target=self._keep_time, name=f"{self.name}-clock", daemon=True)
        try:
            clock.start()
        except RuntimeError as exc:
            # Tried again by the next submit or deadline.
            log.error(  # noqa: TRY400 - the OS refused a thread: no trace to show
                "cannot start the turn pool's clock thread (%s): deadlines wait", exc
            )
            return
        self._clock = clock

    def _serve(self) -> None:
        me = threading.current_thread()
        idle = threading.Condition(self._lock)
        lock = self._lock
        lock.acquire()
        self._coming -= 1  # arrived
        try:
            while not self._closing:
                if self._ready:
                    _, run = self._ready.popleft()
                    self._progress = self.clock()
                    lock.release()
                    try:
                        run()
                    except BaseException:  # a turn's own bug: its VM's, not the pool's
                        log.exception("a supervisor's turn failed")
                    finally:
                        lock.acquire()
                    continue
                self._waiting.append(idle)
                idle.wait(self.linger)
                if idle not in self._waiting:
                    if not self._closing:
                        self._coming -= 1  # handed work (``_hand_locked``): arrived
                    continue
                # Not handed anything for ``linger``: the surplus ends.
                self._waiting.remove(idle)
                if not self._ready and self._threads > self.spare:
                    return
        finally:
            self._threads -= 1
            self._all.discard(me)
            lock.release()

    def _keep_time(self) -> None:
        """Move due deadlines to the pool, hand waiting turns to idle
        threads or new ones up to ``cap``; past it, when no pool thread took
        a turn for ``starve_after``, a thread for every waiting turn."""
        tried_at = -math.inf  # the last start past the cap (or refused start)
        warned = False  # this stall was logged
        with self._lock:
            while not self._closing:
                now = self.clock()
                while self._timers and self._timers[0][0] <= now:
                    due, _, run = heapq.heappop(self._timers)
                    self._ready.append((due, run))
                unserved = len(self._ready) - self._coming
                while unserved > 0 and self._waiting:
                    self._hand_locked()
                    unserved -= 1
                while unserved > 0 and self._threads < self.cap and self._start_locked():
                    unserved -= 1
                timeout: float | None = None
                if self._timers:
                    timeout = self._timers[0][0] - now
                if unserved <= 0:
                    warned = False
                else:
                    stalled = now - max(self._progress, tried_at) >= self.starve_after
                    if stalled:
                        tried_at = now
                        more = min(unserved, self.limit - self._threads)
                        if not warned:
                            warned = True
                            self.stalls += 1
                            log.warning(
                                "every turn thread is stuck (none took a turn in %g s) with "
                                "%d turns waiting: %d more threads%s",
                                self.starve_after,
                                unserved,
                                more,
                                f" (at the limit of {self.limit})" if more < unserved else "",
                            )
                        for _ in range(more):
                            if not self._start_locked():
                                break
                    watch = self.starve_after - (now - max(self._progress, tried_at))
                    timeout = watch if timeout is None else min(timeout, watch)
                self._tick.wait(None if timeout is None else max(timeout, 0.001))
