"""Converge desired VMs (an ``Assignment``) with observed ones, by hash.

Two layers:

- ``plan(desired, observed)`` is a pure function: what must happen to each
  VM. A VM whose desired entry matches what runs gets *no* action: it is
  never restarted, replaced or touched beyond observation.
- ``Reconciler`` is level-triggered and incremental: a pass observes the
  actual state of the VMs marked dirty (a new desired entry, an observation
  that changed, a step that ended, a retry that fell due) through the
  ``VmActuator`` port and recomputes their plan and status, so the cost of
  a change does not grow with the fleet; a *full* pass (the first, after a
  whole assignment, and periodically as the safety net) does the same for
  every VM. A pass interrupted by a crash, a lost push or a failed step
  simply continues the next time. It runs each VM's work in its own task,
  at most ``concurrency`` at once, and strictly one at a time per VM; a
  slow or failing VM never blocks the others and the loop never waits for
  a step to finish before reacting to new input. Status is reported as
  what changed (``procurator.core.status.StatusChanges``).

Failures are state, not sleeps: a ``TemporaryError`` records ``not_before``
(the worker's one retry policy, ``procurator.core.backoff``, per VM and
desired entry) and the loop wakes for it; a ``PermanentError``
parks the VM as failed until its desired entry changes (new hash, power or
image) and is reported once as a ``failed`` event naming the reason.
``observed_generation`` is the newest generation every VM of which is
*settled*: running the desired hash in the desired power state, or
failed for good (permanent error, or the VMM keeps crashing: the
VmManager's own restart backoff owns that VM now) as a pass has seen it: an
update taken while a pass observes (the port may await) holds the new
generation back until a pass has looked at the VMs it names (a whole one:
until its full pass).

Every action runs in a logging context (``procurator.logs``) carrying the
VM's id and the op id of the assignment it serves, so the actuator's and the
VmManager's records for that work — in their worker threads too — name the
operation.
"""

from __future__ import annotations

