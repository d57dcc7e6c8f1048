"""An httpx transport for HTTP/1.1 over a unix socket that never leaks sockets.

Why not ``httpx.HTTPTransport(uds=...)``: httpcore's sync backend (1.0.x)
does not close the socket when ``connect()`` fails (ENOENT while a VMM is
starting, ECONNREFUSED on a stale socket); the socket is only closed by the
garbage collector, with a ``ResourceWarning``. A VMM driver polls sockets
that are not there yet all the time, so this transport plugs its own network
backend into an ``httpcore.ConnectionPool`` (public API of both libraries)
and closes the socket on every failure path.

httpcore exceptions are mapped to the httpx exceptions of the same name, so
callers handle ``httpx.HTTPError`` only, as with any httpx transport.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

__all__ = ["UnixSocketTransport"]

_MAPPED: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    # Most specific first.
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


def _to_httpx(exc: Exception, request: httpx.Request) -> Exception:
    for source, target in _MAPPED:
        if isinstance(exc, source):
            if issubclass(target, httpx.RequestError):
                return target(str(exc), request=request)
            return target(str(exc))
    return exc


class _SocketStream(httpcore.NetworkStream):
    """One connection. Syscalls are what a request costs on a busy worker
    (hundreds of health checks and counter polls a minute): the timeout is
    set only when it changes, and empty writes (h11's end of a bodiless
    message) are not sent."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._timeout: float | None = sock.gettimeout()

    def _set_timeout(self, timeout: float | None) -> None:
        if timeout != self._timeout:
            self._sock.settimeout(timeout)
            self._timeout = timeout

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._set_timeout(timeout)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._set_timeout(timeout)
            self._sock.sendall(buffer)
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # An idle keep-alive connection that is readable was closed by the
            # peer (or sent something unasked): either way, not reusable, as
            # httpcore's own backends decide. One poll(2), no mode switches
            # (a recv under a socket timeout would first wait for data).
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        return None


class _UnixBackend(httpcore.NetworkBackend):
    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return _SocketStream(sock)

    def connect_tcp(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise httpcore.UnsupportedProtocol("this transport only speaks over a unix socket")

    def sleep(self, seconds: float) -> None:  # pragma: no cover - retries are off
        time.sleep(seconds)


class _ResponseStream(httpx.SyncByteStream):
    def __init__(self, stream: Iterable[bytes], request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except Exception as exc:
            raise _to_httpx(exc, self._request) from exc

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class UnixSocketTransport(httpx.BaseTransport):
    """HTTP/1.1 to ``path``; the URL's host is only used for the Host header."""

    def __init__(self, path: str, *, max_connections: int = 4) -> None:
        self._pool = httpcore.ConnectionPool(
            uds=path,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            http1=True,
            http2=False,
            retries=0,
            network_backend=_UnixBackend(),
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions=request.extensions,
        )
        try:
            response = self._pool.handle_request(core_request)
        except Exception as exc:
            raise _to_httpx(exc, request) from exc
        assert isinstance(response.stream, Iterable)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, request),
            extensions=response.extensions,
        )

    def close(self) -> None:
        self._pool.close()
