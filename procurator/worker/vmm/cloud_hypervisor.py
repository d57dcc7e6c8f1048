"""cloud-hypervisor driver: one VMM process per VM, REST over its unix socket.

The driver speaks cloud-hypervisor's HTTP API (v53, base path ``/api/v1``)
with httpx over the VMM's ``--api-socket``. It implements ``VmmDriver``: it
starts processes and makes API calls, nothing else. Restarts, backoff and the
order of the stop ladder belong to the VmManager.

What is its own: a VM definition is rendered as the ``VmConfig`` JSON
(``VmDefinition.to_vm_config``: the definition's schema *is* cloud-
hypervisor's), so ``check`` refuses nothing; a launch starts an empty VMM,
waits for ``vmm.ping`` (and that the answering pid is the one launched),
then ``vm.create`` + ``vm.boot`` and confirms ``Running``; the VMM holds a
flock on ``<socket>.lock`` while it runs (v53), which tells a stale socket
from one a live VMM nobody recorded still serves; the event monitor file
changes on every VM transition (``state_mark``).

Error translation happens here and only here; callers never see httpx:

- cannot connect, connection dropped, socket missing   -> ``VmmGone``
- no answer within the call's timeout                 -> ``VmmTimeout``
- 4xx (the VMM refused the request, e.g. a bad config) -> ``VmmRejected``
  (permanent), with cloud-hypervisor's error chain (a JSON list of messages,
  outermost first) as ``details``
- 5xx, malformed answers, other transport trouble     -> ``VmmError``
  (temporary), with the error chain as ``details`` when there is one

HTTP: one httpx transport per VMM *process* (keyed by pid and start ticks,
not by socket path, so a restarted VMM on the same path never gets a pooled
connection to its dead predecessor), ``_unix_http.UnixSocketTransport`` by
default. Transports are created lazily, dropped when their VMM is shut down
or found gone (``forget``: the supervisor calls it for every VMM it saw
end), and those of VMMs that died unnoticed are pruned on a launch
at most every ``_PRUNE_INTERVAL``, among the ``_PRUNE_BATCH`` least
recently used (a prune reads /proc once per transport it looks at: of
every kept one, a prune took ~0.3 s at 10,000 VMs, on the path of the
change that ran it; a dead VMM's transport is used no more, so it drifts
to the front of the order, and the budget below bounds what waits there).
At most ``kept_connections`` transports are kept (and with them their idle
connections); the worker sizes it from its open-file limit
(``connection_budget``: a quarter of it, so that a fleet as large as the
limit allows still fits: a settled VM costs the worker one descriptor, its
VMM's pidfd, and one more for its kept connection while the budget has
room; issue 31). A VM being started or changed makes its calls in a row
and keeps its connection for them; a call that does so when the budget is
spent closes the least recently used. The sweep, which calls each idle
VMM once per counters interval (``counters``: ``keep=False``), keeps a
connection only while the budget has room and never evicts one: past the
budget it connects for each call, on a transport made for that call and
closed after it, so a sweep over more VMMs than the budget neither cycles
the kept set (every call a miss) nor evicts the connections of VMs being
started. A connection kept costs a descriptor; one made per call costs a
unix ``connect`` and its close, ~55 µs of the worker's CPU a call
(docs/BENCHMARKS.md, session 10).
Requests are ``httpx.Request`` objects handed to the transport directly, not
sent through an ``httpx.Client``: a client's per-request work (merging the
URL with a base, cookies, auth and redirect flows, event hooks) is more than
half the CPU of a call here (~100 of ~180 µs) and none of it applies to a
local API socket, which a worker calls once per VM every health interval.
A request without a body (counters, info, ping) is built once per endpoint
and timeout and sent again (``_request``; -17 µs of a ~80 µs sweep call,
docs/BENCHMARKS.md, issue 31 target 3). An answer's body is taken from the
in-memory stream the transport returns it in (``_content``), not through
``Response.read``, whose decoder machinery serves nothing here (a streamed
answer is still read and closed as httpx does; one with a content coding,
which the driver never asks for, is refused: decoded, it would escape the
transport's bound on a body).
Nothing reads proxy settings from the environment: the socket is local and a
stray ``HTTP_PROXY`` must not reroute VMM control.

Migration (``live_move``; docs/SNAPSHOTS.md, "cloud-hypervisor moves"):
``vm.receive-migration`` / ``vm.send-migration`` as v53 offers them:
memory and device state only, no disks (the caller copies them while the
VM is paused: ``disks`` is always None here), over ``unix:`` or ``tcp:``
URLs. The VMMs use only ``unix:`` sockets in their run directories, and
the workers carry the stream over TCP (``_migration_relay`` says why:
the jail stays as it is, and the relay counts the bytes v53 does not
report), the target's relay letting through only the source that
presented the move's token (``procurator.worker.stream_auth``). Both
calls are answered only when the migration has ended: the
target's waits on a thread of its own from ``launch_incoming`` to
``finish_incoming``, the source's on one while the calling thread reports
progress. cloud-hypervisor switches by itself: the source pauses for its
last pass and exits once the target acknowledged the end, the target
resumes the VM at that moment; a VM migrated runs on its source's config
(disk paths, taps), so both ends must name the same.

Processes: launched, waited for and, on a failed launch, stopped by the
shared mechanics of ``procurator.worker.vmm.process``; jailed
(``procurator.worker.jail``) unless the worker runs ``--unconfined``, with
cloud-hypervisor's own seccomp filter and Landlock rules on top (``argv``).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import resource
import shutil
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from procurator.core.vmdef import VmDefinition
from procurator.worker.vmm import closure, process
from procurator.worker.vmm._migration_relay import Relay
from procurator.worker.vmm._unix_http import KEPT, UnixSocketTransport
from procurator.worker.vmm.base import (
    Address,
    Capabilities,
    MigrationProgress,
    VmExit,
    VmmError,
    VmmGone,
    VmmHandle,
    VmmJail,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
    VmState,
    check_token,
)

__all__ = [
    "KEPT_CONNECTIONS",
    "U64_MAX",
    "ApiCallObserver",
    "CloudHypervisorDriver",
    "TransportFactory",
    "connection_budget",
    "default_transport",
]

log = logging.getLogger(__name__)

#: cloud-hypervisor reports latency counters as u64::MAX before the first op.
U64_MAX = 2**64 - 1

#: ``on_api_call(endpoint, seconds, ok)``: called after every API call, from
#: the calling thread; ``ok`` is False for transport errors and 4xx/5xx.
ApiCallObserver = Callable[[str, float, bool], None]

#: Builds the HTTP transport for one API socket (tests wrap it to validate
#: every request and answer against the API description).
TransportFactory = Callable[[str], httpx.BaseTransport]

#: Devices cloud-hypervisor opens (KVM), besides the VM's own (tap, rng).
_DEVICES = ("/dev/kvm",)
_BASE_URL = "http://localhost/api/v1"
_HEADERS = {"Accept": "application/json", "User-Agent": "procurator"}
_PRUNE_INTERVAL = 10.0
#: How many of the least recently used transports a prune looks at.
_PRUNE_BATCH = 64
#: How many VMMs' transports (and idle connections) a driver keeps at
#: least: more than the launches and changes under way at once (the
#: worker's capacity limiter allows 8). The worker keeps more
#: (``connection_budget``).
KEPT_CONNECTIONS = 16


def connection_budget(open_files: int | None = None) -> int:
    """How many VMMs' connections a worker keeps: a quarter of its open-file
    limit (``open_files``; this process's soft limit when None), at least
    ``KEPT_CONNECTIONS``. The other three quarters hold the VMs' pidfds
    (one each), the descriptors of VMs being started, and everything else:
    at a limit of 20,000 a worker keeps 5,000 connections and still fits
    10,000 VMs; at systemd's 1,048,576 (nix/modules/worker.nix) every VM
    keeps one."""
    if open_files is None:
        open_files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if open_files == resource.RLIM_INFINITY:
            open_files = 1 << 20
    return max(KEPT_CONNECTIONS, open_files // 4)


_MAX_SOCKET_PATH = 107  # sun_path is 108 bytes, NUL included
#: The unix socket of a migration, in the VMM's run directory: the target's
#: VMM listens there, the source's connects there (the worker's relay on the
#: other side of each).
_MIGRATION_SOCKET = "migrate.sock"
#: How long a target's vm.receive-migration may wait for its answer (the
#: source may come much later; cloud-hypervisor's own default bound on a
#: migration is an hour). finish_incoming bounds what the caller waits.
_RECEIVE_WAIT = 3600.0
#: What a send's answer may take beyond its timeout_s (cloud-hypervisor
#: cancels by itself at timeout_s and then answers).
_GRACE = 5.0
_POLL = 0.01
_PROGRESS_INTERVAL = 0.25
_RECOVER = 5.0


def default_transport(api_socket: str) -> httpx.BaseTransport:
    """HTTP/1.1 over one unix socket (see ``_unix_http`` for why not
    ``httpx.HTTPTransport(uds=...)``)."""
    return UnixSocketTransport(api_socket)


_URLS: dict[str, httpx.URL] = {}


def _url(endpoint: str) -> httpx.URL:
    # Parsing a URL is a fifth of a request's CPU; the endpoints are few.
    url = _URLS.get(endpoint)
    if url is None:
        url = _URLS[endpoint] = httpx.URL(f"{_BASE_URL}/{endpoint}")
    return url


#: Bodiless requests already built, by (method, endpoint, timeout): the
#: sweep's counters call and the supervisors' checks send the same request
#: every time, and building it (headers, URL, stream, extensions) is a fifth
#: of a call's CPU. Calls with a timeout left of a deadline (a launch's
#: pings) vary: when ``_MAX_KEPT_REQUESTS`` kinds are kept, they are all
#: dropped, so the repeated ones come back at their next call and one-offs
#: never crowd them out for good.
_REQUESTS: dict[tuple[str, str, float], httpx.Request] = {}
_MAX_KEPT_REQUESTS = 64


def _request(
    method: str, endpoint: str, seconds: float, body: Mapping[str, Any] | None
) -> httpx.Request:
    """The request of one call: a kept one when it has no body, marked
    ``KEPT`` (one object serves every call and thread: the transports only
    read it, but for ``UnixSocketTransport`` keeping its encoded bytes on
    it, the same bytes whichever thread stores them first)."""
    key = (method, endpoint, seconds)
    if body is None:
        kept = _REQUESTS.get(key)
        if kept is not None:
            return kept
    extensions: dict[str, object] = {
        "timeout": {"connect": seconds, "read": seconds, "write": seconds, "pool": seconds}
    }
    if body is None:
        extensions[KEPT] = True  # the transport keeps its bytes
    request = httpx.Request(
        method, _url(endpoint), headers=_HEADERS, json=body, extensions=extensions
    )
    if body is None:
        if len(_REQUESTS) >= _MAX_KEPT_REQUESTS:
            _REQUESTS.clear()
        request.read()  # the empty body, read once, before any thread shares it
        _REQUESTS[key] = request
    return request


class CloudHypervisorDriver:
    """``VmmDriver`` for cloud-hypervisor. Thread-safe.

    ``binary`` is the executable to run: a path (or a name looked up on
    PATH), taken as is, never split; it may be a wrapper script that
    ``exec``s the VMM. ``args`` come right after it (e.g. the script an
    interpreter runs, in tests), ``extra_args`` after the flags the driver
    owns; ``env`` replaces the VMM's environment when given. Every VMM gets
    ``process.launch_env``'s marker, by which it is recognised if its handle
    was never recorded. ``runtime_paths``: what a jailed VMM needs to see
    beyond what ``vmm.closure`` finds (what a wrapper script runs).
    """

    name = "cloud-hypervisor"
    capabilities = Capabilities(
        state_marks=True, guest_clock=False, vmm_writes_state=True, live_move=True
    )

    def __init__(
        self,
        binary: str = "cloud-hypervisor",
        *,
        args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        on_api_call: ApiCallObserver | None = None,
        transport_factory: TransportFactory = default_transport,
        runtime_paths: Sequence[str] = (),
        kept_connections: int = KEPT_CONNECTIONS,
    ) -> None:
        if not binary:
            raise ValueError("cloud-hypervisor binary must not be empty")
        if kept_connections < 1:
            raise ValueError(f"kept_connections must be at least 1, not {kept_connections}")
        self.kept_connections = kept_connections
        self.binary = binary
        self.args = tuple(args)
        self.extra_args = tuple(extra_args)
        self.env = dict(env) if env is not None else None
        self.runtime_paths = tuple(runtime_paths)
        self.on_api_call = on_api_call
        self._transport_factory = transport_factory
        # Leaf lock: guards _transports, _incoming and _pruned_at only; never
        # held across I/O.
        self._lock = threading.Lock()
        # Least recently used first; at most kept_connections (``_transport``).
        self._transports: OrderedDict[tuple[int, int], httpx.BaseTransport] = OrderedDict()
        # Migrations being received, by VMM (launch_incoming to finish_incoming).
        self._incoming: dict[tuple[int, int], _Incoming] = {}
        self._pruned_at = -_PRUNE_INTERVAL
        # runtime_files(), found once; the lock is held while it is found
        # (subprocesses: ldd, nix-store) and taken under no other.
        self._runtime_lock = threading.Lock()
        self._runtime: tuple[str, ...] | None = None

    # -- process -----------------------------------------------------------------

    def argv(self, paths: VmmPaths, *, jail: VmmJail | None = None) -> list[str]:
        """The command line of a VMM for ``paths``. Jailed: the binary by
        absolute path, and cloud-hypervisor's own confinement on top of the
        jail: its seccomp filter (``--seccomp true``, its default, said
        explicitly) and Landlock limited to what the jail shows it
        (``--landlock``, one ``--landlock-rules`` per path: the VM's
        writable directories read-write, its read-only paths and devices
        as they are needed)."""
        binary = self.binary
        confinement: list[str] = []
        if jail is not None:
            binary = self._executable()
            confinement = ["--seccomp", "true", "--landlock"]
            for path in jail.vm.writable:
                confinement += ["--landlock-rules", f"path={path},access=rw"]
            for path in jail.vm.readonly:
                confinement += ["--landlock-rules", f"path={path},access=r"]
            tun = ("/dev/net/tun",) if jail.taps else ()
            for path in (*_DEVICES, *tun, *jail.vm.devices):
                confinement += ["--landlock-rules", f"path={path},access=rw"]
        return [
            binary,
            *self.args,
            "--api-socket",
            f"path={paths.api_socket}",
            "--event-monitor",
            f"path={paths.event_file}",
            "--log-file",
            str(paths.log_file),
            *confinement,
            *self.extra_args,
        ]

    def _executable(self) -> str:
        """The binary as an absolute path (a name is looked up on PATH)."""
        found = self.binary if os.sep in self.binary else shutil.which(self.binary)
        if found is None or not os.access(found, os.X_OK):
            raise VmmError(f"cannot start {self.binary!r}: not found or not executable")
        return os.path.abspath(found)

    def runtime_files(self) -> tuple[str, ...]:
        """What the binary needs to run in a jail (``vmm.closure``), found
        once per driver (by the first launch; the others wait for it)."""
        with self._runtime_lock:
            if self._runtime is None:
                self._runtime = closure.runtime_files(
                    self._executable(), self.args, extra=self.runtime_paths
                )
            return self._runtime

    def check(self, definition: VmDefinition) -> None:
        """Nothing to refuse: the definition's schema is cloud-hypervisor's
        ``VmConfig``, and every field it may hold is rendered."""

    def launch(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        config = definition.to_vm_config()
        return self._start(
            definition,
            paths,
            timeout=timeout,
            jail=jail,
            then=lambda handle, deadline: self._create_and_boot(handle, paths, config, deadline),
        )

    def restore(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        source: Path,
        *,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """An empty VMM as for ``launch``, then ``vm.restore`` from
        ``source`` (the directory ``vm.snapshot`` wrote, staged where the
        VMM can read it) instead of ``vm.create`` + ``vm.boot``, then
        ``vm.resume``; confirms ``Running``. The definition is not sent:
        the snapshot holds the VM's config."""
        return self._start(
            definition,
            paths,
            timeout=timeout,
            jail=jail,
            then=lambda handle, deadline: self._restore_and_resume(handle, paths, source, deadline),
        )

    def save_state(self, handle: VmmHandle, target: Path, *, timeout: float) -> None:
        """``vm.snapshot`` into ``target`` (the VMM writes its config,
        state and memory files there itself: ``target`` is inside its
        jail and owned by its uid)."""
        self._call(
            handle,
            "PUT",
            "vm.snapshot",
            timeout=timeout,
            body={"destination_url": f"file://{target}"},
        )

    # -- live moves ----------------------------------------------------------------

    def launch_incoming(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        memory: Address,
        disks: Address | None,
        token: bytes,
        timeout: float,
        jail: VmmJail | None = None,
    ) -> VmmHandle:
        """An empty VMM as for ``launch``, then ``vm.receive-migration``
        from ``unix:<run dir>/migrate.sock`` (the VMM listens there itself;
        the call is answered only when the migration has ended, so it waits
        on a thread of its own), and the worker's relay listening on
        ``memory`` to carry the source's stream to that socket
        (``_migration_relay``), only for a peer that presented ``token``
        (others are dropped and logged; the first that did is the
        source, and the port then closes). Returns once both listen.
        ``disks`` must be
        None: cloud-hypervisor cannot mirror disks, so the caller copies the
        writable disks while the source's VM is paused, before
        ``send_migration``. The VMM is busy until the migration ends:
        nothing but ``finish_incoming`` or ``shutdown_vmm`` should be asked
        of it meanwhile (its API answers nothing else)."""
        _refuse_disks(disks)
        check_token(token)
        receiving = paths.vmm_dir / _MIGRATION_SOCKET
        _check_socket_path(receiving)
        expected = definition.to_vm_config()
        relay = Relay.incoming(memory, token)

        def receive(handle: VmmHandle, deadline: float) -> None:
            with contextlib.suppress(FileNotFoundError):
                receiving.unlink()  # a failed attempt's: this VMM has not listened yet
            call = _Pending(
                f"vm.receive-migration for {handle.api_socket}",
                lambda: self._call(
                    handle,
                    "PUT",
                    "vm.receive-migration",
                    timeout=_RECEIVE_WAIT,
                    body={"receiver_url": f"unix:{receiving}"},
                ),
            )
            # Only this driver's relay may connect: wait for the socket to
            # appear rather than probing it with a connection.
            while not _is_socket(receiving):
                if call.done.wait(_POLL):
                    call.result(0.0)  # raises the VMM's refusal
                    raise VmmError(
                        f"cloud-hypervisor at {handle.api_socket} answered "
                        "vm.receive-migration before it listened"
                    )
                _left(deadline, handle, "vm.receive-migration to listen")
            relay.start(receiving)
            with self._lock:
                self._incoming[(handle.pid, handle.pid_start_ticks)] = _Incoming(
                    call, relay, _host_resources(expected)
                )

        try:
            return self._start(definition, paths, timeout=timeout, jail=jail, then=receive)
        except BaseException:
            relay.close()
            raise

    def incoming_received(self, handle: VmmHandle) -> bool:
        """Whether ``vm.receive-migration`` was answered with success (the
        OpenAPI's 204: "The VM migration was successfully received"): the
        stream completed and cloud-hypervisor resumed the guest itself.
        No API call (the VMM answers nothing else while it receives)."""
        with self._lock:
            incoming = self._incoming.get((handle.pid, handle.pid_start_ticks))
        return incoming is not None and incoming.call.succeeded

    def finish_incoming(self, handle: VmmHandle, *, timeout: float) -> None:
        """Wait (within ``timeout``) for ``vm.receive-migration``'s answer
        and confirm the VM runs. cloud-hypervisor resumes the received VM
        itself when the stream completes, at the moment the source
        (paused for its last pass) stops for good: this only confirms it.
        A VMM this driver did not launch (a restarted worker) is asked for
        its state alone. Raises ``VmmError`` with the VMM's reasons when
        the migration failed; the VMM then has no VM (the caller stops it)."""
        key = (handle.pid, handle.pid_start_ticks)
        with self._lock:
            incoming = self._incoming.pop(key, None)
        deadline = time.monotonic() + timeout
        if incoming is not None:
            try:
                incoming.call.result(timeout)
            except VmmError as exc:
                if incoming.relay.error is not None and not isinstance(exc, VmmTimeout):
                    exc.details = (*exc.details, f"relay: {incoming.relay.error}")
                raise
            finally:
                incoming.relay.close()
        info = self.info(handle, timeout=_left(deadline, handle, "vm.info"))
        state = info.get("state") if info is not None else VmState.NOT_CREATED.value
        if state != VmState.RUNNING.value:
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} reports the VM {state} "
                "after receiving its migration, not Running"
            )
        assert info is not None
        config = info.get("config")
        if not isinstance(config, Mapping):
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} sent vm.info without a config "
                f"object (config: {type(config).__name__})"
            )
        got = _host_resources(config)
        if incoming is not None and got != incoming.resources:
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} runs the migrated VM on other "
                f"host resources than this worker gave it: {got} instead of "
                f"{incoming.resources} (the source's definition must name the same disk "
                "paths and taps)"
            )

    def send_migration(
        self,
        handle: VmmHandle,
        *,
        memory: Address,
        disks: Address | None,
        token: bytes,
        timeout: float,
        progress: MigrationProgress | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        """``vm.send-migration`` to ``unix:<run dir>/migrate.sock``, where
        the worker's relay listens and carries the stream to ``memory``
        (connected first, and ``token`` presented: an unreachable or
        refusing target fails before the VMM is asked to send).
        ``timeout_s`` is the call's timeout and
        ``timeout_strategy`` Cancel, so cloud-hypervisor itself gives up
        in time and keeps the VM. ``disks`` must be None (see
        ``launch_incoming``): the caller pauses the VM and copies its disks
        first; cloud-hypervisor migrates a running VM too (it pauses it
        for the last pass), but then the copies would be stale.

        ``progress`` gets (bytes sent, total) every ``_PROGRESS_INTERVAL``
        from this thread, the total being the guest's memory size as
        ``vm.info`` tells it (grown to what was sent if more was): v53
        reports no progress of its own, the relay counts the bytes.

        On success cloud-hypervisor stops the source for good by exiting
        (its socket removed: ``classify_exit`` says powered off), so the
        caller's ``shutdown_vmm`` finds it gone, which is fine. On failure
        cloud-hypervisor resumes a VM that is paused (by the migration or
        before it); this checks it runs and resumes it if not, then
        raises. ``VmmGone`` (the VMM vanished mid-call, also when the
        call's answer timed out and the VMM was gone by then) is the one
        ambiguous answer: if the stream had completed, the target runs the
        VM, so the caller asks the target (``finish_incoming``) before
        starting the VM here again.

        ``cancel``, looked at every ``_PROGRESS_INTERVAL``: set, the relay
        is closed, which breaks the stream; cloud-hypervisor then fails the
        send and resumes its VM (raised as any failure, saying it was
        cancelled). A stream already through completes all the same (the
        target holds the VM): the call returns as it would have."""
        _refuse_disks(disks)
        check_token(token)
        if cancel is not None and cancel.is_set():
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket}: the move was cancelled before "
                "its migration began"
            )
        deadline = time.monotonic() + timeout
        sending = Path(handle.api_socket).parent / _MIGRATION_SOCKET
        _check_socket_path(sending)
        # A VMM that cannot tell its VM (garbage, no answer) cannot be
        # asked to resume it either: that failure is raised as it is.
        info = self.info(handle, timeout=_left(deadline, handle, "vm.info"))
        if info is None:
            raise VmmRejected(
                f"cloud-hypervisor at {handle.api_socket} has no VM to migrate", status=404
            )
        total = _memory_size(info)
        relay: Relay | None = None
        cancelled = False
        try:
            relay = Relay.outgoing(
                sending, memory, token, timeout=_left(deadline, handle, "the relay")
            )
            seconds = _left(deadline, handle, "vm.send-migration")
            body = {
                "destination_url": f"unix:{sending}",
                "timeout_s": max(1, int(seconds)),
                "timeout_strategy": "Cancel",
            }
            call = _Pending(
                f"vm.send-migration for {handle.api_socket}",
                lambda: self._call(
                    handle, "PUT", "vm.send-migration", timeout=seconds + _GRACE, body=body
                ),
            )
            while not call.done.wait(_PROGRESS_INTERVAL):
                if cancel is not None and cancel.is_set() and not cancelled:
                    # The stream breaks: cloud-hypervisor fails the send
                    # (and resumes the VM), or it was through already.
                    cancelled = True
                    relay.close()
                if progress is not None:
                    progress(relay.sent, max(total, relay.sent))
            call.result(0.0)
        except (VmmError, VmmRejected) as exc:
            if cancelled:
                exc.details = (*exc.details, "the move was cancelled: its stream was cut")
            # Whichever step failed (the target unreachable, the send
            # refused or broken): the VM the caller paused runs again.
            if relay is not None:
                relay.close()
                if relay.error is not None:
                    exc.details = (*exc.details, f"relay: {relay.error}")
            if isinstance(exc, VmmTimeout) and not process.is_alive(
                handle.pid, handle.pid_start_ticks
            ):
                # The answer came too late, but the VMM is gone: it may
                # have exited because the migration completed (the
                # target runs the VM), which only the target can tell.
                raise VmmGone(
                    f"cloud-hypervisor at {handle.api_socket} exited while "
                    f"vm.send-migration timed out ({exc.message}): the target may hold the VM",
                    details=exc.details,
                ) from exc
            if not isinstance(exc, VmmGone):
                self._keep_running(handle, exc)
            raise
        except BaseException:
            if relay is not None:
                relay.close()
            raise
        # The VMM has sent everything: the stream runs out as both ends close.
        relay.wait(_GRACE)
        relay.close()
        self.forget(handle)
        if progress is not None:
            progress(relay.sent, relay.sent)

    def abandon_migration(self, handle: VmmHandle, *, timeout: float) -> None:
        """Nothing to do: the stream of ``vm.send-migration`` goes through
        the worker's relay (``unix:`` to a socket of this process), so a
        worker that stops in the call breaks it, and cloud-hypervisor
        fails the send and resumes the VM it paused for the last pass
        (``send_migration``); one that completed exited (the caller finds
        no VMM). A VM paused for another reason stays paused."""
        del handle, timeout

    def _keep_running(self, handle: VmmHandle, failure: VmmError | VmmRejected) -> None:
        """After a failed send: the VM runs again (cloud-hypervisor resumes
        it itself; this makes sure). What goes wrong here is added to
        ``failure``'s details, never raised over it."""
        try:
            if self.state(handle, timeout=_RECOVER) is VmState.PAUSED:
                self.resume(handle, timeout=_RECOVER)
        except (VmmError, VmmRejected) as exc:
            failure.details = (*failure.details, f"and the VM could not be resumed: {exc}")

    def _start(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        timeout: float,
        jail: VmmJail | None,
        then: Callable[[VmmHandle, float], tuple[VmState, Hashable | None] | None],
    ) -> VmmHandle:
        """Start an empty VMM, wait for its API, then ``then(handle,
        deadline)``: boot (``launch``), restore (``restore``) or receive
        (``launch_incoming``); what it confirmed goes with the handle
        (``VmmHandle.confirmed``)."""
        deadline = time.monotonic() + timeout
        if len(os.fsencode(paths.api_socket)) > _MAX_SOCKET_PATH:
            raise VmmRejected(
                f"API socket path {paths.api_socket} is too long for a unix socket "
                f"({len(os.fsencode(paths.api_socket))} bytes, at most {_MAX_SOCKET_PATH})"
            )
        self._prune()
        if shutil.which(self.binary) is None:
            raise VmmError(f"cannot start {self.binary!r}: not found or not executable")
        paths.vmm_dir.mkdir(parents=True, exist_ok=True)
        output = paths.vmm_dir / "vmm.stdout"
        logs = [(output, process.log_size(output)), (paths.log_file, 0)]
        argv = self.argv(paths, jail=jail)
        if jail is None:
            pid, ticks = process.launch_detached(
                argv, vm_dir=paths.vm_dir, log_path=output, env=self.env
            )
        else:
            pid, ticks = jail.spawn(
                argv,
                log_path=output,
                env=self.env,
                cwd=paths.vmm_dir,
                runtime=self.runtime_files(),
                devices=_DEVICES,
                timeout=max(1.0, deadline - time.monotonic()),
            )
        handle = VmmHandle(
            driver=self.name, pid=pid, pid_start_ticks=ticks, api_socket=str(paths.api_socket)
        )
        try:
            process.wait_for_api(
                handle,
                lambda seconds: self._ping_launched(handle, seconds, jailed=jail is not None),
                deadline=deadline,
                who=f"cloud-hypervisor for {paths.vm_dir}",
                logs=logs,
            )
            confirmed = then(handle, deadline)
        except BaseException:
            self.forget(handle)
            process.abort_launch(handle)
            self._clear_socket(paths)
            raise
        return handle if confirmed is None else replace(handle, confirmed=confirmed)

    def _ping_launched(self, handle: VmmHandle, timeout: float, *, jailed: bool) -> None:
        """``vmm.ping``, and the answer must come from the VMM just launched:
        its pid, or 1 when jailed (the VMM reports its pid as it sees it,
        and a jailed VMM is pid 1 of its own pid namespace; a wrapper that
        did not exec it would make it 2)."""
        pid = self.ping(handle, timeout=timeout).get("pid")
        expected = 1 if jailed else handle.pid
        if isinstance(pid, int) and pid != expected:
            raise VmmError(
                f"{handle.api_socket} is served by pid {pid}, not by the VMM just "
                f"started (pid {handle.pid}{', 1 in its jail' if jailed else ''}): another "
                "VMM owns this socket (or the VMM binary is a wrapper that does not exec "
                "the VMM)"
            )

    def adopt(self, paths: VmmPaths, recorded: VmmHandle) -> VmmHandle | None:
        return recorded if process.is_alive(recorded.pid, recorded.pid_start_ticks) else None

    def classify_exit(self, paths: VmmPaths, handle: VmmHandle) -> VmExit:
        """cloud-hypervisor removes its API socket when it exits cleanly (the
        guest powered off, ``vmm.shutdown``, SIGTERM); a crash leaves it."""
        self.forget(handle)
        return VmExit.CRASHED if os.path.lexists(handle.api_socket) else VmExit.POWERED_OFF

    def clear_leftovers(self, paths: VmmPaths, *, unrecorded: bool, grace: float) -> None:
        if unrecorded:
            process.kill_unrecorded(paths.vm_dir, grace=grace)
        process.remove_stale_socket(paths.api_socket, lock_file=Path(f"{paths.api_socket}.lock"))

    @staticmethod
    def _clear_socket(paths: VmmPaths) -> None:
        """After a failed launch: its socket, unless a live VMM holds it
        (a launch that found the socket taken must not take it away)."""
        with contextlib.suppress(VmmError, VmmRejected):
            process.remove_stale_socket(
                paths.api_socket, lock_file=Path(f"{paths.api_socket}.lock")
            )

    def forget(self, handle: VmmHandle) -> None:
        """Drop the transport of a VMM that is gone (or about to be), and
        end the migration it was receiving, if any."""
        self._abandon_incoming(handle)
        with self._lock:
            transport = self._transports.pop((handle.pid, handle.pid_start_ticks), None)
        if transport is not None:
            transport.close()

    def _abandon_incoming(self, handle: VmmHandle) -> None:
        """Close the relay of a migration ``handle`` still waits for: the
        VMM's receive then fails and it answers again (a real VMM answers
        nothing else while it receives)."""
        with self._lock:
            incoming = self._incoming.pop((handle.pid, handle.pid_start_ticks), None)
        if incoming is not None:
            incoming.relay.close()

    def _prune(self) -> None:
        """Close the transports of VMMs that are gone among the
        ``_PRUNE_BATCH`` least recently used (at most every
        ``_PRUNE_INTERVAL``: module docstring)."""
        now = time.monotonic()
        with self._lock:
            if now - self._pruned_at < _PRUNE_INTERVAL:
                return
            self._pruned_at = now
            oldest = list(itertools.islice(self._transports, _PRUNE_BATCH))
        dead = [key for key in oldest if not process.is_alive(*key)]
        with self._lock:
            closing = [t for key in dead if (t := self._transports.pop(key, None)) is not None]
        for transport in closing:
            transport.close()

    def close(self) -> None:
        """Close every transport. VMM processes keep running."""
        with self._lock:
            transports = list(self._transports.values())
            self._transports.clear()
        for transport in transports:
            transport.close()

    # -- API ---------------------------------------------------------------------

    def ping(self, handle: VmmHandle, *, timeout: float) -> dict[str, Any]:
        """``vmm.ping``: the VMM's version information."""
        return self._json_object(
            self._call(handle, "GET", "vmm.ping", timeout=timeout), handle, "vmm.ping"
        )

    def _create_and_boot(
        self, handle: VmmHandle, paths: VmmPaths, config: Mapping[str, Any], deadline: float
    ) -> tuple[VmState, Hashable | None]:
        self._call(
            handle, "PUT", "vm.create", timeout=_left(deadline, handle, "vm.create"), body=config
        )
        self._call(handle, "PUT", "vm.boot", timeout=_left(deadline, handle, "vm.boot"))
        mark = self.state_mark(paths)  # before the state it is kept with
        state = self.state(handle, timeout=_left(deadline, handle, "vm.info"))
        if state is not VmState.RUNNING:
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} reports the VM {state.value} "
                "right after vm.boot, not Running"
            )
        return state, mark

    def _restore_and_resume(
        self, handle: VmmHandle, paths: VmmPaths, source: Path, deadline: float
    ) -> tuple[VmState, Hashable | None]:
        self._call(
            handle,
            "PUT",
            "vm.restore",
            timeout=_left(deadline, handle, "vm.restore"),
            body={"source_url": f"file://{source}"},
        )
        self._call(handle, "PUT", "vm.resume", timeout=_left(deadline, handle, "vm.resume"))
        mark = self.state_mark(paths)  # before the state it is kept with
        state = self.state(handle, timeout=_left(deadline, handle, "vm.info"))
        if state is not VmState.RUNNING:
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} reports the VM {state.value} "
                "right after vm.restore and vm.resume, not Running"
            )
        return state, mark

    def info(self, handle: VmmHandle, *, timeout: float) -> dict[str, Any] | None:
        """``vm.info``, or None when no VM is created (404)."""
        try:
            content = self._call(handle, "GET", "vm.info", timeout=timeout)
        except VmmRejected as exc:
            if exc.status == 404:
                return None
            raise
        return self._json_object(content, handle, "vm.info")

    def state(self, handle: VmmHandle, *, timeout: float) -> VmState:
        info = self.info(handle, timeout=timeout)
        if info is None:
            return VmState.NOT_CREATED
        raw = info.get("state")
        try:
            return VmState(raw)
        except ValueError:
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} reports an unknown VM state {raw!r}"
            ) from None

    def pause(self, handle: VmmHandle, *, timeout: float) -> None:
        self._call(handle, "PUT", "vm.pause", timeout=timeout)

    def resume(self, handle: VmmHandle, *, timeout: float) -> None:
        self._call(handle, "PUT", "vm.resume", timeout=timeout)

    def power_button(self, handle: VmmHandle, *, timeout: float) -> None:
        self._call(handle, "PUT", "vm.power-button", timeout=timeout)

    def shutdown_vm(self, handle: VmmHandle, *, timeout: float) -> None:
        self._call(handle, "PUT", "vm.shutdown", timeout=timeout)

    def shutdown_vmm(self, handle: VmmHandle, *, timeout: float) -> None:
        self._abandon_incoming(handle)
        try:
            self._call(handle, "PUT", "vmm.shutdown", timeout=timeout)
        except VmmGone:
            # The VMM may exit before its answer is read: that is what we asked.
            pass
        finally:
            self.forget(handle)

    def counters(self, handle: VmmHandle, *, timeout: float) -> Mapping[str, Mapping[str, int]]:
        data = self._json_object(
            self._call(handle, "GET", "vm.counters", timeout=timeout, keep=False),
            handle,
            "vm.counters",
        )
        result: dict[str, dict[str, int]] = {}
        for device, values in data.items():
            if not isinstance(values, Mapping):
                raise VmmError(
                    f"cloud-hypervisor at {handle.api_socket} returned counters of "
                    f"{device!r} as {type(values).__name__}, not an object"
                )
            result[str(device)] = {
                str(name): value
                for name, value in values.items()
                if isinstance(value, int) and not isinstance(value, bool) and value != U64_MAX
            }
        return result

    def state_mark(self, paths: VmmPaths) -> Hashable | None:
        """The event monitor file's identity, size and mtime: cloud-hypervisor
        appends an event for every VM transition (booted, paused, resumed,
        shutdown, rebooted, deleted...), so an unchanged file means an
        unchanged state. None when the file is not there."""
        try:
            st = os.stat(paths.event_file)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- transport ---------------------------------------------------------------

    def _transport(
        self, handle: VmmHandle, *, keep: bool = True
    ) -> tuple[httpx.BaseTransport, bool]:
        """The VMM's transport, now the most recently used, and whether it
        is the caller's to close after its call. A VMM whose transport is
        not kept gets one that is kept when fewer than ``kept_connections``
        are; when as many are, with ``keep`` False one for this call only
        (the kept ones stay as they are), else the least recently used is
        closed (a request it has under way completes: its connection is
        closed once answered)."""
        key = (handle.pid, handle.pid_start_ticks)
        evicted: httpx.BaseTransport | None = None
        with self._lock:
            transport = self._transports.get(key)
            if transport is None:
                full = len(self._transports) >= self.kept_connections
                if full and not keep:
                    return self._transport_factory(handle.api_socket), True
                transport = self._transports[key] = self._transport_factory(handle.api_socket)
                if full:
                    evicted = self._transports.popitem(last=False)[1]
            else:
                self._transports.move_to_end(key)
        if evicted is not None:
            evicted.close()
        return transport, False

    def _call(
        self,
        handle: VmmHandle,
        method: str,
        endpoint: str,
        *,
        timeout: float,
        body: Mapping[str, Any] | None = None,
        keep: bool = True,
    ) -> bytes:
        """One API call; the body of its (2xx) answer, or the error it is
        (module docstring). ``keep`` False: a call that comes alone (the
        sweep's counters of an idle VMM), made on a connection of its own
        when the VMM's transport is not kept and the budget of kept ones is
        spent (``_transport``)."""
        transport, once = self._transport(handle, keep=keep)
        started = time.perf_counter()
        ok = False
        try:
            try:
                response = transport.handle_request(
                    _request(method, endpoint, max(timeout, 0.001), body)
                )
                content = _content(response)
            except httpx.TimeoutException as exc:
                raise VmmTimeout(
                    f"{_where(handle)} did not answer {endpoint} within {timeout:.3g} s"
                ) from exc
            except (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError) as exc:
                self.forget(handle)
                raise VmmGone(f"{_where(handle)} is not reachable for {endpoint}: {exc}") from exc
            except httpx.HTTPError as exc:
                raise VmmError(f"{_where(handle)} failed on {endpoint}: {exc}") from exc
            status = response.status_code
            if status >= 400:
                details = _error_chain(content)
                summary = f"{_where(handle)} refused {endpoint} with HTTP {status}"
                if status < 500:
                    raise VmmRejected(summary, status=status, details=details)
                raise VmmError(summary, details=details)
            ok = True
            return content
        finally:
            if once:
                transport.close()
            if self.on_api_call is not None:
                self.on_api_call(endpoint, time.perf_counter() - started, ok)

    @staticmethod
    def _json_object(content: bytes, handle: VmmHandle, endpoint: str) -> dict[str, Any]:
        try:
            data = json.loads(content)
        except ValueError as exc:
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} sent invalid JSON for "
                f"{_url(endpoint).path}: {exc}"
            ) from exc
        if not isinstance(data, dict):
            raise VmmError(
                f"cloud-hypervisor at {handle.api_socket} sent {type(data).__name__} for "
                f"{_url(endpoint).path}, expected an object"
            )
        return data


