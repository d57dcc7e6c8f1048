"""The preamble that authenticates each connection of a move's streams
(docs/SNAPSHOTS.md, "Moves"): one wire format, checked by the worker, so
a VMM never sees a byte from a peer that did not present the move's token.

Why the worker and not the VMM: the target's listeners are the worker's
(QEMU's migration and NBD streams, cloud-hypervisor's relay), and without
a check anyone who reaches a port before the source could feed the target
a VM state or read (and write) its disks. QEMU's own TLS would put keys in
the jail and take one certificate per VM; a token checked before the
descriptor (or the relayed stream) is handed on costs one round trip per
connection and nothing in the jail.

Wire format (source -> target, first on the connection)::

    b"PROCURATOR-STREAM 1\\n"   magic and version (``MAGIC``)
    one byte n                 the token's length, 16 to 255
    n bytes                    the token (the move's secret)

then target -> source, one line: ``ok`` (accepted: from here on the
connection is the VMM's stream, both ways) or ``error: <why>`` (refused;
the target closes). A stream that opens with ``PROCURATOR-`` but not this
magic comes from a worker of another release (the cold transfer's first
version opened with ``PROCURATOR-MOVE 1``): its refusal says so
(``ANOTHER_VERSION``), so that a move between workers of two releases
names the cause on the source's side too. A source reads exactly the answer line, so no byte of
the VMM's stream is taken from it; a target reads exactly the preamble.

The target (``Gate``) reads every connection's preamble without blocking
on any one of them, each bounded by ``PREAMBLE_TIMEOUT`` after its accept
(what arrived by the time the gate looks counts: its caller may be away
between two ``accept`` calls past a connection's deadline) and by its
length: a peer that sends another token, garbage or nothing in
time is answered (when it sent something), dropped and logged, and the
gate accepts on, so the right peer still gets through. Tokens are compared
in constant time (``secrets.compare_digest``). At most ``MAX_PENDING``
connections wait for their preamble at once; a new one beyond that takes
the place of the one waiting longest, which is dropped (were the new one
dropped instead, ``MAX_PENDING`` silent peers renewed every
``PREAMBLE_TIMEOUT`` would keep the source out for good; the source
presents its token as it connects, so a flood must fill every place
within that one round trip to push it out). An ``accept(2)`` that fails
for want of a resource or for a connection that went away before it was
taken (``TRANSIENT_ACCEPT_ERRORS``: EMFILE, ENFILE, ENOBUFS, ENOMEM,
ECONNABORTED, EPROTO, EINTR) is logged and tried again after a backoff
(``ACCEPT_BACKOFF`` doubling to ``MAX_ACCEPT_BACKOFF``; the listener is not
polled meanwhile, lest a connection the kernel holds in the backlog spin
the gate): the source retries nothing while its connection waits there.
Any other error ends ``accept`` with ``AcceptFailed``, naming the stream
and the reason. That rule is ``AcceptRetry``, the one every accept loop of
a move follows (the gate, the source relay's wait for its VMM in
``procurator.worker.vmm._migration_relay``, the cold transfer's receiver).

The cold disk transfer (``procurator.worker.move_transfer``) opens with
the same preamble, read by a thread per connection (``read_token``, by
the same ``PREAMBLE_TIMEOUT``), its
token then looked up among the transfers expected, and answered with the
same ``ok`` / ``error: <why>`` lines (``accept``, ``refusal``).

Blocking code, for worker threads; a ``Gate`` is used by one thread at a
time (``interrupt`` from any thread, also after ``close``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import select
import socket
import threading
import time
from dataclasses import dataclass, field

from procurator.core.errors import TemporaryError

__all__ = [
    "ACCEPT_BACKOFF",
    "ANOTHER_VERSION",
    "MAGIC",
    "MAX_ACCEPT_BACKOFF",
    "MAX_PENDING",
    "MAX_TOKEN_BYTES",
    "MIN_TOKEN_BYTES",
    "PREAMBLE_TIMEOUT",
    "TRANSIENT_ACCEPT_ERRORS",
    "AcceptFailed",
    "AcceptRetry",
    "Gate",
    "StreamRefused",
    "accept",
    "preamble",
    "present",
    "read_token",
    "refusal",
]

log = logging.getLogger(__name__)

MAGIC = b"PROCURATOR-STREAM 1\n"
MIN_TOKEN_BYTES = 16
MAX_TOKEN_BYTES = 255
#: Seconds a connection has, from its accept, to present its preamble.
PREAMBLE_TIMEOUT = 5.0
#: Connections waiting for their preamble at once; more are dropped.
MAX_PENDING = 16
#: Errors of ``accept(2)`` a gate waits out (see the module docstring).
TRANSIENT_ACCEPT_ERRORS = frozenset(
    {
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EINTR,
    }
)
#: Seconds before a gate accepts again after the first transient error,
#: doubled by each one in a row up to ``MAX_ACCEPT_BACKOFF``.
ACCEPT_BACKOFF = 0.05
MAX_ACCEPT_BACKOFF = 1.0
ACCEPTED = b"ok\n"
# What every version's streams open with (the cold transfer's first
# version: ``PROCURATOR-MOVE 1``): a stream that differs after it comes
# from a worker of another release, and is told so.
_FAMILY = b"PROCURATOR-"
#: Why a stream of another version of the wire is refused.
ANOTHER_VERSION = (
    "a procurator stream of another version (this worker speaks "
    f"{MAGIC.decode().strip()}; both workers of a move must run the same release)"
)
_REFUSED = b"error: "
_MAX_ANSWER = 256
_HEADER = len(MAGIC) + 1


class StreamRefused(TemporaryError):
    """The target refused the connection's preamble, or the connection
    failed before it answered; the message says why."""


class AcceptFailed(OSError):
    """A gate's listener failed with an error that waiting does not mend
    (not one of ``TRANSIENT_ACCEPT_ERRORS``); the message names the stream
    and the reason, ``errno`` is the listener's."""

    def __str__(self) -> str:
        return str(self.strerror)  # the message, without "[Errno n]"


