"""VmManager: one supervised VMM process per VM, safe across worker crashes.

The reconciler (trio) calls this blocking, thread-safe API through
``trio.to_thread.run_sync`` with a ``CapacityLimiter``:

    ensure(spec)   make the VM run (or pause, or stop) ``spec``; block until done
    remove(id)     stop the VM and delete its state
    get(id), list()            observations (no I/O)
    counters()                 the last polled device counters (no I/O)
    poll_counters()            refresh them now (I/O, blocking)
    recover()      at worker start: rebuild from the state dir and the OS
    close()        stop supervising; the VMMs keep running

Ownership. Each VM has one supervisor thread, and only that thread talks to
the VM's VMM for lifecycle: it starts it (``base.launch_vm``: spawn, create
and boot, for any driver), pauses and resumes, health-checks, restarts and
stops it (``poll_counters`` only reads counters from the caller's thread).
API callers never touch the VMM: they write the desired spec into the VM's
record, wake the supervisor and wait for
the supervisor to report an *outcome* for that spec (the VM reached it, or an
attempt failed). This keeps every lifecycle decision for a VM on one thread,
so a health check can never race a replacement, and a crash seen by the
supervisor is handled the same way whether or not someone is waiting.

Supervision. The supervisor waits on the VMM's pidfd (exit) and on its wake
eventfd (new desired state) with a timeout (the next health check or the end
of a restart backoff). A health check is one API call with a timeout: the
state (``vm.info``), or — when counters are due and the driver's
``state_mark`` shows the VMM reported no transition since the last state
read — the counters alone (``_Supervisor._probe``); ``hung_after``
unanswered checks in a row escalate through the stop ladder and count as a
failure. A VMM that exits while the VM is desired running or paused (crash,
or the guest powered off) counts as a failure too and is restarted after the
backoff of ``procurator.core.backoff``; many failures in a row show as
``Phase.CRASH_LOOP``. A permanent error (the VMM refused the config) shows as
``Phase.FAILED`` and is not retried until the desired spec changes.

Stop ladder (here, the same for every driver), each step only if the VMM
still runs: ``power_button`` and wait ``power_button_wait``; ``shutdown_vm``;
``shutdown_vmm`` and wait ``shutdown_vmm_wait``; SIGTERM and wait
``sigterm_wait``; SIGKILL. Once one API step times out the API is treated as
hung and the remaining API steps are skipped (each would only burn another
timeout) — the ladder goes on with signals.

Crash safety (see ``procurator.worker.state``): the manager holds each VM's
flock for as long as it manages the VM, so no other process can spawn a VMM
for it; VMMs run in their own session and outlive the worker; the durable
``vm.json`` is written before acting on a spec, and ``handles.json`` before
spawning (``spawning``) and right after (pid, start ticks), so a restarted
worker finds every VMM it may have started: a recorded one by pid and start
ticks, an unrecorded one by the marker it was launched with
(``process.launch_env``: its environment names the VM's directory). A VMM
found alive is re-adopted, never restarted or duplicated; one found dead is
cleaned up (its stale socket removed under the VM's flock) and started again
if still desired.

Lock order (acquire in this order only; never call the driver or do file I/O
while holding the map lock or a VM's condition lock):

    1. _Vm.op_lock      per VM; serialises ensure/remove/attach for that VM
    2. VmManager._map_lock   the id -> _Vm map only
    3. _Vm.cond         leaf; the VM record's shared fields (desired spec,
                        outcome, observation, counters); waited on by callers

The supervisor thread takes only 3 (briefly, to read the desired spec and to
publish); ``on_change`` is called by supervisor threads with no lock held.

Operation ids. Every log record a supervisor writes carries the VM's
``vm_id`` and the ``op_id`` of the spec it is converging (or of the removal
it is carrying out), bound on its own thread (``procurator.logs.bind``);
every ``VmEvent`` carries the same op id. Callers' threads log with the
fields of their own context.

Events: ``created`` (first VMM of this VM), ``booted``, ``crashed`` (with the
restart delay), ``restarted`` (after N s of backoff), ``replaced`` (new
hash), ``stopped`` (desired power stopped, or the guest powered off),
``paused``, ``resumed``, ``failed`` (with the reason), ``readopted`` (a VMM
found alive by a new worker) and ``removed``.

Guest clock after resume: neither cloud-hypervisor (v53 API) nor QEMU
without a guest agent offers a way to set the guest's clock, so a resumed
guest's wall clock lags by the time it was paused until the guest corrects
it itself (NTP, chrony). The ``resumed`` event says so; nothing pretends to
resync it.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import enum
import errno
import fcntl
import json
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from procurator.core.backoff import RestartPolicy, RestartState
from procurator.core.errors import PermanentError, ProcuratorError, TemporaryError
from procurator.core.models import EventKind, Phase, PowerState, VmEvent, VmStatus
from procurator.logs import bind
from procurator.worker.state import HandlesRecord, StateDir, VmLock
from procurator.worker.vmm import process
from procurator.worker.vmm.base import (
    VmmDriver,
    VmmError,
    VmmGone,
    VmmHandle,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
    VmState,
    launch_vm,
)

__all__ = [
    "ChangeCallback",
    "ManagerClosedError",
    "Timeouts",
    "VmManager",
    "VmObservation",
    "VmSpec",
]

log = logging.getLogger(__name__)

_SPEC_FORMAT = 1


class ManagerClosedError(TemporaryError):
    """The VmManager was closed (the worker is shutting down)."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What one VM should be. ``hash`` is its identity (a new hash replaces
    the VM); ``config`` is the final, confined cloud-hypervisor ``VmConfig``;
    ``labels`` are shown in status and persisted (store path, address...).

    The config is copied through JSON at construction: it must be plain JSON,
    and later changes to the caller's dict cannot leak into a running spec.
    """

    vm_id: str
    hash: str
    config: Mapping[str, Any]
    power: PowerState = PowerState.RUNNING
    op_id: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            config = json.loads(json.dumps(self.config))
        except (TypeError, ValueError) as exc:
            raise PermanentError(f"config of VM {self.vm_id} is not plain JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise PermanentError(f"config of VM {self.vm_id} must be a JSON object")
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "labels", {str(k): str(v) for k, v in self.labels.items()})

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _SPEC_FORMAT,
            "vm_id": self.vm_id,
            "hash": self.hash,
            "config": self.config,
            "power": self.power.value,
            "op_id": self.op_id,
            "labels": dict(self.labels),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VmSpec:
        return cls(
            vm_id=str(data["vm_id"]),
            hash=str(data["hash"]),
            config=data["config"],
            power=PowerState(data.get("power", PowerState.RUNNING.value)),
            op_id=str(data.get("op_id", "")),
            labels=dict(data.get("labels", {})),
        )

    def same_target(self, other: VmSpec | None) -> bool:
        """True when ``other`` asks for the same VM in the same power state
        (labels and op id may differ: they need no action on the VMM)."""
        return other is not None and (self.hash, self.power) == (other.hash, other.power)


@dataclass(frozen=True, slots=True)
class VmObservation:
    """What is true about one VM, as last observed by its supervisor."""

    vm_id: str
    hash: str  # desired hash ("" while the spec is unknown)
    phase: Phase
    power: PowerState  # observed
    desired_power: PowerState
    message: str = ""
    restarts: int = 0
    pid: int | None = None
    observed_hash: str = ""  # the hash the running VMM was booted with
    labels: Mapping[str, str] = field(default_factory=dict)
    op_id: str = ""
    driver: str = ""

    def to_status(self) -> VmStatus:
        """The wire form (``address`` comes from the ``address`` label)."""
        return VmStatus(
            id=self.vm_id,
            phase=self.phase,
            observed_hash=self.observed_hash,
            message=self.message,
            restarts=self.restarts,
            address=self.labels.get("address", ""),
            observed_power=self.power,
            op_id=self.op_id,
        )


ChangeCallback = Callable[[VmObservation, VmEvent | None], None]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. ``hung_after`` is a count of health checks in a row."""

    spawn: float = 10.0  # VMM process start until its API answers
    api: float = 5.0  # one API call (health checks, pause, ladder steps)
    boot: float = 30.0  # vm.create + vm.boot + confirmation
    health_interval: float = 5.0
    # A cap on the health checks a second across all VMs (0: none): with
    # more VMs than health_interval allows, each VM's interval stretches to
    # VMs / health_checks_per_second (VmManager.health_interval).
    health_checks_per_second: float = 0.0
    hung_after: int = 2
    counters_interval: float = 15.0  # 0: the supervisor never polls counters
    power_button_wait: float = 30.0
    shutdown_vmm_wait: float = 5.0
    sigterm_wait: float = 5.0
    sigkill_wait: float = 10.0
    ensure: float = 120.0  # longest ensure()/remove() blocks


