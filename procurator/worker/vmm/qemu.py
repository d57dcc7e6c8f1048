"""The QEMU driver: one ``qemu-system-x86_64 -M microvm`` per VM, over QMP.

Why it is shaped this way, and what always holds:

- **QEMU takes the whole VM on its command line.** The machine, kernel and
  devices cannot be created over QMP after start, so the VMM cannot be
  spawned empty and handed a config later, as cloud-hypervisor can. The
  driver's entry point is therefore :meth:`QemuDriver.launch` (spawn, create
  and boot in one step, see ``launch_vm`` in ``base.py``); ``spawn`` and
  ``create_and_boot`` refuse with a ``VmmRejected`` that says so.
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
  cloud-hypervisor's VMM exits when its guest shuts down. QEMU has no
  "VM stopped, VMM still up" state, so ``shutdown_vm`` is ``quit`` like
  ``shutdown_vmm``; both return quietly when the process is already gone
  or going (their goal holds).
- **Counters need no saved state**: block counters come from
  ``query-blockstats``; network counters from ``/proc/<pid>/net/dev`` (the
  QEMU's own network namespace) for the taps named in the QEMU's own argv
  (``/proc/<pid>/cmdline``), turned to the guest's point of view (the tap's
  transmit is the guest's receive), with cloud-hypervisor's key names.

Errors: socket and JSON failures become ``VmmTimeout`` / ``VmmGone`` /
``VmmError``; a QMP ``error`` reply and a config QEMU cannot express become
``VmmRejected`` (permanent), with QMP's error class and description in the
details. A QEMU that exits at start is a ``VmmError`` (temporary: no memory
or a busy device may pass) with the tail of QEMU's log in the details.

Lock order: ``QemuDriver._guard`` (the map of per-VM locks; a leaf, held
only to look a lock up) is never held while taking a per-VM lock, and a
per-VM lock is held for exactly one QMP session.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from procurator.worker.vmm.base import (
    VmmError,
    VmmGone,
    VmmHandle,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
    VmState,
)
from procurator.worker.vmm.process import (
    is_alive,
    launch_env,
    pid_start_ticks,
    signal_process,
    spawn_detached,
    wait_exit,
)

__all__ = ["Accel", "QemuDriver", "qemu_argv"]

log = logging.getLogger(__name__)

Accel = Literal["tcg", "kvm", "auto"]

DRIVER_NAME = "qemu"

_MIB = 1024 * 1024
# A QMP reply larger than this is not one we asked for.
_MAX_LINE = 16 * _MIB
# How long QEMU gets to exit on SIGTERM before SIGKILL when launch fails.
_KILL_GRACE = 2.0

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

# Device ids of the config become QEMU ids with a prefix, because QEMU ids
# must start with a letter and cloud-hypervisor's ("_disk0") do not.
_DEVICE_PREFIX = "id-"
_DRIVE_PREFIX = "drive-"
_NETDEV_PREFIX = "netdev-"
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAC_RE = re.compile(r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$")

_IMAGE_FORMATS = {"Raw": "raw", "Qcow2": "qcow2", "Vhdx": "vhdx", "FixedVhd": "vpc"}


# --------------------------------------------------------------------------
# VmConfig -> argv (pure)


class _Rejections:
    """Collects every problem of a config so one error names them all."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, where: str, problem: str) -> None:
        self.problems.append(f"{where}: {problem}")

    def section(self, config: Mapping[str, Any], key: str) -> Mapping[str, Any]:
        value = config.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.add(key, f"must be an object, not {type(value).__name__}")
            return {}
        return value

    def items(self, config: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
        value = config.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            self.add(key, "must be a list of objects")
            return []
        return value

    def unsupported(
        self,
        where: str,
        section: Mapping[str, Any],
        handled: frozenset[str],
        ignored: frozenset[str] = frozenset(),
    ) -> None:
        """Fields QEMU cannot honour are refused unless unset/false: running
        a VM without what its config asks for is worse than not running it.
        ``ignored`` fields only tune performance or host placement."""
        for key, value in section.items():
            if key in handled or key in ignored:
                continue
            if value not in (None, False, 0, "", [], {}):
                self.add(f"{where}.{key}", "not supported by the QEMU driver")


def _escape(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")


def _path(rej: _Rejections, where: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        rej.add(where, "must be a non-empty path")
        return ""
    if not os.path.isabs(value):
        rej.add(where, f"{value!r} is not absolute (the worker resolves image paths)")
    return value


def _int(rej: _Rejections, where: str, value: object, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        rej.add(where, f"must be an integer >= {minimum}, not {value!r}")
        return minimum
    return value


def _device_id(rej: _Rejections, where: str, item: Mapping[str, Any], default: str) -> str:
    raw = item.get("id") or default
    if not isinstance(raw, str) or not _ID_RE.match(raw):
        rej.add(f"{where}.id", f"{raw!r} is not an id QEMU accepts ([A-Za-z0-9_.-]{{1,64}})")
        return default
    return raw


def _chardev(
    rej: _Rejections, where: str, section: Mapping[str, Any], chardev_id: str
) -> list[str] | None:
    """``-chardev`` for a serial/console section, or None when it is off."""
    mode = section.get("mode", "Off")
    if mode == "Off":
        return None
    if mode == "Null":
        return ["-chardev", f"null,id={chardev_id}"]
    if mode == "Tty":
        # The VMM's stdout is its log file.
        return ["-chardev", f"stdio,id={chardev_id},signal=off"]
    if mode == "File":
        path = _path(rej, f"{where}.file", section.get("file"))
        return ["-chardev", f"file,id={chardev_id},path={_escape(path)}"]
    rej.add(f"{where}.mode", f"{mode!r} is not supported by the QEMU driver (Off, Null, Tty, File)")
    return None


def _tcg_cmdline(cmdline: str, extra: str) -> str:
    """Append ``extra``'s parameters unless the cmdline already sets them."""
    present = {word.split("=", 1)[0] for word in cmdline.split()}
    added = [word for word in extra.split() if word.split("=", 1)[0] not in present]
    return " ".join([cmdline, *added]).strip()


def qemu_argv(
    config: Mapping[str, Any],
    paths: VmmPaths,
    *,
    accel: Literal["tcg", "kvm"],
    binary: str = "qemu-system-x86_64",
    extra_cmdline_tcg: str = "tsc_early_khz=2600000",
) -> list[str]:
    """Translate a (confined, filled-in) cloud-hypervisor ``VmConfig`` into a
    ``qemu-system-x86_64`` command line that starts the VM paused (``-S``)
    with its QMP monitor on ``paths.api_socket``.

    Device ids: ``disks[i].id`` / ``net[i].id`` when set, else ``_disk<i>``
    / ``_net<i>`` (per kind); they key :meth:`QemuDriver.counters`. Serial:
    ``config.serial``, else a file at ``paths.serial_file``. Raises
    ``VmmRejected`` naming every field QEMU cannot honour."""
    rej = _Rejections()
    rej.unsupported(
        "config",
        config,
        handled=frozenset(
            {"cpus", "memory", "payload", "disks", "net", "rng", "serial", "console"}
        ),
        # CH's rtc is always there on microvm; platform is identification only.
        ignored=frozenset({"rtc", "platform", "landlock_enable", "landlock_rules"}),
    )

    cpus = rej.section(config, "cpus")
    rej.unsupported(
        "cpus",
        cpus,
        handled=frozenset({"boot_vcpus", "max_vcpus"}),
        # microvm has no CPU hotplug: the VM runs with boot_vcpus.
        ignored=frozenset({"max_phys_bits", "affinity", "nested", "core_scheduling"}),
    )
    vcpus = _int(rej, "cpus.boot_vcpus", cpus.get("boot_vcpus", 1))

    memory = rej.section(config, "memory")
    rej.unsupported(
        "memory",
        memory,
        handled=frozenset({"size"}),
        ignored=frozenset({"mergeable", "thp", "prefault", "shared", "hotplug_method", "reserve"}),
    )
    size = _int(rej, "memory.size", memory.get("size", 512 * _MIB), minimum=_MIB)
    memory_mib = math.ceil(size / _MIB)

    payload = rej.section(config, "payload")
    rej.unsupported("payload", payload, handled=frozenset({"kernel", "initramfs", "cmdline"}))
    kernel = _path(rej, "payload.kernel", payload.get("kernel"))
    initramfs = payload.get("initramfs")
    cmdline = payload.get("cmdline") or ""
    if not isinstance(cmdline, str):
        rej.add("payload.cmdline", "must be a string")
        cmdline = ""
    if accel == "tcg" and extra_cmdline_tcg:
        cmdline = _tcg_cmdline(cmdline, extra_cmdline_tcg)

    argv = [
        binary,
        "-name",
        _escape(paths.vm_dir.name),
        "-no-user-config",
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-accel",
        accel,
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    devices: list[str] = []

    serial = rej.section(config, "serial") or {"mode": "File", "file": str(paths.serial_file)}
    rej.unsupported("serial", serial, handled=frozenset({"mode", "file"}))
    serial_chardev = _chardev(rej, "serial", serial, "serial0")
    if serial_chardev is not None:
        devices += [*serial_chardev, "-serial", "chardev:serial0"]
    # Without ACPI the guest finds neither the virtio-mmio devices nor the
    # power button (the kernel has no virtio_mmio.device= support).
    machine = "microvm,x-option-roms=off,rtc=on,acpi=on,isa-serial=" + (
        "on" if serial_chardev is not None else "off"
    )
    argv += ["-M", machine, "-smp", str(vcpus), "-m", f"{memory_mib}M", "-kernel", kernel]
    if initramfs is not None:
        argv += ["-initrd", _path(rej, "payload.initramfs", initramfs)]
    argv += ["-append", cmdline]

    console = rej.section(config, "console") or {"mode": "Off"}
    rej.unsupported("console", console, handled=frozenset({"mode", "file"}))
    console_chardev = _chardev(rej, "console", console, "console0")
    if console_chardev is not None:
        devices += [
            *console_chardev,
            "-device",
            "virtio-serial-device,id=virtio-serial0",
            "-device",
            "virtconsole,chardev=console0,id=console0",
        ]

    seen: set[str] = set()
    for index, disk in enumerate(rej.items(config, "disks")):
        where = f"disks[{index}]"
        rej.unsupported(
            where,
            disk,
            handled=frozenset({"path", "readonly", "direct", "id", "serial", "image_type"}),
            ignored=frozenset(
                {
                    "num_queues",
                    "queue_size",
                    "rate_limiter_config",
                    "rate_limit_group",
                    "pci_segment",
                    "queue_affinity",
                    "sparse",
                    "lock_granularity",
                }
            ),
        )
        dev_id = _device_id(rej, where, disk, f"_disk{index}")
        if dev_id in seen:
            rej.add(f"{where}.id", f"{dev_id!r} is used twice")
        seen.add(dev_id)
        image_type = disk.get("image_type") or "Raw"
        if image_type not in _IMAGE_FORMATS:
            rej.add(f"{where}.image_type", f"{image_type!r} is not one of {sorted(_IMAGE_FORMATS)}")
        drive = [
            "if=none",
            f"id={_DRIVE_PREFIX}{dev_id}",
            f"file={_escape(_path(rej, f'{where}.path', disk.get('path')))}",
            f"format={_IMAGE_FORMATS.get(image_type, 'raw')}",
            f"readonly={'on' if disk.get('readonly') else 'off'}",
        ]
        if disk.get("direct"):
            drive.append("cache.direct=on")
        device = f"virtio-blk-device,drive={_DRIVE_PREFIX}{dev_id},id={_DEVICE_PREFIX}{dev_id}"
        if disk.get("serial"):
            device += f",serial={_escape(str(disk['serial']))}"
        devices += ["-drive", ",".join(drive), "-device", device]

    for index, net in enumerate(rej.items(config, "net")):
        where = f"net[{index}]"
        rej.unsupported(
            where,
            net,
            handled=frozenset({"tap", "mac", "id", "mtu"}),
            # The worker owns the tap and its addressing (ip, mask, host_mac).
            ignored=frozenset(
                {
                    "ip",
                    "mask",
                    "host_mac",
                    "num_queues",
                    "queue_size",
                    "rate_limiter_config",
                    "pci_segment",
                    "offload_tso",
                    "offload_ufo",
                    "offload_csum",
                    "vhost_mode",
                }
            ),
        )
        dev_id = _device_id(rej, where, net, f"_net{index}")
        if dev_id in seen:
            rej.add(f"{where}.id", f"{dev_id!r} is used twice")
        seen.add(dev_id)
        tap = net.get("tap")
        if not isinstance(tap, str) or not tap or "," in tap or len(tap) > 15:
            rej.add(f"{where}.tap", f"{tap!r} is not a tap name (the worker names the tap)")
            tap = ""
        device = f"virtio-net-device,netdev={_NETDEV_PREFIX}{dev_id},id={_DEVICE_PREFIX}{dev_id}"
        mac = net.get("mac")
        if mac is not None:
            if not isinstance(mac, str) or not _MAC_RE.match(mac):
                rej.add(f"{where}.mac", f"{mac!r} is not a MAC address")
            else:
                device += f",mac={mac}"
        if net.get("mtu") is not None:
            device += f",host_mtu={_int(rej, f'{where}.mtu', net['mtu'], minimum=68)}"
        devices += [
            "-netdev",
            f"tap,id={_NETDEV_PREFIX}{dev_id},ifname={tap},script=no,downscript=no",
            "-device",
            device,
        ]

    rng = rej.section(config, "rng")
    if rng:
        rej.unsupported("rng", rng, handled=frozenset({"src", "id"}))
        src = _path(rej, "rng.src", rng.get("src"))
        devices += [
            "-object",
            f"rng-random,id=rng0,filename={_escape(src)}",
            "-device",
            "virtio-rng-device,rng=rng0",
        ]

    socket_path = _escape(str(paths.api_socket))
    argv += [
        *devices,
        "-chardev",
        f"socket,id=qmp,path={socket_path},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if rej.problems:
        raise VmmRejected(
            f"VM {paths.vm_dir.name}: config cannot run under QEMU", details=tuple(rej.problems)
        )
    return argv


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
        if "QMP" not in greeting:
            raise VmmError(f"{self._target}: no QMP greeting (got {str(greeting)[:200]})")
        self.execute("qmp_capabilities")

    def close(self) -> None:
        self._sock.close()

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

    def send(self, command: str, arguments: Mapping[str, Any] | None = None) -> int:
        self._next_id += 1
        request: dict[str, Any] = {"execute": command, "id": self._next_id}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        self._io(command, lambda: self._sock.sendall(data))
        return self._next_id

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        """Run one command; return its ``return`` value. Events seen while
        waiting are logged and skipped."""
        request_id = self.send(command, arguments)
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


def _kvm_usable(device: Path) -> bool:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _read_tail(path: Path, offset: int, limit: int = 4096) -> tuple[str, ...]:
    """The lines QEMU wrote to its log since ``offset`` (at most ``limit`` bytes)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(offset, end - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ()
    return tuple(line for line in text.splitlines() if line.strip())


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
    ``kvm_device`` opens read-write, else TCG). Under TCG,
    ``extra_cmdline_tcg`` is appended to the guest's cmdline (parameters the
    cmdline already sets are kept as they are)."""

    name = DRIVER_NAME

    def __init__(
        self,
        *,
        accel: Accel = "auto",
        binary: str = "qemu-system-x86_64",
        args: Sequence[str] = (),
        extra_cmdline_tcg: str = "tsc_early_khz=2600000",
        kvm_device: Path = Path("/dev/kvm"),
    ) -> None:
        if accel not in ("tcg", "kvm", "auto"):
            raise ValueError(f"accel must be tcg, kvm or auto, not {accel!r}")
        self._accel: Accel = accel
        self._binary = binary
        self._args = tuple(args)
        self._extra_cmdline_tcg = extra_cmdline_tcg
        self._kvm_device = kvm_device
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @property
    def accel(self) -> Literal["tcg", "kvm"]:
        """The accelerator new VMs get (``auto`` resolved now)."""
        if self._accel == "auto":
            return "kvm" if _kvm_usable(self._kvm_device) else "tcg"
        return self._accel

    # -- lifecycle --------------------------------------------------------

    def launch(self, paths: VmmPaths, config: Mapping[str, Any], *, timeout: float) -> VmmHandle:
        """Start QEMU with the VM from ``config`` in its own session, wait
        for QMP, boot the guest (``cont``) and confirm it runs. Raises
        ``VmmRejected`` (config QEMU cannot run, or QEMU exited at start),
        ``VmmTimeout`` / ``VmmError``; never leaves a process behind then."""
        deadline = time.monotonic() + timeout
        label = paths.vm_dir.name
        accel = self.accel
        argv = qemu_argv(
            config,
            paths,
            accel=accel,
            binary=self._binary,
            extra_cmdline_tcg=self._extra_cmdline_tcg,
        )
        self._remove_stale_socket(paths.api_socket, label)
        try:
            log_offset = paths.log_file.stat().st_size
        except FileNotFoundError:
            log_offset = 0
        try:
            child = spawn_detached(
                [argv[0], *self._args, *argv[1:]],
                log_path=paths.log_file,
                env=launch_env(paths.vm_dir),
                cwd=paths.vm_dir,
            )
        except OSError as exc:
            raise VmmError(f"VM {label}: cannot start {self._binary}: {exc}") from exc
        ticks = pid_start_ticks(child.pid)
        # A QEMU this process started is its child until it exits: a daemon
        # thread waits for it, so it never lingers as a zombie and its Popen
        # lives exactly as long as it runs (whatever becomes of this driver).
        threading.Thread(target=child.wait, name=f"qemu-reaper-{child.pid}", daemon=True).start()
        handle = VmmHandle(
            driver=DRIVER_NAME,
            pid=child.pid,
            pid_start_ticks=ticks if ticks is not None else -1,
            api_socket=str(paths.api_socket),
        )
        log.info("VM %s: started qemu pid %d (%s)", label, child.pid, accel)
        try:
            self._boot(child, handle, paths, log_offset, deadline)
        except BaseException:
            self._kill(child, handle)
            raise
        return handle

    def _boot(
        self,
        child: subprocess.Popen[bytes],
        handle: VmmHandle,
        paths: VmmPaths,
        log_offset: int,
        deadline: float,
    ) -> None:
        session = self._connect_new(child, handle, paths, log_offset, deadline)
        try:
            session.execute("cont")
            status = session.execute("query-status")
        finally:
            session.close()
        state = _STATUS.get(str(status.get("status"))) if isinstance(status, dict) else None
        if state is not VmState.RUNNING:
            raise VmmError(f"{self._target(handle)}: QEMU reports {status!r} after cont")

    def spawn(self, paths: VmmPaths, *, timeout: float) -> VmmHandle:
        """QEMU cannot start without its VM: use :meth:`launch`."""
        raise VmmRejected(
            f"VM {paths.vm_dir.name}: QEMU takes the VM config at start; "
            "use launch() (base.launch_vm) instead of spawn() + create_and_boot()"
        )

    def create_and_boot(
        self, handle: VmmHandle, config: Mapping[str, Any], *, timeout: float
    ) -> None:
        """QEMU cannot create a VM in a running VMM: use :meth:`launch`."""
        raise VmmRejected(
            f"{self._target(handle)}: QEMU cannot create a VM after start; use launch()"
        )

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
        """Ask QEMU to exit (``quit``). Quiet when it is already gone."""
        self._quit(handle, timeout=timeout)

    def state_mark(self, paths: VmmPaths) -> Hashable | None:
        """None: QMP reports state changes only as events on a connection of
        its own; every health check asks ``query-status``."""
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
        return _Target(Path(handle.api_socket).parent.name, handle.api_socket)

    def _lock_for(self, handle: VmmHandle) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(handle.api_socket, threading.Lock())

    def _forget(self, handle: VmmHandle) -> None:
        """Drop the lock of a VMM that is gone (no session can succeed)."""
        with self._guard:
            self._locks.pop(handle.api_socket, None)

    def _check_alive(self, handle: VmmHandle) -> None:
        if handle.driver != DRIVER_NAME:
            raise VmmRejected(f"{self._target(handle)}: handle of driver {handle.driver!r}")
        if not is_alive(handle.pid, handle.pid_start_ticks):
            self._forget(handle)
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
        try:
            # QEMU answers, then closes; a close first is as good.
            with self._session(handle, deadline) as session, contextlib.suppress(VmmGone):
                session.execute("quit")
        except VmmGone:
            log.debug("%s: already gone", self._target(handle))
        if wait_exit(handle.pid, handle.pid_start_ticks, max(0.0, deadline - time.monotonic())):
            self._forget(handle)

    def _connect_new(
        self,
        child: subprocess.Popen[bytes],
        handle: VmmHandle,
        paths: VmmPaths,
        log_offset: int,
        deadline: float,
    ) -> _QmpSession:
        """Wait for a QEMU just started to answer on its monitor."""
        target = self._target(handle)
        delay = 0.01
        while True:
            code = child.poll()
            if code is not None:
                # Temporary: the argv was already accepted by qemu_argv, so
                # what ends QEMU here (no memory, a busy tap or /dev/kvm) may
                # pass; the VmManager's backoff and crash-loop detection
                # show a cause that does not.
                raise VmmError(
                    f"{target}: QEMU exited at start (status {code})",
                    details=_read_tail(paths.log_file, log_offset),
                )
            try:
                return _QmpSession(target, deadline)
            except VmmGone:
                # The socket is not bound yet.
                if time.monotonic() + delay >= deadline:
                    raise VmmTimeout(
                        f"{target}: QMP did not come up",
                        details=_read_tail(paths.log_file, log_offset),
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.2)

    def _kill(self, child: subprocess.Popen[bytes], handle: VmmHandle) -> None:
        """Stop a QEMU ``launch`` started but could not finish; wait for
        its end (the reaper thread collects its status)."""
        if signal_process(child.pid, handle.pid_start_ticks, signal.SIGTERM) and not wait_exit(
            child.pid, handle.pid_start_ticks, _KILL_GRACE
        ):
            signal_process(child.pid, handle.pid_start_ticks, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10.0)
        if child.returncode is None:
            log.error("%s: qemu pid %d survived SIGKILL", self._target(handle), child.pid)
            return
        with contextlib.suppress(FileNotFoundError):
            Path(handle.api_socket).unlink()

    @staticmethod
    def _remove_stale_socket(path: Path, label: str) -> None:
        """A QEMU that died leaves its socket file; QEMU would refuse to bind
        over it. The caller (the VM's flock holder) knows no live VMM uses it."""
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        except OSError as exc:
            raise VmmError(f"VM {label}: cannot inspect {path}: {exc}") from exc
        if not stat.S_ISSOCK(mode):
            raise VmmRejected(f"VM {label}: {path} exists and is not a socket")
        path.unlink()

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
