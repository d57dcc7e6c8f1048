"""VmManager: one supervised VMM process per VM, safe across worker crashes.

The reconciler (trio) calls this blocking, thread-safe API through
``trio.to_thread.run_sync`` with a ``CapacityLimiter``:

    ensure(spec)   make the VM run (or pause, or stop) ``spec``; block until done
                   (``assigned=False``: the worker's own change, e.g. the fence)
    remove(id)     stop the VM and delete its state
    run_job(id, what, fn)  run fn in a turn of the VM's supervisor (snapshots)
    get(id), list()            observations (no I/O)
    counters()                 the last polled device counters (no I/O)
    poll_counters()            refresh them now (I/O, blocking)
    sweep()                    one pass of the sweep (below), on the caller's thread
    recover()      at worker start: rebuild from the state dir and the OS
    close()        stop supervising; the VMMs keep running

Ownership. Each VM has one supervisor (``procurator.worker.supervisor``),
and only its turns talk to the VM's VMM for lifecycle (``poll_counters``
only reads counters from the caller's thread). API callers never touch the
VMM: they write the desired spec into the VM's record as a new *request* (a
number bumped whenever the target — hash, power or removal — changes), wake
the supervisor and wait for an *outcome* of that request: the VM reached
it, or an attempt failed. So every lifecycle decision for a VM is made in
one sequence of turns (``procurator.core.supervision.decide``), a health
check can never race a replacement, and a crash seen by the supervisor is
handled the same way whether or not someone is waiting.

Threads (issue 31; ``procurator.worker.turns``): a supervisor's turns run
on whichever thread the record hands them to, one at a time. ``ensure``
drives them on the caller's own thread (it waits for the answer anyway: a
start or a replacement crosses no thread between caller and supervisor)
until the VM parks, or the pool takes over after the turn in which
``Timeouts.ensure`` passed: so an ``ensure`` returns at most one step
(a launch: ``spawn`` + ``boot``; a stop ladder) after its deadline, where
a waiting caller returned at it. Every other wake (a removal, the VMM's
exit, the sweep, a job, a backoff's or a timed check's deadline) resumes
a parked VM on the manager's ``TurnPool``, a few threads that grow past
their cap only while all of them are stuck. A settled VM parks on no thread:
10,000 idle VMs cost the threads of the pool, the sweep and the exit
watcher, not 10,000.

The outcome rules: a VM is converged when the last outcome answers the
current request without an error; ``ensure`` of the target it is converged
on returns at once, of one whose last outcome is an error raises that error
at once, and otherwise waits (``Timeouts.ensure`` at most) for an outcome
of its request.

Crash safety (see ``procurator.worker.state``): the manager holds the state
dir's owner lock from its first VM until it closes, and claims each VM it
manages under it (``StateDir.claim``: one descriptor for the whole fleet),
so no other process can launch a VMM for any of them; VMMs run in their own
session and outlive the worker; the durable ``vm.json`` is written before
acting on a spec, and ``handles.json`` before launching (``spawning``) and
right after (pid, start ticks), so a restarted worker finds every VMM it may
have started: a recorded one by pid and start ticks, an unrecorded one by
the marker it was launched with (``process.launch_env``: its environment
names the VM's directory). A VMM found alive is re-adopted, never restarted
or duplicated; one found dead is cleaned up (its stale socket removed while
the VM is owned) and started again if still desired — unless it is a
``reschedule`` VM (below).

Recovery never starts a ``reschedule`` VM. A worker starts before its first
assignment arrives (after a reboot, or a worker that was lost and comes
back), and the master may have moved such a VM to another worker meanwhile:
started here, it would run twice until that assignment removed it. So
``recover`` *holds* each VM whose ``vm.json`` says ``reschedule`` and
desired running or paused (``VmRecord.held``): a live VMM is re-adopted as
any other (keeping a running VM running is the fence's business, not
recovery's: ``procurator.core.fence``), but no VMM is launched for it —
not for a dead one, not after a crash — until an ``ensure`` that comes from
an assignment names it (``assigned=True``, the default; the fence's own
pause passes False and lifts nothing). Meanwhile it shows as ``pending``,
not running, saying why. ``wait`` VMs (and pinned ones) are restarted at
once as before: the master never moves them, so they cannot run twice, and
restarting them early shortens their outage.

The sweep: idle VMs cost one API call per counters interval, on one thread.
With a driver whose ``state_mark`` tells every state change of the VM
(``Capabilities.state_marks``: cloud-hypervisor's event monitor file) and
``Timeouts.counters_interval`` > 0, the manager runs one sweep thread. A
settled supervisor then has nothing timed to do: it publishes its VMM and
the mark of its last state read (``VmRecord.swept``) and parks with no
deadline, until a wake (``VmRecord.wake``: a request, the sweep, or the
manager's ``process.ExitWatcher`` when its VMM exits). Every counters interval the
sweep, for each such VM, compares the mark (a ``stat``, no API call) and
reads the counters (one call, at most ``SWEEP_CALL_TIMEOUT``): they are what
the metrics poller reports, and an answer proves the API answers and the VM
still exists. A changed or missing mark, or a call that fails or does not
answer, asks the supervisor to read the state (``VmRecord.check_asked``, and
a wake): its own check, with the full API timeout, counts unanswered
checks towards ``hung_after`` as before. So a hung VMM is escalated within
one counters interval plus ``hung_after`` API timeouts and one
``retry_unanswered`` (15 + 5 + 5 + 5 s = 30 s by default, at any fleet
size), a VMM that exits is still seen at once (pidfd), a transition the VMM
reports within one interval, and a hung VMM delays the others' counters by
``SWEEP_CALL_TIMEOUT`` once (the sweep skips a VM until its supervisor waits
idle again). Drivers without marks (QEMU) and ``counters_interval`` 0 keep
the supervisors' own timed checks (``Timeouts.health_interval``, stretched
by ``health_checks_per_second``), with the counters riding on them.

Lock order (acquire in this order only; never call the driver or do file I/O
while holding the map lock or a VM's condition lock):

    1. VmRecord.op_lock      per VM; serialises ensure/remove/attach for that VM
    2. VmManager._map_lock   the id -> VmRecord map only
    3. VmRecord.cond         the VM record's shared fields (desired spec,
                        request, outcome, observation, counters, who drives
                        its turns); waited on by callers
    4. TurnPool._lock        leaf; the pool's queue, deadlines and threads

A thread driving a supervisor's turns holds no lock but, for ``ensure``,
the caller's op_lock (1); the turns take only 3 (briefly,
to read the desired spec and to publish) and 4 (to park on a deadline or
hand over), never 1; ``on_change`` is called from the turns with no lock
of the manager's held (the caller's op_lock may be).
The sweep thread takes 2 to copy the map and 3 to read and write a VM's
``swept``, ``check_asked`` and ``counters``, never around a driver call.

Operation ids. Every log record a supervisor writes carries the VM's
``vm_id`` and the ``op_id`` of the spec it is converging (or of the removal
it is carrying out), bound in its own context (``procurator.logs.bind``);
every ``VmEvent`` carries the same op id. Callers' threads log with the
fields of their own context.

Events: ``created`` (first VMM of this VM), ``booted``, ``crashed`` (with the
restart delay), ``restarted`` (after N s of backoff), ``replaced`` (new
hash), ``stopped`` (desired power stopped, or the guest powered off),
``paused``, ``resumed``, ``failed`` (with the reason), ``readopted`` (a VMM
found alive by a new worker) and ``removed``.

Incoming VMs (a live move's target side; docs/SNAPSHOTS.md, "Live
moves"): ``ensure`` of a spec with ``incoming`` (``vmrecord.Incoming``)
holds the VM in an incoming VMM (``VmmDriver.launch_incoming``): launched
once, never booted, probed or restarted, its observation ``incoming``
naming the move (not a VM of this worker's yet: the caller keeps it out of
the reconciler and the status); a failed launch is reported and not tried
again for that request. ``ensure`` of the same hash without ``incoming``
(the move's switch) lets it run (``finish_incoming``); if that fails, the
VM boots from its disk copies. Its VMM does not survive the worker, its
disk copies do: ``recover`` stops the VMM of a VM it finds held incoming
(booted, it would run beside its source) and names the VM in
``incoming_dropped`` for the move, but keeps its directory (once the
source sent, the copies the source mirrored there are the guest's only
up-to-date disks) and launches nothing for it (``VmSupervisor.
kept_incoming``) until the spec changes: the switch's spec (the same
hash, no longer incoming) boots it cold from those copies, a removal
(the move failed: the move service's) deletes them, and an incoming spec
of the same move keeps it held.

Guest clock after resume: neither cloud-hypervisor (v53 API) nor QEMU
without a guest agent offers a way to set the guest's clock (their
``Capabilities.guest_clock`` is false), so a resumed guest's wall clock lags
by the time it was paused until the guest corrects it itself (NTP, chrony).
The ``resumed`` event says so; nothing pretends to resync it.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

from procurator.core.backoff import RestartPolicy
from procurator.core.errors import (
    NotFoundError,
    PermanentError,
    ProcuratorError,
    TemporaryError,
)
from procurator.core.models import PowerState, VmEvent
from procurator.worker.jail import Jail
from procurator.worker.state import OwnerLock, StateDir
from procurator.worker.supervisor import JobContext, VmSupervisor
from procurator.worker.turns import TurnPool
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmDriver, VmmError, VmmRejected
from procurator.worker.vmrecord import (
    ChangeCallback,
    Job,
    SweepWatch,
    Timeouts,
    VmObservation,
    VmRecord,
    VmSpec,
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

T = TypeVar("T")

SWEEP_CALL_TIMEOUT = 1.0
"""Seconds the sweep waits for one VMM's counters (at most ``Timeouts.api``).
A VMM slower than that is only asked for a check by its supervisor, which
waits the full API timeout: short, so one hung VMM holds up the sweep of
the others this long, once."""


class ManagerClosedError(TemporaryError):
    """The VmManager was closed (the worker is shutting down)."""


class _EndedBefore(ManagerClosedError):
    """The VM's supervisor ended (it finished a removal) before it took in
    the request waited for: ``ensure`` and ``remove`` start over on a new
    record (for ``remove``, none once the removal deleted the VM)."""


class VmManager:
    """Runs one VMM per VM through ``driver``; state under ``state_dir``;
    each VMM in ``jail`` (``procurator.worker.jail``; None: unjailed, as
    the worker's ``--unconfined``).

    ``on_change(observation, event)`` is called from the threads driving
    supervisors' turns, with no lock of the manager's held (an ``ensure``
    caller's op_lock may be), on every observable change; it must be quick
    and must not call back into the manager's blocking methods.
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
        jail: Jail | None = None,
    ) -> None:
        self.state = StateDir(state_dir)
        self.state.prepare()
        self.driver = driver
        # Every VMM is launched in it (None: --unconfined, as root).
        self.jail = jail
        self.policy = policy or RestartPolicy()
        self.timeouts = timeouts or Timeouts()
        self.on_change = on_change
        self.clock = clock
        self._map_lock = threading.Lock()  # level 2
        self._vms: dict[str, VmRecord] = {}
        self._closed = False
        # The sweep (module docstring): on when the driver's marks tell the
        # VM's transitions and there are counters to read. Its thread starts
        # with the first supervisor (guarded by the map lock).
        self.sweeping = driver.capabilities.state_marks and self.timeouts.counters_interval > 0
        self._sweep_stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        # The threads that run parked supervisors' turns when woken
        # (procurator.worker.turns): a few, not one per VM.
        self.turns = TurnPool(clock=clock)
        # One thread waits for every VMM's exit (process.ExitWatcher), made
        # with the first VMM watched; a leaf lock guards making it.
        self._watcher_lock = threading.Lock()
        self._watcher: process.ExitWatcher | None = None
        # The state dir's owner lock (StateDir.lock_owner), taken with the
        # first VM and released by close; a leaf lock guards taking it.
        self._owner_lock = threading.Lock()
        self._owner: OwnerLock | None = None
        # VM id -> the op id of the live move ``recover`` found it held
        # incoming for (and removed); guarded by the map lock.
        self.incoming_dropped: dict[str, str] = {}

    # -- public API --------------------------------------------------------------

    @property
    def closed(self) -> bool:
        with self._map_lock:
            return self._closed

    def health_interval(self) -> float:
        """Seconds between one settled VM's health checks: the configured
        ``health_interval``, or longer when the manager holds more VMs than
        ``health_checks_per_second`` allows to check that often (for VMs
        the sweep does not check: ``sweeping`` False). The worker's
        background load of API calls then stays bounded whatever its fleet
        size; the price is that a hung VMM goes unnoticed for up to
        ``hung_after`` such intervals (a VMM that exits is still seen at
        once through its pidfd). Reads the map's size without the map lock:
        a size one VM off only moves one wait."""
        t = self.timeouts
        if t.health_checks_per_second <= 0:
            return t.health_interval
        return max(t.health_interval, len(self._vms) / t.health_checks_per_second)

    def ensure(self, spec: VmSpec, *, assigned: bool = True) -> VmObservation:
        """Make the VM be ``spec``: idempotent; blocks until the VMM reports
        the desired state (``Timeouts.ensure`` at most). ``assigned``: the
        spec is what the master assigns, so it lifts the hold ``recover``
        put on a ``reschedule`` VM (False: the worker's own change, such as
        the fence's pause, which starts no held VM).

        Raises ``PermanentError`` when the VMM refused the spec (retrying the
        same spec will not help) and ``TemporaryError`` when an attempt
        failed, the VM is waiting out a restart backoff, another process owns
        the VM, or it did not converge in time (the supervisor keeps trying).

        A supervisor that ends before taking the request in (it finished a
        removal whose caller gave up, deleting the VM's directory) does not
        fail the ensure: it starts over on a new supervisor.
        """
        StateDir.check_id(spec.vm_id)
        while True:
            try:
                return self._ensure_once(spec, assigned=assigned)
            except _EndedBefore:
                # Its supervisor finished a removal nobody waited for any
                # more (a remove() that timed out or failed, retried by the
                # supervisor alone) before it took this request in, and the
                # removal deleted the vm.json written for it: start over on
                # a new record (``_attached`` retires the ended one).
                log.info("VM %s: ensure starts over on a new supervisor", spec.vm_id)

    def _ensure_once(self, spec: VmSpec, *, assigned: bool) -> VmObservation:
        with self._attached(spec.vm_id, create=True) as vm:
            assert vm is not None
            with vm.cond:
                current, answered, removing = vm.desired, vm.answered(), vm.removing
                lift = assigned and vm.held
            if not removing and not lift and spec.same_target(current):
                if current != spec:
                    self._write_spec(vm, spec)
                    with vm.cond:
                        vm.desired = spec
                        vm.obs = vm.obs.for_spec(spec)
                if answered is not None and answered.error is None:
                    return self.get_or_raise(spec.vm_id)
                if answered is not None and answered.error is not None:
                    raise copy.copy(answered.error)  # one instance per raise: threads
            else:
                self._write_spec(vm, spec)
                with vm.cond:
                    vm.desired = spec
                    vm.removing = False
                    vm.remove_op_id = ""
                    vm.request += 1
                    vm.obs = vm.obs.for_spec(spec)
                    if assigned:
                        vm.held = False
                vm.poke()
            self._wait_outcome(vm, f"ensure {spec.hash}", drive=True)
            return self.get_or_raise(spec.vm_id)

    def remove(self, vm_id: str, *, op_id: str = "") -> None:
        """Stop the VM (stop ladder) and delete its state. Idempotent.
        ``op_id``: the operation asking for it, for logs and the event.

        A supervisor that ends before taking the request in (it finished a
        removal whose caller gave up) does not fail the remove: it starts
        over, and finds the VM gone (done) or, if the supervisor ended
        without removing it, removes it on a new supervisor.
        """
        StateDir.check_id(vm_id)
        while True:
            try:
                self._remove_once(vm_id, op_id=op_id)
            except _EndedBefore:
                # Its supervisor finished an earlier removal nobody waited
                # for any more (a remove() that timed out or failed, retried
                # by the supervisor alone) and ended, answering that removal's
                # request, not this one's: ``_attached`` retires the ended
                # record and yields None once the VM's directory is gone.
                log.info("VM %s: remove starts over after its supervisor ended", vm_id)
            else:
                return

    def _remove_once(self, vm_id: str, *, op_id: str) -> None:
        with self._attached(vm_id, create=False) as vm:
            if vm is None:
                return
            with vm.cond:
                vm.removing = True
                vm.remove_op_id = op_id
                vm.request += 1
            # On the pool, not on this thread: a removal nobody waits for any
            # more (this call timed out) goes on alone.
            vm.wake()
            self._wait_outcome(vm, "remove")
            self._retire(vm)

    def run_job(self, vm_id: str, what: str, run: Callable[[JobContext], T]) -> T:
        """Run ``run`` in a turn of the VM's supervisor, between two of its
        steps (``procurator.worker.supervisor.JobContext``), and return
        what it returned or raise what it raised. Holds the VM's op_lock
        throughout, so no ensure or remove of the VM runs meanwhile (they
        wait for it). ``NotFoundError`` when the VM is not managed here;
        ``TemporaryError`` when the job did not start within
        ``Timeouts.ensure`` (it is then dropped, never run later)."""
        StateDir.check_id(vm_id)
        with self._attached(vm_id, create=False) as vm:
            if vm is None:
                raise NotFoundError(f"VM {vm_id} is not on this worker")
            job = Job(what, run)
            with vm.cond:
                vm.jobs.append(job)
            vm.wake()
            deadline = self.clock() + self.timeouts.ensure
            with vm.cond:
                while not job.done:
                    if (vm.finished or vm.closing) and not job.started:
                        job.cancelled = True
                        raise ManagerClosedError(
                            f"VM {vm_id}: supervisor stopped before {what} started"
                        )
                    left = deadline - self.clock()
                    if left <= 0 and not job.started:
                        job.cancelled = True
                        raise TemporaryError(
                            f"VM {vm_id}: {what} did not start within "
                            f"{self.timeouts.ensure:g} s ({vm.obs.phase.value}: {vm.obs.message})"
                        )
                    # Once started, a job is waited for to its end: it
                    # bounds its own steps, and its caller must learn how
                    # it ended.
                    vm.cond.wait(left if left > 0 else self.timeouts.health_interval)
            if job.error is not None:
                raise job.error
            return job.result  # type: ignore[return-value]  # what run returned

    def get(self, vm_id: str) -> VmObservation | None:
        with self._map_lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return None
        with vm.cond:
            return vm.obs

    def incoming_received(self, vm_id: str, op_id: str) -> bool:
        """Whether the VM held incoming for move ``op_id`` has its whole
        state in its VMM, which runs it (``VmmDriver.incoming_received``:
        cloud-hypervisor only). Non-blocking; False for a VM not held
        incoming for that op."""
        with self._map_lock:
            vm = self._vms.get(vm_id)
        if vm is None:
            return False
        with vm.cond:
            handle = vm.handle if vm.obs.incoming == op_id else None
        return handle is not None and self.driver.incoming_received(handle)

    def get_or_raise(self, vm_id: str) -> VmObservation:
        obs = self.get(vm_id)
        if obs is None:
            raise TemporaryError(f"VM {vm_id} is no longer managed (removed meanwhile)")
        return obs

    def specs(self) -> builtins.list[VmSpec]:
        """The spec each managed VM converges to (what its ``vm.json``
        says), by VM id; VMs being removed are left out."""
        with self._map_lock:
            vms = list(self._vms.values())
        found = []
        for vm in vms:
            with vm.cond:
                if vm.desired is not None and not vm.removing:
                    found.append(vm.desired)
        return sorted(found, key=lambda s: s.vm_id)

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

    def sweep(self) -> None:
        """One pass of the sweep (module docstring) over the VMs whose
        supervisors wait idle on it: compare each one's state mark, read its
        counters, and ask its supervisor for a check when the mark moved or
        the VMM did not answer. Blocking; the sweep thread calls it every
        ``counters_interval``."""
        with self._map_lock:
            vms = list(self._vms.values())
        timeout = min(self.timeouts.api, SWEEP_CALL_TIMEOUT)
        for vm in vms:
            if self._sweep_stop.is_set():
                return  # closing: a sweep of 10,000 VMs takes a second or more
            with vm.cond:
                watch = vm.swept
            if watch is None:
                continue
            mark = self.driver.state_mark(watch.paths)
            if mark is None or mark != watch.mark:
                self._ask_check(vm, watch)
                continue
            try:
                counters = self.driver.counters(watch.handle, timeout=timeout)
            except (VmmError, VmmRejected) as exc:
                log.debug("VM %s: sweep: %s; asking for a check", vm.vm_id, exc)
                self._ask_check(vm, watch)
                continue
            with vm.cond:
                if vm.handle == watch.handle:
                    vm.counters = counters

    @staticmethod
    def _ask_check(vm: VmRecord, watch: SweepWatch) -> None:
        """Have the VM's supervisor read its VMM's state now; the sweep
        leaves the VM alone until the supervisor waits idle again."""
        with vm.cond:
            if vm.swept is not watch:
                return  # the supervisor woke meanwhile: it looks for itself
            vm.swept = None
            vm.check_asked = True
        vm.wake()

    def _run_sweeps(self) -> None:
        """The sweep thread: a sweep every ``counters_interval`` until closed."""
        interval = self.timeouts.counters_interval
        next_at = self.clock() + interval
        while not self._sweep_stop.wait(max(0.0, next_at - self.clock())):
            next_at += interval
            try:
                self.sweep()
            except Exception:  # a bug must not end the checks of every VM
                log.exception("the VMs' sweep failed; the next one in %g s", interval)
            # Behind (a sweep longer than the interval): the next one starts
            # an interval after this one ended, not at once.
            next_at = max(next_at, self.clock())

    def exit_watcher(self) -> process.ExitWatcher:
        """The manager's one watcher of its VMMs' exits (made on first use;
        closed by ``close`` after the supervisors ended)."""
        with self._watcher_lock:
            if self._watcher is None:
                self._watcher = process.ExitWatcher()
            return self._watcher

    def _start_sweeper(self) -> None:
        """Start the sweep thread once (with the first supervisor)."""
        if not self.sweeping:
            return
        with self._map_lock:
            if self._sweeper is not None or self._closed:
                return
            self._sweeper = threading.Thread(target=self._run_sweeps, name="vm-sweep", daemon=True)
        self._sweeper.start()

    def recover(self) -> builtins.list[VmObservation]:
        """Take over every VM found in the state dir: re-adopt live VMMs,
        clean up and restart dead ones that are still desired (a
        ``reschedule`` one is held instead: see the module docstring), and
        delete lock files no VM directory goes with (``StateDir.sweep_locks``).
        Blocks until each VM's supervisor reported its first outcome (or
        ``ensure`` timeout). VMs another process owns are skipped (logged)."""
        attached: list[VmRecord] = []
        for vm_id in self.state.vm_ids():
            try:
                with self._attached(vm_id, create=False, recovering=True) as vm:
                    if vm is not None:
                        attached.append(vm)
                        vm.wake()  # on the pool: recovered side by side
            except ProcuratorError as exc:
                log.error("VM %s: not recovered: %s", vm_id, exc)  # noqa: TRY400 - expected, no trace
        # Lock files of VMs that have no directory: a worker killed just
        # before making a VM's directory or just after deleting it. Only now,
        # with every VM found above locked, is "no VM" known.
        with self._map_lock:
            managed = set(self._vms)
        swept = self.state.sweep_locks(managed)
        if swept:
            log.info("removed the lock files of VMs that are gone: %s", ", ".join(swept))
        result = []
        for vm in attached:
            removed = True
            try:
                self._wait_outcome(vm, "recover")
            except ProcuratorError as exc:
                removed = False
                log.warning("VM %s: recovered with a problem: %s", vm.vm_id, exc)
            with vm.cond:
                removed = removed and vm.removing
            if removed:
                # Its removal is done; its supervisor ends right after.
                self._wait_finished(vm, self.timeouts.ensure)
            with vm.cond:
                finished = vm.finished
                if not finished:
                    result.append(vm.obs)
            if finished:
                # Removed by its supervisor (one whose creation never
                # completed): no longer this worker's, so the
                # sweeps that follow (taps, cgroups, GC roots) release what
                # it held.
                with vm.op_lock:
                    if not vm.gone:
                        self._retire(vm)
        return result

    def begin_close(self) -> None:
        """Refuse new calls, make every blocked ``ensure``/``remove`` return
        (``ManagerClosedError``: one that drives its VM's turns, once its
        current step is over) and ask every supervisor to end after its
        current step. Does not wait: a caller shutting down calls this
        before it waits for the threads blocked in those calls, then
        ``close``."""
        self._begin_close()

    def _begin_close(self) -> builtins.list[VmRecord]:
        with self._map_lock:
            self._closed = True
            vms = list(self._vms.values())
        self._sweep_stop.set()
        for vm in vms:
            with vm.cond:
                vm.closing = True
                vm.cond.notify_all()
            vm.wake()
        return vms

    def close(self) -> None:
        """End every supervisor (after its current step) and the pool, and
        release the VMs' locks. The VMMs
        keep running, to be re-adopted by the next manager (``recover``)."""
        vms = self._begin_close()
        if self._sweeper is not None:
            self._sweeper.join()
        for vm in vms:
            self._wait_finished(vm, None)
        self.turns.close()
        with self._map_lock:
            self._vms.clear()
        with self._watcher_lock:
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()
        with self._owner_lock:
            if self._owner is not None:
                self._owner.release()
                self._owner = None

    # -- records -----------------------------------------------------------------

    @contextlib.contextmanager
    def _attached(
        self, vm_id: str, *, create: bool, recovering: bool = False
    ) -> Iterator[VmRecord | None]:
        """The VM's record with its op_lock held, its supervisor running.
        With ``create=False`` a VM that is neither managed nor on disk
        yields None. ``recovering``: a supervisor started now holds a
        ``reschedule`` VM (``recover``)."""
        while True:
            vm = self._record(vm_id, create=create)
            if vm is None:
                yield None
                return
            with vm.op_lock:
                with vm.cond:
                    finished = vm.finished
                if finished and not vm.gone:
                    # Its supervisor ended (the VM was removed): retire it.
                    self._retire(vm)
                if vm.gone:
                    continue
                if not vm.started:
                    self._start_supervisor(vm, create=create, recovering=recovering)
                yield vm
                return

    def _record(self, vm_id: str, *, create: bool) -> VmRecord | None:
        """The VM's record, made when it is new (``create``, or found on
        disk); None when there is none to make."""
        # Looked at before taking the map lock (no file I/O under it); a VM
        # appearing meanwhile only does so under its flock, which the new
        # record takes before acting.
        on_disk = create or self.state.exists(vm_id)
        with self._map_lock:
            if self._closed:
                raise ManagerClosedError("the VM manager is closed")
            vm = self._vms.get(vm_id)
            if vm is None and on_disk:
                vm = self._vms[vm_id] = VmRecord(vm_id, self.driver.name)
            return vm

    def _start_supervisor(self, vm: VmRecord, *, create: bool, recovering: bool = False) -> None:
        """Take the VM's flock, read its ``vm.json`` and start its supervisor
        (parked until its first wake; caller holds its op_lock). On failure
        the record is retired."""
        try:
            flock = self.state.claim(vm.vm_id, self._own_state())
            try:
                spec = self._read_spec(vm.vm_id)
            except BaseException:
                flock.release()
                raise
        except BaseException:
            vm.gone = True
            with self._map_lock:
                if self._vms.get(vm.vm_id) is vm:
                    del self._vms[vm.vm_id]
            raise
        vm.flock = flock
        # Held incoming for a live move when the worker stopped: the move's
        # state is gone with this worker's memory of it, and booted the VM
        # would run beside its source. Its VMM is stopped and no VMM
        # launched for it, but its directory stays: once the source sent,
        # the disk copies mirrored there are the guest's only up-to-date
        # disks. Held until the assignment decides (the supervisor's
        # ``kept_incoming``), and the move told (``incoming_dropped``).
        kept = spec.incoming.op_id if recovering and spec is not None and spec.incoming else ""
        if kept:
            log.warning(
                "VM %s: held incoming for move %s when the worker stopped: its VMM is "
                "stopped, its disk copies kept until the move ends",
                vm.vm_id,
                kept,
            )
            with self._map_lock:
                self.incoming_dropped[vm.vm_id] = kept
        with vm.cond:
            vm.desired = spec
            # Found on disk without vm.json (not being created now): a VM whose
            # creation never completed. Clean it up.
            vm.removing = spec is None and not create
            if spec is not None:
                vm.obs = vm.obs.for_spec(spec)
            # Recovered before any assignment: a reschedule VM may have been
            # moved meanwhile, so nothing launches it until one names it.
            vm.held = (
                recovering
                and spec is not None
                and spec.reschedule
                and spec.power is not PowerState.STOPPED
            )
        supervisor = VmSupervisor(self, vm, kept_incoming=kept)
        turns = self.turns
        with vm.cond:
            # Parked until its first wake (the caller's, next).
            vm.drive = supervisor.drive
            vm.resume = lambda: turns.submit(supervisor.drive)
        vm.started = True
        self._start_sweeper()

    def _own_state(self) -> OwnerLock:
        """The state dir's owner lock, taken now if not yet (raises
        ``StateLockedError`` when another process holds it)."""
        with self._owner_lock:
            if self._owner is None:
                self._owner = self.state.lock_owner()
            return self._owner

    def _read_spec(self, vm_id: str) -> VmSpec | None:
        try:
            raw = self.state.read_spec(vm_id) if self.state.exists(vm_id) else None
            return VmSpec.from_json(raw) if raw is not None else None
        except (KeyError, TypeError, ValueError, PermanentError) as exc:
            raise PermanentError(f"VM {vm_id}: vm.json is malformed: {exc!r}") from exc

    def _write_spec(self, vm: VmRecord, spec: VmSpec) -> None:
        assert vm.flock is not None
        self.state.write_spec(vm.flock, spec.to_json())

    def _wait_outcome(self, vm: VmRecord, what: str, *, drive: bool = False) -> None:
        """Wait for an outcome of the VM's current request; raise its error.
        ``drive`` (after ``VmRecord.poke``): run the VM's turns on this
        thread while no other thread does, until it parks (the pool takes
        them over at the deadline): a caller that waits anyway hands
        nothing to another thread and is woken by no one."""
        deadline = self.clock() + self.timeouts.ensure
        if drive:
            try:
                if vm.claim():
                    assert vm.drive is not None
                    vm.drive(lambda: self.clock() >= deadline)
            finally:
                vm.release()
        with vm.cond:
            request = vm.request
            while (outcome := vm.outcome) is None or outcome.request < request:
                if vm.closing:
                    raise ManagerClosedError(
                        f"VM {vm.vm_id}: supervisor stopped before {what} completed"
                    )
                if vm.finished:
                    # Ended without answering this request (a supervisor
                    # that fails answers the request it took in): it never
                    # took it in.
                    raise _EndedBefore(f"VM {vm.vm_id}: supervisor stopped before {what} completed")
                left = deadline - self.clock()
                if left <= 0:
                    raise TemporaryError(
                        f"VM {vm.vm_id}: {what} not done after {self.timeouts.ensure:g} s "
                        f"({vm.obs.phase.value}: {vm.obs.message})",
                        delay=self.timeouts.health_interval,
                    )
                vm.cond.wait(left)
            if outcome.error is not None:
                raise copy.copy(outcome.error)  # one instance per raise: threads

    def _retire(self, vm: VmRecord) -> None:
        """Drop a record whose supervisor ended (caller holds its op_lock)."""
        self._wait_finished(vm, self.timeouts.ensure)
        vm.gone = True
        with self._map_lock:
            if self._vms.get(vm.vm_id) is vm:
                del self._vms[vm.vm_id]

    @staticmethod
    def _wait_finished(vm: VmRecord, timeout: float | None) -> None:
        """Until the VM's supervisor ended (at most ``timeout`` seconds)."""
        with vm.cond:
            if vm.drive is not None:
                vm.cond.wait_for(lambda: vm.finished, timeout)

    def _emit(self, obs: VmObservation, event: VmEvent | None) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change(obs, event)
        except Exception:  # a subscriber's bug must not kill a supervisor
            log.exception("VM %s: on_change callback failed", obs.vm_id)
