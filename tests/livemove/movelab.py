"""A two-host lab for live moves at the VMM layer: two network namespaces
("a" and "b"), each with a bridge and a tap for the guest, the bridges
joined by a veth pair (one layer-2 segment, as two workers' bridges joined
by a link), and one ``QemuDriver`` per namespace. Each side's driver
calls run on a thread that entered its namespace (``Side.call``), as a
worker running there makes them: the QEMUs it starts run there (jailed,
the worker's jail enters it too: ``procurator.worker.jail``, one per
side), and the move's sockets, which the driver opens and hands to QEMU,
are there, so the streams cross the veth from a to b's address.

The source QEMU also gets a second QMP monitor (``Side.monitor``): a test
writes to the guest's disk through QEMU's block layer (``qemu-io``) while
the driver's own session is busy moving the VM — as the guest would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2.netns import setns
from qemuhelpers import image_definition, make_paths
from testnames import netns_name

from procurator.core.jail import JailPolicy
from procurator.core.vmdef import VmDefinition
from procurator.worker import cgroups
from procurator.worker.jail import Jail, instance_name
from procurator.worker.vmm.base import VmmError, VmmHandle, VmmPaths
from procurator.worker.vmm.process import terminate, wait_exit
from procurator.worker.vmm.qemu import QemuDriver, _QmpSession, _Target

GATEWAY = "10.79.0.1"  # namespace a's bridge: where pings come from
ADDRESS = "10.79.0.2"  # the guest, wherever it runs
TARGET = "10.79.0.3"  # namespace b's bridge: where the target listens
MAC = "52:54:00:79:00:02"
TAP = "tap0"
#: The move's secret both ends get (the mover hands them its transfer token).
TOKEN = bytes.fromhex("6d6f76652d746f6b656e2d666f722d74")
DISK_BYTES = 16 * 1024 * 1024
_T = TypeVar("_T")


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@dataclass
class Side:
    """One end of the move: a namespace, a state directory, a driver."""

    name: str
    netns: str
    root: Path
    driver: QemuDriver
    monitor: Path | None = None  # the second QMP socket (source only)
    jail: Jail | None = None  # jailed: the worker's jail, entering ``netns``
    handles: list[VmmHandle] = field(default_factory=list)

    def paths(self, vm: str = "guest") -> VmmPaths:
        return make_paths(self.root, vm)

    def disk(self, vm: str = "guest") -> Path:
        return self.paths(vm).vm_dir / "disks" / "data.img"

    def fresh_disk(self, data: bytes = b"", vm: str = "guest") -> Path:
        """The VM's writable disk, ``DISK_BYTES`` long, starting with ``data``."""
        disk = self.disk(vm)
        disk.parent.mkdir(parents=True, exist_ok=True)
        with open(disk, "wb") as f:
            f.write(data)
            f.truncate(DISK_BYTES)
        return disk

    def definition(self, image: Path, *, nic: bool = True) -> VmDefinition:
        """The guest of the image on this side's disk and (with ``nic``)
        tap."""
        definition = image_definition(
            image,
            cmdline=f"ip={ADDRESS}::{GATEWAY}:255.255.255.0:guest:eth0:off",
            net=[{"tap": TAP, "mac": MAC}] if nic else [],
            disks=[{"path": str(self.disk()), "id": "data", "readonly": False}],
        )
        return dataclasses.replace(definition, serial_file=str(self.paths().serial_file))

    def call(self, function: Callable[[], _T]) -> _T:
        """``function()`` on a thread that entered this side's namespace."""
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                setns(self.netns, flags=0)  # this thread's only
                outcome["value"] = function()
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc

        thread = threading.Thread(target=run, name=f"in-{self.name}")
        thread.start()
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]  # type: ignore[no-any-return]

    def launch(self, image: Path, *, nic: bool = True, **incoming: Any) -> VmmHandle:
        """Launch the guest here (jailed if this side is), booted, or with
        ``incoming`` (``memory=``, ``disks=``) waiting for a move."""
        paths = self.paths()
        definition = self.definition(image, nic=nic)
        jail = self.jail.prepare("guest", definition, paths) if self.jail is not None else None
        if incoming:
            handle = self.call(
                lambda: self.driver.launch_incoming(
                    definition, paths, timeout=30.0, jail=jail, **incoming
                )
            )
        else:
            handle = self.call(
                lambda: self.driver.launch(definition, paths, timeout=30.0, jail=jail)
            )
        self.handles.append(handle)
        return handle

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.netns, *argv, check=check)

    def qemu_io(self, command: str) -> None:
        """``qemu-io`` on the guest's data drive through the second monitor."""
        assert self.monitor is not None
        session = _QmpSession(_Target("test", str(self.monitor)), time.monotonic() + 30)
        try:
            line = f'qemu-io drive-data "{command}"'
            out = session.execute("human-monitor-command", {"command-line": line})
        finally:
            session.close()
        assert "error" not in str(out).lower(), out

    def stop_all(self) -> None:
        """Stop every QEMU started here (``quit``, else signals): a moved
        guest's source is paused for good and would never power off."""
        for handle in self.handles:
            if not wait_exit(handle.pid, handle.pid_start_ticks, 0.0):
                with contextlib.suppress(VmmError):
                    self.driver.shutdown_vmm(handle, timeout=5.0)
                terminate(handle.pid, handle.pid_start_ticks, grace=2.0)
        if self.jail is not None:
            self.jail.release("guest")
            self.jail.close()


