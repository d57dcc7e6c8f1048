"""Live moves with real processes (issue 30): a master and two workers (the
fake cloud-hypervisor of tests/fakes, no network), one unpinned VM (its
disk read-only: cloud-hypervisor moves no writable disk live).
``procurator move --live`` as a process: a move done (the target's VMM
received the source's guest memory, checked by the fake's digest); a
migration the fake breaks halfway fails the move and leaves the VM running
on its source; then a move with the source worker killed (``kill -9``)
and restarted as it begins, and one with the target killed so. At every
sampled moment at most one worker holds a *booted* VMM of the VM (each
live fake VMM found in /proc, not counting one its worker holds incoming,
as its vm.json says), and every move ends done or failed, never stuck."""

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
from moveprocs import WORKERS, keep_logs, moves_said, runs_on, start_master, until, worker

from procurator.core.fleet import parse_fleet
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient, open_control

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "disks": [{"path": "disk.img", "readonly": True}],
    }


def _booted_holders(tmp_path: Path, vm_id: str) -> set[str]:
    """The workers whose state directory a live fake VMM of ``vm_id`` is
    in, but for one its worker holds incoming (not booted: it waits for
    the state, and runs only once the switch made the VM that worker's)."""
    holders = set()
    for _, cmdline in live_processes():
        if str(FAKE).encode() not in cmdline:
            continue
        for w in WORKERS:
            vm_dir = tmp_path / w / "vms" / vm_id
            if f"{vm_dir}/".encode() in cmdline:
                try:
                    incoming = "incoming" in json.loads((vm_dir / "vm.json").read_text())
                except (OSError, ValueError):
                    incoming = False  # being written or gone: counted, the safe side
                if not incoming:
                    holders.add(w)
    return holders


def _held_for(vm_json: Path) -> str:
    """The op id of the move a VM is held incoming for, as its vm.json
    says ("": none, or the file is being written or gone)."""
    try:
        incoming = json.loads(vm_json.read_text()).get("incoming")
    except (OSError, ValueError):
        return ""
    return str(incoming["op_id"]) if incoming else ""


async def _moving(control: ControlClient, vm_id: str) -> str:
    """The op id of the move of ``vm_id`` under way ("": none yet)."""
    under_way = [m.op_id for m in await control.moves(vm_id) if not m.over]
    return under_way[0] if under_way else ""


def _digests(tmp_path: Path, worker: str) -> list[str]:
    log = tmp_path / worker / "vms" / "web-1" / "run" / "vmm.log"
    text = log.read_text() if log.exists() else ""
    return [line.rsplit(" ", 1)[-1] for line in text.splitlines() if "memory sha256 =" in line]


