"""A move's received disks are durable whole before their set is renamed
into ``incoming/<vm>`` (the source drops its copy once told ``ok``): every
file and directory of the set, and each directory made for ``incoming/``
(``procurator.durable``; recorded at that module's ``fsync_dir`` seam,
which every directory fsync of the worker goes through)."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from procurator import durable
from procurator.worker.move_transfer import Expected, Receiver, disk_files, send_disks

BASE = "c" * 32 + "-web"
TOKEN = "5" * 32


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = durable.fsync_dir

    def record(directory: Path) -> None:
        seen.append(Path(directory))
        real(directory)

    monkeypatch.setattr(durable, "fsync_dir", record)
    return seen


def test_a_received_set_and_its_new_directories_are_fsynced(
    tmp_path: Path, fsynced: list[Path]
) -> None:
    vm_dir = tmp_path / "source" / "vms" / "web-1"
    (vm_dir / "disks" / BASE).mkdir(parents=True)
    (vm_dir / "disks" / BASE / "disk0.img").write_bytes(os.urandom(1 << 16))
    target = tmp_path / "target"  # new, like the incoming/ in it
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = Receiver(listener, target / "incoming", timeout=5.0)
    serving = threading.Thread(target=receiver.serve)
    serving.start()
    try:
        # Made for the receiver: target/ in tmp_path, incoming/ in target/.
        assert sorted(fsynced) == sorted([tmp_path, target]), fsynced
        receiver.expect([Expected("web-1", "op-1", TOKEN)])
        send_disks(
            receiver.address, vm_id="web-1", op_id="op-1", token=TOKEN, files=disk_files(vm_dir)
        )
    finally:
        receiver.close()
        serving.join()
    assert receiver.received("web-1") == "op-1"
    incoming = target / "incoming"
    partials = [p for p in fsynced if p.parent == incoming and p.name.endswith(".partial")]
    # The set's own directory and the one its disk is in, before the rename...
    assert len(partials) == 1, fsynced
    assert partials[0] / BASE in fsynced, fsynced
    # ...and incoming/ after it, which makes the set's name durable.
    assert fsynced[-1] == incoming, fsynced
