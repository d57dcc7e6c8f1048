"""Healing with a real guest (issue 27): a master and two workers (QEMU
under TCG, the offline test image, ``--no-network``: nothing here touches
the host's network), one unpinned VM. The host of its worker dies — the
worker process and its QEMU are both killed with SIGKILL (a killed worker
process alone leaves its VMM running: that host lives on, and healing
would run the VM twice; docs/SCHEDULING.md, the fence's known limits) —
and the VM boots on the other worker one lease later. One boot per worker.

The dead host's leftovers (its VM's cgroup, its image's GC root) are
removed as a host's reinstall would, not by a worker: a returning worker
is tests/placement/test_partition.py's case."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import live_processes, procurator_process, run_cli
from testnames import free_port

from procurator.core.jail import JailPolicy
from procurator.lab import build_test_image
from procurator.worker.jail import remove_worker_cgroups
from procurator.worker.state import StateDir

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

LEASE = "3"  # --worker-lease and --leader-lease
READY = "PROCURATOR-READY"


@pytest.fixture(scope="module")
def image() -> str:
    return build_test_image("--argstr", "name", "heal-vm")


def _worker(worker_id: str, state: Path) -> list[str]:
    return [
        "worker",
        "--id",
        worker_id,
        "--state-dir",
        str(state),
        "--driver",
        "qemu",
        "--qemu-accel",
        "tcg",
        "--no-network",
        "--resync-interval",
        "1",
        "--stop-grace",
        "10",
        "--metrics-listen",
        "",
    ]


def _qemu_pids(state: Path) -> list[int]:
    """Live QEMU processes of the worker on ``state``."""
    found = []
    needle = f"{state}/vms/".encode()
    for pid, cmdline in live_processes():
        if b"qemu-system" in cmdline and needle in cmdline:
            found.append(pid)
    return found


def _serial(state: Path, vm_id: str) -> str:
    path = StateDir(state).paths(vm_id).serial_file
    return path.read_text(errors="replace") if path.exists() else ""


def _forget_dead_host(state: Path) -> None:
    """What a reinstall of the dead host does: its VMs' cgroups (and
    anything left in them) and its image roots, with Nix's records of them."""
    parent = os.environ.get("PROCURATOR_CGROUP_PARENT", JailPolicy().cgroup_parent)
    remove_worker_cgroups(state, parent)
    auto = Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
    with contextlib.suppress(FileNotFoundError):
        for entry in auto.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(entry).startswith(f"{state}/"):
                    entry.unlink()


def wait_for(what: str, condition: Callable[[], bool], logs: list[Path], timeout: float) -> None:
    """Poll ``condition``; ``timeout`` is a hang guard, not a measurement."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def test_a_dead_hosts_qemu_vm_boots_on_the_other_worker(tmp_path: Path, image: str) -> None:
    master = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "PROCURATOR_MASTER": master,
        "NIX_CONF_DIR": os.environ.get("NIX_CONF_DIR", "/var/cache/procurator/test-image/nix-conf"),
    }
    states = {w: tmp_path / w for w in ("host-a", "host-b")}
    logs = [tmp_path / f"{n}.log" for n in ("master", "host-a", "host-b")]
    args = ["master", "--listen", master, "--db", str(tmp_path / "m.db"), "--metrics-listen", ""]
    args += ["--worker-lease", LEASE, "--leader-lease", LEASE]

    def status() -> dict[str, Any]:
        result = run_cli(env, "status", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def running_on() -> dict[str, str]:
        return {
            vm["id"]: w["worker_id"]
            for w in status()["workers"]
            for vm in w["vms"]
            if vm["phase"] == "running"
        }

    with ExitStack() as stack:
        stack.callback(_forget_dead_host, states["host-a"])
        stack.enter_context(procurator_process(args, env, logs[0]))
        host_a = stack.enter_context(
            procurator_process(_worker("host-a", states["host-a"]), env, logs[1])
        )
        stack.enter_context(procurator_process(_worker("host-b", states["host-b"]), env, logs[2]))
        stack.callback(_remove_every_vm, env, states["host-b"], logs)
        wait_for(
            "both workers to connect",
            lambda: (
                run_cli(env, "status").returncode == 0
                and {w["worker_id"] for w in status()["workers"] if w["connected"]}
                == {"host-a", "host-b"}
            ),
            logs,
            60,
        )
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(f'[[vms]]\nid = "web-1"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 256\n')
        result = run_cli(env, "apply", str(fleet), "--wait", "--timeout", "180")
        assert result.returncode == 0, result.stdout + result.stderr
        wait_for(
            "the guest on host-a", lambda: READY in _serial(states["host-a"], "web-1"), logs, 120
        )
        assert running_on() == {"web-1": "host-a"}
        (doomed,) = _qemu_pids(states["host-a"])

        # The host dies: its worker and its VMM, at once.
        host_a.send_signal(signal.SIGKILL)
        os.kill(doomed, signal.SIGKILL)
        host_a.wait()
        wait_for("the QEMU to die", lambda: not _qemu_pids(states["host-a"]), logs, 30)

        wait_for(
            "the guest on host-b",
            lambda: (
                READY in _serial(states["host-b"], "web-1") and running_on() == {"web-1": "host-b"}
            ),
            logs,
            180,
        )
        assert len(_qemu_pids(states["host-b"])) == 1
        events = run_cli(env, "events", "--vm", "web-1", "--json")
        assert events.returncode == 0, events.stderr
        moved = [
            e for e in map(json.loads, events.stdout.splitlines()) if e["kind"] == "rescheduled"
        ]
        assert len(moved) == 1 and "worker lost" in moved[0]["message"], moved


def _remove_every_vm(env: dict[str, str], state: Path, logs: list[Path]) -> None:
    """The surviving worker removes its VM through the product; ``--wait``
    until it has converged: its VMM gone is not enough, the worker releases
    the image's GC root after the VMM stops (a test ending in between left
    the root behind)."""
    empty = state.parent / "empty.toml"
    empty.write_text("[workers.host-b]\nvms = []\n")
    result = subprocess.run(
        [sys.executable, "-m", "procurator", "apply", str(empty), "--wait", "--timeout", "120"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for("host-b's QEMU to stop", lambda: not _qemu_pids(state), logs, 60)
