"""The fence with real processes: a master and a worker (the fake VMM of
tests/fakes, cloud-hypervisor driver), two unpinned VMs, one
``reschedule`` and one ``wait``. The master is frozen (SIGSTOP: its
connections stay open, nothing answers): after ``--fence-after`` the
worker pauses the ``reschedule`` VM and leaves the ``wait`` VM running;
the master thaws (SIGCONT): the worker takes its whole assignment and the
VM runs again."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import AddImage, FakeFleet, add_image, nix_env, running_fake_fleet

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]

FENCE_AFTER = "2"


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def _fleet(image: str) -> str:
    return f"""
[[vms]]
id = "moves"
image = "{image}"
vcpus = 1
memory_mib = 64

[[vms]]
id = "stays"
image = "{image}"
vcpus = 1
memory_mib = 64
on_worker_lost = "wait"
"""


def _fenced_log(fleet: FakeFleet) -> list[dict[str, Any]]:
    return [r for r in fleet.worker_records() if "fenced after" in r.get("message", "")]


def test_a_frozen_master_fences_the_reschedule_vm_and_a_thawed_one_restores_it(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("fence-vm", _config())
    with running_fake_fleet(tmp_path, nix_env, worker_args=("--fence-after", FENCE_AFTER)) as fleet:
        fleet.apply_ok(_fleet(image))
        vms = fleet.status_vms()
        assert {v: vms[v]["phase"] for v in ("moves", "stays")} == {
            "moves": "running",
            "stays": "running",
        }
        assert fleet.master is not None
        # A worker that started before its master listened (a loaded host)
        # fenced once already, holding nothing: count the fences from here.
        earlier = len(_fenced_log(fleet))
        fleet.master.send_signal(signal.SIGSTOP)
        try:
            fleet.wait_for("the fence", lambda: len(_fenced_log(fleet)) > earlier)
            (fenced,) = _fenced_log(fleet)[earlier:]
            assert "1 reschedule VM(s) paused: moves" in fenced["message"]
            fleet.wait_for(
                "the VM to be paused",
                lambda: _paused_by_the_vmm(fleet, "moves"),
            )
            assert not _paused_by_the_vmm(fleet, "stays")
        finally:
            fleet.master.send_signal(signal.SIGCONT)

        def restored() -> bool:
            vms = fleet.status_vms()
            return vms["moves"]["phase"] == "running" and vms["stays"]["phase"] == "running"

        fleet.wait_for("the VM to run again", restored)
        # A worker registering anew sends its whole status first and its
        # events in a call after it: the resumed event is waited for.
        events: list[dict[str, Any]] = []

        def resumed_told() -> bool:
            result = fleet.cli("events", "--vm", "moves", "--json")
            assert result.returncode == 0, result.stderr
            events[:] = [json.loads(line) for line in result.stdout.splitlines()]
            return any(e["kind"] == "resumed" for e in events)

        fleet.wait_for("the resumed event", resumed_told)
        kinds = [e["kind"] for e in events]
        fenced = [e for e in events if "fenced: no master for" in e["message"]]
        assert [e["kind"] for e in fenced] == ["paused"], events
        # Paused, then resumed: the VM never stopped, and was not restarted.
        assert kinds.index("paused") < kinds.index("resumed"), kinds
        assert "stays" not in {e["vm_id"] for e in events}


def _paused_by_the_vmm(fleet: FakeFleet, vm_id: str) -> bool:
    """Did the worker's supervisor pause the VM (the VMM took the pause:
    its ``paused`` event, which the worker logs)?"""
    return any(
        str(r.get("message", "")).startswith(f"VM {vm_id}: paused: ")
        for r in fleet.worker_records()
    )
