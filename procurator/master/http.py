from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import trio
from prometheus_client import make_wsgi_app

from procurator.core.errors import ProcuratorError
from procurator.master.metrics import MasterMetrics
from procurator.prometheus import HttpServer, run_http_server

__all__ = ["MasterHttpApp", "run_master_http", "serve_master_http"]

log = logging.getLogger(__name__)

_StartResponse = Callable[..., Any]
_WHAT = "master metrics"


def _plain(start_response: _StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(
        status,
        [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
    )
    return [body]


class MasterHttpApp:
    """The WSGI application of the master's endpoint (see the module
    docstring): called from the HTTP server's threads."""

    def __init__(self, metrics: MasterMetrics) -> None:
        self._metrics = metrics
        self._metrics_app = make_wsgi_app(metrics.registry)

    def __call__(self, environ: dict[str, Any], start_response: _StartResponse) -> Iterable[bytes]:
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


def serve_master_http(
    metrics: MasterMetrics, host: str = "0.0.0.0", port: int = 9300
) -> HttpServer:
    """Serve the master's endpoint on ``host:port`` until ``close``."""
    return HttpServer(MasterHttpApp(metrics), host, port, what=_WHAT)


async def run_master_http(
    metrics: MasterMetrics,
    host: str = "0.0.0.0",
    port: int = 9300,
    *,
    task_status: trio.TaskStatus[HttpServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``serve_master_http`` as a trio service: ``server = await
    nursery.start(run_master_http, metrics, host, port)``; stops when
    cancelled."""
    await run_http_server(MasterHttpApp(metrics), host, port, what=_WHAT, task_status=task_status)
