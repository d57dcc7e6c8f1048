"""End to end with the cloud-hypervisor driver: real ``procurator master``
and ``worker`` processes, images added to the real Nix store, and the fake
VMM (tests/fakes/cloud-hypervisor-fake.py) serving cloud-hypervisor's REST
API on each VM's unix socket. No network: the worker runs ``--no-network``
in the root namespace, so this runs in seconds.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

import pytest
from fleethelpers import AddImage, FakeFleet

from procurator.core.validation import store_path_hash

pytestmark = [pytest.mark.root, pytest.mark.nix]

GC_LOCK = "/nix/var/nix/gc.lock"


def _config(cmdline: str = "console=ttyS0") -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def test_apply_wait_converges_replaces_and_reports_failures(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    v1 = add_image("web-vm", _config())
    v2 = add_image("web-vm-v2", _config("console=ttyS0 v2"))
    result = fake_fleet.apply(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{v1}" }},'
        f' {{ id = "web-2", image = "{v1}" }} ]\n',
        "--wait",
        "--timeout",
        "60",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "host-a: observed 1/1" in result.stdout
    (worker,) = fake_fleet.json("status")["workers"]
    # What the worker said of itself at registration, relayed by the master.
    assert worker["info"]["driver"] == "cloud-hypervisor"
    assert worker["info"]["capacity"]["vcpus"] == os.cpu_count()
    assert worker["info"]["capacity"]["memory_mib"] > 0
    assert {vm["id"]: vm["phase"] for vm in worker["vms"]} == {
        "web-1": "running",
        "web-2": "running",
    }

    # The VMM got the config the worker made: disks copied, serial to a file.
    config = json.loads((fake_fleet.state / "vms" / "web-1" / "vm.json").read_text())["config"]
    assert config["serial"] == {
        "mode": "File",
        "file": str(fake_fleet.state / "vms" / "web-1" / "run" / "serial.log"),
    }

    result = fake_fleet.apply(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{v1}" }},'
        f' {{ id = "web-2", image = "{v2}" }} ]\n',
        "--wait",
        "--timeout",
        "60",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replaced: web-2" in result.stdout
    vms = {vm["id"]: vm for vm in fake_fleet.json("status")["workers"][0]["vms"]}
    assert vms["web-2"]["observed_hash"] == store_path_hash(v2)
    assert vms["web-1"]["observed_hash"] == store_path_hash(v1)

    # A hostile image fails its VM with a message; the others go on.
    evil = add_image("evil-vm", {**_config(), "disks": [{"path": "/etc/shadow"}]})
    result = fake_fleet.apply(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{v1}" }},'
        f' {{ id = "evil", image = "{evil}" }} ]\n',
        "--wait",
        "--timeout",
        "60",
    )
    assert result.returncode == 4, result.stdout + result.stderr
    vms = {vm["id"]: vm for vm in fake_fleet.json("status")["workers"][0]["vms"]}
    assert vms["evil"]["phase"] == "failed"
    assert "/etc/shadow" in vms["evil"]["message"]
    assert vms["web-1"]["phase"] == "running"


def test_wait_gives_up_on_a_worker_that_never_comes(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    v1 = add_image("web-vm", _config())
    result = fake_fleet.apply(
        f'[workers.host-z]\nvms = [ {{ id = "web-9", image = "{v1}" }} ]\n',
        "--wait",
        "--timeout",
        "1",
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "host-z: observed 0/" in result.stdout
    assert "(disconnected)" in result.stdout


def test_status_shows_a_vm_whose_image_is_being_prepared(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    # Rooting the image waits for Nix's GC lock, held here: the worker is
    # busy preparing the VM, and status must say so rather than "waiting to
    # be created" (nothing asked the reconciler for a pass when the step's
    # phase changed; only the step's end did).
    image = add_image("prep-vm", _config())
    fd = os.open(GC_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        result = fake_fleet.apply(
            f'[workers.host-a]\nvms = [ {{ id = "prep-1", image = "{image}" }} ]\n'
        )
        assert result.returncode == 0, result.stdout + result.stderr

        def shown_as_preparing() -> bool:
            vm = fake_fleet.status_vms().get("prep-1", {})
            return bool(vm.get("phase") == "starting" and "preparing" in vm.get("message", ""))

        fake_fleet.wait_for("status to show the VM being prepared", shown_as_preparing, timeout=30)
    finally:
        os.close(fd)  # Nix may go on
    fake_fleet.wait_for(
        "the VM to run", lambda: fake_fleet.status_vms()["prep-1"]["phase"] == "running"
    )
