"""What a VM's supervisor does next, decided from facts alone: pure.

The worker runs one supervisor per VM (``procurator.worker.supervisor``,
its turns on a few threads: ``procurator.worker.turns``). It is split in
two, as flintlock splits its planner from its actuator: :func:`decide`
here looks at what is known about the VM — what it should be
(``Target``), what its VMM was last seen doing (``VmmFacts``), its restart
history (``procurator.core.backoff.RestartState``) — and names one
:data:`Step`; the supervisor performs that step (the only I/O), records
what it measured as new facts, and asks again. So every transition of a VM
is a line of a table test: no thread, no process, no clock.

The steps, and when ``decide`` picks them (first match wins):

===============================  ==============================================
facts                            step
===============================  ==============================================
not adopted yet                  ``Adopt``: take over what the last owner left
VMM exited on its own            ``Reap`` (``counted``: a failure of the VM we
                                 want, so a restart waits out the backoff)
``hold_until`` in the future     ``Wait`` (a step failed; only time helps)
VMM of another driver            ``StopVmm(FOREIGN)`` (signals only)
removal asked                    ``Remove``: stop ladder, delete the state
no target (no spec known)        ``Wait`` until woken
the target failed for good       ``StopVmm(DISCARD)`` if a VMM runs, else wait
target stopped                   ``StopVmm(POWER_OFF)``, then ``Settle(STOPPED)``
VMM boots another hash           ``StopVmm(REPLACE)``
no VMM                           ``Backoff`` / ``Wait`` until ``not_before``,
                                 then ``Start``
VMM did not answer ``hung_after``  ``StopVmm(HUNG)`` (a failure)
checks in a row
VMM answered nonsense            ``StopVmm(BROKEN)`` (a failure)
unanswered check                 ``Probe`` again after ``retry_unanswered``
state unknown, or check due      ``Probe`` (one health check)
VM created but never booted      ``StopVmm(UNFINISHED)``, then ``Start``
running but should be paused     ``SetPower`` (after ``health_interval`` if the
(or the reverse)                 VMM refused the last one)
Shutdown / any other state       ``StopVmm(BROKEN)``
settled, not reported yet        ``Settle(RUNNING | PAUSED)``
settled and reported             ``Wait`` for the next check
===============================  ==============================================

``reported`` is the supervisor's memory that the situation the facts
describe has been published (a settled phase, a failure, a backoff), so a
settled VM costs one health check per interval and nothing more.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from procurator.core.backoff import RestartState
from procurator.core.models import Phase, PowerState

__all__ = [
    "Adopt",
    "Backoff",
    "Facts",
    "Probe",
    "Reap",
    "Remove",
    "SetPower",
    "Settle",
    "Start",
    "Step",
    "StopVmm",
    "StopWhy",
    "Target",
    "Timing",
    "VmState",
    "VmmFacts",
    "Wait",
    "decide",
]


class VmState(enum.Enum):
    """The VM's state as its VMM reports it (cloud-hypervisor's names)."""

    NOT_CREATED = "NotCreated"
    CREATED = "Created"
    RUNNING = "Running"
    SHUTDOWN = "Shutdown"
    PAUSED = "Paused"
    BREAKPOINT = "BreakPoint"


@dataclass(frozen=True, slots=True)
class Target:
    """What the VM should be: its identity and its power state."""

    hash: str
    power: PowerState


@dataclass(frozen=True, slots=True)
class VmmFacts:
    """What is known about the VM's VMM process.

    ``booted_hash``: the hash it was started with ("" when unknown);
    ``alive``: its process runs (the pidfd has not fired); ``state``: the
    VM's state as last read, None when it must be read (again);
    ``checked_at``: when it was read; ``unanswered``: health checks in a row
    it did not answer, the last at ``unanswered_at``; ``broken``: it
    answered a check with something that makes no sense; ``foreign``: it was
    started by another driver (found at adoption).
    """

    booted_hash: str
    alive: bool = True
    state: VmState | None = None
    checked_at: float = -math.inf
    unanswered: int = 0
    unanswered_at: float = -math.inf
    broken: bool = False
    foreign: bool = False


@dataclass(frozen=True, slots=True)
class Facts:
    """Everything :func:`decide` looks at besides the restart history."""

    adopted: bool = False
    removing: bool = False
    target: Target | None = None
    vmm: VmmFacts | None = None
    failed: bool = False  # the target failed for good (not retried until it changes)
    reported: bool = False  # what the facts describe has been published
    power_refused_at: float | None = None  # the VMM refused the last pause/resume
    hold_until: float = -math.inf  # a step failed: nothing before then


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds. ``health_interval``: between a settled VM's checks (the
    manager stretches it for large fleets); ``retry_unanswered``: after a
    check that got no answer; ``hung_after``: unanswered checks in a row
    that make a VMM hung."""

    health_interval: float
    retry_unanswered: float
    hung_after: int


