"""A real QEMU guest under full confinement, end to end: real ``procurator
master`` and ``worker`` processes in a network namespace (procurator.lab),
the worker jailing its VMMs as it does by default, a Debian kernel booting
under TCG. The guest boots, answers on the bridge (ping, HTTP), is replaced
by a new image, survives ``kill -9`` of its worker and is re-adopted; at
every step its QEMU runs as the VM's uid, in namespaces of its own, under
its own seccomp filter and in a cgroup with its limits, which ``describe``
and the worker's metrics show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute
from testnames import netns_name

from procurator.core.jail import JailPolicy
from procurator.lab import WORKER_METRICS_PORT, Lab, build_test_image

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

MIB = 1 << 20
POLICY = JailPolicy()


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    return {
        "v1": build_test_image("--argstr", "name", "jail-vm"),
        "v2": build_test_image("--argstr", "name", "jail-vm-v2"),
    }


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(netns_name("pq-jail"), stop_grace=10, resync_interval=2) as running:
        running.start_master()
        running.start_worker()
        yield running


def _jailed(pid: int) -> dict[str, Any]:
    """What QEMU ``pid`` runs as and in, read from the outside."""
    fields = {
        k: v.strip()
        for k, _, v in (
            line.partition(":") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    }
    uid = int(fields["Uid"].split()[0])
    assert POLICY.slot_of(uid) is not None, f"QEMU runs as uid {uid}"
    assert fields["Uid"].split() == [str(uid)] * 4 and fields["Gid"].split() == [str(uid)] * 4
    assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2" and fields["Seccomp_filters"] == "2"  # the jail's, -sandbox
    for ns in ("mnt", "pid"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}")
    cgroup = {
        controller: path
        for _, controllers, path in (
            line.split(":", 2) for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        )
        for controller in controllers.split(",")
    }
    assert cgroup["memory"].endswith("/web-1") and cgroup["pids"].endswith("/web-1"), cgroup
    memory = Path("/sys/fs/cgroup/memory") / cgroup["memory"].lstrip("/")
    limits = {
        "memory": int((memory / "memory.limit_in_bytes").read_text()),
        "pids": int(
            (Path("/sys/fs/cgroup/pids") / cgroup["pids"].lstrip("/") / "pids.max").read_text()
        ),
    }
    return {"uid": uid, "limits": limits, "cgroup": cgroup["memory"]}


def _describe(lab: Lab, vm_id: str) -> dict[str, Any]:
    described: dict[str, Any] = json.loads(lab.cli("describe", "vm", vm_id, "--json").stdout)
    return described


def _metrics(lab: Lab, vm_id: str) -> dict[str, float]:
    text = lab.fetch(f"http://127.0.0.1:{WORKER_METRICS_PORT}/metrics")
    found = {}
    for line in text.splitlines():
        wanted = ("procurator_vm_confinement{", "procurator_vm_memory_limit_bytes{")
        if line.startswith(wanted) and f'vm="{vm_id}"' in line:
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def _wait(predicate: Any, what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.5)


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


def test_a_jailed_qemu_boots_pings_is_replaced_and_readopted(
    lab: Lab, images: dict[str, str]
) -> None:
    lab.apply([("web-1", images["v1"])])
    address = lab.wait_ready("web-1")
    _ping(lab, address)
    first = lab.guest_status(address)
    pid = lab.vmm_pids()["web-1"]
    jail = _jailed(pid)
    guest_mib = 256  # the test image's memory
    assert jail["limits"] == {
        "memory": (guest_mib * MIB) + POLICY.memory_overhead_mib * MIB,
        "pids": POLICY.pids_max,
    }
    # describe (the event that told of its start) and the metrics say what
    # holds: the jail's filter and QEMU's own, the limits read back.
    described = _describe(lab, "web-1")
    [booted] = [e for e in described["events"] if e["kind"] == "booted"]
    assert f"uid {jail['uid']}; mount+pid ns; seccomp (2 filters)" in booted["message"]
    assert "cgroup v1: memory.max 512 MiB, cpu.max 1 CPU, pids.max 256" in booted["message"]
    assert not [e for e in described["events"] if e["kind"] == "warning"]
    _wait(lambda: _metrics(lab, "web-1"), "the VM's confinement metrics")
    metrics = _metrics(lab, "web-1")
    assert all(v == 1.0 for k, v in metrics.items() if "procurator_vm_confinement" in k)
    assert len([k for k in metrics if "procurator_vm_confinement" in k]) == 7
    # The VM's files: its run directory is its uid's, its records are not.
    run_dir = lab.vm_dir("web-1") / "run"
    assert run_dir.stat().st_uid == jail["uid"] and lab.vm_dir("web-1").stat().st_uid == 0
    # Its tap is its uid's (how an unprivileged QEMU may attach to it).
    [tap] = lab.taps()
    with IPRoute(netns=lab.netns) as ipr:
        [link] = ipr.get_links(ifname=tap)
    assert link.get(("linkinfo", "data", "IFLA_TUN_OWNER")) == jail["uid"]
    assert link.get(("linkinfo", "data", "IFLA_TUN_GROUP")) == jail["uid"]

    # A new image replaces it: a new QEMU, jailed the same way, the same uid.
    lab.apply([("web-1", images["v2"])])
    _wait(lambda: lab.vmm_pids().get("web-1") not in (None, pid), "the replacement")
    assert lab.wait_ready("web-1") == address
    replaced = lab.vmm_pids()["web-1"]
    assert _jailed(replaced)["uid"] == jail["uid"]
    second = lab.guest_status(address)
    assert second["boot_id"] != first["boot_id"]
    _ping(lab, address)

    # kill -9 of the worker: the guest runs on, the next worker re-adopts it
    # (not restarted), jailed as it was.
    lab.stop_worker(sig=signal.SIGKILL)
    assert lab.vmm_pids()["web-1"] == replaced
    lab.start_worker()
    _wait(
        lambda: (
            (s := lab.try_status()) is not None
            and s["workers"][0]["connected"]
            and {v["phase"] for v in s["workers"][0]["vms"]} == {"running"}
        ),
        "the worker back with its VM running",
    )
    assert lab.vmm_pids()["web-1"] == replaced
    assert lab.guest_status(address)["boot_id"] == second["boot_id"]
    assert _jailed(replaced)["uid"] == jail["uid"]
    # The event is waited for: a new session's first (whole) status goes in
    # a call before the events queued meanwhile.
    _wait(
        lambda: any(e["kind"] == "readopted" for e in _describe(lab, "web-1")["events"]),
        "the readopted event",
    )
    readopted = _describe(lab, "web-1")
    assert readopted["observed"]["restarts"] == 0
    assert any(
        e["kind"] == "readopted" and f"uid {jail['uid']}; mount+pid ns" in e["message"]
        for e in readopted["events"]
    )
    replaced_event = [e for e in readopted["events"] if e["kind"] == "replaced"]
    assert replaced_event and "memory.max 512 MiB" in replaced_event[-1]["message"]

    # Removed: no QEMU, no cgroup left.
    cgroup = Path("/sys/fs/cgroup/memory") / jail["cgroup"].lstrip("/")
    assert cgroup.is_dir()
    lab.apply([])
    assert lab.vmm_pids() == {}
    assert not cgroup.exists()
