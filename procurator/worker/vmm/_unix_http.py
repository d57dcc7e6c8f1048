"""An httpx transport for HTTP/1.1 over a unix socket: small and leak-free.

Why not ``httpx.HTTPTransport(uds=...)``:

- httpcore's sync backend (1.0.x) does not close the socket when
  ``connect()`` fails (ENOENT while a VMM is starting, ECONNREFUSED on a
  stale socket); the socket is only closed by the garbage collector, with a
  ``ResourceWarning``. A VMM driver polls sockets that are not there yet all
  the time.
- Cost. A worker makes one API call per VM every health interval (67 calls
  a second at 1,000 VMs); through httpcore's pool and h11's state machine
  the transport alone cost ~220 µs of CPU per call, half of the whole call
  (docs/BENCHMARKS.md). The peer is one local VMM answering one request at
  a time, so this transport writes a request with one ``sendall`` and
  parses the answer with bytes methods; a request its sender marks
  ``KEPT`` (sent again unchanged, as the sweep's counters request is) is
  encoded once.

What it speaks: HTTP/1.1 requests with the headers httpx built (a body is
sent as it is framed by those headers: Content-Length, or chunked when httpx
chose that for a streamed body); answers framed by Content-Length, the
chunked transfer coding (alone) or the end of the connection; 1xx interim answers are
skipped. A connection is kept for the next request unless the peer says
``Connection: close`` (or speaks HTTP/1.0 without keep-alive), left bytes
behind, or idled longer than ``keepalive_expiry``; before reuse one
``poll(2)`` checks the peer did not close it meanwhile. A GET or HEAD that
finds its reused connection closed before any byte of the answer is retried
once on a new connection (the race between that check and the peer's idle
close); other methods are never retried.

The read timeout bounds a whole answer, not each recv as httpx's does: a
peer trickling its bytes times out like a silent one.

Limits (a VMM answer is a few KiB; more is a broken or hostile peer): the
head of an answer at most ``MAX_HEAD_BYTES`` (its interim answers' heads
included), its chunked body's trailers as much again, its body at most
``max_body_bytes``.

Errors are httpx's own, as from any httpx transport: ``ConnectError`` /
``ConnectTimeout``, ``WriteError`` / ``WriteTimeout``, ``ReadError`` /
``ReadTimeout``, ``RemoteProtocolError`` (malformed, oversized or truncated
answer, or the peer closed without answering), ``LocalProtocolError``
(a header that cannot be sent). Every failure closes the connection it
happened on.

Thread-safe: concurrent requests each use their own connection; at most
``max_idle`` idle connections are kept. Lock: ``_lock`` guards ``_idle`` and
``_closed`` only and is never held across I/O.
"""

from __future__ import annotations

import select
import socket
import threading
import time

import httpx

__all__ = ["KEPT", "MAX_HEAD_BYTES", "UnixSocketTransport"]

MAX_HEAD_BYTES = 64 * 1024
_RECV_BYTES = 64 * 1024
_IDEMPOTENT = frozenset({"GET", "HEAD"})
_NO_BODY_STATUS = frozenset({204, 304})
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")
#: A request's extension saying it is sent again unchanged: its bytes are
#: kept (in the request's attribute ``_ENCODED``) after its first send.
KEPT = "procurator.kept"
_ENCODED = "_procurator_encoded"


class _PeerClosed(Exception):
    """The peer closed the connection before any byte of an answer."""


