"""Desired power state through real master and worker processes (fake
cloud-hypervisor, real Nix store paths): a power change never replaces a VM,
pause/resume keep its VMM process, stop/start keep its disk copy."""

from __future__ import annotations

import os
from typing import Any

import pytest
from fleethelpers import AddImage, FakeFleet
from opshelpers import vm_config

from procurator.core.validation import store_path_hash

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _fleet(image: str, power: str) -> str:
    return f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}", power = "{power}" }} ]\n'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kinds(described: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in described["events"]]


def _last_event(fleet: FakeFleet) -> tuple[str, str]:
    """The op id and kind of web-1's newest event (empty: none)."""
    events: list[dict[str, Any]] = fleet.describe("web-1")["events"]
    return (events[-1]["op_id"], events[-1]["kind"]) if events else ("", "")


def test_power_transitions_keep_the_vm_its_process_and_its_disk(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    image = add_image("power-vm", vm_config(disk=True), {"disk.img": b"\0" * 65536})
    vm_hash = store_path_hash(image)
    fake_fleet.apply_ok(_fleet(image, "running"))
    pid = fake_fleet.vmm_pid("web-1")
    assert pid is not None and _alive(pid)
    (disk,) = fake_fleet.disk_copies("web-1")
    with open(disk, "r+b") as copy:  # what the guest wrote
        copy.write(b"guest data survives a stop")

    # Paused: the diff says so, the VMM process is the same one.
    result = fake_fleet.apply(_fleet(image, "paused"), "--wait", "--timeout", "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "power:    web-1 running -> paused" in result.stdout
    assert "replaced" not in result.stdout
    vm = fake_fleet.status_vms()["web-1"]
    assert (vm["phase"], vm["desired_power"], vm["observed_power"]) == ("paused",) * 3
    assert vm["observed_hash"] == vm["desired_hash"] == vm_hash
    assert fake_fleet.vmm_pid("web-1") == pid
    text = fake_fleet.cli("status")
    assert "paused/paused" in text.stdout, text.stdout

    # Running again: resumed in place; the event says the clock is not resynced.
    resumed_op = fake_fleet.apply_ok(_fleet(image, "running"))
    assert fake_fleet.vmm_pid("web-1") == pid
    # The event is waited for: a combined report stores it after the status
    # that ended `apply --wait`.
    fake_fleet.wait_for(
        "the resumed event", lambda: _last_event(fake_fleet) == (resumed_op, "resumed")
    )
    described = fake_fleet.describe("web-1")
    resumed = [e for e in described["events"] if e["kind"] == "resumed"]
    assert resumed and resumed[-1]["op_id"] == resumed_op
    assert "not resynced" in resumed[-1]["message"]

    # Stopped: no VMM any more, the disk copy stays with what was written.
    fake_fleet.apply_ok(_fleet(image, "stopped"))
    vm = fake_fleet.status_vms()["web-1"]
    assert (vm["phase"], vm["desired_power"], vm["observed_power"]) == ("stopped",) * 3
    assert fake_fleet.vmm_pid("web-1") is None
    fake_fleet.wait_for("the VMM to exit", lambda: not _alive(pid))
    assert fake_fleet.disk_copies("web-1") == [disk]
    assert disk.read_bytes().startswith(b"guest data survives a stop")

    # And started again: a new VMM on the same disk copy, same identity.
    started_op = fake_fleet.apply_ok(_fleet(image, "running"))
    fake_fleet.wait_for(
        "the booted event", lambda: _last_event(fake_fleet) == (started_op, "booted")
    )
    new_pid = fake_fleet.vmm_pid("web-1")
    assert new_pid is not None and new_pid != pid
    assert fake_fleet.disk_copies("web-1") == [disk]
    assert disk.read_bytes().startswith(b"guest data survives a stop")
    described = fake_fleet.describe("web-1")
    assert described["observed"]["hash"] == vm_hash
    assert described["observed"]["power"] == "running"
    kinds = _kinds(described)
    assert "replaced" not in kinds
    for kind in ("created", "booted", "paused", "resumed", "stopped"):
        assert kind in kinds, kinds
    assert kinds.index("paused") < kinds.index("resumed") < kinds.index("stopped")
    assert kinds[-1] == "booted"
