"""The QEMU driver: one ``qemu-system-x86_64 -M microvm`` per VM, over QMP.

Why it is shaped this way, and what always holds:

- **QEMU takes the whole VM on its command line.** The machine, kernel and
  devices cannot be created over QMP after start, so :meth:`QemuDriver.launch`
  renders the VM definition as a command line (:func:`qemu_argv`) and starts
  QEMU with it. What QEMU cannot honour is refused before anything is taken
  on the host (:meth:`QemuDriver.check`, from :func:`unsupported`); what
  only tunes cloud-hypervisor's performance or placement (queue counts, rate
  limiters, PCI segments, memory hints, platform strings) is left out.
- **Paused until QMP answers.** QEMU starts with ``-S``; the guest runs only
  after the driver has talked to the monitor and sent ``cont``. A QEMU whose
  monitor never answers is killed before its guest did anything, and
  ``launch`` never leaves a process behind when it raises.
- **One short QMP session per operation** (connect, greeting,
  ``qmp_capabilities``, one command, close). A QMP monitor serves one client
  at a time; never holding it means a restarted worker, or a second driver
  instance, re-attaches to a running QEMU with nothing but its handle, and
  there is no reconnect state to get wrong. Asynchronous events that arrive
  during a session are logged and otherwise skipped.
- **The handle is checked before every call**: the pid must be alive with
  its recorded start time (``process.is_alive``), else ``VmmGone`` — a stale
  socket path is never trusted.
- **Guest power-off ends the process** (no ``-no-shutdown``), as
  cloud-hypervisor's VMM exits when its guest shuts down, and QEMU removes
  its QMP socket when it exits cleanly (a crash leaves it:
  ``classify_exit``). QEMU has no "VM stopped, VMM still up" state, so
  ``shutdown_vm`` is ``quit`` like ``shutdown_vmm``; both return quietly
  when the process is already gone or going (their goal holds).
- **Counters need no saved state**: block counters come from
  ``query-blockstats``; network counters from ``/proc/<pid>/net/dev`` (the
  QEMU's own network namespace) for the taps named in the QEMU's own argv
  (``/proc/<pid>/cmdline``), turned to the guest's point of view (the tap's
  transmit is the guest's receive), with cloud-hypervisor's key names.

- **Live moves hand QEMU descriptors, never ports** (``launch_incoming``,
  ``send_migration``, ``finish_incoming``): this process listens (target)
  or connects (source), and QEMU gets only connections that carry the
  move's token (``procurator.worker.stream_auth``: the source presents it
  before it passes the connection over QMP, ``getfd``; the target checks
  it before QEMU sees a byte), so a jailed QEMU needs no network rights, a
  port that cannot be had fails before QEMU starts, and nobody but the
  source feeds the target a VM or touches its disks. The target waits
  with ``-incoming defer``; a thread of this driver (``_IncomingMove``)
  accepts on the memory port, and hands QEMU the first connection that
  presented the token (``migrate-incoming fd:``) in a QMP session of its
  own; QEMU serves its writable disks over NBD on a unix socket in its run
  directory (``nbd-server-start`` takes a listening socket, not
  connections), reached only through the worker's relay
  (``_migration_relay``), which checks each peer's token first. The
  source mirrors each writable drive there (``blockdev-mirror``), then
  migrates with ``pause-before-switchover``, so the mirrors are completed
  in sync while the guest is stopped and before the device state goes: the
  target never holds memory newer than its disks. A failure undoes the
  source's side in a session of its own, and the guest runs on there. A
  worker that stopped in the call leaves QEMU migrating, or paused at the
  switchover, or ``postmigrate``: the restarted worker's
  ``abandon_migration`` undoes that from what QEMU reports (``_abandon``).

Processes (launch, waiting for QMP, stopping a failed launch, stale
sockets, log tails) are the shared mechanics of
``procurator.worker.vmm.process``. Jailed (``procurator.worker.jail``,
unless the worker runs ``--unconfined``), QEMU starts as the VM's uid in
its own namespaces with only its runtime files (``runtime_files``) and
the VM's paths visible, under its own seccomp filter (``-sandbox``).

Errors: socket and JSON failures become ``VmmTimeout`` / ``VmmGone`` /
``VmmError``; a QMP ``error`` reply and a definition QEMU cannot run become
``VmmRejected`` (permanent), with QMP's error class and description in the
details. A QEMU that exits at start is a ``VmmGone`` (temporary: no memory
or a busy device may pass) with the tail of QEMU's log in the details.

Lock order: ``QemuDriver._guard`` (the maps of per-VM locks and incoming
moves; a leaf, held only to look one up) is never held while taking a
per-VM lock, and a per-VM lock is held for exactly one QMP session (an
incoming move's thread takes it for the hand-over; its thread is joined
with no lock held).
"""

from __future__ import annotations

import array
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from procurator.core.vmdef import Disk, Nic, VmDefinition, write_section
from procurator.worker.stream_auth import Gate, StreamRefused, present
from procurator.worker.vmm import closure, process
from procurator.worker.vmm._migration_relay import Relay
from procurator.worker.vmm.base import (
    Address,
    Capabilities,
    MigrationProgress,
    VmExit,
    VmmError,
    VmmGone,
    VmmHandle,
    VmmJail,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
    VmState,
    check_token,
)
from procurator.worker.vmm.kvm import kvm_verdict

__all__ = ["SANDBOX", "Accel", "QemuDriver", "qemu_argv", "unsupported"]

log = logging.getLogger(__name__)

Accel = Literal["tcg", "kvm", "auto"]

DRIVER_NAME = "qemu"

_MIB = 1024 * 1024
# A QMP reply larger than this is not one we asked for.
_MAX_LINE = 16 * _MIB

# query-status "status" -> VmState. A guest that panicked or hit an internal
# error is not running and will not resume: it reads as Shutdown so the
# manager replaces it. Migration and I/O-error states are paused vCPUs.
_STATUS: dict[str, VmState] = {
    "prelaunch": VmState.CREATED,
    "running": VmState.RUNNING,
    "colo": VmState.RUNNING,
    "paused": VmState.PAUSED,
    "suspended": VmState.PAUSED,
    "io-error": VmState.PAUSED,
    "watchdog": VmState.PAUSED,
    "inmigrate": VmState.PAUSED,
    "postmigrate": VmState.PAUSED,
    "finish-migrate": VmState.PAUSED,
    "save-vm": VmState.PAUSED,
    "restore-vm": VmState.PAUSED,
    "debug": VmState.BREAKPOINT,
    "shutdown": VmState.SHUTDOWN,
    "guest-panicked": VmState.SHUTDOWN,
    "internal-error": VmState.SHUTDOWN,
}

# Device ids of the definition become QEMU ids with a prefix, because QEMU
# ids must start with a letter and cloud-hypervisor's need not.
_DEVICE_PREFIX = "id-"
_DRIVE_PREFIX = "drive-"
_NETDEV_PREFIX = "netdev-"
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

_IMAGE_FORMATS = {"Raw": "raw", "Qcow2": "qcow2", "Vhdx": "vhdx", "FixedVhd": "vpc"}

#: QEMU's own seccomp filter for a jailed QEMU: obsolete system calls,
#: privilege changes (setuid...), process creation (fork, exec) and
#: resource control (affinity, scheduler) refused on top of its base list.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


# --------------------------------------------------------------------------
# VmDefinition -> argv (pure)