class _Connection:
    __slots__ = ("buffer", "deadline", "idle_since", "poller", "received", "sock", "timeout")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.poller: select.poll | None = None  # made at the first check for reuse
        self.timeout: float | None = sock.gettimeout()
        self.buffer = bytearray()
        self.idle_since = 0.0
        self.received = 0  # bytes received for the current answer
        self.deadline: float | None = None  # the current answer's, by the read timeout

    def set_timeout(self, timeout: float | None) -> None:
        # A settimeout is two fcntl calls; most requests reuse the last one.
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout

    def fill(self) -> bool:
        """Read what is there into the buffer; False at the end of the stream.
        ``TimeoutError`` once the answer's deadline passed: the read timeout
        bounds the whole answer, not each recv (a peer trickling bytes would
        hold the caller as long as it liked). The socket's timeout is only
        shortened for an answer that takes more than one recv."""
        if self.received and self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the answer did not come whole within the read timeout")
            self.set_timeout(left)
        chunk = self.sock.recv(_RECV_BYTES)
        if not chunk:
            return False
        self.buffer += chunk
        self.received += len(chunk)
        return True

    def reusable(self, now: float, expiry: float) -> bool:
        if self.buffer or now - self.idle_since > expiry:
            return False
        # Readable while idle: the peer closed it (or sent something
        # unasked); either way not reusable. One poll(2), no mode switches;
        # the poller is the connection's, kept for its next reuse.
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.sock, select.POLLIN)
        return not poller.poll(0)

    def close(self) -> None:
        self.sock.close()


