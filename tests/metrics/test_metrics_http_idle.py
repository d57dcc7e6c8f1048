"""The exporters' HTTP server (procurator.prometheus.HttpServer) costs an
idle daemon nothing: its serving thread sleeps until a connection comes or
``close`` wakes it, with no poll (issue 31 target 3: socketserver's
``serve_forever`` woke 5 times a second, 0.5 ms/s of an idle 1,000-VM
worker). Real sockets, the real thread's scheduler counters."""

from __future__ import annotations

import platform
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import pytest

from procurator.prometheus import HttpServer


def _app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


def _serving_thread(server: HttpServer) -> threading.Thread:
    (found,) = [t for t in threading.enumerate() if t.name == f"test-http-{server.port}"]
    return found


def _wake_ups(thread: threading.Thread) -> int:
    """The thread's voluntary context switches: one per time it slept and woke."""
    with open(f"/proc/self/task/{thread.native_id}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in the thread's status")


# epoll_wait and epoll_pwait by architecture (aarch64 has only the latter).
_EPOLL_WAITS = {"x86_64": {"232", "281"}, "aarch64": {"22"}}[platform.machine()]


def _parked(thread: threading.Thread) -> None:
    """Until the serving thread sleeps in its selector again: after a
    request it still has to hand the connection on and get back to
    ``select``, and the sleep that ends that way is one more switch."""
    deadline = time.monotonic() + 30.0  # a hang guard
    path = f"/proc/self/task/{thread.native_id}/syscall"
    while True:
        with open(path, encoding="ascii") as f:
            if f.read().split()[0] in _EPOLL_WAITS:
                return
        assert time.monotonic() < deadline, "the serving thread never went back to select"
        time.sleep(0.005)


def test_idle_server_thread_does_not_wake_and_closes_at_once() -> None:
    server = HttpServer(_app, "127.0.0.1", 0, what="test")
    try:
        thread = _serving_thread(server)
        assert httpx.get(server.url("/metrics")).text == "ok\n"
        _parked(thread)
        before = _wake_ups(thread)
        time.sleep(1.0)  # a span of idleness to count wake-ups in, not a bound
        assert _wake_ups(thread) == before  # polled at 0.2 s: 5 more
        assert httpx.get(server.url("/metrics")).text == "ok\n"  # still serves after
    finally:
        server.close()
    assert not thread.is_alive()
    with socket.socket() as again:  # the port is free once close returns
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        again.bind(("127.0.0.1", server.port))
        again.listen()
    server.close()  # idempotent


def _closed_by_server(conn: socket.socket, limit: float) -> bool:
    """Whether the server closed ``conn`` within ``limit`` seconds."""
    conn.settimeout(limit)
    try:
        return conn.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _closed_while_trickling(conn: socket.socket, seconds: float) -> bool:
    """Send a never-ending request head a byte every 0.1 s for ``seconds``;
    whether the server closed the connection meanwhile."""
    started = time.monotonic()
    head = b"GET /metrics HTTP/1.0\r\nX-Padding: "
    sent = 0
    while time.monotonic() - started < seconds:
        try:
            conn.sendall(head[sent : sent + 1] if sent < len(head) else b"a")
        except (BrokenPipeError, ConnectionResetError):
            return True
        sent += 1
        if select.select([conn], [], [], 0.1)[0]:
            try:
                return conn.recv(1) == b""
            except ConnectionResetError:
                return True
    return False


def test_a_silent_connection_is_dropped_and_pins_no_thread(
    capfd: pytest.CaptureFixture[str],
) -> None:
    # A client that connects and sends nothing (or stops mid-request) is
    # closed once the request timeout passes, quietly: no traceback.
    server = HttpServer(_app, "127.0.0.1", 0, what="test", request_timeout=0.3)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as silent:
            assert _closed_by_server(silent, 10.0)  # a hang guard; 0.3 s expected
        with socket.create_connection(("127.0.0.1", server.port)) as trickle:
            trickle.sendall(b"GET /metrics HT")
            assert _closed_by_server(trickle, 10.0)
        # One byte every 0.1 s, for up to 30 s (a hang guard; 0.3 s
        # expected): each read is quick, the request never ends; it is
        # closed while it still trickles in.
        with socket.create_connection(("127.0.0.1", server.port)) as slow:
            assert _closed_while_trickling(slow, seconds=30.0)
        assert httpx.get(server.url("/metrics")).text == "ok\n"
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err


def _requests_of(server: HttpServer) -> list[threading.Thread]:
    name = f"{_serving_thread(server).name}-request"
    return [t for t in threading.enumerate() if t.name == name]


def test_connections_beyond_the_cap_are_closed_unread() -> None:
    server = HttpServer(_app, "127.0.0.1", 0, what="test", request_timeout=30, max_requests=2)
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        deadline = time.monotonic() + 30.0  # a hang guard
        while len(_requests_of(server)) < 2:
            assert time.monotonic() < deadline, "the two requests never started"
            time.sleep(0.01)
        # A third while two silent ones are in flight: closed, not served.
        with socket.create_connection(("127.0.0.1", server.port)) as third:
            third.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert _closed_by_server(third, 10.0)
        for conn in held:
            conn.close()
        # Once they ended, requests are served again.
        deadline = time.monotonic() + 30.0
        while _requests_of(server):
            assert time.monotonic() < deadline, "the requests never ended"
            time.sleep(0.01)
        assert httpx.get(server.url("/metrics")).text == "ok\n"
    finally:
        for conn in held:
            conn.close()
        server.close()


def test_close_waits_for_the_request_in_flight() -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        entered.set()
        release.wait(30)  # a hang guard
        return _app(environ, start_response)

    server = HttpServer(slow, "127.0.0.1", 0, what="test")
    answers: list[int] = []
    client = threading.Thread(
        target=lambda: answers.append(httpx.get(server.url("/metrics"), timeout=30).status_code)
    )
    closed_after_release: list[bool] = []

    def close() -> None:
        server.close()
        closed_after_release.append(release.is_set())

    closing = threading.Thread(target=close)
    client.start()
    try:
        assert entered.wait(30)
        (request,) = _requests_of(server)
        closing.start()
        time.sleep(0.5)  # time for close to return, were it not to wait
        release.set()
        closing.join(30)
        assert closed_after_release == [True]  # the scrape in flight held it
        assert not request.is_alive()
        client.join(30)
        assert answers == [200]  # the scrape got its answer
    finally:
        release.set()
        client.join(30)
        server.close()
