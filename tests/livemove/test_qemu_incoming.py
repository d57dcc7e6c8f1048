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

from procurator.worker.stream_auth import preamble
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


def _free_port() -> int:
    with socket.create_server((LOCALHOST, 0)) as probe:
        return int(probe.getsockname()[1])


def test_a_target_whose_source_never_presented_the_token_says_so(
    test_image: Path, vms: Vms
) -> None:
    """Only intruders came to the memory port: none reached QEMU (it still
    waits, ``inmigrate`` with no migration under way), and finishing says
    why nothing arrived."""
    paths = make_paths(vms.root, "guest")
    port = _free_port()
    handle = vms.driver.launch_incoming(
        image_definition(test_image),
        paths,
        memory=(LOCALHOST, port),
        disks=None,
        token=TOKEN,
        timeout=30.0,
    )
    try:
        with socket.create_connection((LOCALHOST, port)) as intruder:
            intruder.sendall(preamble(bytes(16)))
            assert intruder.recv(64) == b"error: wrong token\n"
        session = _QmpSession(_Target("test", handle.api_socket), time.monotonic() + 30)
        try:
            assert session.execute("query-migrate") == {}  # no migration begun
        finally:
            session.close()
        with pytest.raises(VmmError, match=r"no move's memory stream came \(no peer presented"):
            vms.driver.finish_incoming(handle, timeout=5.0)
    finally:
        vms.driver.shutdown_vmm(handle, timeout=30.0)