import enum
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from procurator.core.assignments import AssignmentChanges
from procurator.core.backoff import RestartPolicy, RestartState
from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.fence import fenced_entry
from procurator.core.models import (
    Assignment,
    EventKind,
    Phase,
    PowerState,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.logs import log_context

__all__ = [
    "Action",
    "ActionKind",
    "ObservedVm",
    "Reconciler",
    "VmActuator",
    "plan",
]

log = logging.getLogger(__name__)


def _power_phase(power: PowerState) -> Phase:
    """The phase of a VM settled in ``power``. Identity tests, not a dict:
    ``Enum.__hash__`` is Python code, and this runs per VM per pass."""
    if power is PowerState.RUNNING:
        return Phase.RUNNING
    if power is PowerState.PAUSED:
        return Phase.PAUSED
    return Phase.STOPPED


@dataclass(frozen=True, slots=True)
class ObservedVm:
    """What is true of one VM on this worker right now."""

    id: str
    hash: str
    phase: Phase
    power: PowerState
    message: str = ""
    restarts: int = 0
    address: str = ""
    op_id: str = ""  # the operation that last acted on the VM (durable)
    # The power state the VmManager is converging this VM to (None: unknown).
    desired_power: PowerState | None = None


class ActionKind(enum.Enum):
    CREATE = "create"
    REPLACE = "replace"
    SET_POWER = "set-power"
    REMOVE = "remove"


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    vm_id: str
    desired: VmAssignment | None = None


class VmActuator(Protocol):
    """What the reconciler drives. Both steps are idempotent and verify
    their result; they raise ``PermanentError`` or ``TemporaryError``."""

    async def observe(self) -> Mapping[str, ObservedVm]:
        """Every VM this worker has, assigned or not."""
        ...

    async def observe_some(self, vm_ids: Collection[str]) -> Mapping[str, ObservedVm]:
        """Those of ``vm_ids`` this worker has (the others are absent), at
        a cost that grows with ``len(vm_ids)``, not with the fleet."""
        ...

    async def ensure(self, vm: VmAssignment, op_id: str) -> None:
        """Make the VM exactly ``vm``: create it, replace it (hash changed)
        or change its power state."""
        ...

    async def remove(self, vm_id: str, op_id: str) -> None:
        """Stop the VM and release everything it held."""
        ...


def settled(desired: VmAssignment, observed: ObservedVm | None) -> bool:
    """The VM needs nothing more from the reconciler."""
    if observed is None or observed.hash != desired.hash:
        return False
    if observed.phase in (Phase.FAILED, Phase.CRASH_LOOP):
        return observed.desired_power in (None, desired.power)
    return observed.power == desired.power and observed.phase is _power_phase(desired.power)


def plan(desired: Mapping[str, VmAssignment], observed: Mapping[str, ObservedVm]) -> list[Action]:
    """The actions that take ``observed`` to ``desired``; empty at the
    fixed point. Pure and O(n)."""
    actions: list[Action] = []
    for vm_id, want in desired.items():
        action = _plan_one(vm_id, want, observed.get(vm_id))
        if action is not None:
            actions.append(action)
    for vm_id in observed:
        if vm_id not in desired:
            actions.append(Action(ActionKind.REMOVE, vm_id))
    return actions


@dataclass(slots=True)
class _Failure:
    """Why the last step for a VM failed, for which desired entry."""

    key: tuple[str, PowerState, str] | None  # desired entry it failed for; None: removal
    message: str
    permanent: bool
    backoff: RestartState  # the retries of this entry (procurator.core.backoff)

    @property
    def not_before(self) -> float:
        return self.backoff.not_before


@dataclass(frozen=True, slots=True)
class _StatusMemo:
    """One reported VM's status as computed from these very inputs."""

    want: VmAssignment | None  # None: observed, not desired
    have: ObservedVm | None
    failure: _Failure | None
    op_id: str | None  # the assignment's op id the status names; None: the VM's own
    ok: bool  # settled, or failed for good (never for a surplus VM)
    status: VmStatus


def _key(vm: VmAssignment | None) -> tuple[str, PowerState, str] | None:
    return None if vm is None else (vm.hash, vm.power, vm.nix_store_path)


def _plan_one(vm_id: str, want: VmAssignment | None, have: ObservedVm | None) -> Action | None:
    """``plan`` for one VM."""
    if want is None:
        return Action(ActionKind.REMOVE, vm_id) if have is not None else None
    if have is None:
        return Action(ActionKind.CREATE, vm_id, want)
    if have.hash != want.hash:
        return Action(ActionKind.REPLACE, vm_id, want)
    if have.phase in (Phase.FAILED, Phase.CRASH_LOOP):
        # The VmManager owns a crashing VM's restarts; a failed one waits
        # for a new desired entry. Neither is acted on again here, unless
        # the desired power changed (e.g. stop a crash-looping VM).
        if have.desired_power not in (None, want.power):
            return Action(ActionKind.SET_POWER, vm_id, want)
        return None
    if have.power != want.power or have.phase is not _power_phase(want.power):
        if have.phase in (Phase.STARTING, Phase.STOPPING, Phase.REALISING):
            return None  # in transition; observe again later
        return Action(ActionKind.SET_POWER, vm_id, want)
    return None


@dataclass
class Reconciler:
    """Level-triggered reconcile loop for one worker, incremental.

    Inputs: ``set_assignment`` (a whole assignment: a pull, a reconnect),
    ``apply_changes`` (an update of the assignment it holds), ``mark_dirty``
    (something about one VM changed: its VMM, a step of the actuator) and
    ``poke``. Each pass handles exactly the VMs marked dirty since the last
    one (and those whose retry is due): it observes only them
    (``VmActuator.observe_some``), plans them, recomputes their status and
    reports what changed (``on_status``, a ``StatusChanges``), so a
    one-VM change costs the same on a host of ten VMs and of ten thousand.
    A *full* pass observes, plans and recomputes everything: the first
    pass, after a whole assignment, and every ``full_pass_interval``
    seconds as the safety net for a change nobody marked (the invariant
    the incremental passes rely on: whatever can change what ``plan`` or
    the status of a VM says marks that VM dirty — a new desired entry, an
    observation the VmManager or the actuator publishes, a step that ends,
    a retry that falls due; a full pass finds nothing to do after
    incremental ones, ``tests/core/test_reconcile.py`` checks it on random
    sequences).

    Everything here runs on the trio thread; ``mark_dirty`` and ``poke``
    must be called from it (the worker hands its threads' changes over with
    the trio token).
    """

    actuator: VmActuator
    on_status: Callable[[StatusChanges], None]
    worker_id: str
    concurrency: int = 8
    # Delay before retrying a step that failed temporarily, by attempt.
    retry: RestartPolicy = field(default_factory=RestartPolicy)
    # Seconds between full passes (the safety net; math.inf: never).
    full_pass_interval: float = 30.0
    on_pass: Callable[[float, int], None] | None = None  # (seconds, actions started)
    on_failure: Callable[[str], None] | None = None  # kind: permanent, temporary, internal
    on_event: Callable[[VmEvent], None] | None = None  # failed for good (once per entry)
    wall_clock: Callable[[], float] = time.time  # event timestamps only

    # The assignment held: generation and op id, and its VMs by id (changed
    # in place by updates; None: no assignment yet).
    _generation: int = field(default=0, init=False)
    _op_id: str = field(default="", init=False)
    _desired: dict[str, VmAssignment] | None = field(default=None, init=False)
    _wake: trio.Event = field(default_factory=trio.Event, init=False)
    _busy: set[str] = field(default_factory=set, init=False)
    _failures: dict[str, _Failure] = field(default_factory=dict, init=False)
    # The last observation of every VM the actuator has (as of the pass
    # that last observed it).
    _observed: dict[str, ObservedVm] = field(default_factory=dict, init=False)
    # Every reported VM's status (desired, or observed and not desired), and
    # the ids of those that hold observed_generation back (not settled, not
    # failed for good, busy, surplus, or named by changes no pass has
    # looked at yet).
    _statuses: dict[str, _StatusMemo] = field(default_factory=dict, init=False)
    _unsettled: set[str] = field(default_factory=set, init=False)
    # Ids whose status names the assignment's op id (not the VM's own).
    _op_bound: set[str] = field(default_factory=set, init=False)
    _dirty: set[str] = field(default_factory=set, init=False)
    _full: bool = field(default=True, init=False)
    _next_full: float = field(default=-math.inf, init=False)
    _reported_generation: int | None = field(default=None, init=False)
    _observed_generation: int = field(default=0, init=False)
    _passes: int = field(default=0, init=False)
    # While fenced (procurator.core.fence): the entries the fence replaced,
    # by id (their fenced copies are in ``_desired``); None: not fenced.
    _unfenced: dict[str, VmAssignment] | None = field(default=None, init=False)

    # -- inputs ----------------------------------------------------------

    def set_assignment(self, assignment: Assignment) -> bool:
        """Take a whole assignment, newer than the one held (pushes and
        pulls can race: older or equal generations are ignored); the next
        pass is a full one. Returns whether it was taken."""
        if self._desired is not None and assignment.generation <= self._generation:
            return False
        self._desired = {vm.id: vm for vm in assignment.vms}
        if self._unfenced is not None:
            # Fenced still: a newer whole assignment is fenced the same way
            # until ``unfence`` (the master has not answered yet).
            self._unfenced = {}
            self._fence_entries()
        self._generation = assignment.generation
        self._op_id = assignment.op_id
        self.request_full_pass()
        return True

    def apply_changes(self, changes: AssignmentChanges) -> bool:
        """Update the assignment held with ``changes`` (O(changes)), which
        must apply to its very generation; False (nothing taken) otherwise:
        the caller then needs the whole assignment."""
        desired = self._desired
        if desired is None or changes.base_generation != self._generation:
            return False
        changes.check()
        # A VM whose desired entry changed holds the new generation back
        # until a pass has looked at it (one may be observing right now).
        dirty, unsettled = self._dirty, self._unsettled
        unfenced = self._unfenced
        for vm in changes.upserted:
            entry = vm
            if unfenced is not None:
                unfenced.pop(vm.id, None)
                if (fenced := fenced_entry(vm)) is not None:
                    unfenced[vm.id] = vm
                    entry = fenced
            desired[vm.id] = entry
            dirty.add(vm.id)
            unsettled.add(vm.id)
        for vm_id in changes.removed:
            desired.pop(vm_id, None)
            if unfenced is not None:
                unfenced.pop(vm_id, None)
            dirty.add(vm_id)
            unsettled.add(vm_id)
        if changes.op_id != self._op_id:
            # A VM that is not settled names the assignment it waits for.
            self._dirty |= self._op_bound
        self._generation = changes.generation
        self._op_id = changes.op_id
        self._wake.set()
        return True

    def fence(self, message: str) -> list[str]:
        """Fence the VMs of the assignment held (see
        ``procurator.core.fence``): each ``reschedule`` VM desired running
        is desired paused until ``unfence``, and gets a ``paused`` event
        saying ``message``. Returns their ids (none when already fenced)."""
        if self._unfenced is not None:
            return []
        self._unfenced = {}
        fenced = self._fence_entries()
        if self.on_event is not None:
            now_ms = int(self.wall_clock() * 1000)
            for vm_id in fenced:
                self.on_event(
                    VmEvent(vm_id, EventKind.PAUSED, message, self._op_id, unix_time_ms=now_ms)
                )
        return fenced

    def _fence_entries(self) -> list[str]:
        desired, unfenced = self._desired, self._unfenced
        if desired is None or unfenced is None:
            return []
        fenced: list[str] = []
        for vm_id, vm in desired.items():
            if (entry := fenced_entry(vm)) is not None:
                unfenced[vm_id] = vm
                desired[vm_id] = entry
                fenced.append(vm_id)
        self._dirty.update(fenced)
        self._unsettled.update(fenced)
        self._wake.set()
        return fenced

    def unfence(self) -> list[str]:
        """End the fence: the fenced VMs are desired as their assignment
        says again. Call only once the assignment held is the master's
        current one. Returns the ids whose entry came back."""
        unfenced, self._unfenced = self._unfenced, None
        desired = self._desired
        if not unfenced or desired is None:
            return []
        restored = [vm_id for vm_id in unfenced if vm_id in desired]
        for vm_id in restored:
            desired[vm_id] = unfenced[vm_id]
        self._dirty.update(restored)
        self._unsettled.update(restored)
        self._wake.set()
        return restored

    @property
    def fenced(self) -> bool:
        return self._unfenced is not None

    def mark_dirty(self, vm_id: str) -> None:
        """Something about VM ``vm_id`` changed: handle it in the next pass."""
        self._dirty.add(vm_id)
        self._wake.set()

    def poke(self) -> None:
        """Ask for a pass soon (it handles what is dirty, or due)."""
        self._wake.set()

    def request_full_pass(self) -> None:
        """Make the next pass a full one (observe and recompute everything)."""
        self._full = True
        self._wake.set()

    @property
    def assignment(self) -> Assignment | None:
        """The assignment held, whole (O(VMs): not for hot paths)."""
        if self._desired is None:
            return None
        unfenced = self._unfenced or {}
        return Assignment(
            self.worker_id,
            self._generation,
            tuple(unfenced.get(vm.id, vm) for vm in self._desired.values()),
            self._op_id,
        )

    @property
    def generation(self) -> int:
        """The generation of the assignment held (0: none)."""
        return self._generation

    @property
    def status(self) -> WorkerStatus:
        """The status reported so far, whole (O(VMs): for tests and tools)."""
        return WorkerStatus(
            self.worker_id,
            self._observed_generation,
            tuple(memo.status for memo in self._statuses.values()),
        )

    @property
    def observed_generation(self) -> int:
        return self._observed_generation

    @property
    def passes(self) -> int:
        return self._passes

    # -- the loop --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        limiter = trio.CapacityLimiter(self.concurrency)
        async with trio.open_nursery() as nursery:
            task_status.started()
            # A first (full) pass at once: it reports what this worker has
            # even before (or without) an assignment.
            self.request_full_pass()
            while True:
                await self._wait_for_work()
                await self.run_pass(nursery, limiter)

    async def _wait_for_work(self) -> None:
        deadline = min(self._next_retry(), self._next_full)
        with trio.move_on_at(deadline):
            await self._wake.wait()
        self._wake = trio.Event()
        if trio.current_time() >= self._next_full:
            self._full = True

    def _next_retry(self) -> float:
        desired = self._desired or {}
        times = [
            f.not_before
            for vm_id, f in self._failures.items()
            if not f.permanent and vm_id not in self._busy and _key(desired.get(vm_id)) == f.key
        ]
        return min(times, default=math.inf)

    def _due_retries(self, now: float) -> list[str]:
        return [
            vm_id
            for vm_id, f in self._failures.items()
            if not f.permanent and f.not_before <= now and vm_id not in self._busy
        ]

    async def run_pass(
        self, nursery: trio.Nursery, limiter: trio.CapacityLimiter, *, full: bool = False
    ) -> int:
        """Observe, plan, start what is allowed, report: the VMs marked
        dirty, or (``full``, or asked for) all of them. Returns the number
        of actions started. Public for tests and benchmarks."""
        started_at = trio.current_time()
        full = full or self._full
        # Taken before observing: what is marked meanwhile is the next pass's.
        dirty, self._dirty = self._dirty, set()
        if full:
            self._full = False
            self._next_full = started_at + self.full_pass_interval
            observed = self._observed = dict(await self.actuator.observe())
            # The desired VMs in their order, then the others.
            desired = self._desired or {}
            everything = [*desired, *(observed.keys() - desired.keys())]
            everything.extend(i for i in self._statuses if i not in desired and i not in observed)
            ids: Collection[str] = everything
        else:
            dirty.update(self._due_retries(started_at))
            ids = sorted(dirty)
            if ids:
                seen = await self.actuator.observe_some(ids)
                for vm_id in ids:
                    have = seen.get(vm_id)
                    if have is None:
                        self._observed.pop(vm_id, None)
                    else:
                        self._observed[vm_id] = have
        started = self._handle(ids, nursery, limiter)
        self._passes += 1
        if self.on_pass is not None:
            self.on_pass(trio.current_time() - started_at, started)
        return started

    def _handle(
        self, ids: Collection[str], nursery: trio.Nursery, limiter: trio.CapacityLimiter
    ) -> int:
        """For each of ``ids``: start what ``plan`` asks for (removals
        last, as ``plan`` orders them), recompute its status; then advance
        observed_generation when nothing holds it back and report what
        changed (the first pass reports even when there is nothing).
        Returns the number of actions started."""
        desired = self._desired
        observed = self._observed
        statuses = self._statuses
        failures = self._failures
        unsettled, op_bound, busy = self._unsettled, self._op_bound, self._busy
        op_id = self._op_id
        now = trio.current_time()
        changed: list[VmStatus] = []
        removed: list[str] = []
        removals: list[Action] = []
        started = 0
        for vm_id in ids:
            want = desired.get(vm_id) if desired is not None else None
            have = observed.get(vm_id)
            hit = statuses.get(vm_id)
            # The common case of a full pass, inline: a VM settled (or failed
            # for good) on the very inputs its status was computed from, and
            # counted as such (not while a step of it ran), needs no action
            # and has nothing new to report.
            if (
                hit is not None
                and hit.ok
                and vm_id not in unsettled
                and hit.have is have
                and want is not None
                and (hit.want is want or hit.want == want)
                and hit.failure is failures.get(vm_id)
                and (hit.op_id is None or hit.op_id == op_id)
            ):
                continue
            if desired is not None:
                action = _plan_one(vm_id, want, have)
                if want is None:
                    if have is None:
                        # Neither desired nor present: its failures go too.
                        failures.pop(vm_id, None)
                    if action is not None:
                        removals.append(action)
                elif action is not None and self._start(action, now, nursery, limiter):
                    started += 1
            memo = self._memo(vm_id, hit)
            if memo is None:
                if hit is not None:
                    del statuses[vm_id]
                    removed.append(vm_id)
                # Nothing to report, but a step still in flight (one that
                # creates it, say) holds the generation back until it ends.
                if vm_id in busy:
                    unsettled.add(vm_id)
                else:
                    unsettled.discard(vm_id)
                op_bound.discard(vm_id)
                continue
            statuses[vm_id] = memo
            if memo.ok and vm_id not in busy:
                unsettled.discard(vm_id)
            else:
                unsettled.add(vm_id)
            if memo.op_id is None:
                op_bound.discard(vm_id)
            else:
                op_bound.add(vm_id)
            if hit is None or (hit.status is not memo.status and hit.status != memo.status):
                changed.append(memo.status)
        for action in removals:
            if self._start(action, now, nursery, limiter):
                started += 1
        # Not while a whole assignment waits for its full pass: this pass
        # (if it took it while observing) has not looked at all its VMs.
        if desired is not None and not unsettled and not self._full:
            self._observed_generation = max(self._observed_generation, self._generation)
        generation = self._observed_generation
        if changed or removed or generation != self._reported_generation:
            self._reported_generation = generation
            self.on_status(
                StatusChanges(self.worker_id, generation, tuple(changed), tuple(removed))
            )
        return started

    def _start(
        self, action: Action, now: float, nursery: trio.Nursery, limiter: trio.CapacityLimiter
    ) -> bool:
        if action.vm_id in self._busy:
            return False
        failure = self._failures.get(action.vm_id)
        if failure is not None:
            if failure.key != _key(action.desired):
                del self._failures[action.vm_id]  # desired entry changed: fresh start
            elif failure.permanent or failure.not_before > now:
                return False
        self._busy.add(action.vm_id)
        nursery.start_soon(self._act, action, self._op_id, limiter)
        return True

    async def _act(self, action: Action, op_id: str, limiter: trio.CapacityLimiter) -> None:
        with log_context(vm_id=action.vm_id, op_id=op_id):
            await self._act_in_context(action, op_id, limiter)

    async def _act_in_context(
        self, action: Action, op_id: str, limiter: trio.CapacityLimiter
    ) -> None:
        try:
            async with limiter:
                log.info("%s %s", action.kind.value, action.vm_id)
                if action.kind is ActionKind.REMOVE:
                    await self.actuator.remove(action.vm_id, op_id)
                else:
                    assert action.desired is not None
                    await self.actuator.ensure(action.desired, op_id)
            self._failures.pop(action.vm_id, None)
        except PermanentError as exc:
            log.warning("%s %s failed for good: %s", action.kind.value, action.vm_id, exc)
            first = self._record_failure(action, str(exc), permanent=True)
            self._count("permanent")
            if first and self.on_event is not None:
                self.on_event(
                    VmEvent(
                        vm_id=action.vm_id,
                        kind=EventKind.FAILED,
                        message=f"{action.kind.value} failed: {exc}",
                        op_id=op_id,
                        unix_time_ms=int(self.wall_clock() * 1000),
                    )
                )
        except TemporaryError as exc:
            self._record_failure(action, str(exc), permanent=False, delay=exc.delay)
            self._count("temporary")
        except trio.Cancelled:
            raise
        except Exception as exc:
            # A bug in one VM's step must not take down the worker or the
            # other VMs: log it loudly and retry with backoff like a
            # temporary failure.
            log.exception("%s %s raised an unexpected error", action.kind.value, action.vm_id)
            self._record_failure(action, f"internal error: {exc!r}", permanent=False)
            self._count("internal")
        finally:
            self._busy.discard(action.vm_id)
            self.mark_dirty(action.vm_id)

    def _count(self, kind: str) -> None:
        if self.on_failure is not None:
            self.on_failure(kind)

    def _record_failure(
        self, action: Action, message: str, *, permanent: bool, delay: float = 0.0
    ) -> bool:
        """Record the failure; True when it is news (not a repeat of the
        same kind of failure for the same desired entry)."""
        previous = self._failures.get(action.vm_id)
        key = _key(action.desired)
        news = previous is None or previous.key != key or previous.permanent != permanent
        history = previous.backoff if previous is not None and previous.key == key else None
        now = trio.current_time()
        backoff = (history or RestartState()).failed(self.retry, now, at_least=delay)
        wait = backoff.not_before - now
        self._failures[action.vm_id] = _Failure(
            key=key, message=message, permanent=permanent, backoff=backoff
        )
        if not permanent:
            log.info(
                "%s %s will be retried in %.1fs: %s", action.kind.value, action.vm_id, wait, message
            )
        return news

    # -- status ----------------------------------------------------------

    def _memo(self, vm_id: str, hit: _StatusMemo | None) -> _StatusMemo | None:
        """VM ``vm_id``'s status from the current inputs (``hit`` again
        when they are the ones it was computed from); None when the VM is
        neither desired nor observed."""
        desired = self._desired
        want = desired.get(vm_id) if desired is not None else None
        have = self._observed.get(vm_id)
        op_id = self._op_id
        if want is None:
            if have is None:
                return None
            # Before the first assignment nothing is known to be surplus.
            if desired is None:
                status = VmStatus(
                    id=vm_id,
                    phase=have.phase,
                    observed_hash=have.hash,
                    message=have.message,
                    restarts=have.restarts,
                    address=have.address,
                    observed_power=have.power,
                    op_id=op_id,
                )
            else:
                status = VmStatus(
                    id=vm_id,
                    phase=Phase.REMOVING,
                    observed_hash=have.hash,
                    message="no longer assigned",
                    restarts=have.restarts,
                    address=have.address,
                    observed_power=have.power,
                    op_id=op_id,
                )
            if hit is not None and hit.status == status:
                status = hit.status  # the same entry: no change to report
            return _StatusMemo(None, have, None, op_id, False, status)
        failure = self._failures.get(vm_id)
        # Entries of a new assignment are new, mostly equal, VmAssignment
        # objects: compare by value (six fields) after identity.
        if (
            hit is not None
            and hit.want is not None
            and (hit.want is want or hit.want == want)
            and hit.have is have
            and hit.failure is failure
            and (hit.op_id is None or hit.op_id == op_id)
        ):
            return hit
        relevant = failure if failure is not None and failure.key == _key(want) else None
        is_settled = settled(want, have)
        ok = is_settled or (relevant is not None and relevant.permanent)
        # A settled VM names the operation that last acted on it (an apply
        # that left it alone did nothing to it); anything else names the
        # assignment whose work it waits for.
        own = have.op_id if is_settled and have is not None and have.op_id else None
        status = self._vm_status(vm_id, want, have, relevant, own or op_id)
        if hit is not None and hit.status == status:
            status = hit.status
        return _StatusMemo(want, have, failure, None if own else op_id, ok, status)

    @staticmethod
    def _vm_status(
        vm_id: str,
        want: VmAssignment,
        have: ObservedVm | None,
        failure: _Failure | None,
        op_id: str,
    ) -> VmStatus:
        if failure is not None and failure.permanent:
            phase, message = Phase.FAILED, failure.message
        elif have is None or have.hash != want.hash:
            phase = Phase.PENDING
            message = "waiting to be created" if have is None else "waiting to be replaced"
            if failure is not None:
                message = f"retrying after: {failure.message}"
        else:
            phase, message = have.phase, have.message
            if failure is not None:
                message = f"retrying after: {failure.message}"
        return VmStatus(
            id=vm_id,
            phase=phase,
            observed_hash=have.hash if have else "",
            message=message,
            restarts=have.restarts if have else 0,
            address=have.address if have else "",
            observed_power=have.power if have else PowerState.STOPPED,
            op_id=op_id,
        )
