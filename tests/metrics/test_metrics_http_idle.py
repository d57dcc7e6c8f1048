"""The exporters' HTTP server (procurator.prometheus.HttpServer) costs an
idle daemon nothing: its serving thread sleeps until a connection comes or
``close`` wakes it, with no poll (issue 31 target 3: socketserver's
``serve_forever`` woke 5 times a second, 0.5 ms/s of an idle 1,000-VM
worker). Real sockets, the real thread's scheduler counters."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

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


def test_idle_server_thread_does_not_wake_and_closes_at_once() -> None:
    server = HttpServer(_app, "127.0.0.1", 0, what="test")
    try:
        thread = _serving_thread(server)
        assert httpx.get(server.url("/metrics")).text == "ok\n"
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