class _Pending:
    """One API call made on a thread of its own (a migration call is
    answered only when the migration ends); ``result`` waits for it."""

    def __init__(self, name: str, call: Callable[[], object]) -> None:
        self.done = threading.Event()
        # Until the call returns: what a thread that never got to say why ended with.
        self._error: BaseException | None = VmmError(f"{name} ended without an answer")
        self._name = name
        self._call = call
        threading.Thread(target=self._run, name=name, daemon=True).start()

    def _run(self) -> None:
        try:
            self._call()
            self._error = None
        except Exception as exc:  # noqa: BLE001 - handed to the waiting thread
            self._error = exc
        finally:
            self.done.set()

    @property
    def succeeded(self) -> bool:
        """The call returned without an error (without waiting)."""
        return self.done.is_set() and self._error is None

    def result(self, timeout: float) -> None:
        if not self.done.wait(max(timeout, 0.0)):
            raise VmmTimeout(f"{self._name} did not end within {timeout:.3g} s")
        if self._error is not None:
            raise self._error


@dataclass(frozen=True, slots=True)
class _Incoming:
    call: _Pending
    relay: Relay
    #: The target definition's host resources (``_host_resources``).
    resources: tuple[tuple[str, ...], tuple[str, ...]]


def _host_resources(config: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The disk paths and taps a VmConfig names. cloud-hypervisor runs a
    migrated VM on its source's config as it is (v53's receive cannot
    rename a device), so the target's must name the same ones."""
    disks = config.get("disks")
    nets = config.get("net")
    return (
        tuple(str(d.get("path")) for d in disks if isinstance(d, Mapping))
        if isinstance(disks, list)
        else (),
        tuple(str(n.get("tap")) for n in nets if isinstance(n, Mapping))
        if isinstance(nets, list)
        else (),
    )


