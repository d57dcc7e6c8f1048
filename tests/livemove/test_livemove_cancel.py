"""A QEMU live move cancelled by its caller while the disks mirror
(issue 30: the move's ``cancelling``): ``send_migration``'s ``cancel``
is looked at on every poll before the switchover, and the call undoes
the move as for a failure: the guest runs on at the source with its disk
writable, no mirror job or node left, and the target's incoming QEMU
never ran the guest. Two real QEMUs in two network namespaces."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from movelab import TARGET, TOKEN, Side, two_hosts
from qemuhelpers import wait_for_ready
from test_livemove_abandon import CLEAN, _never_ran
from test_livemove_qemu import _leftovers, _ping, _ports, _target

from procurator.worker.vmm.base import VmmError

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]


@pytest.fixture
def hosts() -> Iterator[tuple[Side, Side]]:
    with two_hosts(Path("/tmp") / f"pqc-{os.urandom(4).hex()}") as sides:
        yield sides


def test_a_move_cancelled_while_mirroring_is_undone(
    test_image: Path, hosts: tuple[Side, Side]
) -> None:
    a, b = hosts
    a.fresh_disk(b"before")
    source = a.launch(test_image)
    wait_for_ready(a.paths(), source)
    _ping(a)
    ports = _ports()
    target = _target(test_image, b, ports)
    cancel = threading.Event()
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        # The first report comes from the mirrors' poll: cancelled there.
        seen.append((done, total))
        cancel.set()

    def move() -> None:
        a.driver.send_migration(
            source,
            memory=(TARGET, ports[0]),
            disks=(TARGET, ports[1]),
            token=TOKEN,
            timeout=120.0,
            progress=progress,
            cancel=cancel,
        )

    with pytest.raises(VmmError, match=r"the move was cancelled$") as raised:
        a.call(move)
    assert seen, raised.value
    assert {k: v for k, v in _leftovers(a).items() if k != "migration"} == CLEAN
    a.qemu_io("write -P 0x5a 0 64k")  # its disk is its own again
    _ping(a)
    _never_ran(b, target)
    b.driver.shutdown_vmm(target, timeout=10.0)
