"""What a move's gate does when its listener's ``accept(2)`` fails: a
transient error (EMFILE, ECONNABORTED...) is waited out and the source
still gets through; any other ends the gate with ``AcceptFailed`` naming
the stream and the reason, and the QEMU target's incoming move records it
(``finish_incoming`` reports it, not "no peer presented the token"). The
listener is a real TCP socket whose ``accept`` fails as told: the seam is
the socket the code is given."""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Iterator

import pytest

from procurator.worker.stream_auth import AcceptFailed, Gate, preamble
from procurator.worker.vmm.base import VmmHandle
from procurator.worker.vmm.qemu import QemuDriver, _IncomingMove

TOKEN = bytes(range(0x40, 0x60))


class FailingListener(socket.socket):
    """A listening TCP socket whose next ``accept`` calls fail with
    ``errors``, in order, before it accepts as usual."""

    def __init__(self, *errors: int) -> None:
        super().__init__(socket.AF_INET, socket.SOCK_STREAM)
        self.errors = list(errors)
        self.failed = 0
        self.bind(("127.0.0.1", 0))
        self.listen()

    def accept(self) -> tuple[socket.socket, object]:
        if self.errors:
            self.failed += 1
            code = self.errors.pop(0)
            raise OSError(code, os.strerror(code))
        return super().accept()


@pytest.fixture
def source() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for conn in made:
        conn.close()


def _connect(listener: socket.socket, made: list[socket.socket]) -> socket.socket:
    conn = socket.create_connection(listener.getsockname()[:2], timeout=10.0)
    made.append(conn)
    return conn


def test_transient_accept_errors_are_waited_out(source: list[socket.socket]) -> None:
    with FailingListener(errno.EMFILE, errno.ECONNABORTED, errno.ENFILE) as listener:
        gate = Gate(listener, TOKEN, what="test")
        try:
            _connect(listener, source).sendall(preamble(TOKEN))
            accepted = gate.accept(time.monotonic() + 10.0)
            assert accepted is not None
            accepted.close()
            assert listener.failed == 3 and gate.dropped == 0
        finally:
            gate.close()


def test_another_accept_error_ends_the_gate_with_its_reason(source: list[socket.socket]) -> None:
    with FailingListener(errno.EINVAL) as listener:
        gate = Gate(listener, TOKEN, what="VM web-1: the move's memory")
        try:
            _connect(listener, source)
            with pytest.raises(AcceptFailed) as failed:
                gate.accept(time.monotonic() + 10.0)
            assert failed.value.errno == errno.EINVAL
            assert str(failed.value) == (
                "VM web-1: the move's memory: cannot accept connections: Invalid argument"
            )
        finally:
            gate.close()


def test_an_incoming_move_whose_listener_fails_says_why(source: list[socket.socket]) -> None:
    listener = FailingListener(errno.EINVAL)
    handle = VmmHandle("qemu", 1, 1, "/nonexistent/web-1/run/qmp.sock")
    move = _IncomingMove(QemuDriver(accel="tcg"), handle, listener, TOKEN, None)
    _connect(listener, source)
    move.start()
    move._thread.join(timeout=30.0)  # ends by itself: the listener failed
    assert not move._thread.is_alive()
    assert not move.handed_over
    assert move.error == "cannot accept on the memory port: Invalid argument"
    assert listener.fileno() == -1  # closed by the move
    move.close()