class AcceptRetry:
    """The one rule for a listener whose ``accept(2)`` failed, shared by
    every accept loop of a move (the gate, the relay's, the cold
    transfer's receiver): ``failed`` says how long to wait before
    accepting again after one of ``TRANSIENT_ACCEPT_ERRORS`` (logged;
    ``ACCEPT_BACKOFF`` doubling to ``MAX_ACCEPT_BACKOFF`` while they come
    in a row), and raises ``AcceptFailed`` for any other; ``succeeded``
    after an accept starts the backoff over. ``what`` names the stream.
    The caller waits (interruptibly) and does not poll the listener
    meanwhile: a connection the kernel holds in the backlog would spin it."""

    def __init__(self, what: str) -> None:
        self.what = what
        #: Seconds of the last wait asked for (0 after an accept).
        self.delay = 0.0

    def failed(self, exc: OSError) -> float:
        """Seconds to wait after ``exc``; raises ``AcceptFailed`` when
        waiting does not mend it."""
        reason = exc.strerror or str(exc)
        if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
            raise AcceptFailed(
                exc.errno, f"{self.what}: cannot accept connections: {reason}"
            ) from exc
        self.delay = min(max(self.delay * 2, ACCEPT_BACKOFF), MAX_ACCEPT_BACKOFF)
        log.warning(
            "%s: cannot accept a connection (%s): trying again in %g s",
            self.what,
            reason,
            self.delay,
        )
        return self.delay

    def succeeded(self) -> None:
        """An accept went through: the next error waits ``ACCEPT_BACKOFF``."""
        self.delay = 0.0


def preamble(token: bytes) -> bytes:
    """What a source writes first on a move's connection."""
    if not MIN_TOKEN_BYTES <= len(token) <= MAX_TOKEN_BYTES:
        raise ValueError(f"a token has {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes")
    return MAGIC + bytes([len(token)]) + token


def present(conn: socket.socket, token: bytes, *, deadline: float) -> None:
    """The source's side: write the preamble on ``conn`` (connected), read
    the target's answer by ``deadline`` (``time.monotonic()``); return once
    accepted, the connection left blocking without a timeout. Raises
    ``StreamRefused`` with the target's reason (or what failed)."""
    answer = b""
    try:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        conn.sendall(preamble(token))
        # Byte by byte: nothing after the answer line is the preamble's.
        while not answer.endswith(b"\n") and len(answer) < _MAX_ANSWER:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            byte = conn.recv(1)
            if not byte:
                break
            answer += byte
    except TimeoutError as exc:
        raise StreamRefused("the target did not answer the stream's preamble in time") from exc
    except OSError as exc:
        raise StreamRefused(f"the stream's preamble: {exc.strerror or exc}") from exc
    if answer == ACCEPTED:
        conn.settimeout(None)
        return
    if answer.startswith(_REFUSED) and answer.endswith(b"\n"):
        why = answer[len(_REFUSED) : -1].decode("utf-8", "replace")
        raise StreamRefused(f"the target refused the stream: {why}")
    if not answer:
        raise StreamRefused("the target closed the stream without answering its preamble")
    raise StreamRefused(f"the target answered the stream's preamble with {answer[:64]!r}")


