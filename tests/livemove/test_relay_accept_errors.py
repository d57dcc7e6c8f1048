"""What the source's relay does when ``accept(2)`` on the unix socket its
VMM connects to fails: the rule of the target's gate
(``stream_auth.AcceptRetry``): a transient error (EMFILE,
ECONNABORTED...) is waited out and the VMM's connection is still taken;
any other fails with ``AcceptFailed`` naming the stream and the reason.
Before, any error but EAGAIN failed the move. The listener is a real unix
socket whose ``accept`` fails as told: the seam is the socket the relay
waits on."""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from procurator.worker.stream_auth import AcceptFailed
from procurator.worker.vmm._migration_relay import Relay


class FailingUnixListener(socket.socket):
    """A listening unix socket whose next ``accept`` calls fail with
    ``errors``, in order, before it accepts as usual."""

    def __init__(self, path: Path, *errors: int) -> None:
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.errors = list(errors)
        self.failed = 0
        #: Set once it failed twice (the caller waits between).
        self.resting = threading.Event()
        self.bind(str(path))
        self.listen(1)

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            self.failed += 1
            if self.failed >= 2:
                self.resting.set()
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


def test_transient_accept_errors_are_waited_out(tmp_path: Path) -> None:
    path = tmp_path / "vmm.sock"
    relay = Relay("migration to 192.0.2.1:4000")
    with (
        FailingUnixListener(path, errno.EMFILE, errno.ECONNABORTED, errno.ENOBUFS) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm,
    ):
        try:
            vmm.connect(str(path))
            accepted = relay._accept(listener, time.monotonic() + 10.0)
            assert accepted is not None
            assert listener.failed == 3
            vmm.sendall(b"x")
            assert accepted.recv(1) == b"x"  # the VMM's own connection
        finally:
            relay.close()


def test_another_accept_error_fails_with_its_reason(tmp_path: Path) -> None:
    path = tmp_path / "vmm.sock"
    relay = Relay("migration to 192.0.2.1:4000")
    with (
        FailingUnixListener(path, errno.EINVAL) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm,
    ):
        try:
            vmm.connect(str(path))
            with pytest.raises(AcceptFailed) as failed:
                relay._accept(listener, time.monotonic() + 10.0)
            assert failed.value.errno == errno.EINVAL
            assert str(failed.value) == (
                "migration to 192.0.2.1:4000: cannot accept connections: Invalid argument"
            )
        finally:
            relay.close()


def test_close_ends_a_wait_out(tmp_path: Path) -> None:
    """A relay closed while its listener rests after transient errors
    stops waiting (no deadline here: it would wait for good otherwise)."""
    path = tmp_path / "vmm.sock"
    relay = Relay("migration to 192.0.2.1:4000")
    result: list[socket.socket | None] = []
    with (
        FailingUnixListener(path, *[errno.EMFILE] * 1000) as listener,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm,
    ):
        vmm.connect(str(path))
        waiter = threading.Thread(target=lambda: result.append(relay._accept(listener, None)))
        waiter.start()
        try:
            assert listener.resting.wait(10.0)  # it failed twice: it waits
        finally:
            os.write(relay._wake_w, b"x")  # what close writes
            waiter.join(10.0)
            relay.close()
        assert not waiter.is_alive()
        assert result == [None]
