"""cloud-hypervisor migrations between two fake VMM processes (real
processes, the stream over a real TCP socket between the two workers'
relays and real unix sockets to the VMMs): the VM's config, counters and
memory arrive, the request sequence on both sides is the documented one,
and a migration that breaks halfway leaves the source running."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from chmhelpers import TOKEN, Host
from vmmhelpers import GUEST, ApiValidator, config, definition, make_jail

from procurator.worker.vmm import process
from procurator.worker.vmm.base import Address, VmExit, VmmError, VmmPaths, VmState


def _memory_digest(paths: VmmPaths) -> str:
    """The fake's guest memory digest, as its log tells after a migration."""
    found = re.findall(r"guest memory sha256 = ([0-9a-f]{64})", paths.log_file.read_text())
    assert len(found) == 1, found
    return str(found[0])


def test_a_migration_moves_the_vm_to_the_target_jailed(
    source: Host, target: Host, address: Address, api: ApiValidator | None
) -> None:
    """Both VMMs jailed, as a worker runs them: the source's VMM connects
    to the worker's socket in its run directory, the target's listens in
    its own, and the relays carry the stream between them over TCP."""
    vm = definition()
    src_jail, tgt_jail = make_jail(source.state_dir), make_jail(target.state_dir)
    src_paths, tgt_paths = source.paths(), target.paths()
    handle = incoming = None
    try:
        handle = source.driver.launch(
            vm, src_paths, timeout=20.0, jail=src_jail.prepare("vm1", vm, src_paths)
        )
        for _ in range(3):  # the guest does I/O: its counters' state grows
            ops = source.write_ops(handle)
        assert ops == 2
        # The mover pauses the VM and copies its writable disks (none here)
        # before sending: cloud-hypervisor cannot mirror them.
        source.driver.pause(handle, timeout=5.0)
        sent_from = len(source.calls.endpoints())
        incoming = target.driver.launch_incoming(
            vm,
            tgt_paths,
            memory=address,
            disks=None,
            token=TOKEN,
            timeout=20.0,
            jail=tgt_jail.prepare("vm1", vm, tgt_paths),
        )
        progress: list[tuple[int, int]] = []
        source.driver.send_migration(
            handle,
            memory=address,
            disks=None,
            token=TOKEN,
            timeout=20.0,
            progress=lambda done, total: progress.append((done, total)),
        )
        target.driver.finish_incoming(incoming, timeout=20.0)
        received = target.calls.endpoints()

        # The target runs the source's VM: its config, its counters' state
        # and its memory (checked against the source's digest by the fake
        # on the way, and logged by both ends).
        assert target.driver.state(incoming, timeout=5.0) is VmState.RUNNING
        info = target.driver.info(incoming, timeout=5.0)
        assert info is not None and info["config"] == config()
        assert target.write_ops(incoming) >= ops
        assert _memory_digest(tgt_paths) == _memory_digest(src_paths)
        # The source stopped for good: its VMM exited cleanly by itself.
        assert process.wait_exit(handle.pid, handle.pid_start_ticks, 10.0)
        assert source.driver.classify_exit(src_paths, handle) is VmExit.POWERED_OFF
        # Nothing of the migration is left in either run directory.
        assert not (src_paths.vmm_dir / "migrate.sock").exists()
        assert not (tgt_paths.vmm_dir / "migrate.sock").exists()
        # Progress: counted by the relay, ending at all of it.
        done = [d for d, _ in progress]
        assert done == sorted(done) and progress[-1][0] == progress[-1][1] > 0

        # The documented sequence, on each side.
        assert source.calls.endpoints()[sent_from:] == ["vm.info", "vm.send-migration"]
        assert [e for e in received if e != "vmm.ping"] == [
            "vm.receive-migration",
            "vm.info",
        ]
        # Every call answered (but pings of a VMM still starting).
        failed = [e for e, _, ok in source.calls.calls + target.calls.calls if not ok]
        assert set(failed) <= {"vmm.ping"}, failed
        if api is not None:
            for call in ("vm.pause", "vm.send-migration", "vm.receive-migration"):
                assert api.seen[f"PUT /api/v1/{call}"] == 1, call
    finally:
        for host, made in ((source, handle), (target, incoming)):
            if made is not None:
                host.driver.shutdown_vmm(made, timeout=5.0)
                process.terminate(made.pid, made.pid_start_ticks, grace=2.0)
        for jail in (src_jail, tgt_jail):
            jail.release("vm1")
            jail.close()


