"""Desired power on a real VM: real master and worker processes in a network
namespace, QEMU (TCG) booting the offline test image. Pause keeps the VMM
process and the guest (same boot id, its uptime goes on); stop then start
boots the guest again on the same address, under the same identity.

The test image has no writable disk, so disk persistence across stop/start
is tested on the fake VMM (test_ops_power.py) by the disk copy's contents.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from testnames import netns_name

from procurator.lab import Lab, build_test_image

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]


@pytest.fixture(scope="module")
def image() -> str:
    return build_test_image("--argstr", "name", "ops-vm")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(netns_name("procurator-ops"), stop_grace=10, resync_interval=2) as running:
        running.start_master()
        running.start_worker()
        yield running


def _apply(lab: Lab, image: str, power: str) -> str:
    path = lab.dir / f"fleet-{power}.toml"
    path.write_text(
        f'[workers.{lab.worker_id}]\nvms = [ {{ id = "web-1", image = "{image}", '
        f'power = "{power}" }} ]\n'
    )
    return lab.cli("apply", str(path), "--wait", "--timeout", "180").stdout


def _vm(lab: Lab) -> dict[str, Any]:
    (worker,) = lab.status()["workers"]
    (vm,) = worker["vms"]
    assert isinstance(vm, dict)
    return vm


def test_pause_keeps_the_guest_and_stop_start_keeps_its_address(lab: Lab, image: str) -> None:
    _apply(lab, image, "running")
    address = lab.wait_ready("web-1")
    booted = lab.guest_status(address)
    pid = lab.vmm_pids()["web-1"]

    out = _apply(lab, image, "paused")
    assert "power:    web-1 running -> paused" in out
    vm = _vm(lab)
    assert (vm["phase"], vm["desired_power"], vm["observed_power"]) == ("paused",) * 3
    assert lab.vmm_pids() == {"web-1": pid}

    _apply(lab, image, "running")
    assert lab.vmm_pids() == {"web-1": pid}
    resumed = lab.guest_status(address)
    assert resumed["boot_id"] == booted["boot_id"]  # the same guest, not a reboot
    assert float(resumed["uptime"]) >= float(booted["uptime"])

    _apply(lab, image, "stopped")
    vm = _vm(lab)
    assert (vm["phase"], vm["observed_power"]) == ("stopped", "stopped")
    assert lab.vmm_pids() == {}

    _apply(lab, image, "running")
    vm = _vm(lab)
    assert vm["address"] == address
    assert vm["observed_hash"] == vm["desired_hash"]
    started = lab.guest_status(address, timeout=120)
    assert started["boot_id"] != booted["boot_id"]  # booted again, same place
    described = json.loads(lab.cli("describe", "vm", "web-1", "--json").stdout)
    kinds = [e["kind"] for e in described["events"]]
    assert "replaced" not in kinds
    assert {"paused", "resumed", "stopped"} <= set(kinds)
