"""The target side of a QEMU live move, without a guest: what
``launch_incoming`` refuses before starting anything, and what it exports.
(The moves themselves: test_livemove_qemu.py.)"""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
from movelab import TOKEN
from qemuhelpers import Vms, image_definition, make_paths

from procurator.worker.vmm.base import VmmError
from procurator.worker.vmm.qemu import QemuDriver, _QmpSession, _Target

pytestmark = [pytest.mark.root, pytest.mark.nix]

LOCALHOST = "127.0.0.1"


def test_qemu_declares_live_moves() -> None:
    assert QemuDriver(accel="tcg").capabilities.live_move


def test_a_port_taken_is_refused_before_qemu_starts(test_image: Path, vms: Vms) -> None:
    paths = make_paths(vms.root, "guest")
    with socket.create_server((LOCALHOST, 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(VmmError, match=f"cannot listen on {LOCALHOST}:{port} for the move's"):
            vms.driver.launch_incoming(
                image_definition(test_image),
                paths,
                memory=(LOCALHOST, port),
                disks=None,
                token=TOKEN,
                timeout=30.0,
            )
    assert not paths.log_file.exists()  # QEMU never ran (the leak check: no process either)


def test_the_target_exports_its_writable_disks_only(test_image: Path, vms: Vms) -> None:
    paths = make_paths(vms.root, "guest")
    disks = []
    for name in ("data", "seed"):
        disk = paths.vm_dir / f"{name}.img"
        disk.write_bytes(bytes(1 << 20))
        disks.append({"path": str(disk), "id": name, "readonly": name == "seed"})
    handle = vms.driver.launch_incoming(
        image_definition(test_image, disks=disks),
        paths,
        memory=(LOCALHOST, 0),
        disks=(LOCALHOST, 0),
        token=TOKEN,
        timeout=30.0,
    )
    try:
        session = _QmpSession(_Target("test", handle.api_socket), time.monotonic() + 30)
        try:
            exports = session.execute("query-block-exports")
            status = session.execute("query-status")["status"]
        finally:
            session.close()
    finally:
        vms.driver.shutdown_vmm(handle, timeout=30.0)  # nothing booted: no power button
    assert [e["id"] for e in exports] == ["data"]
    assert status == "inmigrate"  # waiting for the state, the guest not started
