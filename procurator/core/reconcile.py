"""Converge desired VMs (an ``Assignment``) with observed ones, by hash.

Two layers:

- ``plan(desired, observed)`` is a pure function: what must happen to each
  VM. A VM whose desired entry matches what runs gets *no* action: it is
  never restarted, replaced or touched beyond observation.
- ``Reconciler`` is level-triggered: every pass observes the actual state
  again through the ``VmActuator`` port and recomputes the plan, so a pass
  interrupted by a crash, a lost push or a failed step simply continues the
  next time. It runs each VM's work in its own task, at most ``concurrency``
  at once, and strictly one at a time per VM; a slow or failing VM never
  blocks the others and the loop never waits for a step to finish before
  reacting to new input.

Failures are state, not sleeps: a ``TemporaryError`` records ``not_before``
(the worker's one retry policy, ``procurator.core.backoff``, per VM and
desired entry) and the loop wakes for it; a ``PermanentError``
parks the VM as failed until its desired entry changes (new hash, power or
image) and is reported once as a ``failed`` event naming the reason.
``observed_generation`` is the newest generation every VM of which is
*settled*: running the desired hash in the desired power state, or
failed for good (permanent error, or the VMM keeps crashing: the
VmManager's own restart backoff owns that VM now).

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from procurator.core.backoff import RestartPolicy, RestartState
from procurator.core.errors import PermanentError, TemporaryError
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
    fixed point. Pure and O(n): it runs on every pass."""
    actions: list[Action] = []
    for vm_id, want in desired.items():
        have = observed.get(vm_id)
        if have is None:
            actions.append(Action(ActionKind.CREATE, vm_id, want))
        elif have.hash != want.hash:
            actions.append(Action(ActionKind.REPLACE, vm_id, want))
        elif have.phase in (Phase.FAILED, Phase.CRASH_LOOP):
            # The VmManager owns a crashing VM's restarts; a failed one waits
            # for a new desired entry. Neither is acted on again here, unless
            # the desired power changed (e.g. stop a crash-looping VM).
            if have.desired_power not in (None, want.power):
                actions.append(Action(ActionKind.SET_POWER, vm_id, want))
            continue
        elif have.power != want.power or have.phase is not _power_phase(want.power):
            if have.phase in (Phase.STARTING, Phase.STOPPING, Phase.REALISING):
                continue  # in transition; observe again later
            actions.append(Action(ActionKind.SET_POWER, vm_id, want))
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
    """One desired VM's status as computed from these very inputs."""

    want: VmAssignment
    have: ObservedVm | None
    failure: _Failure | None
    op_id: str | None  # the assignment's op id the status names; None: the VM's own
    ok: bool  # settled, or failed for good
    status: VmStatus


def _key(vm: VmAssignment | None) -> tuple[str, PowerState, str] | None:
    return None if vm is None else (vm.hash, vm.power, vm.nix_store_path)


