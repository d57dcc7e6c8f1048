"""Cold moves with real processes (issue 30): a master and two workers
(the fake VMM of tests/fakes, cloud-hypervisor driver, no network), one
unpinned VM. ``procurator move`` as a process moves it from host-a to
host-b with the source worker killed (``kill -9``) and restarted mid-move,
then back with the target worker killed and restarted mid-move. At every
sampled moment (each live VMM process found in /proc, by the worker state
directory in its command line) the VM's VMM runs on at most one worker,
each move ends done (the killed worker was back within its lease), and
what the guest wrote to its disk on host-a is on the disk it runs with
after each move (the disk copies travel, checked by size and sha256)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from fleethelpers import FAKE, AddImage, add_image, live_processes, nix_env
from moveprocs import WORKERS, runs_on, start_master, until, worker

from procurator.core.fleet import parse_fleet
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import open_control

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "disks": [{"path": "disk.img"}],
    }


def _vmm_holders(tmp_path: Path, vm_id: str) -> set[str]:
    """The workers whose state directory a live fake VMM of ``vm_id`` is in."""
    marks = {w: f"{tmp_path / w}/vms/{vm_id}/".encode() for w in WORKERS}
    return {
        w
        for _, cmdline in live_processes()
        if str(FAKE).encode() in cmdline
        for w, mark in marks.items()
        if mark in cmdline
    }


async def test_kill_9_of_the_source_or_the_target_mid_move_never_runs_the_vm_twice(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("move-vm", _config(), {"disk.img": b"\0" * (4 << 20)})
    with ExitStack() as stack:
        async with open_bridge() as bridge:
            master, env = await start_master(stack, bridge, tmp_path, nix_env)
            workers = {w: stack.enter_context(worker(w, master, tmp_path, env)) for w in WORKERS}
            async with open_control(bridge, parse_address(master)) as control:
                await until(control, lambda s: sum(w.connected for w in s.workers) == 2)
                await control.apply(
                    parse_fleet(
                        f'[[vms]]\nid = "web-1"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n'
                    )
                )
                # Equal workers, binpack: the lower id takes it.
                await until(control, lambda s: runs_on(s, "web-1") == {"host-a"})
                # What the guest wrote to its disk (the fake VMM writes
                # nothing: the test writes for it) travels with each move.
                disk = Path("vms", "web-1", "disks", Path(image).name, "disk0.img")
                with open(tmp_path / "host-a" / disk, "r+b") as copy:
                    copy.seek(1 << 20)
                    copy.write(b"written on host-a")
                refused = subprocess.run(
                    [sys.executable, "-m", "procurator", "move", "web-1", "--to", "host-z"],
                    capture_output=True,
                    env=env,
                    check=False,
                )
                assert refused.returncode == 1 and b"host-z is unknown" in refused.stderr

                samples: list[set[str]] = []
                # host-a is the source of the first move, the target of the second.
                for target, killed in (("host-b", "host-a"), ("host-a", "host-a")):
                    result: list[subprocess.CompletedProcess[bytes]] = []
                    command = [sys.executable, "-m", "procurator", "move", "web-1", "--to"]
                    command += [target, "--wait", "--timeout", "60", "--json"]

                    async def move(
                        command: list[str] = command,
                        result: list[subprocess.CompletedProcess[bytes]] = result,
                    ) -> None:
                        result.append(
                            await trio.run_process(
                                command,
                                capture_stdout=True,
                                capture_stderr=True,
                                check=False,
                                env=env,
                            )
                        )

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(move)
                        with trio.fail_after(30):  # a hang guard: the move is recorded
                            while not await control.moves("web-1") or all(
                                m.over for m in await control.moves("web-1")
                            ):
                                await trio.sleep(0.02)
                        # kill -9 of the worker process (its VMMs live on),
                        # and a new one, as a supervisor would start.
                        workers[killed].send_signal(signal.SIGKILL)
                        workers[killed].wait()
                        workers[killed] = stack.enter_context(worker(killed, master, tmp_path, env))
                        with trio.fail_after(90):  # a hang guard only
                            while not result:
                                samples.append(_vmm_holders(tmp_path, "web-1"))
                                await trio.sleep(0.01)
                    (done,) = result
                    assert done.returncode == 0, done.stdout + done.stderr
                    phases = [json.loads(line)["phase"] for line in done.stdout.splitlines()]
                    assert phases[-1] == "done", done.stdout + done.stderr
                    await until(control, lambda s, t=target: runs_on(s, "web-1") == {t})
                    with trio.fail_after(30):
                        while _vmm_holders(tmp_path, "web-1") != {target}:
                            await trio.sleep(0.05)
                    data = (tmp_path / target / disk).read_bytes()
                    assert data[1 << 20 : (1 << 20) + 17] == b"written on host-a"
                    assert len(data) == 4 << 20
                    assert "transferring" in phases, phases
                twice = [s for s in samples if len(s) > 1]
                assert twice == [] and len(samples) > 10, twice
                # Leave no VMM behind: remove every VM through the product.
                await control.apply(
                    parse_fleet("[workers.host-a]\nvms = []\n[workers.host-b]\nvms = []\n")
                )
                await until(
                    control,
                    lambda s: all(
                        w.status is not None
                        and not w.status.vms
                        and w.status.observed_generation == w.desired_generation
                        for w in s.workers
                    ),
                )
