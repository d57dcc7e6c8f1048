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

import contextlib
import itertools
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from movelab import ADDRESS, DISK_BYTES, TARGET, TOKEN, Pinger, Side, two_hosts
from qemuhelpers import wait_for_ready

from procurator.core.jail import JailPolicy
from procurator.worker.stream_auth import preamble
from procurator.worker.vmm.base import VmmError, VmmHandle, VmmTimeout, VmState
from procurator.worker.vmm.process import wait_exit
from procurator.worker.vmm.qemu import _QmpSession, _Target

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

BEFORE = b"written before the move"
_PORTS = itertools.count(7100, 2)
BLOCK = 64 * 1024
FIRST_BLOCK = 1024 * 1024  # the writes during the move: 64 KiB blocks from 1 MiB on


@pytest.fixture
def hosts() -> Iterator[tuple[Side, Side]]:
    with two_hosts(Path("/tmp") / f"pqm-{os.urandom(4).hex()}") as sides:
        yield sides


def _ports() -> tuple[int, int]:
    """Two ports for a move's target (nothing else listens in its
    namespace; each attempt gets its own)."""
    first = next(_PORTS)
    return first, first + 1


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
            "paused before switchover": [
                c["state"]
                for c in session.execute("query-migrate-capabilities")
                if c["capability"] == "pause-before-switchover"
            ],
        }
    finally:
        session.close()


