"""The driver's HTTP/1.1 transport against a scripted peer on a real unix
socket: framing, keep-alive, the idle-close race, limits, errors, and that
no failure leaks a socket."""

from __future__ import annotations

import os
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from procurator.worker.vmm import _unix_http
from procurator.worker.vmm._unix_http import KEPT, MAX_HEAD_BYTES, UnixSocketTransport

URL = "http://localhost/api/v1/"
TIMEOUT = {"timeout": {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": 5.0}}

#: What the peer does with the next request: send these bytes, or ``DROP``
#: (close the connection without answering). ``CLOSE`` after bytes closes
#: the connection once they are sent.
DROP = b""
CLOSE = object()


def ok(body: bytes = b'{"ok":true}', *extra: str) -> bytes:
    head = "".join(f"{line}\r\n" for line in extra)
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (head.encode(), len(body), body)


@dataclass
class Peer:
    """A unix-socket server answering requests from a script, one thread per
    connection; it records each request's raw bytes."""

    path: Path
    script: list[object] = field(default_factory=list)
    requests: list[bytes] = field(default_factory=list)
    accepted: int = 0
    live: int = 0  # connections open on the peer's side
    closed: int = 0  # connections the peer closed, at our EOF or its own will
    eofs: int = 0  # connections that ended with our EOF
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
                self.live += 1
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        try:
            self._converse(conn)
        finally:
            conn.close()
            with self._lock:
                self.live -= 1
                self.closed += 1

    def _converse(self, conn: socket.socket) -> None:
        if True:
            buffer = b""
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = conn.recv(65536)
                    if not chunk:
                        with self._lock:
                            self.eofs += 1
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    if name.lower() == b"transfer-encoding":
                        while not buffer.endswith(b"0\r\n\r\n"):
                            buffer += conn.recv(65536)
                        length = len(buffer)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                with self._lock:
                    self.requests.append(head + b"\r\n\r\n" + buffer[:length])
                    action = self.script.pop(0) if self.script else ok()
                    close_after = bool(self.script) and self.script[0] is CLOSE
                    if close_after:
                        self.script.pop(0)
                buffer = buffer[length:]
                if action == DROP:
                    return
                assert isinstance(action, bytes)
                conn.sendall(action)
                if close_after:
                    return


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[Peer]:
    path = tmp_path / "api.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    server = Peer(path)
    thread = threading.Thread(target=server.serve, args=(listener,), daemon=True)
    thread.start()
    yield server
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(5)


@pytest.fixture
def transport(peer: Peer) -> Iterator[UnixSocketTransport]:
    fds = len(os.listdir("/proc/self/fd"))
    t = UnixSocketTransport(str(peer.path))
    yield t
    t.close()
    wait_for(lambda: peer.live == 0)  # the peer's ends are in this process too
    assert len(os.listdir("/proc/self/fd")) == fds, "the transport leaked a socket"


def wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5.0
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def call(
    transport: httpx.BaseTransport, method: str = "GET", endpoint: str = "vm.info", **kw: object
) -> httpx.Response:
    request = httpx.Request(method, URL + endpoint, extensions=TIMEOUT, **kw)  # type: ignore[arg-type]
    response = transport.handle_request(request)
    response.read()
    return response


def test_requests_share_one_kept_alive_connection(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    peer.script = [ok(b'{"state":"Running"}'), b"HTTP/1.1 204 No Content\r\n\r\n"]
    first = call(transport)
    assert (first.status_code, first.json()) == (200, {"state": "Running"})
    assert first.extensions["http_version"] == b"HTTP/1.1"
    second = call(transport, "PUT", "vm.create", json={"cpus": {"boot_vcpus": 1}})
    assert (second.status_code, second.content) == (204, b"")
    assert peer.accepted == 1
    sent = peer.requests[1]
    assert sent.startswith(b"PUT /api/v1/vm.create HTTP/1.1\r\n")
    assert b"\r\nContent-Length: 25\r\n" in sent
    assert sent.endswith(b'\r\n\r\n{"cpus":{"boot_vcpus":1}}')


def test_chunked_close_delimited_and_interim_answers_are_read(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    peer.script = [
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'4;ext=1\r\n["a"\r\n1\r\n]\r\n0\r\nTrailer: x\r\n\r\n',
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nto the end",
        CLOSE,
        ok(b"{}"),
    ]
    assert call(transport).json() == ["a"]
    assert call(transport).content == b"to the end"
    assert call(transport).json() == {}
    # The close-delimited answer ended its connection; the chunked one did not.
    assert peer.accepted == 2


def test_a_connection_the_peer_closed_while_idle_is_not_reused(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    peer.script = [ok(), CLOSE, ok()]
    call(transport)
    wait_for(lambda: peer.closed == 1)
    assert call(transport).status_code == 200
    assert peer.accepted == 2 and len(peer.requests) == 2  # not sent on the closed one


def test_a_connection_reused_once_then_closed_by_the_peer_is_not_reused(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    """The check before a reuse keeps its poller with the connection: the
    second check, on the kept poller, still sees the peer's close (a PUT,
    which is never retried, would fail on the closed connection)."""
    peer.script = [ok(), ok(), CLOSE, ok()]
    call(transport)
    call(transport)  # the first reuse: the poller is made
    wait_for(lambda: peer.closed == 1)
    assert call(transport, "PUT", "vm.boot").status_code == 200
    assert peer.accepted == 2 and len(peer.requests) == 3


def test_a_get_whose_reused_connection_drops_is_retried_once(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    peer.script = [ok(), DROP, ok(b'{"again":1}')]
    call(transport)
    assert call(transport).json() == {"again": 1}
    assert len(peer.requests) == 3 and peer.accepted == 2


def test_a_put_whose_reused_connection_drops_is_never_retried(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    peer.script = [ok(), DROP]
    call(transport)
    with pytest.raises(httpx.RemoteProtocolError, match="disconnected without"):
        call(transport, "PUT", "vm.boot")
    assert [r.split(b"\r\n", 1)[0] for r in peer.requests] == [
        b"GET /api/v1/vm.info HTTP/1.1",
        b"PUT /api/v1/vm.boot HTTP/1.1",
    ]


def test_a_peer_that_never_answers_on_a_new_connection_is_an_error(
    peer: Peer, transport: UnixSocketTransport
) -> None:
    peer.script = [DROP]
    with pytest.raises(httpx.RemoteProtocolError, match="disconnected without"):
        call(transport)
    assert peer.accepted == 1


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "after 5 of 10 body bytes"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", "conflicting"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999\r\n\r\n", "larger than"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "unsupported Transfer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: " + b"y" * MAX_HEAD_BYTES, "longer than"),
    ],
    ids=[
        "not-http",
        "status",
        "header",
        "truncated",
        "two-lengths",
        "negative-length",
        "huge-length",
        "gzip-framing",
        "chunk-size",
        "endless-head",
    ],
)
def test_a_malformed_answer_is_a_protocol_error_and_closes_the_connection(
    peer: Peer, transport: UnixSocketTransport, answer: bytes, message: str
) -> None:
    peer.script = [answer, CLOSE, ok()]
    with pytest.raises(httpx.RemoteProtocolError, match=message):
        call(transport)
    assert call(transport).status_code == 200  # on a new connection
    assert peer.accepted == 2


def test_a_body_over_the_limit_is_refused_whatever_its_framing(peer: Peer) -> None:
    t = UnixSocketTransport(str(peer.path), max_body_bytes=8)
    try:
        peer.script = [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n12345\r\n5\r\n67890\r\n",
            CLOSE,
            b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100,
            CLOSE,
        ]
        with pytest.raises(httpx.RemoteProtocolError, match="larger than 8"):
            call(t)
        with pytest.raises(httpx.RemoteProtocolError, match="larger than 8"):
            call(t)
    finally:
        t.close()


INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"
TRAILER = b"X-Trailer: 1\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        INTERIM * (MAX_HEAD_BYTES // len(INTERIM) + 1) + ok(),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n"
        + TRAILER * (MAX_HEAD_BYTES // len(TRAILER) + 1)
        + b"\r\n",
    ],
    ids=["interim-answers", "trailers"],
)
def test_many_small_heads_count_against_the_bound_on_one(
    peer: Peer, transport: UnixSocketTransport, answer: bytes
) -> None:
    # Each 1xx head, each trailer line alone is small: a peer sending them
    # without end would hold the calling thread (the sweep's, for every VM)
    # for as long as it likes, each recv well within the read timeout.
    peer.script = [answer, CLOSE]
    with pytest.raises(httpx.RemoteProtocolError, match=f"longer than {MAX_HEAD_BYTES}"):
        call(transport)


def test_a_body_of_tiny_chunks_costs_its_size_not_an_object_per_chunk(peer: Peer) -> None:
    # 1-byte chunks: kept as one bytes object each (~34 bytes, and a list
    # slot), a body within the 16 MiB bound cost the worker ~700 MiB.
    limit = 64 * 1024
    t = UnixSocketTransport(str(peer.path), max_body_bytes=limit)
    peer.script = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"1\r\nx\r\n" * limit
        + b"0\r\n\r\n"
    ]
    tracemalloc.start()
    try:
        response = call(t)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        t.close()
    assert response.content == b"x" * limit
    # The body, its copy into bytes and the receive buffer: a few times its
    # size (it was ~40 times).
    assert peak < 8 * limit, f"{peak} bytes at the peak for a {limit}-byte body"


def test_a_missing_socket_is_a_connect_error_and_leaks_nothing(tmp_path: Path) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    t = UnixSocketTransport(str(tmp_path / "nothing.sock"))
    for _ in range(50):
        with pytest.raises(httpx.ConnectError):
            call(t)
    t.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_silent_peer_is_a_read_timeout(peer: Peer, transport: UnixSocketTransport) -> None:
    peer.script = [b"HTTP/1.1 200 OK\r\n"]  # and then nothing
    request = httpx.Request(
        "GET", URL + "vm.info", extensions={"timeout": {"connect": 1.0, "read": 0.2, "write": 1.0}}
    )
    with pytest.raises(httpx.ReadTimeout):
        transport.handle_request(request)


def test_a_peer_trickling_its_answer_is_a_read_timeout(tmp_path: Path) -> None:
    # Each byte comes well within the read timeout, the whole answer never
    # does: the timeout bounds the answer, not each recv (else one hostile
    # VMM holds the sweep's thread, which calls every VM, as long as it likes).
    path = str(tmp_path / "api.sock")
    stop = threading.Event()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                for byte in ok():
                    if stop.wait(0.05):
                        return
                    conn.sendall(bytes([byte]))

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        t = UnixSocketTransport(path)
        request = httpx.Request(
            "GET", URL + "vm.info", extensions={"timeout": {"connect": 1.0, "read": 0.3}}
        )
        try:
            with pytest.raises(httpx.ReadTimeout):
                t.handle_request(request)
        finally:
            stop.set()
            t.close()
            thread.join(5)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-Id", "a\r\nInjected: 1"),
        ("X-Id", "a\nInjected: 1"),
        ("X-Id", "a\rb"),
        ("X-Id", "a\0b"),
        ("X-Id\nInjected", "1"),
        ("X-Id\0", "1"),
    ],
    ids=["crlf", "lf", "cr", "nul", "lf-in-name", "nul-in-name"],
)
def test_a_header_that_would_split_the_request_is_refused(
    peer: Peer, transport: UnixSocketTransport, name: str, value: str
) -> None:
    # httpx itself lets these through; the transport checks the header block
    # as a whole (one CR and one LF per line) and names the culprit.
    request = httpx.Request(
        "GET", URL + "vm.info", headers={"Accept": "*/*", name: value}, extensions=TIMEOUT
    )
    with pytest.raises(httpx.LocalProtocolError, match="X-Id"):
        transport.handle_request(request)
    assert peer.requests == []


def test_a_request_is_sent_as_its_headers_say(peer: Peer, transport: UnixSocketTransport) -> None:
    """The request line and every header, in order, byte for byte; an
    empty streamed body is still framed as chunked."""
    call(transport, headers={"Accept": "application/json", "X-Empty": ""})
    assert peer.requests[0] == (
        b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\n"
        b"Accept: application/json\r\nX-Empty: \r\n\r\n"
    )
    call(transport, "PUT", "vm.boot", content=iter([]))
    assert peer.requests[1].endswith(b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")


def test_a_streamed_body_is_sent_chunked(peer: Peer, transport: UnixSocketTransport) -> None:
    call(transport, "PUT", "vm.create", content=iter([b'{"a":', b"1}"]))
    sent = peer.requests[0]
    assert b"\r\nTransfer-Encoding: chunked\r\n" in sent
    assert sent.endswith(b'\r\n\r\n7\r\n{"a":1}\r\n0\r\n\r\n')


def test_close_ends_the_idle_connections(peer: Peer, transport: UnixSocketTransport) -> None:
    call(transport)
    transport.close()
    wait_for(lambda: peer.eofs == 1)
    # A request after close still works, and keeps nothing open.
    assert call(transport).status_code == 200
    wait_for(lambda: peer.eofs == 2)


def test_an_httpx_client_over_it_works_like_over_any_transport(peer: Peer) -> None:
    """An httpx client over the transport behaves like any httpx client."""
    with httpx.Client(transport=UnixSocketTransport(str(peer.path)), trust_env=False) as client:
        peer.script = [ok(b'{"state":"Paused"}', "Content-Type: application/json")]
        response = client.get(URL + "vm.info")
        assert response.json() == {"state": "Paused"}
        assert response.headers["content-type"] == "application/json"


def test_a_kept_request_is_encoded_once_and_others_each_time(
    peer: Peer, transport: UnixSocketTransport, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request marked ``KEPT`` (the driver's bodiless ones, sent again
    unchanged) keeps its bytes after its first send; a request that is not
    is encoded at every send, so a caller that changes a request before
    sending it again sends what it changed."""
    encoded: list[bytes] = []
    real = _unix_http._encode

    def counting(request: httpx.Request) -> bytes:
        encoded.append(data := real(request))
        return data

    monkeypatch.setattr(_unix_http, "_encode", counting)
    peer.script = [ok(), ok(), ok(), ok()]
    kept = httpx.Request("GET", URL + "vm.counters", extensions={**TIMEOUT, KEPT: True})
    for _ in range(2):
        transport.handle_request(kept).read()
    assert len(encoded) == 1
    assert peer.requests[0] == peer.requests[1]
    plain = httpx.Request("GET", URL + "vm.info", extensions=TIMEOUT)
    transport.handle_request(plain).read()
    plain.headers["X-Try"] = "2"
    transport.handle_request(plain).read()
    assert len(encoded) == 3
    assert b"X-Try" not in peer.requests[2]
    assert b"\r\nX-Try: 2\r\n" in peer.requests[3]
    # A request made from a kept one's extensions (as a redirect is) is its
    # own: the bytes stay with the request object they were encoded from.
    peer.script = [ok()]
    copy = httpx.Request("GET", URL + "vmm.ping", extensions=kept.extensions)
    transport.handle_request(copy).read()
    assert peer.requests[4].startswith(b"GET /api/v1/vmm.ping ")
