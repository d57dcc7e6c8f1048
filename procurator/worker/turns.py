"""The threads that run VM supervisors' turns: a few, not one per VM.

A VM's supervisor (``procurator.worker.supervisor``) is a loop of *turns*:
read the record, decide, perform one step. Most of a VM's life is a wait
(for a request, its VMM's exit, the sweep, a timed health check or the end
of a backoff), and a wait needs no thread: the supervisor *parks* (its
record says so) and its thread goes back to the pool. Whatever ends the
wait resumes it on a pool thread: a wake (``VmRecord.wake``: a request,
the sweep, the ``ExitWatcher``) or its deadline (``TurnPool.at``). A
caller that waits for the VM's answer anyway (``VmManager.ensure``,
``remove``) drives the turns on its own thread instead, so a start or a
removal crosses no thread at all between the caller and the supervisor.

What stays the same as with a thread per VM: one VMM per VM, owned by
its supervisor; one turn of a VM at a time (the record's ``parked`` flag
hands the VM to exactly one thread); a step that blocks (a launch, a hung
VMM's API call, the stop ladder) holds its thread only, never another
VM's: the pool starts a thread whenever work waits and no thread is idle,
up to ``cap`` at once, and beyond it one more whenever the oldest waiting
turn has waited ``starve_after`` seconds (the clock thread checks), so a
few hung VMMs delay the others by that much at most, once, and many hung
VMMs cost a thread each, as before. What changes: an idle fleet of 10,000
VMs costs no thread per VM (their memory, their stacks, their start
handshakes), and a turn's failure is still its VM's alone (a turn catches
its own exceptions; the pool logs what escapes and carries on).

Threads: the pool's (``vm-turns``; ``spare`` of them stay when idle, the
others end after ``linger`` seconds without work) and one clock thread
(``vm-turns-clock``), which only moves due deadlines and starved work to
the pool. Lock: ``_lock`` (with its two conditions) guards everything here;
a leaf, never held while a turn runs or while another lock is taken.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["TurnPool"]

log = logging.getLogger(__name__)

Run = Callable[[], object]  # its result is ignored


class TurnPool:
    """See the module docstring. Thread-safe."""

    def __init__(
        self,
        *,
        cap: int = 16,
        spare: int = 2,
        starve_after: float = 0.25,
        linger: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "vm-turns",
        thread: Callable[..., threading.Thread] = threading.Thread,
    ) -> None:
        if cap < 1 or spare < 0 or starve_after <= 0 or linger <= 0:
            raise ValueError("TurnPool: cap >= 1, spare >= 0, starve_after and linger > 0")
        self.cap = cap
        self.spare = spare
        self.starve_after = starve_after
        self.linger = linger
        self.clock = clock
        self.name = name
        self._thread = thread  # makes the threads (a seam for tests)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # pool threads wait here
        self._tick = threading.Condition(self._lock)  # the clock thread waits here
        self._ready: deque[tuple[float, Run]] = deque()  # (queued at, run)
        self._timers: list[tuple[float, int, Run]] = []  # heap of (due, seq, run)
        self._seq = itertools.count()
        self._threads = 0
        self._idle = 0
        self._closing = False
        self._clock: threading.Thread | None = None
        self._all: set[threading.Thread] = set()
        self.started = 0  # threads started so far (a figure for tests and benches)

    # -- the API -----------------------------------------------------------------

    def submit(self, run: Run) -> None:
        """Run ``run`` on a pool thread soon. Ignored once closing (the
        closer drives what it still needs itself)."""
        with self._lock:
            if self._closing:
                return
            self._ready.append((self.clock(), run))
            if self._idle >= len(self._ready):
                self._work.notify()
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

    def close(self) -> None:
        """Drop what has not started, end every thread, wait for them."""
        with self._lock:
            self._closing = True
            self._ready.clear()
            self._timers.clear()
            self._work.notify_all()
            self._tick.notify_all()
            threads = list(self._all)
            clock = self._clock
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        if clock is not None and clock is not threading.current_thread():
            clock.join()

    # -- threads -----------------------------------------------------------------

    def _start_locked(self) -> bool:
        """Start a pool thread; False (logged) when the OS refuses one
        (``RuntimeError``: out of threads or memory). Nothing is lost: the
        work stays queued for a thread that frees up, and the clock thread
        tries again each ``starve_after``. Never raises, so a wake
        (``VmRecord.wake``, from the exit watcher's thread too) never fails."""
        thread = self._thread(target=self._serve, name=self.name, daemon=True)
        self._threads += 1
        self._all.add(thread)
        try:
            thread.start()
        except RuntimeError as exc:
            self._threads -= 1
            self._all.discard(thread)
            log.warning("cannot start a turn thread (%s); %d serve meanwhile", exc, self._threads)
            self._ensure_clock()
            return False
        self.started += 1
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
        lock = self._lock
        lock.acquire()
        try:
            while not self._closing:
                if not self._ready:
                    self._idle += 1
                    woken = self._work.wait(self.linger)
                    self._idle -= 1
                    if not woken and not self._ready and self._threads > self.spare:
                        return  # idle long enough, and enough others stay
                    continue
                _, run = self._ready.popleft()
                lock.release()
                try:
                    run()
                except BaseException:  # a turn's own bug: its VM's, not the pool's
                    log.exception("a supervisor's turn failed")
                finally:
                    lock.acquire()
        finally:
            self._threads -= 1
            self._all.discard(me)
            lock.release()

    def _keep_time(self) -> None:
        """Move due deadlines to the pool; past the cap, start one more
        thread each ``starve_after`` while the oldest waiting turn has
        waited that long with no thread idle."""
        extra_at = -float("inf")  # when a thread past the cap was last started
        with self._lock:
            while not self._closing:
                now = self.clock()
                while self._timers and self._timers[0][0] <= now:
                    _, _, run = heapq.heappop(self._timers)
                    self._ready.append((now, run))
                if self._ready and self._idle:
                    self._work.notify(min(self._idle, len(self._ready)))
                unserved = len(self._ready) - self._idle
                while unserved > 0 and self._threads < self.cap and self._start_locked():
                    unserved -= 1
                timeout: float | None = None
                if self._timers:
                    timeout = self._timers[0][0] - now
                if unserved > 0:
                    starved = now - self._ready[0][0] >= self.starve_after
                    if starved and now - extra_at >= self.starve_after:
                        self._start_locked()  # past the cap, or a refused start again
                        extra_at = now
                    watch = self.starve_after - (now - max(self._ready[0][0], extra_at))
                    timeout = watch if timeout is None else min(timeout, watch)
                self._tick.wait(None if timeout is None else max(timeout, 0.001))