@dataclass
class Reconciler:
    """Level-triggered reconcile loop for one worker.

    Feed it with ``set_assignment`` (pushes, pulls) and ``poke`` (VM events,
    periodic resync); it reports with ``on_status`` after every pass whose
    result differs from the last one.
    """

    actuator: VmActuator
    on_status: Callable[[WorkerStatus], None]
    worker_id: str
    concurrency: int = 8
    # Delay before retrying a step that failed temporarily, by attempt.
    retry: RestartPolicy = field(default_factory=RestartPolicy)
    on_pass: Callable[[float, int], None] | None = None  # (seconds, actions started)
    on_failure: Callable[[str], None] | None = None  # kind: permanent, temporary, internal
    on_event: Callable[[VmEvent], None] | None = None  # failed for good (once per entry)
    wall_clock: Callable[[], float] = time.time  # event timestamps only

    _assignment: Assignment | None = field(default=None, init=False)
    _wake: trio.Event = field(default_factory=trio.Event, init=False)
    _busy: set[str] = field(default_factory=set, init=False)
    _failures: dict[str, _Failure] = field(default_factory=dict, init=False)
    _last_status: WorkerStatus | None = field(default=None, init=False)
    _observed_generation: int = field(default=0, init=False)
    _passes: int = field(default=0, init=False)
    # Pass caches, so that a pass over N settled VMs costs little more than
    # N lookups: the desired map of the current assignment, and each desired
    # VM's (want, have, failure, op id) -> (settled, VmStatus) of the last
    # pass. Inputs are immutable and replaced when they change, so a hit is
    # an identity match.
    _desired_of: tuple[Assignment | None, dict[str, VmAssignment]] = field(
        default=(None, {}), init=False
    )
    _status_memo: dict[str, _StatusMemo] = field(default_factory=dict, init=False)

    # -- inputs ----------------------------------------------------------

    def set_assignment(self, assignment: Assignment) -> bool:
        """Take a newer assignment; older or equal generations are ignored
        (pushes and pulls can race). Returns whether it was taken."""
        current = self._assignment
        if current is not None and assignment.generation <= current.generation:
            return False
        self._assignment = assignment
        self.poke()
        return True

    def poke(self) -> None:
        """Ask for a pass soon (VM event, periodic resync)."""
        self._wake.set()

    @property
    def assignment(self) -> Assignment | None:
        return self._assignment

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
            # A first pass at once: it reports what this worker has even
            # before (or without) an assignment.
            self.poke()
            while True:
                await self._wait_for_work()
                await self.run_pass(nursery, limiter)

    async def _wait_for_work(self) -> None:
        deadline = self._next_retry()
        with trio.move_on_at(deadline):
            await self._wake.wait()
        self._wake = trio.Event()

    def _next_retry(self) -> float:
        desired = self._desired()
        times = [
            f.not_before
            for vm_id, f in self._failures.items()
            if not f.permanent and vm_id not in self._busy and _key(desired.get(vm_id)) == f.key
        ]
        return min(times, default=math.inf)

    def _desired(self) -> dict[str, VmAssignment]:
        """The current assignment's VMs by id (shared: do not modify)."""
        assignment = self._assignment
        if assignment is None:
            return {}
        cached_for, desired = self._desired_of
        if cached_for is not assignment:
            desired = {vm.id: vm for vm in assignment.vms}
            self._desired_of = (assignment, desired)
        return desired

    async def run_pass(self, nursery: trio.Nursery, limiter: trio.CapacityLimiter) -> int:
        """Observe, plan, start what is allowed, report. Returns the number
        of actions started. Public for tests and benchmarks."""
        started_at = trio.current_time()
        assignment = self._assignment
        observed = await self.actuator.observe()
        if assignment is None:
            # Never remove anything before the master has told us what is
            # desired: an empty worker view after restart is not an order.
            self._report(observed)
            return 0
        desired = self._desired()
        now = trio.current_time()
        started = 0
        for action in plan(desired, observed):
            if action.vm_id in self._busy:
                continue
            failure = self._failures.get(action.vm_id)
            if failure is not None:
                if failure.key != _key(action.desired):
                    del self._failures[action.vm_id]  # desired entry changed: fresh start
                elif failure.permanent or failure.not_before > now:
                    continue
            self._busy.add(action.vm_id)
            nursery.start_soon(self._act, action, assignment.op_id, limiter)
            started += 1
        # Forget failures of VMs that are no longer desired nor present.
        for vm_id in [v for v in self._failures if v not in desired and v not in observed]:
            del self._failures[vm_id]
        self._report(observed)
        self._passes += 1
        if self.on_pass is not None:
            self.on_pass(trio.current_time() - started_at, started)
        return started

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
            self.poke()

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

    def _compute_status(self, observed: Mapping[str, ObservedVm]) -> WorkerStatus:
        """The report for the master, from the current assignment,
        observations and failure records; advances observed_generation
        when everything desired is settled."""
        assignment = self._assignment
        desired = self._desired()
        vms: list[VmStatus] = []
        converged = True
        op_id = assignment.op_id if assignment else ""
        memo, fresh = self._status_memo, {}
        for vm_id, want in desired.items():
            have = observed.get(vm_id)
            failure = self._failures.get(vm_id)
            hit = memo.get(vm_id)
            # A new assignment brings new, mostly equal, VmAssignment
            # objects: compare by value (six fields) after identity, or a
            # one-VM change recomputes every VM's status before its
            # replacement starts (~10 ms at 1,000 VMs).
            if (
                hit is not None
                and (hit.want is want or hit.want == want)
                and hit.have is have
                and hit.failure is failure
                and (hit.op_id is None or hit.op_id == op_id)
            ):
                entry = hit
            else:
                relevant = failure if failure is not None and failure.key == _key(want) else None
                is_settled = settled(want, have)
                ok = is_settled or (relevant is not None and relevant.permanent)
                # A settled VM names the operation that last acted on it (an
                # apply that left it alone did nothing to it); anything else
                # names the assignment whose work it waits for.
                own = have.op_id if is_settled and have is not None and have.op_id else None
                status = self._vm_status(vm_id, want, have, relevant, own or op_id)
                entry = _StatusMemo(want, have, failure, None if own else op_id, ok, status)
            fresh[vm_id] = entry
            converged = converged and entry.ok and vm_id not in self._busy
            vms.append(entry.status)
        self._status_memo = fresh
        for vm_id, have in observed.items():
            if vm_id not in desired:
                # Before the first assignment nothing is known to be surplus.
                vms.append(
                    VmStatus(
                        id=vm_id,
                        phase=Phase.REMOVING if assignment is not None else have.phase,
                        observed_hash=have.hash,
                        message="no longer assigned" if assignment is not None else have.message,
                        restarts=have.restarts,
                        address=have.address,
                        observed_power=have.power,
                        op_id=op_id,
                    )
                )
                converged = False
        if assignment is not None and converged:
            self._observed_generation = max(self._observed_generation, assignment.generation)
        return WorkerStatus(
            worker_id=self.worker_id,
            observed_generation=self._observed_generation,
            vms=tuple(vms),
        )

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

    def _report(self, observed: Mapping[str, ObservedVm]) -> None:
        status = self._compute_status(observed)
        if status != self._last_status:
            self._last_status = status
            self.on_status(status)