def _refuse_disks(disks: Address | None) -> None:
    if disks is not None:
        raise VmmRejected(
            "cloud-hypervisor cannot mirror disks (v53 migrates memory and device "
            "state only): copy the disks while the VM is paused and pass disks=None"
        )


def _check_socket_path(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
        raise VmmRejected(
            f"migration socket path {path} is too long for a unix socket "
            f"({len(os.fsencode(path))} bytes, at most {_MAX_SOCKET_PATH})"
        )


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _memory_size(info: Mapping[str, Any]) -> int:
    """The guest memory ``vm.info`` tells of (bytes; 0 if it tells none)."""
    actual = info.get("memory_actual_size")
    if isinstance(actual, int) and not isinstance(actual, bool) and actual > 0:
        return actual
    config = info.get("config")
    memory = config.get("memory") if isinstance(config, Mapping) else None
    size = memory.get("size") if isinstance(memory, Mapping) else None
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0


def _left(deadline: float, handle: VmmHandle, step: str) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise VmmTimeout(f"cloud-hypervisor at {handle.api_socket}: no time left for {step}")
    return remaining


def _where(handle: VmmHandle) -> str:
    return f"cloud-hypervisor at {handle.api_socket} (pid {handle.pid})"


def _content(response: httpx.Response) -> bytes:
    """The body of an answer. A body already in memory without a content
    coding (what ``UnixSocketTransport`` returns: it reads an answer whole)
    is taken from its stream as it is; ``Response.read`` would pass it
    through httpx's decoders and request contexts, and ``Response.close``
    through them again: ~6 µs of a sweep call (docs/BENCHMARKS.md, issue 31
    target 3). Any other answer is read and closed as httpx does it.

    An answer with a content coding is refused (``httpx.DecodingError``),
    never decoded: the driver asks for none (no ``Accept-Encoding``) and
    cloud-hypervisor sends none, and decoding is where the transport's bound
    on a body stops holding (16 MiB of gzip becomes ~16 GiB in the worker).
    """
    # The raw pairs, not ``Headers.get`` (which works out the headers'
    # encoding, decodes every name and value, and raises and catches a
    # KeyError when the header is missing, as it nearly always is: a fifth
    # of what the sweep's call spent in httpx's models). Several values are
    # each checked, so two ``identity`` are taken and ``identity`` beside
    # ``gzip`` refused.
    for name, value in response.headers.raw:
        if name.lower() == b"content-encoding" and value.strip().lower() not in (b"", b"identity"):
            response.close()
            raise httpx.DecodingError(
                f"the answer has a content coding {value.decode('latin-1')!r}, which the "
                "driver never asks for"
            )
    stream = response.stream
    if isinstance(stream, httpx.ByteStream):
        return b"".join(stream)  # in memory: nothing to release either
    try:
        return response.read()
    finally:
        response.close()


def _error_chain(content: bytes) -> tuple[str, ...]:
    """cloud-hypervisor's error body: a JSON list of messages, outermost first.
    Anything else is shown as text."""
    try:
        data = json.loads(content)
    except ValueError:
        text = content.decode(errors="replace").strip()
        return (text,) if text else ()
    if isinstance(data, list):
        return tuple(str(item) for item in data)
    return (json.dumps(data),)
