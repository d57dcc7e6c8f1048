"""The VMM driver port: what the VmManager needs from a hypervisor.

One driver instance serves all VMs of a worker; every method is blocking and
thread-safe (each VM's supervisor calls it for its own VM only, from one
thread at a time). A
driver never decides policy (restarts, backoff, the order of the stop ladder):
the VmManager does, the same way for every driver.

The port is launch-shaped, and every driver implements all of it:

- ``check(definition)``: refuse, before anything is taken on the host, a
  definition this VMM cannot run as written (``VmmRejected`` naming every
  field). Pure.
- ``launch(definition, paths, jail=)``: start a VMM running the VM and
  confirm it runs; no process is left behind when it raises. With a
  ``VmmJail`` (``procurator.worker.jail``) the driver starts its VMM
  through it, naming what only the driver knows (its runtime files, its
  devices) and turning on the VMM's own syscall filter. How (a VMM that takes its
  config over its API after start, or one that takes it on its command
  line) is the driver's own business.
- ``adopt(paths, recorded)``: the live VMM a previous owner recorded, or
  None; ``clear_leftovers(paths, ...)``: with no VMM of ours alive, remove
  what a dead one left (a stale API socket, an unrecorded VMM);
  ``classify_exit(paths, handle)``: how a VMM that exited on its own ended.
- Power and stop operations: ``pause``, ``resume``, ``power_button``,
  ``shutdown_vm``, ``shutdown_vmm``; observation: ``state``, ``counters``,
  ``state_mark``.
- ``capabilities``: what the manager may count on, declared by the driver.
- Snapshots: ``save_state`` (the paused VM's memory and device state into
  a directory) and ``restore`` (a launch that loads such a state instead
  of booting).
- Live moves (with ``capabilities.live_move``; docs/SNAPSHOTS.md, "Moves"):
  on the target ``launch_incoming`` (a VMM waiting for the VM's state, its
  disk copies exported for mirroring) then ``finish_incoming`` (the guest
  runs there); on the source ``send_migration`` (disks mirrored, memory
  migrated, the source guest stopped for good). The two ends meet on
  TCP addresses the caller chose; who opens the sockets (the VMM, or the
  driver handing it descriptors) is the driver's business, so a jailed VMM
  needs no network rights of its own where the driver can avoid it.
  Every connection of a move's streams is authenticated by the worker
  before the VMM sees a byte of it: the source presents the move's
  ``token`` (a secret both ends got from the master) in a preamble
  (``procurator.worker.stream_auth``), the target checks it and drops a
  peer that does not (see ``launch_incoming``).

The VM is a typed ``procurator.core.vmdef.VmDefinition`` (made safe by
confinement, completed by the worker: disk copies, tap, MAC, serial file);
each driver renders it its own way. The API socket, event and log files are
launch arguments (``VmmPaths``), never part of the definition. Shared
process mechanics (launching detached, waiting for the API, stale sockets,
log tails) are in ``procurator.worker.vmm.process``.

Errors: drivers raise only ``VmmError`` subclasses (a ``TemporaryError``:
the VMM may answer later) or ``VmmRejected`` (a ``PermanentError``: the VMM
refused the VM or a request). Library exceptions (httpx, OSError, JSON)
never leak.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.jail import VmPathsPlan
from procurator.core.supervision import VmState
from procurator.core.vmdef import VmDefinition
from procurator.worker.stream_auth import MAX_TOKEN_BYTES, MIN_TOKEN_BYTES

__all__ = [
    "MAX_TOKEN_BYTES",
    "MIN_TOKEN_BYTES",
    "Address",
    "Capabilities",
    "MigrationProgress",
    "VmExit",
    "VmState",
    "VmmDriver",
    "VmmError",
    "VmmGone",
    "VmmHandle",
    "VmmJail",
    "VmmPaths",
    "VmmRejected",
    "VmmTimeout",
    "check_token",
]


class VmmError(TemporaryError):
    """The VMM did not do what was asked; it may later."""


class VmmTimeout(VmmError):
    """The VMM did not answer in time (hung, or overloaded)."""


class VmmGone(VmmError):
    """The VMM process is not there (exited, or never started)."""


class VmmRejected(PermanentError):
    """The VMM refused a request (4xx); ``details`` carries its error chain."""

    def __init__(self, message: str, *, status: int = 0, details: tuple[str, ...] = ()) -> None:
        super().__init__(message, details=details)
        self.status = status


class VmExit(enum.Enum):
    """How a VMM that exited on its own ended."""

    POWERED_OFF = "powered off"  # the guest shut down; the VMM exited cleanly
    CRASHED = "crashed"  # anything else (a signal, a fatal error)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What the VmManager may count on from a driver.

    ``state_marks``: ``state_mark`` changes whenever the VMM reports a
    transition of the VM, so an unchanged mark means an unchanged state and
    a health check may read the counters alone. ``guest_clock``: a resume
    can set the guest's clock (else a resumed guest lags by the paused time
    until it corrects itself, and the ``resumed`` event says so).
    ``vmm_writes_state``: the VMM writes (``save_state``) and reads
    (``restore``) its saved state itself, so the directory must be inside
    its jail; else the worker opens the files and hands them over.
    ``live_move``: ``launch_incoming``, ``send_migration`` and
    ``finish_incoming`` move a running VM to another host with its disks
    (else they raise ``VmmRejected`` and a move is cold). cloud-hypervisor
    moves memory and device state only: its ``disks`` must be None, the
    caller copying the writable disks while the VM is paused, before
    ``send_migration`` (a "live" move that is a short cold one).
    """

    state_marks: bool = False
    guest_clock: bool = False
    vmm_writes_state: bool = False
    live_move: bool = False


