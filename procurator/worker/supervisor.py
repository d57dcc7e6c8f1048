"""A VM's supervisor: the one owner of its VMM, a loop of turns over ``decide``.

One ``VmSupervisor`` per VM (made by ``procurator.worker.manager.
VmManager``). Each *turn* reads the VM's record (the desired spec as the
newest *request*, a removal, closing), refreshes what it knows of the VMM
(has its pidfd fired?), asks the pure planner ``procurator.core.supervision.
decide`` for the next step, and performs it: the only place this VM's VMM
is touched. Each step records what it measured as new facts (``Facts``,
``VmmFacts``, the ``RestartState``) and publishes what an operator or a
waiting caller must know (an observation, maybe an event, maybe the
*outcome* of the request).

The supervisor has no thread of its own (``procurator.worker.turns``): a
thread *drives* its turns (``drive``) while it has work, one thread at a
time: the caller of ``ensure`` or ``remove``, which waits for the answer
anyway, or one of the manager's few pool threads. A ``Wait`` step ends the
drive: the VM *parks* (``VmRecord.park``), holding no thread, until a wake
(``VmRecord.wake``: a new request, the sweep, closing, or through the
manager's ``process.ExitWatcher`` and the VMM's pidfd, the VMM's exit) or
the wait's deadline (``TurnPool.at``) has a pool thread drive it again. A
wake that comes while a thread drives is read after its turn.

Errors a step raises are handled by kind, the same for every step:
``PermanentError`` fails the target for good (``failed``: reported, not
retried until the target changes); ``TemporaryError`` is an attempt that
failed: any VMM left is stopped, the failure counts towards the restart
backoff (``procurator.core.backoff``; many in a row show as
``Phase.CRASH_LOOP``) and nothing happens before it is over; any other
exception (a bug, EMFILE) is reported and retried after the health
interval, because ending the supervisor would leave the VMM running unwatched.

Stopping a VMM is the stop ladder of ``procurator.worker.stopladder``, the
same for every driver.

Health checks: a check is one API call with a timeout: the state
(``state``), or — when counters are due and the driver's ``state_mark``
shows the VMM reported no transition since the last state read
(``Capabilities.state_marks``) — the counters alone. ``hung_after``
unanswered checks in a row escalate through the stop ladder and count as a
failure. When the manager sweeps (``VmManager.sweeping``: a driver with
marks, counters to read), a settled VM has no timed check at all: its
supervisor publishes ``VmRecord.swept`` and waits with no timeout, the
sweep reads its counters and compares its mark, and asks for a check
(``VmRecord.check_asked``) when the mark moved or the VMM did not answer;
the check is then a state read, as above (``procurator.worker.manager``
has the timing this gives).

Held VMs: a ``reschedule`` VM that ``VmManager.recover`` found holds
``VmRecord.held`` until an assignment names it (see ``procurator.worker.
manager``). While it holds, a step that would launch a VMM (``Start``, or
the ``Backoff`` before one) is not performed: the VM is published
``pending`` with why, its request answered, and the VM parks until a new
request. Everything else (re-adopting, health checks, reaping, removal)
goes on as for any VM.

Jobs: work a caller hands this supervisor (``VmManager.run_job``: a
snapshot, a restore) runs at the start of a turn, before the next decision,
through a ``JobContext``; what it did to the VMM is what the next turn
observes.

Threads and locks: this object's attributes are touched only by the thread
that drives its turns (handed from one to the next under ``VmRecord.cond``,
which orders their accesses); the record's shared fields are under
``VmRecord.cond``, taken briefly (never around I/O). Log records of a turn
carry the VM's fields whichever thread drives it: each turn runs in the
supervisor's own ``contextvars.Context``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from procurator.core.backoff import RestartState
from procurator.core.errors import PermanentError, ProcuratorError, TemporaryError
from procurator.core.jail import Confinement
from procurator.core.models import EventKind, Phase, PowerState, VmEvent
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
from procurator.logs import bind
from procurator.worker.jail import inspect as inspect_confinement
from procurator.worker.state import HandlesRecord, write_json_atomic
from procurator.worker.stopladder import StopLadder
from procurator.worker.vmm import process
from procurator.worker.vmm.base import (
    VmExit,
    VmmDriver,
    VmmError,
    VmmGone,
    VmmHandle,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
)
from procurator.worker.vmrecord import (
    MOVED_OUT_FILE,
    UNREADABLE_MARK,
    Incoming,
    MovedOut,
    Outcome,
    SweepWatch,
    Timeouts,
    VmRecord,
    VmSpec,
)

if TYPE_CHECKING:
    from procurator.worker.manager import VmManager

__all__ = ["JobContext", "VmSupervisor"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Pending:
    """An event to report once the VM is seen settled (booted, replaced...)."""

    kind: EventKind
    message: str
    launched_at: float | None = None  # manager clock at the launch that leads to it


_OK = object()  # an outcome without error


class _NoPark:
    """The last turn did not end in a wait."""


class _Then(enum.Enum):
    """What a drive's turns ended in."""

    PARK = "park"  # a wait: park (``VmSupervisor.parking``) unless woken meanwhile
    HAND_OVER = "hand over"  # the caller's limit: the pool drives on
    END = "end"  # the supervisor is done


_NO_PARK = _NoPark()