class StopWhy(enum.Enum):
    """Why the VMM is stopped; whether that counts as a failure of the VM."""

    REPLACE = "replace"  # it runs another hash
    POWER_OFF = "power off"  # the target is stopped
    UNFINISHED = "unfinished"  # a start nobody finished (VM not booted)
    DISCARD = "discard"  # the target failed for good
    FOREIGN = "foreign"  # started by another driver: signals only
    HUNG = "hung"  # health checks went unanswered
    BROKEN = "broken"  # the VM is in a state it should not be in

    @property
    def counted(self) -> bool:
        return self in (StopWhy.HUNG, StopWhy.BROKEN)


@dataclass(frozen=True, slots=True)
class Adopt:
    """Take over what a previous owner left: re-adopt a live VMM, clean up
    after a dead one."""


@dataclass(frozen=True, slots=True)
class Reap:
    """The VMM exited on its own: forget it. ``counted``: it ran the VM we
    want, so this is a failure and the restart waits out the backoff."""

    counted: bool


@dataclass(frozen=True, slots=True)
class Remove:
    """Stop the VMM (stop ladder) and delete the VM's state."""


@dataclass(frozen=True, slots=True)
class StopVmm:
    """Run the stop ladder (``why`` says why, and whether it is a failure)."""

    why: StopWhy


@dataclass(frozen=True, slots=True)
class Start:
    """Launch a VMM for the target."""


@dataclass(frozen=True, slots=True)
class Probe:
    """One health check: read the VM's state (and counters when due)."""


@dataclass(frozen=True, slots=True)
class SetPower:
    """Pause or resume the VM inside its VMM."""

    power: PowerState


@dataclass(frozen=True, slots=True)
class Settle:
    """Report the VM settled in ``phase`` to whoever waits for the target."""

    phase: Phase


@dataclass(frozen=True, slots=True)
class Backoff:
    """Report that the VM waits out its restart backoff, until ``until``."""

    until: float


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to do until ``until`` (None: until woken: a new target, a
    removal, the VMM's exit)."""

    until: float | None


Step = Adopt | Reap | Remove | StopVmm | Start | Probe | SetPower | Settle | Backoff | Wait


def decide(facts: Facts, restart: RestartState, now: float, timing: Timing) -> Step:
    """The next step for one VM (see the module docstring's table)."""
    if not facts.adopted:
        return Adopt()
    vmm, target = facts.vmm, facts.target
    if vmm is not None and not vmm.alive:
        wanted = (
            target is not None
            and vmm.booted_hash == target.hash
            and target.power is not PowerState.STOPPED
        )
        return Reap(counted=wanted and not facts.removing and not facts.failed)
    if facts.hold_until > now:
        return Wait(facts.hold_until)
    if vmm is not None and vmm.foreign:
        return StopVmm(StopWhy.FOREIGN)  # whatever is wanted: this driver cannot drive it
    if facts.removing:
        return Remove()
    if target is None:
        return Wait(None)
    if facts.failed:
        return StopVmm(StopWhy.DISCARD) if vmm is not None else Wait(None)
    if target.power is PowerState.STOPPED:
        if vmm is not None:
            return StopVmm(StopWhy.POWER_OFF)
        return Wait(None) if facts.reported else Settle(Phase.STOPPED)
    if vmm is not None and vmm.booted_hash != target.hash:
        return StopVmm(StopWhy.REPLACE)
    if vmm is None:
        if restart.not_before > now:
            return Wait(restart.not_before) if facts.reported else Backoff(restart.not_before)
        return Start()
    return _decide_live(facts, vmm, target, now, timing)


def _decide_live(facts: Facts, vmm: VmmFacts, target: Target, now: float, timing: Timing) -> Step:
    """A live VMM that was booted with the target's hash."""
    if vmm.unanswered >= timing.hung_after:
        return StopVmm(StopWhy.HUNG)
    if vmm.broken:
        return StopVmm(StopWhy.BROKEN)
    if vmm.unanswered:
        retry_at = vmm.unanswered_at + timing.retry_unanswered
        return Probe() if now >= retry_at else Wait(retry_at)
    next_check = vmm.checked_at + timing.health_interval
    if vmm.state is None or now >= next_check:
        return Probe()
    state = vmm.state
    if state in (VmState.NOT_CREATED, VmState.CREATED):
        return StopVmm(StopWhy.UNFINISHED)
    want = VmState.PAUSED if target.power is PowerState.PAUSED else VmState.RUNNING
    if state in (VmState.RUNNING, VmState.PAUSED) and state is not want:
        refused = facts.power_refused_at
        if refused is not None and now < refused + timing.health_interval:
            return Wait(min(refused + timing.health_interval, next_check))
        return SetPower(target.power)
    if state not in (want, VmState.BREAKPOINT):
        return StopVmm(StopWhy.BROKEN)
    if not facts.reported:
        return Settle(Phase.PAUSED if state is VmState.PAUSED else Phase.RUNNING)
    return Wait(next_check)