#: A TCP address of a live move's channel: (host, port). The target listens
#: on it, the source connects to it.
Address = tuple[str, int]


def check_token(token: bytes) -> None:
    """``VmmRejected`` unless ``token`` can authenticate a move's streams
    (bytes, ``MIN_TOKEN_BYTES`` to ``MAX_TOKEN_BYTES`` long: random, the
    move's transfer token; one length byte on the wire)."""
    if not isinstance(token, bytes) or not MIN_TOKEN_BYTES <= len(token) <= MAX_TOKEN_BYTES:
        length = len(token) if isinstance(token, bytes) else type(token).__name__
        raise VmmRejected(
            f"a live move's token must be {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes "
            f"(got {length})"
        )


#: ``send_migration``'s progress callback: (bytes done, bytes in all) of the
#: whole transfer (disks and memory) as the VMM reports it; called from the
#: migrating thread, several times, the total may grow (dirtied pages).
MigrationProgress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class VmmPaths:
    """Host paths the worker owns for one VM's VMM. ``vm_dir`` is the VM's
    directory (the worker's records; what the launch marker names);
    ``run_dir``, inside it, holds what the VMM itself writes (its API
    socket, event, log and serial files) and is all of the VM directory a
    jailed VMM may write, with the VM's disk copies."""

    vm_dir: Path
    api_socket: Path
    event_file: Path
    log_file: Path
    serial_file: Path
    run_dir: Path | None = None

    @property
    def vmm_dir(self) -> Path:
        """Where the VMM's own files go (``run_dir``, else ``vm_dir``)."""
        return self.run_dir if self.run_dir is not None else self.vm_dir


class VmmJail(Protocol):
    """The jail a VMM is launched in (``procurator.worker.jail.VmJail``,
    made by the worker for one launch). A driver hands it what only the
    driver knows; the jail adds the VM's own paths, its uid, its cgroup."""

    @property
    def uid(self) -> int: ...

    @property
    def gid(self) -> int: ...

    @property
    def vm(self) -> VmPathsPlan:
        """The VM's own paths: writable directories, read-only paths, devices."""
        ...

    @property
    def taps(self) -> tuple[str, ...]:
        """The VM's taps (given to its uid)."""
        ...

    def spawn(
        self,
        argv: Sequence[str],
        *,
        log_path: Path,
        env: Mapping[str, str] | None,
        cwd: Path,
        runtime: Sequence[str],
        devices: Collection[str] = (),
        timeout: float = 30.0,
    ) -> tuple[int, int]:
        """Start ``argv`` jailed, detached like ``process.launch_detached``;
        its (pid, start ticks). ``runtime``: the program's runtime files
        (``vmm.closure``); ``devices``: device nodes it needs beyond the
        standard ones (e.g. ``/dev/kvm``)."""
        ...


