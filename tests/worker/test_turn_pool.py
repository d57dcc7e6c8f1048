"""TurnPool: the few threads that run parked supervisors' turns
(procurator.worker.turns): work runs on an idle thread or a new one up to
the cap; past it, once no thread took a turn for ``starve_after`` (all
stuck), every waiting turn gets a thread of its own, while a backlog of
quick turns stays on the cap's threads; deadlines run in order; idle
threads beyond the spare ones end, under a steady trickle too; a failing
turn does not take its thread down; a refused thread start loses nothing.
No test here asserts a duration: each waits (with a hang guard) for what
must happen, and the pool's ``starve_after`` is long where a count of
threads is asserted."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from procurator.worker.turns import TurnPool, TurnPoolStats

WAIT = 30.0  # a hang guard, never the expected time


@pytest.fixture
def pool() -> Iterator[TurnPool]:
    made = TurnPool(cap=1, spare=1, starve_after=0.05, linger=0.2)
    yield made
    made.close()


def _busy(pool: TurnPool, n: int) -> threading.Event:
    """``n`` turns blocked on the pool's threads (all started); set the
    event returned to let them end."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def blocked() -> None:
        started.release()
        release.wait(WAIT)

    for _ in range(n):
        pool.submit(blocked)
    for _ in range(n):
        assert started.acquire(timeout=WAIT)
    return release


def test_a_turn_runs_on_a_pool_thread(pool: TurnPool) -> None:
    ran = threading.Event()
    where: list[str] = []

    def turn() -> None:
        where.append(threading.current_thread().name)
        ran.set()

    pool.submit(turn)
    assert ran.wait(WAIT)
    assert where == ["vm-turns"]


def test_a_blocked_turn_does_not_hold_up_the_next_past_the_cap(pool: TurnPool) -> None:
    release, second = threading.Event(), threading.Event()
    pool.submit(lambda: release.wait(WAIT))
    try:
        pool.submit(second.set)
        assert second.wait(WAIT), "the second turn waited for the blocked one"
        assert not release.is_set()
        assert pool.started == 2  # the cap's one and one past it, for the starved turn
    finally:
        release.set()


def test_every_turn_waiting_behind_stuck_ones_gets_a_thread_at_once() -> None:
    """Twenty stuck turns (hung VMMs) on a pool of four, and a healthy
    turn behind them: once no thread took a turn for ``starve_after`` (one
    step of the pool's clock, which moves only when the test moves it),
    every waiting turn gets its own thread at once, the healthy one too;
    not one thread per ``starve_after``, which would leave the healthy
    turn waiting for sixteen more steps."""
    now = [0.0]
    pool = TurnPool(cap=4, starve_after=1.0, linger=10.0, clock=lambda: now[0])
    release, healthy = threading.Event(), threading.Event()
    try:
        for _ in range(20):
            pool.submit(lambda: release.wait(WAIT))
        pool.submit(healthy.set)
        assert not healthy.wait(0.2), "the healthy turn ran before any thread was free"
        now[0] = 1.0  # no turn taken for starve_after
        assert healthy.wait(WAIT), "the healthy turn waited behind the stuck ones"
        assert not release.is_set() and pool.started == 21
    finally:
        release.set()
        pool.close()


def _refusing(refused: Callable[[str], bool]) -> Callable[..., threading.Thread]:
    """The pool's ``thread`` seam: threads whose start the OS refuses (out
    of threads or memory) when ``refused(name)`` says so."""

    def thread(**kwargs: Any) -> threading.Thread:
        made = threading.Thread(**kwargs)
        if refused(kwargs["name"]):

            def refuse() -> None:
                raise RuntimeError("can't start new thread")

            made.start = refuse  # type: ignore[method-assign]
        return made

    return thread


