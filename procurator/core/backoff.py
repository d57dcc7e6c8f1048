"""Retry timing, pure: the one policy for everything that retries.

Whoever retries something that failed — the VM supervisor restarting a VMM,
the reconciler retrying a step, the worker's link reconnecting to the
master, a driver waiting for a VMM's API to answer — asks the same two
questions: how long to wait before the next attempt, and whether this is a
loop an operator should look at. Both answers depend only on the history of
attempts and failures, so this module holds that history as an immutable
value and takes the current time as an argument: no clock reads, no
sleeping, no I/O. Tests drive it with plain numbers.

Invariants:
- ``RestartState`` is immutable; every transition returns a new value.
- The delay after the n-th consecutive failure is
  ``min(initial_delay * multiplier**(n-1), max_delay)``, spread by
  ``jitter`` (a caller-supplied draw in [0, 1], so the core stays pure) and
  never below what the failure itself asked for (``at_least``).
- A run that lasted at least ``stable_after`` seconds wipes the history: the
  next failure counts as the first one again.
- ``crash_loop`` is true once ``crash_loop_after`` failures happened in a row
  without a stable run in between.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["RestartPolicy", "RestartState"]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """How to retry something that failed (by default: how a supervisor
    restarts a process that ended unexpectedly).

    Times are seconds. The defaults follow common practice for long-lived
    services: 1 s doubling up to 5 min, forgiven after 10 min of stable run.
    """

    initial_delay: float = 1.0
    multiplier: float = 2.0
    max_delay: float = 300.0
    stable_after: float = 600.0
    crash_loop_after: int = 5
    # Each delay is spread over [1 - jitter, 1 + jitter] of itself, so that
    # many retrying at once (workers reconnecting) do not retry in step.
    jitter: float = 0.0

    def __post_init__(self) -> None:
        if self.initial_delay < 0 or self.max_delay < self.initial_delay:
            raise ValueError(
                f"restart policy needs 0 <= initial_delay <= max_delay, got "
                f"{self.initial_delay} and {self.max_delay}"
            )
        if self.multiplier < 1:
            raise ValueError(f"restart policy multiplier must be >= 1, got {self.multiplier}")
        if self.stable_after < 0:
            raise ValueError(f"restart policy stable_after must be >= 0, got {self.stable_after}")
        if self.crash_loop_after < 1:
            raise ValueError(
                f"restart policy crash_loop_after must be >= 1, got {self.crash_loop_after}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"restart policy jitter must be in [0, 1), got {self.jitter}")

    def delay(self, failures: int, *, draw: float = 0.5) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 1).
        ``draw`` (in [0, 1], e.g. ``random.random()``) places the delay in
        its jitter band; 0.5 is the middle (the delay itself)."""
        if failures <= 0:
            return 0.0
        # Cap the exponent so huge failure counts cannot overflow a float.
        exponent = min(failures - 1, 64)
        delay = min(self.initial_delay * self.multiplier**exponent, self.max_delay)
        return delay * (1 - self.jitter + 2 * self.jitter * draw)


@dataclass(frozen=True, slots=True)
class RestartState:
    """The retry history of one thing (a supervised process, a step, a
    connection).

    ``failures`` counts consecutive failures since the last stable run;
    ``restarts`` counts every restart ever made (shown to operators);
    ``started_at`` is when the current run began (None when not running);
    ``not_before`` is the earliest time the next start may happen.
    """

    failures: int = 0
    restarts: int = 0
    started_at: float | None = None
    not_before: float = 0.0

    def started(self, now: float) -> RestartState:
        """A run began at ``now``."""
        return RestartState(self.failures, self.restarts, now, self.not_before)

    def failed(
        self, policy: RestartPolicy, now: float, *, at_least: float = 0.0, draw: float = 0.5
    ) -> RestartState:
        """The run (or the attempt to start one) ended unexpectedly at ``now``:
        count the failure and schedule the next start, no sooner than
        ``at_least`` seconds from now (what the failure itself asked for, e.g.
        a ``TemporaryError``'s ``delay``). ``draw``: see ``RestartPolicy.delay``."""
        stable = self.started_at is not None and now - self.started_at >= policy.stable_after
        failures = 1 if stable else self.failures + 1
        return RestartState(
            failures=failures,
            restarts=self.restarts,
            started_at=None,
            not_before=now + max(at_least, policy.delay(failures, draw=draw)),
        )

    def restarting(self) -> RestartState:
        """A restart (after a failure) is being made now."""
        return RestartState(self.failures, self.restarts + 1, self.started_at, self.not_before)

    def stopped(self) -> RestartState:
        """The process was stopped on purpose: nothing to wait for."""
        return RestartState(self.failures, self.restarts, None, 0.0)

    def reset(self) -> RestartState:
        """Forget the failure history (the desired spec changed); keep the
        restart count, which operators read as a lifetime figure."""
        return RestartState(0, self.restarts, self.started_at, 0.0)

    def is_stable(self, policy: RestartPolicy, now: float) -> bool:
        return self.started_at is not None and now - self.started_at >= policy.stable_after

    def crash_loop(self, policy: RestartPolicy) -> bool:
        return self.failures >= policy.crash_loop_after

    def wait(self, now: float) -> float:
        """Seconds left before the next start is allowed (0 if it is)."""
        return max(0.0, self.not_before - now)