def _send(
    a: Side,
    source: VmmHandle,
    ports: tuple[int, int],
    *,
    timeout: float,
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """The source's side of a move to b's ``ports``, made in a's namespace."""
    memory, disks = (TARGET, ports[0]), (TARGET, ports[1])
    a.call(
        lambda: a.driver.send_migration(
            source, memory=memory, disks=disks, token=TOKEN, timeout=timeout, progress=progress
        )
    )


def _target(image: Path, side: Side, ports: tuple[int, int], *, nic: bool = True) -> VmmHandle:
    """A fresh target: an empty disk of the source's size, an incoming QEMU."""
    side.driver.clear_leftovers(side.paths(), unrecorded=False, grace=1.0)
    side.fresh_disk()
    return side.launch(
        image, nic=nic, memory=(TARGET, ports[0]), disks=(TARGET, ports[1]), token=TOKEN
    )


def test_live_move_between_namespaces(test_image: Path, hosts: tuple[Side, Side]) -> None:
    a, b = hosts
    a.fresh_disk(BEFORE)
    source = a.launch(test_image)
    wait_for_ready(a.paths(), source)
    _ping(a)
    boot_id = _boot_id(a)
    clean = {
        "jobs": [],
        "mirror nodes": [],
        "status": "running",
        "paused before switchover": [False],
    }

    # 1. Nobody listens on the target's ports: refused at once. The guest
    # was paused before the call: it runs afterwards all the same.
    a.driver.pause(source, timeout=5.0)
    ports = _ports()
    with pytest.raises(VmmError, match="cannot reach the move's target"):
        _send(a, source, ports, timeout=30.0)
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
    _ping(a)

    # 2. The target dies at the first progress report (the disk being
    # mirrored), then at the first one with the memory in the total (the
    # mirror in sync, the memory going).
    for phase, beyond in (("mirroring", -1), ("memory", DISK_BYTES)):
        ports = _ports()
        kill_target = _killer(_target(test_image, b, ports), beyond)
        with pytest.raises(VmmError) as failed:
            _send(a, source, ports, timeout=30.0, progress=kill_target)
        print(f"target killed while {phase}: {failed.value}")
        assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
        assert a.driver.state(source, timeout=5.0) is VmState.RUNNING
        _ping(a)

    # 3. The link between the hosts fails (packets dropped, nobody resets a
    # connection) at the first report, and the guest writes on: the mirror's
    # write to the target hangs in flight, the move times out and must still
    # be undone, the hung NBD connection included.
    ports = _ports()
    stranded = _target(test_image, b, ports)
    with pytest.raises(VmmTimeout, match=r"did not end within 5 s \(.*\); undone$") as failed:
        _send(a, source, ports, timeout=5.0, progress=_cutter(a))
    print(f"link cut while mirroring: {failed.value}")
    a.run("ip", "link", "set", "link0", "up")
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
    _ping(a)
    b.driver.shutdown_vmm(stranded, timeout=10.0)

    # 4. The target cannot load the device state, the last thing sent (it
    # has no NIC): it must say so to the source, whose move then fails with
    # its guest running on, instead of a source stopped for good after
    # sending a state nobody loaded.
    ports = _ports()
    misfit = _target(test_image, b, ports, nic=False)
    with pytest.raises(VmmError, match="migrating the VM failed") as failed:
        _send(a, source, ports, timeout=60.0)
    print(f"a target that cannot load the state: {failed.value}")
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
    _ping(a)
    b.driver.shutdown_vmm(misfit, timeout=10.0)

    # 5. A target that expects another move's token (or whose port
    # someone else reached): it refuses the source's first connection
    # (the disk's) before QEMU is given it, and the move is undone.
    ports = _ports()
    other = b.launch(
        test_image, memory=(TARGET, ports[0]), disks=(TARGET, ports[1]), token=bytes(16)
    )
    with pytest.raises(VmmError, match="refused the stream: wrong token"):
        _send(a, source, ports, timeout=30.0)
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == clean
    _ping(a)
    b.driver.shutdown_vmm(other, timeout=10.0)

    # 6. The move (with intruders on the target's ports).
    _move(test_image, a, b, source, boot_id)


def _cutter(a: Side) -> Callable[[int, int], None]:
    """A progress callback that, at its first call, takes a's end of the
    link between the hosts down and writes to the guest's disk."""

    def cut(done: int, total: int) -> None:
        if a.run("ip", "link", "show", "link0").stdout.count("state DOWN") == 0:
            a.run("ip", "link", "set", "link0", "down")
            a.qemu_io(f"write -P 0x55 {FIRST_BLOCK} {BLOCK}")

    return cut


def _killer(doomed: VmmHandle, beyond: int) -> Callable[[int, int], None]:
    """A progress callback that kills ``doomed`` at the first report whose
    total is over ``beyond`` bytes."""

    def kill(done: int, total: int) -> None:
        if total > beyond and not wait_exit(doomed.pid, doomed.pid_start_ticks, 0.0):
            os.kill(doomed.pid, signal.SIGKILL)

    return kill


@contextlib.contextmanager
def _intruders(a: Side, ports: tuple[int, int]) -> Iterator[None]:
    """Peers that reach the target's ports before the source, from the
    source's namespace: on each port, one sends garbage and one another
    token (both refused at once), one says nothing and stays (dropped
    once the source came: the ports stop accepting); none may reach QEMU
    or take the source's place."""
    silent: list[socket.socket] = []
    try:
        for port in ports:
            address = (TARGET, port)
            silent.append(a.call(lambda address=address: socket.create_connection(address)))
            with a.call(lambda address=address: socket.create_connection(address)) as garbage:
                garbage.sendall(b"NBDMAGIC\x00\x00\x42\x02\x81\x86\x12\x53")
                assert garbage.recv(1024) == b"error: not a procurator stream\n"
            with a.call(lambda address=address: socket.create_connection(address)) as wrong:
                wrong.sendall(preamble(bytes(16)))
                assert wrong.recv(1024) == b"error: wrong token\n"
        yield
        for conn in silent:
            assert conn.recv(1024) == b""  # dropped, never answered
        for port in ports:
            with pytest.raises(ConnectionRefusedError):
                a.call(lambda port=port: socket.create_connection((TARGET, port)))
    finally:
        for conn in silent:
            conn.close()


def _move(image: Path, a: Side, b: Side, source: VmmHandle, boot_id: str) -> None:
    """Move the guest from a to b and check it arrived whole: the disk is
    written through QEMU's block layer at each progress report, as the guest
    would write it: at every report while the disk is mirrored (its total is
    the disk's: there is always a first one), then at those while the
    memory goes (its total is in); not at the last (done == total), when
    the source has given its disks up (QEMU asserts on a write then).
    Intruders (``_intruders``) wait on the target's ports all along."""
    ports = _ports()
    target = _target(image, b, ports)
    written: list[tuple[int, int]] = []
    reports: list[tuple[int, int]] = []

    def write_on(done: int, total: int) -> None:
        reports.append((done, total))
        if len(written) < 32 and (total <= DISK_BYTES or done < total):
            offset, byte = FIRST_BLOCK + len(written) * BLOCK, 0x41 + len(written)
            a.qemu_io(f"write -P {byte:#x} {offset} {BLOCK}")
            written.append((offset, byte))

    with _intruders(a, ports), Pinger(a) as pinger:
        started = time.monotonic()
        _send(a, source, ports, timeout=120.0, progress=write_on)
        b.call(lambda: b.driver.finish_incoming(target, timeout=60.0))
        total = time.monotonic() - started
        assert a.driver.state(source, timeout=5.0) is VmState.PAUSED  # postmigrate, for good
        assert b.driver.state(target, timeout=5.0) is VmState.RUNNING
        _ping(a)  # from a, over the veth, to the guest now on b
        replies, gap = pinger.stop()
    print(
        f"live move: {total:.2f} s in all, longest ping gap {gap:.2f} s ({replies} replies), "
        f"{len(written)} writes during it"
    )
    assert _boot_id(a) == boot_id  # the same boot: memory moved, no reboot
    assert written and reports[-1][0] == reports[-1][1] > DISK_BYTES

    a.driver.shutdown_vmm(source, timeout=10.0)
    b.driver.shutdown_vmm(target, timeout=30.0)  # flushes the guest's disk
    data = b.disk().read_bytes()
    assert data.startswith(BEFORE)
    for offset, byte in written:
        assert data[offset : offset + BLOCK] == bytes([byte]) * BLOCK, hex(offset)


def _jailed(pid: int) -> None:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert JailPolicy().slot_of(int(fields["Uid"].split()[0])) is not None, fields["Uid"]
    assert fields["Seccomp"].strip() == "2"


def test_jailed_live_move(test_image: Path) -> None:
    """Both QEMUs jailed as a worker runs them (own uid, mount namespace,
    seccomp, QEMU's -sandbox): the move needs no path, device or network
    right beyond the jail's, the sockets being handed over."""
    with two_hosts(Path("/tmp") / f"pqm-{os.urandom(4).hex()}", jailed=True) as (a, b):
        a.fresh_disk(BEFORE)
        source = a.launch(test_image)
        _jailed(source.pid)
        wait_for_ready(a.paths(), source)
        _ping(a)
        _move(test_image, a, b, source, _boot_id(a))
        _jailed(b.handles[-1].pid)
