"""Healing with real processes (issue 27): a master process with short
leases, two worker processes (the product's worker with no VMM: its
handler records assignments and reports them), kill -9 one worker — its
``reschedule`` VMs are assigned to, and reported by, the other; its
``wait`` VM stays.

The master serves no /metrics (``--metrics-listen ""``): its default port
is fixed (9300), and while any other master on the host held it, this
one exited at start and the test waited out its guard for workers that
could not connect (the flake "timed out while its workers connect")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import trio
from fleethelpers import procurator_process
from testnames import free_port

from procurator.core.control import FleetStatus
from procurator.core.errors import UnavailableError
from procurator.core.fleet import parse_fleet
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import open_control

IMAGE = "/nix/store/" + "f" * 32 + "-vm"
LEASE = 2.0  # --worker-lease and --leader-lease, seconds

FLEET = f"""
[[vms]]
id = "web-1"
image = "{IMAGE}"
vcpus = 1
memory_mib = 1024

[[vms]]
id = "web-2"
image = "{IMAGE}"
vcpus = 1
memory_mib = 1024

[[vms]]
id = "db-1"
image = "{IMAGE}"
vcpus = 1
memory_mib = 1024
on_worker_lost = "wait"
"""

_WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from procurator.app.worker import WorkerConfig, worker_main
    from procurator.core.models import Capacity
    from procurator.worker.link import LinkSettings

    worker_id, master, state = sys.argv[1:]
    worker_main(
        WorkerConfig(
            worker_id=worker_id,
            runtime=None,  # no VMM: assignments are recorded and reported
            master=master,
            state_dir=Path(state),
            link=LinkSettings(resync_interval=1.0, backoff_max=0.5),
            capacity=Capacity(4, 4096, 0),
        )
    )
    """
)


@contextmanager
def worker_process(
    worker_id: str, master: str, tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    state = tmp_path / worker_id
    state.mkdir()
    with open(tmp_path / f"{worker_id}.log", "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, worker_id, master, str(state)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def desired(status: FleetStatus) -> dict[str, str]:
    return {v.id: w.worker_id for w in status.workers for v in w.desired_vms}


def reported(status: FleetStatus, worker_id: str) -> set[str]:
    for w in status.workers:
        if w.worker_id == worker_id and w.connected and w.status is not None:
            return {v.id for v in w.status.vms}
    return set()


async def test_a_killed_workers_reschedule_vms_come_up_on_the_other(tmp_path: Path) -> None:
    port = free_port()
    master = f"127.0.0.1:{port}"
    lease = str(LEASE)
    args = ["master", "--listen", master, "--db", str(tmp_path / "m.db")]
    args += ["--worker-lease", lease, "--leader-lease", lease, "--log-level", "debug"]
    args += ["--metrics-listen", ""]
    log = tmp_path / "master.log"
    with ExitStack() as stack:
        master_process = stack.enter_context(procurator_process(args, dict(os.environ), log))
        host_a = stack.enter_context(worker_process("host-a", master, tmp_path))
        stack.enter_context(worker_process("host-b", master, tmp_path))
        async with open_bridge() as bridge:
            with trio.fail_after(60):  # a hang guard only
                while True:
                    try:
                        async with open_control(bridge, parse_address(master)) as control:
                            status = await control.status()
                            if sum(w.connected for w in status.workers) == 2:
                                break
                    except UnavailableError:
                        # Not listening yet, unless it is gone: then say why.
                        assert master_process.poll() is None, log.read_text()[-4000:]
                    await trio.sleep(0.1)
            async with open_control(bridge, parse_address(master)) as control:
                applied = await control.apply(parse_fleet(FLEET))
                # Equal workers, binpack: the lower id takes all three.
                assert desired(await control.status()) == {
                    "web-1": "host-a",
                    "web-2": "host-a",
                    "db-1": "host-a",
                }
                host_a.send_signal(signal.SIGKILL)
                host_a.wait()
                with trio.fail_after(60):  # a hang guard: lease + one heal
                    status = await control.status()
                    while not {"web-1", "web-2"} <= reported(status, "host-b"):
                        status = await control.status(wait_index=status.change_index, wait=1.0)
                assert status.generation == applied.generation + 1
                assert desired(status) == {
                    "web-1": "host-b",
                    "web-2": "host-b",
                    "db-1": "host-a",  # waits for its worker
                }
