"""A real guest under QEMU/TCG, through the VmManager: snapshot it, change
its disk, restore; the disk is back, the guest is the same boot (memory and
devices came back, not a reboot) and answers ping. One VM boot."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from qemuhelpers import image_definition, in_netns
from vmmhelpers import FAST, FAST_POLICY, Recorder

from procurator.core.models import EventKind, Phase
from procurator.worker.manager import VmManager
from procurator.worker.snapshots import SnapshotService
from procurator.worker.vmm.qemu import QemuDriver
from procurator.worker.vmrecord import VmSpec

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

ADDRESS = "10.78.0.2"
DISK = 4 * 1024 * 1024


def _ping(run: Any, attempts: int = 30) -> None:
    for _ in range(attempts):
        if run("busybox", "ping", "-c", "1", "-W", "1", ADDRESS, check=False).returncode == 0:
            return
    pytest.fail(f"{ADDRESS} does not answer ping")


def _status(run: Any) -> dict[str, Any]:
    result = run("curl", "-sS", "--max-time", "5", f"http://{ADDRESS}/cgi-bin/status")
    status: dict[str, Any] = json.loads(result.stdout)
    return status


@pytest.fixture
def manager(vms: Any, netns: str, recorder: Recorder) -> Iterator[VmManager]:
    """A manager whose QEMUs run in ``netns`` (unjailed: the jail would
    not let the wrapper enter the namespace), on a bridge there."""
    with IPRoute(netns=netns) as ipr:
        ipr.link("add", ifname="br0", kind="bridge")
        ipr.link("add", ifname="tap0", kind="tuntap", mode="tap")
        bridge = ipr.link_lookup(ifname="br0")[0]
        tap = ipr.link_lookup(ifname="tap0")[0]
        ipr.link("set", index=tap, master=bridge, state="up")
        ipr.link("set", index=bridge, state="up")
        ipr.addr("add", index=bridge, address="10.78.0.1", prefixlen=24)
    wrapper = vms.root / "qemu-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    timeouts = dataclasses.replace(FAST, api=5.0, health_interval=0.5, counters_interval=0)
    made = VmManager(
        vms.root,
        QemuDriver(accel="tcg", binary=str(wrapper)),
        timeouts=timeouts,
        policy=FAST_POLICY,
        on_change=recorder,
    )
    try:
        yield made
    finally:
        for obs in made.list():
            made.remove(obs.vm_id)
        made.close()


def test_snapshot_restore_brings_disk_and_memory_back(
    test_image: Path, manager: VmManager, netns: str, recorder: Recorder
) -> None:
    root = manager.state.root
    paths = manager.state.paths("guest")
    disk = root / "vms" / "guest" / "disks" / "img" / "disk0.img"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"before" + bytes(DISK - 6))
    definition = image_definition(
        test_image,
        cmdline=f"ip={ADDRESS}::10.78.0.1:255.255.255.0:guest:eth0:off",
        net=[{"tap": "tap0", "mac": "52:54:00:78:00:02"}],
        disks=[{"path": str(disk), "id": "data", "readonly": False}],
    )
    definition = dataclasses.replace(definition, serial_file=str(paths.serial_file))
    manager.ensure(VmSpec("guest", "h1", definition))
    deadline = time.monotonic() + 120
    while b"PROCURATOR-READY" not in (
        paths.serial_file.read_bytes() if paths.serial_file.exists() else b""
    ):
        assert time.monotonic() < deadline, "the guest did not boot"
        time.sleep(0.1)
    run = in_netns(netns)
    _ping(run)
    booted = _status(run)

    snapshots = SnapshotService(manager)
    info = snapshots.create("guest", "ready", op_id="op-snap")
    state = root / "vms" / "guest" / "snapshots" / "ready" / "state" / "memory"
    assert state.stat().st_size > 0 and info.size_bytes >= state.stat().st_size + DISK
    _ping(run)  # it ran on
    # The guest lives on past the snapshot; its disk changes behind it.
    time.sleep(2)
    later = _status(run)
    later_read = time.monotonic()  # the uptime was read before this
    assert later["boot_id"] == booted["boot_id"] and later["uptime"] > booted["uptime"]
    disk.write_bytes(b"after!" + bytes(DISK - 6))
    old_pid = manager.get_or_raise("guest").pid

    snapshots.restore("guest", "ready", op_id="op-restore")
    assert disk.read_bytes()[:6] == b"before"
    recorder.wait_for(lambda: EventKind.RESTORED in recorder.kinds("guest"), timeout=60)
    now = manager.get_or_raise("guest")
    assert now.phase is Phase.RUNNING and now.pid != old_pid
    _ping(run)
    restored_asked = time.monotonic()
    restored = _status(run)
    # The same boot, taken back to the snapshot: not a reboot (another
    # boot id), and its uptime went back (the guest's clock did too): half
    # a second below what a guest that ran on would show, ``later`` plus
    # the host's time between the two reads. (A restored guest is ~2 s
    # behind that, less the two reads' own durations, however slow the
    # restore was; the half second allows for a guest clock that lags.)
    assert restored["boot_id"] == booted["boot_id"]
    ran_on = later["uptime"] + (restored_asked - later_read)
    assert restored["uptime"] < ran_on - 0.5, (restored, later, ran_on)
