"""The preamble of a move's streams (``procurator.worker.stream_auth``) and
the worker's relay that checks it (``_migration_relay``), on real TCP and
unix sockets: who is let through, who is dropped, and that nobody holds
the gate."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator.worker import stream_auth
from procurator.worker.stream_auth import Gate, StreamRefused, preamble, present
from procurator.worker.vmm import _migration_relay
from procurator.worker.vmm._migration_relay import Relay

TOKEN = bytes(range(0x20, 0x40))
LOCALHOST = "127.0.0.1"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server((LOCALHOST, 0)) as server:
        yield server


def _connect(listener: socket.socket) -> socket.socket:
    return socket.create_connection(listener.getsockname()[:2], timeout=10.0)


def _soon() -> float:
    return time.monotonic() + 10.0


def test_the_peer_with_the_token_gets_through_and_the_stream_is_untouched(
    listener: socket.socket,
) -> None:
    gate = Gate(listener, TOKEN, what="test")
    try:
        with _connect(listener) as source:
            # The preamble and the first bytes of the stream in one write:
            # the gate reads exactly the preamble, nothing of the stream.
            source.sendall(preamble(TOKEN) + b"first bytes")
            accepted = gate.accept(_soon())
            assert accepted is not None
            with accepted:
                assert accepted.gettimeout() is None  # blocking, the VMM's to drive
                assert source.recv(3) == b"ok\n"
                assert accepted.recv(11) == b"first bytes"
    finally:
        gate.close()


def test_present_reads_the_answer_and_nothing_beyond(listener: socket.socket) -> None:
    gate = Gate(listener, TOKEN, what="test")
    got: list[socket.socket | None] = []
    thread = threading.Thread(target=lambda: got.append(gate.accept(_soon())))
    thread.start()
    try:
        with _connect(listener) as source:
            present(source, TOKEN, deadline=_soon())
            thread.join()
            accepted = got[0]
            assert accepted is not None
            with accepted:
                accepted.sendall(b"the VMM's reply")
                assert source.gettimeout() is None
                assert source.recv(64) == b"the VMM's reply"
    finally:
        thread.join()
        gate.close()


@pytest.mark.parametrize(
    ("sent", "answer"),
    [
        (b"GET / HTTP/1.0\r\n\r\n", b"error: not a procurator stream\n"),
        (
            b"PROCURATOR-STREAM 2\n" + bytes([16]) + TOKEN[:16],
            b"error: a procurator stream of another version (this worker speaks "
            b"PROCURATOR-STREAM 1; both workers of a move must run the same release)\n",
        ),
        (preamble(bytes(32)), b"error: wrong token\n"),
        (preamble(TOKEN[:16]), b"error: wrong token\n"),  # a prefix of the token
        (stream_auth.MAGIC + bytes([3]) + b"abc", b"error: wrong token\n"),  # too short to be one
    ],
    ids=["garbage", "version", "wrong", "prefix", "short"],
)
def test_a_peer_without_the_token_is_dropped_and_the_right_one_still_gets_in(
    listener: socket.socket, sent: bytes, answer: bytes
) -> None:
    gate = Gate(listener, TOKEN, what="test")
    try:
        with _connect(listener) as intruder, _connect(listener) as source:
            intruder.sendall(sent)
            source.sendall(preamble(TOKEN))
            accepted = gate.accept(_soon())
            assert accepted is not None
            accepted.close()
            assert source.recv(3) == b"ok\n"
            assert intruder.recv(1024) == answer
            # And closed (reset, when it sent more than the gate read).
            with contextlib.suppress(ConnectionResetError):
                assert intruder.recv(1024) == b""
            assert gate.dropped == 1
    finally:
        gate.close()


def test_a_silent_peer_neither_holds_the_gate_nor_stays_past_its_deadline(
    listener: socket.socket,
) -> None:
    gate = Gate(listener, TOKEN, what="test", timeout=0.2)
    try:
        with _connect(listener) as silent, _connect(listener) as halfway:
            halfway.sendall(stream_auth.MAGIC)  # then nothing more
            with _connect(listener) as source:
                source.sendall(preamble(TOKEN))
                # Came last, let through while the other two still wait.
                accepted = gate.accept(_soon())
                assert accepted is not None
                accepted.close()
                assert gate.dropped == 0
            # Nobody else comes: the two are dropped at their deadline.
            assert gate.accept(time.monotonic() + 0.5) is None
            assert gate.dropped == 2
            assert silent.recv(1024) == b""  # it said nothing: nothing to answer
            assert halfway.recv(1024) == b"error: no preamble within 0.2 s\n"
    finally:
        gate.close()


def test_a_flood_of_silent_peers_cannot_keep_the_source_out(listener: socket.socket) -> None:
    # As many silent peers as may wait, refreshed before their deadline,
    # would keep every later connection out for good if the newest were
    # the one dropped: the oldest waiting one makes room instead, and the
    # source, which presents its token as it connects, gets through.
    gate = Gate(listener, TOKEN, what="test", max_pending=2)
    try:
        with _connect(listener) as one, _connect(listener) as two, _connect(listener) as source:
            source.sendall(preamble(TOKEN))
            accepted = gate.accept(_soon())  # one, two, source: accepted in that order
            assert accepted is not None
            accepted.close()
            assert source.recv(3) == b"ok\n"
            assert gate.dropped == 1
            assert one.recv(1024) == b""  # the oldest, dropped to make room
            two.setblocking(False)
            with pytest.raises(BlockingIOError):
                two.recv(1024)  # still waiting
    finally:
        gate.close()


def test_a_preamble_that_came_in_time_counts_when_the_gate_looks_late(
    listener: socket.socket,
) -> None:
    # A relay with several peers (QEMU's disks) calls accept once per peer
    # and connects each to the VMM in between (retrying for up to 10 s):
    # a connection's preamble may sit unread past its deadline, through
    # no fault of its source. It was dropped as silent.
    gate = Gate(listener, TOKEN, what="test", timeout=0.1)
    try:
        with _connect(listener) as first, _connect(listener) as second:
            first.sendall(preamble(TOKEN))
            second.sendall(preamble(TOKEN))
            accepted = gate.accept(_soon())
            assert accepted is not None
            accepted.close()
            time.sleep(0.3)  # the relay away, past the second's deadline
            accepted = gate.accept(_soon())
            assert accepted is not None
            accepted.close()
            assert gate.dropped == 0
            assert second.recv(3) == b"ok\n"
    finally:
        gate.close()


def test_interrupt_ends_an_accept_and_is_harmless_after_close(listener: socket.socket) -> None:
    gate = Gate(listener, TOKEN, what="test")
    got: list[socket.socket | None] = []
    thread = threading.Thread(target=lambda: got.append(gate.accept()))
    thread.start()
    gate.interrupt()
    thread.join()
    assert got == [None]
    gate.close()
    gate.interrupt()  # the pipe is gone: nothing written anywhere
    assert gate.accept() is None


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (b"error: wrong token\n", "the target refused the stream: wrong token"),
        (b"", "closed the stream without answering"),
        (b"NBDMAGIC", "answered the stream's preamble with b'NBDMAGIC'"),
        (None, "did not answer the stream's preamble in time"),
    ],
    ids=["refused", "closed", "garbage", "silent"],
)
def test_present_says_why_the_target_did_not_accept(
    listener: socket.socket, answer: bytes | None, match: str
) -> None:
    with _connect(listener) as source:
        target, _ = listener.accept()
        with target:
            if answer is not None:
                target.sendall(answer)
                target.shutdown(socket.SHUT_WR)
            with pytest.raises(StreamRefused, match=match):
                present(source, TOKEN, deadline=time.monotonic() + (0.2 if answer is None else 10))


def test_a_token_of_the_wrong_size_is_refused() -> None:
    for token in (bytes(15), bytes(256)):
        with pytest.raises(ValueError, match="16 to 255"):
            preamble(token)


def test_the_relay_stops_accepting_once_its_peers_came(tmp_path: Path) -> None:
    """An incoming relay for two peers (QEMU's NBD export of two disks):
    each authenticated peer reaches the VMM's socket on a connection of
    its own; then the port is closed."""
    vmm_socket = tmp_path / "vmm.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm:
        vmm.bind(str(vmm_socket))
        vmm.listen(4)
        relay = Relay.incoming((LOCALHOST, 0), TOKEN, peers=2, hang_up=False, what="test")
        try:
            address = relay.address
            relay.start(vmm_socket)
            for index in range(2):
                with socket.create_connection(address, timeout=10.0) as intruder:
                    intruder.sendall(preamble(bytes(16)))
                    assert intruder.recv(64) == b"error: wrong token\n"
                with socket.create_connection(address, timeout=10.0) as peer:
                    present(peer, TOKEN, deadline=_soon())
                    served, _ = vmm.accept()
                    with served:
                        peer.sendall(b"to the VMM %d" % index)
                        assert served.recv(64) == b"to the VMM %d" % index
                        served.sendall(b"back")
                        assert peer.recv(64) == b"back"
            assert relay.wait(10.0)  # both peers hung up: the threads ended
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=10.0).close()
            assert relay.dropped == 2
            assert (relay.sent, relay.received) == (8, 2 * len(b"to the VMM 0"))
        finally:
            relay.close()


def _wait_blocked_in_connect(thread: threading.Thread) -> None:
    """Until ``thread`` sleeps in a unix connect waiting for the peer's
    backlog (as the kernel tells)."""
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    deadline = _soon()
    while wchan.read_text() != "unix_wait_for_peer":
        assert time.monotonic() < deadline, wchan.read_text()
        time.sleep(0.005)


def test_a_relay_thread_that_outlives_close_keeps_its_descriptors_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread stuck where ``close`` cannot wake it (a connect to a VMM
    socket whose backlog is full) is not joined in time: its descriptors
    stay open until it ends (closing them under it could hand their
    numbers to another file it would then use), and are closed then."""
    monkeypatch.setattr(_migration_relay, "_JOIN", 0.1)
    vmm_socket = tmp_path / "vmm.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm:
        vmm.bind(str(vmm_socket))
        vmm.listen(0)
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        filler.connect(str(vmm_socket))  # the backlog is full: the next connect blocks
        relay = Relay.incoming((LOCALHOST, 0), TOKEN, what="test")
        relay.start(vmm_socket)
        with socket.create_connection(relay.address, timeout=10.0) as peer:
            present(peer, TOKEN, deadline=_soon())
            stuck = [t for t in threading.enumerate() if t.name == "test"]
            assert len(stuck) == 1
            _wait_blocked_in_connect(stuck[0])
            relay.close()
            assert stuck[0].is_alive()
            wake_r = relay._wake_r
            os.fstat(wake_r)  # still ours: not closed under the thread
            filler.close()
            vmm.accept()[0].close()  # the backlog drains: the connect returns
            stuck[0].join(10.0)
            assert not stuck[0].is_alive()
            assert peer.recv(64) == b""  # the relay released its sockets
        with pytest.raises(OSError):
            os.fstat(wake_r)