def _until(what: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT
    while not what() and time.monotonic() < deadline:
        time.sleep(0.01)
    return what()


def test_stats_show_the_waiting_turns_and_count_a_stall_once() -> None:
    """What the worker's ``procurator_worker_turn*`` metrics read: turns
    waiting behind stuck ones, how long the first in line has waited (on
    the pool's clock), the threads busy and idle, and one stall counted
    for the one episode in which every waiting turn got a thread."""
    now = [0.0]
    pool = TurnPool(cap=2, starve_after=1.0, linger=10.0, clock=lambda: now[0])
    release = threading.Event()
    stuck = threading.Event()
    try:
        assert pool.stats() == TurnPoolStats(0, 0, 0, 0.0, 0)
        stuck = _busy(pool, 2)  # the cap's threads
        for _ in range(3):
            pool.submit(lambda: release.wait(WAIT))
        now[0] = 0.5  # not stuck yet
        stats = pool.stats()
        assert (stats.threads, stats.idle, stats.waiting, stats.stalls) == (2, 0, 3, 0)
        assert stats.oldest_wait == 0.5
        now[0] = 1.0  # no turn taken for starve_after: a thread each
        assert _until(lambda: pool.stats().waiting == 0)
        stats = pool.stats()
        assert (stats.threads, stats.idle, stats.waiting, stats.oldest_wait) == (5, 0, 0, 0.0)
        assert (stats.stalls, pool.started) == (1, 5)
        stuck.set()
        release.set()
        assert _until(lambda: pool.stats().idle == 5)
        assert pool.stats().stalls == 1
    finally:
        stuck.set()
        release.set()
        pool.close()


def test_a_stall_that_lasts_counts_once() -> None:
    """At its limit the pool cannot add threads: the turn behind the stuck
    ones waits on, through many ``starve_after`` periods, and that is one
    stall, not one per period (the worker logs it once, too)."""
    now = [0.0]
    pool = TurnPool(cap=1, limit=1, starve_after=1.0, linger=10.0, clock=lambda: now[0])
    stuck = threading.Event()
    try:
        stuck = _busy(pool, 1)
        ran = threading.Event()
        pool.submit(ran.set)
        for step in range(1, 6):
            now[0] = float(step)
            pool.submit(lambda: None)  # wakes the clock thread to look again
            assert _until(lambda: pool.stats().stalls >= 1)
            time.sleep(0.02)  # the clock thread's look at this step
        stats = pool.stats()
        assert stats.stalls == 1 and stats.threads == 1 and stats.oldest_wait == 5.0
        stuck.set()
        assert ran.wait(WAIT)
    finally:
        stuck.set()
        pool.close()


def test_stats_count_due_deadlines_the_clock_thread_has_not_moved() -> None:
    """The clock thread could not be started (the OS refused it): deadlines
    that are due wait in the heap, and the stats say so."""

    thread = _refusing(lambda name: name.endswith("-clock"))
    now = [10.0]
    pool = TurnPool(cap=1, starve_after=1.0, linger=10.0, clock=lambda: now[0], thread=thread)
    try:
        pool.at(12.0, lambda: None)
        pool.at(14.0, lambda: None)
        assert pool.stats().waiting == 0  # not due yet
        now[0] = 15.0
        stats = pool.stats()
        assert (stats.waiting, stats.oldest_wait) == (2, 3.0)
    finally:
        pool.close()


def test_a_backlog_of_quick_turns_stays_on_the_caps_threads() -> None:
    """300 turns on one thread, each a tenth of ``starve_after`` long on
    the pool's clock (which only the turns move): the backlog lasts thirty
    times ``starve_after``, but a turn is taken every tenth of it: nothing
    is stuck, no thread is added, however slow the machine. (Each also
    takes 5 ms of real time, so that the clock thread, which sleeps a real
    ``starve_after`` at first, looks at the backlog while it lasts.)"""
    now = [0.0]
    pool = TurnPool(cap=1, starve_after=1.0, linger=10.0, clock=lambda: now[0])
    done = threading.Semaphore(0)

    def quick() -> None:
        time.sleep(0.005)
        now[0] += 0.1
        done.release()

    try:
        for _ in range(300):
            pool.submit(quick)
        for _ in range(300):
            assert done.acquire(timeout=WAIT)
        assert pool.started == 1
    finally:
        pool.close()


def test_deadlines_run_in_order_and_not_before_they_are_due(pool: TurnPool) -> None:
    order: list[str] = []
    done = threading.Event()
    now = pool.clock()

    def late() -> None:
        order.append("late")
        done.set()

    pool.at(now + 0.3, late)
    pool.at(now + 0.1, lambda: order.append(f"early {pool.clock() >= now + 0.1}"))
    assert done.wait(WAIT)
    assert order == ["early True", "late"]


def test_surplus_threads_end_under_a_steady_trickle() -> None:
    """Eight threads, then one quick turn every 20 ms: work goes to the
    thread idle the shortest time, so the others time out and end while
    the trickle goes on (handed round in turn, none would)."""
    pool = TurnPool(cap=8, spare=1, starve_after=30.0, linger=0.3)
    try:
        _busy(pool, 8).set()
        deadline = time.monotonic() + WAIT
        while pool.threads() > 2:
            assert time.monotonic() < deadline, f"{pool.threads()} threads stayed"
            pool.submit(lambda: None)
            time.sleep(0.02)
    finally:
        pool.close()


def test_idle_threads_beyond_the_spare_ones_end() -> None:
    pool = TurnPool(cap=4, spare=1, starve_after=0.05, linger=0.1)
    try:
        release = _busy(pool, 3)
        assert pool.threads() == 3
        release.set()
        deadline = time.monotonic() + WAIT
        while pool.threads() > 1:
            assert time.monotonic() < deadline, f"{pool.threads()} threads stayed"
            time.sleep(0.02)
    finally:
        pool.close()


def test_a_failing_turn_leaves_its_thread_serving(caplog: pytest.LogCaptureFixture) -> None:
    pool = TurnPool(cap=1, spare=1, starve_after=30.0, linger=10.0)
    where: list[int] = []

    def failing() -> None:
        where.append(threading.get_ident())
        raise RuntimeError("a bug in one VM's turn")

    ran = threading.Event()

    def second() -> None:
        where.append(threading.get_ident())
        ran.set()

    try:
        pool.submit(failing)
        pool.submit(second)
        assert ran.wait(WAIT)
        assert len(where) == 2 and where[0] == where[1], "the failure ended its thread"
        assert "a supervisor's turn failed" in caplog.text
    finally:
        pool.close()


def test_close_ends_every_thread_and_drops_later_work() -> None:
    pool = TurnPool(cap=2, spare=2, starve_after=0.05, linger=10.0)
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(WAIT)
    pool.at(pool.clock() + 3600, ran.set)
    pool.close()
    assert pool.threads() == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("vm-turns")]
    ran.clear()
    pool.submit(ran.set)
    assert not ran.wait(0.1)


def test_a_refused_thread_start_loses_no_work(caplog: pytest.LogCaptureFixture) -> None:
    """The OS refuses the first two pool threads (out of threads or
    memory): ``submit`` does not raise (a wake from the exit watcher's
    thread must not fail), and the work runs once a thread starts."""
    refusals = [True, True]

    def refused(name: str) -> bool:
        return name == "vm-turns" and bool(refusals) and refusals.pop()

    pool = TurnPool(cap=2, spare=1, starve_after=0.05, linger=10.0, thread=_refusing(refused))
    try:
        ran = threading.Event()
        pool.submit(ran.set)
        assert ran.wait(WAIT), "the work was lost with the refused thread"
        assert not refusals and pool.started == 1
        assert "cannot start a turn thread" in caplog.text
    finally:
        pool.close()
