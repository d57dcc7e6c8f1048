"""End to end: real ``procurator master`` and ``worker`` processes in a
network namespace, booting real Debian kernels under QEMU (TCG) from Nix
store paths built offline (``scripts/build-test-image.sh``).

Each guest prints a readiness marker on its serial console and serves
``/cgi-bin/status`` (boot id, uptime) on its address, so the tests can tell
a re-adopted VM (same boot id, uptime goes on) from a rebooted one.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from testnames import netns_name

from procurator.core.validation import store_path_hash
from procurator.lab import Lab, build_test_image

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    return {
        "v1": build_test_image("--argstr", "name", "e2e-vm"),
        "v2": build_test_image("--argstr", "name", "e2e-vm-v2"),
    }


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(netns_name("procurator-e2e"), stop_grace=10, resync_interval=2) as running:
        running.start_master()
        running.start_worker()
        yield running


def _worker(status: dict[str, Any]) -> dict[str, Any]:
    (worker,) = status["workers"]
    return worker


def _vms(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {vm["id"]: vm for vm in _worker(status)["vms"]}


def test_boot_update_and_remove(lab: Lab, images: dict[str, str]) -> None:
    lab.apply([("web-1", images["v1"]), ("web-2", images["v1"])])
    addresses = {vm: lab.wait_ready(vm) for vm in ("web-1", "web-2")}
    assert len(set(addresses.values())) == 2
    guests = {vm: lab.guest_status(addr) for vm, addr in addresses.items()}
    assert {g["hostname"] for g in guests.values()} == {"web-1", "web-2"}
    status = lab.status()
    assert _worker(status)["observed_generation"] == 1
    vms = _vms(status)
    assert {vm["phase"] for vm in vms.values()} == {"running"}
    assert {vm["address"] for vm in vms.values()} == set(addresses.values())
    pids = lab.vmm_pids()
    assert set(pids) == {"web-1", "web-2"}
    assert len(lab.taps()) == 2

    # A new image for web-2 replaces web-2 only.
    out = lab.apply([("web-1", images["v1"]), ("web-2", images["v2"])])
    assert "replaced: web-2" in out
    after = lab.vmm_pids()
    assert after["web-1"] == pids["web-1"]
    assert after["web-2"] != pids["web-2"]
    vms = _vms(lab.status())
    assert vms["web-2"]["observed_hash"] == store_path_hash(images["v2"])
    assert vms["web-1"]["observed_hash"] == store_path_hash(images["v1"])
    assert lab.wait_ready("web-2") == addresses["web-2"]  # the address is kept
    assert lab.guest_status(addresses["web-1"])["boot_id"] == guests["web-1"]["boot_id"]
    assert lab.guest_status(addresses["web-2"])["boot_id"] != guests["web-2"]["boot_id"]

    # Removing web-1 leaves no process, tap, GC root or state of it.
    roots_before = lab.gc_roots()
    assert any(r.startswith("web-1/") for r in roots_before)
    lab.apply([("web-2", images["v2"])])
    assert set(lab.vmm_pids()) == {"web-2"}
    assert len(lab.taps()) == 1
    assert not any(r.startswith("web-1/") for r in lab.gc_roots())
    assert not lab.vm_dir("web-1").exists()
    assert set(_vms(lab.status())) == {"web-2"}


def test_worker_kill9_readopts_running_vms(lab: Lab, images: dict[str, str]) -> None:
    lab.apply([("web-1", images["v1"]), ("web-2", images["v1"])])
    addresses = {vm: lab.wait_ready(vm) for vm in ("web-1", "web-2")}
    guests = {vm: lab.guest_status(addr) for vm, addr in addresses.items()}
    pids = lab.vmm_pids()

    lab.stop_worker(sig=signal.SIGKILL)
    # The VMs do not notice: VMMs run in their own sessions.
    assert lab.vmm_pids() == pids
    for vm, addr in addresses.items():
        assert lab.guest_status(addr)["boot_id"] == guests[vm]["boot_id"]

    lab.start_worker()
    deadline = time.monotonic() + 60
    while True:
        worker = _worker(lab.status())
        vms = _vms(lab.status())
        if (
            worker["connected"]
            and {v["phase"] for v in vms.values()} == {"running"}
            and len(vms) == 2
        ):
            break
        assert time.monotonic() < deadline, worker
        time.sleep(0.5)
    # Re-adopted, not restarted and not duplicated.
    assert lab.vmm_pids() == pids
    assert len(lab.taps()) == 2
    for vm, addr in addresses.items():
        now = lab.guest_status(addr)
        assert now["boot_id"] == guests[vm]["boot_id"]
        assert now["uptime"] > guests[vm]["uptime"]
    assert all(v["restarts"] == 0 for v in vms.values())


def test_master_restart_keeps_generation_and_vms(lab: Lab, images: dict[str, str]) -> None:
    lab.apply([("web-1", images["v1"])])
    address = lab.wait_ready("web-1")
    boot_id = lab.guest_status(address)["boot_id"]
    pids = lab.vmm_pids()

    lab.stop_master()
    time.sleep(1)  # the worker notices and keeps its VM
    assert lab.vmm_pids() == pids
    lab.start_master()
    assert lab.status()["generation"] == 1

    out = lab.apply([("web-1", images["v1"]), ("web-2", images["v1"])])
    assert "generation 2" in out
    lab.wait_ready("web-2")
    assert lab.vmm_pids()["web-1"] == pids["web-1"]
    assert lab.guest_status(address)["boot_id"] == boot_id


def test_host_reboot_brings_vms_back_with_their_network(lab: Lab, images: dict[str, str]) -> None:
    """After a reboot nothing runs and no bridge or tap exists: the worker
    restarts its VMs on bridged taps with their old addresses."""
    lab.apply([("web-1", images["v1"])])
    address = lab.wait_ready("web-1")
    boot_id = lab.guest_status(address)["boot_id"]

    lab.stop_worker(sig=signal.SIGKILL)
    lab.kill_vmms()
    subprocess.run(["ip", "-n", lab.netns, "link", "del", "br-procurator"], check=True)
    for tap in lab.taps():
        subprocess.run(["ip", "-n", lab.netns, "link", "del", tap], check=True)

    lab.start_worker()
    guest = lab.guest_status(address, timeout=60)
    assert guest["boot_id"] != boot_id
    assert len(lab.taps()) == 1
    links = subprocess.run(
        ["ip", "-n", lab.netns, "-j", "link", "show", "master", "br-procurator"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert lab.taps()[0] in links