async def test_live_moves_end_done_or_failed_and_never_boot_the_vm_twice(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("live-vm", _config(), {"disk.img": b"\0" * (1 << 20)})
    samples: list[set[str]] = []
    with ExitStack() as stack:
        async with open_bridge() as bridge:
            master, env = await start_master(stack, bridge, tmp_path, nix_env)
            workers = {w: stack.enter_context(worker(w, master, tmp_path, env)) for w in WORKERS}
            async with open_control(bridge, parse_address(master)) as control:

                async def settle(done: Any) -> None:
                    await until(control, done, logs=tmp_path)

                await settle(lambda s: sum(w.connected for w in s.workers) == 2)
                await control.apply(
                    parse_fleet(
                        f'[[vms]]\nid = "web-1"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n'
                    )
                )
                await settle(lambda s: runs_on(s, "web-1") == {"host-a"})

                async def move(target: str, killed: str = "", drain: str = "") -> list[str]:
                    """``procurator move --live`` (or ``worker drain``),
                    sampled throughout; the phases it printed."""
                    result: list[subprocess.CompletedProcess[bytes]] = []
                    command = [sys.executable, "-m", "procurator", "move", "web-1", "--to"]
                    command += [target, "--live", "--wait", "--timeout", "60", "--json"]
                    if drain:
                        command = [sys.executable, "-m", "procurator", "worker", "drain", drain]
                        command += ["--wait"]

                    async def run() -> None:
                        result.append(
                            await trio.run_process(
                                command,
                                capture_stdout=True,
                                capture_stderr=True,
                                check=False,
                                env=env,
                            )
                        )

                    async def stuck(why: str) -> AssertionError:
                        """A hang guard's failure, readable: the command's
                        output, the moves, the logs (kept under /tmp)."""
                        out = b"".join(r.stdout + r.stderr for r in result).decode()
                        moves = await moves_said(control, "web-1")
                        kept = keep_logs(tmp_path)
                        return AssertionError(
                            f"{why} (move to {target}, {killed or 'none'} killed)\n"
                            f"command {[r.returncode for r in result]}: {out}\n"
                            f"moves: {moves}\nlogs kept in {kept}"
                        )

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(run)
                        if killed:
                            # Mid-move: the target holds its incoming VMM.
                            # Held for this move, not a stale file of the
                            # last one's (its removal may still be under way).
                            held = tmp_path / target / "vms" / "web-1" / "vm.json"
                            op_id = ""
                            try:
                                with trio.fail_after(30):  # a hang guard
                                    while not (op_id and _held_for(held) == op_id):
                                        if result:
                                            raise await stuck("the move ended before it held")
                                        if not op_id:
                                            op_id = await _moving(control, "web-1")
                                        await trio.sleep(0.01)
                            except trio.TooSlowError:
                                raise await stuck("the target never held the VM incoming") from None
                            workers[killed].send_signal(signal.SIGKILL)
                            workers[killed].wait()
                            workers[killed] = stack.enter_context(
                                worker(killed, master, tmp_path, env)
                            )
                        try:
                            with trio.fail_after(90):  # a hang guard only
                                while not result:
                                    samples.append(_booted_holders(tmp_path, "web-1"))
                                    await trio.sleep(0.01)
                        except trio.TooSlowError:
                            raise await stuck("the move command never ended") from None
                    (done,) = result
                    assert done.returncode in (0, 4), done.stdout + done.stderr
                    if drain:
                        return []
                    return [json.loads(line)["phase"] for line in done.stdout.splitlines()]

                # Done: the target's VMM holds the source's guest memory.
                source_digest = _digests(tmp_path, "host-a")
                phases = await move("host-b")
                # A phase shorter than the command's two reads may not print.
                assert phases[-1] == "done", phases
                await settle(lambda s: runs_on(s, "web-1") == {"host-b"})
                moved = _digests(tmp_path, "host-b")
                assert moved and (not source_digest or moved[-1] == source_digest[-1]), moved

                # The fake breaks the stream halfway: failed, still on host-b.
                sock = tmp_path / "host-b" / "vms" / "web-1" / "run" / "api.sock"
                Path(f"{sock}.fault").write_text(json.dumps({"migration_fails_halfway": True}))
                phases = await move("host-a")
                (failed,) = [m for m in await control.moves("web-1") if m.phase.value == "failed"]
                assert phases[-1] == "failed" and "migration failed" in failed.reason, failed
                await settle(lambda s: runs_on(s, "web-1") == {"host-b"})
                Path(f"{sock}.fault").unlink()

                # kill -9 of the source, then of the target, as a move begins.
                # Each move goes from where the VM runs now: a source killed
                # mid-migration may fail the first one (the VM stays there),
                # and a move to the worker it is on is refused.
                for kill_source in (True, False):
                    (source,) = runs_on(await control.status(), "web-1")
                    (target,) = set(WORKERS) - {source}
                    phases = await move(target, source if kill_source else target)
                    assert phases[-1] in ("done", "failed"), phases
                    where = {target} if phases[-1] == "done" else {source}
                    await settle(lambda s, w=where: runs_on(s, "web-1") == w)
                # A drain of the worker that runs it moves it live.
                await settle(lambda s: sum(w.connected for w in s.workers) == 2)
                (holder,) = runs_on(await control.status(), "web-1")
                other = (set(WORKERS) - {holder}).pop()
                await move(other, drain=holder)  # --wait: until the drain is done
                await settle(lambda s: runs_on(s, "web-1") == {other})
                drained = [m for m in await control.moves("web-1") if m.source == holder]
                assert drained[0].phase.value == "done" and drained[0].kind.value == "live"
                (emptied,) = [w for w in (await control.status()).workers if w.worker_id == holder]
                assert emptied.mode is not None and emptied.mode.moved == 1, emptied.mode
                twice = [s for s in samples if len(s) > 1]
                assert twice == [] and len(samples) > 10, twice
                # Leave no VMM behind: remove every VM through the product.
                await control.apply(
                    parse_fleet("[workers.host-a]\nvms = []\n[workers.host-b]\nvms = []\n")
                )
                await settle(
                    lambda s: all(
                        w.status is not None
                        and not w.status.vms
                        and w.status.observed_generation == w.desired_generation
                        for w in s.workers
                    ),
                )
