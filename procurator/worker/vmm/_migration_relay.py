"""The worker's bridge for a cloud-hypervisor migration: one stream carried
between the VMM's unix socket in its run directory and a TCP peer.

Why a bridge instead of ``tcp:`` URLs the VMM opens itself: the jail
(``procurator.worker.jail``) runs the VMM in the worker's network
namespace under a filter that does not deny ``socket``, so cloud-
hypervisor *could* listen and connect on TCP there; but a VMM listening on
the network without TLS would take a VM from anyone who reaches the port,
and TLS (``tls_dir``) would put keys in the jail. The VMM speaks only
``unix:`` URLs inside its run directory (where it already serves its API
socket: no path, device or network right is added to the jail), and the
worker carries the bytes over TCP to the other worker. Being in the
stream also gives the worker the byte counts cloud-hypervisor's API does
not report (there is no migration progress endpoint in v53).

``Relay.outgoing`` (the source worker): connects to the target first (so
an unreachable target fails before the VMM is asked to send), then
listens on a unix socket in the VMM's run directory, given to the
directory's owner (the VM's uid when jailed) with ``lchown`` (never
following a link the VMM could plant); the VMM connects to it.

``Relay.incoming`` (the target worker): listens on the TCP address now
(an address in use fails the launch at once); ``start`` then accepts the
one source connection and connects it to the VMM's receiving socket,
which must be a socket, not a link (the VMM has run no guest yet, but the
worker never follows a link into the VMM's directory). The VMM binds that
socket before it listens: a connection refused in that window is retried.

Each direction is pumped by its own thread (``recv_into``/``sendall``,
1 MiB at a time); an end of stream is passed on as a half-close. ``close``
ends everything at once (a byte on a pipe wakes a thread waiting for a
connection, shutting the sockets down one blocked in ``recv``) and joins
the threads; an incoming
relay that never reached the VMM connects to its socket and hangs up, so
a VMM blocked in its receive fails it (and answers) instead of waiting
forever. Counters are read without a lock (ints, written by one thread).
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
from pathlib import Path

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
    """One migration stream (see the module docstring). Thread-safe."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Bytes carried from the VMM to the peer, and back.
        self.sent = 0
        self.received = 0
        #: The first failure of the stream, for error messages.
        self.error: str | None = None
        self._lock = threading.Lock()  # leaf: guards _sockets, _threads, _closed
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._unlink: Path | None = None
        self._vmm_socket: Path | None = None
        self._reached_vmm = False
        # Written by close: wakes a thread waiting in _accept (shutting a
        # listening unix socket down does not wake its accept).
        self._wake_r, self._wake_w = os.pipe()

    # -- construction --------------------------------------------------------------

    @classmethod
    def outgoing(cls, vmm_socket: Path, peer: Address, *, timeout: float) -> Relay:
        """The source's relay: connected to ``peer``, listening on
        ``vmm_socket`` for the VMM (which must connect within ``timeout``)."""
        relay = cls(f"migration to {_describe(peer)}")
        try:
            remote = socket.create_connection(peer, timeout=timeout)
        except OSError as exc:
            relay.close()
            raise VmmError(
                f"cannot reach the migration target at {_describe(peer)}: {exc}"
            ) from exc
        relay._keep(remote)
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
        relay._spawn(relay._serve_outgoing, listener, remote, time.monotonic() + timeout)
        return relay

    @classmethod
    def incoming(cls, address: Address) -> Relay:
        """The target's relay, listening on ``address`` (``start`` it once
        the VMM listens)."""
        relay = cls(f"migration from {_describe(address)}")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        try:
            listener = socket.create_server(address, family=family)
        except OSError as exc:
            relay.close()
            raise VmmError(f"cannot listen for a migration on {_describe(address)}: {exc}") from exc
        relay._keep(listener)
        return relay

    def start(self, vmm_socket: Path) -> None:
        """(Incoming) accept the source, connect it to ``vmm_socket``."""
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

    def _spawn(self, target: object, *args: object) -> None:
        thread = threading.Thread(
            target=self._guarded, args=(target, *args), name=self.name, daemon=True
        )
        with self._lock:
            if self._closed:
                return
            self._threads.append(thread)
        thread.start()

    def _guarded(self, target: object, *args: object) -> None:
        assert callable(target)
        try:
            target(*args)
        except OSError as exc:
            self._fail(f"{exc}")

    def _fail(self, why: str) -> None:
        if self.error is None and not self._closed:
            self.error = why
            log.info("%s: %s", self.name, why)
        self._shutdown_all()

    def _accept(self, listener: socket.socket, deadline: float | None) -> socket.socket | None:
        """The next connection to ``listener``; None once the relay is
        closed or ``deadline`` (monotonic) passed."""
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        listener.setblocking(False)
        while not self._closed:
            if deadline is None:
                wait = None
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                wait = max(int(left * 1000), 1)
            if any(fd == self._wake_r for fd, _ in poller.poll(wait)):
                return None
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                continue
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
        remote.settimeout(None)
        self._pump_both(local, remote)

    def _serve_incoming(self, listener: socket.socket, vmm_socket: Path) -> None:
        remote = self._accept(listener, None)
        if remote is None:
            return
        st = os.lstat(vmm_socket)
        if not stat.S_ISSOCK(st.st_mode):
            self._fail(f"{vmm_socket} is not a socket")
            return
        local = self._connect_vmm(vmm_socket)
        if local is None:
            return
        self._reached_vmm = True
        self._pump_both(local, remote)

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
        """End the stream now, join the threads, release everything.
        Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = list(self._threads)
            sockets = list(self._sockets)
        os.write(self._wake_w, b"x")
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN)
        for sock in sockets:
            sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._unlink is not None:
            with contextlib.suppress(OSError):
                self._unlink.unlink()
        # The threads are joined: whether one reached the VMM is settled.
        if self._vmm_socket is not None and not self._reached_vmm:
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