@dataclass
class _Preamble:
    """A preamble as it arrives, checked as early as its bytes allow."""

    data: bytearray = field(default_factory=bytearray)

    def needed(self) -> int:
        """Bytes still to read: the header first, then the token it sizes."""
        if len(self.data) < _HEADER:
            return _HEADER - len(self.data)
        return _HEADER + self.data[_HEADER - 1] - len(self.data)

    def feed(self, chunk: bytes) -> str | None:
        """Add ``chunk`` (at most ``needed()`` bytes); why the preamble is
        refused already, or None."""
        self.data += chunk
        if not MAGIC.startswith(bytes(self.data[: len(MAGIC)])):
            if self.data.startswith(_FAMILY):
                return ANOTHER_VERSION
            return "not a procurator stream"
        if len(self.data) >= _HEADER and self.data[_HEADER - 1] < MIN_TOKEN_BYTES:
            return "wrong token"  # too short to be one: said as for any other
        return None

    @property
    def token(self) -> bytes:
        return bytes(self.data[_HEADER:])


def read_token(conn: socket.socket, *, deadline: float) -> bytes:
    """The target's side on a connection a thread of its own serves: read
    exactly the preamble by ``deadline`` (monotonic) and return the token
    it presents, for the caller to judge and answer (``accept`` or
    ``refuse``). Raises ``StreamRefused`` saying why when it is no
    preamble (also when the peer hung up or said nothing in time)."""
    preamble = _Preamble()
    try:
        while needed := preamble.needed():
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = conn.recv(needed)
            if not chunk:
                raise StreamRefused("it hung up before its preamble")
            why = preamble.feed(chunk)
            if why is not None:
                raise StreamRefused(why)
    except TimeoutError as exc:
        raise StreamRefused("no preamble in time") from exc
    except OSError as exc:
        raise StreamRefused(f"{exc.strerror or exc}") from exc
    return preamble.token


def accept(conn: socket.socket) -> None:
    """Accept a preamble: the connection is the stream's from here on."""
    conn.sendall(ACCEPTED)


def refusal(why: str) -> bytes:
    """The line that refuses a preamble (or, on the cold transfer, the
    transfer), before the target closes."""
    return _REFUSED + why.encode() + b"\n"


@dataclass
class _Pending:
    """A connection waiting for its preamble."""

    conn: socket.socket
    peer: str
    deadline: float
    preamble: _Preamble = field(default_factory=_Preamble)

    @property
    def fd(self) -> int:
        """Its key among the waiting (-1 once closed)."""
        return self.conn.fileno()


