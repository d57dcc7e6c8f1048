"""Snapshots of a jailed QEMU, the way a worker runs it by default: real
``procurator master`` and ``worker`` processes in a network namespace
(procurator.lab), the CLI. The jailed QEMU saves and loads its state
through a descriptor the worker hands it (it could not open the file: the
snapshot lives outside its jail, which is not widened), and the restored
QEMU is jailed like any other."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from testnames import netns_name

from procurator.core.jail import JailPolicy
from procurator.lab import Lab, build_test_image

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(netns_name("pq-snap"), stop_grace=10, resync_interval=2) as running:
        running.start_master()
        running.start_worker()
        yield running


def _ping(lab: Lab, address: str) -> None:
    for _ in range(30):
        ping = subprocess.run(
            ["ip", "netns", "exec", lab.netns, "busybox", "ping", "-c", "1", "-W", "1", address],
            capture_output=True,
            check=False,
        )
        if ping.returncode == 0:
            return
    pytest.fail(f"{address} does not answer ping")


def _jailed_uid(pid: int) -> int:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    uid = int(fields["Uid"].split()[0])
    assert JailPolicy().slot_of(uid) is not None, f"QEMU runs as uid {uid}"
    assert fields["Seccomp"].strip() == "2"
    return uid


def test_a_jailed_qemu_is_snapshotted_and_restored(lab: Lab) -> None:
    image = build_test_image("--argstr", "name", "snap-vm")
    lab.apply([("web-1", image)])
    address = lab.wait_ready("web-1")
    _ping(lab, address)
    booted = lab.guest_status(address)
    pid = lab.vmm_pids()["web-1"]
    _jailed_uid(pid)

    created = json.loads(lab.cli("snapshot", "create", "web-1", "ready", "--json").stdout)
    assert created["worker"] == lab.worker_id and created["size_bytes"] > 0
    stored = lab.vm_dir("web-1") / "snapshots" / "ready" / "state" / "memory"
    assert stored.stat().st_size > 0 and stored.stat().st_uid == 0
    # Its QEMU's mount namespace does not show the stored snapshot.
    assert not os.path.exists(f"/proc/{pid}/root{stored.parent.parent}")
    assert lab.vmm_pids()["web-1"] == pid  # the same QEMU ran on
    time.sleep(2)
    later = lab.guest_status(address)
    later_read = time.monotonic()  # the uptime was read before this
    assert later["boot_id"] == booted["boot_id"] and later["uptime"] > booted["uptime"]

    restored = lab.cli("snapshot", "restore", "web-1", "ready")
    assert "restored on worker" in restored.stdout
    new_pid = lab.vmm_pids()["web-1"]
    assert new_pid != pid
    _jailed_uid(new_pid)
    _ping(lab, address)
    again_asked = time.monotonic()
    again = lab.guest_status(address)
    # The same boot taken back to the snapshot: not a reboot, and half a
    # second behind what a guest that ran on would show (``later`` plus the
    # host's time between the reads; a restored guest is ~2 s behind, less
    # the reads' own durations, however slow the restore was).
    assert again["boot_id"] == booted["boot_id"]
    ran_on = later["uptime"] + (again_asked - later_read)
    assert again["uptime"] < ran_on - 0.5, (again, later, ran_on)
    # The worker tells of it once it sees the VM run, and reports it.
    deadline = time.monotonic() + 60
    while True:
        events = json.loads(lab.cli("describe", "vm", "web-1", "--json").stdout)["events"]
        said = [e["message"] for e in events if e["kind"] == "restored"]
        if said or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert said and "clock" in said[0] and "behind" in said[0], events
