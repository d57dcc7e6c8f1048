"""A live move's source told to cancel mid-migration (issue 30; the move's
``cancelling``: its live transfer without a peer): the move service
cancels the running ``send_migration`` (cloud-hypervisor: its relay
closed, the stream breaks, the VMM resumes its VM) and reports the verdict
while the transfer is assigned. Before, nothing cancelled it: the slow
migration went on to completion, the source wrote its "sent" mark and gave
up its VMM after the move had failed (the VM stopped everywhere), and the
verdict was never reported (the transfer had changed). Real fake
cloud-hypervisor processes (the source's slowed by its
``migration_frame_delay`` fault) under a real VmManager, the stream over a
real TCP socket to a target's incoming VMM."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, root
from vmmhelpers import FAST, FAST_POLICY, definition, kill_all_under

from procurator.core.models import (
    Assignment,
    DiskTransfer,
    Phase,
    TransferProgress,
    TransferState,
    VmAssignment,
)
from procurator.worker.manager import VmManager
from procurator.worker.move_service import MoveTransfers
from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import MOVED_OUT_FILE, VmSpec

TOKEN = bytes(range(0x40, 0x50))
IMAGE = "/nix/store/" + "s" * 32 + "-vm"

__all__ = ["driver", "root"]  # fixtures


def _last(published: list[tuple[TransferProgress, ...]]) -> TransferProgress | None:
    return next((t for t in published[-1] if t.op_id == "op-m"), None) if published else None


async def test_a_cancelled_migration_is_undone_and_its_verdict_reported(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    state = root / "source"
    here = VmManager(
        state, driver, timeouts=FAST, policy=FAST_POLICY, on_change=lambda o, e: None, jail=None
    )
    target = StateDir(root / "target").paths("vm1")
    target.vmm_dir.mkdir(parents=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    incoming = None
    try:
        here.ensure(VmSpec("vm1", "h1", definition()))
        with trio.fail_after(20):  # a hang guard: it boots
            while (obs := here.get("vm1")) is None or obs.phase is not Phase.RUNNING:
                await trio.sleep(0.02)
        pid = obs.pid
        vm = VmAssignment("vm1", "h1", IMAGE)
        # Eight frames, a second before each: far longer than the cancel takes.
        api = StateDir(state).paths("vm1").api_socket
        Path(f"{api}.fault").write_text(json.dumps({"migration_frame_delay": 1.0}))
        incoming = driver.launch_incoming(
            definition(),
            target,
            memory=("127.0.0.1", port),
            disks=None,
            token=TOKEN,
            timeout=20.0,
        )
        migrate = DiskTransfer("vm1", "op-m", False, TOKEN.hex(), f"127.0.0.1:{port}", live=True)
        published: list[tuple[TransferProgress, ...]] = []
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()
            service = MoveTransfers(here, listener, state, on_progress=published.append, retry=0.05)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                service.take_assignment(Assignment("host-a", 1, (vm,), transfers=(migrate,)))
                with trio.fail_after(20):  # a hang guard: the driver reports bytes
                    while (now := _last(published)) is None or not now.total:
                        await trio.sleep(0.02)
                assert now.state is TransferState.SENDING, now
                # The move is cancelling: its transfer, without a peer.
                cancel = DiskTransfer("vm1", "op-m", False, TOKEN.hex(), live=True)
                service.take_assignment(Assignment("host-a", 2, (vm,), transfers=(cancel,)))
                with trio.fail_after(20):  # a hang guard: the verdict
                    while (now := _last(published)) is None or now.state is TransferState.SENDING:
                        await trio.sleep(0.02)
                nursery.cancel_scope.cancel()
        assert now.state is TransferState.FAILED, now
        assert "cancelled" in now.message, now
        # The guest runs on here, in the same VMM, with no mark of the move.
        obs = here.get("vm1")
        assert obs is not None and obs.phase is Phase.RUNNING and obs.moved_out is None, obs
        assert not (StateDir(state).vm_dir("vm1") / MOVED_OUT_FILE).exists()
        assert obs.pid == pid, obs
        here.remove("vm1")
    finally:
        here.close()
        if incoming is not None:
            driver.shutdown_vmm(incoming, timeout=5.0)
            process.terminate(incoming.pid, incoming.pid_start_ticks, grace=2.0)


async def test_a_vm_sent_away_by_a_move_that_may_have_failed_says_what_to_do(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # A leader that lost this worker failed its migrating move at once; a
    # worker only cut off can still finish the migration after that. Its
    # VM, held by the "sent" mark, said only 'held until the switch
    # removes it', a switch that never comes.
    state = root / "source"
    first = VmManager(
        state, driver, timeouts=FAST, policy=FAST_POLICY, on_change=lambda o, e: None, jail=None
    )
    try:
        first.ensure(VmSpec("vm1", "h1", definition()))
    finally:
        first.close()  # the worker stops; its VMM lives on
    kill_all_under(state)  # and went with the migration that completed
    mark = StateDir(state).vm_dir("vm1") / MOVED_OUT_FILE
    mark.write_text(json.dumps({"op_id": "op-m", "sent": True}))
    here = VmManager(
        state, driver, timeouts=FAST, policy=FAST_POLICY, on_change=lambda o, e: None, jail=None
    )
    try:
        here.recover()
        await trio.to_thread.run_sync(here.run_job, "vm1", "probe", lambda ctx: None)
        held = here.get("vm1")
        assert held is not None and held.phase is Phase.STOPPED and held.pid is None, held
        assert "procurator moves vm1" in held.message, held.message
        assert f"remove {mark} and restart this worker" in held.message, held.message
        here.remove("vm1")
    finally:
        here.close()