class _Outcome(enum.Enum):
    OK = "ok"


class _Vm:
    """A VM's record, shared between API callers and its supervisor.

    Fields after ``cond`` are guarded by ``cond`` (lock level 3).
    """

    def __init__(self, vm_id: str, driver: str) -> None:
        self.vm_id = vm_id
        self.op_lock = threading.Lock()  # level 1
        self.started = False  # guarded by op_lock
        self.gone = False  # guarded by op_lock: record retired, look up again
        self.flock: VmLock | None = None
        self.thread: threading.Thread | None = None
        self.wake_fd = -1

        self.cond = threading.Condition(threading.Lock())  # level 3
        self.desired: VmSpec | None = None
        self.remove_requested = False
        self.remove_op_id = ""  # op id of the removal asked for, if any
        self.closing = False
        self.seq = 0  # bumped whenever the target (hash, power, removal) changes
        self.outcome_seq = -1
        self.outcome_count = 0
        self.outcome_error: ProcuratorError | None = None
        self.converged = False
        self.finished = False
        self.handle: VmmHandle | None = None  # published for poll_counters
        self.counters: Mapping[str, Mapping[str, int]] = {}
        self.obs = VmObservation(
            vm_id=vm_id,
            hash="",
            phase=Phase.PENDING,
            power=PowerState.STOPPED,
            desired_power=PowerState.STOPPED,
            driver=driver,
        )

    def wake(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self.wake_fd, 1)