class UnixSocketTransport(httpx.BaseTransport):
    """HTTP/1.1 to ``path``; the URL's host is only used for the Host header."""

    def __init__(
        self,
        path: str,
        *,
        max_idle: int = 4,
        keepalive_expiry: float = 30.0,
        max_body_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._path = path
        self._max_idle = max_idle
        self._keepalive_expiry = keepalive_expiry
        self._max_body = max_body_bytes
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._closed = False

    # -- httpx.BaseTransport -------------------------------------------------------

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        extensions = request.extensions
        timeouts = extensions.get("timeout") or {}
        # A request its sender marks ``KEPT`` (sent again, never changed:
        # the driver's bodiless ones, such as the counters request the sweep
        # sends to every VMM) is encoded once, its bytes kept on the request
        # object itself: a request made from its extensions (a redirect's)
        # does not inherit them. Only those: a caller may change an
        # unmarked request between two sends.
        data: bytes | None = getattr(request, _ENCODED, None)
        if data is None:
            data = _encode(request)
            if extensions.get(KEPT):
                setattr(request, _ENCODED, data)
        conn = self._take_idle()
        if conn is not None:
            try:
                return self._exchange(conn, request, data, timeouts)
            except _PeerClosed:
                if request.method not in _IDEMPOTENT:
                    raise httpx.RemoteProtocolError(
                        "Server disconnected without sending a response.", request=request
                    ) from None
        conn = self._connect(request, timeouts.get("connect"))
        try:
            return self._exchange(conn, request, data, timeouts)
        except _PeerClosed:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            ) from None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- connections ---------------------------------------------------------------

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        stale: list[_Connection] = []
        found: _Connection | None = None
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if conn.reusable(now, self._keepalive_expiry):
                    found = conn
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return found

    def _give_back(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def _connect(self, request: httpx.Request, timeout: float | None) -> _Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(self._path)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ConnectTimeout(str(exc), request=request) from exc
        except OSError as exc:
            sock.close()
            raise httpx.ConnectError(str(exc), request=request) from exc
        return _Connection(sock)

    # -- one request -----------------------------------------------------------------

    def _exchange(
        self,
        conn: _Connection,
        request: httpx.Request,
        data: bytes,
        timeouts: dict[str, float | None],
    ) -> httpx.Response:
        """Send ``data`` and read the answer on ``conn``; ``conn`` is given
        back or closed, whatever happens."""
        try:
            try:
                conn.set_timeout(timeouts.get("write"))
                conn.sock.sendall(data)
            except TimeoutError as exc:
                raise httpx.WriteTimeout(str(exc), request=request) from exc
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The peer closed an idle connection as we wrote to it.
                raise _PeerClosed from exc
            except OSError as exc:
                raise httpx.WriteError(str(exc), request=request) from exc
            try:
                conn.received = 0
                read_timeout = timeouts.get("read")
                conn.set_timeout(read_timeout)
                conn.deadline = None if read_timeout is None else time.monotonic() + read_timeout
                response, keep = _read_response(conn, request, self._max_body)
            except TimeoutError as exc:
                raise httpx.ReadTimeout(str(exc), request=request) from exc
            except ConnectionResetError as exc:
                if conn.received:
                    raise httpx.ReadError(str(exc), request=request) from exc
                raise _PeerClosed from exc
            except OSError as exc:
                raise httpx.ReadError(str(exc), request=request) from exc
        except BaseException:
            conn.close()
            raise
        if keep and not conn.buffer:
            self._give_back(conn)
        else:
            conn.close()
        return response


def _encode(request: httpx.Request) -> bytes:
    """The request's bytes: request line, headers, body as framed.

    The headers are formatted in one pass and checked as one block: each
    line adds exactly one CR and one LF, so any more of either (or a NUL)
    means a name or value that would split the request; only then are the
    lines looked at one by one to name it (a third of the CPU of checking
    every header for every forbidden byte; the sweep encodes one request
    per idle VM per counters interval)."""
    body = request.read()
    raw = request.headers.raw
    block = b"".join([b"%s: %s\r\n" % pair for pair in raw])
    if b"\0" in block or block.count(b"\r") != len(raw) or block.count(b"\n") != len(raw):
        raise _header_error(raw)
    head = b"%s %s HTTP/1.1\r\n%s\r\n" % (
        request.method.encode("ascii"),
        request.url.raw_path,
        block,
    )
    if b"chunked" not in block.lower() or not _is_chunked(raw):
        return head + body
    if body:
        return b"%s%x\r\n%s\r\n0\r\n\r\n" % (head, len(body), body)
    return head + b"0\r\n\r\n"


def _is_chunked(raw: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"transfer-encoding" and value.lower() == b"chunked" for name, value in raw
    )


def _header_error(raw: list[tuple[bytes, bytes]]) -> httpx.LocalProtocolError:
    """The error for the first header holding a CR, LF or NUL."""
    for name, value in raw:
        for bad in _FORBIDDEN_IN_HEADERS:
            if bad in name or bad in value:
                return httpx.LocalProtocolError(f"header {name!r} cannot be sent: it holds {bad!r}")
    return httpx.LocalProtocolError("a header holds a CR, LF or NUL")


def _protocol_error(message: str, request: httpx.Request) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(message, request=request)


def _read_until(
    conn: _Connection, separator: bytes, limit: int, request: httpx.Request, what: str
) -> bytes:
    """The bytes before ``separator`` (both taken off the buffer). The end
    of the stream before any byte of the answer is ``_PeerClosed``."""
    buf = conn.buffer
    searched = 0
    while True:
        end = buf.find(separator, searched)
        if end >= 0:
            data = bytes(buf[:end])
            del buf[: end + len(separator)]
            return data
        if len(buf) > limit:
            raise _protocol_error(f"{what} is longer than {limit} bytes", request)
        searched = max(0, len(buf) - len(separator) + 1)
        if not conn.fill():
            if not conn.received:
                raise _PeerClosed
            raise _protocol_error(
                f"the peer closed the connection in the middle of {what}", request
            )


def _read_exact(conn: _Connection, size: int, request: httpx.Request) -> bytes:
    buf = conn.buffer
    while len(buf) < size:
        if not conn.fill():
            raise _protocol_error(
                f"the peer closed the connection after {len(buf)} of {size} body bytes", request
            )
    data = bytes(buf[:size])
    del buf[:size]
    return data


def _read_into(conn: _Connection, size: int, into: bytearray, request: httpx.Request) -> None:
    """``_read_exact``, appended to ``into`` (no bytes object of its own)."""
    buf = conn.buffer
    while len(buf) < size:
        if not conn.fill():
            raise _protocol_error(
                f"the peer closed the connection after {len(buf)} of {size} body bytes", request
            )
    into += buf[:size]  # a passing copy, freed at once
    del buf[:size]


def _read_chunked(conn: _Connection, limit: int, request: httpx.Request) -> bytes:
    # One growing buffer, not a bytes object per chunk: a peer's 1-byte
    # chunks would cost ~40 times the body's size in objects and list slots.
    body = bytearray()
    total = 0
    while True:
        line = _read_until(conn, b"\r\n", 1024, request, "a chunk size line")
        digits = line.split(b";", 1)[0].strip()
        if not digits or digits.strip(b"0123456789abcdefABCDEF"):
            raise _protocol_error(f"malformed chunk size line {line[:80]!r}", request)
        size = int(digits, 16)
        if size == 0:
            # Trailers, if any, up to the empty line: all of them together
            # within the bound on a head, not each line alone.
            trailers = 0
            while line := _read_until(conn, b"\r\n", MAX_HEAD_BYTES, request, "the trailers"):
                trailers += len(line) + 2
                if trailers > MAX_HEAD_BYTES:
                    raise _protocol_error(
                        f"the trailers are longer than {MAX_HEAD_BYTES} bytes", request
                    )
            return bytes(body)
        total += size
        if total > limit:
            raise _protocol_error(f"the answer's body is larger than {limit} bytes", request)
        _read_into(conn, size, body, request)
        if _read_exact(conn, 2, request) != b"\r\n":
            raise _protocol_error("a chunk is not followed by CRLF", request)


def _read_to_end(conn: _Connection, limit: int, request: httpx.Request) -> bytes:
    buf = conn.buffer
    while True:
        if len(buf) > limit:
            raise _protocol_error(f"the answer's body is larger than {limit} bytes", request)
        if not conn.fill():
            break
    data = bytes(buf)
    buf.clear()
    return data


def _parse_head(
    head: bytes, request: httpx.Request
) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    lines = head.split(b"\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise _protocol_error(f"malformed status line {status_line[:80]!r}", request)
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b"\0" in line:
            raise _protocol_error(f"malformed header line {line[:80]!r}", request)
        headers.append((name, value.strip(b" \t")))
    return version, int(code), reason, headers


def _read_response(
    conn: _Connection, request: httpx.Request, max_body: int
) -> tuple[httpx.Response, bool]:
    """One answer from ``conn``, and whether the connection may be reused."""
    heads = 0  # bytes of this answer's heads: its interim answers' and its own
    while True:
        head = _read_until(conn, b"\r\n\r\n", MAX_HEAD_BYTES, request, "the answer's head")
        heads += len(head) + 4
        if heads > MAX_HEAD_BYTES:
            raise _protocol_error(
                f"the answer's head (with its interim answers) is longer than "
                f"{MAX_HEAD_BYTES} bytes",
                request,
            )
        version, status, reason, headers = _parse_head(head, request)
        if not (100 <= status < 200) or status == 101:
            break
        # An interim answer (100 Continue, 102, 103): the real one follows,
        # within what is left of the bound on a head (else a peer could
        # send them without end, each recv within the read timeout).
    length: bytes | None = None
    transfer: bytes | None = None
    tokens: set[bytes] = set()
    for name, value in headers:
        lower = name.lower()
        if lower == b"content-length":
            if length is not None and value != length:
                raise _protocol_error("conflicting Content-Length headers", request)
            length = value
        elif lower == b"transfer-encoding":
            transfer = value.lower()
        elif lower == b"connection":
            tokens.update(token.strip().lower() for token in value.split(b","))
    # HTTP/1.1 keeps the connection unless told otherwise; 1.0 only when told.
    keep = b"close" not in tokens if version == b"HTTP/1.1" else b"keep-alive" in tokens
    if request.method == "HEAD" or status in _NO_BODY_STATUS or status == 101:
        body = b""
        keep = keep and status != 101
    elif transfer is not None:
        if transfer != b"chunked":
            raise _protocol_error(f"unsupported Transfer-Encoding {transfer[:80]!r}", request)
        body = _read_chunked(conn, max_body, request)
    elif length is not None:
        if not length.isdigit():
            raise _protocol_error(f"malformed Content-Length {length[:80]!r}", request)
        size = int(length)
        if size > max_body:
            raise _protocol_error(
                f"the answer's body of {size} bytes is larger than {max_body}", request
            )
        body = _read_exact(conn, size, request)
    else:
        body = _read_to_end(conn, max_body, request)
        keep = False
    response = httpx.Response(
        status_code=status,
        headers=headers,
        stream=httpx.ByteStream(body),
        extensions={"http_version": version, "reason_phrase": reason},
        request=request,
    )
    return response, keep
