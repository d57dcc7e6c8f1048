"""Judging a guest's health from its checks (procurator.core.health)."""

from __future__ import annotations

import pytest

from procurator.core.health import (
    HealthState,
    Incarnation,
    incarnation,
    judge,
    next_check,
)
from procurator.core.models import Health, HealthCheck, HealthKind, Phase, VmStatus

CHECK = HealthCheck(HealthKind.TCP, 22, min_healthy_ms=10_000, interval_ms=2_000)


@pytest.mark.parametrize(
    ("state", "problem", "now", "judged"),
    [
        # The first pass starts the streak; healthy once it is min_healthy_ms long.
        (HealthState(), None, 5.0, HealthState(Health.PENDING, "", 5.0)),
        (HealthState(Health.PENDING, "", 5.0), None, 14.9, HealthState(Health.PENDING, "", 5.0)),
        (HealthState(Health.PENDING, "", 5.0), None, 15.0, HealthState(Health.HEALTHY, "", 5.0)),
        (HealthState(Health.HEALTHY, "", 5.0), None, 99.0, HealthState(Health.HEALTHY, "", 5.0)),
        # A failure breaks the streak at once, whatever came before.
        (HealthState(), "refused", 1.0, HealthState(Health.UNHEALTHY, "refused")),
        (HealthState(Health.HEALTHY, "", 5.0), "x", 20.0, HealthState(Health.UNHEALTHY, "x")),
        # ... and the next pass starts a new one.
        (HealthState(Health.UNHEALTHY, "x"), None, 21.0, HealthState(Health.PENDING, "", 21.0)),
    ],
)
def test_judge(state: HealthState, problem: str | None, now: float, judged: HealthState) -> None:
    assert judge(state, CHECK, problem, now) == judged


def test_no_minimum_is_healthy_at_the_first_pass() -> None:
    check = HealthCheck(HealthKind.NONE, min_healthy_ms=0)
    assert judge(HealthState(), check, None, 3.0).health is Health.HEALTHY


def test_the_check_that_can_make_a_streak_healthy_comes_on_time() -> None:
    streak = HealthState(Health.PENDING, "", 5.0)
    assert next_check(streak, CHECK, 6.0, 1.0) == 8.0  # the VM's own interval
    assert next_check(streak, CHECK, 14.0, 1.0) == 15.0  # not 16: the streak is due
    assert next_check(HealthState(Health.UNHEALTHY, "x"), CHECK, 14.0, 1.0) == 16.0
    no_interval = HealthCheck(HealthKind.TCP, 22, min_healthy_ms=60_000)
    assert next_check(HealthState(Health.HEALTHY, "", 0.0), no_interval, 70.0, 3.0) == 73.0


def test_only_a_running_guest_is_checked_and_each_boot_is_another() -> None:
    running = VmStatus("web", Phase.RUNNING, "h1", restarts=2, address="10.0.0.2")
    assert incarnation(running) == Incarnation("h1", 2, "10.0.0.2")
    for phase in (Phase.STARTING, Phase.PAUSED, Phase.CRASH_LOOP, Phase.PENDING):
        assert incarnation(VmStatus("web", phase, "h1", address="10.0.0.2")) is None
    assert incarnation(VmStatus("web", Phase.RUNNING)) is None  # nothing observed