def _set(value: object) -> bool:
    """Whether a definition's field asks for something (not its default)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return bool(write_section(value))
    return value not in (None, False, 0, "", ())


def unsupported(definition: VmDefinition) -> list[str]:
    """Every part of ``definition`` QEMU cannot honour, one line each: what
    the guest would miss (or get wrong) if it ran without it. Fields that
    only tune cloud-hypervisor's performance or placement are not here:
    :func:`qemu_argv` leaves them out (queue counts and sizes, rate
    limiters, PCI segments, offloads, memory hints, sparse files, lock
    granularity, ``host_mac``, platform strings, the RTC)."""
    problems: list[str] = []

    def refuse(where: str, value: object) -> None:
        if _set(value):
            problems.append(f"{where}: not supported by the QEMU driver")

    d = definition
    refuse("payload.firmware", d.payload.firmware)
    refuse("cpus.topology", d.cpus.topology)
    refuse("cpus.kvm_hyperv", d.cpus.kvm_hyperv)
    for key in ("balloon", "rate_limit_groups", "iommu", "watchdog", "pvpanic"):
        refuse(key, getattr(d, key))
    for i, disk in enumerate(d.disks):
        refuse(f"disks[{i}].iommu", disk.iommu)
        refuse(f"disks[{i}].pci_device_id", disk.pci_device_id)
        if not _ID_RE.match(_disk_id(i, disk)):
            problems.append(
                f"disks[{i}].id: {disk.id!r} is not an id QEMU accepts ([A-Za-z0-9_.-]{{1,64}})"
            )
    if d.net is not None:
        refuse("net[0].iommu", d.net.tuning.iommu)
        refuse("net[0].pci_device_id", d.net.tuning.pci_device_id)
        if not d.net.tap or "," in d.net.tap or len(d.net.tap) > 15:
            problems.append(f"net[0].tap: {d.net.tap!r} is not a tap name")
    if d.rng is not None:
        for key in ("iommu", "pci_segment", "pci_device_id"):
            refuse(f"rng.{key}", getattr(d.rng, key))
    for key in ("iommu", "pci_segment", "pci_device_id"):
        refuse(f"console.{key}", getattr(d.console, key))
    return problems


def _disk_id(index: int, disk: Disk) -> str:
    return disk.id if disk.id is not None else f"_disk{index}"


def _escape(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")


def _tcg_cmdline(cmdline: str, extra: str) -> str:
    """Append ``extra``'s parameters unless the cmdline already sets them."""
    present = {word.split("=", 1)[0] for word in cmdline.split()}
    added = [word for word in extra.split() if word.split("=", 1)[0] not in present]
    return " ".join([cmdline, *added]).strip()


