"""The one bridge between trio (everything we write) and pycapnp (asyncio).

pycapnp's RPC only runs on an asyncio loop inside ``capnp.kj_loop()``; the
rest of procurator is trio. So each process runs exactly one dedicated
*capnp thread*: an asyncio loop inside ``kj_loop`` that owns every Cap'n
Proto object (streams, RPC systems, capabilities, readers, builders).
Invariants:

1. **Capnp objects never leave the capnp thread.** Coroutines passed to
   :meth:`Bridge.run` convert readers to plain models there and return only
   plain Python. A trio-side object that stands for a remote capability holds
   a :class:`CapnpHandle`: a key into a registry that lives on the capnp
   thread, so dropping it on the trio side can never run a C++ destructor on
   the wrong thread. The registry is emptied on the capnp thread when the
   thread stops.
2. **The capnp thread never blocks.** A server handler that needs trio-side
   state awaits the asyncio future returned by :meth:`Bridge.call_trio`,
   which a trio task completes; calling ``trio.from_thread.run`` there would
   stall every other RPC of the process while it waits.
3. **Cancellation and errors cross both ways.** Cancelling the trio caller of
   :meth:`Bridge.run` cancels the asyncio task and waits until it has
   finished (so no half-done RPC keeps running unowned); a ``KjException``
   reaches trio as one of our errors (:func:`translate_exception`).
   Cancelling the asyncio side of :meth:`Bridge.call_trio` (the RPC client
   went away) cancels the trio task.

Lifetime: the capnp thread starts with the first :func:`open_bridge` of the
process and stops (closing every connection it still owns) when the last one
exits; several bridges (say, a master and a worker in one test process)
share it. Each bridge has its own trio token and nursery for ``call_trio``.

Lock order: ``_CapnpThread._lock`` is a leaf (held only to start/stop the
thread and count users; nothing else is acquired under it).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import ssl
import threading
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

import capnp
import outcome
import trio

from procurator.core.errors import (
    PermanentError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedError,
)
from procurator.core.validation import LIMITS
from procurator.rpc.address import Address
from procurator.rpc.schema import load_schema
from procurator.rpc.tls import HANDSHAKE_TIMEOUT, MASTER_SERVER_NAME, require_master

__all__ = [
    "TRAVERSAL_LIMIT_WORDS",
    "Bridge",
    "CapnpHandle",
    "ClientConnection",
    "connect",
    "open_bridge",
    "start_listener",
    "translate_exception",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Upper bound on what one message may make a reader traverse, and (kj checks
# it while reading a message off the stream) on a message's size. The largest
# legitimate message is an apply of the biggest fleet the limits allow; one
# VM entry is about 30 words, so 64 words per VM leaves room without letting
# a peer make us traverse gigabytes.
TRAVERSAL_LIMIT_WORDS = LIMITS.max_vms_total * 64


def translate_exception(exc: BaseException, what: str) -> BaseException:
    """Our error for a library exception raised while doing ``what``.

    Cap'n Proto's exceptions carry a type: DISCONNECTED and OVERLOADED (and
    a remote FAILED: a crash on the other side, or a peer that raises instead
    of answering an error as data, as procurator's own peers do) mean "try
    again later"; UNIMPLEMENTED means the peer does not speak this method,
    which no retry fixes. Socket errors while connecting are "unavailable"
    too, except a peer certificate that does not verify ("unauthorized":
    retrying with the same certificates cannot help). Anything else is
    returned unchanged. Typed errors never come this way: they cross the
    wire as data (``convert.error_from_reader``).
    """
    if isinstance(exc, capnp.KjException):
        kind = exc.type
        lines = [line for line in str(exc.description).strip().splitlines() if line.strip()]
        # A Python exception that escaped a foreign peer's handler arrives as
        # its whole formatted traceback; its last line is the news, and the
        # frames are that peer's business.
        if any("Traceback (most recent call last)" in line for line in lines):
            lines = lines[-1:]
        first = lines[0].strip() if lines else str(kind)
        if kind == "UNIMPLEMENTED":
            return UnsupportedError(f"{what}: the peer does not implement it: {first}")
        if kind == "DISCONNECTED":
            return UnavailableError(f"{what}: connection lost: {first}")
        if kind == "OVERLOADED":
            return UnavailableError(f"{what}: peer overloaded: {first}", delay=2.0)
        return UnavailableError(f"{what}: remote failure ({kind}): {first}")
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UnauthorizedError(
            f"{what}: TLS: the peer's certificate is not trusted: "
            f"{exc.verify_message or exc.reason or exc}"
        )
    if isinstance(exc, ssl.SSLError):
        return UnavailableError(f"{what}: TLS: {exc.reason or exc}")
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return UnavailableError(f"{what}: {reason}")
    if isinstance(exc, TimeoutError):
        return UnavailableError(f"{what}: timed out")
    return exc


class CapnpHandle(Generic[T]):
    """Opaque trio-side reference to an object that lives on the capnp thread.

    :meth:`get` and :meth:`release` may only be called on the capnp thread
    (inside a coroutine given to :meth:`Bridge.run`). Dropping the handle
    without releasing it leaks the object only until the capnp thread stops.
    """

    __slots__ = ("_key", "_owner", "label")

    def __init__(self, owner: _CapnpThread, key: int, label: str) -> None:
        self._owner = owner
        self._key = key
        self.label = label

    def get(self) -> T:
        self._owner.require_capnp_thread()
        try:
            return self._owner.registry[self._key]  # type: ignore[no-any-return]
        except KeyError:
            raise UnavailableError(f"{self.label} has been closed") from None

    def release(self) -> T | None:
        """Forget the object; returns it (for closing) or None if released."""
        self._owner.require_capnp_thread()
        return self._owner.registry.pop(self._key, None)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        return f"<CapnpHandle {self.label} #{self._key}>"


class _CapnpThread:
    """The process's capnp thread: an asyncio loop inside ``capnp.kj_loop``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._keys = itertools.count(1)
        # Only touched on the capnp thread.
        self.registry: dict[int, Any] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            raise UnavailableError("the Cap'n Proto thread is not running")
        return loop

    def require_capnp_thread(self) -> None:
        if threading.current_thread() is not self._thread:
            raise RuntimeError("this Cap'n Proto object may only be used on the capnp thread")

    def own(self, obj: Any, label: str) -> CapnpHandle[Any]:
        self.require_capnp_thread()
        key = next(self._keys)
        self.registry[key] = obj
        return CapnpHandle(self, key, label)

    def acquire(self) -> asyncio.AbstractEventLoop:
        """Count one more user; start the thread for the first. Blocking."""
        with self._lock:
            if self._users == 0:
                self._start()
            self._users += 1
            return self.loop

    def release(self) -> None:
        """Count one user less; stop and join the thread after the last."""
        with self._lock:
            self._users -= 1
            if self._users > 0:
                return
            loop, stop, thread = self._loop, self._stop, self._thread
            if loop is not None and stop is not None:
                loop.call_soon_threadsafe(stop.set)
            if thread is not None:
                thread.join()
            self._thread = self._loop = self._stop = None

    def _start(self) -> None:
        load_schema()  # parse once, before any capnp object exists
        ready = threading.Event()
        failure: list[BaseException] = []

        async def body() -> None:
            async with capnp.kj_loop():
                self._loop = asyncio.get_running_loop()
                self._stop = asyncio.Event()
                ready.set()
                try:
                    await self._stop.wait()
                finally:
                    # Drop what trio-side handles still point at while the kj
                    # loop runs; kj_loop's exit then closes streams and RPC
                    # systems and cancels server tasks.
                    self.registry.clear()

        def main() -> None:
            try:
                asyncio.run(body())
            except BaseException as exc:  # reported to the starter, or logged
                if not ready.is_set():
                    failure.append(exc)
                else:
                    logger.exception("the Cap'n Proto thread crashed")
            finally:
                ready.set()

        thread = threading.Thread(target=main, name="procurator-capnp", daemon=True)
        self._thread = thread
        thread.start()
        ready.wait()
        if failure:
            self._thread = None
            raise UnavailableError(f"cannot start the Cap'n Proto thread: {failure[0]!r}")


_THREAD = _CapnpThread()


@dataclasses.dataclass(slots=True)
class _Call:
    """One coroutine submitted from trio to the capnp thread."""

    task: asyncio.Task[Any] | None = None
    cancel_requested: bool = False
    result: outcome.Outcome[Any] | None = None


def _plain(value: Any, what: str) -> Any:
    module = type(value).__module__
    if module.startswith("capnp"):
        raise TypeError(
            f"{what} returned a Cap'n Proto object ({type(value).__name__}); convert it to "
            "plain Python on the capnp thread"
        )
    return value


def _strip(exc: BaseException) -> BaseException:
    """Make ``exc`` safe to hand to another thread: its traceback frames may
    hold capnp objects, which must die on the capnp thread. The formatted
    traceback is kept as a note for whoever logs it."""
    if exc.__traceback__ is not None:
        exc.add_note("capnp thread traceback:\n" + "".join(traceback.format_tb(exc.__traceback__)))
    exc.__traceback__ = None
    exc.__context__ = None
    exc.__cause__ = None
    return exc


class Bridge:
    """Runs coroutines on the capnp thread for trio and trio functions for
    capnp server handlers. Create with :func:`open_bridge`."""

    def __init__(
        self, thread: _CapnpThread, token: trio.lowlevel.TrioToken, nursery: trio.Nursery
    ) -> None:
        self._thread = thread
        self._loop = thread.loop
        self._token = token
        self._nursery = nursery
        self._closed = False

    # ------------------------------------------------------------ trio side

    async def run(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, what: str = "") -> T:
        """Run ``await fn(*args)`` on the capnp thread and return its (plain
        Python) result. Trio cancellation cancels the asyncio task and waits
        for it to finish; a ``KjException`` or socket error arrives translated
        to our errors, their message starting with ``what`` (default: the
        function's name)."""
        if self._closed:
            raise UnavailableError("the RPC bridge is closed")
        name = what or getattr(fn, "__qualname__", repr(fn))
        call = _Call()
        done = trio.Event()
        token = self._token

        def finished(task: asyncio.Task[Any]) -> None:  # capnp thread
            if task.cancelled():
                call.result = outcome.Error(
                    UnavailableError(f"{name}: cancelled on the Cap'n Proto thread")
                )
            else:
                exc = task.exception()
                if exc is None:
                    try:
                        call.result = outcome.Value(_plain(task.result(), name))
                    except TypeError as bad:
                        call.result = outcome.Error(bad)
                else:
                    call.result = outcome.Error(_strip(translate_exception(exc, name)))
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        def start() -> None:  # capnp thread
            task = asyncio.get_running_loop().create_task(fn(*args))
            call.task = task
            task.add_done_callback(finished)
            if call.cancel_requested:
                task.cancel()

        def cancel() -> None:  # capnp thread; always runs after start (FIFO)
            call.cancel_requested = True
            if call.task is not None:
                call.task.cancel()

        try:
            self._loop.call_soon_threadsafe(start)
        except RuntimeError:
            raise UnavailableError("the Cap'n Proto thread has stopped") from None
        try:
            await done.wait()
        except trio.Cancelled:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(cancel)
            with trio.CancelScope(shield=True):
                await done.wait()
            raise
        assert call.result is not None
        return call.result.unwrap()  # type: ignore[no-any-return]

    # ------------------------------------------------------------ capnp side

    def call_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> asyncio.Future[T]:
        """From the capnp thread: run ``await fn(*args)`` as a trio task of
        this bridge and return an asyncio future of its result. Cancelling
        the future cancels the trio task."""
        self._thread.require_capnp_thread()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope = trio.CancelScope()

        def settle(result: outcome.Outcome[T]) -> None:  # capnp thread
            if future.done():
                return
            if isinstance(result, outcome.Value):
                future.set_result(result.value)
            elif isinstance(result, outcome.Error):
                future.set_exception(result.error)

        def settle_soon(result: outcome.Outcome[T]) -> None:  # trio thread
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(settle, result)

        async def runner() -> None:  # trio thread
            settled = False
            try:
                with scope:
                    try:
                        value = await fn(*args)
                    except Exception as exc:  # noqa: BLE001 - handed to the capnp side
                        settle_soon(outcome.Error(exc))
                    else:
                        settle_soon(outcome.Value(value))
                    settled = True
            finally:
                if not settled:
                    settle_soon(outcome.Error(UnavailableError("cancelled: shutting down")))

        def spawn() -> None:  # trio thread
            if self._closed:
                settle_soon(outcome.Error(UnavailableError("shutting down")))
                return
            self._nursery.start_soon(runner, name=getattr(fn, "__qualname__", None))

        def on_done(fut: asyncio.Future[T]) -> None:  # capnp thread
            if fut.cancelled():
                with contextlib.suppress(trio.RunFinishedError):
                    self._token.run_sync_soon(scope.cancel)

        future.add_done_callback(on_done)
        try:
            self._token.run_sync_soon(spawn)
        except trio.RunFinishedError:
            future.set_exception(UnavailableError("shutting down"))
        return future

    def notify_trio(self, fn: Callable[..., Awaitable[object]], *args: Any) -> None:
        """From the capnp thread: run ``await fn(*args)`` as a trio task of
        this bridge without waiting for it; a failure is logged."""

        def consume(future: asyncio.Future[object]) -> None:
            if not future.cancelled() and (exc := future.exception()) is not None:
                logger.warning("%s failed: %s", getattr(fn, "__qualname__", fn), exc)

        self.call_trio(fn, *args).add_done_callback(consume)

    def trio_soon(self, fn: Callable[..., object], *args: Any) -> None:
        """From any thread: run the *synchronous* ``fn(*args)`` on the trio
        thread soon (e.g. ``event.set``); a no-op once trio has finished."""
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(fn, *args)

    def own(self, obj: Any, label: str) -> CapnpHandle[Any]:
        """From the capnp thread: register ``obj`` and return a handle trio
        code may hold (see :class:`CapnpHandle`)."""
        return self._thread.own(obj, label)


@contextlib.asynccontextmanager
async def open_bridge() -> AsyncIterator[Bridge]:
    """Start (or join) the process's capnp thread and yield a bridge bound
    to the current trio run. On exit, pending ``call_trio`` tasks of this
    bridge are cancelled; the last bridge out stops the thread."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(_THREAD.acquire)
    body_error: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            bridge = Bridge(_THREAD, trio.lowlevel.current_trio_token(), nursery)
            try:
                yield bridge
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                bridge._closed = True
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery only runs call_trio tasks, which never raise: an error
        # here is the body's own. Give it back unwrapped, as a plain context
        # manager would.
        if body_error is not None and group.exceptions == (body_error,):
            raise body_error from None
        raise
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_THREAD.release)


# ---------------------------------------------------------------- connections
# Everything below runs on the capnp thread (inside Bridge.run).


# pycapnp's AsyncIoStream keeps its asyncio protocol (and so the transport,
# which knows the peer's certificate and the socket) private; its public
# create_server hands the accept callback nothing but the stream. `_connect`
# is the protocol factory that create_server itself uses: it returns the
# protocol, whose `transport` attribute is public. Calling it from our own
# factory is the one way to learn who connected, and to watch the socket
# (the master's connection supervision needs it: see master_server), without
# forking pycapnp. Every accepted connection and every TLS client connection
# goes this way; the RPC and security tests fail loudly if a pycapnp release
# takes it away.
_STREAM_PROTOCOL_FACTORY: Callable[[Callable[[Any], Any]], Any] | None = getattr(
    capnp.AsyncIoStream, "_connect", None
)


def _stream_protocol_factory() -> Callable[[Callable[[Any], Any]], Any]:
    factory_of = _STREAM_PROTOCOL_FACTORY
    if factory_of is None:
        raise PermanentError(
            "this pycapnp has no AsyncIoStream._connect; procurator cannot use TLS with it "
            "(pycapnp 2.2.x is known to work)"
        )
    return factory_of


async def _open_stream(address: Address, tls: ssl.SSLContext | None) -> tuple[Any, Any]:
    """(stream, TLS transport or None) of a new connection to ``address``."""
    if tls is None:
        if address.unix_path is not None:
            stream = await capnp.AsyncIoStream.create_unix_connection(address.unix_path)
        else:
            stream = await capnp.AsyncIoStream.create_connection(address.host, address.port)
        return stream, None
    # Over TLS we keep the transport (see ClientConnection.close), so the
    # stream is made the way start_listener makes it.
    factory_of = _stream_protocol_factory()
    loop = asyncio.get_running_loop()
    streams: list[Any] = []
    protocol = factory_of(streams.append)  # called with the stream once connected
    options: dict[str, Any] = {
        "ssl": tls,
        # The master is known by its role name, not by the address dialed
        # (see procurator.rpc.tls).
        "server_hostname": MASTER_SERVER_NAME,
        "ssl_handshake_timeout": HANDSHAKE_TIMEOUT,
    }
    if address.unix_path is not None:
        transport, _ = await loop.create_unix_connection(
            lambda: protocol, address.unix_path, **options
        )
    else:
        transport, _ = await loop.create_connection(
            lambda: protocol, address.host, address.port, **options
        )
    try:
        require_master(transport.get_extra_info("peercert"))
    except UnauthorizedError:
        transport.abort()
        raise
    return streams[0], transport


class ClientConnection:
    """A client's connection to a Cap'n Proto server (capnp thread only).

    ``on_lost`` runs (on the capnp thread) once when the connection breaks or
    is closed, whoever noticed first, so the owner learns about a dead peer
    without waiting for its next call to fail.
    """

    def __init__(
        self, stream: Any, on_lost: Callable[[str], None], *, tls_transport: Any = None
    ) -> None:
        self._stream = stream
        self._tls_transport = tls_transport
        self._client = capnp.TwoPartyClient(stream, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS)
        self._on_lost: Callable[[str], None] | None = on_lost
        self._watcher: asyncio.Task[None] | None = asyncio.get_running_loop().create_task(
            self._watch()
        )

    def bootstrap(self, interface: Any) -> Any:
        return self._client.bootstrap().cast_as(interface)

    async def _watch(self) -> None:
        reason = "closed"
        try:
            await self._client.on_disconnect()
            reason = "peer disconnected"
        except (capnp.KjException, OSError) as exc:
            reason = str(translate_exception(exc, "connection"))
        finally:
            self._lost(reason)

    def _lost(self, reason: str) -> None:
        callback, self._on_lost = self._on_lost, None
        if callback is not None:
            callback(reason)

    def close(self) -> None:
        # The cancelled watcher keeps its CancelledError, whose traceback
        # holds the watcher's frame and so this connection: a cycle that
        # only the cyclic garbage collector would free, on whatever thread
        # it runs, after this thread's loop may be gone (invariant 1). Let
        # go of the watcher, so that the connection is freed here.
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
        self._lost("closed")
        with contextlib.suppress(RuntimeError):
            self._client.close()
        if self._tls_transport is not None:
            # A graceful TLS close waits for the peer's close_notify; if the
            # capnp thread stops meanwhile (a CLI exiting, a test's bridge
            # closing) the socket is never closed. Everything we meant to
            # send has been answered by now: drop the connection at once.
            self._tls_transport.abort()
        self._stream.close()


async def connect(
    address: Address, on_lost: Callable[[str], None], *, tls: ssl.SSLContext | None = None
) -> ClientConnection:
    """Dial ``address`` (capnp thread), over TLS when ``tls`` is given.
    Errors are translated by the caller's :meth:`Bridge.run`."""
    stream, tls_transport = await _open_stream(address, tls)
    return ClientConnection(stream, on_lost, tls_transport=tls_transport)


OnStream = Callable[[Any, asyncio.Transport, bool], Awaitable[None]]


async def start_listener(
    address: Address, on_stream: OnStream, *, tls: ssl.SSLContext | None = None
) -> asyncio.Server:
    """Listen on ``address`` (capnp thread), over TLS when ``tls`` is given.

    ``on_stream(stream, transport, over_tls)`` runs as a task per accepted
    connection (after the TLS handshake) and must not raise (log instead).
    ``transport`` is the connection's asyncio transport: its
    ``get_extra_info("socket")`` is the socket, ``("peercert")`` over TLS the
    verified client certificate, and ``abort()`` closes the connection at
    once (a graceful TLS close waits for the peer). A TLS handshake that
    fails (no certificate, another CA, plaintext) never reaches
    ``on_stream``.
    """
    factory_of = _stream_protocol_factory()
    loop = asyncio.get_running_loop()

    def protocol_factory() -> Any:
        cell: list[Any] = []

        def accepted(stream: Any) -> Awaitable[None]:
            return on_stream(stream, cell[0].transport, tls is not None)

        protocol = factory_of(accepted)
        cell.append(protocol)
        return protocol

    options: dict[str, Any] = (
        {"ssl": tls, "ssl_handshake_timeout": HANDSHAKE_TIMEOUT} if tls is not None else {}
    )
    if address.unix_path is not None:
        return await loop.create_unix_server(protocol_factory, address.unix_path, **options)
    return await loop.create_server(
        protocol_factory, address.host, address.port, reuse_address=True, **options
    )
