"""A drain with real processes (issue 27): a master and two workers (the
fake VMM of tests/fakes, cloud-hypervisor driver, no network), four
unpinned VMs on host-a; ``procurator worker drain host-a
--max-unavailable 2 --wait`` moves them to host-b. At every sampled
moment (the master's view, read with blocking status calls) every VM runs
on at least one worker and at most two run on both; at the end all four
run on host-b only."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from fleethelpers import FAKE, AddImage, add_image, nix_env, procurator_process
from testnames import free_port

from procurator.core.control import FleetStatus
from procurator.core.errors import UnavailableError
from procurator.core.fleet import parse_fleet
from procurator.core.models import Phase
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient, open_control

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]

VMS = ("web-1", "web-2", "web-3", "web-4")
DRAIN = [sys.executable, "-m", "procurator", "worker", "drain", "host-a"]
BOUND = 2


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def _fleet(image: str) -> str:
    return "".join(
        f'[[vms]]\nid = "{vm}"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n\n' for vm in VMS
    )


@contextmanager
def _worker(worker_id: str, master: str, tmp_path: Path, env: dict[str, str]) -> Iterator[None]:
    args = ["worker", "--id", worker_id, "--master", master]
    args += ["--state-dir", str(tmp_path / worker_id), "--resync-interval", "1"]
    args += ["--driver", "cloud-hypervisor", "--vmm-binary", sys.executable, "--vmm-arg", str(FAKE)]
    args += ["--no-network", "--metrics-listen", "", "--stop-grace", "2", "--cpu-overcommit", "4"]
    with procurator_process(args, env, tmp_path / f"{worker_id}.log") as proc:
        yield
        assert proc.poll() is None, (tmp_path / f"{worker_id}.log").read_text()[-4000:]


def _running(status: FleetStatus) -> dict[str, set[str]]:
    """VM id -> the connected workers that report it running."""
    on: dict[str, set[str]] = {vm: set() for vm in VMS}
    for w in status.workers:
        if w.connected and w.status is not None:
            for vm in w.status.vms:
                if vm.phase is Phase.RUNNING and vm.id in on:
                    on[vm.id].add(w.worker_id)
    return on


async def _until(control: ControlClient, what: str, done: Any) -> FleetStatus:
    with trio.fail_after(60):  # a hang guard only
        status = await control.status()
        while not done(status):
            status = await control.status(wait_index=status.change_index, wait=1.0)
    return status


async def test_a_drain_keeps_every_vm_running_and_at_most_the_bound_twice(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("drain-vm", _config())
    master = f"127.0.0.1:{free_port()}"
    args = ["master", "--listen", master, "--db", str(tmp_path / "m.db"), "--metrics-listen", ""]
    env = {**nix_env, "PROCURATOR_MASTER": master}
    log = tmp_path / "master.log"
    with ExitStack() as stack:
        master_process = stack.enter_context(procurator_process(args, env, log))
        async with open_bridge() as bridge:
            with trio.fail_after(60):  # a hang guard: the master starts
                while True:
                    try:
                        async with open_control(bridge, parse_address(master)) as control:
                            await control.status()
                            break
                    except UnavailableError:
                        assert master_process.poll() is None, log.read_text()[-4000:]
                    await trio.sleep(0.1)
            stack.enter_context(_worker("host-a", master, tmp_path, env))
            stack.enter_context(_worker("host-b", master, tmp_path, env))
            async with open_control(bridge, parse_address(master)) as control:
                await _until(
                    control, "both workers", lambda s: sum(w.connected for w in s.workers) == 2
                )
                await control.apply(parse_fleet(_fleet(image)))
                # Equal workers, binpack: the lower id takes all four.
                await _until(
                    control,
                    "the VMs to run",
                    lambda s: all(on == {"host-a"} for on in _running(s).values()),
                )
                samples: list[dict[str, set[str]]] = []
                result: list[Any] = []

                async def drain() -> None:
                    result.append(
                        await trio.run_process(
                            [*DRAIN, "--max-unavailable", str(BOUND), "--wait", "--timeout", "60"],
                            capture_stdout=True,
                            capture_stderr=True,
                            check=False,
                            env=env,
                        )
                    )

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain)
                    status = await control.status()
                    with trio.fail_after(90):  # a hang guard only
                        while not result:
                            samples.append(_running(status))
                            status = await control.status(wait_index=status.change_index, wait=0.5)
                (done,) = result
                assert done.returncode == 0, done.stdout + done.stderr
                assert b"worker host-a drained (4 VM(s) moved)" in done.stdout
                await _until(
                    control,
                    "host-a to stop its copies",
                    lambda s: all(on == {"host-b"} for on in _running(s).values()),
                )
                twice = [sum(1 for on in sample.values() if len(on) > 1) for sample in samples]
                lost = [vm for sample in samples for vm, on in sample.items() if not on]
                assert lost == [] and max(twice) <= BOUND, (twice, lost)
                assert len(samples) > 4
                # Leave no VMM behind: remove every VM through the product.
                await control.apply(
                    parse_fleet("[workers.host-a]\nvms = []\n[workers.host-b]\nvms = []\n")
                )
                await _until(
                    control,
                    "every VM to be removed",
                    lambda s: all(
                        w.status is not None
                        and not w.status.vms
                        and w.status.observed_generation == w.desired_generation
                        for w in s.workers
                    ),
                )
