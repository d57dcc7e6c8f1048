"""The Prometheus adapter both daemons' exporters share.

- ``to_metric``: a prometheus_client family from the rows the core groups
  (``procurator.core.metrics.group_samples``); the master's relayed figures
  and the worker's own per-VM figures are built the same way.
- ``HttpServer``: a WSGI application (prometheus_client's exposition, the
  master's ``/metrics`` + ``/sd`` + ``/healthz``) served on ``host:port`` by
  wsgiref, one daemon thread per request, apart from trio and the capnp
  thread: a slow scrape never delays reconciling or RPC, and the only state
  a request reads is what its application reads, which is thread-safe by the
  exporters' contract. The serving thread sleeps until a connection comes or
  ``close`` wakes it (a byte on its own socket pair): an idle exporter wakes
  no thread (socketserver's ``serve_forever`` polls, 5 wake-ups a second at
  0.2 s: 0.5 ms/s of an idle 1,000-VM worker's CPU, docs/BENCHMARKS.md).
  ``close`` stops the loop, frees the port and joins the serving thread,
  then the requests in flight (bounded). Hostile clients: a request must
  arrive within ``REQUEST_TIMEOUT`` of its connection and its answer go out
  within ``ANSWER_TIMEOUT``, and at most ``MAX_REQUESTS`` are served at once
  (one beyond is closed unread), so silent or trickling connections cannot
  pin threads.
- ``run_http_server``: ``HttpServer`` as a trio service.

One server lifecycle for both exporters: binding (IPv4 or IPv6 by the
address), the error naming the address that cannot be bound, the URL it is
reachable at, an idempotent close.
"""

from __future__ import annotations

import io
import logging
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client.metrics_core import Metric

from procurator.core.errors import PermanentError
from procurator.core.metrics import Family

__all__ = ["HttpServer", "WsgiApp", "run_http_server", "to_metric"]

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def to_metric(family: Family) -> Metric:
    """A prometheus_client family from grouped rows; never mutated after."""
    spec = family.spec
    metric = Metric(spec.family, spec.help, spec.kind.value)
    names = family.label_names
    for values, value in family.rows:
        metric.add_sample(spec.name, dict(zip(names, values, strict=True)), value)
    return metric


# A connection's bounds: its request (line and headers) must arrive within
# REQUEST_TIMEOUT seconds of the connection, however it trickles in (a
# scraper sends it at once), and the answer must go out within
# ANSWER_TIMEOUT (a 10,000-VM worker's uncompressed scrape is tens of MB);
# at most MAX_REQUESTS are served at once (a connection beyond is closed
# unread). A silent, trickling or never-reading client holds a thread that
# long at most, and never more than MAX_REQUESTS threads.
REQUEST_TIMEOUT = 10.0
ANSWER_TIMEOUT = 60.0
MAX_REQUESTS = 32
# How long ``close`` waits for the requests in flight to end.
CLOSE_GRACE = 5.0


class _DeadlineReader(io.RawIOBase):
    """The connection's reads, each given what is left of one deadline."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self._sock.settimeout(left)
        return self._sock.recv_into(buffer)


class _Quiet:
    """wsgiref's error stream: a client gone or timed out mid-answer is the
    client's doing, logged at debug, not a traceback on stderr."""

    def write(self, text: str) -> None:
        if text.strip():
            log.debug("answering a request: %s", text.rstrip())

    def flush(self) -> None:
        pass