@pytest.mark.parametrize("end", ["source", "target"])
def test_a_migration_failing_halfway_leaves_the_source_running(
    source: Host, target: Host, address: Address, end: str
) -> None:
    """The fake breaks the stream after half the memory, on either end:
    the source's VM runs again (it was paused for the move), in the same
    VMM; the target has no VM, and its VMM goes when the mover stops it."""
    vm = definition()
    src_paths, tgt_paths = source.paths(), target.paths()
    faulty = src_paths if end == "source" else tgt_paths
    Path(f"{faulty.api_socket}.fault").write_text(json.dumps({"migration_fails_halfway": True}))
    handle = source.driver.launch(vm, src_paths, timeout=20.0)
    incoming = None
    try:
        source.driver.pause(handle, timeout=5.0)
        incoming = target.driver.launch_incoming(
            vm, tgt_paths, memory=address, disks=None, token=TOKEN, timeout=20.0
        )
        with pytest.raises(VmmError, match=r"vm\.send-migration with HTTP 500") as sent:
            source.driver.send_migration(
                handle, memory=address, disks=None, token=TOKEN, timeout=20.0
            )
        assert any("halfway" in d or "refused" in d for d in sent.value.details), sent.value
        assert process.is_alive(handle.pid, handle.pid_start_ticks)
        assert source.driver.state(handle, timeout=5.0) is VmState.RUNNING

        with pytest.raises(VmmError, match=r"vm\.receive-migration with HTTP 500"):
            target.driver.finish_incoming(incoming, timeout=20.0)
        assert target.driver.state(incoming, timeout=5.0) is VmState.NOT_CREATED
        target.driver.shutdown_vmm(incoming, timeout=5.0)
        assert process.wait_exit(incoming.pid, incoming.pid_start_ticks, 10.0)
        assert not (src_paths.vmm_dir / "migrate.sock").exists()
    finally:
        source.driver.shutdown_vmm(handle, timeout=5.0)
        process.terminate(handle.pid, handle.pid_start_ticks, grace=2.0)
        if incoming is not None:
            process.terminate(incoming.pid, incoming.pid_start_ticks, grace=2.0)


def test_a_target_whose_source_never_comes_is_stopped_cleanly(
    target: Host, address: Address
) -> None:
    """Abandoning an incoming VMM: the mover stops it; the relay's
    listener and threads go with it."""
    paths = target.paths()
    incoming = target.driver.launch_incoming(
        definition(), paths, memory=address, disks=None, token=TOKEN, timeout=20.0
    )
    target.driver.shutdown_vmm(incoming, timeout=5.0)
    assert process.wait_exit(incoming.pid, incoming.pid_start_ticks, 10.0)
    assert not [t for t in threading.enumerate() if t.name.startswith("migration from")]
    # The receive call's thread ends once its VMM answered (the relay hung
    # up on it) or went.
    for waiting in [t for t in threading.enumerate() if "receive-migration" in t.name]:
        waiting.join(10.0)
        assert not waiting.is_alive()
    # The port is free again.
    again = target.driver.launch_incoming(
        definition(), paths, memory=address, disks=None, token=TOKEN, timeout=20.0
    )
    target.driver.shutdown_vmm(again, timeout=5.0)
    assert process.wait_exit(again.pid, again.pid_start_ticks, 10.0)


def test_a_vm_received_on_other_host_resources_is_refused(
    source: Host, target: Host, address: Address
) -> None:
    """cloud-hypervisor runs a migrated VM on its source's config as it is:
    a target whose definition names other disks (or taps) must not take it
    for its own."""
    src_paths, tgt_paths = source.paths(), target.paths()
    elsewhere = [{"path": str(tgt_paths.vm_dir / "disk.img"), "id": "disk0", "readonly": True}]
    handle = source.driver.launch(definition(), src_paths, timeout=20.0)
    incoming = None
    try:
        source.driver.pause(handle, timeout=5.0)
        incoming = target.driver.launch_incoming(
            definition(disks=elsewhere),
            tgt_paths,
            memory=address,
            disks=None,
            token=TOKEN,
            timeout=20.0,
        )
        source.driver.send_migration(handle, memory=address, disks=None, token=TOKEN, timeout=20.0)
        with pytest.raises(VmmError, match="other host resources") as raised:
            target.driver.finish_incoming(incoming, timeout=20.0)
        assert str(GUEST / "disk.img") in str(raised.value)
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=2.0)
        if incoming is not None:
            target.driver.shutdown_vmm(incoming, timeout=5.0)
            process.terminate(incoming.pid, incoming.pid_start_ticks, grace=2.0)


def test_the_relay_waits_out_the_window_between_bind_and_listen(
    source: Host, target: Host, address: Address
) -> None:
    """The target's VMM makes its socket file (bind) before it listens:
    the relay, which sees the file appear, must not take a refused
    connection in between for a failed migration."""
    src_paths, tgt_paths = source.paths(), target.paths()
    Path(f"{tgt_paths.api_socket}.fault").write_text(json.dumps({"listen_delay": 0.3}))
    handle = source.driver.launch(definition(), src_paths, timeout=20.0)
    incoming = None
    try:
        source.driver.pause(handle, timeout=5.0)
        incoming = target.driver.launch_incoming(
            definition(), tgt_paths, memory=address, disks=None, token=TOKEN, timeout=20.0
        )
        source.driver.send_migration(handle, memory=address, disks=None, token=TOKEN, timeout=20.0)
        target.driver.finish_incoming(incoming, timeout=20.0)
        assert target.driver.state(incoming, timeout=5.0) is VmState.RUNNING
    finally:
        process.terminate(handle.pid, handle.pid_start_ticks, grace=2.0)
        if incoming is not None:
            target.driver.shutdown_vmm(incoming, timeout=5.0)
            process.terminate(incoming.pid, incoming.pid_start_ticks, grace=2.0)