def qemu_argv(
    definition: VmDefinition,
    paths: VmmPaths,
    *,
    accel: Literal["tcg", "kvm"],
    binary: str = "qemu-system-x86_64",
    args: Sequence[str] = (),
    extra_cmdline_tcg: str = "tsc_early_khz=2600000",
    sandbox: bool = False,
) -> list[str]:
    """The ``qemu-system-x86_64`` command line (``binary``, then ``args``)
    that starts the VM of ``definition`` paused (``-S``) with its QMP
    monitor on ``paths.api_socket``. Device ids: a disk's ``id`` (else
    ``_disk<i>``), the NIC's ``net0``; they key :meth:`QemuDriver.counters`.
    ``sandbox``: QEMU's own seccomp filter (``SANDBOX``), for a jailed QEMU.
    Raises ``VmmRejected`` naming every part QEMU cannot honour
    (:func:`unsupported`)."""
    problems = unsupported(definition)
    if problems:
        raise VmmRejected(
            f"VM {paths.vm_dir.name}: its definition cannot run under QEMU", details=tuple(problems)
        )
    cmdline = definition.payload.cmdline or ""
    if accel == "tcg" and extra_cmdline_tcg:
        cmdline = _tcg_cmdline(cmdline, extra_cmdline_tcg)
    argv = [binary, *args, "-name", _escape(paths.vm_dir.name), "-no-user-config", "-nodefaults"]
    argv += ["-display", "none", "-S", "-accel", accel]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    return [
        *argv,
        *_machine_args(definition, cmdline),
        *_device_args(definition),
        "-chardev",
        f"socket,id=qmp,path={_escape(str(paths.api_socket))},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]


def _machine_args(d: VmDefinition, cmdline: str) -> list[str]:
    """The machine (microvm), its serial port, vCPUs, memory and payload."""
    serial = d.serial_file is not None
    # Without ACPI the guest finds neither the virtio-mmio devices nor the
    # power button (the kernel has no virtio_mmio.device= support).
    machine = "microvm,x-option-roms=off,rtc=on,acpi=on,isa-serial=" + ("on" if serial else "off")
    argv = []
    if d.serial_file is not None:
        argv += ["-chardev", f"file,id=serial0,path={_escape(d.serial_file)}"]
        argv += ["-serial", "chardev:serial0"]
    assert d.payload.kernel is not None  # no firmware (refused): a kernel
    argv += ["-M", machine, "-smp", str(d.cpus.boot_vcpus)]
    argv += ["-m", f"{math.ceil(d.memory.size / _MIB)}M", "-kernel", d.payload.kernel]
    if d.payload.initramfs is not None:
        argv += ["-initrd", d.payload.initramfs]
    return [*argv, "-append", cmdline]


def _device_args(d: VmDefinition) -> list[str]:
    """The virtio devices: console, disks, NIC, entropy source."""
    devices: list[str] = []
    if d.console.mode == "Null":
        devices += ["-chardev", "null,id=console0"]
        devices += ["-device", "virtio-serial-device,id=virtio-serial0"]
        devices += ["-device", "virtconsole,chardev=console0,id=console0"]
    for index, disk in enumerate(d.disks):
        devices += _disk_args(_disk_id(index, disk), disk)
    if d.net is not None:
        devices += _nic_args(d.net)
    if d.rng is not None:
        devices += ["-object", f"rng-random,id=rng0,filename={_escape(d.rng.src)}"]
        devices += ["-device", "virtio-rng-device,rng=rng0"]
    return devices


def _disk_args(dev_id: str, disk: Disk) -> list[str]:
    drive = [
        "if=none",
        f"id={_DRIVE_PREFIX}{dev_id}",
        f"file={_escape(disk.path)}",
        f"format={_IMAGE_FORMATS[disk.image_type or 'Raw']}",
        f"readonly={'on' if disk.readonly else 'off'}",
    ]
    if disk.direct:
        drive.append("cache.direct=on")
    device = f"virtio-blk-device,drive={_DRIVE_PREFIX}{dev_id},id={_DEVICE_PREFIX}{dev_id}"
    if disk.serial:
        device += f",serial={_escape(disk.serial)}"
    return ["-drive", ",".join(drive), "-device", device]


def _nic_args(nic: Nic) -> list[str]:
    netdev = f"{_NETDEV_PREFIX}{Nic.ID}"
    device = f"virtio-net-device,netdev={netdev},id={_DEVICE_PREFIX}{Nic.ID},mac={nic.mac}"
    if nic.tuning.mtu is not None:
        device += f",host_mtu={nic.tuning.mtu}"
    return [
        "-netdev",
        f"tap,id={netdev},ifname={nic.tap},script=no,downscript=no",
        "-device",
        device,
    ]


# --------------------------------------------------------------------------
# QMP (blocking, one session per operation)


@dataclass(frozen=True, slots=True)
class _Target:
    """Who a QMP session talks to, for error messages."""

    label: str
    socket: str

    def __str__(self) -> str:
        return f"VM {self.label} (QMP {self.socket})"


class _QmpSession:
    """One QMP session on a unix socket, every step bounded by ``deadline``
    (a ``time.monotonic()`` value). Not thread-safe: one caller at a time."""

    def __init__(self, target: _Target, deadline: float) -> None:
        self._target = target
        self._deadline = deadline
        self._buffer = b""
        self._next_id = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._handshake()
        except BaseException:
            self._sock.close()
            raise

    def _handshake(self) -> None:
        self._io("connect", lambda: self._sock.connect(self._target.socket))
        greeting = self._read_message("greeting")
        while "event" in greeting and "QMP" not in greeting:
            # QEMU flushes events it queued for the previous client to the
            # next one before its greeting (seen after a session that timed
            # out mid-move): they are about the past, and the deadline bounds
            # how many are read.
            greeting = self._read_message("greeting")
        if "QMP" not in greeting:
            raise VmmError(f"{self._target}: no QMP greeting (got {str(greeting)[:200]})")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self._sock.close()

    @property
    def deadline(self) -> float:
        return self._deadline

    def wait(self, what: str, interval: float) -> None:
        """Sleep ``interval`` before asking again; ``VmmTimeout`` at the
        deadline."""
        self._remaining(what)
        time.sleep(interval)

    def _remaining(self, what: str) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise VmmTimeout(f"{self._target}: {what} timed out")
        return left

    def _io(self, what: str, operation: Any) -> Any:
        self._sock.settimeout(self._remaining(what))
        try:
            return operation()
        except TimeoutError as exc:
            raise VmmTimeout(f"{self._target}: {what} timed out") from exc
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise VmmGone(f"{self._target}: nobody listens ({exc.strerror})") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise VmmGone(f"{self._target}: connection lost during {what}") from exc
        except OSError as exc:
            raise VmmError(f"{self._target}: {what} failed: {exc}") from exc

    def _read_message(self, what: str) -> dict[str, Any]:
        while b"\n" not in self._buffer:
            if len(self._buffer) > _MAX_LINE:
                raise VmmError(f"{self._target}: QMP message over {_MAX_LINE} bytes")
            chunk: bytes = self._io(what, lambda: self._sock.recv(65536))
            if not chunk:
                raise VmmGone(f"{self._target}: QEMU closed the connection during {what}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise VmmError(f"{self._target}: malformed QMP message during {what}") from exc
        if not isinstance(message, dict):
            raise VmmError(f"{self._target}: QMP message is not an object during {what}")
        return message

    def send(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fd: int | None = None
    ) -> int:
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        if fd is None:
            self._io(command, lambda: self._sock.sendall(data))
        else:
            # The descriptor rides on the command's bytes (SCM_RIGHTS), as
            # QMP's getfd expects; a QMP command line is short enough for
            # one sendmsg.
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sent = self._io(command, lambda: self._sock.sendmsg([data], rights))
            if sent != len(data):
                self._io(command, lambda: self._sock.sendall(data[sent:]))
        return self._next_id

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, fd: int | None = None
    ) -> Any:
        """Run one command (with ``fd`` passed along it); return its
        ``return`` value. Events seen while waiting are logged and skipped."""
        request_id = self.send(command, arguments, fd=fd)
        while True:
            message = self._read_message(command)
            if "event" in message:
                log.info(
                    "%s: QMP event %s %s", self._target, message["event"], message.get("data", {})
                )
                continue
            if message.get("id") != request_id:
                continue
            if "error" in message:
                error = message["error"] if isinstance(message["error"], dict) else {}
                raise VmmRejected(
                    f"{self._target}: QMP {command} refused: {error.get('desc', '?')}",
                    details=(f"QMP error class {error.get('class', '?')}",),
                )
            return message.get("return")


# --------------------------------------------------------------------------
# The driver


def _boot(target: _Target, session: _QmpSession) -> None:
    """Let the guest of a QEMU just started (``-S``) run, and confirm it does."""
    try:
        session.execute("cont")
        status = session.execute("query-status")
    finally:
        session.close()
    state = _STATUS.get(str(status.get("status"))) if isinstance(status, dict) else None
    if state is not VmState.RUNNING:
        raise VmmError(f"{target}: QEMU reports {status!r} after cont")


# The name a snapshot's file descriptor is known by in QEMU (getfd), and
# the one file of a QEMU snapshot's state directory.
_STATE_FD = "procurator-state"
STATE_FILE = "memory"
# How often a migration to or from a file is polled.
_MIGRATION_POLL = 0.02
# How often a live move is polled once the guest may be paused (its memory
# going, the switchover, the target's side): each poll's delay is downtime.
_SWITCHOVER_POLL = 0.005


def _wait_migration(
    target: _Target, session: _QmpSession, what: str, interval: float = _MIGRATION_POLL
) -> None:
    """Poll ``query-migrate`` until the migration of this session's QEMU
    completed; ``VmmError`` with QEMU's reason when it failed."""
    while True:
        info = session.execute("query-migrate")
        status = info.get("status") if isinstance(info, dict) else None
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            reason = info.get("error-desc", "no reason given") if isinstance(info, dict) else "?"
            raise VmmError(f"{target}: {what} {status}: {reason}")
        session.wait(what, interval)


def _save(target: _Target, session: _QmpSession, state_file: Path) -> None:
    """Migrate the (paused) VM's state into ``state_file``, through a
    descriptor this process opens and hands QEMU: a jailed QEMU writes a
    file it could never open itself, and no shell (``exec:``) is needed."""
    fd = os.open(state_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        session.execute("getfd", {"fdname": _STATE_FD}, fd=fd)
    finally:
        os.close(fd)  # QEMU holds its own copy now
    try:
        # A paused guest's pages do not change: no reason to throttle.
        session.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        session.execute("migrate", {"uri": f"fd:{_STATE_FD}"})
    except VmmRejected:
        with contextlib.suppress(VmmError, VmmRejected):
            session.execute("closefd", {"fdname": _STATE_FD})
        raise
    _wait_migration(target, session, "saving the VM's state")


def _load_and_boot(target: _Target, session: _QmpSession, state_file: Path) -> None:
    """Load the state of a QEMU started with ``-incoming defer`` from
    ``state_file`` (a descriptor handed over, as in ``_save``), then let
    the guest run and confirm it does. QEMU exits when the state cannot
    be loaded (the caller sees it gone, with its log)."""
    try:
        fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        session.close()
        raise VmmRejected(f"{target}: cannot read the saved state {state_file}: {exc}") from exc
    try:
        try:
            session.execute("getfd", {"fdname": _STATE_FD}, fd=fd)
        finally:
            os.close(fd)
        session.execute("migrate-incoming", {"uri": f"fd:{_STATE_FD}"})
        _wait_migration(target, session, "loading the VM's state")
    except BaseException:
        session.close()
        raise
    _boot(target, session)


# -- live moves
#
# The descriptors' names in QEMU (getfd): the memory connection (the
# target's, the source's); each mirrored disk's NBD client node, its
# connection and its mirror job share one name.
_MIGRATION_FD = "procurator-migration"
_NBD_FD = "procurator-nbd"
_MIRROR_PREFIX = "procurator-mirror-"
# Undoing a failed move gets its own time: the move's may be spent.
_UNDO_TIMEOUT = 30.0
# The migration capabilities a move sets on the source (and return-path on
# the target), reset on the source by a failed move's undo.
_MOVE_CAPABILITIES = ("return-path", "pause-before-switchover")
# query-migrate states of an outgoing migration under way.
_MIGRATING = ("setup", "active", "pre-switchover", "device", "cancelling", "postcopy-active")


@dataclass(frozen=True, slots=True)
class _Incoming:
    """A target's launch: its memory listener (this process's, never
    QEMU's), with ``disks`` the relay to its NBD socket and the device ids
    of the disks it exports."""

    memory: socket.socket
    nbd: Relay | None
    nbd_socket: Path
    exports: tuple[str, ...]


#: The NBD server's unix socket in the target QEMU's run directory.
_NBD_SOCKET = "nbd.sock"
_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included
#: What the hand-over of the memory connection (two QMP commands) may take.
_HAND_OVER_TIMEOUT = 30.0


def _listen(label: str, address: Address, what: str) -> socket.socket:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise VmmError(
            f"VM {label}: cannot listen on {host}:{port} for the move's {what}: "
            f"{exc.strerror or exc}"
        ) from exc


def _connect(target: _Target, address: Address, what: str, deadline: float) -> socket.socket:
    host, port = address
    try:
        connection = socket.create_connection(
            (host, port), timeout=max(0.001, deadline - time.monotonic())
        )
    except TimeoutError as exc:  # no answer (dropped, not refused) until the deadline
        raise VmmTimeout(
            f"{target}: the move's target at {host}:{port} did not answer for the {what}"
        ) from exc
    except OSError as exc:
        raise VmmError(
            f"{target}: cannot reach the move's target at {host}:{port} for the {what}: "
            f"{exc.strerror or exc}"
        ) from exc
    connection.settimeout(None)  # QEMU's to drive from here: blocking, as made
    return connection


def _set_capabilities(session: _QmpSession, states: Mapping[str, bool]) -> None:
    capabilities = [{"capability": name, "state": state} for name, state in states.items()]
    session.execute("migrate-set-capabilities", {"capabilities": capabilities})


def _await_incoming(session: _QmpSession, incoming: _Incoming) -> None:
    """Make a target QEMU (``-incoming defer``) ready for the move: the
    NBD server of its writable disks on its unix socket, the relay to it
    started, the return path on. The memory connection comes later
    (``_IncomingMove``)."""
    try:
        if incoming.nbd is not None:
            with contextlib.suppress(FileNotFoundError):
                incoming.nbd_socket.unlink()  # a failed launch's: no QEMU listens there
            # SocketAddressLegacy (QEMU 7.2's nbd-server-start): in "data".
            server = {"type": "unix", "data": {"path": str(incoming.nbd_socket)}}
            clients = max(1, len(incoming.exports))
            session.execute("nbd-server-start", {"addr": server, "max-connections": clients})
            for dev_id in incoming.exports:
                export = {"device": _DRIVE_PREFIX + dev_id, "name": dev_id, "writable": True}
                session.execute("nbd-server-add", export)
            incoming.nbd.start(incoming.nbd_socket)
        _set_capabilities(session, {"return-path": True})  # as the source does
    finally:
        session.close()


class _IncomingMove:
    """A target's move from ``launch_incoming`` to ``finish_incoming``: a
    thread accepts on the memory listener through a ``stream_auth.Gate``,
    closes the listener once a peer presented the token (nobody else is
    taken), and hands that connection to QEMU (``getfd``,
    ``migrate-incoming fd:``) in a QMP session of its own; and the NBD
    relay, if any. ``error`` says why the hand-over failed."""

    def __init__(
        self,
        driver: QemuDriver,
        handle: VmmHandle,
        listener: socket.socket,
        token: bytes,
        nbd: Relay | None,
    ) -> None:
        self._driver = driver
        self._handle = handle
        self._listener = listener
        self._gate = Gate(listener, token, what=f"{driver._target(handle)}: the move's memory")
        self.nbd = nbd
        self.handed_over = False
        self.error: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"incoming move {handle.pid}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    @property
    def dropped(self) -> int:
        """Peers dropped for want of the token, on both streams."""
        return self._gate.dropped + (self.nbd.dropped if self.nbd is not None else 0)

    def _run(self) -> None:
        target = self._driver._target(self._handle)
        try:
            connection = self._gate.accept()
        except OSError as exc:  # the listener failed for good (AcceptFailed)
            # finish_incoming tells this, not "no peer presented the token".
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            self.error = f"cannot accept on the memory port: {reason}"
            log.warning("%s: %s", target, self.error)
            return
        finally:
            self._gate.close()
            self._listener.close()
        if connection is None:
            return  # closed before the source came
        try:
            deadline = time.monotonic() + _HAND_OVER_TIMEOUT
            with self._driver._session(self._handle, deadline) as session:
                session.execute("getfd", {"fdname": _MIGRATION_FD}, fd=connection.fileno())
                session.execute("migrate-incoming", {"uri": f"fd:{_MIGRATION_FD}"})
            self.handed_over = True
        except (VmmError, VmmRejected) as exc:
            self.error = exc.message
            log.warning("%s: cannot hand the move's memory stream over: %s", target, exc)
        finally:
            connection.close()  # QEMU holds its own copy

    def stop_accepting(self) -> None:
        """Stop accepting on the memory port and wait for the thread (its
        hand-over, if under way, is bounded by ``_HAND_OVER_TIMEOUT``).
        Idempotent."""
        self._gate.interrupt()
        if self._thread.ident is None:  # never started
            self._gate.close()
            self._listener.close()
        elif self._thread is not threading.current_thread():
            self._thread.join()

    def close(self) -> None:
        """``stop_accepting``, and stop the NBD relay. Idempotent."""
        self.stop_accepting()
        if self.nbd is not None:
            self.nbd.close()


class _Outgoing:
    """The source's side of one live move over one QMP session, and what it
    has set up so far (so that ``undo`` removes exactly that)."""

    def __init__(
        self,
        target: _Target,
        session: _QmpSession,
        token: bytes,
        progress: MigrationProgress | None,
        cancel: threading.Event | None = None,
    ) -> None:
        self._target = target
        self._session = session
        self._token = token
        self._progress = progress
        self._cancel = cancel
        self._fds: list[str] = []  # descriptor names given (getfd)
        self._connections: list[socket.socket] = []  # our copies of what QEMU was given
        self._mirrors: list[str] = []  # disk ids with a node (and perhaps a job)
        self._jobs: list[str] = []  # mirror job ids started
        self._disk_bytes = 0  # the mirrored disks' bytes, once in sync
        self._total = 0  # the whole transfer's bytes as last reported

    def run(self, memory: Address, disks: Address | None) -> None:
        if self.to_switchover(memory, disks):
            self.switch_over()

    def to_switchover(self, memory: Address, disks: Address | None) -> bool:
        """The move up to the switchover: True when QEMU waits there (the
        guest stopped, its memory sent, the mirrors in sync), False when
        the migration completed (no mirrors: nothing to wait for)."""
        session = self._session
        if disks is not None:
            for dev_id in self._writable_disks():
                self._mirror(dev_id, disks)
            self._wait_mirrors_ready()
        # The target says whether it loaded the state (the return path):
        # without it, "completed" means sent, and a source would stop for
        # good after sending a state the target then failed to load. With
        # mirrors, QEMU also waits with the guest stopped before the device
        # state, until the disks are in sync (pause-before-switchover).
        capabilities = {"return-path": True, "pause-before-switchover": bool(self._mirrors)}
        _set_capabilities(session, capabilities)
        # The default bandwidth (32 MiB/s) is for sharing a link with the
        # guests; a move wants its pause short.
        session.execute("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        self._hand_over(_MIGRATION_FD, memory, "memory")
        session.execute("migrate", {"uri": f"fd:{_MIGRATION_FD}"})
        if not self._mirrors:
            self._follow_migration("completed")
            self._report(self._total, self._total)
            return False
        # The guest is stopped and its memory sent; the device state waits
        # until the disks' last writes are on the target.
        self._follow_migration("pre-switchover")
        return True

    def switch_over(self) -> None:
        """From the switchover: the mirrors completed in sync and removed,
        then the device state sent (``migrate-continue``). A cancel is
        heard up to here (the guest is stopped, its device state not sent:
        the undo resumes it), not after."""
        self._check_cancel()
        session = self._session
        jobs = self._our_jobs()
        for job_id in self._jobs:
            if jobs.get(job_id, {}).get("status") != "ready":
                raise self._job_failed(job_id, jobs.get(job_id))
        for job in self._jobs:
            session.execute("block-job-cancel", {"device": job})  # ready: completes in sync
        self._wait_jobs_concluded(failed_is_error=True)
        self._remove_mirrors()
        session.execute("migrate-continue", {"state": "pre-switchover"})
        _wait_migration(self._target, session, "migrating the VM", _SWITCHOVER_POLL)
        self._report(self._total, self._total)

    def _writable_disks(self) -> list[str]:
        """The device ids of the source QEMU's writable drives."""
        found = []
        for entry in self._session.execute("query-block") or []:
            device = str(entry.get("device", ""))
            inserted = entry.get("inserted")
            writable = isinstance(inserted, dict) and not inserted.get("ro", False)
            if device.startswith(_DRIVE_PREFIX) and writable:
                found.append(device.removeprefix(_DRIVE_PREFIX))
        return found

    def _mirror(self, dev_id: str, disks: Address) -> None:
        """An NBD client node for the target's export of ``dev_id`` (on a
        connection of its own) and a mirror job of the drive into it."""
        session = self._session
        name = _MIRROR_PREFIX + dev_id
        self._hand_over(name, disks, f"disk {dev_id}")
        server = {"type": "fd", "str": name}
        node = {"driver": "nbd", "node-name": name, "server": server, "export": dev_id}
        session.execute("blockdev-add", node)
        self._mirrors.append(dev_id)
        mirror = {
            "job-id": name,
            "device": _DRIVE_PREFIX + dev_id,
            "target": name,
            "sync": "full",
            "auto-dismiss": False,  # a failed job stays to be asked why
        }
        session.execute("blockdev-mirror", mirror)
        self._jobs.append(name)

    def _hand_over(self, name: str, address: Address, what: str) -> None:
        """Connect to ``address``, present the move's token, and give QEMU
        the connection as ``name`` once the target accepted it; this
        process keeps its own copy until the move ends (``close``)."""
        connection = _connect(self._target, address, what, self._session.deadline)
        self._connections.append(connection)
        try:
            present(connection, self._token, deadline=self._session.deadline)
        except StreamRefused as exc:
            host, port = address
            raise VmmError(
                f"{self._target}: the move's target at {host}:{port} for the {what}: {exc}"
            ) from exc
        self._session.execute("getfd", {"fdname": name}, fd=connection.fileno())
        self._fds.append(name)

    def close(self) -> None:
        """Drop this process's copies of the connections (QEMU's stay)."""
        for connection in self._connections:
            connection.close()
        self._connections.clear()

    def _our_jobs(self) -> dict[str, dict[str, Any]]:
        jobs = self._session.execute("query-jobs") or []
        return {j["id"]: j for j in jobs if isinstance(j, dict) and j.get("id") in self._jobs}

    def _job_failed(self, job_id: str, job: Mapping[str, Any] | None) -> VmmError:
        why = job.get("error", f"it ended ({job.get('status')})") if job else "it vanished"
        return VmmError(f"{self._target}: mirroring disk {job_id[len(_MIRROR_PREFIX) :]}: {why}")

    def _wait_mirrors_ready(self) -> None:
        while True:
            jobs = self._our_jobs()
            done = total = 0
            for job_id in self._jobs:
                job = jobs.get(job_id)
                if job is None or job.get("status") not in ("created", "running", "ready"):
                    raise self._job_failed(job_id, job)
                done += int(job.get("current-progress", 0))
                total += int(job.get("total-progress", 0))
            self._report(done, total)
            if all(jobs[j].get("status") == "ready" for j in self._jobs):
                self._disk_bytes = total
                return
            self._check_cancel()
            self._session.wait("mirroring the disks", _MIGRATION_POLL)

    def _wait_jobs_concluded(self, *, failed_is_error: bool) -> None:
        """Wait until every job of ours has concluded, then dismiss them."""
        while True:
            jobs = self._our_jobs()
            if all(job.get("status") in ("concluded", "null") for job in jobs.values()):
                break
            self._session.wait("completing the disk mirrors", _SWITCHOVER_POLL)
        for job_id, job in jobs.items():
            if failed_is_error and "error" in job:
                raise self._job_failed(job_id, job)
            with contextlib.suppress(VmmRejected):
                self._session.execute("job-dismiss", {"id": job_id})
        self._jobs.clear()

    def _remove_mirrors(self) -> None:
        for dev_id in list(self._mirrors):
            with contextlib.suppress(VmmRejected):
                self._session.execute("blockdev-del", {"node-name": _MIRROR_PREFIX + dev_id})
            self._mirrors.remove(dev_id)

    def _follow_migration(self, until: str) -> None:
        """Poll ``query-migrate`` until its status is ``until``, reporting
        progress; ``VmmError`` with QEMU's reason if it fails."""
        while True:
            info = self._session.execute("query-migrate")
            info = info if isinstance(info, dict) else {}
            status = info.get("status")
            ram = info.get("ram")
            ram = ram if isinstance(ram, dict) else {}
            memory = int(ram.get("total", 0))
            self._total = self._disk_bytes + memory
            self._report(self._total - int(ram.get("remaining", memory)), self._total)
            if status == until:
                return
            if status not in _MIGRATING:
                reason = info.get("error-desc", "no reason given")
                raise VmmError(f"{self._target}: migrating the VM {status}: {reason}")
            self._check_cancel()
            self._session.wait("migrating the VM", _SWITCHOVER_POLL)

    def _report(self, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(done, total)

    def _check_cancel(self) -> None:
        """``VmmError`` once the caller cancelled the move (a failure:
        the caller undoes it)."""
        if self._cancel is not None and self._cancel.is_set():
            raise VmmError(f"{self._target}: the move was cancelled")

    def undo(self) -> str | None:
        """After a failure: the source as it was before the move, its guest
        running. None when done, else what went wrong (also logged; a
        QEMU that is gone cannot be undone: its guest does not run)."""
        # First cut the streams: QEMU's requests stuck on a link that drops
        # packets (no reset comes) fail at once instead of holding the
        # cancellation of their jobs for as long as TCP retries.
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        try:
            self._session = _QmpSession(self._target, time.monotonic() + _UNDO_TIMEOUT)
        except (VmmError, VmmRejected) as exc:
            log.warning("%s: cannot undo the failed move: %s", self._target, exc)
            return exc.message
        session = self._session
        try:
            info = session.execute("query-migrate")
            if isinstance(info, dict) and info.get("status") in _MIGRATING:
                session.execute("migrate_cancel")
                while (session.execute("query-migrate") or {}).get("status") in _MIGRATING:
                    session.wait("cancelling the migration", _MIGRATION_POLL)
            for job in self._jobs:
                with contextlib.suppress(VmmRejected):  # concluded already
                    session.execute("block-job-cancel", {"device": job, "force": True})
            self._wait_jobs_concluded(failed_is_error=False)
            self._remove_mirrors()
            for name in self._fds:
                with contextlib.suppress(VmmRejected):  # taken by its user, or never given
                    session.execute("closefd", {"fdname": name})
            # Reset: a later snapshot migrates to a file (no return path,
            # nobody to continue after the pause).
            _set_capabilities(session, dict.fromkeys(_MOVE_CAPABILITIES, False))
            status = session.execute("query-status")
            if not (isinstance(status, dict) and status.get("running")):
                session.execute("cont")
        except (VmmError, VmmRejected) as exc:
            log.warning("%s: cannot undo the failed move: %s", self._target, exc)
            return exc.message
        finally:
            session.close()
        log.info("%s: the failed move is undone; the guest runs here", self._target)
        return None


def _abandon(target: _Target, session: _QmpSession) -> bool:
    """Undo, from what QEMU reports alone, a live move a worker that
    stopped left in it (``QemuDriver.abandon_migration``); True when there
    was one. A move's migration is told from a snapshot's by its
    ``return-path`` capability (a move sets it, a snapshot never does, the
    undo resets it)."""
    info = session.execute("query-migrate")
    status = info.get("status") if isinstance(info, dict) else None
    capabilities = session.execute("query-migrate-capabilities") or []
    moving = any(
        isinstance(c, dict) and c.get("capability") == "return-path" and c.get("state")
        for c in capabilities
    )
    jobs = [
        job
        for job in session.execute("query-jobs") or []
        if isinstance(job, dict) and str(job.get("id", "")).startswith(_MIRROR_PREFIX)
    ]
    nodes = [
        str(node.get("node-name"))
        for node in session.execute("query-named-block-nodes") or []
        if isinstance(node, dict) and str(node.get("node-name", "")).startswith(_MIRROR_PREFIX)
    ]
    if not (moving and status not in (None, "none")) and not jobs and not nodes:
        return False
    log.warning("%s: undoing the live move a stopped worker left (migration %s)", target, status)
    if status in _MIGRATING:
        # From pre-switchover too: QEMU lets its paused migration go on
        # only to cancel it.
        session.execute("migrate_cancel")
        while (session.execute("query-migrate") or {}).get("status") in _MIGRATING:
            session.wait("cancelling the migration", _MIGRATION_POLL)
    for job in jobs:
        if job.get("status") not in ("concluded", "null"):
            with contextlib.suppress(VmmRejected):  # concluded meanwhile
                session.execute("block-job-cancel", {"device": job["id"], "force": True})
    names = {str(job["id"]) for job in jobs}
    while True:
        left = [
            job
            for job in session.execute("query-jobs") or []
            if isinstance(job, dict) and job.get("id") in names
        ]
        if all(job.get("status") in ("concluded", "null") for job in left):
            break
        session.wait("cancelling the disk mirrors", _MIGRATION_POLL)
    for job in left:
        with contextlib.suppress(VmmRejected):
            session.execute("job-dismiss", {"id": job["id"]})
    for node in nodes:
        with contextlib.suppress(VmmRejected):
            session.execute("blockdev-del", {"node-name": node})
    for name in (_MIGRATION_FD, *names, *nodes):
        with contextlib.suppress(VmmRejected):  # taken by its user, or never given
            session.execute("closefd", {"fdname": name})
    _set_capabilities(session, dict.fromkeys(_MOVE_CAPABILITIES, False))
    run = session.execute("query-status")
    if moving and isinstance(run, dict) and not run.get("running"):
        # Paused by the migration (finish-migrate, postmigrate, or paused
        # at the switchover, when a cancel leaves it so): ``cont`` takes
        # the disks back too (QEMU let go of them for the target).
        session.execute("cont")
    return True


def _firmware_dirs(exe: str) -> list[str]:
    """QEMU's firmware search path (``-L help``), the directories that exist."""
    try:
        result = subprocess.run(
            [exe, "-L", "help"], capture_output=True, text=True, timeout=30.0, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmmError(f"cannot ask {exe} for its firmware directories: {exc}") from exc
    dirs = [os.path.realpath(line.strip()) for line in result.stdout.splitlines() if line.strip()]
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _accel_modules(exe: str) -> list[str]:
    """QEMU's accelerator modules (``accel-*.so``) where distributions put
    its module directory next to the program (``<prefix>/lib/<triplet>/qemu``,
    ``<prefix>/lib/qemu``, ``<prefix>/lib64/qemu``). Other modules (display,
    audio, block protocols) are not needed by the VMs the driver starts."""
    prefix = Path(os.path.realpath(exe)).parent.parent
    found: list[str] = []
    candidates = (*prefix.glob("lib/*-linux-*/qemu"), prefix / "lib/qemu", prefix / "lib64/qemu")
    for directory in candidates:
        if directory.is_dir():
            found += sorted(str(p) for p in directory.glob("accel-*.so"))
    return found


def _split_option(value: str) -> dict[str, str]:
    """Parse a QEMU ``key=value,...`` option (``,,`` is a literal comma)."""
    parts = re.split(r"(?<!,),(?!,)", value.replace(",,", "\x00"))
    fields: dict[str, str] = {}
    for part in parts:
        key, _, val = part.partition("=")
        fields[key] = val.replace("\x00", ",")
    return fields


class QemuDriver:
    """The ``VmmDriver`` for QEMU. Thread-safe; one instance serves all VMs.

    ``binary`` is the executable (a path or a name on PATH, never split; it
    may be a wrapper that ``exec``s QEMU), ``args`` come right after it.

    ``accel``: ``"tcg"`` (software; the only one that boots stock guests on
    hosts with a paravirtual KVM), ``"kvm"``, or ``"auto"`` (KVM when
    ``kvm_device`` opens read-write and runs stock guests, else TCG:
    ``procurator.worker.vmm.kvm``; the choice and why is logged once, and
    again if it changes). Under TCG,
    ``extra_cmdline_tcg`` is appended to the guest's cmdline (parameters the
    cmdline already sets are kept as they are). ``runtime_paths``: what a
    jailed QEMU needs to see beyond what ``runtime_files`` finds (what a
    wrapper script runs)."""

    name = DRIVER_NAME
    capabilities = Capabilities(state_marks=False, guest_clock=False, live_move=True)

    def __init__(
        self,
        *,
        accel: Accel = "auto",
        binary: str = "qemu-system-x86_64",
        args: Sequence[str] = (),
        extra_cmdline_tcg: str = "tsc_early_khz=2600000",
        kvm_device: Path = Path("/dev/kvm"),
        runtime_paths: Sequence[str] = (),
    ) -> None:
        if accel not in ("tcg", "kvm", "auto"):
            raise ValueError(f"accel must be tcg, kvm or auto, not {accel!r}")
        self._accel: Accel = accel
        self._binary = binary
        self._args = tuple(args)
        self._extra_cmdline_tcg = extra_cmdline_tcg
        self._kvm_device = kvm_device
        self._auto_said = ""  # why auto chose what it chose, as last logged
        self._runtime_paths = tuple(runtime_paths)
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}
        # Moves being received, by VMM (launch_incoming to finish_incoming).
        self._incoming: dict[tuple[int, int], _IncomingMove] = {}
        # runtime_files(), found once; the lock is held while it is found
        # (subprocesses: ldd, qemu -L help) and taken under no other.
        self._runtime_lock = threading.Lock()
        self._runtime: tuple[str, ...] | None = None

    def _executable(self) -> str:
        """The binary as an absolute path (a name is looked up on PATH)."""
        found = self._binary if os.sep in self._binary else shutil.which(self._binary)
        if found is None or not os.access(found, os.X_OK):
            raise VmmError(f"cannot start {self._binary!r}: not found or not executable")
        return os.path.abspath(found)

    def runtime_files(self) -> tuple[str, ...]:
        """What QEMU needs to run in a jail: its program and libraries
        (``vmm.closure``), its firmware directories (``-L help``: microvm
        boots through ``qboot.rom``) and its accelerator modules (Debian
        builds TCG as a module, ``accel-tcg-x86_64.so``) with their
        libraries. Found once per driver (by the first launch; the others
        wait for it)."""
        with self._runtime_lock:
            if self._runtime is None:
                exe = self._executable()
                extra = set(_firmware_dirs(exe)) | set(self._runtime_paths)
                modules = _accel_modules(exe)
                extra.update(modules)
                extra.update(closure.elf_libraries(modules))
                self._runtime = closure.runtime_files(exe, self._args, extra=extra)
            return self._runtime

    @property
    def accel(self) -> Literal["tcg", "kvm"]:
        """The accelerator new VMs get (``auto`` resolved now)."""
        if self._accel == "auto":
            verdict = kvm_verdict(self._kvm_device)
            # Said when it changes (two launches at once may both say it).
            if verdict.reason != self._auto_said:
                self._auto_said = verdict.reason
                log.info("QEMU acceleration auto: %s", verdict.reason)
            return "kvm" if verdict.usable else "tcg"
        return self._accel

    # -- lifecycle --------------------------------------------------------

    def check(self, definition: VmDefinition) -> None:
        problems = unsupported(definition)
        if problems:
            raise VmmRejected("the VM's definition cannot run under QEMU", details=tuple(problems))

    def launch(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """Start QEMU with the VM of ``definition`` in its own session, wait
        for QMP, boot the guest (``cont``) and confirm it runs. Jailed (with
        ``jail``), QEMU starts unprivileged (no ``-runas``: it never holds
        root to drop) with its own seccomp filter (``SANDBOX``). Raises
        ``VmmRejected`` (a definition QEMU cannot run), ``VmmTimeout`` /
        ``VmmError``; never leaves a process behind then."""
        return self._start(definition, paths, timeout=timeout, jail=jail, state=None)

    def restore(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        source: Path,
        *,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """Start QEMU as ``launch`` does but waiting for its state
        (``-incoming defer``), load it from ``source`` (``save_state``'s
        file, read by this process and handed over as a descriptor), then
        let the guest run (``cont``). Raises as ``launch``; a state QEMU
        cannot load makes it exit (``VmmGone`` with its log)."""
        return self._start(definition, paths, timeout=timeout, jail=jail, state=source / STATE_FILE)

    def save_state(self, handle: VmmHandle, target: Path, *, timeout: float) -> None:
        """Migrate the paused VM into ``target/memory`` (``migrate`` to a
        descriptor this process opened: the jail is not widened, no shell
        runs); returns when QEMU says the migration completed. QEMU's VM is
        then ``postmigrate`` (paused, disks flushed and released until the
        next ``cont``)."""
        with self._session(handle, time.monotonic() + timeout) as session:
            _save(self._target(handle), session, target / STATE_FILE)

    # -- live moves (docs/SNAPSHOTS.md, "Moves") ----------------------------

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
        """Start QEMU as ``launch`` does but waiting for its state
        (``-incoming defer``). This process listens on ``memory`` (and
        ``disks``); QEMU never binds a port itself. A thread of this
        driver accepts on ``memory``, and hands QEMU the first connection
        that presented ``token`` (``migrate-incoming fd:``); with
        ``disks``, QEMU serves the VM's writable disks over NBD on a unix
        socket in its run directory (``nbd-server-start``, one writable
        export per disk, named by its device id, at most that many
        clients), which this worker's relay connects authenticated peers
        to, as many as there are exports. A peer without the token is
        dropped and logged (``stream_auth``). Raises as ``launch`` (a port
        that cannot be listened on: ``VmmError`` before QEMU starts)."""
        check_token(token)
        exports: tuple[str, ...] = ()
        if disks is not None:
            exports = tuple(
                _disk_id(index, disk)
                for index, disk in enumerate(definition.disks)
                if not disk.readonly
            )
        label = paths.vm_dir.name
        nbd_socket = paths.vmm_dir / _NBD_SOCKET
        if len(os.fsencode(nbd_socket)) > _MAX_SOCKET_PATH:
            raise VmmRejected(
                f"VM {label}: the NBD socket path {nbd_socket} is too long for a unix socket"
            )
        memory_socket = _listen(label, memory, "memory")
        nbd: Relay | None = None
        try:
            if disks is not None:
                nbd = Relay.serving(
                    _listen(label, disks, "disks"),
                    token,
                    peers=len(exports),
                    hang_up=False,
                    what=f"VM {label}: the move's disks",
                )
            incoming = _Incoming(memory_socket, nbd, nbd_socket, exports)
            handle = self._start(
                definition, paths, timeout=timeout, jail=jail, state=None, incoming=incoming
            )
            try:
                move = _IncomingMove(self, handle, memory_socket, token, nbd)
            except BaseException:
                # Nobody would ever hand the QEMU just started its state,
                # nor stop it: stopped as a launch that failed is.
                process.abort_launch(handle)
                raise
        except BaseException:
            memory_socket.close()
            if nbd is not None:
                nbd.close()
            raise
        with self._guard:
            self._incoming[(handle.pid, handle.pid_start_ticks)] = move
        move.start()
        return handle

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
        """Mirror, then migrate, over connections this process opens and
        hands QEMU (``getfd``): with ``disks``, each writable drive gets an
        NBD client node on its own connection and a ``blockdev-mirror`` job
        into it (``sync: full``); once every job is ``ready`` (in sync,
        following the guest's writes), ``migrate`` to ``fd:`` with
        ``pause-before-switchover``: when QEMU has stopped the guest and
        sent its memory it waits, the mirror jobs are completed in sync
        (``block-job-cancel`` of a ready job) and removed, and only then
        does the device state go (``migrate-continue``). One QMP session
        for the whole move. On any failure the move is undone in a new
        session (``_undo_move``): migration cancelled, mirror jobs and
        nodes removed, the capability reset, ``cont``. ``cancel`` is
        looked at on every poll until the switchover (mirroring, migrating,
        waiting there): set, it is a failure, undone; once the device
        state goes (``migrate-continue``) the move completes."""
        check_token(token)
        deadline = time.monotonic() + timeout
        target = self._target(handle)
        if cancel is not None and cancel.is_set():
            raise VmmError(f"{target}: the move was cancelled before its migration began")
        with self._session(handle, deadline) as session:
            move = _Outgoing(target, session, token, progress, cancel)
            try:
                move.run(memory, disks)
            except (VmmError, VmmRejected) as exc:
                session.close()  # QMP serves one client: the undo's is next
                problem = move.undo()
                said = "undone" if problem is None else f"not undone: {problem}"
                if isinstance(exc, VmmTimeout):
                    raise VmmTimeout(
                        f"{target}: the move did not end within {timeout:g} s "
                        f"({exc.message}); {said}",
                        details=exc.details,
                    ) from exc
                if problem is not None:
                    raise VmmError(f"{exc.message}; {said}", details=exc.details) from exc
                raise
            except BaseException:
                session.close()
                move.undo()
                raise
            finally:
                move.close()

    def incoming_received(self, handle: VmmHandle) -> bool:
        """Never: QEMU's target runs the guest only at ``finish_incoming``
        (``VmmDriver.incoming_received``)."""
        return False

    def finish_incoming(self, handle: VmmHandle, *, timeout: float) -> None:
        """Wait for ``migrate-incoming`` to complete, stop the NBD server
        (none for a move without disks) and its relay, then ``cont`` and
        confirm the guest runs. An incoming migration that fails makes
        QEMU exit: then ``VmmGone``; one whose source never presented the
        token on the memory port (or whose hand-over failed) is a
        ``VmmError`` saying so. A QEMU this driver did not launch (a
        restarted worker) is only waited for."""
        target = self._target(handle)
        deadline = time.monotonic() + timeout
        move = self._drop_incoming(handle)
        if move is not None:
            move.stop_accepting()
        try:
            if move is not None and not move.handed_over:
                raise VmmError(
                    f"{target}: no move's memory stream came "
                    f"({move.error or 'no peer presented the token'}; "
                    f"{move.dropped} peers without it dropped)"
                )
            with self._session(handle, deadline) as session:
                _wait_migration(target, session, "receiving the VM", _SWITCHOVER_POLL)
                with contextlib.suppress(VmmRejected):  # no NBD server: no disks came
                    session.execute("nbd-server-stop")
                if move is not None:
                    move.close()  # the NBD relay: its peers are gone
                _boot(target, session)
        finally:
            if move is not None:
                move.close()

    def abandon_migration(self, handle: VmmHandle, *, timeout: float) -> None:
        """What ``send_migration``'s undo does, for a QEMU whose worker
        stopped in the call: asked of QEMU alone (``query-migrate``; the
        move's connections died with that worker, QEMU's own copies go
        with the cancel and the mirror nodes): a migration under way,
        paused at the switchover (``pre-switchover``, waiting for a
        ``migrate-continue`` nobody sends) included, is cancelled and
        waited for; the mirror jobs (``procurator-mirror-*``) are
        cancelled and dismissed, their NBD nodes removed; the move's
        capabilities reset; and a guest the migration stopped, even one
        whose migration completed (``postmigrate``, the worker stopped
        before it wrote "sent"), gets ``cont``, which also takes its disks
        back. The target's QEMU started ``-S`` (``qemu_argv``) and runs its
        guest only at ``finish_incoming``'s ``cont``; why that never comes
        for this migration: ``VmmDriver.abandon_migration``."""
        target = self._target(handle)
        with self._session(handle, time.monotonic() + timeout) as session:
            if _abandon(target, session):
                log.info("%s: the move its worker stopped in is undone; the guest runs", target)

    def _start(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        timeout: float,
        jail: VmmJail | None,
        state: Path | None,
        incoming: _Incoming | None = None,
    ) -> VmmHandle:
        """``launch`` (``state`` and ``incoming`` None), ``restore`` (the
        state file) or ``launch_incoming`` (its listening sockets)."""
        deadline = time.monotonic() + timeout
        accel = self.accel
        argv = qemu_argv(
            definition,
            paths,
            accel=accel,
            binary=self._binary if jail is None else self._executable(),
            args=self._args,
            extra_cmdline_tcg=self._extra_cmdline_tcg,
            sandbox=jail is not None,
        )
        if state is not None or incoming is not None:
            argv += ["-incoming", "defer"]
        paths.vmm_dir.mkdir(parents=True, exist_ok=True)
        logs = [(paths.log_file, process.log_size(paths.log_file))]
        if jail is None:
            pid, ticks = process.launch_detached(
                argv, vm_dir=paths.vm_dir, log_path=paths.log_file, cwd=paths.vmm_dir
            )
        else:
            pid, ticks = jail.spawn(
                argv,
                log_path=paths.log_file,
                env=None,
                cwd=paths.vmm_dir,
                runtime=self.runtime_files(),
                devices=("/dev/kvm",) if accel == "kvm" else (),
                timeout=max(1.0, deadline - time.monotonic()),
            )
        handle = VmmHandle(DRIVER_NAME, pid, ticks, str(paths.api_socket))
        log.info("VM %s: started qemu pid %d (%s)", paths.vm_dir.name, pid, accel)
        target = self._target(handle)
        try:
            session = process.wait_for_api(
                handle,
                lambda _seconds: _QmpSession(target, deadline),
                deadline=deadline,
                who=f"qemu for {paths.vm_dir}",
                logs=logs,
            )
            if incoming is not None:
                _await_incoming(session, incoming)
            elif state is None:
                _boot(target, session)
            else:
                _load_and_boot(target, session, state)
        except BaseException:
            self.forget(handle)
            process.abort_launch(handle)
            self._clear_socket(paths)
            raise
        return handle

    def adopt(self, paths: VmmPaths, recorded: VmmHandle) -> VmmHandle | None:
        return recorded if process.is_alive(recorded.pid, recorded.pid_start_ticks) else None

    def classify_exit(self, paths: VmmPaths, handle: VmmHandle) -> VmExit:
        """QEMU removes its QMP socket when it exits cleanly (the guest
        powered off, ``quit``, SIGTERM); a crash or SIGKILL leaves it."""
        self.forget(handle)
        move = self._drop_incoming(handle)
        if move is not None:
            move.close()
        return VmExit.CRASHED if os.path.lexists(handle.api_socket) else VmExit.POWERED_OFF

    def clear_leftovers(self, paths: VmmPaths, *, unrecorded: bool, grace: float) -> None:
        if unrecorded:
            process.kill_unrecorded(paths.vm_dir, grace=grace)
        process.remove_stale_socket(paths.api_socket)

    @staticmethod
    def _clear_socket(paths: VmmPaths) -> None:
        """After a failed launch: the QMP socket it may have left (launches
        happen under the VM's lock after ``clear_leftovers``: no other live
        VMM serves this path)."""
        with contextlib.suppress(VmmError, VmmRejected):
            process.remove_stale_socket(paths.api_socket)

    def close(self) -> None:
        """Nothing is held between QMP sessions but the moves being
        received (their listeners and threads, closed); the VMMs keep
        running."""
        with self._guard:
            self._locks.clear()
            moves = list(self._incoming.values())
            self._incoming.clear()
        for move in moves:
            move.close()

    def state(self, handle: VmmHandle, *, timeout: float) -> VmState:
        status = self._execute(handle, "query-status", timeout=timeout)
        name = status.get("status") if isinstance(status, dict) else None
        if name not in _STATUS:
            raise VmmError(f"{self._target(handle)}: unknown run state {name!r}")
        return _STATUS[name]

    def pause(self, handle: VmmHandle, *, timeout: float) -> None:
        self._execute(handle, "stop", timeout=timeout)

    def resume(self, handle: VmmHandle, *, timeout: float) -> None:
        self._execute(handle, "cont", timeout=timeout)

    def power_button(self, handle: VmmHandle, *, timeout: float) -> None:
        """ACPI power button (``system_powerdown``); the guest decides. If
        it powers off, the QEMU process exits."""
        self._execute(handle, "system_powerdown", timeout=timeout)

    def shutdown_vm(self, handle: VmmHandle, *, timeout: float) -> None:
        """Stop the VM hard. QEMU has no VM-less state: the process exits
        too (``quit``). Quiet when it is already gone."""
        self._quit(handle, timeout=timeout)

    def shutdown_vmm(self, handle: VmmHandle, *, timeout: float) -> None:
        """Ask QEMU to exit (``quit``). Quiet when it is already gone. A
        move it was receiving is abandoned (its listeners closed)."""
        self._quit(handle, timeout=timeout)

    def state_mark(self, paths: VmmPaths) -> Hashable | None:
        """None (no ``state_marks``): QMP reports state changes only as events
        on a connection of its own; every health check asks ``query-status``."""
        return None

    def counters(self, handle: VmmHandle, *, timeout: float) -> Mapping[str, Mapping[str, int]]:
        """Per-device counters, keyed like cloud-hypervisor's: disks
        ``read_bytes write_bytes read_ops write_ops``; nets ``rx_bytes
        rx_frames tx_bytes tx_frames`` from the guest's point of view."""
        stats = self._execute(handle, "query-blockstats", timeout=timeout)
        result: dict[str, dict[str, int]] = {}
        for entry in stats if isinstance(stats, list) else []:
            dev_id = self._block_device_id(entry)
            block = entry.get("stats") if isinstance(entry, dict) else None
            if dev_id is None or not isinstance(block, dict):
                continue
            result[dev_id] = {
                "read_bytes": int(block.get("rd_bytes", 0)),
                "write_bytes": int(block.get("wr_bytes", 0)),
                "read_ops": int(block.get("rd_operations", 0)),
                "write_ops": int(block.get("wr_operations", 0)),
            }
        result.update(self._net_counters(handle))
        return result

    # -- helpers ----------------------------------------------------------

    @staticmethod
    def _target(handle: VmmHandle) -> _Target:
        # The socket is in the VM's run/ directory (in the VM's directory
        # itself for a QEMU started before run/ existed).
        where = Path(handle.api_socket).parent
        label = where.parent.name if where.name == "run" else where.name
        return _Target(label, handle.api_socket)

    def _lock_for(self, handle: VmmHandle) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(handle.api_socket, threading.Lock())

    def _drop_incoming(self, handle: VmmHandle) -> _IncomingMove | None:
        """The move ``handle``'s QEMU was receiving, no longer listed (the
        caller closes it, with no lock held), or None."""
        with self._guard:
            return self._incoming.pop((handle.pid, handle.pid_start_ticks), None)

    def forget(self, handle: VmmHandle) -> None:
        """Drop the lock of a VMM that is gone (no session can succeed)."""
        with self._guard:
            self._locks.pop(handle.api_socket, None)

    def _check_alive(self, handle: VmmHandle) -> None:
        if handle.driver != DRIVER_NAME:
            raise VmmRejected(f"{self._target(handle)}: handle of driver {handle.driver!r}")
        if not process.is_alive(handle.pid, handle.pid_start_ticks):
            self.forget(handle)
            raise VmmGone(f"{self._target(handle)}: qemu pid {handle.pid} is not running")

    @contextlib.contextmanager
    def _session(self, handle: VmmHandle, deadline: float) -> Iterator[_QmpSession]:
        target = self._target(handle)
        self._check_alive(handle)
        lock = self._lock_for(handle)
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise VmmTimeout(f"{target}: another QMP session did not finish in time")
        try:
            session = _QmpSession(target, deadline)
            try:
                yield session
            finally:
                session.close()
        finally:
            lock.release()

    def _execute(self, handle: VmmHandle, command: str, *, timeout: float) -> Any:
        with self._session(handle, time.monotonic() + timeout) as session:
            return session.execute(command)

    def _quit(self, handle: VmmHandle, *, timeout: float) -> None:
        """``quit``, then wait (within ``timeout``) for the process to end;
        a VMM already gone, or going, is what was asked for."""
        deadline = time.monotonic() + timeout
        move = self._drop_incoming(handle)
        if move is not None:
            move.close()
        try:
            # QEMU answers, then closes; a close first is as good.
            with self._session(handle, deadline) as session, contextlib.suppress(VmmGone):
                session.execute("quit")
        except VmmGone:
            log.debug("%s: already gone", self._target(handle))
        if process.wait_exit(
            handle.pid, handle.pid_start_ticks, max(0.0, deadline - time.monotonic())
        ):
            self.forget(handle)

    @staticmethod
    def _block_device_id(entry: object) -> str | None:
        if not isinstance(entry, dict):
            return None
        qdev = str(entry.get("qdev", ""))
        match = re.match(r"^/machine/peripheral/([^/]+)/", qdev)
        if match and match.group(1).startswith(_DEVICE_PREFIX):
            return match.group(1).removeprefix(_DEVICE_PREFIX)
        device = str(entry.get("device", ""))
        if device.startswith(_DRIVE_PREFIX):
            return device.removeprefix(_DRIVE_PREFIX)
        return None

    def _net_counters(self, handle: VmmHandle) -> dict[str, dict[str, int]]:
        target = self._target(handle)
        try:
            argv = Path(f"/proc/{handle.pid}/cmdline").read_bytes().split(b"\x00")
            net_dev = Path(f"/proc/{handle.pid}/net/dev").read_text()
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ESRCH):
                raise VmmGone(f"{target}: qemu pid {handle.pid} is not running") from exc
            raise VmmError(f"{target}: cannot read /proc/{handle.pid}: {exc}") from exc
        # Re-check identity: the pid may have been recycled while we read.
        self._check_alive(handle)
        taps: dict[str, str] = {}
        for flag, value in itertools.pairwise(argv):
            if flag != b"-netdev":
                continue
            fields = _split_option(value.decode(errors="replace"))
            netdev_id = fields.get("id", "")
            if netdev_id.startswith(_NETDEV_PREFIX) and fields.get("ifname"):
                taps[fields["ifname"]] = netdev_id.removeprefix(_NETDEV_PREFIX)
        result: dict[str, dict[str, int]] = {}
        for line in net_dev.splitlines()[2:]:
            name, _, numbers = line.partition(":")
            dev_id = taps.get(name.strip())
            if dev_id is None:
                continue
            host = [int(n) for n in numbers.split()]
            # /proc/net/dev is the host's view of the tap: what it receives
            # the guest sent.
            result[dev_id] = {
                "rx_bytes": host[8],
                "rx_frames": host[9],
                "tx_bytes": host[0],
                "tx_frames": host[1],
            }
        return result
