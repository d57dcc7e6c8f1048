"""The records a VM's supervisor and the VmManager's callers share.

``VmSpec`` (what a VM should be, as ``vm.json`` keeps it), ``VmObservation``
(what is true of it, immutable, replaced on every change), ``Timeouts``, and
``VmRecord``: one per managed VM, the only mutable state shared between the
callers of ``procurator.worker.manager.VmManager`` and the VM's supervisor
(``procurator.worker.supervisor``), whichever thread drives its turns. Its
fields after ``cond`` are guarded by ``cond`` (see the lock order in
``manager``); ``parked``, ``woken`` and ``park_id`` say which thread may
drive the turns (``procurator.worker.turns``).

Requests and outcomes: a caller that changes the target (hash, power, or
removal) bumps ``request``; the supervisor answers with an ``Outcome`` of
the request it acted on. A VM is converged when ``answered()`` is an outcome
without an error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from procurator.core.errors import ProcuratorError
from procurator.core.jail import Confinement
from procurator.core.models import Phase, PowerState, VmEvent
from procurator.core.supervision import Target
from procurator.core.vmdef import VmDefinition
from procurator.worker.state import VmLock
from procurator.worker.vmm.base import VmmHandle, VmmPaths

__all__ = [
    "UNREADABLE_MARK",
    "ChangeCallback",
    "Incoming",
    "Job",
    "MovedOut",
    "Outcome",
    "SweepWatch",
    "Timeouts",
    "VmObservation",
    "VmRecord",
    "VmSpec",
]

# vm.json formats: 1 (until the typed definition) kept its side data in
# string "labels" ({"store_path": ..., "address": ...}); 2 has typed fields.
_SPEC_FORMAT = 2


@dataclass(frozen=True, slots=True)
class Incoming:
    """A live move's target side (docs/SNAPSHOTS.md, "Live moves"): the VM
    is held in an incoming VMM (``VmmDriver.launch_incoming`` on
    ``memory`` and ``disks`` with ``token``) for move ``op_id``: never
    booted on its own, never probed or restarted; a worker restart stops
    its VMM and holds the VM with its disk copies (``VmManager.recover``).
    A spec without it for the same hash (the move's switch) lets the VM
    run there (``finish_incoming``)."""

    op_id: str
    memory: tuple[str, int]
    disks: tuple[str, int] | None
    token: bytes = field(repr=False)  # a credential: never in a repr, a log or an error

    def to_json(self) -> dict[str, Any]:
        return {
            "op_id": self.op_id,
            "memory": list(self.memory),
            "disks": list(self.disks) if self.disks is not None else None,
            "token": self.token.hex(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Incoming:
        host, port = data["memory"]
        disks = data.get("disks")
        return cls(
            str(data["op_id"]),
            (str(host), int(port)),
            (str(disks[0]), int(disks[1])) if disks else None,
            bytes.fromhex(str(data["token"])),
        )


@dataclass(frozen=True, slots=True)
class MovedOut:
    """A live move's source side: the VM's supervisor began migrating it
    to the move's target (``sent`` False: written before the migration
    began, so a worker that stops in it finds it) or did (``sent``: the
    target holds the whole state, the guest here is stopped for good).
    Kept beside ``vm.json`` (``MOVED_OUT_FILE``), never with the spec:
    an ``ensure`` of the VM does not lift it; the switch's removal takes it
    with the VM's directory, a failed move clears it (``JobContext.
    moved_out``)."""

    op_id: str
    sent: bool


MOVED_OUT_FILE = "moved-out.json"

UNREADABLE_MARK = MovedOut("?", sent=True)
"""A mark found but not readable (a failing disk): whether the state was
sent is unknown, so it is taken as sent (the VMM stopped, the VM never
started or resumed here) and its move, whichever it was, is reported
failed, never migrated again (``procurator.worker.move_service``). Never
cleared by the worker: a sent mark's VM may run on the target (the move
switched), and an assignment that no longer names the move may come from
a master that lags; the status tells the operator to remove the file
once the VM runs nowhere else, and restart the worker."""


@dataclass(frozen=True, slots=True)
class VmSpec:
    """What one VM should be. ``hash`` is its identity (a new hash replaces
    the VM); ``definition`` is the final, confined VM; ``image`` the store
    path it came from and ``address`` the guest's IPv4 address (shown in
    status; "" without network). ``reschedule``: the master marked it
    ``on_worker_lost = "reschedule"`` (``VmAssignment.reschedule``), so a
    worker restarted while no master answers knows which re-adopted VMs
    its fence pauses (``procurator.core.fence``). ``incoming``: held for a
    live move (``Incoming``)."""

    vm_id: str
    hash: str
    definition: VmDefinition
    power: PowerState = PowerState.RUNNING
    op_id: str = ""
    image: str = ""
    address: str = ""
    reschedule: bool = False
    incoming: Incoming | None = None

    @property
    def target(self) -> Target:
        return Target(self.hash, self.power)

    def same_target(self, other: VmSpec | None) -> bool:
        """True when ``other`` asks for the same VM in the same power state,
        held incoming or not the same way (op id, image path and address
        need no action on the VMM)."""
        return other is not None and (self.hash, self.power, self.incoming) == (
            other.hash,
            other.power,
            other.incoming,
        )

    def to_json(self) -> dict[str, Any]:
        incoming = {"incoming": self.incoming.to_json()} if self.incoming is not None else {}
        return {
            **incoming,
            "format": _SPEC_FORMAT,
            "vm_id": self.vm_id,
            "hash": self.hash,
            "config": self.definition.to_vm_config(),
            "power": self.power.value,
            "op_id": self.op_id,
            "image": self.image,
            "address": self.address,
            "reschedule": self.reschedule,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VmSpec:
        """Read ``vm.json``, as this release writes it or as the previous
        one did (format 1: ``labels``)."""
        labels = data.get("labels", {}) if data.get("format", 1) == 1 else {}
        return cls(
            vm_id=str(data["vm_id"]),
            hash=str(data["hash"]),
            definition=VmDefinition.from_vm_config(data["config"]),
            power=PowerState(data.get("power", PowerState.RUNNING.value)),
            op_id=str(data.get("op_id", "")),
            image=str(data.get("image", labels.get("store_path", ""))),
            address=str(data.get("address", labels.get("address", ""))),
            # Absent in a vm.json written before the fence: not marked.
            reschedule=bool(data.get("reschedule", False)),
            incoming=Incoming.from_json(data["incoming"]) if data.get("incoming") else None,
        )


@dataclass(frozen=True, slots=True)
class VmObservation:
    """What is true about one VM, as last observed by its supervisor.
    ``desired_*``, ``image``, ``address`` and ``op_id`` come from the spec
    it converges to; ``observed_hash`` is the hash the running VMM was booted
    with ("" when none runs)."""

    vm_id: str
    desired_hash: str  # "" while the spec is unknown
    phase: Phase
    power: PowerState  # observed
    desired_power: PowerState
    message: str = ""
    restarts: int = 0
    pid: int | None = None
    observed_hash: str = ""
    op_id: str = ""
    driver: str = ""
    image: str = ""
    address: str = ""
    # What the running VMM is confined by, read from the OS (None: no VMM).
    confinement: Confinement | None = None
    # Seconds from launching the running VMM to its VM first seen at its
    # target (running or paused); None without a VMM or before it settled.
    boot_seconds: float | None = None
    # The op id of the live move the VM is held incoming for ("": none):
    # such a VM is no VM of this worker's yet (not reconciled, not reported).
    incoming: str = ""
    # A live move that migrates (or migrated) it away (``MovedOut``).
    moved_out: MovedOut | None = None

    def for_spec(self, spec: VmSpec) -> VmObservation:
        """This observation of a VM that now converges to ``spec``."""
        return replace(
            self,
            desired_hash=spec.hash,
            desired_power=spec.power,
            op_id=spec.op_id,
            image=spec.image,
            address=spec.address,
            incoming=spec.incoming.op_id if spec.incoming is not None else "",
        )


ChangeCallback = Callable[[VmObservation, VmEvent | None], None]


class Job:
    """Work a caller hands a VM's supervisor (a snapshot, a restore:
    ``VmManager.run_job``), run in its turns between two steps so it
    never races a health check, a restart or a replacement. ``run`` gets
    the supervisor's ``JobContext``; its result or the error it raised
    comes back in ``result`` / ``error``. Fields after ``run`` are guarded
    by the VM record's ``cond``."""

    def __init__(self, what: str, run: Callable[[Any], object]) -> None:
        self.what = what
        self.run = run
        self.started = False
        self.done = False
        self.cancelled = False  # the caller stopped waiting before it started
        self.result: object = None
        self.error: BaseException | None = None


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
    # Seconds between two reads of every VM's counters. With a driver that
    # has state marks, one sweep of the manager reads them for all VMs and
    # is also their health check (VmManager.sweep); 0: no counters, and
    # each supervisor checks its VMM every health_interval itself.
    counters_interval: float = 15.0
    power_button_wait: float = 30.0
    shutdown_vmm_wait: float = 5.0
    sigterm_wait: float = 5.0
    sigkill_wait: float = 10.0
    ensure: float = 120.0  # longest ensure()/remove() blocks