class Gate:
    """The target's side on ``listener`` (a listening TCP socket, which
    stays the caller's): ``accept`` returns the next connection that
    presented ``token``, answered ``ok`` (see the module docstring).
    ``what`` names the stream in logs."""

    def __init__(
        self,
        listener: socket.socket,
        token: bytes,
        *,
        what: str,
        timeout: float = PREAMBLE_TIMEOUT,
        max_pending: int = MAX_PENDING,
    ) -> None:
        preamble(token)  # its shape checked once
        self._listener = listener
        self._token = token
        self._what = what
        self._timeout = timeout
        self._max_pending = max_pending
        self._pending: dict[int, _Pending] = {}
        #: Peers dropped so far (wrong token, garbage, silence), for tests and logs.
        self.dropped = 0
        # After a transient accept error: not before this (monotonic)
        # does the gate accept again, nor poll its listener.
        self._accept_not_before = 0.0
        self._retry = AcceptRetry(what)
        self._wake_r, self._wake_w = os.pipe()
        # Leaf: ``interrupt`` never writes to a pipe ``close`` closed (its
        # descriptor number may be someone else's by then).
        self._lock = threading.Lock()
        self._closed = False

    def interrupt(self) -> None:
        """Wake an ``accept`` under way (it returns None; so does every
        later one); thread-safe, and a no-op once closed."""
        with self._lock:
            if not self._closed:
                os.write(self._wake_w, b"x")

    def accept(self, deadline: float | None = None) -> socket.socket | None:
        """The next authenticated connection (blocking, no timeout), or None
        once ``interrupt`` was called or ``deadline`` (monotonic) passed.
        Raises ``AcceptFailed`` when the listener fails for good."""
        if self._closed:
            return None
        self._listener.setblocking(False)
        while True:
            now = time.monotonic()
            for pending in [p for p in self._pending.values() if p.deadline <= now]:
                # What it sent while nobody looked counts (the caller may
                # be away between two accepts: a relay connecting its
                # last peer to the VMM); only a preamble still short is
                # late.
                accepted = self._read_what_came(pending)
                if accepted is not None:
                    return accepted
                if self._pending.get(pending.fd) is pending:
                    self._drop(pending, f"no preamble within {self._timeout:g} s")
            if deadline is not None and deadline <= now:
                return None
            waits = [p.deadline for p in self._pending.values()]
            if deadline is not None:
                waits.append(deadline)
            listening = self._accept_not_before <= now
            if not listening:
                waits.append(self._accept_not_before)
            wait = None if not waits else max(int((min(waits) - now) * 1000) + 1, 1)
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            if listening:
                poller.register(self._listener, select.POLLIN)
            for fd in self._pending:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(wait):
                if fd == self._wake_r:
                    return None
                if fd == self._listener.fileno():
                    self._accept_one()
                    continue
                waiting = self._pending.get(fd)
                if waiting is not None:
                    accepted = self._read(waiting)
                    if accepted is not None:
                        return accepted

    def _accept_one(self) -> None:
        try:
            conn, address = self._listener.accept()
        except BlockingIOError:
            return
        except OSError as exc:
            self._accept_not_before = time.monotonic() + self._retry.failed(exc)
            return
        self._retry.succeeded()
        peer = _describe(address)
        if len(self._pending) >= self._max_pending:
            # The oldest makes room, not the newest: dropping the newest
            # would let as many silent peers as may wait, each replaced
            # before its deadline, keep the source out for good. The source
            # presents its token as it connects, so to evict it a flood
            # must fill every place within that round trip.
            oldest = min(self._pending.values(), key=lambda p: p.deadline)
            self._drop(oldest, f"{self._max_pending} newer connections came before its preamble")
        conn.setblocking(False)
        self._pending[conn.fileno()] = _Pending(conn, peer, time.monotonic() + self._timeout)

    def _read_what_came(self, pending: _Pending) -> socket.socket | None:
        """``_read`` until ``pending`` has no more bytes waiting, is
        dropped, or presented the token (returned)."""
        while self._pending.get(pending.fd) is pending:
            before = len(pending.preamble.data)
            accepted = self._read(pending)
            if accepted is not None or len(pending.preamble.data) == before:
                return accepted
        return None

    def _read(self, pending: _Pending) -> socket.socket | None:
        try:
            chunk = pending.conn.recv(pending.preamble.needed())
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            self._drop(pending, f"{exc.strerror or exc}", answer=False)
            return None
        if not chunk:
            self._drop(pending, "it hung up before its preamble", answer=False)
            return None
        why = pending.preamble.feed(chunk)
        if why is not None:
            self._drop(pending, why)
            return None
        if pending.preamble.needed():
            return None
        if not secrets.compare_digest(pending.preamble.token, self._token):
            self._drop(pending, "wrong token")
            return None
        conn = pending.conn
        del self._pending[conn.fileno()]
        try:
            conn.setblocking(True)
            accept(conn)
        except OSError as exc:
            self._drop(pending, f"{exc.strerror or exc}", answer=False)
            return None
        log.info("%s: %s presented the move's token", self._what, pending.peer)
        return conn

    def _drop(self, pending: _Pending, why: str, *, answer: bool = True) -> None:
        """Refuse ``pending`` (answering why, without blocking, unless it
        is gone or sent nothing to answer), close it, log it."""
        conn = pending.conn
        self._pending.pop(conn.fileno(), None)
        self.dropped += 1
        if answer and pending.preamble.data:
            with contextlib.suppress(OSError):
                conn.setblocking(False)  # a short line into an empty buffer
                conn.send(refusal(why))
        conn.close()
        log.warning("%s: a connection from %s dropped: %s", self._what, pending.peer, why)

    def close(self) -> None:
        """Drop the connections still waiting; the listener stays the
        caller's. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._wake_r)
            os.close(self._wake_w)
        for pending in list(self._pending.values()):
            pending.conn.close()
        self._pending.clear()


def _describe(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)
