"""A received disk set is used only by the switch of the move that sent it
(docs/SNAPSHOTS.md, "Moves"): the target's real ``Receiver`` (real TCP on
loopback) and its ``ImageManager.prepare`` over real Nix, as the worker
runs them (``MoveTransfers`` prunes with what its assignment expects, the
actuator prepares with the op id of the transfer its assignment carries
for the VM)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleethelpers import AddImage, add_image, nix_env

from procurator.core.confinement import HostSide, ImageLimits
from procurator.nix import ImageManager, NixStore
from procurator.worker.move_transfer import Expected, Receiver, disk_files, send_disks

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = pytest.mark.nix

TOKEN = "t" * 32
FRESH = b"the image's own disk" + bytes(4096)
WRITTEN = b"the guest wrote this on the source" + bytes(4096)


@pytest.fixture
def image(add_image: AddImage) -> str:
    config = {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "disks": [{"path": "disk.img"}],
    }
    return add_image("incoming-web", config, {"disk.img": FRESH})


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Receiver]:
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = Receiver(listener, tmp_path / "target" / "incoming", timeout=5.0)
    thread = threading.Thread(target=receiver.serve)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.close()
        thread.join()


@pytest.fixture
def images(tmp_path: Path, nix_env: dict[str, str]) -> Iterator[ImageManager]:
    manager = ImageManager(
        NixStore(extra_env=nix_env, timeout=60),
        tmp_path / "target",
        limits=ImageLimits(max_vcpus=2, max_memory_mib=256),
    )
    yield manager
    manager.release("web-1")  # its GC root: the image is deleted after the module


def receive(tmp_path: Path, target: Receiver, image: str, op_id: str) -> None:
    """The source's disks of move ``op_id`` stored on ``target``."""
    disks = tmp_path / "source" / "vms" / "web-1" / "disks" / Path(image).name
    disks.mkdir(parents=True, exist_ok=True)
    (disks / "disk0.img").write_bytes(WRITTEN)
    target.expect([Expected("web-1", op_id, TOKEN)])
    send_disks(
        target.address,
        vm_id="web-1",
        op_id=op_id,
        token=TOKEN,
        files=disk_files(disks.parent.parent),
        timeout=5.0,
    )
    assert target.received("web-1") == op_id


def booted_from(images: ImageManager, image: str, incoming_op: str | None) -> bytes:
    """What VM web-1's disk holds after its prepare with ``incoming_op``
    (the op of the transfer its assignment carries, as the actuator
    passes it)."""
    host = HostSide(serial_file="/var/lib/procurator/vms/web-1/serial.log", vcpus=1)
    (disk,) = images.prepare("web-1", image, host=host, incoming_op=incoming_op).disks
    return disk.read_bytes()


def test_a_failed_moves_set_is_not_used_when_the_vm_is_placed_here_later(
    tmp_path: Path, target: Receiver, images: ImageManager, image: str
) -> None:
    receive(tmp_path, target, image, "op-failed")
    # One pulled assignment (a reconnect): the move failed after the set
    # arrived, and a later apply placed the VM here; no transfer names it.
    target.expect([])
    # The prepare may run before the worker's next prune: it does not take
    # the set on its own either.
    assert booted_from(images, image, None) == FRESH
    target.prune()
    assert target.received("web-1") is None
    assert list((tmp_path / "target" / "incoming").iterdir()) == []


def test_a_set_is_used_only_by_the_move_that_sent_it(
    tmp_path: Path, target: Receiver, images: ImageManager, image: str
) -> None:
    receive(tmp_path, target, image, "op-failed")
    # A later move of the VM here whose transfer is under way: the failed
    # move's set is neither kept nor taken for it.
    target.expect([Expected("web-1", "op-later", TOKEN)])
    assert booted_from(images, image, "op-later") == FRESH
    target.prune()
    assert target.received("web-1") is None


def test_the_switch_takes_the_set_also_after_a_restart_of_the_target(
    tmp_path: Path, target: Receiver, images: ImageManager, image: str
) -> None:
    receive(tmp_path, target, image, "op-move")
    target.close()
    # The worker restarted between the switch and the VM's start: its
    # assignment (the switch's) has the VM and still the transfer.
    listener = socket.create_server(("127.0.0.1", 0))
    restarted = Receiver(listener, tmp_path / "target" / "incoming", timeout=5.0)
    try:
        restarted.expect([Expected("web-1", "op-move", TOKEN)])
        restarted.prune()
        assert restarted.received("web-1") == "op-move"
        assert booted_from(images, image, "op-move") == WRITTEN
        # Once the move is done the transfer is no longer sent: what is left
        # of the set goes, the VM keeps the disks it took.
        restarted.expect([])
        restarted.prune()
        assert list((tmp_path / "target" / "incoming").iterdir()) == []
        assert booted_from(images, image, None) == WRITTEN
    finally:
        restarted.close()
