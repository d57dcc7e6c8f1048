"""The VM supervisor's planner, ``decide``: every transition as a row of a
table — facts in, step out — with no thread, no process and no clock.

The rows follow the table of ``procurator.core.supervision``'s docstring;
the properties at the end check what must hold whatever the facts are.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from procurator.core.backoff import RestartState
from procurator.core.models import Phase, PowerState
from procurator.core.supervision import (
    Adopt,
    Backoff,
    Facts,
    Probe,
    Reap,
    Remove,
    SetPower,
    Settle,
    Start,
    Step,
    StopVmm,
    StopWhy,
    Target,
    Timing,
    VmmFacts,
    VmState,
    Wait,
    decide,
)

NOW = 1000.0
TIMING = Timing(health_interval=15.0, retry_unanswered=5.0, hung_after=2)
RUNNING = Target("h1", PowerState.RUNNING)
PAUSED = Target("h1", PowerState.PAUSED)
STOPPED = Target("h1", PowerState.STOPPED)
CALM = RestartState()
BACKING_OFF = RestartState(failures=2, not_before=NOW + 3.0)


def vmm(**changes: object) -> VmmFacts:
    """A live VMM booted with h1, running, checked a second ago."""
    base = VmmFacts(booted_hash="h1", state=VmState.RUNNING, checked_at=NOW - 1.0)
    return replace(base, **changes)  # type: ignore[arg-type]


def facts(**changes: object) -> Facts:
    """Adopted, wanting h1 running, nothing reported yet."""
    return replace(Facts(adopted=True, target=RUNNING), **changes)  # type: ignore[arg-type]


ROWS: list[tuple[str, Facts, RestartState, Step]] = [
    # -- taking over, removing, waiting for a spec
    ("first of all: adopt", Facts(), CALM, Adopt()),
    ("no spec yet: wait to be woken", facts(target=None), CALM, Wait(None)),
    ("removal asked", facts(removing=True, vmm=vmm()), CALM, Remove()),
    ("removal asked, no VMM", facts(removing=True), CALM, Remove()),
    # -- the VMM exited on its own
    (
        "the wanted VM exited: a failure",
        facts(vmm=vmm(alive=False)),
        CALM,
        Reap(counted=True),
    ),
    (
        "a VMM of another hash exited: no failure",
        facts(vmm=vmm(alive=False, booted_hash="h0")),
        CALM,
        Reap(counted=False),
    ),
    (
        "exited while the target is stopped: no failure",
        facts(target=STOPPED, vmm=vmm(alive=False)),
        CALM,
        Reap(counted=False),
    ),
    (
        "exited while being removed: no failure",
        facts(removing=True, vmm=vmm(alive=False)),
        CALM,
        Reap(counted=False),
    ),
    (
        "exited after the target failed for good: no failure",
        facts(failed=True, vmm=vmm(alive=False)),
        CALM,
        Reap(counted=False),
    ),
    (
        "exited during a hold: reaped at once",
        facts(vmm=vmm(alive=False), hold_until=NOW + 10),
        CALM,
        Reap(counted=True),
    ),
    # -- holds after a failed step
    ("a step failed: hold", facts(hold_until=NOW + 10), CALM, Wait(NOW + 10)),
    ("a removal failed: hold too", facts(removing=True, hold_until=NOW + 10), CALM, Wait(NOW + 10)),
    ("a hold that is over", facts(hold_until=NOW), CALM, Start()),
    # -- failed for good
    (
        "failed, a VMM runs: discard it",
        facts(failed=True, vmm=vmm()),
        CALM,
        StopVmm(StopWhy.DISCARD),
    ),
    ("failed, nothing runs: wait for a new target", facts(failed=True), CALM, Wait(None)),
    # -- another driver's VMM
    ("adopted from another driver", facts(vmm=vmm(foreign=True)), CALM, StopVmm(StopWhy.FOREIGN)),
    (
        "another driver's VMM goes first, even when removing",
        facts(removing=True, vmm=vmm(foreign=True)),
        CALM,
        StopVmm(StopWhy.FOREIGN),
    ),
    # -- stopped
    ("stop what runs", facts(target=STOPPED, vmm=vmm()), CALM, StopVmm(StopWhy.POWER_OFF)),
    ("stopped: report it", facts(target=STOPPED), CALM, Settle(Phase.STOPPED)),
    ("stopped and reported", facts(target=STOPPED, reported=True), CALM, Wait(None)),
    ("stopped ignores the backoff", facts(target=STOPPED), BACKING_OFF, Settle(Phase.STOPPED)),
    # -- another hash
    (
        "replace a VMM of another hash",
        facts(vmm=vmm(booted_hash="h0")),
        CALM,
        StopVmm(StopWhy.REPLACE),
    ),
    (
        "replace a VMM whose hash is unknown",
        facts(vmm=vmm(booted_hash="")),
        CALM,
        StopVmm(StopWhy.REPLACE),
    ),
    # -- starting
    ("nothing runs: start", facts(), CALM, Start()),
    ("start paused too", facts(target=PAUSED), CALM, Start()),
    ("backing off: report it", facts(), BACKING_OFF, Backoff(NOW + 3.0)),
    ("backing off, reported: wait", facts(reported=True), BACKING_OFF, Wait(NOW + 3.0)),
    (
        "backoff over: start",
        facts(reported=True),
        RestartState(failures=2, not_before=NOW),
        Start(),
    ),
    # -- health checks
    ("state unknown: check", facts(vmm=vmm(state=None)), CALM, Probe()),
    ("check due", facts(vmm=vmm(checked_at=NOW - 15.0), reported=True), CALM, Probe()),
    (
        "no answer: check again soon",
        facts(vmm=vmm(unanswered=1, unanswered_at=NOW - 5.0)),
        CALM,
        Probe(),
    ),
    (
        "no answer: not before the retry",
        facts(vmm=vmm(unanswered=1, unanswered_at=NOW - 1.0)),
        CALM,
        Wait(NOW + 4.0),
    ),
    ("hung", facts(vmm=vmm(unanswered=2)), CALM, StopVmm(StopWhy.HUNG)),
    ("nonsense answer", facts(vmm=vmm(broken=True)), CALM, StopVmm(StopWhy.BROKEN)),
    # -- what the VMM says
    (
        "created, never booted",
        facts(vmm=vmm(state=VmState.CREATED)),
        CALM,
        StopVmm(StopWhy.UNFINISHED),
    ),
    ("no VM inside", facts(vmm=vmm(state=VmState.NOT_CREATED)), CALM, StopVmm(StopWhy.UNFINISHED)),
    ("shut down inside", facts(vmm=vmm(state=VmState.SHUTDOWN)), CALM, StopVmm(StopWhy.BROKEN)),
    ("running, should pause", facts(target=PAUSED, vmm=vmm()), CALM, SetPower(PowerState.PAUSED)),
    (
        "paused, should run",
        facts(vmm=vmm(state=VmState.PAUSED)),
        CALM,
        SetPower(PowerState.RUNNING),
    ),
    (
        "the VMM refused the pause: not again before the interval",
        facts(target=PAUSED, vmm=vmm(), power_refused_at=NOW - 10.0),
        CALM,
        Wait(NOW + 5.0),
    ),
    (
        "refused long enough ago: try again",
        facts(target=PAUSED, vmm=vmm(checked_at=NOW - 5.0), power_refused_at=NOW - 15.0),
        CALM,
        SetPower(PowerState.PAUSED),
    ),
    # -- settled
    ("running: report it", facts(vmm=vmm()), CALM, Settle(Phase.RUNNING)),
    (
        "paused: report it",
        facts(target=PAUSED, vmm=vmm(state=VmState.PAUSED)),
        CALM,
        Settle(Phase.PAUSED),
    ),
    (
        "a breakpoint counts as running",
        facts(vmm=vmm(state=VmState.BREAKPOINT)),
        CALM,
        Settle(Phase.RUNNING),
    ),
    (
        "settled and reported: wait for the next check",
        facts(vmm=vmm(), reported=True),
        CALM,
        Wait(NOW + 14.0),
    ),
    (
        "a live VMM ignores an old backoff",
        facts(vmm=vmm(), reported=True),
        BACKING_OFF,
        Wait(NOW + 14.0),
    ),
]


@pytest.mark.parametrize(
    ("facts_", "restart", "step"), [row[1:] for row in ROWS], ids=[row[0] for row in ROWS]
)
def test_decide(facts_: Facts, restart: RestartState, step: Step) -> None:
    assert decide(facts_, restart, NOW, TIMING) == step


def test_every_step_kind_and_stop_reason_has_a_row() -> None:
    kinds = {type(row[3]) for row in ROWS}
    assert kinds == {Adopt, Backoff, Probe, Reap, Remove, SetPower, Settle, Start, StopVmm, Wait}
    assert {row[3].why for row in ROWS if isinstance(row[3], StopVmm)} == set(StopWhy)


def test_only_hung_and_broken_stops_count_as_failures() -> None:
    assert {why for why in StopWhy if why.counted} == {StopWhy.HUNG, StopWhy.BROKEN}


# --------------------------------------------------------------- properties

_states = st.one_of(st.none(), st.sampled_from(VmState))
_times = st.sampled_from([-math.inf, NOW - 20.0, NOW - 5.0, NOW, NOW + 5.0])
_vmms = st.one_of(
    st.none(),
    st.builds(
        VmmFacts,
        booted_hash=st.sampled_from(["h1", "h0", ""]),
        alive=st.booleans(),
        state=_states,
        checked_at=_times,
        unanswered=st.integers(0, 3),
        unanswered_at=_times,
        broken=st.booleans(),
        foreign=st.booleans(),
    ),
)
_facts = st.builds(
    Facts,
    adopted=st.booleans(),
    removing=st.booleans(),
    target=st.one_of(st.none(), st.sampled_from([RUNNING, PAUSED, STOPPED])),
    vmm=_vmms,
    failed=st.booleans(),
    reported=st.booleans(),
    power_refused_at=st.one_of(st.none(), _times),
    hold_until=_times,
)
_restarts = st.builds(
    RestartState, failures=st.integers(0, 6), not_before=st.sampled_from([0.0, NOW, NOW + 3.0])
)


@given(facts_=_facts, restart=_restarts)
def test_the_plan_never_acts_on_a_vmm_it_does_not_have(
    facts_: Facts, restart: RestartState
) -> None:
    """Whatever the facts: steps that need a VMM are only chosen when there
    is one (alive, unless it is to be reaped), a VMM is never started over a
    live one, a dead one is always reaped first, and a wait is never in the
    past."""
    step = decide(facts_, restart, NOW, TIMING)
    vmm_ = facts_.vmm
    if not facts_.adopted:
        assert step == Adopt()
        return
    if vmm_ is not None and not vmm_.alive:
        assert isinstance(step, Reap)
        return
    if isinstance(step, StopVmm | Probe | SetPower):
        assert vmm_ is not None and vmm_.alive
    if isinstance(step, Start):
        assert vmm_ is None and not facts_.removing and not facts_.failed
        assert restart.not_before <= NOW and facts_.hold_until <= NOW
    if isinstance(step, Settle) and step.phase is not Phase.STOPPED:
        assert vmm_ is not None and vmm_.state in (
            VmState.RUNNING,
            VmState.PAUSED,
            VmState.BREAKPOINT,
        )
    if isinstance(step, Wait | Backoff) and getattr(step, "until", None) is not None:
        assert step.until > NOW or (isinstance(step, Wait) and step.until is None)
    if facts_.removing and facts_.hold_until <= NOW and not (vmm_ is not None and vmm_.foreign):
        assert step == Remove()
    if vmm_ is not None and vmm_.foreign and facts_.hold_until <= NOW:
        assert step == StopVmm(StopWhy.FOREIGN)
