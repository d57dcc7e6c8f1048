"""A rollout with real processes (issue 28): a master and a worker process,
the fake VMM, 100 VMs rolled with max_parallel 5 (health "none": running
for min_healthy_time is healthy, judged by the worker). At every sampled
moment at most 5 VMs are unavailable (not running, or running the new
image and not yet reported healthy); the rollout ends done with every VM
on the new image, each replaced once. Then, lean (6 VMs): a canary pauses
the rollout until ``rollout promote``, and an image that cannot be
prepared stops the next one in prepare with nothing changed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from typing import Any

import pytest
from fleethelpers import AddImage, FakeFleet

from procurator.core.validation import store_path_hash

pytestmark = [pytest.mark.root, pytest.mark.nix]

VMS = 100  # the scale: 20 windows of 5


def _config(cmdline: str) -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def fleet(image: str, n: int = VMS) -> str:
    entries = ", ".join(f'{{ id = "vm-{i:02d}", image = "{image}" }}' for i in range(n))
    return (
        f"[workers.host-a]\nvms = [ {entries} ]\n"
        '[rollout]\nmax_parallel = 5\nhealth = "none"\nmin_healthy_time = "500ms"\n'
        'healthy_deadline = "60s"\n'
    )


def test_a_hundred_vms_roll_never_more_than_five_unavailable(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    v1 = add_image("roll-vm", _config("console=ttyS0"))
    v2 = add_image("roll-vm-v2", _config("console=ttyS0 v2"))
    fake_fleet.apply_ok(fleet(v1))
    new = store_path_hash(v2)
    path = fake_fleet.dir / "fleet-v2.toml"
    path.write_text(fleet(v2))
    applying = subprocess.Popen(
        [sys.executable, "-m", "procurator", "apply", str(path), "--wait", "--timeout", "400"],
        env=fake_fleet.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    worst, samples = 0, 0
    try:
        while applying.poll() is None:
            # The VMs first, then the rollout: a rollout still under way
            # after the VMs were read was under way when they were.
            vms = fake_fleet.status_vms()
            shown = fake_fleet.cli("rollout", "status", "--json")
            if shown.returncode != 0:  # not applied yet: "no rollout yet"
                assert "no rollout yet" in shown.stderr, shown.stderr
                continue
            rollout = json.loads(shown.stdout)
            # Once the rollout is over its checks are no longer sent (the
            # worker reports them unchecked): only a VM not running counts.
            gating = rollout["phase"] not in ("done", "failed", "reverted")
            unavailable = {
                vm_id: (vm["phase"], vm["health"])
                for vm_id, vm in vms.items()
                if vm["phase"] != "running"
                or (gating and vm["observed_hash"] == new and vm["health"] != "healthy")
            }
            switching = [vm["id"] for vm in rollout["vms"] if vm["state"] == "switching"]
            worst = max(worst, len(unavailable))
            samples += 1
            assert len(unavailable) <= 5, unavailable
            assert len(switching) <= 5, switching
        out, err = applying.communicate(timeout=10)
    finally:
        if applying.poll() is None:
            applying.kill()
            applying.wait()
    assert applying.returncode == 0, out + err
    assert "rollout ro-" in out and ": done: " in out
    assert samples >= 2, samples  # the rollout was watched while it ran
    shown = fake_fleet.json("rollout", "status")
    assert shown["phase"] == "done"
    assert {vm["state"] for vm in shown["vms"]} == {"healthy"}
    assert 4 <= shown["batches"] <= VMS  # a sliding window of 5 over 100
    vms = fake_fleet.status_vms()
    assert {vm["observed_hash"] for vm in vms.values()} == {new}
    # Each VM replaced once: one "replaced" event each.
    listed = fake_fleet.cli("events", "--limit", "1000", "--json")
    assert listed.returncode == 0, listed.stderr
    events = [json.loads(line) for line in listed.stdout.splitlines()]
    replaced = Counter(e["vm_id"] for e in events if e["kind"] == "replaced")
    assert replaced == dict.fromkeys(vms, 1), replaced


def wait_phase(fleet_: FakeFleet, phases: set[str], timeout: float = 60) -> dict[str, Any]:
    shown: dict[str, Any] = {}

    def reached() -> bool:
        nonlocal shown
        shown = fleet_.json("rollout", "status")
        return shown["phase"] in phases

    fleet_.wait_for(f"the rollout to be {sorted(phases)}", reached, timeout=timeout)
    return shown


def test_a_canary_waits_for_promotion_and_an_image_that_cannot_be_prepared_changes_nothing(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    v1 = add_image("canary-vm", _config("console=ttyS0"))
    v2 = add_image("canary-vm-v2", _config("console=ttyS0 v2"))
    canary = "canary = 1\n"
    fake_fleet.apply_ok(fleet(v1, 6) + canary)
    applied = fake_fleet.apply(fleet(v2, 6) + canary)
    assert applied.returncode == 0, applied.stderr
    waiting = wait_phase(fake_fleet, {"awaiting promotion", "failed", "reverted"})
    assert waiting["phase"] == "awaiting promotion", waiting
    assert [vm["state"] for vm in waiting["vms"]] == ["healthy"] + ["waiting"] * 5
    assert [vm["canary"] for vm in waiting["vms"]] == [True] + [False] * 5
    promoted = fake_fleet.cli("rollout", "promote")
    assert promoted.returncode == 0, promoted.stderr
    assert wait_phase(fake_fleet, {"done", "failed", "reverted"})["phase"] == "done"
    on_v2 = {f"vm-{i:02d}": store_path_hash(v2) for i in range(6)}
    fake_fleet.wait_for(
        "every VM on v2",
        lambda: {k: v["observed_hash"] for k, v in fake_fleet.status_vms().items()} == on_v2,
    )
    # A closure no substituter has: the rollout stops in prepare, naming
    # the worker and the path, and no VM changes.
    missing = "/nix/store/" + "0" * 32 + "-never-built"
    applied = fake_fleet.apply(fleet(missing, 6))
    assert applied.returncode == 0, applied.stderr
    failed = wait_phase(fake_fleet, {"done", "failed", "reverted"})
    assert failed["phase"] == "failed"
    assert failed["reason"].startswith(f"worker host-a cannot prepare {missing}")
    assert {vm["state"] for vm in failed["vms"]} == {"waiting"}
    assert {k: v["observed_hash"] for k, v in fake_fleet.status_vms().items()} == on_v2
