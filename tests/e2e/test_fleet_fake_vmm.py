"""End to end with the cloud-hypervisor driver: real ``procurator master``
and ``worker`` processes, images added to the real Nix store, and the fake
VMM (tests/fakes/cloud-hypervisor-fake.py) serving cloud-hypervisor's REST
API on each VM's unix socket. No network: the worker runs ``--no-network``
in the root namespace, so this runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import FAKE, free_port, procurator_process, run_cli

from procurator.core.validation import store_path_hash

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _config(cmdline: str = "console=ttyS0") -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


@pytest.fixture
def fleet(tmp_path: Path, nix_env: dict[str, str]) -> Iterator[Any]:
    port = free_port()
    env = {**nix_env, "PROCURATOR_MASTER": f"127.0.0.1:{port}"}
    state = tmp_path / "state"

    class Fleet:
        def __init__(self) -> None:
            self.env = env
            self.state = state

        def apply(self, text: str, *args: str) -> subprocess.CompletedProcess[str]:
            path = tmp_path / "fleet.toml"
            path.write_text(text)
            return run_cli(env, "apply", str(path), *args)

        def status(self) -> dict[str, Any]:
            result = run_cli(env, "status", "--json")
            assert result.returncode == 0, result.stderr
            data: dict[str, Any] = json.loads(result.stdout)
            return data

    master_args = [
        "master",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        str(tmp_path / "m.db"),
        "--metrics-listen",
        "",
    ]
    worker_args = [
        "worker",
        "--id",
        "host-a",
        "--state-dir",
        str(state),
        "--resync-interval",
        "1",
        "--driver",
        "cloud-hypervisor",
        "--vmm-binary",
        f"{sys.executable} {FAKE}",
        "--no-network",
        "--metrics-listen",
        "",
        "--stop-grace",
        "2",
    ]
    with (
        procurator_process(master_args, env, tmp_path / "master.log"),
        procurator_process(worker_args, env, tmp_path / "worker.log") as worker,
    ):
        deadline = time.monotonic() + 30
        while run_cli(env, "status").returncode != 0:
            assert time.monotonic() < deadline, (tmp_path / "master.log").read_text()
            time.sleep(0.2)
        yield Fleet()
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()
        # Leave no VMM behind: remove every VM through the product.
        result = Fleet().apply("[workers.host-a]\nvms = []\n")
        assert result.returncode == 0, result.stdout + result.stderr
        deadline = time.monotonic() + 60
        while True:
            (host_a,) = [w for w in Fleet().status()["workers"] if w["worker_id"] == "host-a"]
            if host_a["observed_generation"] == host_a["desired_generation"] and not host_a["vms"]:
                break
            assert time.monotonic() < deadline, host_a
            time.sleep(0.2)


def test_apply_wait_converges_replaces_and_reports_failures(fleet: Any, add_image: Any) -> None:
    v1 = add_image("web-vm", _config())
    v2 = add_image("web-vm-v2", _config("console=ttyS0 v2"))
    result = fleet.apply(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{v1}" }},'
        f' {{ id = "web-2", image = "{v1}" }} ]\n',
        "--wait",
        "--timeout",
        "60",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "host-a: observed 1/1" in result.stdout
    (worker,) = fleet.status()["workers"]
    # What the worker said of itself at registration, relayed by the master.
    assert worker["info"]["driver"] == "cloud-hypervisor"
    assert worker["info"]["capacity"]["vcpus"] == os.cpu_count()
    assert worker["info"]["capacity"]["memory_mib"] > 0
    assert {vm["id"]: vm["phase"] for vm in worker["vms"]} == {
        "web-1": "running",
        "web-2": "running",
    }

    # The VMM got the config the worker made: disks copied, serial to a file.
    config = json.loads((fleet.state / "vms" / "web-1" / "vm.json").read_text())["config"]
    assert config["serial"] == {
        "mode": "File",
        "file": str(fleet.state / "vms" / "web-1" / "serial.log"),
    }

    result = fleet.apply(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{v1}" }},'
        f' {{ id = "web-2", image = "{v2}" }} ]\n',
        "--wait",
        "--timeout",
        "60",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "replaced: web-2" in result.stdout
    vms = {vm["id"]: vm for vm in fleet.status()["workers"][0]["vms"]}
    assert vms["web-2"]["observed_hash"] == store_path_hash(v2)
    assert vms["web-1"]["observed_hash"] == store_path_hash(v1)

    # A hostile image fails its VM with a message; the others go on.
    evil = add_image("evil-vm", {**_config(), "disks": [{"path": "/etc/shadow"}]})
    result = fleet.apply(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{v1}" }},'
        f' {{ id = "evil", image = "{evil}" }} ]\n',
        "--wait",
        "--timeout",
        "60",
    )
    assert result.returncode == 4, result.stdout + result.stderr
    vms = {vm["id"]: vm for vm in fleet.status()["workers"][0]["vms"]}
    assert vms["evil"]["phase"] == "failed"
    assert "/etc/shadow" in vms["evil"]["message"]
    assert vms["web-1"]["phase"] == "running"


def test_wait_gives_up_on_a_worker_that_never_comes(fleet: Any, add_image: Any) -> None:
    v1 = add_image("web-vm", _config())
    result = fleet.apply(
        f'[workers.host-z]\nvms = [ {{ id = "web-9", image = "{v1}" }} ]\n',
        "--wait",
        "--timeout",
        "1",
    )
    assert result.returncode == 3, result.stdout + result.stderr
    assert "host-z: observed 0/" in result.stdout
    assert "(disconnected)" in result.stdout