@contextlib.contextmanager
def two_hosts(root: Path, *, jailed: bool = False) -> Iterator[tuple[Side, Side]]:
    """Namespaces a and b, bridged by a veth, a ``Side`` for each (deleted,
    with every QEMU started through them stopped, at exit)."""
    made: list[str] = []
    sides: list[Side] = []
    try:
        for name in ("a", "b"):
            netns = netns_name(f"pqm{name}")
            sh("ip", "netns", "add", netns)
            made.append(netns)
            run = ("ip", "-n", netns)
            sh(*run, "link", "add", "br0", "type", "bridge")
            sh(*run, "tuntap", "add", "dev", TAP, "mode", "tap")
            sh(*run, "link", "set", TAP, "master", "br0", "up")
            sh(*run, "link", "set", "br0", "up")
            sh(*run, "link", "set", "lo", "up")
        a, b = made
        sh(
            "ip",
            "-n",
            a,
            "link",
            "add",
            "link0",
            "type",
            "veth",
            "peer",
            "name",
            "link0",
            "netns",
            b,
        )
        for netns in made:
            sh("ip", "-n", netns, "link", "set", "link0", "master", "br0", "up")
        sh("ip", "-n", a, "addr", "add", f"{GATEWAY}/24", "dev", "br0")
        sh("ip", "-n", b, "addr", "add", f"{TARGET}/24", "dev", "br0")
        for name, netns in zip(("a", "b"), made, strict=True):
            side_root = root / name
            side_root.mkdir(parents=True)
            # In the VM's run/ directory: a jailed QEMU may make it there.
            monitor = side_root / "vms" / "guest" / "run" / "test.sock" if name == "a" else None
            args: list[str] = []
            if monitor is not None:
                args = ["-chardev", f"socket,id=test,path={monitor},server=on,wait=off"]
                args += ["-mon", "chardev=test,mode=control"]
            driver = QemuDriver(accel="tcg", args=args)
            jail = None
            if jailed:
                parent = os.environ.get("PROCURATOR_CGROUP_PARENT", "procurator-test")
                found = cgroups.detect(parent, instance_name(side_root))
                jail = Jail(JailPolicy(cgroup_parent=parent), side_root, cgroups=found, netns=netns)
            sides.append(Side(name, netns, side_root, driver, monitor, jail))
        yield sides[0], sides[1]
    finally:
        for side in sides:
            side.stop_all()
        for netns in made:
            sh("ip", "netns", "delete", netns, check=False)
        shutil.rmtree(root, ignore_errors=True)


class Pinger:
    """``ping -i INTERVAL`` from namespace a to the guest, running until
    ``stop``; the longest run of lost replies tells the gap."""

    def __init__(self, side: Side, interval: float = 0.05) -> None:
        self.interval = interval
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", side.netns, "busybox", "ping", "-i", str(interval), ADDRESS],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def stop(self) -> tuple[int, float]:
        """(replies, the longest gap between two replies in seconds)."""
        self._process.send_signal(signal.SIGINT)
        out, _ = self._process.communicate(timeout=10)
        seqs = [int(m) for m in re.findall(r"seq=(\d+)", out)]
        gaps = [later - earlier for earlier, later in itertools.pairwise(seqs)]
        return len(seqs), max(gaps, default=0) * self.interval

    def __enter__(self) -> Pinger:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
