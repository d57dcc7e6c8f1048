"""A VM's health, judged from its guest checks (pure; docs/ROLLOUTS.md).

The worker runs each VM's ``HealthCheck`` (``VmAssignment.health``) against
the guest and reports ``VmStatus.health``; the master decides what to do
with it (a rollout's batches, its deadline, a revert). This module is the
judging and the timing; ``procurator.worker.health`` runs the checks.

Invariants:

- **A result is about one guest.** A VM's *incarnation* is the guest that
  runs: its observed hash, its restart count and its address. Health is
  judged per incarnation: a replaced or restarted guest starts again from
  ``pending`` with no passing streak, and a result of a check started
  against an earlier incarnation (or an earlier check) is dropped.
- **Healthy = passed continuously for ``min_healthy_ms``.** The streak
  starts at the first passing check of the incarnation (or the first after
  a failure); the VM is ``healthy`` once a check passes at least
  ``min_healthy_ms`` after the streak began (0: the first pass).
- **A failed check makes the VM ``unhealthy`` at once**, with a message
  saying what failed (a guest still booting reads as unhealthy until its
  service answers: the master's ``healthy_deadline`` judges how long that
  may last). The next pass starts a new streak (``pending``).
- **Kind ``none``: the guest running is the check**: it passes whenever it
  is made, so such a VM is healthy after running ``min_healthy_ms``.
- No check assigned, or no guest running (any phase but ``running``):
  ``unchecked``.
- **Timing**: checks of a VM are ``interval`` apart (the check's
  ``interval_ms``, else the worker's default); while a streak runs, the
  check that can make it healthy is moved forward to the moment the streak
  reaches ``min_healthy_ms``, so a VM turns healthy on time, not up to an
  interval late.
"""

from __future__ import annotations

from dataclasses import dataclass

from procurator.core.models import Health, HealthCheck, Phase, VmStatus

__all__ = ["HealthState", "Incarnation", "check_interval", "incarnation", "judge", "next_check"]


@dataclass(frozen=True, slots=True)
class Incarnation:
    """The guest a check is about (see the module docstring)."""

    hash: str
    restarts: int
    address: str


def incarnation(status: VmStatus) -> Incarnation | None:
    """The guest of ``status`` that can be checked; None when none runs."""
    if status.phase is not Phase.RUNNING or not status.observed_hash:
        return None
    return Incarnation(status.observed_hash, status.restarts, status.address)


@dataclass(frozen=True, slots=True)
class HealthState:
    """The judgement of one incarnation so far. ``passing_since``: when the
    current streak of passing checks began (the clock of ``judge``'s
    ``now``); None: no streak."""

    health: Health = Health.PENDING
    message: str = ""
    passing_since: float | None = None


def judge(state: HealthState, check: HealthCheck, problem: str | None, now: float) -> HealthState:
    """``state`` after a check made at ``now`` that passed (``problem``
    None) or failed (``problem`` says how)."""
    if problem is not None:
        return HealthState(Health.UNHEALTHY, problem, None)
    since = state.passing_since if state.passing_since is not None else now
    if now - since >= check.min_healthy_ms / 1000:
        return HealthState(Health.HEALTHY, "", since)
    return HealthState(Health.PENDING, "", since)


def check_interval(check: HealthCheck, default: float) -> float:
    """Seconds between two checks of a VM."""
    return check.interval_ms / 1000 if check.interval_ms > 0 else default


def next_check(state: HealthState, check: HealthCheck, now: float, default: float) -> float:
    """When to check next, after the check judged at ``now``."""
    due = now + check_interval(check, default)
    if state.health is Health.PENDING and state.passing_since is not None:
        due = min(due, state.passing_since + check.min_healthy_ms / 1000)
    return max(due, now)
