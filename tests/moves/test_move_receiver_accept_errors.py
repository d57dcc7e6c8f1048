"""The cold transfer's receiver waits out a transient ``accept(2)`` error
(EMFILE, ECONNABORTED...) and takes the source's transfer after it: it
used to stop serving at the first error of any kind, silently, leaving
every later source to time out. The listener is a real TCP socket whose
``accept`` fails as told: the seam is the socket the receiver is given."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

from procurator.worker.move_transfer import Expected, Receiver, disk_files, send_disks

BASE = "d" * 32 + "-web"
TOKEN = "6" * 32


class FailingListener(socket.socket):
    """A listening TCP socket whose next ``accept`` calls fail with
    ``errors``, in order, before it accepts as usual."""

    def __init__(self, *errors: int) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.errors = list(errors)
        self.bind(("127.0.0.1", 0))
        self.listen()

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


def test_transient_accept_errors_do_not_end_the_receiver(tmp_path: Path) -> None:
    vm_dir = tmp_path / "source" / "vms" / "web-1"
    (vm_dir / "disks" / BASE).mkdir(parents=True)
    (vm_dir / "disks" / BASE / "disk0.img").write_bytes(os.urandom(1 << 16))
    listener = FailingListener(errno.EMFILE, errno.ECONNABORTED)
    receiver = Receiver(listener, tmp_path / "target" / "incoming", timeout=5.0)
    serving = threading.Thread(target=receiver.serve)
    serving.start()
    try:
        receiver.expect([Expected("web-1", "op-1", TOKEN)])
        send_disks(
            receiver.address, vm_id="web-1", op_id="op-1", token=TOKEN, files=disk_files(vm_dir)
        )
        assert receiver.received("web-1") == "op-1"
        assert listener.errors == []
    finally:
        receiver.close()
        serving.join()
