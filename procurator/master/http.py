"""The master's HTTP endpoint for Prometheus:

- ``GET /metrics``: the fleet exposition (prometheus_client's WSGI app:
  content negotiation, OpenMetrics, gzip, ``?name[]=`` filters);
- ``GET /sd``: Prometheus HTTP service discovery, a JSON list of target
  groups, one per worker exporter (``http_sd_configs``);
- ``GET /healthz``: ``ok`` while the server runs.

wsgiref in daemon threads (one per request), kept apart from trio and the
capnp thread: a slow scrape never delays reconciling or RPC, and the only
state a request reads is the ``MasterMetrics`` view, which is thread-safe
by contract. ``MasterHttpServer.close`` stops the loop, frees the port and
joins the serving thread; request threads are daemons and end with their
request.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any, Self
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import trio
from prometheus_client import make_wsgi_app

from procurator.core.errors import PermanentError, ProcuratorError
from procurator.master.metrics import MasterMetrics

__all__ = ["MasterHttpServer", "run_master_http"]

log = logging.getLogger(__name__)

_StartResponse = Callable[..., Any]
_POLL_INTERVAL = 0.2  # seconds the serve loop may take to notice close()


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


def _plain(start_response: _StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]


class MasterHttpServer:
    """Serves ``metrics`` on ``host:port`` (port 0: any free port, see
    ``port``) from construction until ``close``. Raises ``PermanentError``
    when the address cannot be bound."""

    def __init__(self, metrics: MasterMetrics, host: str = "0.0.0.0", port: int = 9300) -> None:
        self._metrics = metrics
        self._metrics_app = make_wsgi_app(metrics.registry)
        try:
            family = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0][0]
            server_class: type[_Server] = type(
                "_BoundServer", (_Server,), {"address_family": family}
            )
            self._httpd: _Server = make_server(
                host, port, self._app, server_class=server_class, handler_class=_Handler
            )
        except OSError as exc:
            raise PermanentError(
                f"cannot serve master metrics on {host}:{port}: {exc.strerror or exc}"
            ) from exc
        self.host = host
        self.port: int = self._httpd.server_port
        self._closed = False
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"master-http-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def url(self, path: str = "") -> str:
        """``http://host:port`` + ``path`` as bound (a wildcard host is not
        reachable from elsewhere: tell users the routable one)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        """Stop serving; idempotent. Blocks up to the serve loop's poll."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the WSGI application ----------------------------------------------------

    def _app(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", "only GET and HEAD\n")
        try:
            if path == "/metrics":
                return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
            if path == "/sd":
                return self._sd(start_response)
            if path == "/healthz":
                return _plain(start_response, "200 OK", "ok\n")
            return _plain(start_response, "404 Not Found", "try /metrics, /sd or /healthz\n")
        except ProcuratorError as exc:
            log.warning("%s failed: %s", path, exc)
            return _plain(start_response, "503 Service Unavailable", f"{exc}\n")
        except Exception:
            # The view is the master's code, called from this thread: a bug
            # in it must answer 500 and be logged, not kill the server.
            log.exception("%s raised an unexpected error", path)
            return _plain(start_response, "500 Internal Server Error", "internal error\n")

    def _sd(self, start_response: _StartResponse) -> list[bytes]:
        body = json.dumps(self._metrics.sd_groups(), separators=(",", ":")).encode()
        start_response(
            "200 OK",
            [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        )
        return [body]


async def run_master_http(
    metrics: MasterMetrics,
    host: str = "0.0.0.0",
    port: int = 9300,
    *,
    task_status: trio.TaskStatus[MasterHttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``MasterHttpServer`` as a trio service: ``server = await
    nursery.start(run_master_http, metrics, host, port)``; stops when
    cancelled."""
    server = MasterHttpServer(metrics, host, port)
    try:
        task_status.started(server)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(server.close)
