"""The worker's bridge for a live move's stream: connections carried
between a VMM's unix socket in its run directory and TCP peers, each peer
authenticated by the move's token first (``procurator.worker.
stream_auth``).

Why a bridge instead of ``tcp:`` URLs the VMM opens itself: the jail
(``procurator.worker.jail``) runs the VMM in the worker's network
namespace under a filter that does not deny ``socket``, so cloud-
hypervisor *could* listen and connect on TCP there; but a VMM listening on
the network without TLS would take a VM from anyone who reaches the port,
and TLS (``tls_dir``) would put keys in the jail. The VMM speaks only
``unix:`` URLs inside its run directory (where it already serves its API
socket: no path, device or network right is added to the jail), and the
worker carries the bytes over TCP to the other worker, after the peer
presented the move's token. Being in the stream also gives the worker the
byte counts cloud-hypervisor's API does not report (there is no migration
progress endpoint in v53). QEMU's NBD export goes through an incoming
relay too (``nbd-server-start`` takes a listening socket: the worker
cannot hand it connections it authenticated, so QEMU listens on a unix
socket and the relay connects each authenticated peer to it).

``Relay.outgoing`` (the source worker): connects to the target and
presents the token first (so an unreachable or refusing target fails
before the VMM is asked to send), then listens on a unix socket in the
VMM's run directory, given to the directory's owner (the VM's uid when
jailed) with ``lchown`` (never following a link the VMM could plant);
the VMM connects to it, and the socket is closed and removed at once (one
VMM connection per relay). An ``accept(2)`` there that fails for a reason
waiting mends (EMFILE, ECONNABORTED...) is waited out, any other fails the
stream naming the reason: ``stream_auth.AcceptRetry``, the rule of the
target's gate.

``Relay.incoming`` (the target worker): listens on the TCP address now
(an address in use fails the launch at once); ``start`` then accepts
connections through a ``stream_auth.Gate`` (a peer without the token is
dropped and logged, and does not count) until ``peers`` presented the
token, closes the listener (nobody else is taken), and connects each
authenticated peer to the VMM's socket, which must be a socket, not a
link (the worker never follows a link into the VMM's directory). The VMM
binds that socket before it listens: a connection refused in that window
is retried.

Each direction of each connection is pumped by its own thread
(``recv_into``/``sendall``, 1 MiB at a time); an end of stream is passed
on as a half-close. ``close`` ends everything at once (a byte on a pipe
wakes a thread waiting for a connection, shutting the sockets down one
blocked in ``recv``) and joins the threads; a thread that does not end
in time keeps its sockets open until it ends (the last one releases
them: a descriptor is never closed under a thread that may still use it,
where its number could be reused). An incoming relay that never reached
the VMM (with ``hang_up``) connects to its socket and hangs up, so a VMM
blocked in its receive fails it (and answers) instead of waiting forever.
Counters are summed under the lock (several connections may pump at once).

Lock order: ``Relay._lock`` is a leaf (never held across I/O or a join).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from procurator.worker.stream_auth import AcceptRetry, Gate, StreamRefused, present
from procurator.worker.vmm.base import Address, VmmError

__all__ = ["Relay"]

log = logging.getLogger(__name__)

_BUFFER = 1 << 20
_JOIN = 5.0
_RETRY = 0.01
_LISTEN_WAIT = 10.0


def _describe(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Relay:
    """One move's stream (see the module docstring). Thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Bytes carried from the VMM to the peers, and back.
        self.sent = 0
        self.received = 0
        #: The first failure of the stream, for error messages.
        self.error: str | None = None
        # Leaf: guards _sockets, _threads, _running, _closed, _orphaned and the counters.
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._running = 0  # threads started and not ended
        self._closed = False
        self._orphaned = False  # closed with threads left: the last one releases
        self._released = False
        self._unlink: Path | None = None
        self._vmm_socket: Path | None = None
        self._hang_up_vmm = True
        self._reached_vmm = False
        self._gate: Gate | None = None
        self._peers = 1
        # Written by close: wakes a thread waiting in _accept or
        # _connect_vmm (shutting a listening unix socket down does not wake
        # its accept).
        self._wake_r, self._wake_w = os.pipe()

    # -- construction --------------------------------------------------------------

    @classmethod
    def outgoing(cls, vmm_socket: Path, peer: Address, token: bytes, *, timeout: float) -> Relay:
        """The source's relay: connected to ``peer`` and accepted by it
        (``token`` presented), listening on ``vmm_socket`` for the VMM
        (which must connect within ``timeout``)."""
        relay = cls(f"migration to {_describe(peer)}")
        deadline = time.monotonic() + timeout
        try:
            remote = socket.create_connection(peer, timeout=timeout)
        except OSError as exc:
            relay.close()
            raise VmmError(
                f"cannot reach the migration target at {_describe(peer)}: {exc}"
            ) from exc
        try:
            relay._keep(remote)
            present(remote, token, deadline=deadline)
        except (OSError, StreamRefused) as exc:
            relay.close()
            raise VmmError(f"the migration target at {_describe(peer)}: {exc}") from exc
        try:
            with contextlib.suppress(FileNotFoundError):
                vmm_socket.unlink()
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            relay._keep(listener)
            listener.bind(str(vmm_socket))
            relay._unlink = vmm_socket
            owner = os.stat(vmm_socket.parent)
            os.chown(vmm_socket, owner.st_uid, owner.st_gid, follow_symlinks=False)
            listener.listen(1)
        except OSError as exc:
            relay.close()
            raise VmmError(f"cannot listen on {vmm_socket} for the VMM: {exc}") from exc
        relay._spawn(relay._serve_outgoing, listener, remote, deadline)
        return relay

    @classmethod
    def incoming(
        cls, address: Address, token: bytes, *, peers: int = 1, hang_up: bool = True, what: str = ""
    ) -> Relay:
        """The target's relay, listening on ``address`` (``start`` it once
        the VMM listens) for ``peers`` connections that present ``token``.
        ``hang_up``: connect to the VMM's socket and hang up if no peer
        reached it (a VMM that waits for one stream). ``what`` names the
        stream in logs."""
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            listener = socket.create_server(address, family=family)
        except OSError as exc:
            raise VmmError(f"cannot listen for a migration on {_describe(address)}: {exc}") from exc
        what = what or f"migration from {_describe(address)}"
        return cls.serving(listener, token, peers=peers, hang_up=hang_up, what=what)

    @classmethod
    def serving(
        cls, listener: socket.socket, token: bytes, *, peers: int, hang_up: bool, what: str
    ) -> Relay:
        """``incoming`` on ``listener`` (a listening TCP socket the relay
        takes over: closed with it)."""
        relay = cls(what)
        relay._peers = peers
        relay._hang_up_vmm = hang_up
        relay._keep(listener)
        try:
            relay._gate = Gate(listener, token, what=relay.name)
        except ValueError as exc:
            relay.close()
            raise VmmError(f"{relay.name}: {exc}") from exc
        return relay

    @property
    def address(self) -> Address:
        """(Incoming) the address listened on (its port, when asked for 0)."""
        with self._lock:
            host, port = self._sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def dropped(self) -> int:
        """(Incoming) peers dropped for want of the token."""
        return self._gate.dropped if self._gate is not None else 0

    def start(self, vmm_socket: Path) -> None:
        """(Incoming) accept the authenticated peers, connect each to
        ``vmm_socket``."""
        with self._lock:
            listener = self._sockets[0]
            self._vmm_socket = vmm_socket
        self._spawn(self._serve_incoming, listener, vmm_socket)

    # -- threads -------------------------------------------------------------------

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                self._sockets.append(sock)
        if closed:
            sock.close()
            raise OSError("relay closed")

    def _drop_socket(self, sock: socket.socket) -> None:
        """Close a socket of ours early (a listener done with)."""
        with self._lock:
            if sock in self._sockets:
                self._sockets.remove(sock)
        sock.close()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(
            target=self._guarded, args=(target, *args), name=self.name, daemon=True
        )
        with self._lock:
            if self._closed:
                return
            self._threads.append(thread)
            self._running += 1
        thread.start()

    def _guarded(self, target: Callable[..., None], *args: object) -> None:
        try:
            target(*args)
        except OSError as exc:
            self._fail(f"{exc}")
        finally:
            with self._lock:
                self._running -= 1
                last = self._orphaned and self._running == 0
            if last:
                log.info("%s: its last thread ended; its sockets are closed now", self.name)
                self._release()

    def _fail(self, why: str) -> None:
        if self.error is None and not self._closed:
            self.error = why
            log.info("%s: %s", self.name, why)
        self._shutdown_all()

    def _accept(self, listener: socket.socket, deadline: float | None) -> socket.socket | None:
        """The next connection to ``listener``; None once the relay is
        closed or ``deadline`` (monotonic) passed. A transient accept error
        is waited out, any other raises ``AcceptFailed`` (``stream_auth.
        AcceptRetry``: the rule of the target's gate)."""
        retry = AcceptRetry(self.name)
        wake = select.poll()
        wake.register(self._wake_r, select.POLLIN)
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        listener.setblocking(False)
        not_before = 0.0  # after a transient error: the listener rests until then
        while not self._closed:
            now = time.monotonic()
            resting = not_before > now
            waits = [not_before] if resting else []
            if deadline is not None:
                if deadline <= now:
                    return None
                waits.append(deadline)
            wait = None if not waits else max(int((min(waits) - now) * 1000) + 1, 1)
            if any(fd == self._wake_r for fd, _ in (wake if resting else poller).poll(wait)):
                return None
            if resting:
                continue
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
            except OSError as exc:
                not_before = time.monotonic() + retry.failed(exc)
                continue
            retry.succeeded()
            conn.setblocking(True)
            self._keep(conn)
            return conn
        return None

    def _serve_outgoing(
        self, listener: socket.socket, remote: socket.socket, deadline: float
    ) -> None:
        local = self._accept(listener, deadline)
        if local is None:
            self._fail("the VMM did not connect")
            return
        # One VMM connection per relay: nobody else may connect.
        self._drop_socket(listener)
        remote.settimeout(None)
        self._pump_both(local, remote)

    def _serve_incoming(self, listener: socket.socket, vmm_socket: Path) -> None:
        gate = self._gate
        assert gate is not None
        for _ in range(self._peers):
            remote = gate.accept()
            if remote is None:
                return  # closed
            self._keep(remote)
            st = os.lstat(vmm_socket)
            if not stat.S_ISSOCK(st.st_mode):
                self._fail(f"{vmm_socket} is not a socket")
                return
            local = self._connect_vmm(vmm_socket)
            if local is None:
                return
            self._reached_vmm = True
            self._spawn(self._pump_both, local, remote)
        # Every peer came: nobody else is taken (no thread uses the gate now).
        gate.close()
        self._drop_socket(listener)

    def _connect_vmm(self, vmm_socket: Path) -> socket.socket | None:
        """A connection to the VMM's receiving socket. The VMM binds it (the
        file appears, which is what the driver waited for) before it
        listens: a refusal in between is retried, every ``_RETRY`` seconds
        for ``_LISTEN_WAIT`` at most; None once the relay is closed."""
        deadline = time.monotonic() + _LISTEN_WAIT
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        while not self._closed:
            local = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                local.connect(str(vmm_socket))
            except ConnectionRefusedError:
                local.close()
                if time.monotonic() >= deadline:
                    raise
                if poller.poll(int(_RETRY * 1000)):
                    return None  # woken: closed
                continue
            except OSError:
                local.close()
                raise
            self._keep(local)
            return local
        return None

    def _pump_both(self, local: socket.socket, remote: socket.socket) -> None:
        self._spawn(self._pump, remote, local, "received")
        self._pump(local, remote, "sent")

    def _pump(self, source: socket.socket, sink: socket.socket, counter: str) -> None:
        buffer = bytearray(_BUFFER)
        view = memoryview(buffer)
        while True:
            count = source.recv_into(buffer)
            if count == 0:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            sink.sendall(view[:count])
            with self._lock:
                setattr(self, counter, getattr(self, counter) + count)

    # -- the end -------------------------------------------------------------------

    def _shutdown_all(self) -> None:
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def wait(self, timeout: float) -> bool:
        """Whether every thread ended within ``timeout`` (the stream ran
        out both ways)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        return not any(thread.is_alive() for thread in threads)

    def close(self) -> None:
        """End the stream now, join the threads, release everything (or,
        if a thread does not end within ``_JOIN``, leave that to the last
        thread to end). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
            sockets = list(self._sockets)
        os.write(self._wake_w, b"x")
        if self._gate is not None:
            self._gate.interrupt()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN)
        with self._lock:
            self._orphaned = self._running > 0
            orphaned = self._orphaned
        if orphaned:
            log.warning(
                "%s: a thread did not end within %g s of the close; "
                "its sockets stay open until it ends",
                self.name,
                _JOIN,
            )
            return
        self._release()

    def _release(self) -> None:
        """Close what the relay holds, once no thread of it runs."""
        with self._lock:
            if self._released:
                return
            self._released = True
            sockets = list(self._sockets)
        for sock in sockets:
            sock.close()
        if self._gate is not None:
            self._gate.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                self._unlink.unlink()
        # No thread runs: whether one reached the VMM is settled.
        if self._vmm_socket is not None and self._hang_up_vmm and not self._reached_vmm:
            self._hang_up(self._vmm_socket)

    @staticmethod
    def _hang_up(vmm_socket: Path) -> None:
        """Connect to a VMM still waiting for the stream and hang up (its
        receive fails instead of waiting forever)."""
        try:
            if not stat.S_ISSOCK(os.lstat(vmm_socket).st_mode):
                return
        except OSError:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            with contextlib.suppress(OSError):
                sock.connect(str(vmm_socket))
