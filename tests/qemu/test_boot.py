"""Real guests under QEMU/TCG through the driver alone (no VmManager):
boot to the readiness marker, pause/resume, power off, counters, a second
driver re-attaching by handle, and the guest on a bridge inside a throwaway
network namespace. Every VM goes through the stop ladder at teardown."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from qemuhelpers import (
    POWER_OFF_LIMIT,
    Vms,
    image_definition,
    in_netns,
    make_paths,
    stop_vm,
    wait_for_ready,
)

from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmError, VmState
from procurator.worker.vmm.process import is_alive, wait_exit
from procurator.worker.vmm.qemu import QemuDriver

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]


def test_boot_pause_resume_and_power_button(test_image: Path, vms: Vms) -> None:
    handle, paths = vms.launch("boot", image_definition(test_image))
    serial = wait_for_ready(paths, handle)
    assert "PROCURATOR-READY none" in serial
    assert vms.driver.state(handle, timeout=5) is VmState.RUNNING

    vms.driver.pause(handle, timeout=5)
    assert vms.driver.state(handle, timeout=5) is VmState.PAUSED
    vms.driver.resume(handle, timeout=5)
    assert vms.driver.state(handle, timeout=5) is VmState.RUNNING
    assert is_alive(handle.pid, handle.pid_start_ticks)

    vms.driver.power_button(handle, timeout=5)
    if wait_exit(handle.pid, handle.pid_start_ticks, POWER_OFF_LIMIT):
        # The guest powered itself off, and QEMU exited with it.
        assert "PROCURATOR-POWEROFF" in paths.serial_file.read_text()
    else:
        # A stock guest under TCG sometimes ignores the button: the host's
        # ladder ends it, which is what this branch checks.
        assert stop_vm(vms.driver, handle) in ("quit", "signals")
    assert not is_alive(handle.pid, handle.pid_start_ticks)
    with pytest.raises(Exception, match="not running"):
        vms.driver.state(handle, timeout=5)


def test_second_driver_reattaches_by_handle(test_image: Path, vms: Vms) -> None:
    handle, paths = vms.launch(
        "adopt", image_definition(test_image), driver=QemuDriver(accel="tcg")
    )
    wait_for_ready(paths, handle)
    # A fresh instance knows only the handle (as after a worker restart).
    again = QemuDriver(accel="tcg")
    restored = type(handle).from_json(json.loads(json.dumps(handle.to_json())))
    assert again.state(restored, timeout=5) is VmState.RUNNING
    again.pause(restored, timeout=5)
    assert again.state(restored, timeout=5) is VmState.PAUSED
    again.resume(restored, timeout=5)
    assert again.counters(restored, timeout=5) == {}
    again.shutdown_vm(restored, timeout=10)
    assert wait_exit(handle.pid, handle.pid_start_ticks, 10)
    # Stopping again is quiet: the goal holds.
    again.shutdown_vmm(restored, timeout=5)


def test_launch_reports_a_qemu_that_exits_at_start(test_image: Path, vms: Vms) -> None:
    definition = image_definition(test_image)
    definition = dataclasses.replace(
        definition,
        payload=dataclasses.replace(definition.payload, kernel="/nonexistent/vmlinux"),
    )
    paths = make_paths(vms.root, "bad")
    # Temporary (VmmError): QEMU exiting at start may pass (memory, a busy
    # tap); the manager's backoff and crash-loop detection handle one that
    # does not.
    with pytest.raises(VmmError) as raised:
        vms.driver.launch(definition, paths, timeout=30)
    # QEMU's own words come back, and nothing is left running.
    assert any("vmlinux" in line for line in raised.value.details), raised.value.details
    assert not paths.api_socket.exists()
    assert process.find_launched(paths.vm_dir) == []


def _guest_status(run: Any, address: str) -> dict[str, Any]:
    result = run("curl", "-sS", "--max-time", "5", f"http://{address}/cgi-bin/status")
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def _ping(run: Any, address: str, attempts: int = 30) -> None:
    for _ in range(attempts):
        if run("busybox", "ping", "-c", "1", "-W", "1", address, check=False).returncode == 0:
            return
    pytest.fail(f"{address} does not answer ping")


def test_guest_on_a_bridge_in_a_netns(test_image: Path, netns: str, vms: Vms) -> None:
    with IPRoute(netns=netns) as ipr:
        ipr.link("add", ifname="br0", kind="bridge")
        ipr.link("add", ifname="tap0", kind="tuntap", mode="tap")
        bridge = ipr.link_lookup(ifname="br0")[0]
        tap = ipr.link_lookup(ifname="tap0")[0]
        ipr.link("set", index=tap, master=bridge, state="up")
        ipr.link("set", index=bridge, state="up")
        ipr.addr("add", index=bridge, address="10.77.0.1", prefixlen=24)
    # QEMU runs inside the namespace (as a worker there would).
    wrapper = vms.root / "qemu-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns} qemu-system-x86_64 "$@"\n')
    wrapper.chmod(0o755)
    disk = vms.root / "data.img"
    disk.write_bytes(b"\0" * (4 * 1024 * 1024))
    driver = QemuDriver(accel="tcg", binary=str(wrapper))
    definition = image_definition(
        test_image,
        cmdline="ip=10.77.0.2::10.77.0.1:255.255.255.0:guest:eth0:off",
        net=[{"tap": "tap0", "mac": "52:54:00:77:00:02"}],
        disks=[{"path": str(disk), "id": "data", "readonly": True}],
    )
    handle, paths = vms.launch("net", definition, driver=driver)
    assert "PROCURATOR-READY 10.77.0.2" in wait_for_ready(paths, handle)

    run = in_netns(netns)
    _ping(run, "10.77.0.2")
    before = _guest_status(run, "10.77.0.2")
    assert before["ip"] == "10.77.0.2"
    assert before["hostname"] == "guest"

    # Paused and resumed, the same guest answers: same boot, more uptime.
    driver.pause(handle, timeout=5)
    driver.resume(handle, timeout=5)
    time.sleep(0.2)
    after = _guest_status(run, "10.77.0.2")
    assert after["boot_id"] == before["boot_id"]
    assert after["uptime"] >= before["uptime"]

    counters = driver.counters(handle, timeout=5)
    assert set(counters) == {"data", "net0"}  # the NIC's id, as cloud-hypervisor's
    assert counters["net0"]["rx_frames"] > 0  # the guest received our requests
    assert counters["net0"]["tx_frames"] > 0  # and answered
    assert counters["net0"]["rx_bytes"] > 0
    assert counters["data"]["read_ops"] > 0  # the kernel read the partition table
    assert counters["data"]["write_ops"] == 0
    # A second instance reads the same counters with only the handle.
    assert set(QemuDriver(accel="tcg").counters(handle, timeout=5)) == {"data", "net0"}
