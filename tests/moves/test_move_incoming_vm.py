"""A live move's target side in the VmManager (vmrecord.Incoming): a VM
held incoming runs an incoming VMM that is never booted, probed or
restarted on its own; the switch's spec lets it run with the state it
received; a worker restart stops its VMM but keeps its disk copies until
the move ends (the switch boots the VM from them). Real fake cloud-hypervisor
processes, the state over real sockets from a source VMM launched by the
same driver."""

from __future__ import annotations

import dataclasses
import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from movevms import driver, root
from vmmhelpers import FAST, FAST_POLICY, definition, vmm_pids_under

from procurator.core.errors import ProcuratorError
from procurator.core.models import EventKind, Phase, PowerState, VmEvent
from procurator.worker.manager import VmManager, VmObservation
from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm.base import Address, VmmHandle
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver
from procurator.worker.vmrecord import MOVED_OUT_FILE, Incoming, MovedOut, VmSpec

TOKEN = bytes(range(0x40, 0x50))

__all__ = ["driver", "root"]  # fixtures


def free_address() -> Address:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return ("127.0.0.1", int(probe.getsockname()[1]))


class Events:
    def __init__(self) -> None:
        self.seen: list[VmEvent] = []

    def __call__(self, obs: VmObservation, event: VmEvent | None) -> None:
        if event is not None:
            self.seen.append(event)


def manager(
    state_dir: Path, driver: CloudHypervisorDriver, events: Events, *, boot: float = FAST.boot
) -> VmManager:
    timeouts = dataclasses.replace(FAST, boot=boot)
    return VmManager(
        state_dir, driver, timeouts=timeouts, policy=FAST_POLICY, on_change=events, jail=None
    )


def source_vmm(root: Path, driver: CloudHypervisorDriver) -> tuple[VmmHandle, Path]:
    paths = StateDir(root / "source").paths("vm1")
    paths.vmm_dir.mkdir(parents=True)
    return driver.launch(definition(), paths, timeout=20.0), paths.log_file


def stop(driver: CloudHypervisorDriver, handle: VmmHandle) -> None:
    if process.is_alive(handle.pid, handle.pid_start_ticks):
        driver.shutdown_vmm(handle, timeout=5.0)
        process.terminate(handle.pid, handle.pid_start_ticks, grace=2.0)


