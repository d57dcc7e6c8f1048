"""What the move tests with real processes share (test_move_process.py,
test_move_live_process.py): a master process, worker processes running
the fake cloud-hypervisor (no network, a transfer address), and waiting
on the fleet's status."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import trio
from fleethelpers import FAKE, procurator_process
from testnames import free_port

from procurator.core.control import FleetStatus
from procurator.core.errors import UnavailableError
from procurator.core.models import Phase
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import ControlClient, open_control

__all__ = ["WORKERS", "keep_logs", "moves_said", "runs_on", "start_master", "until", "worker"]

WORKERS = ("host-a", "host-b")


@contextmanager
def worker(
    worker_id: str, master: str, tmp_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    args = ["worker", "--id", worker_id, "--master", master]
    args += ["--state-dir", str(tmp_path / worker_id), "--resync-interval", "1"]
    args += ["--driver", "cloud-hypervisor", "--vmm-binary", sys.executable, "--vmm-arg", str(FAKE)]
    args += ["--no-network", "--metrics-listen", "", "--stop-grace", "2"]
    args += ["--transfer-listen", "127.0.0.1:0"]
    with procurator_process(args, env, tmp_path / f"{worker_id}.log") as proc:
        yield proc


async def start_master(
    stack: ExitStack, bridge: Bridge, tmp_path: Path, nix_env: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """A master process (a worker lease of 20 s: a killed worker is back
    well before it is lost), answering; its address and the environment
    that names it."""
    master = f"127.0.0.1:{free_port()}"
    args = ["master", "--listen", master, "--db", str(tmp_path / "m.db"), "--metrics-listen", ""]
    args += ["--worker-lease", "20"]
    env = {**nix_env, "PROCURATOR_MASTER": master}
    log = tmp_path / "master.log"
    process = stack.enter_context(procurator_process(args, env, log))
    with trio.fail_after(60):  # a hang guard: the master starts
        while True:
            try:
                async with open_control(bridge, parse_address(master)) as control:
                    await control.status()
                    return master, env
            except UnavailableError:
                assert process.poll() is None, log.read_text()[-4000:]
            await trio.sleep(0.1)


async def until(control: ControlClient, done: Any, logs: Path | None = None) -> FleetStatus:
    """The fleet's status once ``done(status)``; a hang guard's failure
    keeps the logs of ``logs`` (a test's tmp_path) and says where."""
    last: FleetStatus | None = None  # the last status seen, for the failure
    try:
        with trio.fail_after(60):  # a hang guard only
            status = last = await control.status()
            while not done(status):
                status = last = await control.status(wait_index=status.change_index, wait=1.0)
    except trio.TooSlowError:
        if logs is None:
            raise
        moves = await moves_said(control)
        raise AssertionError(
            f"never so: {last}\nmoves: {moves}\nlogs kept in {keep_logs(logs)}"
        ) from None
    return status


def keep_logs(tmp_path: Path) -> Path:
    """A copy, under /tmp (kept: pytest rotates its tmp dirs), of the
    master's and the workers' logs (``tmp_path/*.log``, a restarted
    worker appending to its log) and of each worker's VMs' vm.json and
    vmm.log, for a hang guard's failure to name; the copy's directory."""
    kept = Path(tempfile.mkdtemp(prefix="procurator-moves-", dir="/tmp"))
    files = [*tmp_path.glob("*.log"), *tmp_path.glob("*/vms/*/vm.json")]
    for path in [*files, *tmp_path.glob("*/vms/*/run/vmm.log")]:
        with contextlib.suppress(OSError):  # a VM's file removed meanwhile
            shutil.copy(path, kept / "-".join(path.relative_to(tmp_path).parts))
    return kept


async def moves_said(control: ControlClient, vm_id: str = "") -> str:
    """``control.moves(vm_id)`` for a failure's message, or that the
    master did not answer (a hang guard's message must not hang)."""
    with trio.move_on_after(10):
        return str(await control.moves(vm_id))
    return "(the master did not answer control.moves in 10 s)"


def runs_on(status: FleetStatus, vm_id: str) -> set[str]:
    """The connected workers that report ``vm_id`` running."""
    return {
        w.worker_id
        for w in status.workers
        if w.connected
        and w.status is not None
        and any(v.id == vm_id and v.phase is Phase.RUNNING for v in w.status.vms)
    }