class _Handler(WSGIRequestHandler):
    request_timeout = REQUEST_TIMEOUT
    answer_timeout = ANSWER_TIMEOUT

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own file: replaced by one with a deadline
        deadline = time.monotonic() + self.request_timeout
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, deadline))

    def parse_request(self) -> bool:
        parsed = super().parse_request()  # reads the headers, under the deadline
        # The request is in: from here on, the answer's budget.
        self.connection.settimeout(self.answer_timeout)
        return parsed

    def get_stderr(self) -> Any:
        return _Quiet()

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    """A thread per request, tracked (``join_requests``) and capped
    (``max_requests``). The set of them is the serving thread's alone (and
    ``close``'s, once that thread ended): no lock."""

    daemon_threads = True
    block_on_close = False  # close joins its requests itself, with a bound
    max_requests = MAX_REQUESTS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._requests: set[threading.Thread] = set()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            name=f"{threading.current_thread().name}-request",
            daemon=True,
        )
        # Every thread in the set was started: the ended ones go.
        self._requests = {t for t in self._requests if t.is_alive()}
        if len(self._requests) >= self.max_requests:
            log.debug(
                "%s: %d requests in flight; closed unread", client_address, len(self._requests)
            )
            self.shutdown_request(request)
            return
        thread.start()  # no thread to be had (a pids limit): socketserver's handle_error
        self._requests.add(thread)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr. A client that timed out
        # or went away is the client's doing (debug); anything else is ours.
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("%s: request failed", client_address, exc_info=True)
        else:
            log.exception("%s: request failed", client_address)

    def join_requests(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for the requests in flight to end
        (each is bounded by the handler's timeouts anyway)."""
        deadline = time.monotonic() + grace
        for thread in self._requests:
            thread.join(max(0.0, deadline - time.monotonic()))


class HttpServer:
    """Serves ``app`` on ``host:port`` (port 0: any free port, see ``port``)
    from construction until ``close``. ``what`` names it in errors, logs and
    its thread's name ("worker metrics"); ``request_timeout`` and
    ``max_requests`` bound its connections (the module's defaults). Raises
    ``PermanentError`` naming the address when it cannot be bound."""

    def __init__(
        self,
        app: WsgiApp,
        host: str,
        port: int,
        *,
        what: str,
        request_timeout: float = REQUEST_TIMEOUT,
        max_requests: int = MAX_REQUESTS,
    ) -> None:
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server_class: type[_Server] = type(
                "_BoundServer",
                (_Server,),
                {"address_family": family, "max_requests": max_requests},
            )
            handler_class = type("_BoundHandler", (_Handler,), {"request_timeout": request_timeout})
            self._httpd: _Server = make_server(
                host, port, app, server_class=server_class, handler_class=handler_class
            )
        except OSError as exc:
            raise PermanentError(
                f"cannot serve {what} on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.host = host
        self.port: int = self._httpd.server_port
        self._httpd.timeout = 0.0  # handle_request never waits: _serve saw it ready
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()  # close() -> the serve loop
        self._thread = threading.Thread(
            target=self._serve,
            name=f"{what.replace(' ', '-')}-http-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str = "") -> str:
        """``http://host:port`` + ``path`` as bound. A wildcard host (0.0.0.0,
        ::) is not reachable from elsewhere: tell others a routable one."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def _serve(self) -> None:
        """The serving thread: handle each connection as it comes (a thread
        per request), sleeping in between with no timeout, until ``close``
        writes to the wake socket."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._httpd, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is self._wake_r:
                        return
                # Readable: accepts at once (handle_request's own select
                # returns ready), hands the request to its thread.
                self._httpd.handle_request()

    def close(self) -> None:
        """Stop serving; idempotent. Returns once the serving thread ended,
        the port is free and the requests in flight ended (at most
        ``CLOSE_GRACE`` seconds: each is bounded by the handler's timeouts)."""
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join()
        self._httpd.server_close()
        self._httpd.join_requests(CLOSE_GRACE)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def run_http_server(
    app: WsgiApp,
    host: str,
    port: int,
    *,
    what: str,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``HttpServer`` as a trio service: ``server = await nursery.start(
    functools.partial(run_http_server, app, host, port, what=...))``; stops
    when cancelled."""
    server = HttpServer(app, host, port, what=what)
    try:
        task_status.started(server)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)