def test_a_vm_held_incoming_runs_the_state_it_received_once_switched(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    events = Events()
    target = manager(root / "target", driver, events)
    address = free_address()
    spec = VmSpec("vm1", "h1", definition(), op_id="op-apply")
    held = dataclasses.replace(spec, incoming=Incoming("op-m", address, None, TOKEN))
    source, source_log = source_vmm(root, driver)
    try:
        obs = target.ensure(held)
        # An incoming VMM: not booted, no VM of this worker's yet.
        assert (obs.incoming, obs.phase, obs.observed_hash) == ("op-m", Phase.STARTING, "h1")
        assert obs.pid is not None and "waits for the VM's state" in obs.message
        # Asked again for the same, it does nothing (no second VMM).
        assert target.ensure(held).pid == obs.pid
        driver.pause(source, timeout=5.0)
        driver.send_migration(source, memory=address, disks=None, token=TOKEN, timeout=20.0)
        # The switch: the same VM, held no longer.
        switched = target.ensure(dataclasses.replace(spec, op_id="op-m"))
        assert (switched.incoming, switched.phase, switched.pid) == ("", Phase.RUNNING, obs.pid)
        assert switched.power is PowerState.RUNNING
        moved = [e for e in events.seen if e.kind is EventKind.BOOTED]
        assert [e.message.split(":")[0] for e in moved] == ["moved in live (move op-m)"]
        assert not any(e.kind is EventKind.CREATED for e in events.seen)
        # The source's VMM gave its VM up and went.
        assert process.wait_exit(source.pid, source.pid_start_ticks, 10.0)
        target_log = StateDir(root / "target").paths("vm1").log_file.read_text()
        digest = [line for line in source_log.read_text().splitlines() if "sha256" in line]
        assert digest and digest[-1].split()[-1] in target_log
        target.remove("vm1")
    finally:
        stop(driver, source)
        target.close()


def test_a_switch_without_the_state_boots_the_vm_from_its_disks(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    events = Events()
    # finish_incoming waits for the state as long as a boot may take.
    target = manager(root / "target", driver, events, boot=1.0)
    spec = VmSpec("vm1", "h1", definition())
    held = dataclasses.replace(spec, incoming=Incoming("op-m", free_address(), None, TOKEN))
    try:
        incoming = target.ensure(held)
        switched = target.ensure(spec)  # the state never came
        assert switched.phase is Phase.RUNNING and switched.pid != incoming.pid
        assert incoming.pid is not None and not process.is_alive(incoming.pid, 0)
        assert any(e.kind is EventKind.BOOTED for e in events.seen)
        target.remove("vm1")
    finally:
        target.close()


def restarted_holding_incoming(state: Path, driver: CloudHypervisorDriver) -> tuple[VmSpec, Path]:
    """A worker that held vm1 incoming for move op-m, with a writable disk
    copy the source mirrored the guest's writes into (the marker), and
    stopped (its VMMs live on): the switch's spec, and the disk copy."""
    disk = StateDir(state).vm_dir("vm1") / "disks" / "image" / "disk0.img"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"\0" * 4096)  # the fresh copy of the image's disk
    rw = [{"path": str(disk), "id": "disk0", "readonly": False}]
    spec = VmSpec("vm1", "h1", definition(disks=rw), op_id="op-m")
    first = manager(state, driver, Events())
    try:
        obs = first.ensure(
            dataclasses.replace(spec, incoming=Incoming("op-m", free_address(), None, TOKEN))
        )
        assert obs.pid is not None
        disk.write_bytes(b"the guest's writes, mirrored")
    finally:
        first.close()
    assert vmm_pids_under(state)
    return spec, disk


def test_a_restarted_worker_keeps_the_disks_of_a_vm_held_incoming(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    # Restarted after the source sent (its guest stopped for good): the
    # disk copies here are the guest's only up-to-date disks. They were
    # deleted with the VM, and the switch booted it from fresh copies.
    state = root / "target"
    spec, disk = restarted_holding_incoming(state, driver)
    events = Events()
    second = manager(state, driver, events)
    try:
        (held,) = second.recover()
        # Its VMM (never booted) stopped, no VMM launched, the move told;
        # still no VM of this worker's (the assignment decides).
        assert second.incoming_dropped == {"vm1": "op-m"}
        assert (held.incoming, held.phase, held.pid) == ("op-m", Phase.PENDING, None), held
        assert "disk copies kept" in held.message, held
        assert vmm_pids_under(state) == {}
        assert disk.read_bytes() == b"the guest's writes, mirrored"
        # The move not over: asked again for the incoming VM, it stays held.
        again = second.ensure(
            dataclasses.replace(spec, incoming=Incoming("op-m", free_address(), None, TOKEN))
        )
        assert (again.phase, again.pid) == (Phase.PENDING, None), again
        # The switch: the VM boots cold from the kept copy.
        switched = second.ensure(spec)
        assert (switched.incoming, switched.phase) == ("", Phase.RUNNING), switched
        assert switched.pid is not None and switched.power is PowerState.RUNNING
        assert any(e.kind is EventKind.BOOTED for e in events.seen)
        assert disk.read_bytes() == b"the guest's writes, mirrored"
        second.remove("vm1")
        assert not StateDir(state).exists("vm1")
    finally:
        second.close()


def test_a_restarted_worker_removes_a_kept_incoming_vm_its_move_no_longer_names(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    state = root / "target"
    restarted_holding_incoming(state, driver)
    second = manager(state, driver, Events())
    try:
        second.recover()
        second.remove("vm1", op_id="op-m")  # the move failed (the move service's)
        assert second.list() == []
        assert not StateDir(state).vm_dir("vm1").exists()
        assert vmm_pids_under(state) == {}
    finally:
        second.close()


def test_an_incoming_vmm_that_cannot_start_fails_once(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    target = manager(root / "target", driver, Events())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = ("127.0.0.1", int(busy.getsockname()[1]))
        held = VmSpec("vm1", "h1", definition(), incoming=Incoming("op-m", address, None, TOKEN))
        try:
            with pytest.raises(ProcuratorError):
                target.ensure(held)
            obs = target.get("vm1")
            assert obs is not None and obs.phase is Phase.FAILED and obs.pid is None
            assert vmm_pids_under(root / "target") == {}
            target.remove("vm1")
        finally:
            target.close()


def test_a_vm_moved_back_live_is_not_held_by_the_mark_of_its_move_away(
    root: Path, driver: CloudHypervisorDriver
) -> None:
    """Moved away live, then back before this worker removed its old copy
    (held by the first move's mark): the VM arrives anew, and runs."""
    events = Events()
    here = manager(root / "target", driver, events)
    spec = VmSpec("vm1", "h1", definition())
    address = free_address()
    source, _ = source_vmm(root, driver)
    try:
        here.ensure(spec)
        here.run_job("vm1", "mark", lambda ctx: ctx.moved_out(MovedOut("op-away", sent=True)))
        deadline = time.monotonic() + 10  # a hang guard: its supervisor stops it next
        while (held := here.get("vm1")) is not None and held.pid is not None:
            assert time.monotonic() < deadline, held
            time.sleep(0.01)
        assert held is not None and held.phase is Phase.STOPPED
        # The move back: held incoming, the state sent, switched.
        incoming = Incoming("op-back", address, None, TOKEN)
        here.ensure(dataclasses.replace(spec, incoming=incoming))
        driver.pause(source, timeout=5.0)
        driver.send_migration(source, memory=address, disks=None, token=TOKEN, timeout=20.0)
        back = here.ensure(spec)
        assert back.phase is Phase.RUNNING and back.moved_out is None
        assert not (StateDir(root / "target").vm_dir("vm1") / MOVED_OUT_FILE).exists()
        here.remove("vm1")
    finally:
        stop(driver, source)
        here.close()
