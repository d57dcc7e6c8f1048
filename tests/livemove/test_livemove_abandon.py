"""A QEMU source whose worker stopped in the middle of a live move
(issue 30): the driver's ``send_migration`` undoes a failed move in the
call itself, so a worker killed in it leaves QEMU paused at the
switchover (waiting for a ``migrate-continue`` nobody sends), or, killed
after that but before it wrote "sent", ``postmigrate``. The restarted
worker's driver (a fresh ``QemuDriver``, the handle adopted) must undo it
with ``abandon_migration``: the guest runs on the source again with its
disks writable, no mirror job or node left, and the target's incoming
QEMU never ran the guest.

The dead worker's state is made with the driver's own pieces
(``_Outgoing.to_switchover`` and ``switch_over``), stopped where the
worker died: its copies of the move's connections closed, no undo."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from movelab import TARGET, TOKEN, Side, two_hosts
from qemuhelpers import wait_for_ready
from test_livemove_qemu import _leftovers, _ping, _ports, _target

from procurator.worker.vmm.base import VmmHandle, VmState
from procurator.worker.vmm.process import wait_exit
from procurator.worker.vmm.qemu import QemuDriver, _Outgoing

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

CLEAN = {
    "jobs": [],
    "mirror nodes": [],
    "status": "running",
    "paused before switchover": [False],
}


@pytest.fixture
def hosts() -> Iterator[tuple[Side, Side]]:
    with two_hosts(Path("/tmp") / f"pqa-{os.urandom(4).hex()}") as sides:
        yield sides


def _worker_dies(a: Side, source: VmmHandle, ports: tuple[int, int], *, completed: bool) -> None:
    """What a worker killed in ``send_migration`` leaves: the move driven
    to the switchover (``completed``: through it) in a's namespace, then
    only this process's copies of the connections closed (they die with
    the worker), nothing undone."""
    driver = a.driver

    def move() -> None:
        with driver._session(source, time.monotonic() + 120.0) as session:
            outgoing = _Outgoing(driver._target(source), session, TOKEN, None)
            try:
                assert outgoing.to_switchover((TARGET, ports[0]), (TARGET, ports[1]))
                if completed:
                    outgoing.switch_over()
            finally:
                outgoing.close()

    a.call(move)


def _never_ran(b: Side, target: VmmHandle) -> None:
    """The target's QEMU started with ``-S`` and its guest wrote nothing
    to its serial console: it never ran."""
    serial = b.paths().serial_file
    assert not serial.exists() or serial.stat().st_size == 0, serial.read_bytes()[:200]
    if not wait_exit(target.pid, target.pid_start_ticks, 0.0):
        argv = Path(f"/proc/{target.pid}/cmdline").read_bytes().split(b"\0")
        assert b"-S" in argv


def test_restarted_worker_abandons_the_migration(
    test_image: Path, hosts: tuple[Side, Side]
) -> None:
    a, b = hosts
    a.fresh_disk(b"before")
    source = a.launch(test_image)
    wait_for_ready(a.paths(), source)
    _ping(a)

    for completed in (False, True):
        ports = _ports()
        target = _target(test_image, b, ports)
        _worker_dies(a, source, ports, completed=completed)
        left = _leftovers(a)
        if completed:
            assert (left["migration"], left["status"]) == ("completed", "postmigrate")
            assert b.driver.state(target, timeout=5.0) is VmState.PAUSED  # holds the state
        else:
            # Without abandon_migration it stays so: the hole of issue 30.
            assert (left["migration"], left["status"]) == ("pre-switchover", "finish-migrate")
            assert left["jobs"] and left["mirror nodes"]
        _never_ran(b, target)

        restarted = QemuDriver(accel="tcg")
        try:
            handle = restarted.adopt(a.paths(), source)
            assert handle is not None
            restarted.abandon_migration(handle, timeout=30.0)
            restarted.abandon_migration(handle, timeout=30.0)  # nothing left: a no-op
        finally:
            restarted.close()
        assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == CLEAN
        a.qemu_io("write -P 0x5a 0 64k")  # its disk is its own again
        _ping(a)
        _never_ran(b, target)
        b.driver.shutdown_vmm(target, timeout=10.0)