class VmSupervisor:
    """See the module docstring. Attributes are the driving thread's, except
    the record's fields under ``vm.cond``."""

    def __init__(self, manager: VmManager, vm: VmRecord, *, kept_incoming: str = "") -> None:
        self.m = manager
        self.vm = vm
        self.driver = manager.driver
        self.t = manager.timeouts
        self.paths = manager.state.paths(vm.vm_id)
        self.facts = Facts()
        self.restart = RestartState()
        self.request = -1  # the request being acted upon
        self.held_reported = -1  # the request whose hold was published
        self.spec: VmSpec | None = None
        self.handle: VmmHandle | None = None
        self.watch = process.ExitWatch(manager.exit_watcher, vm.wake)
        # This VM's own context (its log records name the VM and the
        # operation worked on), entered by whichever thread drives a turn.
        self.context = contextvars.Context()
        self.turns_run = 0  # so far (tests: an idle VM runs none)
        self.parking: float | _NoPark | None = _NO_PARK  # the last turn's Wait
        self.pending: _Pending | None = None
        self.ever_started = False
        self.replacing = False
        # The hash the VM's last VMM ran, kept once it is gone: a launch's
        # ``spawning`` record carries it to the next owner (``_adopt``).
        self.last_hash = ""
        self.last_failure = ""  # why the VM last went down, shown while waiting
        self.trouble = ""  # what the last unanswered or senseless check said
        # (request, "pause"|"resume", cause) of the last refused power change:
        # its ``failed`` event is sent once, not on every retry.
        self.power_failure: tuple[int, str, str] | None = None
        # (state_mark, state) of the last state read; None when the driver
        # gives no mark or the state must be read again.
        self.known_state: tuple[Hashable, VmState] | None = None
        # The manager's sweep asked for a check (``VmRecord.check_asked``).
        self.check_now = False
        self.last_counters = -math.inf
        # What the running VMM is confined by, read from the OS at its
        # launch or re-adoption (None without a VMM).
        self.confinement: Confinement | None = None
        # Launch-to-settled seconds of the running VMM (None until it settled).
        self.boot_seconds: float | None = None
        # The handles record names the event the running VMM's launch still
        # owes (``HandlesRecord.owes``): cleared once that event is told.
        self.owed = False
        # The live move the running VMM was launched incoming for (None: an
        # ordinary VMM), and the request whose incoming launch failed (not
        # tried again for it).
        self.incoming: Incoming | None = None
        self.incoming_failed = -1
        # The move a restarted worker found the VM held incoming for
        # (``VmManager.recover``; "" none): its VMM stopped, its disk
        # copies kept, nothing launched until the spec says more.
        self.kept_incoming = kept_incoming
        self.kept_told = -1
        # A live move that migrates (or migrated) this VM away, as its mark
        # file says (read once, on the first turn).
        self.moved_out: MovedOut | None = None
        self.moved_out_read = False
        self.moved_out_told: tuple[int, MovedOut] | None = None

    # -- the loop ----------------------------------------------------------------

    def drive(self, until: Callable[[], bool] | None = None) -> None:
        """Run this VM's turns on the calling thread, which ``VmRecord``
        handed them (``claim``, ``unpark``, its pool's ``resume``), until
        the VM parks (a wait) or its supervisor ends. ``until``: a
        caller's limit, asked after each turn: when it says stop, the turns
        go on on the manager's pool. The VM is handed on only once this
        thread left the supervisor's context (another thread enters it).

        What a turn raises that is not an ``Exception`` (a bug is) and
        reaches a caller's thread (``KeyboardInterrupt``, ``SystemExit`` in
        a process that drives an ``ensure`` from its main thread) is the
        caller's, not the VM's: the turns go on on the pool and it goes up.
        On a pool thread (``until`` None) it fails the supervisor, as a bug
        does: nothing above a pool thread would take it."""
        while True:
            try:
                then = self.context.run(self._turns, until)
            except BaseException as exc:
                if until is None:
                    self.context.run(self._fail, exc)
                    return
                self.m.turns.submit(self.drive)
                raise
            if then is _Then.END:
                return
            if then is _Then.HAND_OVER:
                self.m.turns.submit(self.drive)
                return
            assert not isinstance(self.parking, _NoPark)
            if self._park(self.parking):
                return

    def _turns(self, until: Callable[[], bool] | None) -> _Then:
        if self.turns_run == 0:
            with self.vm.cond:
                spec = self.vm.desired
            bind(vm_id=self.vm.vm_id, op_id=spec.op_id if spec is not None else "")
        try:
            while True:
                self.turns_run += 1
                self.parking = _NO_PARK
                if not self._turn():
                    self._end()
                    return _Then.END
                if not isinstance(self.parking, _NoPark):
                    return _Then.PARK
                if until is not None and until():
                    return _Then.HAND_OVER
        except Exception as exc:  # noqa: BLE001 - a bug: the VM's failure, reported
            self._fail(exc)
            return _Then.END

    def _fail(self, exc: BaseException) -> None:
        """The supervisor failed (a bug): tell it, and end."""
        log.error("VM %s: supervisor failed", self.vm.vm_id, exc_info=exc)
        try:
            self._publish(
                Phase.FAILED,
                f"supervisor failed: {exc!r}",
                EventKind.FAILED,
                outcome=ProcuratorError(f"VM {self.vm.vm_id}: supervisor failed: {exc!r}"),
            )
        finally:
            self._end()

    def _end(self) -> None:
        """The supervisor is done (removed, closing, failed): nothing of it
        runs again."""
        self.watch.close()
        with self.vm.cond:
            self.vm.finished = True
            self.vm.handle = None
            self.vm.resume = None
            self.vm.cond.notify_all()
        if self.vm.flock is not None:
            self.vm.flock.release()

    def _park(self, until: float | None) -> bool:
        """Stop driving turns until woken or ``until`` (manager clock); False
        when a wake came meanwhile (or the wait is over), so the caller runs
        the next turn itself."""
        if self.watch.alive() is False:
            return False  # exited: nothing to wait for (the one-shot wake is spent)
        if until is not None and until <= self.m.clock():
            return False
        park_id = self.vm.park(until)
        if park_id is None:
            return False
        if until is not None:
            self.m.turns.at(until, lambda: self._resume(park_id))
        return True

    def _resume(self, park_id: int) -> None:
        """A park's deadline (on a pool thread): drive if still parked by it."""
        if self.vm.unpark(park_id):
            self.drive()

    def _turn(self) -> bool:
        """Read the record, decide, perform one step; False when done."""
        if not self._read_request():
            return False
        if self._run_job():
            return True
        try:
            if self._hold_incoming():
                return True
        except ProcuratorError as exc:
            self._incoming_failed(exc)
            return True
        if self._hold_moved_out():
            return True
        if self.facts.vmm is not None and self.facts.vmm.alive and not self._alive():
            self._note_vmm(alive=False)
        step = decide(self.facts, self.restart, self.m.clock(), self._timing())
        if isinstance(step, (Start, Backoff)) and self._held():
            self._report_held()
            self._wait(None)  # until a new request (an assignment), a removal, closing
            return True
        if isinstance(step, Wait):
            self._wait(step.until)
            return True
        try:
            return self._perform(step)
        except PermanentError as exc:
            self._failed(exc)
        except TemporaryError as exc:
            self._failure(exc)
        except Exception as exc:  # noqa: BLE001 - logged and retried (_internal_error)
            self._internal_error(exc)
        return True

    def _perform(self, step: Step) -> bool:
        """Carry out one step; False when the supervisor is done."""
        match step:
            case Adopt():
                self._adopt()
            case Reap(counted=counted):
                self._reap(counted=counted)
            case Remove():
                return not self._remove()
            case StopVmm(why=why):
                self._stop_vmm(why)
            case Start():
                self._start()
            case Probe():
                self._probe()
            case SetPower(power=power):
                self._set_power(power)
            case Settle(phase=phase):
                self._settle(phase)
            case Backoff(until=until):
                self._report_waiting(until - self.m.clock())
        return True

    def _run_job(self) -> bool:
        """Run the oldest job callers handed this VM (``VmManager.run_job``),
        if any; True when one ran. Whatever it raises goes back to its
        caller: the VM's own loop carries on from what it observes next."""
        vm = self.vm
        if not self.facts.adopted:
            return False  # the first turn re-adopts the VMM the job will see
        with vm.cond:
            while vm.jobs and vm.jobs[0].cancelled:
                vm.jobs.pop(0)
            if not vm.jobs:
                return False
            job = vm.jobs.pop(0)
            job.started = True
        result: object = None
        error: BaseException | None = None
        try:
            result = job.run(JobContext(self))
        except Exception as exc:  # handed to the job's caller
            if not isinstance(exc, ProcuratorError):
                log.exception("VM %s: %s failed", vm.vm_id, job.what)
            error = exc
        with vm.cond:
            job.result, job.error, job.done = result, error, True
            vm.cond.notify_all()
        return True

    # -- a live move's incoming VM (vmrecord.Incoming) ---------------------------

    def _hold_incoming(self) -> bool:
        """A VM held incoming for a live move: its VMM launched once
        (``launch_incoming``), then left alone (no probe, no restart) until
        the spec changes; True while so. The switch's spec (the same hash,
        no longer incoming) lets it run (``finish_incoming``), and the
        ordinary loop takes it over; any other change discards it."""
        spec = self.spec
        wanted = spec.incoming if spec is not None and not self.facts.removing else None
        if self.kept_incoming:
            if wanted is not None and wanted.op_id == self.kept_incoming:
                self._hold_kept(wanted)
                return True
            # The move ended: the switch's spec boots the VM from the kept
            # disk copies, a removal removes them, another move holds anew.
            self.kept_incoming = ""
        if self.incoming is not None and wanted != self.incoming:
            self._end_incoming(spec)
        if wanted is None:
            return False
        assert spec is not None
        if self.handle is None and self.incoming_failed != self.request:
            self._launch_incoming(spec, wanted)
        elif self.handle is not None and not self._alive():
            self._forget_vmm()
            self.incoming = None
            raise VmmError(f"the incoming VMM for move {wanted.op_id} exited")
        self._wait(None)  # a new request, a removal, closing, or the VMM's exit
        return True

    def _hold_kept(self, incoming: Incoming) -> None:
        """A VM a restarted worker found held incoming, its move not over:
        its VMM (never booted) stopped, no VMM launched, its directory and
        disk copies kept (once the source sent, the only up-to-date copy of
        the guest's disks) until the spec changes; each request answered."""
        if not self.facts.adopted:
            self._adopt()
        if self.handle is not None:
            why = f"held incoming for move {incoming.op_id} when the worker stopped"
            try:
                if self._alive():
                    self._ladder(why, api=False)  # no VM in it to shut down
                else:
                    self._forget_vmm()
            except ProcuratorError as exc:  # its exit wakes this VM again
                log.error("VM %s: could not stop its VMM (%s): %s", self.vm.vm_id, why, exc)  # noqa: TRY400
        if self.kept_told != self.request:
            self.kept_told = self.request
            self._publish(
                Phase.PENDING,
                f"held incoming for move {incoming.op_id} when the worker stopped: its VMM "
                "stopped, its disk copies kept; boots from them if the move switches it here",
                outcome=_OK,
            )
        self._wait(None)  # a new request, a removal, closing

    def _launch_incoming(self, spec: VmSpec, incoming: Incoming) -> None:
        if not self.facts.adopted:
            self._adopt()
        if self.handle is not None:
            # Not ours to hold: the VM still runs here (a removal not done).
            raise VmmError(f"a VMM of VM {self.vm.vm_id} runs here already (pid {self.handle.pid})")
        self._publish(Phase.STARTING, f"starting an incoming VMM (move {incoming.op_id})")
        handle = self._launch(spec, owes=EventKind.BOOTED, incoming=incoming)
        self._take(handle, spec.hash)
        self.incoming = incoming
        # Moved away live before and back now, ahead of the removal of its
        # old copy here: that move's mark no longer says where the VM is.
        if not self.moved_out_read:
            self.moved_out_read = True
            self.moved_out = self._read_moved_out()
        if self.moved_out is not None:
            self._mark_moved_out(None)
        self._publish(
            Phase.STARTING,
            f"incoming (move {incoming.op_id}): VMM pid {handle.pid} waits for the VM's state",
            outcome=_OK,
        )

    def _incoming_failed(self, exc: ProcuratorError) -> None:
        """The incoming VMM could not be launched, or went: reported to
        the move (the VM's phase ``failed``), not tried again for this
        request; no VMM is left."""
        self._discard(f"the incoming VMM failed: {exc.message}")
        self.incoming = None
        self.incoming_failed = self.request
        self._publish(Phase.FAILED, _describe(exc), outcome=exc)
        self._note(reported=True)

    def _end_incoming(self, spec: VmSpec | None) -> None:
        """The VM is held incoming no longer: with the same hash desired
        (the move's switch), let it run; else discard its VMM. A VMM that
        cannot finish is stopped: the ordinary loop boots the VM from its
        disk copies (the state did not all arrive; the disks are the
        source's as of the stop)."""
        incoming, self.incoming = self.incoming, None
        assert incoming is not None
        if self.handle is None:
            return
        if spec is None or self.facts.removing or spec.hash != self.last_hash:
            self._discard(f"held incoming for move {incoming.op_id} no longer")
            return
        try:
            self.driver.finish_incoming(self.handle, timeout=self.t.boot)
        except ProcuratorError as exc:
            how = self._discard(f"the moved VM did not start: {exc.message}")
            self.last_failure = (
                f"moved live (move {incoming.op_id}) but did not start there: "
                f"{_describe(exc)}; booting it from its disks" + (f" ({how})" if how else "")
            )
            log.warning("VM %s: %s", self.vm.vm_id, self.last_failure)
            return
        self.ever_started = True
        self.known_state = None
        self._note_vmm(state=None)
        self.pending = _Pending(
            EventKind.BOOTED,
            f"moved in live (move {incoming.op_id}): runs {spec.hash} (VMM pid {self.handle.pid})",
        )

    # -- a live move's source side (vmrecord.MovedOut) ---------------------------

    def _hold_moved_out(self) -> bool:
        """A VM a live move migrated away (or was migrating when the worker
        stopped): never started or resumed here; True while so.

        Sent: the guest here is stopped for good and the target holds its
        state, so its VMM (QEMU's stays ``postmigrate``; cloud-hypervisor's
        exits by itself) is stopped without its API and the VM held until
        the switch removes it. Not sent (the mark written before the
        migration began, found by a restarted worker): a VMM that still runs
        may still be migrating, paused at the switchover or even after a
        completed migration (the undo died with the old worker's call), so
        the migration is abandoned first (``abandon_migration``: cancelled,
        the guest let run), then the VM goes on here and the mark goes.
        Safe: the target's guest runs only at the switch, which needs the
        "sent" this worker now never reports for that migration. If that
        fails the VM is not claimed running: reported failed, held with its
        mark, and tried again after the health interval. With no VMM, the
        guest may run on the target now, so the VM is held until the move
        ends (``JobContext.moved_out`` clears the mark of a move that
        failed)."""
        if not self.moved_out_read:
            self.moved_out_read = True
            self.moved_out = self._read_moved_out()
            if self.moved_out is not None:
                # Found by a restarted worker: its move service tells the
                # move from the observation, as it would a mark made here.
                with self.vm.cond:
                    self.vm.obs = dataclasses.replace(self.vm.obs, moved_out=self.moved_out)
        out = self.moved_out
        if out is None or self.facts.removing:
            return False
        if not self.facts.adopted:
            self._adopt()
        if self.handle is not None and not out.sent and self._alive():
            try:
                # A cancel and the mirrors' take more than one API call.
                self.driver.abandon_migration(self.handle, timeout=self.t.boot)
            except (VmmError, VmmRejected) as exc:
                why = (
                    f"the worker stopped while moving it live (move {out.op_id}) and the "
                    f"migration cannot be undone: {_describe(exc)}; held, tried again"
                )
                log.warning("VM %s: %s", self.vm.vm_id, why)
                self._publish(Phase.FAILED, why, outcome=exc)
                self._wait(self.m.clock() + self.t.health_interval)
                return True
            log.info("VM %s: move %s did not take it: it runs on here", self.vm.vm_id, out.op_id)
            self._mark_moved_out(None)
            return False
        if self.handle is not None:
            if self._alive():
                self._ladder(f"moved live to its target (move {out.op_id})", api=False)
            else:
                self._forget_vmm()
        if out == UNREADABLE_MARK:
            why = (
                f"its live move's mark {self.paths.vm_dir / MOVED_OUT_FILE} is unreadable: "
                "whether its state was sent to another worker is unknown, so it is held here, "
                "its VMM stopped; once it runs on no other worker, remove that file and "
                "restart this worker"
            )
        elif out.sent:
            # Its move may yet have failed: a leader that lost this worker
            # fails a migrating move at once (procurator.core.move), and a
            # worker only cut off can finish the migration after that.
            why = (
                f"moved live to its target (move {out.op_id}): held until the switch removes "
                f"it; if `procurator moves {self.vm.vm_id}` shows that move failed instead, "
                f"the VM runs nowhere: remove {self.paths.vm_dir / MOVED_OUT_FILE} and restart "
                "this worker to start it here again"
            )
        else:
            why = (
                f"the worker stopped while moving it live (move {out.op_id}): held until the "
                "move ends"
            )
        if self.moved_out_told != (self.request, out):
            # Once per request and mark: each request is answered (the VM
            # is where its move put it), the event told once.
            event = EventKind.STOPPED if out.sent and self.moved_out_told is None else None
            self.moved_out_told = (self.request, out)
            self._publish(Phase.STOPPED, why, event, outcome=_OK)
        self._wait(None)
        return True

    def _read_moved_out(self) -> MovedOut | None:
        try:
            data = json.loads((self.paths.vm_dir / MOVED_OUT_FILE).read_text())
            return MovedOut(str(data["op_id"]), bool(data["sent"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Unreadable: taken as sent, the safe side (held, never booted twice).
            log.error("VM %s: %s unreadable (%s): held", self.vm.vm_id, MOVED_OUT_FILE, exc)  # noqa: TRY400
            return UNREADABLE_MARK

    def _mark_moved_out(self, out: MovedOut | None) -> None:
        """Record ``out`` durably (None: remove the mark), then publish it."""
        path = self.paths.vm_dir / MOVED_OUT_FILE
        if out is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            write_json_atomic(path, {"op_id": out.op_id, "sent": out.sent})
        self.moved_out = out
        self.moved_out_read = True
        with self.vm.cond:
            self.vm.obs = dataclasses.replace(self.vm.obs, moved_out=out)

    def _read_request(self) -> bool:
        """Take in the record's newest request; False when closing."""
        vm = self.vm
        with vm.cond:
            if vm.closing:
                return False
            spec, removing, request, remove_op_id = (
                vm.desired,
                vm.removing,
                vm.request,
                vm.remove_op_id,
            )
            # Awake: no longer the sweep's to check until the next idle wait.
            vm.swept = None
            if vm.check_asked:
                vm.check_asked = False
                self.check_now = True
        # The spec may change without a new request (a new op id, same
        # target): log and launch with the newest.
        self.spec = spec
        bind(op_id=remove_op_id if removing else spec.op_id if spec is not None else "")
        if request == self.request:
            return True
        # Outcomes are reported for the request acted upon: a caller that
        # asked for something newer meanwhile keeps waiting.
        self.request = request
        target = spec.target if spec is not None else None
        previous = self.facts.target
        if previous is not None and target is not None and previous.hash != target.hash:
            # A new spec starts with a clean slate: no backoff inherited.
            self.restart = self.restart.reset()
            self.last_failure = ""
        self.facts = replace(
            self.facts,
            removing=removing,
            target=target,
            failed=False,
            reported=False,
            power_refused_at=None,
            hold_until=-math.inf,
        )
        return True

    def _held(self) -> bool:
        with self.vm.cond:
            return self.vm.held

    def _report_held(self) -> None:
        """Publish, once per request, that the VM waits for an assignment
        before any VMM is launched for it, and answer the request: being
        held is what ``recover`` asked of it."""
        if self.held_reported == self.request:
            return
        self.held_reported = self.request
        why = f"{self.last_failure}; " if self.last_failure else ""
        message = (
            f"{why}not started: on_worker_lost = reschedule and no assignment has named it "
            "since the worker started (the master may have moved it); starts once one does"
        )
        log.info("VM %s: %s", self.vm.vm_id, message)
        self._publish(Phase.PENDING, message, outcome=_OK)
        self._note(reported=True)

    def _timing(self) -> Timing:
        interval = self.m.health_interval()
        if self.m.sweeping and self.facts.power_refused_at is None:
            # The sweep checks this VM: no timed check (an infinite
            # interval), one at once when the sweep asks for it. A refused
            # power change keeps its retry after the health interval.
            interval = 0.0 if self.check_now else math.inf
        return Timing(
            health_interval=interval,
            retry_unanswered=min(self.t.api, self.t.health_interval),
            hung_after=self.t.hung_after,
        )

    def _wait(self, until: float | None) -> None:
        """End the turn in a wait: for a wake (a request, the VMM's exit,
        the sweep) or ``until`` (manager clock; None: no deadline). The
        turns park after it (``drive``)."""
        if until is not None and math.isinf(until):
            # Settled, checked by the sweep: wait for a request, the VMM's
            # exit or the sweep's call, with no timeout.
            self._publish_swept()
            until = None
        self.parking = until

    def _publish_swept(self) -> None:
        """Hand the sweep what it checks of this VM while it is parked."""
        if self.handle is None:
            return
        mark = self.known_state[0] if self.known_state is not None else None
        watch = SweepWatch(self.handle, self.paths, mark)
        with self.vm.cond:
            self.vm.swept = watch

    # -- facts -------------------------------------------------------------------

    def _note(self, **changes: object) -> None:
        self.facts = replace(self.facts, **changes)  # type: ignore[arg-type]

    def _note_vmm(self, **changes: object) -> None:
        assert self.facts.vmm is not None
        self._note(vmm=replace(self.facts.vmm, **changes))  # type: ignore[arg-type]

    def _target(self) -> Target:
        assert self.facts.target is not None
        return self.facts.target

    def _alive(self) -> bool:
        assert self.handle is not None
        alive = self.watch.alive()
        if alive is None:
            return process.is_alive(self.handle.pid, self.handle.pid_start_ticks)
        return alive

    # -- adoption and leftovers --------------------------------------------------

    def _adopt(self) -> None:
        """Take over whatever a previous owner left: re-adopt a live VMM,
        clean up after a dead one."""
        self._note(adopted=True)
        try:
            exists = self.m.state.exists(self.vm.vm_id)
            record = self.m.state.read_handles(self.vm.vm_id) if exists else None
        except ProcuratorError as exc:
            log.warning("VM %s: handles unreadable: %s", self.vm.vm_id, exc)
            record = None
        recorded = record.handle if record is not None else None
        live = self.driver.adopt(self.paths, recorded) if recorded is not None else None
        if record is None or recorded is None or live is None:
            if record is not None and recorded is None and record.previous:
                self._resume_launch(record.previous)
            if record is not None and recorded is not None:
                self.last_hash = record.hash
                log.info("VM %s: recorded VMM pid %s is gone", self.vm.vm_id, recorded.pid)
                # It died while nobody watched: starting it again is a restart.
                self.restart = RestartState(failures=1)
                self.last_failure = f"VMM (pid {recorded.pid}) died while the worker was away"
            self._clear_leftovers_quietly()
            return
        foreign = live.driver != self.driver.name
        self._take(live, record.hash, foreign=foreign)
        if foreign:
            log.warning(
                "VM %s: VMM pid %s was started by driver %s, not %s: stopping it",
                self.vm.vm_id,
                live.pid,
                live.driver,
                self.driver.name,
            )
            return
        self.ever_started = True
        self._observe_confinement(live)
        summary = self.confinement.summary() if self.confinement is not None else "?"
        owed = _owed_kind(record.owes)
        if owed is None:
            self.pending = _Pending(
                EventKind.READOPTED,
                f"re-adopted VMM pid {live.pid} running {record.hash or '?'} ({summary})",
            )
        else:
            # The last owner launched it and died before telling it: the
            # launch's own event, told once the VM is seen settled.
            self.owed = True
            self.pending = _Pending(
                owed,
                f"{_OWED_WORDS[owed]} {record.hash or '?'} (VMM pid {live.pid}, launched before "
                f"the worker restarted and re-adopted; {summary})",
            )
        log.info("VM %s: re-adopted VMM pid %s", self.vm.vm_id, live.pid)

    def _resume_launch(self, previous: str) -> None:
        """The last owner died launching a VMM it had not recorded, after
        the VM had run ``previous`` (its ``spawning`` record): the VM
        exists, and a launch of another hash is the replacement it was
        making, told as ``replaced``, not as a new VM ``created``."""
        self.last_hash = previous
        self.ever_started = True
        target = self.facts.target
        if target is not None and target.hash != previous:
            self.replacing = True
            log.info(
                "VM %s: the last owner died replacing %s with %s; resuming",
                self.vm.vm_id,
                previous,
                target.hash,
            )

    def _take(self, handle: VmmHandle, booted_hash: str, *, foreign: bool = False) -> None:
        """From now on ``handle`` is this VM's VMM. What its launch
        confirmed (``VmmHandle.confirmed``) is its first health check, as
        ``_probe`` would note it: the VM's state read once, not twice."""
        confirmed = handle.confirmed
        if confirmed is not None:
            handle = replace(handle, confirmed=None)  # taken once, here
        alive = self.watch.open(handle)
        self.handle = handle
        if booted_hash:
            self.last_hash = booted_hash
        self.known_state = None
        vmm = VmmFacts(booted_hash=booted_hash, alive=alive, foreign=foreign)
        if confirmed is not None:
            state, mark = confirmed
            self.known_state = (mark, state) if mark is not None else None
            vmm = replace(vmm, state=state, checked_at=self.m.clock())
        self._note(vmm=vmm)
        with self.vm.cond:
            self.vm.handle = handle

    def _forget_vmm(self) -> None:
        """The VMM is known dead: make sure it is all gone, drop its handle
        and clear what it left."""
        handle = self.handle
        if handle is not None and not process.wait_exit(
            handle.pid, handle.pid_start_ticks, self.t.sigkill_wait
        ):
            # Its main thread is gone but the rest still exits (and holds the
            # socket's lock): the cleanup below would fail, so wait for it.
            raise VmmError(
                f"VM {self.vm.vm_id}: VMM pid {handle.pid} is still exiting after "
                f"{self.t.sigkill_wait:g} s"
            )
        if handle is not None:
            self.driver.forget(handle)  # its connection, at once (not a prune's)
        self.watch.close()
        self.handle = None
        self.owed = False
        self.confinement = None
        self._note(vmm=None)
        with self.vm.cond:
            self.vm.handle = None
            self.vm.counters = {}
        self._clear_leftovers()

    def _clear_leftovers(self, then: HandlesRecord | None = None) -> None:
        """With no VMM of ours alive: stop unrecorded VMMs of this VM, remove
        a stale API socket, and replace the handles record (under the VM's
        flock) by ``then``, or by one that records no VMM but the hash the
        VM last ran (``previous``): a worker killed after this, before its
        next launch is recorded, leaves its next owner knowing that the VM
        exists and what it ran (its start is a replacement or a boot, not the
        creation of a new VM); no record when it never ran."""
        assert self.vm.flock is not None
        if not self.paths.vm_dir.exists():
            return
        self.driver.clear_leftovers(
            self.paths, unrecorded=self._may_have_unrecorded_vmm(), grace=self.t.sigterm_wait
        )
        if then is None and self.last_hash:
            then = HandlesRecord(self.driver.name, previous=self.last_hash)
        if then is None:
            self.m.state.clear_handles(self.vm.flock)
        else:
            self.m.state.write_handles(self.vm.flock, then)

    def _clear_leftovers_quietly(self) -> None:
        try:
            self._clear_leftovers()
        except ProcuratorError as exc:
            # The next start tries again (and reports it if it persists).
            log.warning("VM %s: cleaning up after the last owner: %s", self.vm.vm_id, exc)

    def _may_have_unrecorded_vmm(self) -> bool:
        """Whether a VMM that no handle records may run for this VM: the
        handles file says a launch began but no pid was recorded (the worker
        died in between), is unreadable, or is gone while the socket stays.
        A recorded handle, or a record of no VMM (written once the last one
        was gone), rules it out — every launch is preceded by a ``spawning``
        record and followed by the handle, under the VM's flock — and spares
        a scan of every process's environment (/proc), which
        on a host of a thousand VMMs costs more than the rest of a restart."""
        try:
            record = self.m.state.read_handles(self.vm.vm_id)
        except ProcuratorError:
            return True
        if record is None:
            return self.paths.api_socket.exists()
        return record.handle is None and record.spawning

    # -- steps -------------------------------------------------------------------

    def _reap(self, *, counted: bool) -> None:
        """The VMM is gone without being asked to: a failure if ``counted``."""
        assert self.handle is not None and self.facts.vmm is not None
        pid = self.handle.pid
        limit = self.confinement.limits.memory_bytes if self.confinement is not None else None
        oom_why = (
            f"it reached its memory.max ({limit // (1 << 20)} MiB: the guest's memory and "
            "the VMM's overhead)"
            if limit is not None
            else "memory ran out in its cgroup"
        )
        ended = self.driver.classify_exit(self.paths, self.handle)
        booted = self.facts.vmm.booted_hash
        target = self.facts.target
        self.replacing = self.replacing or (target is not None and booted not in ("", target.hash))
        self._forget_vmm()
        if not counted:
            log.info("VM %s: VMM pid %s exited (not the desired VM)", self.vm.vm_id, pid)
            return
        now = self.m.clock()
        self.restart = self.restart.failed(self.m.policy, now)
        oom = self.m.jail.oom_kills(self.vm.vm_id) if self.m.jail is not None else 0
        if oom:
            self.last_failure = f"VMM (pid {pid}) was killed by the kernel's OOM killer: {oom_why}"
            ended = VmExit.CRASHED
        elif ended is VmExit.POWERED_OFF:
            self.last_failure = f"VMM (pid {pid}) exited: the guest powered off"
        else:
            self.last_failure = f"VMM (pid {pid}) crashed (left its API socket behind)"
        kind = EventKind.STOPPED if ended is VmExit.POWERED_OFF else EventKind.CRASHED
        self._report_waiting(self.restart.wait(now), event=kind, force=True)

    def _stop_vmm(self, why: StopWhy) -> None:
        assert self.handle is not None and self.facts.vmm is not None
        vmm, pid = self.facts.vmm, self.handle.pid
        if why is StopWhy.HUNG:
            raise VmmTimeout(
                f"VMM (pid {pid}) did not answer its health check "
                f"{self.t.hung_after} times in a row (hung): {self.trouble}"
            )
        if why is StopWhy.BROKEN:
            raise VmmError(self.trouble if vmm.broken else self._state_trouble(vmm.state))
        if why is StopWhy.POWER_OFF:
            self._publish(Phase.STOPPING, "stopping (desired power: stopped)")
            how = self._ladder("desired power is stopped")
            self.pending = _Pending(EventKind.STOPPED, f"stopped ({how})")
        elif why is StopWhy.REPLACE:
            target = self._target()
            self._ladder(f"replacing {vmm.booted_hash or 'unknown'} with {target.hash}")
            self.replacing = True
        elif why is StopWhy.UNFINISHED:
            state = vmm.state.value if vmm.state is not None else "?"
            self._ladder(f"VM is {state} inside the VMM (unfinished start)")
        elif why is StopWhy.FOREIGN:
            self._ladder("started by another driver", api=False)
        else:
            self._discard("its spec failed")

    def _state_trouble(self, state: VmState | None) -> str:
        assert self.handle is not None
        if state is VmState.SHUTDOWN:
            return f"VM is {state.value} inside a live VMM (pid {self.handle.pid})"
        want = "Paused" if self._target().power is PowerState.PAUSED else "Running"
        return f"VM is {state.value if state else '?'}, expected {want}"

    def _start(self) -> None:
        spec = self.spec
        assert spec is not None
        restart = self.restart.failures > 0
        replacing, self.replacing = self.replacing, False
        if restart:
            self.restart = self.restart.restarting()
        self._publish(Phase.STARTING, "restarting VMM" if restart else "starting VMM")
        launched_at = self.m.clock()
        self.boot_seconds = None
        owes = (
            EventKind.RESTARTED
            if restart
            else EventKind.REPLACED
            if replacing
            else EventKind.BOOTED
        )
        handle = self._launch(spec, owes=owes)
        self._take(handle, spec.hash)
        if not self.ever_started and not restart:
            self._publish(Phase.STARTING, f"VM created (VMM pid {handle.pid})", EventKind.CREATED)
        # What the new VMM is confined by, in the event that tells of it.
        jailed = f"; {self.confinement.summary()}" if self.confinement is not None else ""
        if restart:
            waited = self.m.policy.delay(self.restart.failures)
            self.pending = _Pending(
                EventKind.RESTARTED,
                f"restarted after {waited:.3g} s of backoff (failure {self.restart.failures} "
                f"in a row, restart {self.restart.restarts}; VMM pid {handle.pid}{jailed})",
                launched_at,
            )
        elif replacing:
            self.pending = _Pending(
                EventKind.REPLACED,
                f"now runs {spec.hash} (VMM pid {handle.pid}{jailed})",
                launched_at,
            )
        else:
            self.pending = _Pending(
                EventKind.BOOTED, f"booted {spec.hash} (VMM pid {handle.pid}{jailed})", launched_at
            )
        self.restart = self.restart.started(self.m.clock())
        self.ever_started = True
        self._note(reported=False)

    def _launch(
        self,
        spec: VmSpec,
        *,
        owes: EventKind,
        restore_from: Path | None = None,
        incoming: Incoming | None = None,
    ) -> VmmHandle:
        """Where this VM's VMMs are born: what a dead one left is cleared,
        the launch is recorded before (``spawning``: the next owner looks
        for an unrecorded VMM if this worker dies now, and learns what the
        VM last ran) and after (the handle, and the event ``owes`` it will
        tell once settled: ``_settle`` clears it); a VMM whose handle cannot
        be recorded is stopped again.
        The VMM is jailed (``procurator.worker.jail``: its uid, cgroup and
        writable directories prepared here, under the VM's flock) unless
        the worker runs ``--unconfined``; what it is really confined by is
        read back once it runs (``_observe_confinement``)."""
        assert self.vm.flock is not None
        self._clear_leftovers(
            then=HandlesRecord(self.driver.name, spawning=True, previous=self.last_hash)
        )
        jail = self.m.jail
        vm_jail = (
            jail.prepare(self.vm.vm_id, spec.definition, self.paths) if jail is not None else None
        )
        timeout = self.t.spawn + self.t.boot
        if incoming is not None:
            handle = self.driver.launch_incoming(
                spec.definition,
                self.paths,
                memory=incoming.memory,
                disks=incoming.disks,
                token=incoming.token,
                timeout=timeout,
                jail=vm_jail,
            )
        elif restore_from is None:
            handle = self.driver.launch(spec.definition, self.paths, timeout=timeout, jail=vm_jail)
        else:
            handle = self.driver.restore(
                spec.definition, self.paths, restore_from, timeout=timeout, jail=vm_jail
            )
        try:
            self.m.state.write_handles(
                self.vm.flock,
                HandlesRecord(self.driver.name, handle=handle, hash=spec.hash, owes=owes.value),
            )
        except BaseException:
            process.abort_launch(handle, grace=self.t.sigterm_wait)
            raise
        self.owed = True
        self._observe_confinement(handle, notes=vm_jail.notes if vm_jail is not None else ())
        return handle

    def _observe_confinement(self, handle: VmmHandle, *, notes: tuple[str, ...] = ()) -> None:
        """Read what the VMM of ``handle`` is confined by, keep it for the
        VM's observation, and say every layer that does not hold: a warning
        event (once per VMM), never silence."""
        jail = self.m.jail
        try:
            if jail is not None:
                seen = jail.inspect(handle.pid)
            else:
                seen = inspect_confinement(handle.pid, jailed=False)
        except VmmGone:
            return  # exited meanwhile: reaped next
        if notes:
            seen = dataclasses.replace(seen, notes=notes)
        self.confinement = seen
        missing = seen.missing()
        if missing:
            what = "not confined (--unconfined)" if jail is None else "jail incomplete"
            message = f"{what}: VMM pid {handle.pid}: " + "; ".join(missing)
            log.warning("VM %s: %s", self.vm.vm_id, message)
            self._publish_event(EventKind.WARNING, message)

    def _probe(self) -> None:
        """One health check; its answer (or silence) becomes facts."""
        assert self.facts.vmm is not None
        now = self.m.clock()
        self.check_now = False
        try:
            state = self._read_state()
        except (VmmTimeout, VmmGone) as exc:
            if not self._alive():
                self._note_vmm(alive=False)  # exited meanwhile: reaped next
            else:
                self.trouble = exc.message
                self._note_vmm(unanswered=self.facts.vmm.unanswered + 1, unanswered_at=now)
            return
        except VmmError as exc:  # an answer that makes no sense
            self.trouble = _describe(exc)
            self._note_vmm(broken=True)
            return
        if state is not self.facts.vmm.state:
            self._note(reported=False)
        self._note_vmm(state=state, checked_at=now, unanswered=0)

    def _set_power(self, power: PowerState) -> None:
        assert self.handle is not None
        pausing = power is PowerState.PAUSED
        what = "pause" if pausing else "resume"
        log.info("VM %s: %s (VMM pid %s)", self.vm.vm_id, what, self.handle.pid)
        try:
            (self.driver.pause if pausing else self.driver.resume)(self.handle, timeout=self.t.api)
        except (VmmRejected, VmmTimeout) as exc:
            self._power_refused(what, exc)
            return
        self.power_failure = None
        self.known_state = None
        self._note(power_refused_at=None, reported=False)
        self._note_vmm(state=None)  # read it again before reporting
        if self.pending is None and pausing:
            self.pending = _Pending(EventKind.PAUSED, f"paused (VMM pid {self.handle.pid})")
        elif self.pending is None:
            clock = (
                "the guest clock is resynced"
                if self.driver.capabilities.guest_clock
                else "the guest clock is not resynced: "
                f"the {self.driver.name} driver has no guest-clock API"
            )
            self.pending = _Pending(
                EventKind.RESUMED, f"resumed (VMM pid {self.handle.pid}); {clock}"
            )

    def _power_refused(self, what: str, exc: VmmRejected | VmmTimeout) -> None:
        """The VMM refused (or did not answer) a pause or resume. The VM
        itself is fine as it is: keep it and its VMM, say why the desired
        power is not reached, and try again after the health interval.
        (Treating this like a failed start would kill a healthy guest
        because of a power-state request.) Waiting callers get a temporary
        error each time; the ``failed`` event is sent once per cause, not
        once per retry."""
        assert self.handle is not None and self.facts.vmm is not None
        if isinstance(exc, VmmTimeout) and not self._alive():
            self._note_vmm(alive=False)  # exited meanwhile: reaped next
            return
        wait = self.t.health_interval
        state = self.facts.vmm.state or VmState.RUNNING
        cause = _describe(exc)
        message = f"cannot {what}: {cause}; VM left {state.value}, retry in {wait:.3g} s"
        first = self.power_failure != (self.request, what, cause)
        self.power_failure = (self.request, what, cause)
        if first:
            log.warning("VM %s: %s", self.vm.vm_id, message)
        verb = "refused" if isinstance(exc, VmmRejected) else "not answered"
        paused = state is VmState.PAUSED
        self._publish(
            Phase.PAUSED if paused else Phase.RUNNING,
            message,
            EventKind.FAILED if first else None,
            power=PowerState.PAUSED if paused else PowerState.RUNNING,
            outcome=VmmError(
                f"VM {self.vm.vm_id}: {what} {verb}: {exc.message}",
                details=exc.details,
                delay=wait,
            ),
        )
        self._note(power_refused_at=self.m.clock(), reported=True)

    def _settle(self, phase: Phase) -> None:
        """The VM reached its target: report it (and its pending event)."""
        pending, self.pending = self.pending, None
        if phase is Phase.STOPPED:
            self.restart = self.restart.reset().stopped()
            self.last_failure = ""
            message = pending.message if pending is not None else "stopped"
            event = pending.kind if pending is not None else None
            self._publish(Phase.STOPPED, message, event, outcome=_OK)
        else:
            assert self.handle is not None and self.facts.vmm is not None
            state = self.facts.vmm.state
            power = PowerState.PAUSED if phase is Phase.PAUSED else PowerState.RUNNING
            if pending is not None and pending.launched_at is not None:
                self.boot_seconds = max(0.0, self.m.clock() - pending.launched_at)
            message = f"{state.value if state else '?'} (pid {self.handle.pid})"
            if pending is not None:
                # The event with the settled observation, as one change: told
                # before the handles record stops owing it (a crash between
                # the two tells it again, never not at all).
                self._publish(phase, message, pending.kind, power=power, told=pending.message)
            if self.owed:
                self._clear_owed()
            # The answer to the waiting caller; the observation is the one
            # just told, so no second change crosses to on_change's thread.
            self._publish(phase, message, power=power, outcome=_OK)
        self._note(reported=True)

    def _clear_owed(self) -> None:
        """The launch's event is told: the handles record stops owing it."""
        assert self.handle is not None and self.facts.vmm is not None
        assert self.vm.flock is not None
        try:
            self.m.state.write_handles(
                self.vm.flock,
                HandlesRecord(
                    self.driver.name, handle=self.handle, hash=self.facts.vmm.booted_hash
                ),
            )
        except ProcuratorError as exc:
            # A restart now would tell the event again; nothing else is lost.
            log.warning("VM %s: recording the told event: %s", self.vm.vm_id, exc)
            return
        self.owed = False

    def _remove(self) -> bool:
        """Stop the VMM and delete the VM's state; True when done."""
        self._publish(Phase.REMOVING, "removing")
        try:
            # Never resumed to shut down (procurator.worker.stopladder): a
            # paused VM may have been fenced and moved to another worker.
            how = (
                self._ladder("VM removed", resume_paused=False)
                if self.handle is not None
                else "no VMM running"
            )
            self._clear_leftovers()
            if self.m.jail is not None:
                # Its cgroup goes with it (and its uid is free again).
                self.m.jail.release(self.vm.vm_id)
            assert self.vm.flock is not None
            self.m.state.remove_vm(self.vm.flock)
        except ProcuratorError as exc:
            self._publish(Phase.REMOVING, f"removal failed: {_describe(exc)}", outcome=exc)
            self._note(hold_until=self.m.clock() + self.t.health_interval)
            return False
        self._publish(Phase.REMOVING, f"removed ({how})", EventKind.REMOVED, outcome=_OK)
        return True

    # -- failures ----------------------------------------------------------------

    def _failed(self, exc: PermanentError) -> None:
        """The target failed for good: reported, not retried until it changes
        (a VMM that runs is discarded next)."""
        self._publish(Phase.FAILED, _describe(exc), EventKind.FAILED, outcome=exc)
        self._note(failed=True, reported=True)

    def _failure(self, exc: TemporaryError) -> None:
        """An attempt failed and may work later: make sure no half-started
        VMM stays, then back off."""
        how = self._discard(f"an attempt failed: {exc.message}")
        now = self.m.clock()
        self.restart = self.restart.failed(self.m.policy, now)
        wait = self.restart.wait(now)
        self.last_failure = _describe(exc) + (f"; VMM stopped by {how}" if how else "")
        # Same class (every TemporaryError shares the base signature), with the
        # VM named and the delay the backoff chose.
        error = type(exc)(
            f"VM {self.vm.vm_id}: {exc.message}", details=exc.details, delay=max(wait, 0.1)
        )
        self._publish(
            self._waiting_phase(),
            f"{self.last_failure}; retry in {wait:.3g} s",
            EventKind.CRASHED,
            outcome=error,
        )
        self._note(reported=True, hold_until=self.restart.not_before)

    def _internal_error(self, exc: Exception) -> None:
        """An error nothing translated (a bug, an OS error such as EMFILE):
        ending the supervisor would leave the VMM running unwatched. Report it
        to the waiting caller and try again after the health interval."""
        log.exception("VM %s: unexpected error; retrying", self.vm.vm_id)
        with self.vm.cond:
            phase = self.vm.obs.phase
        self._publish(
            phase,
            f"internal error, retrying: {exc!r}",
            outcome=TemporaryError(f"VM {self.vm.vm_id}: internal error: {exc!r}"),
        )
        self._note(hold_until=self.m.clock() + self.t.health_interval)

    def _report_waiting(
        self, wait: float, *, event: EventKind | None = None, force: bool = False
    ) -> None:
        """Publish that the VM waits out its restart backoff. Callers waiting
        on this request get a TemporaryError naming the delay."""
        what = self.last_failure
        message = (
            f"{what + '; ' if what else ''}restart in {wait:.3g} s "
            f"(failure {self.restart.failures} in a row)"
        )
        with self.vm.cond:
            need_outcome = force or self.vm.answered() is None
        error = TemporaryError(f"VM {self.vm.vm_id}: {message}", delay=max(wait, 0.1))
        self._publish(
            self._waiting_phase(), message, event, outcome=error if need_outcome else None
        )
        self._note(reported=True)

    def _waiting_phase(self) -> Phase:
        return Phase.CRASH_LOOP if self.restart.crash_loop(self.m.policy) else Phase.PENDING

    def _discard(self, why: str) -> str | None:
        """Stop a VMM that cannot serve the target; returns the ladder step
        that ended it (None when there was none, or it could not)."""
        if self.handle is None:
            return None
        try:
            return self._ladder(why)
        except ProcuratorError as exc:
            log.error(  # noqa: TRY400 - an expected failure, the message says it all
                "VM %s: could not stop its VMM after %s: %s", self.vm.vm_id, why, exc
            )
            return None

    # -- health checks -----------------------------------------------------------

    def _read_state(self) -> VmState:
        """One health check: the VM's state, and its counters when they are
        due, in as few API calls as the driver allows.

        Every call costs the worker ~0.2 ms of CPU in situ, so at a thousand
        VMs a state read *and* a counters read per check were most of an
        idle worker's CPU. When counters are due and the driver's
        ``state_mark`` shows the VMM reported no state change since the last
        ``state`` read, the counters call alone is the check: a VMM that
        answers it is not hung and still has its VM, in the state last read.
        Anything else — no mark, a changed mark, a power change to make, a
        counters call that fails — reads the state. Timeouts and a VMM gone
        propagate (the caller counts them towards ``hung_after``)."""
        assert self.handle is not None
        marks = self.driver.capabilities.state_marks
        mark = self.driver.state_mark(self.paths) if marks else None
        due = self._counters_due()
        known = self.known_state
        if due and mark is not None and known is not None and known[0] == mark:
            target = self.facts.target
            paused = target is not None and target.power is PowerState.PAUSED
            if known[1] is (VmState.PAUSED if paused else VmState.RUNNING) and self._read_counters(
                fallback_ok=True
            ):
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
        check reads them, not every other one because of timer jitter.
        Never when the manager's sweep reads them."""
        if self.t.counters_interval <= 0 or self.m.sweeping:
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

    # -- stop ladder -------------------------------------------------------------

    def _ladder(self, reason: str, *, api: bool = True, resume_paused: bool = True) -> str:
        """Run the stop ladder (``StopLadder``) and forget the VMM; returns
        the step that ended it. Raises ``StopFailed`` if it survives SIGKILL."""
        assert self.handle is not None
        ladder = StopLadder(self.driver, self.t, self.vm.vm_id)
        how = ladder.run(self.handle, reason, api=api, resume_paused=resume_paused)
        self._forget_vmm()
        return how

    # -- publishing --------------------------------------------------------------

    def _publish_event(self, kind: EventKind, message: str) -> None:
        """An event alone: the observation stays as it is."""
        with self.vm.cond:
            obs = self.vm.obs
            op_id = self.vm.remove_op_id if self.vm.removing and self.vm.remove_op_id else obs.op_id
        self.m._emit(obs, _event(self.vm.vm_id, kind, message, op_id))

    def _publish(
        self,
        phase: Phase,
        message: str,
        event: EventKind | None = None,
        *,
        power: PowerState | None = None,
        outcome: object = None,
        told: str | None = None,
    ) -> None:
        """Replace the VM's observation; answer the current request when
        ``outcome`` is given (``_OK`` or the error); tell ``on_change`` when
        the observation changed or there is an event. ``told``: the event's
        own message when it is not the observation's ``message``."""
        vm, vmm = self.vm, self.facts.vmm
        running = self.handle is not None and vmm is not None
        with vm.cond:
            base = vm.obs if vm.desired is None else vm.obs.for_spec(vm.desired)
            obs = dataclasses.replace(
                base,
                phase=phase,
                message=message,
                power=power
                if power is not None
                else (vm.obs.power if running else PowerState.STOPPED),
                restarts=self.restart.restarts,
                pid=self.handle.pid if running and self.handle is not None else None,
                observed_hash=vmm.booted_hash if running and vmm is not None else "",
                confinement=self.confinement if running else None,
                boot_seconds=self.boot_seconds if running else None,
            )
            changed = obs != vm.obs
            vm.obs = obs
            if outcome is not None:
                error = outcome if isinstance(outcome, ProcuratorError) else None
                vm.outcome = Outcome(self.request, error)
                vm.cond.notify_all()
            op_id = vm.remove_op_id if vm.removing and vm.remove_op_id else obs.op_id
        said = message if told is None else told
        if event is not None:
            log.info("VM %s: %s: %s", vm.vm_id, event.value, said)
        if changed or event is not None:
            self.m._emit(obs, _event(vm.vm_id, event, said, op_id))


class JobContext:
    """What a job (``VmManager.run_job``) may see and do, in a turn of the
    VM's supervisor: the spec and the VMM as the supervisor knows them,
    stop the VMM, launch one from a saved state, tell of an event."""

    def __init__(self, supervisor: VmSupervisor) -> None:
        self._s = supervisor

    @property
    def vm_id(self) -> str:
        return self._s.vm.vm_id

    @property
    def spec(self) -> VmSpec | None:
        """The spec being converged to; None while the VM is being removed."""
        return None if self._s.facts.removing else self._s.spec

    @property
    def handle(self) -> VmmHandle | None:
        """The live VMM (None: none runs, or it runs another hash)."""
        s = self._s
        if s.handle is None or s.facts.vmm is None or not s._alive():
            return None
        target = s.facts.target
        if target is None or s.facts.vmm.booted_hash != target.hash:
            return None
        return s.handle

    @property
    def paths(self) -> VmmPaths:
        return self._s.paths

    @property
    def driver(self) -> VmmDriver:
        return self._s.driver

    @property
    def timeouts(self) -> Timeouts:
        return self._s.t

    def forget_state(self) -> None:
        """The VM's state may have changed (paused and resumed): read it
        again before trusting what was last read."""
        self._s.known_state = None
        if self._s.facts.vmm is not None:
            self._s._note_vmm(state=None)

    def stop_vmm(self, reason: str) -> str:
        """Stop the VMM through the stop ladder (no-op without one)."""
        if self._s.handle is None:
            return "no VMM running"
        return self._s._ladder(reason)

    def launch_restored(self, source: Path, message: str) -> VmmHandle:
        """With no VMM running: launch one whose VM is loaded from the saved
        state in ``source`` (``VmmDriver.restore``), as the supervisor
        launches any VMM (recorded, jailed); ``message`` is told once it
        is seen running (a ``restored`` event)."""
        s = self._s
        spec = s.spec
        assert spec is not None and s.handle is None
        handle = s._launch(spec, owes=EventKind.RESTORED, restore_from=source)
        s._take(handle, spec.hash)
        s.ever_started = True
        s.pending = _Pending(EventKind.RESTORED, message)
        s.restart = s.restart.started(s.m.clock())
        s._note(reported=False)
        # The new VMM is seen at once; the next turn confirms it and tells.
        s._publish(Phase.STARTING, f"restored (VMM pid {handle.pid}), confirming")
        return handle

    def event(self, kind: EventKind, message: str) -> None:
        log.info("VM %s: %s: %s", self._s.vm.vm_id, kind.value, message)
        self._s._publish_event(kind, message)

    def give_up_vmm(self, reason: str) -> None:
        """The VM left this VMM (a live move sent it away): stop it without
        its API (its guest is stopped for good; QEMU's stays ``postmigrate``
        and answers no power button), or forget it if it exited by itself."""
        s = self._s
        if s.handle is None:
            return
        if s._alive():
            s._ladder(reason, api=False)
        else:
            s._forget_vmm()

    def moved_out(self, out: MovedOut | None) -> None:
        """Mark the VM durably as migrating (``sent`` False: before the
        migration begins) or migrated away by a live move, or clear the
        mark (None: the migration failed here, or its move did); see
        ``VmSupervisor._hold_moved_out``."""
        self._s._mark_moved_out(out)


# What a launch may owe (``HandlesRecord.owes``), and how its event begins
# when a re-adopting worker tells it.
_OWED_WORDS = {
    EventKind.BOOTED: "booted",
    EventKind.REPLACED: "now runs",
    EventKind.RESTARTED: "restarted, runs",
    EventKind.RESTORED: "restored, runs",
}


def _owed_kind(value: str) -> EventKind | None:
    """The event a handles record says its launch owes (None: nothing, or
    a value this release does not know)."""
    return next((kind for kind in _OWED_WORDS if kind.value == value), None)


def _event(vm_id: str, kind: EventKind | None, message: str, op_id: str) -> VmEvent | None:
    if kind is None:
        return None
    return VmEvent(
        vm_id=vm_id, kind=kind, message=message, op_id=op_id, unix_time_ms=int(time.time() * 1000)
    )


def _describe(exc: ProcuratorError) -> str:
    """One line for an operator: the message and the VMM's error chain."""
    text = exc.message
    if exc.details:
        text += ": " + "; ".join(exc.details)
    return text
