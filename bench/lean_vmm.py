"""A lean fake cloud-hypervisor for benchmarks: the same REST API as
``tests/fakes/cloud-hypervisor-fake.py``, at a fraction of its cost.

Why a second fake: the test fake (``http.server``, a thread per connection,
fault injection re-read on every request) costs ~45 ms of CPU to start and
~21 MB resident, so 1,000 of them would measure Python start-up rather than
the control plane. This one imports only what it needs, runs one
single-threaded ``select`` loop, and is started with ``python -S -I``:
~15 ms to start, a few MB each. It is a *floor*, not a test double: no fault
injection, no event monitor output, no OpenAPI validation (the test fake is
validated against cloud-hypervisor's OpenAPI description; this one answers
the same endpoints with the same shapes, and writes the VM's transitions
to ``--event-monitor`` as cloud-hypervisor does: the worker reads the state
again only when that file changed).

Behaviour kept from cloud-hypervisor v53 (what the worker relies on): the API
socket is guarded by a flock on ``<socket>.lock`` (a stale socket file is
removed, a live owner refused); ``vmm.ping`` reports the pid; 404 before
``vm.create``, 405 for a transition the state does not allow; errors are a
JSON list of messages; the socket is removed on a clean exit (``vmm.shutdown``,
SIGTERM, guest poweroff). The guest powers off *at once* on
``vm.power-button`` (instant boot, instant shutdown): only the control plane
is measured.

Run: ``python -S -I bench/lean_vmm.py --api-socket path=<sock> [...]``
(the flags cloud-hypervisor gets from the driver; others are ignored).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import socket
import sys
import time

TYPE_CHECKING = False  # no typing import: start-up time is what this file is for
if TYPE_CHECKING:
    from typing import Any, NoReturn

    Reply = tuple[int, Any]

PREFIX = "/api/v1/"
VERSION = "v53.0-lean-fake"
GET = frozenset(("vmm.ping", "vm.info", "vm.counters"))
PUT = frozenset(
    (
        "vmm.shutdown",
        "vm.create",
        "vm.boot",
        "vm.pause",
        "vm.resume",
        "vm.shutdown",
        "vm.reboot",
        "vm.power-button",
        "vm.delete",
    )
)
TRANSITIONS = {
    "vm.pause": (("Running",), "Paused"),
    "vm.resume": (("Paused",), "Running"),
    "vm.shutdown": (("Running", "Paused"), "Shutdown"),
    "vm.reboot": (("Running",), "Running"),
}
EVENTS = {
    "vm.pause": ("pausing", "paused"),
    "vm.resume": ("resuming", "resumed"),
    "vm.shutdown": ("shutdown",),
    "vm.reboot": ("rebooting", "rebooted"),
    "vm.boot": ("booting", "booted"),
}
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Not Allowed"}


class Vmm:
    def __init__(self, api_socket: str, event_file: str | None) -> None:
        self.api_socket = api_socket
        self.events = (
            None if event_file is None else open(event_file, "a", buffering=1)  # noqa: SIM115
        )
        self.config: dict[str, Any] | None = None
        self.state: str | None = None  # None: no VM created
        self.booted_at = 0.0
        self.exit_after_reply = False

    def event(self, source: str, name: str) -> None:
        if self.events is not None:
            line: dict[str, Any] = {
                "timestamp": {"secs": int(time.monotonic()), "nanos": 0},
                "source": source,
                "event": name,
                "properties": None,
            }
            self.events.write(json.dumps(line) + "\n")

    def exit_clean(self) -> NoReturn:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.api_socket)
        os._exit(0)

    def handle(self, method: str, endpoint: str, body: bytes) -> Reply:
        """(status, JSON body or None) for one request."""
        if endpoint not in GET and endpoint not in PUT:
            return 404, [f"Unknown endpoint {endpoint}"]
        if (method == "GET") != (endpoint in GET):
            return 405, [f"{method} is not allowed on {endpoint}"]
        if endpoint == "vmm.ping":
            return 200, {"build_version": VERSION, "version": VERSION, "pid": os.getpid()}
        if endpoint == "vmm.shutdown":
            self.exit_after_reply = True
            return 204, None
        if endpoint == "vm.create":
            return self.create(body)
        if endpoint == "vm.delete":
            self.config = self.state = None
            self.event("vm", "deleted")
            return 204, None
        if self.state is None or self.config is None:
            return 404, ["Error from API", "The VM is not created"]
        if endpoint == "vm.info":
            memory = int((self.config.get("memory") or {}).get("size", 0))
            return 200, {"config": self.config, "state": self.state, "memory_actual_size": memory}
        if endpoint == "vm.counters":
            ticks = int((time.monotonic() - self.booted_at) * 100)
            return 200, {"_net0": {"rx_bytes": ticks * 1500, "rx_frames": ticks}}
        if endpoint == "vm.boot":
            return self.transition(
                ("Created", "Shutdown"), "Running", boot=True, events=EVENTS["vm.boot"]
            )
        if endpoint == "vm.power-button":
            if self.state != "Running":
                return self.refuse()
            self.state = "Shutdown"
            self.event("vm", "shutdown")
            self.exit_after_reply = True  # the guest powers off at once
            return 204, None
        allowed, target = TRANSITIONS[endpoint]
        return self.transition(allowed, target, events=EVENTS[endpoint])

    def create(self, body: bytes) -> Reply:
        try:
            config = json.loads(body)
        except ValueError as exc:
            return 400, ["Error from API", f"Error parsing VmConfig: {exc}"]
        if not isinstance(config, dict) or not isinstance(config.get("payload"), dict):
            return 400, ["Error from API", "missing field `payload`"]
        if self.state is not None:
            return 400, ["Error from API", "The VM is already created"]
        config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
        config.setdefault("memory", {"size": 512 << 20})
        self.config, self.state = config, "Created"
        return 204, None

    def refuse(self) -> Reply:
        return 405, ["Error from API", f"Invalid VM state transition from {self.state}"]

    def transition(
        self, allowed: tuple[str, ...], target: str, *, boot: bool = False, events: tuple[str, ...]
    ) -> Reply:
        if self.state not in allowed:
            return self.refuse()
        self.state = target
        for name in events:
            self.event("vm", name)
        if boot:
            self.booted_at = time.monotonic()
        return 204, None


def response(status: int, body: Any) -> bytes:
    payload = b"" if body is None else json.dumps(body).encode()
    head = f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    head += f"Content-Length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


def serve_requests(vmm: Vmm, buffer: bytes) -> tuple[bytes, bytes, bool]:
    """Answer every complete request in ``buffer``; returns (replies, rest,
    keep the connection)."""
    out: list[bytes] = []
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            return b"".join(out), buffer, True
        head = buffer[:end].decode("latin-1").split("\r\n")
        length = 0
        keep = True
        for line in head[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value.strip() or 0)
            elif name == "connection" and value.strip().lower() == "close":
                keep = False
        if len(buffer) < end + 4 + length:
            return b"".join(out), buffer, True
        body = buffer[end + 4 : end + 4 + length]
        buffer = buffer[end + 4 + length :]
        method, path = [*head[0].split(" "), "", ""][:2]
        if path.startswith(PREFIX):
            status, reply = vmm.handle(method, path[len(PREFIX) :], body)
        else:
            status, reply = 404, [f"Unknown path {path}"]
        out.append(response(status, reply))
        if not keep:
            return b"".join(out), b"", False


def path_option(value: str) -> str:
    for part in value.split(","):
        if part.startswith("path="):
            return part[len("path=") :]
    sys.exit(f"expected path=<file>, got {value!r}")


def main() -> None:
    args = sys.argv[1:]
    api_socket = event_file = None
    for index, arg in enumerate(args):
        if arg == "--api-socket" and index + 1 < len(args):
            api_socket = path_option(args[index + 1])
        elif arg == "--event-monitor" and index + 1 < len(args):
            event_file = path_option(args[index + 1])
    if api_socket is None:
        sys.exit("usage: lean_vmm.py --api-socket path=<socket> [...]")
    lock_fd = os.open(api_socket + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(f"Error: API socket {api_socket} is in use by another VMM")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(api_socket)  # stale: the lock proves nobody serves it
    vmm = Vmm(api_socket, event_file)
    vmm.event("vmm", "starting")
    signal.signal(signal.SIGTERM, lambda signum, frame: vmm.exit_clean())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(api_socket)
    listener.listen(16)
    buffers: dict[socket.socket, bytes] = {}
    while True:
        readable, _, _ = select.select([listener, *buffers], [], [])
        for sock in readable:
            if sock is listener:
                conn, _ = listener.accept()
                buffers[conn] = b""
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                del buffers[sock]
                sock.close()
                continue
            replies, rest, keep = serve_requests(vmm, buffers[sock] + data)
            if replies:
                try:
                    sock.sendall(replies)
                except OSError:
                    keep = False
            if vmm.exit_after_reply:
                vmm.exit_clean()
            if keep:
                buffers[sock] = rest
            else:
                del buffers[sock]
                sock.close()


if __name__ == "__main__":
    main()