@dataclass(frozen=True, slots=True)
class SweepWatch:
    """What the manager's sweep checks for an idle supervisor: its VMM
    (``handle``, ``paths``) and the driver's state mark at the
    supervisor's last state read (``mark``; None: unknown, so every sweep
    asks for a state read)."""

    handle: VmmHandle
    paths: VmmPaths
    mark: Hashable | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the supervisor answered request ``request``: reached it
    (``error`` None), or an attempt failed."""

    request: int
    error: ProcuratorError | None


class VmRecord:
    """A VM's record, shared between API callers and its supervisor.

    Fields after ``cond`` are guarded by ``cond`` (lock level 3).
    """

    def __init__(self, vm_id: str, driver: str) -> None:
        self.vm_id = vm_id
        self.op_lock = threading.Lock()  # level 1
        self.started = False  # guarded by op_lock
        self.gone = False  # guarded by op_lock: record retired, look up again
        self.flock: VmLock | None = None

        self.cond = threading.Condition(threading.Lock())  # level 3
        # Who runs the supervisor's turns (``procurator.worker.turns``):
        # ``parked`` True while no thread does (it waits: for a wake, or
        # for ``park_id``'s deadline); ``woken``: a wake came that the
        # turns have not read yet. ``resume`` hands a parked VM to the
        # manager's pool (set with the supervisor). A new record is parked:
        # its first wake starts it.
        self.parked = True
        self.woken = False
        self.park_id = 0
        self.resume: Callable[[], None] | None = None
        # The supervisor's ``drive`` (set with it), for a caller that
        # claimed the VM's turns (``claim``).
        self.drive: Callable[[Callable[[], bool] | None], None] | None = None
        self.desired: VmSpec | None = None
        self.removing = False
        self.remove_op_id = ""  # op id of the removal asked for, if any
        self.closing = False
        # Found by ``VmManager.recover`` as a ``reschedule`` VM desired up:
        # no VMM is launched for it (a live one is kept) until an assigned
        # ``ensure`` names it: the master may have moved it meanwhile.
        self.held = False
        self.request = 0  # bumped whenever the target (hash, power, removal) changes
        self.outcome: Outcome | None = None
        self.finished = False
        self.handle: VmmHandle | None = None  # published for poll_counters
        self.jobs: list[Job] = []  # run by the supervisor, in order
        self.counters: Mapping[str, Mapping[str, int]] = {}
        # Set by the supervisor while it waits idle on the manager's sweep
        # (``VmManager.sweep``), cleared when it wakes; the sweep clears it
        # and sets ``check_asked`` when the supervisor must read the state.
        self.swept: SweepWatch | None = None
        self.check_asked = False
        self.obs = VmObservation(
            vm_id=vm_id,
            desired_hash="",
            phase=Phase.PENDING,
            power=PowerState.STOPPED,
            desired_power=PowerState.STOPPED,
            driver=driver,
        )

    # -- who runs the turns (no lock held by the caller but op_lock) ---------------

    def wake(self) -> None:
        """A request, the sweep, closing, the VMM's exit (the manager's
        ``ExitWatcher``): the supervisor looks at its record again, at once
        if it is parked (on a pool thread), else after its current turn."""
        resume = None
        with self.cond:
            if self.parked and self.resume is not None:
                self.parked, self.woken = False, False
                resume = self.resume
            else:
                self.woken = True
        if resume is not None:
            resume()

    def poke(self) -> None:
        """A wake for a caller that drives the turns itself next (``claim``
        at once, ``release`` in the end): a parked VM stays parked for it."""
        with self.cond:
            self.woken = True

    def claim(self) -> bool:
        """Take a parked, woken VM's turns onto the calling thread (then
        drive them: ``VmSupervisor.drive``); False when another thread
        runs them or nothing woke the VM."""
        with self.cond:
            if not (self.parked and self.woken and self.resume is not None):
                return False
            self.parked, self.woken = False, False
            return True

    def release(self) -> None:
        """After ``poke``: a wake the caller did not drive goes to the pool."""
        with self.cond:
            if not (self.parked and self.woken):
                return
        self.wake()

    def park(self, until: float | None) -> int | None:
        """The supervisor's turns stop here: park (returns the park's id,
        for its deadline ``until``, if any) unless a wake came meanwhile
        (None: run another turn). The caller drives no turn after parking."""
        with self.cond:
            if self.woken:
                self.woken = False
                return None
            self.parked = True
            self.park_id += 1
            return self.park_id

    def unpark(self, park_id: int) -> bool:
        """Park ``park_id``'s deadline came: True when the VM is still parked
        by it (then the caller drives its turns)."""
        with self.cond:
            if not self.parked or self.park_id != park_id:
                return False
            self.parked, self.woken = False, False
            return True

    def answered(self) -> Outcome | None:
        """The outcome of the current request, if there is one (under cond)."""
        outcome = self.outcome
        return outcome if outcome is not None and outcome.request == self.request else None
