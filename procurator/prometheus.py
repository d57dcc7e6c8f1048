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
  ``close`` stops the loop, frees the port and joins the serving thread;
  request threads are daemons and end with their request.
- ``run_http_server``: ``HttpServer`` as a trio service.

One server lifecycle for both exporters: binding (IPv4 or IPv6 by the
address), the error naming the address that cannot be bound, the URL it is
reachable at, an idempotent close.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
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


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class HttpServer:
    """Serves ``app`` on ``host:port`` (port 0: any free port, see ``port``)
    from construction until ``close``. ``what`` names it in errors, logs and
    its thread's name ("worker metrics"). Raises ``PermanentError`` naming
    the address when it cannot be bound."""

    def __init__(self, app: WsgiApp, host: str, port: int, *, what: str) -> None:
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server_class: type[_Server] = type(
                "_BoundServer", (_Server,), {"address_family": family}
            )
            self._httpd: _Server = make_server(
                host, port, app, server_class=server_class, handler_class=_Handler
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
        """Stop serving; idempotent. Returns once the serving thread ended
        and the port is free."""
        if self._closed:
            return
        self._closed = True
        self._wake_w.send(b"x")
        self._thread.join()
        self._httpd.server_close()
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
