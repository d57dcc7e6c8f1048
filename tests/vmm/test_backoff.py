"""The pure retry policy (VM restarts, reconcile retries, reconnects), driven
with a fake clock (plain numbers)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procurator.core.backoff import RestartPolicy, RestartState

POLICY = RestartPolicy()  # 1 s doubling to 5 min, reset after 10 min, crash loop at 5


def crash_repeatedly(state: RestartState, times: int, now: float, ran_for: float) -> RestartState:
    for _ in range(times):
        now = max(now, state.not_before)
        state = state.restarting().started(now)
        now += ran_for
        state = state.failed(POLICY, now)
    return state


def test_delay_doubles_from_one_second_up_to_five_minutes() -> None:
    delays = [POLICY.delay(n) for n in range(1, 12)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert POLICY.delay(0) == 0
    assert POLICY.delay(10_000) == 300  # no float overflow


def test_failure_schedules_the_next_start() -> None:
    state = RestartState().started(100.0).failed(POLICY, 105.0)
    assert state.failures == 1
    assert state.not_before == 106.0
    assert state.wait(105.5) == pytest.approx(0.5)
    assert state.wait(200.0) == 0


def test_fast_crashes_grow_the_delay_and_become_a_crash_loop() -> None:
    state = crash_repeatedly(RestartState(), 4, now=0.0, ran_for=1.0)
    assert state.failures == 4
    assert not state.crash_loop(POLICY)
    assert state.wait(state.not_before - 8.0) == 8.0  # 4th failure: 8 s
    state = crash_repeatedly(state, 1, now=state.not_before, ran_for=1.0)
    assert state.crash_loop(POLICY)
    assert state.restarts == 5


def test_a_stable_run_forgives_past_failures() -> None:
    state = crash_repeatedly(RestartState(), 6, now=0.0, ran_for=1.0)
    assert state.crash_loop(POLICY)
    start = state.not_before
    state = state.restarting().started(start)
    assert state.is_stable(POLICY, start + 600.0)
    state = state.failed(POLICY, start + 600.0)
    assert state.failures == 1
    assert not state.crash_loop(POLICY)
    assert state.not_before == start + 601.0
    assert state.restarts == 7  # the lifetime count is kept


def test_reset_and_stop_clear_the_wait() -> None:
    state = crash_repeatedly(RestartState(), 3, now=0.0, ran_for=0.5)
    assert state.reset().wait(0.0) == 0
    assert state.reset().failures == 0
    assert state.stopped().wait(0.0) == 0
    assert state.stopped().started_at is None


def test_jitter_spreads_each_delay_around_itself() -> None:
    policy = RestartPolicy(initial_delay=2.0, max_delay=60.0, jitter=0.25)
    assert policy.delay(3, draw=0.0) == 6.0  # 8 s, 25 % early
    assert policy.delay(3, draw=0.5) == 8.0  # the middle: the delay itself
    assert policy.delay(3, draw=1.0) == 10.0  # 25 % late
    assert POLICY.delay(3, draw=0.0) == POLICY.delay(3) == 4.0  # no jitter: no spread


def test_a_failure_waits_at_least_what_it_asked_for() -> None:
    # A store that says "come back in 30 s" is not asked again after 1 s.
    state = RestartState().failed(POLICY, 100.0, at_least=30.0)
    assert state.not_before == 130.0
    # A longer backoff wins over a shorter request.
    state = crash_repeatedly(RestartState(), 6, now=0.0, ran_for=1.0)
    later = state.failed(POLICY, 1000.0, at_least=1.0)
    assert later.not_before == 1000.0 + POLICY.delay(7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_delay": -1.0},
        {"initial_delay": 10.0, "max_delay": 5.0},
        {"multiplier": 0.5},
        {"stable_after": -1.0},
        {"crash_loop_after": 0},
        {"jitter": 1.0},
        {"jitter": -0.1},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="restart policy"):
        RestartPolicy(**kwargs)  # type: ignore[arg-type]


@given(
    # Whole seconds: exact in floats, so the 600 s boundary is tested exactly.
    runs=st.lists(st.integers(min_value=0, max_value=2000).map(float), min_size=1, max_size=30),
)
def test_delay_is_bounded_and_follows_the_failure_count(runs: list[float]) -> None:
    state, now = RestartState(), 0.0
    for ran_for in runs:
        now = max(now, state.not_before)
        state = state.started(now)
        now += ran_for
        before = state.failures
        state = state.failed(POLICY, now)
        expected = 1 if ran_for >= POLICY.stable_after else before + 1
        assert state.failures == expected
        assert 0 < state.not_before - now <= POLICY.max_delay
        assert state.not_before - now == pytest.approx(POLICY.delay(expected))