class VmManager:
    """Runs one VMM per VM through ``driver``; state under ``state_dir``.

    ``on_change(observation, event)`` is called from supervisor threads, with
    no lock held, on every observable change; it must be quick and must not
    call back into the manager's blocking methods for the same VM.
    """

    def __init__(
        self,
        state_dir: Path,
        driver: VmmDriver,
        *,
        policy: RestartPolicy | None = None,
        timeouts: Timeouts | None = None,
        on_change: ChangeCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state = StateDir(state_dir)
        self.state.prepare()
        self.driver = driver
        self.policy = policy or RestartPolicy()
        self.timeouts = timeouts or Timeouts()
        self.on_change = on_change
        self.clock = clock
        self._map_lock = threading.Lock()  # level 2
        self._vms: dict[str, _Vm] = {}
        self._closed = False

    # -- public API --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        with self._map_lock:
            return self._closed

    def health_interval(self) -> float:
        """Seconds between one settled VM's health checks: the configured
        ``health_interval``, or longer when the manager holds more VMs than
        ``health_checks_per_second`` allows to check that often. The worker's
        background load of API calls then stays bounded whatever its fleet
        size; the price is that a hung VMM goes unnoticed for up to
        ``hung_after`` such intervals (a VMM that exits is still seen at
        once through its pidfd). Reads the map's size without the map lock:
        a size one VM off only moves one wait."""
        t = self.timeouts
        if t.health_checks_per_second <= 0:
            return t.health_interval
        return max(t.health_interval, len(self._vms) / t.health_checks_per_second)

    def ensure(self, spec: VmSpec) -> VmObservation:
        """Make the VM be ``spec``: idempotent; blocks until the VMM reports
        the desired state (``Timeouts.ensure`` at most).

        Raises ``PermanentError`` when the VMM refused the spec (retrying the
        same spec will not help) and ``TemporaryError`` when an attempt
        failed, the VM is waiting out a restart backoff, another process owns
        the VM, or it did not converge in time (the supervisor keeps trying).
        """
        StateDir.check_id(spec.vm_id)
        with self._attached(spec.vm_id, create=True) as vm:
            assert vm is not None
            with vm.cond:
                current, converged = vm.desired, vm.converged
                last_error = vm.outcome_error if vm.outcome_seq == vm.seq else None
                removing = vm.remove_requested
            if not removing and spec.same_target(current):
                if current != spec:
                    self._write_spec(vm, spec)
                    with vm.cond:
                        vm.desired = spec
                        vm.obs = replace(vm.obs, labels=spec.labels, op_id=spec.op_id)
                if converged:
                    return self.get_or_raise(spec.vm_id)
                if last_error is not None:
                    raise copy.copy(last_error)  # one instance per raise: threads
                with vm.cond:
                    target_seq, after = vm.seq, vm.outcome_count
            else:
                self._write_spec(vm, spec)
                with vm.cond:
                    vm.desired = spec
                    vm.remove_requested = False
                    vm.remove_op_id = ""
                    vm.seq += 1
                    vm.converged = False
                    target_seq, after = vm.seq, vm.outcome_count
                    vm.obs = replace(
                        vm.obs,
                        hash=spec.hash,
                        desired_power=spec.power,
                        labels=spec.labels,
                        op_id=spec.op_id,
                    )
                vm.wake()
            self._wait_outcome(vm, target_seq, after, f"ensure {spec.hash}")
            return self.get_or_raise(spec.vm_id)

    def remove(self, vm_id: str, *, op_id: str = "") -> None:
        """Stop the VM (stop ladder) and delete its state. Idempotent.
        ``op_id``: the operation asking for it, for logs and the event."""
        StateDir.check_id(vm_id)
        with self._attached(vm_id, create=False) as vm:
            if vm is None:
                return
            with vm.cond:
                vm.remove_requested = True
                vm.remove_op_id = op_id
                vm.seq += 1
                vm.converged = False
                target_seq, after = vm.seq, vm.outcome_count
            vm.wake()
            self._wait_outcome(vm, target_seq, after, "remove")
            self._retire(vm)

    def get(self, vm_id: str) -> VmObservation | None:
        with self._map_lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return None
        with vm.cond:
            return vm.obs

    def get_or_raise(self, vm_id: str) -> VmObservation:
        obs = self.get(vm_id)
        if obs is None:
            raise TemporaryError(f"VM {vm_id} is no longer managed (removed meanwhile)")
        return obs

    def list(self) -> list[VmObservation]:
        with self._map_lock:
            vms = list(self._vms.values())
        result = []
        for vm in vms:
            with vm.cond:
                result.append(vm.obs)
        return sorted(result, key=lambda o: o.vm_id)

    def counters(self) -> dict[str, Mapping[str, Mapping[str, int]]]:
        """The last polled ``vm.counters`` of every running VM (no I/O)."""
        with self._map_lock:
            vms = list(self._vms.values())
        result: dict[str, Mapping[str, Mapping[str, int]]] = {}
        for vm in vms:
            with vm.cond:
                if vm.counters:
                    result[vm.vm_id] = vm.counters
        return result

    def poll_counters(self) -> None:
        """Read ``vm.counters`` of every VM with a live VMM now (blocking; one
        API call per VM). A VMM that does not answer keeps no counters."""
        with self._map_lock:
            vms = list(self._vms.values())
        for vm in vms:
            with vm.cond:
                handle = vm.handle
            counters: Mapping[str, Mapping[str, int]] = {}
            if handle is not None:
                try:
                    counters = self.driver.counters(handle, timeout=self.timeouts.api)
                except (VmmError, VmmRejected) as exc:
                    log.debug("VM %s: counters unavailable: %s", vm.vm_id, exc)
            with vm.cond:
                if vm.handle == handle:
                    vm.counters = counters

    def recover(self) -> builtins.list[VmObservation]:
        """Take over every VM found in the state dir: re-adopt live VMMs,
        clean up and restart dead ones that are still desired. Blocks until
        each VM's supervisor reported its first outcome (or ``ensure``
        timeout). VMs another process owns are skipped (logged)."""
        attached: list[tuple[_Vm, int]] = []
        for vm_id in self.state.vm_ids():
            try:
                with self._attached(vm_id, create=False) as vm:
                    if vm is not None:
                        with vm.cond:
                            attached.append((vm, vm.seq))
            except ProcuratorError as exc:
                log.error("VM %s: not recovered: %s", vm_id, exc)  # noqa: TRY400 - expected, no trace
        result = []
        for vm, seq in attached:
            try:
                self._wait_outcome(vm, seq, 0, "recover")
            except ProcuratorError as exc:
                log.warning("VM %s: recovered with a problem: %s", vm.vm_id, exc)
            with vm.cond:
                if not vm.finished:
                    result.append(vm.obs)
        return result

    def begin_close(self) -> None:
        """Refuse new calls, make every blocked ``ensure``/``remove`` return
        (``ManagerClosedError``) and ask every supervisor to end after its
        current step. Does not wait: a caller shutting down calls this
        before it waits for the threads blocked in those calls, then
        ``close``."""
        self._begin_close()

    def _begin_close(self) -> builtins.list[_Vm]:
        with self._map_lock:
            self._closed = True
            vms = list(self._vms.values())
        for vm in vms:
            with vm.cond:
                vm.closing = True
                vm.cond.notify_all()
            vm.wake()
        return vms

    def close(self) -> None:
        """Stop every supervisor thread and release the VMs' locks. The VMMs
        keep running, to be re-adopted by the next manager (``recover``)."""
        vms = self._begin_close()
        for vm in vms:
            if vm.thread is not None:
                vm.thread.join()
            self._close_fd(vm)
        with self._map_lock:
            self._vms.clear()

    # -- records -----------------------------------------------------------------

    @contextlib.contextmanager
    def _attached(self, vm_id: str, *, create: bool) -> Iterator[_Vm | None]:
        """The VM's record with its op_lock held, its supervisor running.
        With ``create=False`` a VM that is neither managed nor on disk
        yields None."""
        while True:
            # Looked at before taking the map lock (no file I/O under it); a
            # VM appearing meanwhile only does so under its flock, which the
            # new record takes before acting.
            on_disk = create or self.state.exists(vm_id)
            with self._map_lock:
                if self._closed:
                    raise ManagerClosedError("the VM manager is closed")
                vm = self._vms.get(vm_id)
                if vm is None:
                    if not on_disk:
                        yield None
                        return
                    vm = self._vms[vm_id] = _Vm(vm_id, self.driver.name)
            with vm.op_lock:
                with vm.cond:
                    finished = vm.finished
                if finished and not vm.gone:
                    # Its supervisor ended (the VM was removed): retire it.
                    self._retire(vm)
                if vm.gone:
                    continue
                if not vm.started:
                    try:
                        self._start_supervisor(vm, create=create)
                    except BaseException:
                        vm.gone = True
                        with self._map_lock:
                            if self._vms.get(vm_id) is vm:
                                del self._vms[vm_id]
                        raise
                yield vm
                return

    def _start_supervisor(self, vm: _Vm, *, create: bool) -> None:
        flock = self.state.lock(vm.vm_id)
        try:
            raw = self.state.read_spec(vm.vm_id) if self.state.exists(vm.vm_id) else None
            spec = VmSpec.from_json(raw) if raw is not None else None
        except (KeyError, TypeError, ValueError) as exc:
            flock.release()
            raise PermanentError(f"VM {vm.vm_id}: vm.json is malformed: {exc!r}") from exc
        except BaseException:
            flock.release()
            raise
        vm.flock = flock
        vm.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        with vm.cond:
            vm.desired = spec
            # Found on disk without vm.json (not being created now): a VM whose
            # creation never completed. Clean it up.
            vm.remove_requested = spec is None and not create
            if spec is not None:
                vm.obs = replace(
                    vm.obs,
                    hash=spec.hash,
                    desired_power=spec.power,
                    labels=spec.labels,
                    op_id=spec.op_id,
                )
        supervisor = _Supervisor(self, vm)
        vm.thread = threading.Thread(target=supervisor.run, name=f"vm-{vm.vm_id}", daemon=True)
        vm.started = True
        vm.thread.start()

    def _write_spec(self, vm: _Vm, spec: VmSpec) -> None:
        assert vm.flock is not None
        self.state.write_spec(vm.flock, spec.to_json())

    def _wait_outcome(self, vm: _Vm, target_seq: int, after: int, what: str) -> None:
        deadline = self.clock() + self.timeouts.ensure
        with vm.cond:
            while not (vm.outcome_seq >= target_seq and vm.outcome_count > after):
                if vm.finished or vm.closing:
                    if vm.outcome_seq >= target_seq and vm.outcome_error is None:
                        return
                    raise ManagerClosedError(
                        f"VM {vm.vm_id}: supervisor stopped before {what} completed"
                    )
                left = deadline - self.clock()
                if left <= 0:
                    raise TemporaryError(
                        f"VM {vm.vm_id}: {what} not done after {self.timeouts.ensure:g} s "
                        f"({vm.obs.phase.value}: {vm.obs.message})",
                        delay=self.timeouts.health_interval,
                    )
                vm.cond.wait(left)
            if vm.outcome_error is not None:
                raise copy.copy(vm.outcome_error)  # one instance per raise: threads

    def _retire(self, vm: _Vm) -> None:
        """Drop a record whose supervisor ended (caller holds its op_lock)."""
        if vm.thread is not None:
            vm.thread.join(self.timeouts.ensure)
        vm.gone = True
        with self._map_lock:
            if self._vms.get(vm.vm_id) is vm:
                del self._vms[vm.vm_id]
        self._close_fd(vm)

    @staticmethod
    def _close_fd(vm: _Vm) -> None:
        # Never close the eventfd under a live supervisor: the number could be
        # reused by another file while it still selects on it.
        if vm.wake_fd >= 0 and (vm.thread is None or not vm.thread.is_alive()):
            os.close(vm.wake_fd)
            vm.wake_fd = -1

    def _emit(self, obs: VmObservation, event: VmEvent | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(obs, event)
        except Exception:  # a subscriber's bug must not kill a supervisor
            log.exception("VM %s: on_change callback failed", obs.vm_id)


class _StopFailed(VmmError):
    """The VMM survived the whole stop ladder (e.g. stuck in the kernel)."""


class _Supervisor:
    """The thread that owns one VM's VMM. Attributes without a lock are
    touched by this thread only."""

    def __init__(self, manager: VmManager, vm: _Vm) -> None:
        self.m = manager
        self.vm = vm
        self.driver = manager.driver
        self.t = manager.timeouts
        self.paths: VmmPaths = manager.state.paths(vm.vm_id)
        self.handle: VmmHandle | None = None
        self.pidfd = -1
        # Polls of the wake eventfd and the pidfd (_wait), and of the pidfd
        # alone (_alive); rebuilt when the pidfd changes.
        self.poller: select.poll | None = None
        self.exit_poller: select.poll | None = None
        self.booted_hash = ""
        self.backoff = RestartState()
        self.unanswered = 0
        self.failed_seq = -1  # seq whose spec failed permanently
        self.seq = -1  # the seq of the desired state being acted upon
        self.target: tuple[str, PowerState] | None = None  # (hash, power) acted upon
        self.replacing = False
        self.last_counters = -1e18
        # (state_mark, state) of the last state read of this VMM; None when
        # the driver gives no mark or the state must be read again.
        self.known_state: tuple[Hashable, VmState] | None = None
        self.ever_started = False
        self.last_failure = ""  # why the VM last went down, shown while waiting
        # (seq, "pause"|"resume", cause) of the last refused power change:
        # its ``failed`` event is sent once, not on every retry.
        self.power_failure: tuple[int, str, str] | None = None
        self.pending_event: EventKind | None = None  # reported once the VM is seen running
        self.pending_message = ""  # the message of that event ("" for the state's)

    # -- thread ------------------------------------------------------------------

    def run(self) -> None:
        vm = self.vm
        # This thread's own context: its log records name the VM, and the
        # operation whose spec (or removal) it is working on.
        with vm.cond:
            spec = vm.desired
        bind(vm_id=vm.vm_id, op_id=spec.op_id if spec is not None else "")
        try:
            self._adopt()
            while True:
                with vm.cond:
                    if vm.closing:
                        return
                    spec, removing, seq = vm.desired, vm.remove_requested, vm.seq
                    remove_op_id = vm.remove_op_id
                bind(op_id=remove_op_id if removing else spec.op_id if spec is not None else "")
                # Outcomes are reported for the seq acted upon: a caller that
                # asked for something newer meanwhile keeps waiting.
                self.seq = seq
                timeout: float | None
                try:
                    if removing:
                        if self._remove(seq):
                            return
                        timeout = self.t.health_interval
                    elif spec is None or seq == self.failed_seq:
                        timeout = None
                    else:
                        timeout = self._step(spec, seq)
                except Exception as exc:
                    # An error nothing translated (a bug, an OS error such as
                    # EMFILE): ending this thread would leave the VMM running
                    # unwatched. Report it to the waiting caller and try the
                    # same pass again after the health interval.
                    log.exception("VM %s: unexpected error; retrying", vm.vm_id)
                    with vm.cond:
                        phase = vm.obs.phase
                    self._publish(
                        phase,
                        f"internal error, retrying: {exc!r}",
                        outcome=TemporaryError(f"VM {vm.vm_id}: internal error: {exc!r}"),
                    )
                    timeout = self.t.health_interval
                self._wait(timeout)
        except BaseException as exc:
            log.exception("VM %s: supervisor failed", vm.vm_id)
            self._publish(
                Phase.FAILED,
                f"supervisor failed: {exc!r}",
                outcome=ProcuratorError(f"VM {vm.vm_id}: supervisor failed: {exc!r}"),
                event=EventKind.FAILED,
            )
        finally:
            self._close_pidfd()
            with vm.cond:
                vm.finished = True
                vm.handle = None
                vm.cond.notify_all()
            if vm.flock is not None:
                vm.flock.release()

    def _wait(self, timeout: float | None) -> None:
        # poll(), not select(): a worker with a few hundred VMs has fds
        # above FD_SETSIZE (1024), which select() cannot watch. The poll
        # object is kept until the pidfd changes (a settled VM waits once
        # per health check).
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.vm.wake_fd, select.POLLIN)
            if self.pidfd >= 0:
                poller.register(self.pidfd, select.POLLIN)
        try:
            events = poller.poll(None if timeout is None else max(0.0, timeout) * 1000)
        except InterruptedError:
            return
        if any(fd == self.vm.wake_fd for fd, _ in events):
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.vm.wake_fd)

    # -- one pass: measure, then act ---------------------------------------------

    def _step(self, spec: VmSpec, seq: int) -> float | None:
        """Move the VM one step towards ``spec``; returns how long to wait
        before the next pass (None: until woken)."""
        if self.target is not None and self.target[0] != spec.hash:
            # A new spec starts with a clean slate: no backoff inherited.
            self.backoff = self.backoff.reset()
            self.last_failure = ""
        self.target = (spec.hash, spec.power)
        try:
            if self.handle is not None and not self._alive():
                # A VMM about to be replaced or stopped anyway did not fail
                # the desired spec: only count exits of the VM we want.
                wanted = self.booted_hash == spec.hash and spec.power is not PowerState.STOPPED
                self._exited(spec, seq, count=wanted)
                if wanted:
                    return self.backoff.wait(self.m.clock())
            if spec.power is PowerState.STOPPED:
                return self._ensure_stopped(spec, seq)
            if self.handle is not None and self.booted_hash != spec.hash:
                self._stop(f"replacing {self.booted_hash or 'unknown'} with {spec.hash}")
                self.replacing = True
            if self.handle is None:
                wait = self.backoff.wait(self.m.clock())
                if wait > 0:
                    self._waiting(spec, seq, wait)
                    return wait
                self._start(spec)
            return self._check(spec, seq)
        except PermanentError as exc:
            self.failed_seq = seq
            self._discard_vmm("its spec failed")
            self._publish(Phase.FAILED, _describe(exc), outcome=exc, event=EventKind.FAILED)
            return None
        except TemporaryError as exc:
            return self._failure(spec, seq, exc)

    def _alive(self) -> bool:
        assert self.handle is not None
        if self.exit_poller is not None:
            # The pidfd turns readable when the VMM exits: one poll(2)
            # instead of reading /proc (a third of a settled VM's check).
            return not self.exit_poller.poll(0)
        return process.is_alive(self.handle.pid, self.handle.pid_start_ticks)

    def _exited(self, spec: VmSpec, seq: int, *, count: bool) -> None:
        """The VMM is gone without being asked to: a failure if ``count``."""
        assert self.handle is not None
        pid = self.handle.pid
        clean = not self.paths.api_socket.exists()
        self.replacing = self.replacing or self.booted_hash not in ("", spec.hash)
        self._forget_vmm()
        if not count:
            log.info("VM %s: VMM pid %s exited (not the desired VM)", self.vm.vm_id, pid)
            return
        now = self.m.clock()
        self.backoff = self.backoff.failed(self.m.policy, now)
        self.last_failure = (
            f"VMM (pid {pid}) exited: the guest powered off"
            if clean
            else f"VMM (pid {pid}) crashed (left its API socket behind)"
        )
        kind = EventKind.STOPPED if clean else EventKind.CRASHED
        self._waiting(spec, seq, self.backoff.wait(now), event=kind, force=True)

    def _waiting(
        self,
        spec: VmSpec,
        seq: int,
        wait: float,
        *,
        event: EventKind | None = None,
        force: bool = False,
    ) -> None:
        """Publish that the VM waits out its restart backoff. Callers waiting
        on this spec get a TemporaryError naming the delay."""
        crash_loop = self.backoff.crash_loop(self.m.policy)
        what = self.last_failure
        message = (
            f"{what + '; ' if what else ''}restart in {wait:.3g} s "
            f"(failure {self.backoff.failures} in a row)"
        )
        with self.vm.cond:
            need_outcome = force or self.vm.outcome_seq < seq
        self._publish(
            Phase.CRASH_LOOP if crash_loop else Phase.PENDING,
            message,
            outcome=TemporaryError(f"VM {spec.vm_id}: {message}", delay=max(wait, 0.1))
            if need_outcome
            else None,
            event=event,
        )

    def _failure(self, spec: VmSpec, seq: int, exc: TemporaryError) -> float | None:
        """An attempt failed and may work later: make sure no half-started
        VMM stays, then back off."""
        how = self._discard_vmm(f"an attempt failed: {exc.message}")
        now = self.m.clock()
        self.backoff = self.backoff.failed(self.m.policy, now)
        wait = self.backoff.wait(now)
        self.last_failure = _describe(exc) + (f"; VMM stopped by {how}" if how else "")
        message = f"{self.last_failure}; retry in {wait:.3g} s"
        crash_loop = self.backoff.crash_loop(self.m.policy)
        # Same class (every TemporaryError shares the base signature), with the
        # VM named and the delay the backoff chose.
        error = type(exc)(
            f"VM {spec.vm_id}: {exc.message}", details=exc.details, delay=max(wait, 0.1)
        )
        self._publish(
            Phase.CRASH_LOOP if crash_loop else Phase.PENDING,
            message,
            outcome=error,
            event=EventKind.CRASHED,
        )
        return wait

    def _start(self, spec: VmSpec) -> None:
        restart = self.backoff.failures > 0
        replacing, self.replacing = self.replacing, False
        if restart:
            self.backoff = self.backoff.restarting()
        self._publish(Phase.STARTING, "restarting VMM" if restart else "starting VMM")
        self._clear_leftovers()
        assert self.vm.flock is not None
        # Recorded before spawning: if this worker dies before the handle is
        # written, the next owner knows to look for an unrecorded VMM.
        self.m.state.write_handles(self.vm.flock, HandlesRecord(self.driver.name, spawning=True))
        handle = launch_vm(self.driver, self.paths, spec.config, timeout=self.t.spawn + self.t.boot)
        self._adopt_handle(handle, spec.hash)
        self.m.state.write_handles(
            self.vm.flock, HandlesRecord(self.driver.name, handle=handle, hash=spec.hash)
        )
        if not self.ever_started and not restart:
            self._publish(Phase.STARTING, f"VM created (VMM pid {handle.pid})", EventKind.CREATED)
        if restart:
            waited = self.m.policy.delay(self.backoff.failures)
            self.pending_event = EventKind.RESTARTED
            self.pending_message = (
                f"restarted after {waited:.3g} s of backoff (failure {self.backoff.failures} "
                f"in a row, restart {self.backoff.restarts}; VMM pid {handle.pid})"
            )
        elif replacing:
            self.pending_event = EventKind.REPLACED
            self.pending_message = f"now runs {spec.hash} (VMM pid {handle.pid})"
        else:
            self.pending_event = EventKind.BOOTED
            self.pending_message = f"booted {spec.hash} (VMM pid {handle.pid})"
        self.backoff = self.backoff.started(self.m.clock())
        self.ever_started = True

    def _check(self, spec: VmSpec, seq: int) -> float | None:
        """Health-check a live VMM and converge its power state."""
        assert self.handle is not None
        try:
            state = self._probe(spec)
        except (VmmTimeout, VmmGone) as exc:
            if not self._alive():
                return 0.0  # it exited meanwhile: the next pass handles that
            self.unanswered += 1
            if self.unanswered < self.t.hung_after:
                return min(self.t.api, self.t.health_interval)
            self.unanswered = 0
            raise VmmTimeout(
                f"VMM (pid {self.handle.pid}) did not answer its health check "
                f"{self.t.hung_after} times in a row (hung): {exc.message}"
            ) from None
        self.unanswered = 0
        event, event_message = self.pending_event, self.pending_message
        self.pending_event, self.pending_message = None, ""
        pausing = state is VmState.RUNNING and spec.power is PowerState.PAUSED
        if pausing or (state is VmState.PAUSED and spec.power is PowerState.RUNNING):
            what = "pause" if pausing else "resume"
            log.info("VM %s: %s (VMM pid %s)", self.vm.vm_id, what, self.handle.pid)
            try:
                (self.driver.pause if pausing else self.driver.resume)(
                    self.handle, timeout=self.t.api
                )
            except (VmmRejected, VmmTimeout) as exc:
                return self._power_change_failed(what, state, seq, exc)
            self.power_failure = None
            self.known_state = None
            after = self._state_after_power_change()
            if after is None:
                return min(self.t.api, self.t.health_interval)
            state = after
            if event is None and pausing:
                event, event_message = EventKind.PAUSED, f"paused (VMM pid {self.handle.pid})"
            elif event is None:
                event = EventKind.RESUMED
                event_message = (
                    f"resumed (VMM pid {self.handle.pid}); the guest clock is not resynced: "
                    f"the {self.driver.name} driver has no guest-clock API"
                )
        if state in (VmState.NOT_CREATED, VmState.CREATED):
            # A start that a previous worker did not finish: begin afresh.
            self._stop(f"VM is {state.value} inside the VMM (unfinished start)")
            return 0.0
        if state is VmState.SHUTDOWN:
            raise VmmError(f"VM is {state.value} inside a live VMM (pid {self.handle.pid})")
        want = VmState.PAUSED if spec.power is PowerState.PAUSED else VmState.RUNNING
        if state not in (want, VmState.BREAKPOINT):
            raise VmmError(f"VM is {state.value}, expected {want.value}")
        phase = Phase.PAUSED if state is VmState.PAUSED else Phase.RUNNING
        power = PowerState.PAUSED if state is VmState.PAUSED else PowerState.RUNNING
        message = f"{state.value} (pid {self.handle.pid})"
        with self.vm.cond:
            need_outcome = not self.vm.converged or self.vm.outcome_seq < seq
        if event is not None and event_message:
            # The event's own words first; the phase message follows at once.
            self._publish(phase, event_message, event, power=power)
            event = None
        self._publish(
            phase, message, event, power=power, outcome=_Outcome.OK if need_outcome else None
        )
        return self.m.health_interval()

    def _state_after_power_change(self) -> VmState | None:
        """The VM's state right after a pause or resume; None when the VMM
        did not answer (the next pass checks again, with the usual
        tolerance for a slow VMM, rather than treating it as a failure)."""
        assert self.handle is not None
        try:
            return self.driver.state(self.handle, timeout=self.t.api)
        except (VmmTimeout, VmmGone):
            return None

    def _power_change_failed(
        self, what: str, state: VmState, seq: int, exc: VmmRejected | VmmTimeout
    ) -> float:
        """The VMM refused (or did not answer) a pause or resume. The VM
        itself is fine as it is: keep it and its VMM, say why the desired
        power is not reached, and try again after the health interval.
        (Treating this like a failed start would kill a healthy guest
        because of a power-state request.) Waiting callers get a temporary
        error each time; the ``failed`` event is sent once per cause, not
        once per retry."""
        assert self.handle is not None
        if isinstance(exc, VmmTimeout) and not self._alive():
            return 0.0  # it exited meanwhile: the next pass handles that
        wait = self.t.health_interval
        cause = _describe(exc)
        message = f"cannot {what}: {cause}; VM left {state.value}, retry in {wait:.3g} s"
        first = self.power_failure != (seq, what, cause)
        self.power_failure = (seq, what, cause)
        if first:
            log.warning("VM %s: %s", self.vm.vm_id, message)
        verb = "refused" if isinstance(exc, VmmRejected) else "not answered"
        error = VmmError(
            f"VM {self.vm.vm_id}: {what} {verb}: {exc.message}", details=exc.details, delay=wait
        )
        paused = state is VmState.PAUSED
        self._publish(
            Phase.PAUSED if paused else Phase.RUNNING,
            message,
            EventKind.FAILED if first else None,
            power=PowerState.PAUSED if paused else PowerState.RUNNING,
            outcome=error,
        )
        return wait

    def _probe(self, spec: VmSpec) -> VmState:
        """One health check: the VM's state, and its counters when they are
        due, in as few API calls as the driver allows.

        Every call costs the worker ~0.2 ms of CPU in situ, so at a thousand
        VMs a state read *and* a counters read per check were most of an
        idle worker's CPU. When counters are due and the driver's
        ``state_mark`` shows the VMM reported no state change since the last
        ``state`` read (cloud-hypervisor writes every transition to its event
        monitor file), the counters call alone is the check: a VMM that
        answers it is not hung and still has its VM, in the state last read.
        Anything else — no mark, a changed mark, a power change to make, a
        counters call that fails — reads the state. Timeouts and a VMM gone
        propagate (the caller counts them towards ``hung_after``)."""
        assert self.handle is not None
        mark = self.driver.state_mark(self.paths)
        due = self._counters_due()
        known = self.known_state
        if due and mark is not None and known is not None and known[0] == mark:
            wanted = VmState.PAUSED if spec.power is PowerState.PAUSED else VmState.RUNNING
            if known[1] is wanted and self._read_counters(fallback_ok=True):
                return known[1]
            due = False  # read (or tried) above
        state = self.driver.state(self.handle, timeout=self.t.api)
        self.known_state = (mark, state) if mark is not None else None
        if due:
            self._read_counters(fallback_ok=False)
        return state

    def _counters_due(self) -> bool:
        """Whether this check should refresh the counters. Half a health
        interval of slack: with both intervals equal (the default) every
        check reads them, not every other one because of timer jitter."""
        if self.t.counters_interval <= 0:
            return False
        elapsed = self.m.clock() - self.last_counters
        return elapsed >= self.t.counters_interval - self.t.health_interval / 2

    def _read_counters(self, *, fallback_ok: bool) -> bool:
        """Refresh the counters; True when the VMM answered them. With
        ``fallback_ok`` (the counters call is the health check) a timeout or
        a VMM gone propagates; otherwise every failure only leaves the old
        counters (the state read already proved the VMM answers)."""
        assert self.handle is not None
        self.last_counters = self.m.clock()
        try:
            counters = self.driver.counters(self.handle, timeout=self.t.api)
        except (VmmTimeout, VmmGone):
            if fallback_ok:
                raise
            log.debug("VM %s: counters unavailable: no answer", self.vm.vm_id)
            return False
        except (VmmError, VmmRejected) as exc:
            log.debug("VM %s: counters unavailable: %s", self.vm.vm_id, exc)
            return False
        with self.vm.cond:
            self.vm.counters = counters
        return True

    def _ensure_stopped(self, spec: VmSpec, seq: int) -> float | None:
        if self.handle is not None:
            self._publish(Phase.STOPPING, "stopping (desired power: stopped)")
            how = self._stop("desired power is stopped")
            event: EventKind | None = EventKind.STOPPED
            message = f"stopped ({how})"
        else:
            event, message = None, "stopped"
        self.backoff = self.backoff.reset().stopped()
        self.last_failure = ""
        with self.vm.cond:
            need_outcome = not self.vm.converged or self.vm.outcome_seq < seq
        self._publish(Phase.STOPPED, message, event, outcome=_Outcome.OK if need_outcome else None)
        return None

    def _remove(self, seq: int) -> bool:
        """Stop the VMM and delete the VM's state; True when done."""
        self._publish(Phase.REMOVING, "removing")
        try:
            how = self._stop("VM removed") if self.handle is not None else "no VMM running"
            self._clear_leftovers()
            assert self.vm.flock is not None
            self.m.state.remove_vm(self.vm.flock)
        except ProcuratorError as exc:
            self._publish(Phase.REMOVING, f"removal failed: {_describe(exc)}", outcome=exc)
            return False
        self._publish(Phase.REMOVING, f"removed ({how})", EventKind.REMOVED, outcome=_Outcome.OK)
        return True

    # -- adoption and cleanup ----------------------------------------------------

    def _adopt(self) -> None:
        """Take over whatever a previous owner left: re-adopt a live VMM,
        clean up after a dead one."""
        record = (
            self.m.state.read_handles(self.vm.vm_id) if self.m.state.exists(self.vm.vm_id) else None
        )
        handle = record.handle if record is not None else None
        booted_hash = record.hash if record is not None else ""
        if handle is None or not process.is_alive(handle.pid, handle.pid_start_ticks):
            if handle is not None:
                log.info("VM %s: recorded VMM pid %s is gone", self.vm.vm_id, handle.pid)
                # It died while nobody watched: starting it again is a restart.
                self.backoff = RestartState(failures=1)
                self.last_failure = f"VMM (pid {handle.pid}) died while the worker was away"
            try:
                self._clear_leftovers()
            except ProcuratorError as exc:
                # The next start tries again (and reports it if it persists).
                log.warning("VM %s: cleaning up after the last owner: %s", self.vm.vm_id, exc)
            return
        if handle.driver != self.driver.name:
            log.warning(
                "VM %s: VMM pid %s was started by driver %s, not %s: stopping it",
                self.vm.vm_id,
                handle.pid,
                handle.driver,
                self.driver.name,
            )
            self._adopt_handle(handle, booted_hash)
            self._stop("started by another driver", api=False)
            return
        self._adopt_handle(handle, booted_hash)
        self.ever_started = True
        self.pending_event = EventKind.READOPTED
        self.pending_message = f"re-adopted VMM pid {handle.pid} running {booted_hash or '?'}"
        log.info("VM %s: re-adopted VMM pid %s", self.vm.vm_id, handle.pid)

    def _adopt_handle(self, handle: VmmHandle, booted_hash: str) -> None:
        self._close_pidfd()
        try:
            self.pidfd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            self.pidfd = -1
        if self.pidfd >= 0 and not process.is_alive(handle.pid, handle.pid_start_ticks):
            # The VMM exited and its pid was taken before the pidfd was
            # opened: the pidfd names another process. /proc tells the truth.
            self._close_pidfd()
        if self.pidfd >= 0:
            self.exit_poller = select.poll()
            self.exit_poller.register(self.pidfd, select.POLLIN)
        self.poller = None
        self.handle = handle
        self.booted_hash = booted_hash
        self.unanswered = 0
        self.known_state = None
        with self.vm.cond:
            self.vm.handle = handle

    def _forget_vmm(self) -> None:
        """The VMM is known dead: reap it, drop its handle and leftovers."""
        if self.handle is not None and not process.wait_exit(
            self.handle.pid, self.handle.pid_start_ticks, self.t.sigkill_wait
        ):
            # Its main thread is gone but the rest still exits (and holds the
            # socket's lock): the cleanup below would fail, so wait for it.
            raise VmmError(
                f"VM {self.vm.vm_id}: VMM pid {self.handle.pid} is still exiting after "
                f"{self.t.sigkill_wait:g} s"
            )
        self._close_pidfd()
        self.handle = None
        self.booted_hash = ""
        with self.vm.cond:
            self.vm.handle = None
            self.vm.counters = {}
        self._clear_leftovers()

    def _clear_leftovers(self) -> None:
        """With no VMM of ours alive: kill unrecorded VMMs of this VM, remove
        a stale API socket and the handles file. Runs under the VM's flock."""
        assert self.vm.flock is not None
        vm_dir = self.paths.vm_dir
        if not vm_dir.exists():
            return
        if self._may_have_unrecorded_vmm():
            for pid, ticks in process.find_launched(self.paths.vm_dir):
                log.warning("VM %s: killing VMM pid %s that no handle recorded", self.vm.vm_id, pid)
                process.terminate(pid, ticks, grace=self.t.sigterm_wait)
        _remove_stale_socket(self.paths.api_socket)
        self.m.state.clear_handles(self.vm.flock)

    def _may_have_unrecorded_vmm(self) -> bool:
        """Whether a VMM that no handle records may run for this VM: the
        handles file says a spawn began but no pid was recorded (the worker
        died in between), is unreadable, or is gone while the socket stays.
        A recorded handle rules it out — every spawn is preceded by a
        ``spawning`` record and followed by the handle, under the VM's flock
        — and spares a scan of every process's environment (/proc), which
        on a host of a thousand VMMs costs more than the rest of a restart."""
        try:
            record = self.m.state.read_handles(self.vm.vm_id)
        except ProcuratorError:
            return True
        if record is None:
            return self.paths.api_socket.exists()
        return record.handle is None

    def _discard_vmm(self, why: str) -> str | None:
        """Stop a VMM that cannot serve the spec; returns the ladder step that
        ended it (None when there was none)."""
        if self.handle is None:
            return None
        try:
            return self._stop(why)
        except ProcuratorError as exc:
            log.error(  # noqa: TRY400 - an expected failure, the message says it all
                "VM %s: could not stop its VMM after %s: %s", self.vm.vm_id, why, exc
            )
            return None

    def _close_pidfd(self) -> None:
        self.poller = self.exit_poller = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    # -- stop ladder -------------------------------------------------------------

    def _resume_for_shutdown(self, handle: VmmHandle) -> None:
        """A paused guest cannot answer the power button: resume it first so
        it shuts down cleanly (flushes its disks) rather than waiting out
        the button and being cut off further down the ladder."""
        try:
            if self.driver.state(handle, timeout=self.t.api) is VmState.PAUSED:
                log.info("VM %s: resuming the paused guest so it can shut down", self.vm.vm_id)
                self.driver.resume(handle, timeout=self.t.api)
        except (VmmError, VmmRejected) as exc:
            log.info("VM %s: not resumed before stopping: %s", self.vm.vm_id, exc)

    def _stop(self, reason: str, *, api: bool = True) -> str:
        """Run the stop ladder; returns the step that ended the VMM. Raises
        ``_StopFailed`` if it survives SIGKILL."""
        assert self.handle is not None
        handle = self.handle
        log.info("VM %s: stopping VMM pid %s: %s", self.vm.vm_id, handle.pid, reason)
        t = self.t

        def gone(wait: float) -> bool:
            return process.wait_exit(handle.pid, handle.pid_start_ticks, wait)

        how = ""
        if gone(0.0):
            how = "already exited"
        elif api:
            self._resume_for_shutdown(handle)
        steps: list[tuple[str, Callable[[], None], float]] = [
            (
                "power button",
                lambda: self.driver.power_button(handle, timeout=t.api),
                t.power_button_wait,
            ),
            ("vm.shutdown", lambda: self.driver.shutdown_vm(handle, timeout=t.api), 0.0),
            (
                "vmm.shutdown",
                lambda: self.driver.shutdown_vmm(handle, timeout=t.api),
                t.shutdown_vmm_wait,
            ),
        ]
        for name, call, wait in steps:
            if how or not api:
                break
            try:
                call()
            except VmmTimeout as exc:
                log.warning("VM %s: %s: %s; API hung, signals next", self.vm.vm_id, name, exc)
                api = False
                continue
            except (VmmError, VmmRejected) as exc:
                log.info("VM %s: %s not taken: %s", self.vm.vm_id, name, exc)
                if gone(0.0):
                    how = name
                continue
            if gone(wait):
                how = name
        for sig, wait in ((signal.SIGTERM, t.sigterm_wait), (signal.SIGKILL, t.sigkill_wait)):
            if how:
                break
            process.signal_process(handle.pid, handle.pid_start_ticks, sig)
            if gone(wait):
                how = sig.name
        if not how:
            raise _StopFailed(
                f"VM {self.vm.vm_id}: VMM pid {handle.pid} survived SIGKILL for "
                f"{t.sigkill_wait:g} s"
            )
        log.info("VM %s: VMM pid %s stopped by %s", self.vm.vm_id, handle.pid, how)
        self._forget_vmm()
        return how

    # -- publishing --------------------------------------------------------------

    def _publish(
        self,
        phase: Phase,
        message: str,
        event: EventKind | None = None,
        *,
        power: PowerState | None = None,
        outcome: _Outcome | ProcuratorError | None = None,
    ) -> None:
        vm = self.vm
        with vm.cond:
            spec = vm.desired
            obs = replace(
                vm.obs,
                phase=phase,
                message=message,
                power=power
                if power is not None
                else (PowerState.STOPPED if self.handle is None else vm.obs.power),
                restarts=self.backoff.restarts,
                pid=self.handle.pid if self.handle is not None else None,
                observed_hash=self.booted_hash if self.handle is not None else "",
            )
            if spec is not None:
                obs = replace(
                    obs,
                    hash=spec.hash,
                    desired_power=spec.power,
                    labels=spec.labels,
                    op_id=spec.op_id,
                )
            changed = obs != vm.obs
            vm.obs = obs
            if outcome is not None:
                vm.outcome_seq = self.seq
                vm.outcome_count += 1
                vm.outcome_error = outcome if isinstance(outcome, ProcuratorError) else None
                vm.converged = vm.outcome_error is None
                vm.cond.notify_all()
            op_id = vm.remove_op_id if vm.remove_requested and vm.remove_op_id else obs.op_id
        if event is not None:
            log.info("VM %s: %s: %s", vm.vm_id, event.value, message)
        if changed or event is not None:
            self.m._emit(
                obs,
                VmEvent(
                    vm_id=vm.vm_id,
                    kind=event,
                    message=message,
                    op_id=op_id,
                    unix_time_ms=int(time.time() * 1000),
                )
                if event is not None
                else None,
            )


def _describe(exc: ProcuratorError) -> str:
    """One line for an operator: the message and the VMM's error chain."""
    text = exc.message
    if exc.details:
        text += ": " + "; ".join(exc.details)
    return text


def _remove_stale_socket(path: Path) -> None:
    """Remove an API socket no live VMM serves. cloud-hypervisor >= v53 holds
    a flock on ``<socket>.lock`` while it runs: if that lock is held, a live
    VMM (one we do not know of) owns the socket and it is left alone."""
    if not path.exists():
        return
    lock_path = Path(f"{path}.lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise VmmError(
                        f"API socket {path} is held by a live VMM that no handle records "
                        f"(its {lock_path.name} is locked)"
                    ) from None
                raise
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log.info("removed stale API socket %s", path)
    finally:
        if fd >= 0:
            os.close(fd)
