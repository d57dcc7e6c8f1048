"""``procurator snapshot`` end to end: the CLI, a real master and a real
worker process (the fake cloud-hypervisor VMM), an image in the real Nix
store with a writable disk the worker copies. The master forwards each
command to the VM's worker through its Node capability, with an op id."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import AddImage, FakeFleet

pytestmark = [pytest.mark.root, pytest.mark.nix]

DISK = 64 * 1024


def _disk(fake_fleet: FakeFleet) -> Path:
    (disk,) = (fake_fleet.state / "vms" / "web-1" / "disks").glob("*/disk0.img")
    return disk


def _lines(result: Any) -> list[dict[str, Any]]:
    assert result.returncode == 0, result.stdout + result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_snapshot_commands_through_the_master(fake_fleet: FakeFleet, add_image: AddImage) -> None:
    image = add_image(
        "snap-vm",
        {
            "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64 << 20},
            "disks": [{"path": "disk.img"}],
        },
        {"disk.img": b"A" * DISK},
    )
    fake_fleet.apply_ok(f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}" }} ]\n')

    (created,) = _lines(fake_fleet.cli("snapshot", "create", "web-1", "before", "--json"))
    assert (created["vm"], created["name"], created["worker"]) == ("web-1", "before", "host-a")
    assert created["op_id"] and created["driver"] == "cloud-hypervisor"
    assert created["size_bytes"] >= DISK

    listed = _lines(fake_fleet.cli("snapshot", "list", "--json"))
    assert [(s["vm"], s["name"], s["op_id"]) for s in listed] == [
        ("web-1", "before", created["op_id"])
    ]
    text = fake_fleet.cli("snapshot", "list", "web-1")
    assert text.returncode == 0 and "before" in text.stdout and "host-a" in text.stdout

    again = fake_fleet.cli("snapshot", "create", "web-1", "before")
    assert again.returncode != 0
    assert "already has a snapshot named 'before'" in again.stderr
    hostile = fake_fleet.cli("snapshot", "restore", "web-1", "../../etc")
    assert hostile.returncode != 0 and "not a valid snapshot name" in hostile.stderr
    missing = fake_fleet.cli("snapshot", "list", "nope")
    assert missing.returncode != 0 and "neither desired nor reported" in missing.stderr

    _disk(fake_fleet).write_bytes(b"B" * DISK)
    restored = fake_fleet.cli("snapshot", "restore", "web-1", "before")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert "restored on worker host-a" in restored.stdout and "clock" in restored.stdout
    assert _disk(fake_fleet).read_bytes() == b"A" * DISK
    # Both events reach the master with the worker's next event report.
    deadline = time.monotonic() + 60
    while True:
        kinds = [e["kind"] for e in _lines(fake_fleet.cli("events", "--vm", "web-1", "--json"))]
        if {"snapshotted", "restored"} <= set(kinds) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert kinds.index("snapshotted") < kinds.index("restored"), kinds

    assert fake_fleet.cli("snapshot", "delete", "web-1", "before").returncode == 0
    assert _lines(fake_fleet.cli("snapshot", "list", "--json")) == []
