"""Live moves of a real guest between two QEMUs (TCG), each in its own
network namespace with its own bridge, the bridges joined by a veth
(movelab): the driver's ``launch_incoming`` / ``send_migration`` /
``finish_incoming``, the way a worker's move will call them.

One guest boot serves the whole story, because every failed move must
leave the source exactly fit for the next attempt: a move to a port
nobody listens on fails; a move whose target is killed halfway fails; in
both the source guest runs on, answers ping and has no mirror job, NBD
node or migration left; then a move succeeds, with the disk written
before and during it, and the guest (the same boot) answers ping on the
target, the gap printed (bench/move.py measures it)."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from movelab import ADDRESS, Pinger, Side, two_hosts
from qemuhelpers import wait_for_ready

from procurator.worker.vmm.base import VmmError, VmmHandle, VmState
from procurator.worker.vmm.qemu import _QmpSession, _Target

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

BEFORE = b"written before the move"
LOCALHOST = "127.0.0.1"
BLOCK = 64 * 1024
FIRST_BLOCK = 1024 * 1024  # the writes during the move: 64 KiB blocks from 1 MiB on


@pytest.fixture
def hosts() -> Iterator[tuple[Side, Side]]:
    with two_hosts(Path("/tmp") / f"pqm-{os.urandom(4).hex()}") as sides:
        yield sides


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((LOCALHOST, 0))
        return int(probe.getsockname()[1])


def _ping(side: Side, attempts: int = 30) -> None:
    for _ in range(attempts):
        if side.run("busybox", "ping", "-c", "1", "-W", "1", ADDRESS, check=False).returncode == 0:
            return
    pytest.fail(f"{ADDRESS} does not answer ping")


def _boot_id(side: Side) -> str:
    out = side.run("busybox", "wget", "-q", "-O", "-", f"http://{ADDRESS}/cgi-bin/status").stdout
    return out.split('"boot_id": "', 1)[1].split('"', 1)[0]


def _leftovers(side: Side) -> dict[str, object]:
    """What a move may leave in the source QEMU (asked on the second monitor)."""
    assert side.monitor is not None
    session = _QmpSession(_Target("test", str(side.monitor)), time.monotonic() + 30)
    try:
        nodes = [n["node-name"] for n in session.execute("query-named-block-nodes")]
        return {
            "jobs": session.execute("query-jobs"),
            "mirror nodes": [n for n in nodes if n.startswith("procurator-")],
            "migration": session.execute("query-migrate").get("status"),
            "status": session.execute("query-status")["status"],
        }
    finally:
        session.close()


def _target(image: Path, side: Side, ports: tuple[int, int]) -> VmmHandle:
    """A fresh target: an empty disk of the source's size, an incoming QEMU."""
    paths = side.paths()
    side.driver.clear_leftovers(paths, unrecorded=False, grace=1.0)
    side.fresh_disk()
    handle = side.driver.launch_incoming(
        side.definition(image),
        paths,
        memory=(LOCALHOST, ports[0]),
        disks=(LOCALHOST, ports[1]),
        timeout=30.0,
    )
    side.handles.append(handle)
    return handle


def test_live_move_between_namespaces(test_image: Path, hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.fresh_disk(BEFORE)
    source = a.driver.launch(a.definition(test_image), a.paths(), timeout=30.0)
    a.handles.append(source)
    wait_for_ready(a.paths(), source)
    _ping(a)
    boot_id = _boot_id(a)
    clean = {"jobs": [], "mirror nodes": [], "status": "running"}

    # 1. Nobody listens on the target's ports: refused at once.
    ports = (_free_port(), _free_port())
    with pytest.raises(VmmError, match="cannot reach the move's target"):
        a.driver.send_migration(
            source, memory=(LOCALHOST, ports[0]), disks=(LOCALHOST, ports[1]), timeout=30.0
        )
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
    _ping(a)

    # 2. The target dies while the disk is mirrored.
    ports = (_free_port(), _free_port())
    doomed = _target(test_image, b, ports)

    def kill_target(done: int, total: int) -> None:
        os.kill(doomed.pid, signal.SIGKILL)

    with pytest.raises(VmmError):
        a.driver.send_migration(
            source,
            memory=(LOCALHOST, ports[0]),
            disks=(LOCALHOST, ports[1]),
            timeout=30.0,
            progress=kill_target,
        )
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
    assert a.driver.state(source, timeout=5.0) is VmState.RUNNING
    _ping(a)

    # 3. The move: the disk is written through QEMU's block layer at each
    # progress report (while mirroring, then while memory goes), as the
    # guest would write it; not at the last (done == total), when the
    # source has given its disks up (QEMU asserts on a write then).
    ports = (_free_port(), _free_port())
    target = _target(test_image, b, ports)
    written: list[tuple[int, int]] = []
    reports: list[tuple[int, int]] = []

    def write_on(done: int, total: int) -> None:
        reports.append((done, total))
        if len(written) < 32 and done < total:
            offset, byte = FIRST_BLOCK + len(written) * BLOCK, 0x41 + len(written)
            a.qemu_io(f"write -P {byte:#x} {offset} {BLOCK}")
            written.append((offset, byte))

    with Pinger(a) as pinger:
        started = time.monotonic()
        a.driver.send_migration(
            source,
            memory=(LOCALHOST, ports[0]),
            disks=(LOCALHOST, ports[1]),
            timeout=120.0,
            progress=write_on,
        )
        b.driver.finish_incoming(target, timeout=60.0)
        total = time.monotonic() - started
        assert a.driver.state(source, timeout=5.0) is VmState.PAUSED  # postmigrate, for good
        assert b.driver.state(target, timeout=5.0) is VmState.RUNNING
        _ping(a)  # from a, over the veth, to the guest now on b
        replies, gap = pinger.stop()
    print(f"live move: {total:.2f} s in all, longest ping gap {gap:.2f} s ({replies} replies)")
    assert _boot_id(a) == boot_id  # the same boot: memory moved, no reboot
    assert len(written) >= 2 and reports[-1][0] == reports[-1][1] > 0

    a.driver.shutdown_vmm(source, timeout=10.0)
    b.driver.shutdown_vmm(target, timeout=30.0)  # flushes the guest's disk
    data = b.disk().read_bytes()
    assert data.startswith(BEFORE)
    for offset, byte in written:
        assert data[offset : offset + BLOCK] == bytes([byte]) * BLOCK, hex(offset)
