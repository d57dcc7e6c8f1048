"""A live move whose deadline passes mid-migration, with real processes
(issue 30): a master and two workers running the fake cloud-hypervisor,
the source's migration slowed by its ``migration_frame_delay`` fault. The
leader asks the connected source to cancel (``cancelling``), the source
breaks its stream, its VMM resumes the guest, and the move fails by that
verdict: the VM runs on its source, on exactly one worker, never none."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from fleethelpers import AddImage, add_image, nix_env
from moveprocs import WORKERS, runs_on, start_master, until, worker

from procurator.core.fleet import parse_fleet
from procurator.core.move import MoveKind, MovePhase
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
        "disks": [{"path": "disk.img", "readonly": True}],
    }


async def test_a_deadline_mid_migration_cancels_it_and_the_vm_runs_on_its_source(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("cancel-vm", _config(), {"disk.img": b"\0" * (1 << 20)})
    with ExitStack() as stack:
        async with open_bridge() as bridge:
            master, env = await start_master(stack, bridge, tmp_path, nix_env)
            for w in WORKERS:
                stack.enter_context(worker(w, master, tmp_path, env))
            async with open_control(bridge, parse_address(master)) as control:
                await until(control, lambda s: sum(w.connected for w in s.workers) == 2)
                await control.apply(
                    parse_fleet(
                        f'[[vms]]\nid = "web-1"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n'
                    )
                )
                await until(control, lambda s: runs_on(s, "web-1") == {"host-a"})
                # Eight frames, 2 s before each: the migration would take
                # 16 s, twice the move's deadline, and its own timeout is
                # the worker's 300 s.
                sock = tmp_path / "host-a" / "vms" / "web-1" / "run" / "api.sock"
                Path(f"{sock}.fault").write_text(json.dumps({"migration_frame_delay": 2.0}))
                await control.move("web-1", "host-b", kind=MoveKind.LIVE, timeout_s=8)
                phases: list[MovePhase] = []
                with trio.fail_after(60):  # a hang guard only
                    while True:
                        (move, *_) = await control.moves("web-1")
                        if not phases or phases[-1] is not move.phase:
                            phases.append(move.phase)
                        if move.over:
                            break
                        await trio.sleep(0.05)
                assert MovePhase.MIGRATING in phases, (phases, move)
                # Cancelling may end between two looks (the fake sees the
                # broken stream at its next frame): the reason says it.
                assert phases[-1] is MovePhase.FAILED, (phases, move)
                assert move.reason.startswith("not done before the deadline"), move
                assert "the migration cancelled on host-a" in move.reason, move
                # The guest runs on at the source, and only there (before:
                # the migration completed after the fail had stopped the
                # target's incoming VMM, or was broken by it).
                status = await until(control, lambda s: runs_on(s, "web-1") == {"host-a"})
                (source,) = [w for w in status.workers if w.worker_id == "host-a"]
                assert source.status is not None
                (vm,) = [v for v in source.status.vms if v.id == "web-1"]
                assert vm.restarts == 0, vm  # the same VMM: resumed, not restarted
                Path(f"{sock}.fault").unlink()
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