@dataclass(frozen=True, slots=True)
class VmmHandle:
    """Transient facts about a running VMM, persisted in ``handles.json`` and
    always re-checked against the OS before being trusted: the pid must be
    alive *and* have the recorded start time (``/proc/<pid>/stat`` field 22)
    so a recycled pid is never mistaken for our VMM."""

    driver: str
    pid: int
    pid_start_ticks: int
    api_socket: str
    #: What the launch that returned this handle confirmed of its VM (the
    #: state, and with ``Capabilities.state_marks`` the state mark read
    #: *before* that confirmation: a transition after it moves the mark),
    #: so that the supervisor's first health check of a new VMM is not a
    #: second ``vm.info`` of what the launch has just asked. Not persisted,
    #: not compared: None for a handle read back or adopted.
    confirmed: tuple[VmState, Hashable | None] | None = field(
        default=None, compare=False, repr=False
    )

    def to_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "pid": self.pid,
            "pid_start_ticks": self.pid_start_ticks,
            "api_socket": self.api_socket,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> VmmHandle:
        return cls(
            driver=str(data["driver"]),
            pid=int(data["pid"]),
            pid_start_ticks=int(data["pid_start_ticks"]),
            api_socket=str(data["api_socket"]),
        )


class VmmDriver(Protocol):
    """One hypervisor (see the module docstring). Methods block; ``timeout``
    is seconds for that call."""

    name: str
    capabilities: Capabilities

    def check(self, definition: VmDefinition) -> None:
        """Raise ``VmmRejected`` naming every part of ``definition`` this
        VMM cannot run as written. No I/O."""
        ...

    def launch(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """Start a VMM in its own session (so it outlives the worker), with
        the launch marker (``process.launch_env``), running the VM of
        ``definition``; confirm the VM runs; return the handle (with what
        was confirmed in ``VmmHandle.confirmed``, where the driver keeps it). ``timeout``
        bounds the whole start. With ``jail``, the VMM is started through it
        (``VmmJail.spawn``) and asked for its own syscall filter; without,
        it runs with the worker's privileges (``--unconfined``). Raises
        ``VmmRejected`` (the VMM refused the VM) or ``VmmError``, and then
        leaves no process behind."""
        ...

    def adopt(self, paths: VmmPaths, recorded: VmmHandle) -> VmmHandle | None:
        """``recorded`` if that VMM still runs (same pid and start time),
        else None."""
        ...

    def forget(self, handle: VmmHandle) -> None:
        """Drop what the driver keeps for the VMM of ``handle``, which is
        gone (its API connection, its lock): the supervisor calls it once it
        saw the VMM end."""
        ...

    def classify_exit(self, paths: VmmPaths, handle: VmmHandle) -> VmExit:
        """How the VMM of ``handle``, now gone, ended."""
        ...

    def clear_leftovers(self, paths: VmmPaths, *, unrecorded: bool, grace: float) -> None:
        """With no VMM of ours alive for this VM (the caller holds its lock):
        stop any VMM launched for it that no handle records, when
        ``unrecorded`` says one may exist (SIGTERM, ``grace`` seconds,
        SIGKILL), and remove its stale API socket. Raises ``VmmError`` if a
        live VMM nobody recorded still holds the socket."""
        ...

    def state(self, handle: VmmHandle, *, timeout: float) -> VmState:
        """Ask the VMM for the VM's state (``VmmTimeout`` if it hangs)."""
        ...

    def pause(self, handle: VmmHandle, *, timeout: float) -> None: ...

    def resume(self, handle: VmmHandle, *, timeout: float) -> None: ...

    def power_button(self, handle: VmmHandle, *, timeout: float) -> None:
        """Ask the guest to power off (ACPI). Returns at once."""
        ...

    def shutdown_vm(self, handle: VmmHandle, *, timeout: float) -> None:
        """Stop the VM hard; the VMM process may stay."""
        ...

    def shutdown_vmm(self, handle: VmmHandle, *, timeout: float) -> None:
        """Ask the VMM process to exit."""
        ...

    def counters(self, handle: VmmHandle, *, timeout: float) -> Mapping[str, Mapping[str, int]]:
        """Device counters by device id (``vm.counters``); latency sentinels
        (u64::MAX) already filtered out."""
        ...

    def state_mark(self, paths: VmmPaths) -> Hashable | None:
        """With ``capabilities.state_marks``: a cheap token (no API call)
        that changes whenever the VMM reports a change of the VM's state;
        None when it cannot tell right now."""
        ...

    def save_state(self, handle: VmmHandle, target: Path, *, timeout: float) -> None:
        """With the VM paused (the caller paused it): write its memory and
        device state into ``target``, an empty directory inside the VMM's
        own directory (``VmmPaths.vmm_dir``) owned by the VMM's uid, so a
        jailed VMM that writes its state itself needs no path beyond its
        jail. The VM stays paused. Snapshots: ``procurator.worker.
        snapshots``."""
        ...

    def restore(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        source: Path,
        *,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """Like ``launch``, but the VM is not booted: its memory and device
        state are loaded from ``source`` (what ``save_state`` wrote, staged
        inside ``paths.vmm_dir``), then it runs. The definition must be
        the one the state was saved from (the disks already hold the
        snapshot's copies). Leaves no process behind when it raises."""
        ...

    def launch_incoming(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        memory: Address,
        disks: Address | None,
        token: bytes,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """The target of a live move: start a VMM (as ``launch`` does:
        own session, launch marker, ``jail``) for the VM of ``definition``
        that does not boot it but waits for its memory and device state on
        ``memory`` (a TCP address to listen on). With ``disks``, it also
        exports the VM's writable disks (the copies named by
        ``definition``, already in the VM's directory with the source's
        sizes) for the source to mirror into over ``disks`` (QEMU: an NBD
        server); read-only disks are the image's and are not sent. Returns
        once both listen. The guest runs only after ``finish_incoming``;
        the caller stops the VMM (``shutdown_vmm``) to abandon the move.
        Raises as ``launch``, and then leaves no process behind.

        ``token``: the move's secret (``check_token``: 16 to 255 bytes,
        random; the mover gives the source's ``send_migration`` the same).
        Every connection on ``memory`` and ``disks`` must present it
        (``stream_auth``'s preamble, read by the worker within
        ``stream_auth.PREAMBLE_TIMEOUT`` of its accept) before any byte
        reaches the VMM or comes from it. A peer that presents another
        token, garbage or nothing in time is answered a refusal (when it
        sent something), dropped and logged; it consumes nothing: the
        listeners accept on until the source's connections came (one for
        the memory, one per exported disk), then stop accepting. A bad
        ``token`` is ``VmmRejected`` before anything starts."""
        ...

    def send_migration(
        self,
        handle: VmmHandle,
        *,
        memory: Address,
        disks: Address | None,
        token: bytes,
        timeout: float,
        progress: MigrationProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """The source of a live move, its guest running (or paused):
        with ``disks``, mirror every writable disk to the target's export
        there while the guest runs, until the copies are in sync; then
        migrate the memory and device state to ``memory``, the guest
        paused only for the last dirty pages. Returns once the target
        holds the whole state (it said it loaded it): the source guest is
        then stopped (its VMM still up, for the caller to stop with
        ``shutdown_vmm``) and must not run again once the target may: only
        if ``finish_incoming`` fails (the target's guest never ran, so the
        source's disks are still the VM's) may the caller stop the target
        and ``resume`` the source.

        Any failure before that point (the target refuses or goes away,
        ``timeout`` runs out, a mirror job fails) undoes the move on the
        source: mirror jobs cancelled, the guest running again (resumed
        if it was paused, by the migration or before it), and
        ``VmmError`` (or ``VmmRejected`` for a request the VMM refused)
        is raised; the target is then the caller's to stop. ``progress``
        is called with (done, total) bytes as the VMM reports them, on the
        calling thread. The call lasts as long as the copy; a driver may
        hold the VM's API for all of it (QEMU does: other calls for the VM
        wait, up to their own timeouts), so make it where the VM's other
        calls are made, as its supervisor takes a snapshot.

        ``token``: the move's secret, the one the target's
        ``launch_incoming`` got. Each connection to ``memory`` or
        ``disks`` presents it first (``stream_auth``) and waits for the
        target's acceptance before the VMM is given the connection; a
        refusal is a ``VmmError`` naming the target's reason (the move is
        undone as for any failure). A bad ``token`` is ``VmmRejected``
        before anything is asked of the VMM.

        ``cancel``: set from another thread, it asks the call to stop (the
        move is cancelled: its deadline passed, say). The driver looks at
        it while the copy runs (every poll) and, before its point of no
        return, undoes the move as for a failure and raises ``VmmError``
        saying it was cancelled; past it (QEMU: the device state going
        after the switchover; cloud-hypervisor: the stream through), it
        is too late: the call completes and returns as it would have.
        Either way the caller's verdict is the call's outcome. Set before
        the call, nothing is asked of the VMM."""
        ...

    def incoming_received(self, handle: VmmHandle) -> bool:
        """Without blocking (no API call): whether the incoming migration
        of ``handle`` (``launch_incoming``) has completed with the VM's
        whole state in the target's VMM, which then runs the guest by
        itself. Only a driver whose target completes a live move on its
        own (``procurator.core.move.TARGET_COMPLETES_LIVE``:
        cloud-hypervisor) ever says True; the move's target reports it
        ``received``, on which the master switches the move. QEMU's target
        runs its guest only at ``finish_incoming``: it always says False
        (the source's undo of an abandoned migration rests on that, see
        ``abandon_migration``). False too while the migration runs, once
        it failed, and for a VMM this driver did not launch."""
        ...

    def finish_incoming(self, handle: VmmHandle, *, timeout: float) -> None:
        """The target after the source's ``send_migration`` returned:
        wait (within ``timeout``) until the VMM holds the whole state, stop
        the disk export, and let the guest run; confirm it runs. Raises
        ``VmmError`` if the state never arrived complete (the VMM may have
        exited; the caller stops it and the source's guest stays the
        VM)."""
        ...

    def abandon_migration(self, handle: VmmHandle, *, timeout: float) -> None:
        """A migration this VMM may have been left in by a worker that
        stopped during ``send_migration`` (its undo lived in the call that
        died): cancel it, remove what the move set up (mirror jobs, their
        nodes), and let the guest run here again if the move's migration
        paused it, even one that completed (the device state sent, the
        target's VMM loaded it: its guest has not run, see below). A
        no-op when the VMM holds no such migration (a guest paused for
        another reason stays paused). Raises ``VmmError`` when it cannot
        (the guest may then still be paused), ``VmmGone`` if the VMM is.

        Safe to resume because the target's guest never runs before
        ``finish_incoming``, which only the move's switch calls, and the
        master switches only once this source reported the move ``sent``:
        the caller (a restarted worker) never reports it for the migration
        it abandons (its ``moved-out.json`` is cleared as the guest runs on
        here; only a new ``send_migration`` that completes, stopping this
        guest again, could report ``sent``), so that move fails at its
        deadline and the target's VMM is stopped unrun. This rests on a
        QEMU target never reporting a live transfer ``received``
        (``incoming_received`` is False; the master switches a QEMU move
        on the source's ``sent`` only: ``procurator.core.move``): one
        whose incoming migration completed holds the whole state, unrun."""
        ...

    def close(self) -> None:
        """Release what the driver holds for its VMMs (connections); the
        VMMs keep running."""
        ...
