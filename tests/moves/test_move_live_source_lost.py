"""A cloud-hypervisor live move whose source worker dies right after the
migration completed (issue 30): its VMM streamed the whole state, the
target's cloud-hypervisor resumed the guest by itself, and the worker is
killed (``kill -9``) before it hears the migration is done (the fake's
``migration_answer_delay``), so it never reports ``sent``. The target
reports ``received`` and the master switches on it: the move ends done on
the target, the VM running in the VMM that received it (not booted
again). Before, the target only ever said ``ready``: the master waited
for the source until its lease expired, failed the move (lost source)
and stopped the target's running guest. Processes: a master and two
workers with the fake cloud-hypervisor (tests/moves/moveprocs.py)."""

from __future__ import annotations

import json
import signal
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio
from fleethelpers import FAKE, AddImage, add_image, live_processes, nix_env
from moveprocs import WORKERS, runs_on, start_master, until, worker

from procurator.core.fleet import parse_fleet
from procurator.core.move import MoveKind, MovePhase
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import open_control

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _vmm_pids(vm_dir: Path) -> set[int]:
    """The live fake VMMs of the VM whose directory is ``vm_dir``."""
    return {
        pid
        for pid, cmdline in live_processes()
        if str(FAKE).encode() in cmdline and f"{vm_dir}/".encode() in cmdline
    }


async def test_a_source_lost_after_the_migration_completed_leaves_the_move_done(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    config = {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "disks": [{"path": "disk.img", "readonly": True}],
    }
    image = add_image("lost-src-vm", config, {"disk.img": b"\0" * (1 << 20)})
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
                await until(control, lambda s: runs_on(s, "web-1") == {"host-a"})
                source = tmp_path / "host-a" / "vms" / "web-1"
                target = tmp_path / "host-b" / "vms" / "web-1"
                # The source's VMM answers 5 s after its stream completed:
                # its worker is killed before it hears (the master's lease
                # is 20 s: no 'lost' before the move is over, fixed).
                sock = source / "run" / "api.sock"
                Path(f"{sock}.fault").write_text(json.dumps({"migration_answer_delay": 5.0}))
                move = await control.move("web-1", "host-b", kind=MoveKind.LIVE, timeout_s=60)
                log = target / "run" / "vmm.log"
                with trio.fail_after(30):  # a hang guard: the target received the state
                    while not (log.exists() and "migration received" in log.read_text()):
                        await trio.sleep(0.01)
                workers["host-a"].send_signal(signal.SIGKILL)
                workers["host-a"].wait()
                (received_by,) = _vmm_pids(target)
                with trio.fail_after(60):  # a hang guard only
                    while (now := (await control.moves("web-1"))[0]).op_id != move.op_id or (
                        not now.over
                    ):
                        await trio.sleep(0.1)
                assert now.phase is MovePhase.DONE, now
                await until(control, lambda s: runs_on(s, "web-1") == {"host-b"})
                # Not booted again: the VMM that received the state runs it.
                assert _vmm_pids(target) == {received_by}
                assert "vm.boot" not in log.read_text()
                # The source's worker back: it removes what is left of the VM.
                workers["host-a"] = stack.enter_context(worker("host-a", master, tmp_path, env))
                await control.apply(
                    parse_fleet("[workers.host-a]\nvms = []\n[workers.host-b]\nvms = []\n")
                )
                await until(
                    control,
                    lambda s: (
                        sum(w.connected for w in s.workers) == 2
                        and all(
                            w.status is not None
                            and not w.status.vms
                            and w.status.observed_generation == w.desired_generation
                            for w in s.workers
                        )
                    ),
                )
                assert not _vmm_pids(source) and not _vmm_pids(target)
