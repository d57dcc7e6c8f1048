"""A cold move's disk transfer between two workers (docs/SNAPSHOTS.md,
"Moves"): the source streams the stopped VM's writable disk copies to the
target over TCP; the target checks each file's size and sha256 and keeps
the set for the VM's next start there.

Protocol (one TCP connection per transfer; lines end with ``\\n``):

1. source -> target: the preamble every stream of a move begins with
   (``procurator.worker.stream_auth``: ``PROCURATOR-STREAM 1``, the
   transfer's one-time token, within ``stream_auth.PREAMBLE_TIMEOUT`` of
   the accept); target -> source: ``ok``, or ``error:
   <why>`` and the target closes (no transfer is expected with that
   token: refused and logged, and recorded as no transfer's failure, lest
   anyone on the network could fail a move);
2. source -> target: one JSON line ``{"vm_id", "op_id", "files": [{"name",
   "size"}]}``, naming the VM and op id of the transfer the token is for;
   each name is ``<image store basename>/disk<i>.img`` (where the VM's
   disk copies live under ``vms/<id>/disks/``);
3. target -> source: ``go`` (send the files), ``ok`` (this set is stored
   already: done) or ``error: <why>`` (refused);
4. for each file: its ``size`` bytes, then a line with their sha256 (hex);
5. target -> source: ``ok`` once the set is durably stored, or
   ``error: <why>`` (the target then closes).

Both workers of a move must run this version. A source of the first
version (``PROCURATOR-MOVE 1`` and the token in the header) is refused as
"a procurator stream of another version" (``stream_auth.
ANOTHER_VERSION``), which it shows in its error; a target of the first
version refuses this one's preamble as "not a procurator move transfer",
which ``send_disks`` names as a target of an earlier release.

The target accepts a transfer only for a VM and op id its assignment
expects, with the one-time token the master gave both sides
(``Receiver.expect``), the token checked before anything else is read
(compared in constant time with each expected one); a second transfer of a set already received for
that op is answered ``ok`` at once (a source that lost the first answer
sends again: idempotent). Nothing half-written is ever used: files go to
``incoming/.<vm>.<op>.<random>.partial/`` (one per connection), each is
fsynced and checked, and the whole set (its ``op`` file and its
directories fsynced too, and ``incoming/`` made durably:
``procurator.durable``) is renamed to ``incoming/<vm>/``
(replacing an older op's set) only when complete; ``op`` in it names the
op. ``procurator.nix.image`` renames the copies into the VM's disk
directory at its first prepare after the switch, only when that op is the
one of the transfer the worker's assignment carries for the VM
(``procurator.worker.move_service`` drops a set whose op no expected
transfer names: ``Receiver.prune``).

**TLS** (``TransferTls``, docs/SECURITY.md "Moves between workers"): a
target that runs with the fleet's certificates serves its transfer port
over TLS 1.3 only (its worker certificate as the server's, a client
certificate from the fleet CA required, and the peer must be a worker:
``procurator://worker/<id>``); the preamble, the token and everything
after travel inside it. A plain connection to it is refused, in plain,
with a line saying so (the first byte of a TLS ClientHello is 0x16; a
preamble's is ``P``). The source learns from the master whether the
target serves TLS (``send_disks(tls_target=...)``, from the target's
``WorkerInfo.transferTls``) and then *requires* it: a target that
answers plain (a downgrade by whoever sits on the path) fails the send,
saying so, and the target's certificate must name the worker the master
named (``procurator://worker/<target id>``), not merely any worker of
the fleet. A target that says plain (an older one, or one without
certificates) gets the disks in plain TCP, logged as unencrypted.

Plain TCP: the token authenticates the source for one transfer and
sha256 checks integrity against accidents; the bytes are not encrypted
(run such moves on a trusted network; docs/SNAPSHOTS.md, "Who may feed
a move").

Blocking code, for worker threads (``trio.to_thread.run_sync``); a socket
timeout bounds every read and write, and a ``SendCut`` ends a send under
way at once from another thread (the worker stops: its trio side must not
wait out a whole disk).

A target that refuses partway (its disk full, a checksum that does not
match) writes its ``error: <why>`` line and closes while the source still
sends: the source's write then fails (the peer reset the connection), and
it reads that line, still queued on its socket, to say the target's reason
rather than "Broken pipe".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from procurator import durable
from procurator.core.errors import PermanentError, TemporaryError
from procurator.core.validation import REQUEST_ID_RE, STORE_DIR, STORE_PATH_RE, VM_ID_RE
from procurator.worker import stream_auth
from procurator.worker.stream_auth import (
    MAX_TOKEN_BYTES,
    MIN_TOKEN_BYTES,
    StreamRefused,
    accept,
    present,
    read_token,
    refusal,
)

__all__ = [
    "MAX_CONNECTIONS",
    "Expected",
    "Receiver",
    "SendCut",
    "TransferError",
    "TransferTls",
    "disk_files",
    "send_disks",
]

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
# What a target of the first version answers this version's preamble.
_FIRST_VERSION_REFUSAL = "not a procurator move transfer"
_MAX_HEADER = 64 << 10
#: Connections a receiver serves at once (each a thread); more are refused.
MAX_CONNECTIONS = 16
# A disk copy's name: nix's own rule for the image's store basename (a
# name nix allows but this refused would leave the copy behind).
_NAME_RE = re.compile(
    STORE_PATH_RE.pattern.removeprefix(re.escape(STORE_DIR) + "/") + r"/disk[0-9]{1,3}\.img"
)
_OP_RE = REQUEST_ID_RE
_VM_RE = VM_ID_RE

#: Progress of a send or a receipt: (bytes done, bytes in all).
Progress = Callable[[int, int], None]


class TransferError(TemporaryError):
    """A transfer failed (the peer refused it or went away, a check failed);
    the message says why. Sending again may succeed."""


#: The first byte of a TLS record carrying a handshake (a ClientHello).
_TLS_HANDSHAKE = 0x16
_NEEDS_TLS = (
    "this worker's move transfers need TLS (it runs with the fleet's certificates): "
    "a plain connection is refused"
)


@dataclass(frozen=True, slots=True)
class TransferTls:
    """A worker's TLS for move transfers, from its fleet certificate (the
    composition root builds it: ``procurator.app.worker.transfer_tls``).

    ``server``: the target's context (TLS 1.3, its worker certificate, a
    client certificate from the fleet CA required); ``client``: the
    source's (TLS 1.3, its worker certificate, the server's verified
    against the fleet CA, no host name check: ``worker_of`` checks the
    identity); ``worker_of``: the worker id a verified peer certificate
    (``getpeercert()``) names, raising ``PermanentError`` when it names
    no worker (a control or the master's certificate, or none)."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    worker_of: Callable[[Mapping[str, object] | None], str] = field(repr=False)


def disk_files(vm_dir: Path) -> list[tuple[str, Path]]:
    """The VM's writable disk copies under ``vm_dir/disks``, as (name on
    the wire, path), in name order. Raises ``TransferError`` for a copy
    the transfer cannot name (rather than leave the guest's writes behind)."""
    disks = vm_dir / "disks"
    found = []
    if disks.is_dir():
        for image in sorted(disks.iterdir()):
            if image.is_dir():
                for disk in sorted(image.glob("disk*.img")):
                    name = f"{image.name}/{disk.name}"
                    if not _NAME_RE.fullmatch(name):
                        raise TransferError(f"{disk}: {name} is not a disk copy's name")
                    found.append((name, disk))
    return found


class SendCut:
    """Ends a ``send_disks`` under way from another thread: ``cut`` shuts
    its connection down, so the sending thread's blocked write or read
    fails at once and ``send_disks`` raises ``TransferError`` (a send cut
    before it began raises at once; one cut while it connects, when it
    has connected: the connect itself is bounded by the socket timeout).
    The target sees the transfer broken and keeps nothing of it.
    Thread-safe; ``_lock`` is a leaf (held only around the shutdown, which
    does not block)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cut = False
        self._conn: socket.socket | None = None

    @property
    def is_cut(self) -> bool:
        with self._lock:
            return self._cut

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    # The socket's own shutdown, also under TLS: an
                    # SSLSocket's would drop its TLS state under the
                    # sending thread's feet.
                    socket.socket.shutdown(self._conn, socket.SHUT_RDWR)

    def _hold(self, conn: socket.socket) -> None:
        with self._lock:
            if self._cut:
                raise TransferError("the send was cut before it began")
            self._conn = conn

    def _release(self) -> None:
        # Before the socket closes: ``cut`` never shuts a descriptor that
        # was closed (and perhaps reused).
        with self._lock:
            self._conn = None


def send_disks(
    address: tuple[str, int],
    *,
    vm_id: str,
    op_id: str,
    token: str,
    files: list[tuple[str, Path]],
    timeout: float = 30.0,
    progress: Progress | None = None,
    cut: SendCut | None = None,
    tls: TransferTls | None = None,
    tls_target: str = "",
) -> None:
    """Send ``files`` (``disk_files``) to the target at ``address``;
    returns once the target answered ``ok``. Raises ``TransferError`` (with
    the target's reason when it refused the set, also partway; "cut" when
    ``cut`` ended it).

    ``tls_target``: the target's worker id when the master says its
    transfer port serves TLS: then the transfer runs in TLS with ``tls``
    (this worker's), its certificate must name that worker, and nothing
    is sent in plain (a target that answers plain fails the send). ""
    (the target serves plain TCP): plain, logged as unencrypted when this
    worker has certificates."""
    cut = cut or SendCut()
    if tls_target and tls is None:
        raise TransferError(
            f"move {op_id}: worker {tls_target} takes VM {vm_id}'s disks only over TLS, and "
            "this worker has no certificate (run it with --tls-cert, --tls-key and --tls-ca)"
        )
    if not tls_target and tls is not None:
        log.warning(
            "move %s: sending VM %s's disks to %s UNENCRYPTED: the target serves its "
            "transfers in plain TCP (an older worker, or one without certificates)",
            op_id,
            vm_id,
            address,
        )
    sizes = [(name, path.stat().st_size) for name, path in files]
    total = sum(size for _, size in sizes)
    header = {
        "vm_id": vm_id,
        "op_id": op_id,
        "files": [{"name": name, "size": size} for name, size in sizes],
    }
    secret = token.encode()
    if not MIN_TOKEN_BYTES <= len(secret) <= MAX_TOKEN_BYTES:
        raise TransferError(
            f"move {op_id}: a transfer token has {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} bytes"
        )
    done = 0
    if cut.is_cut:
        raise TransferError(f"move {op_id}: VM {vm_id}'s send was cut before it began")
    try:
        # The reader closed too: while it is open, closing the socket does
        # not close its descriptor (an exception's traceback kept it open).
        with (
            _connect(address, timeout, tls if tls_target else None, tls_target, op_id) as conn,
            conn.makefile("rb") as answers,
        ):
            cut._hold(conn)
            try:
                try:
                    present(conn, secret, deadline=time.monotonic() + timeout)
                except StreamRefused as exc:
                    why = exc.message
                    if why.endswith(_FIRST_VERSION_REFUSAL):
                        why = (
                            "it runs an earlier procurator, whose transfers open with "
                            "PROCURATOR-MOVE 1 (both workers of a move must run the same "
                            f"release; it said: {why})"
                        )
                    raise TransferError(
                        f"move {op_id}: worker at {address} refused VM {vm_id}'s disks: {why}"
                    ) from exc
                conn.settimeout(timeout)
                conn.sendall(json.dumps(header).encode() + b"\n")
                answer = _read_line(answers, 1024)
                # "ok": stored already; anything else but "go": refused.
                go = answer == "go"
                sending = files if go else []
                try:
                    for (_, path), (_, size) in zip(sending, sizes[: len(sending)], strict=True):
                        digest = hashlib.sha256()
                        left = size
                        with open(path, "rb") as source:
                            while left:
                                chunk = source.read(min(_CHUNK, left))
                                if not chunk:
                                    raise TransferError(f"{path} shrank while it was sent")
                                conn.sendall(chunk)
                                digest.update(chunk)
                                left -= len(chunk)
                                done += len(chunk)
                                if progress is not None:
                                    progress(done, total)
                        conn.sendall(digest.hexdigest().encode() + b"\n")
                except (BrokenPipeError, ConnectionResetError):
                    # The target closed while this side still sent: it
                    # refused partway and wrote why before closing (the line
                    # stays readable after the reset). Not when cut: then
                    # the connection was shut here.
                    verdict = None if cut.is_cut else _verdict(answers)
                    if verdict is None:
                        raise
                    answer = verdict
                else:
                    if go:
                        answer = _read_line(answers, 1024)
            finally:
                cut._release()
    except (OSError, TransferError) as exc:
        if isinstance(exc, TransferError) and not cut.is_cut:
            raise
        why = "cut (the worker stops)" if cut.is_cut else str(exc)
        raise TransferError(
            f"move {op_id}: sending VM {vm_id}'s disks to {address}: {why}"
        ) from exc
    if answer != "ok":
        raise TransferError(
            f"move {op_id}: worker at {address} refused VM {vm_id}'s disks: {answer}"
        )


def _connect(
    address: tuple[str, int],
    timeout: float,
    tls: TransferTls | None,
    target: str,
    op_id: str,
) -> socket.socket:
    """A connection to the target: plain, or (``tls``) in TLS with the
    certificate of worker ``target``. Raises ``TransferError`` when the
    handshake fails or the certificate is another's: never plain then."""
    conn = socket.create_connection(address, timeout=timeout)
    if tls is None:
        return conn
    secure = tls.client.wrap_socket(conn, do_handshake_on_connect=False)
    try:
        _check_target(secure, address, tls, target, op_id)
    except BaseException:
        secure.close()
        raise
    return secure


def _check_target(
    secure: ssl.SSLSocket, address: tuple[str, int], tls: TransferTls, target: str, op_id: str
) -> None:
    """The handshake with the target, whose certificate must name ``target``."""
    try:
        secure.do_handshake()
    except ssl.SSLError as exc:
        raise TransferError(
            f"move {op_id}: worker {target} at {address} did not complete a TLS handshake "
            f"({exc.reason or exc}); the master says its transfers serve TLS, so nothing "
            "is sent in plain (a downgrade by someone on the path, or not that worker)"
        ) from exc
    try:
        peer = tls.worker_of(secure.getpeercert())
    except PermanentError as exc:
        raise TransferError(
            f"move {op_id}: the server at {address} is not worker {target}: {exc}"
        ) from exc
    if peer != target:
        raise TransferError(
            f"move {op_id}: the server at {address} holds the certificate of worker "
            f"{peer!r}, not of the target, worker {target!r}: refused"
        )


def _verdict(answers: object) -> str | None:
    """The target's answer line after it closed the connection mid-send,
    or None when it left none (it went away)."""
    try:
        return _read_line(answers, 1024)
    except (OSError, TransferError):
        return None


def _read_line(stream: object, limit: int) -> str:
    line = stream.readline(limit + 1)  # type: ignore[attr-defined]
    if not line.endswith(b"\n"):
        raise TransferError("the peer closed the connection or sent a line too long")
    return bytes(line[:-1]).decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Expected:
    """A transfer the target's assignment expects."""

    vm_id: str
    op_id: str
    token: str = field(repr=False)  # a credential: never in a repr, a log or an error


class Receiver:
    """The target's side: accepts expected transfers on ``listener`` (a
    bound, listening TCP socket), one thread per connection (at most
    ``MAX_CONNECTIONS`` at once; past them a new one cuts the oldest still
    waiting for its preamble, or is refused; ``serve``), into
    ``incoming`` (``<state>/incoming``). ``expect`` replaces what is
    expected (from each new assignment); ``received`` says which op ids
    have their set stored. Thread-safe. Lock order: ``_storing`` (held
    while a set replaces the stored one, and by ``prune``) -> ``_lock`` (a
    leaf)."""

    def __init__(
        self,
        listener: socket.socket,
        incoming: Path,
        *,
        timeout: float = 30.0,
        on_change: Callable[[], None] = lambda: None,
        tls: TransferTls | None = None,
    ) -> None:
        self._listener = listener
        self._tls = tls
        self._incoming = incoming
        self._timeout = timeout
        self._on_change = on_change
        self._lock = threading.Lock()
        self._storing = threading.Lock()  # a whole set renamed into place
        self._expected: dict[str, Expected] = {}
        self._failed: dict[str, str] = {}
        self._closed = False
        self._closing = threading.Event()  # set by close: ends a backoff at once
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()  # open transfers: cut at close
        # Those of _conns still waiting for their preamble, oldest first:
        # one makes room for a new connection past MAX_CONNECTIONS.
        self._waiting: dict[socket.socket, object] = {}
        durable.make_dirs(incoming)  # the received sets are durable state
        for stale in incoming.glob(".*.partial"):
            shutil.rmtree(stale, ignore_errors=True)

    @property
    def serves_tls(self) -> bool:
        """Whether transfers here run in TLS (told the master at registration)."""
        return self._tls is not None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def expect(self, expected: list[Expected]) -> None:
        """What the assignment expects now; a set no expected transfer
        names with its op id is dropped by ``prune``."""
        with self._lock:
            self._expected = {e.vm_id: e for e in expected}
            self._failed = {k: v for k, v in self._failed.items() if k in self._expected}

    def received(self, vm_id: str) -> str | None:
        """The op id whose set is stored for ``vm_id``, or None."""
        try:
            return (self._incoming / vm_id / "op").read_text().strip() or None
        except OSError:
            return None

    def failure(self, vm_id: str) -> str:
        """Why the last transfer of ``vm_id`` that presented the expected
        token failed ("": none did); an unauthenticated peer's refusal is
        only logged, lest anyone on the network could fail a move."""
        with self._lock:
            return self._failed.get(vm_id, "")

    def prune(self) -> None:
        """Drop each stored set that no expected transfer names with its
        op id: a set is kept only while the move that sent it is under
        way (the master sends the target its transfer through the
        switch, until the move is done), never for a later placement of
        its VM there. Holds
        ``_storing`` throughout: a set renamed into place meanwhile (for
        a transfer expected after the look at ``_expected``) is not
        dropped."""
        with self._storing, contextlib.suppress(OSError):
            with self._lock:
                keep = {e.vm_id: e.op_id for e in self._expected.values()}
            for entry in self._incoming.iterdir():
                op_id = keep.get(entry.name)
                if entry.name.startswith("."):
                    continue  # a set being received
                if op_id is None or self.received(entry.name) != op_id:
                    shutil.rmtree(entry, ignore_errors=True)

    def serve(self) -> None:
        """Accept connections until ``close`` (run it in a thread). Past
        ``MAX_CONNECTIONS`` at once, a new connection takes the place of
        the oldest one still waiting for its preamble (cut), and is refused
        only when every one presented a token already. An accept that
        fails for want of a resource or for a connection gone before it was
        taken (``stream_auth.TRANSIENT_ACCEPT_ERRORS``) is logged and tried
        again after a backoff, as a move's gate does; any other error ends
        serving, logged with its reason."""
        backoff = 0.0
        while True:
            try:
                conn, peer = self._listener.accept()
            except OSError as exc:
                if self._closing.is_set():
                    return
                reason = exc.strerror or str(exc)
                if exc.errno not in stream_auth.TRANSIENT_ACCEPT_ERRORS:
                    log.exception("move transfers: cannot accept connections: %s", reason)
                    return
                backoff = min(
                    max(backoff * 2, stream_auth.ACCEPT_BACKOFF), stream_auth.MAX_ACCEPT_BACKOFF
                )
                log.warning(
                    "move transfers: cannot accept a connection (%s): trying again in %g s",
                    reason,
                    backoff,
                )
                self._closing.wait(backoff)
                continue
            backoff = 0.0
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._threads = [t for t in self._threads if t.is_alive()]
                busy = len(self._threads) >= MAX_CONNECTIONS
                evicted = None
                if busy and self._waiting and len(self._threads) < 2 * MAX_CONNECTIONS:
                    # The oldest unauthenticated connection makes room (its
                    # thread ends at once): refusing the new one instead let
                    # 16 silent peers, renewed before their deadline, keep
                    # every source out for good. The bound stays: threads
                    # cut so but not ended yet count, up to twice the limit.
                    evicted = next(iter(self._waiting))
                    evicted_peer = self._waiting.pop(evicted)
                    with contextlib.suppress(OSError):
                        # Under the lock: its thread closes it only after
                        # it left _waiting, so this is still its socket.
                        socket.socket.shutdown(evicted, socket.SHUT_RDWR)
                    busy = False
                if not busy:
                    thread = threading.Thread(
                        target=self._handle, args=(conn, peer), name="move receiver", daemon=True
                    )
                    self._threads.append(thread)
                    self._conns.add(conn)
                    self._waiting[conn] = peer
            if evicted is not None:
                log.warning(
                    "a move transfer from %s cut before its preamble: %d at once, %s came",
                    evicted_peer,
                    MAX_CONNECTIONS,
                    peer,
                )
            if busy:
                # Before any token is seen: a peer's connections must not
                # take the worker's threads and descriptors without bound.
                log.warning("a move transfer from %s refused: %d at once", peer, MAX_CONNECTIONS)
                with conn, contextlib.suppress(OSError):
                    conn.setblocking(False)  # a short line into an empty buffer
                    conn.sendall(f"error: {MAX_CONNECTIONS} transfers at once already\n".encode())
                continue
            thread.start()

    def close(self) -> None:
        """Stop accepting and cut the transfers under way (each source sends
        again later; nothing half-received is kept), then wait for their
        threads."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
            conns = list(self._conns)
        self._closing.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                # The socket's own (under TLS too: see SendCut.cut).
                socket.socket.shutdown(conn, socket.SHUT_RDWR)
        for thread in threads:
            thread.join(self._timeout)

    def _secure(self, conn: socket.socket, peer: object, deadline: float) -> ssl.SSLSocket:
        """``conn`` in TLS by ``deadline``, its peer's certificate from the
        fleet CA; ``PermanentError`` otherwise (a plain peer is told so in
        plain)."""
        assert self._tls is not None
        try:
            conn.settimeout(max(deadline - time.monotonic(), 0.001))
            first = conn.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            raise PermanentError(f"no TLS handshake: {exc.strerror or exc}") from exc
        if not first:
            raise PermanentError("it hung up before its TLS handshake")
        if first[0] != _TLS_HANDSHAKE:  # refused in plain, by _handle
            _swallow_preamble(conn, deadline)
            raise PermanentError(_NEEDS_TLS)
        secure = self._tls.server.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            # The TLS socket holds the descriptor now: close and an
            # eviction cut that one.
            self._conns.discard(conn)
            self._conns.add(secure)
            if self._waiting.pop(conn, None) is not None:
                self._waiting[secure] = peer
            closed = self._closed
        try:
            self._handshake(secure, deadline, closed=closed)
        except (OSError, PermanentError) as exc:
            with self._lock:
                self._conns.discard(secure)
                self._waiting.pop(secure, None)
            secure.close()
            why = exc.reason if isinstance(exc, ssl.SSLError) else str(exc)
            raise PermanentError(f"TLS: {why or type(exc).__name__}") from exc
        return secure

    def _handshake(self, secure: ssl.SSLSocket, deadline: float, *, closed: bool) -> None:
        assert self._tls is not None
        if closed:
            raise PermanentError("the receiver is closing")
        secure.settimeout(max(deadline - time.monotonic(), 0.001))
        secure.do_handshake()

    def _authenticate(self, conn: socket.socket, deadline: float) -> Expected:
        """The expected transfer whose token ``conn`` presents (compared in
        constant time with every one); ``PermanentError`` for a peer that
        presents none of them, or no preamble."""
        try:
            token = read_token(conn, deadline=deadline)
        except StreamRefused as exc:
            raise PermanentError(exc.message) from exc
        finally:
            with self._lock:
                self._waiting.pop(conn, None)
        with self._lock:
            expected = list(self._expected.values())
        found = None
        for candidate in expected:
            if secrets.compare_digest(candidate.token.encode(), token):
                found = candidate
        if found is None:
            raise PermanentError("no transfer is expected with this token")
        return found

    def _handle(self, raw: socket.socket, peer: object) -> None:
        raw.settimeout(self._timeout)
        conn = raw
        via = "in plain TCP"
        vm_id = ""
        # A preamble's deadline (the TLS handshake's too), as on the live
        # streams, not the transfer's timeout (which bounds a disk's reads
        # and writes): a peer without a token holds its thread no longer.
        deadline = time.monotonic() + min(self._timeout, stream_auth.PREAMBLE_TIMEOUT)
        with raw:
            try:
                if self._tls is not None:
                    secure = conn = self._secure(raw, peer, deadline)
                    try:
                        # Any worker of the fleet; another is told so in TLS.
                        via = f"in TLS from worker {self._tls.worker_of(secure.getpeercert())}"
                    except PermanentError:
                        _swallow_preamble(secure, deadline)
                        raise
                wanted = self._authenticate(conn, deadline)
                conn.settimeout(self._timeout)
                accept(conn)
                stream = conn.makefile("rb")
                vm_id, op_id, files = self._check(_read_header(stream), wanted)
                if self.received(vm_id) == op_id:
                    conn.sendall(b"ok\n")
                    return
                conn.sendall(b"go\n")
                self._receive(stream, vm_id, op_id, files)
                conn.sendall(b"ok\n")
                log.info("move %s: VM %s's disks received %s at %s", op_id, vm_id, via, peer)
            except (PermanentError, TransferError, OSError, ValueError, TypeError) as exc:
                why = str(exc) or type(exc).__name__
                log.warning("a move transfer from %s refused: %s", peer, why)
                if vm_id:
                    with self._lock:
                        self._failed[vm_id] = why
                with contextlib.suppress(OSError):
                    conn.sendall(refusal(why))
            finally:
                with self._lock:
                    self._conns.discard(conn)
                    self._waiting.pop(conn, None)
                    self._conns.discard(raw)
                    self._waiting.pop(raw, None)
                if conn is not raw:
                    conn.close()
                self._on_change()

    def _check(self, header: object, wanted: Expected) -> tuple[str, str, list[tuple[str, int]]]:
        """The header of the transfer ``wanted`` (its token presented)."""
        if not isinstance(header, dict):
            raise PermanentError("the header is not an object")
        vm_id, op_id = header.get("vm_id"), header.get("op_id")
        if not isinstance(vm_id, str) or not _VM_RE.fullmatch(vm_id):
            raise PermanentError("vm_id: not a VM id")
        if not isinstance(op_id, str) or not _OP_RE.fullmatch(op_id):
            raise PermanentError("op_id: not an op id")
        if (vm_id, op_id) != (wanted.vm_id, wanted.op_id):
            raise PermanentError(
                f"no transfer of VM {vm_id} for move {op_id} is expected here with this token"
            )
        entries = header.get("files")
        if not isinstance(entries, list) or len(entries) > 64:
            raise PermanentError("files: not a list of at most 64")
        files = []
        for entry in entries:
            name, size = (
                (entry.get("name"), entry.get("size")) if isinstance(entry, dict) else (0, 0)
            )
            if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
                raise PermanentError(f"files: {str(name)[:80]!r} is not a disk copy's name")
            if not isinstance(size, int) or size < 0:
                raise PermanentError(f"files: {name}: size must be a whole number of bytes")
            files.append((name, size))
        if len({name for name, _ in files}) != len(files):
            raise PermanentError("files: a name twice")
        free = shutil.disk_usage(self._incoming).free
        if sum(size for _, size in files) > free:
            raise PermanentError(
                f"the disks need {sum(s for _, s in files)} bytes, {free} are free"
            )
        return vm_id, op_id, files

    def _receive(
        self, stream: object, vm_id: str, op_id: str, files: list[tuple[str, int]]
    ) -> None:
        # This connection's own directory (also for a VM without writable
        # disks: an empty set): a source that sends again while its earlier
        # connection is still received (it gave up waiting for the answer)
        # must neither write into nor rename the other's set.
        partial = Path(
            tempfile.mkdtemp(prefix=f".{vm_id}.{op_id}.", suffix=".partial", dir=self._incoming)
        )
        try:
            for name, size in files:
                path = partial / name
                path.parent.mkdir(parents=True, exist_ok=True)
                _receive_file(stream, path, name, size)
            (partial / "op").write_text(op_id + "\n")
            # The set's names (its files in their directories, "op") are
            # as durable as the files' bytes before the set is renamed in.
            durable.fsync_tree(partial)
            final = self._incoming / vm_id
            with self._storing:
                if self.received(vm_id) != op_id:  # else the other connection's is stored
                    shutil.rmtree(final, ignore_errors=True)
                    partial.rename(final)
                    durable.fsync_dir(self._incoming)
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone once renamed
        with self._lock:
            self._failed.pop(vm_id, None)


def _swallow_preamble(conn: socket.socket, deadline: float) -> None:
    """Read (and drop) the preamble of a connection refused before it:
    closed with it unread, the connection would be reset, and the reset
    could reach the source before the refusal's line does."""
    with contextlib.suppress(StreamRefused):
        read_token(conn, deadline=deadline)


def _read_header(stream: object) -> object:
    try:
        return json.loads(_read_line(stream, _MAX_HEADER))
    except RecursionError:  # 64 KiB of "[" is within the line's limit
        raise PermanentError("the header nests too deep") from None


def _receive_file(stream: object, path: Path, name: str, size: int) -> None:
    """``size`` bytes from ``stream`` into ``path`` (new), fsynced, then
    checked against the sha256 line that follows them."""
    digest = hashlib.sha256()
    with open(path, "xb") as out:
        left = size
        while left:
            chunk = stream.read(min(_CHUNK, left))  # type: ignore[attr-defined]
            if not chunk:
                raise TransferError(
                    f"{name}: the source went away after {size - left} of {size} bytes"
                )
            out.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
        out.flush()
        os.fsync(out.fileno())
    sent = _read_line(stream, 64)
    if not secrets.compare_digest(sent, digest.hexdigest()):
        raise TransferError(f"{name}: sha256 {digest.hexdigest()} is not the source's {sent[:64]}")
