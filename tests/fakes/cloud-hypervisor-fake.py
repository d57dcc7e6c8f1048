"""A fake cloud-hypervisor VMM for tests: a real process on a real unix socket.

Run it as ``python tests/fakes/cloud-hypervisor-fake.py --api-socket
path=<sock> [--event-monitor path=<file>] [--log-file <file>] [-v]``, the
same flags the driver gives cloud-hypervisor. (The file name keeps the string
``cloud-hypervisor`` in the process's command line, so the suite's leak guard
sees a fake VMM left behind exactly as it would see a real one.)

What it imitates (cloud-hypervisor v53, see the OpenAPI description):
- HTTP/1.1 REST under ``/api/v1`` on the unix socket: ``vmm.ping``,
  ``vmm.shutdown``, ``vm.create``, ``vm.boot``, ``vm.info``, ``vm.counters``,
  ``vm.pause``, ``vm.resume``, ``vm.shutdown``, ``vm.reboot``,
  ``vm.power-button``, ``vm.delete``, ``vm.snapshot`` and ``vm.restore``
  (``file://`` URLs; a snapshot is the fake's config and state as JSON
  files, written and read by the fake itself, so a directory its jail does
  not show or let it write fails as it would for cloud-hypervisor),
  ``vm.receive-migration`` and ``vm.send-migration`` (below); errors
  are a JSON list of messages.
- Migration (``unix:<path>`` or ``tcp:<host>:<port>`` URLs, no TLS, no
  ``local``, Precopy only). ``vm.receive-migration`` needs a VMM without a
  VM: it listens on the URL, takes one connection (a unix socket file is
  removed once accepted) and answers when the migration has ended.
  ``vm.send-migration`` needs a VM (Running or Paused): it connects, sends,
  pauses a running VM before the last part, and answers when it has ended.
  Like cloud-hypervisor's VMM thread, a VMM busy migrating answers no other
  request but ``vmm.shutdown`` until the migration ends (``timeout_s``
  bounds the sender's; ``timeout_strategy`` Ignore lets it run on). On
  success the target's VM runs (it resumes itself) and the source VMM
  exits cleanly after its 204; on failure the target keeps no VM and the
  source's VM runs again (resumed if it was paused, before or by the
  migration), both answering 500. The stream is the fake's own (the real
  one is cloud-hypervisor's binary protocol, which only VMMs read): frames
  of a JSON header line ``{"command", "length"}`` and ``length`` bytes, each
  answered by a JSON line ``{"status": "ok"|"error", "message"?}``; the
  commands ``start``, ``config`` (the VmConfig), ``memory`` (chunks of the
  guest memory), ``state`` (its counters' state and the memory's sha256,
  which the receiver checks) and ``complete``. The fake's guest memory is
  one random byte per 4 KiB page of ``memory.size`` (64 KiB for 256 MiB),
  made at ``vm.boot``; each end logs its sha256 (``guest memory sha256 =``)
  after a migration.
- VM states Created / Running / Shutdown / Paused; 404 before ``vm.create``,
  405 for a request the state does not allow.
- Counters that grow while the VM runs; latency counters read u64::MAX
  before the first operation.
- ``--event-monitor``: one JSON object per line, ``{timestamp, source,
  event, properties}``.
- Takes a flock on ``<socket>.lock`` and refuses to start when another VMM
  holds it; removes a stale socket file itself (v53); removes its socket on a
  clean exit (``vmm.shutdown``, guest poweroff, SIGTERM); exits when the guest
  powers off (as without ``--no-shutdown``): ``vm.power-button`` makes the
  guest power off shortly after.

Fault injection, for the manager's fault tests. A JSON object read from the
``FAKE_CHV_FAULTS`` environment variable, overlaid by ``<socket>.fault`` (a
file the test writes; re-read on every request, so it can change at run time):

  fail_start: "msg"          print msg and exit 1 at start
  legacy_bind: true          fail with "Address in use" if the socket file
                             exists (releases before v53)
  crash_after_boot: s        die (exit 134, socket left behind) s seconds after vm.boot
  poweroff_after_boot: s     the guest powers off s seconds after vm.boot
  crash_on: [endpoint]       die as soon as one of these is requested
  hang: [endpoint | "*"]     never answer these requests
  hang_after_boot: {endpoint: n}  a VMM that boots its VM while this is set
                             answers n more of these requests, then never
                             answers them while it stays set (a VMM booted
                             before is unaffected)
  delay: {endpoint: s}       answer these after s seconds
  reject: {endpoint: code}   answer these with HTTP code and an error list
  ignore_power_button: true  the guest ignores the power button
  ignore_sigterm: true       SIGTERM does nothing (only SIGKILL ends it); read
                             when the signal arrives
  power_button_delay: s      how long the guest takes to power off (0.05)
  snapshot_fails_halfway: true  vm.snapshot writes part of the snapshot,
                             then answers 500
  migration_fails_halfway: true  the end of a migration that has this set
                             (sender or receiver) breaks the stream after
                             half the guest memory and answers 500
  migration_frame_delay: s   the sender waits s seconds before each frame of
                             its migration stream (a slow migration)
  migration_answer_delay: s  the sender answers vm.send-migration s seconds
                             after its stream completed (the target already
                             runs the VM): a window to lose the source's
                             worker before it hears the migration is done
  listen_delay: s            vm.receive-migration on a unix: URL binds its
                             socket s seconds before it listens (a real VMM's
                             window between bind and listen, widened)
  allocate_after_boot: mib   right after vm.boot, allocate and touch this
                             many MiB (an OOM test)
  probe: {...}               at start, try what a jailed VMM must not be able
                             to do and write what happened, as JSON, to
                             ``probe.json`` beside the socket (see ``_probe``)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

U64_MAX = 2**64 - 1
VERSION = "v53.0-fake"
PREFIX = "/api/v1/"

GET_ENDPOINTS = {"vmm.ping", "vm.info", "vm.counters"}
PUT_ENDPOINTS = {
    "vmm.shutdown",
    "vm.create",
    "vm.boot",
    "vm.pause",
    "vm.resume",
    "vm.shutdown",
    "vm.reboot",
    "vm.power-button",
    "vm.delete",
    "vm.snapshot",
    "vm.restore",
    "vm.receive-migration",
    "vm.send-migration",
}
#: The fake's guest memory: one byte per page of this size.
PAGE = 4096
#: Guest memory bytes per ``memory`` frame of a migration.
CHUNK = 16 * 1024


class Vmm:
    """The fake VMM's state; every field is guarded by ``lock``."""

    def __init__(self, api_socket: Path, event_file: Path | None, log_file: Path | None) -> None:
        self.api_socket = api_socket
        self.event_file = event_file
        self.log_file = log_file
        self.lock = threading.RLock()
        self.config: dict[str, Any] | None = None
        self.state: str | None = None  # None: no VM created
        self.booted_at = 0.0
        self.ops = 0  # I/O operations done; latency counters are u64::MAX at 0
        self.memory = b""  # the guest's memory: one byte per PAGE, made at vm.boot
        # The fault hang_after_boot as it was when this VMM booted: how many
        # more requests of each endpoint it answers.
        self.hang_after_boot: dict[str, int] = {}
        self.env_faults = _parse_faults(os.environ.get("FAKE_CHV_FAULTS", ""), "FAKE_CHV_FAULTS")

    # -- faults ------------------------------------------------------------------

    def held_after_boot(self, endpoint: str, faults: dict[str, Any]) -> bool:
        """Whether hang_after_boot holds this request (see the docstring)."""
        if endpoint not in faults.get("hang_after_boot", {}):
            return False
        with self.lock:
            left = self.hang_after_boot.get(endpoint)
            if left is None:
                return False
            if left > 0:
                self.hang_after_boot[endpoint] = left - 1
                return False
            return True

    def faults(self) -> dict[str, Any]:
        merged = dict(self.env_faults)
        path = Path(f"{self.api_socket}.fault")
        try:
            text = path.read_text()
        except FileNotFoundError:
            return merged
        merged.update(_parse_faults(text, str(path)))
        return merged

    # -- output ------------------------------------------------------------------

    def log(self, message: str) -> None:
        if self.log_file is None:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        # Like cloud-hypervisor's logger, a failed write (disk full) is
        # dropped: it must not fail the API request that logged it.
        with contextlib.suppress(OSError), open(self.log_file, "a") as f:
            f.write(f"cloud-hypervisor: {stamp}: <fake> {message}\n")

    def event(self, source: str, event: str) -> None:
        if self.event_file is None:
            return
        now = time.time()
        record = {
            "timestamp": {"secs": int(now), "nanos": int((now % 1) * 1e9)},
            "source": source,
            "event": event,
            "properties": None,
        }
        with contextlib.suppress(OSError), open(self.event_file, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -- exits -------------------------------------------------------------------

    def exit_clean(self, status: int = 0) -> None:
        """A clean exit: cloud-hypervisor removes its socket."""
        self.log(f"exiting with status {status}")
        self.event("vmm", "shutdown")
        with contextlib.suppress(FileNotFoundError):
            self.api_socket.unlink()
        os._exit(status)

    def crash(self) -> None:
        """An abrupt death: the socket file stays behind."""
        self.log("crashing (fault injection)")
        os._exit(134)

    def guest_poweroff(self) -> None:
        with self.lock:
            if self.state not in ("Running", "Paused"):
                return
            self.state = "Shutdown"
        self.event("vm", "shutdown")
        self.exit_clean(0)

    def later(self, seconds: float, action: Any) -> None:
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()

    # -- counters ----------------------------------------------------------------

    def counters(self) -> dict[str, dict[str, int]]:
        assert self.config is not None
        running = self.state in ("Running", "Paused")
        ticks = int((time.monotonic() - self.booted_at) * 100) if running else 0
        # Every read after the first sees I/O done: the first read right after
        # boot shows the u64::MAX latency sentinels, as a fresh VM does.
        ops = self.ops
        self.ops += 1 if self.state == "Running" else 0
        result: dict[str, dict[str, int]] = {}
        for index, disk in enumerate(self.config.get("disks") or []):
            name = disk.get("id") or f"_disk{index}"
            latency = {"min": 120, "max": 9000, "avg": 800} if ops else {}
            result[name] = {
                "read_bytes": ops * 4096 + ticks * 512,
                "write_bytes": ops * 512,
                "read_ops": ops + ticks,
                "write_ops": ops,
                **{
                    f"{kind}_latency_{stat}": latency.get(stat, U64_MAX)
                    for kind in ("read", "write")
                    for stat in ("min", "max", "avg")
                },
            }
        offset = len(self.config.get("disks") or [])
        for index, net in enumerate(self.config.get("net") or []):
            name = net.get("id") or f"_net{offset + index}"
            result[name] = {
                "rx_bytes": ticks * 1500,
                "rx_frames": ticks,
                "tx_bytes": ticks * 1000 + ops * 60,
                "tx_frames": ticks + ops,
            }
        return result


def _parse_faults(text: str, where: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError as exc:
        sys.stderr.write(f"fake cloud-hypervisor: bad faults in {where}: {exc}\n")
        return {}
    return data if isinstance(data, dict) else {}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        self.server.vmm.log("api: " + format % args)

    # -- plumbing ----------------------------------------------------------------

    def _reply(self, status: int, body: Any = None) -> None:
        payload = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if payload:
            self.wfile.write(payload)
        self.wfile.flush()

    def _error(self, status: int, *messages: str) -> None:
        self._reply(status, list(messages))

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self) -> None:
        self._dispatch("GET", GET_ENDPOINTS)

    def do_PUT(self) -> None:
        self._dispatch("PUT", PUT_ENDPOINTS)

    def _dispatch(self, method: str, allowed: set[str]) -> None:
        body = self._body()
        if not self.path.startswith(PREFIX):
            self._error(404, f"Unknown path {self.path}")
            return
        endpoint = self.path[len(PREFIX) :]
        if endpoint not in GET_ENDPOINTS | PUT_ENDPOINTS:
            self._error(404, f"Unknown endpoint {endpoint}")
            return
        if endpoint not in allowed:
            self._error(405, f"{method} is not allowed on {endpoint}")
            return
        vmm = self.server.vmm
        faults = vmm.faults()
        if endpoint in faults.get("crash_on", ()):
            vmm.crash()
        hang = faults.get("hang", ())
        if endpoint in hang or "*" in hang or vmm.held_after_boot(endpoint, faults):
            vmm.log(f"hanging on {endpoint} (fault injection)")
            threading.Event().wait()
        delay = faults.get("delay", {}).get(endpoint)
        if delay:
            time.sleep(float(delay))
        rejected = faults.get("reject", {}).get(endpoint)
        if rejected:
            self._error(int(rejected), f"Error from API: {endpoint} rejected", "fault injection")
            return
        getattr(self, "ep_" + endpoint.replace(".", "_").replace("-", "_"))(body, faults)

    # -- endpoints ---------------------------------------------------------------

    def ep_vmm_ping(self, body: bytes, faults: dict[str, Any]) -> None:
        with self.server.vmm.lock:  # busy while migrating, as every vm.* request
            pass
        self._reply(
            200,
            {"build_version": VERSION, "version": VERSION, "pid": os.getpid(), "features": ["kvm"]},
        )

    def ep_vmm_shutdown(self, body: bytes, faults: dict[str, Any]) -> None:
        self._reply(204)
        self.server.vmm.exit_clean(0)

    def ep_vm_create(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        try:
            config = json.loads(body)
        except ValueError as exc:
            self._error(400, "Error from API", f"Error parsing VmConfig: {exc}")
            return
        if not isinstance(config, dict) or not isinstance(config.get("payload"), dict):
            self._error(400, "Error from API", "missing field `payload`")
            return
        with vmm.lock:
            if vmm.state is not None:
                self._error(400, "Error from API", "The VM is already created")
                return
            config.setdefault("cpus", {"boot_vcpus": 1, "max_vcpus": 1})
            config.setdefault("memory", {"size": 512 << 20})
            vmm.config = config
            vmm.state = "Created"
        self._reply(204)

    def ep_vm_delete(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        with vmm.lock:
            vmm.config = None
            vmm.state = None
        vmm.event("vm", "deleted")
        self._reply(204)

    def _needs(self, *states: str) -> str | None:
        """The current state if it is one of ``states``; else answers 404/405."""
        state = self.server.vmm.state
        if state is None:
            self._error(404, "Error from API", "The VM is not created")
            return None
        if state not in states:
            self._error(405, "Error from API", f"Invalid VM state transition from {state}")
            return None
        return state

    def ep_vm_boot(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        with vmm.lock:
            if self._needs("Created", "Shutdown") is None:
                return
            vmm.event("vm", "booting")
            vmm.state = "Running"
            vmm.booted_at = time.monotonic()
            assert vmm.config is not None
            pages = int(vmm.config.get("memory", {}).get("size", 0)) // PAGE
            vmm.memory = os.urandom(max(pages, 1))
            vmm.event("vm", "booted")
        self._reply(204)
        with vmm.lock:
            vmm.hang_after_boot = dict(faults.get("hang_after_boot", {}))
        if "crash_after_boot" in faults:
            vmm.later(float(faults["crash_after_boot"]), vmm.crash)
        if "poweroff_after_boot" in faults:
            vmm.later(float(faults["poweroff_after_boot"]), vmm.guest_poweroff)
        if "allocate_after_boot" in faults:
            vmm.later(0.05, lambda: _allocate(int(faults["allocate_after_boot"])))

    def ep_vm_info(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        with vmm.lock:
            if vmm.state is None:
                self._error(404, "Error from API", "The VM is not created")
                return
            assert vmm.config is not None
            info = {
                "config": vmm.config,
                "state": vmm.state,
                "memory_actual_size": int(vmm.config.get("memory", {}).get("size", 0)),
            }
        self._reply(200, info)

    def ep_vm_counters(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        with vmm.lock:
            if vmm.state is None:
                self._error(404, "Error from API", "The VM is not created")
                return
            counters = vmm.counters()
        self._reply(200, counters)

    def _transition(self, allowed: tuple[str, ...], target: str, events: tuple[str, ...]) -> None:
        vmm = self.server.vmm
        with vmm.lock:
            if self._needs(*allowed) is None:
                return
            vmm.state = target
            for event in events:
                vmm.event("vm", event)
        self._reply(204)

    def ep_vm_pause(self, body: bytes, faults: dict[str, Any]) -> None:
        self._transition(("Running",), "Paused", ("pausing", "paused"))

    def ep_vm_resume(self, body: bytes, faults: dict[str, Any]) -> None:
        self._transition(("Paused",), "Running", ("resuming", "resumed"))

    def ep_vm_shutdown(self, body: bytes, faults: dict[str, Any]) -> None:
        self._transition(("Running", "Paused"), "Shutdown", ("shutdown",))

    def ep_vm_reboot(self, body: bytes, faults: dict[str, Any]) -> None:
        self._transition(("Running",), "Running", ("rebooting", "rebooted"))

    def ep_vm_power_button(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        with vmm.lock:
            if self._needs("Running") is None:
                return
        self._reply(204)
        if not faults.get("ignore_power_button"):
            vmm.later(float(faults.get("power_button_delay", 0.05)), vmm.guest_poweroff)

    def _file_url(self, body: bytes, key: str) -> Path | None:
        """The directory of the ``file://`` URL ``key`` of a JSON body; else
        answers 400 (cloud-hypervisor accepts only ``file://`` here)."""
        try:
            data = json.loads(body)
        except ValueError as exc:
            self._error(400, "Error from API", f"Error parsing request body: {exc}")
            return None
        url = data.get(key) if isinstance(data, dict) else None
        if not isinstance(url, str) or not url.startswith("file://"):
            self._error(400, "Error from API", f"{key} must be a file:// URL, got {url!r}")
            return None
        return Path(url[len("file://") :])

    def ep_vm_snapshot(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        target = self._file_url(body, "destination_url")
        if target is None:
            return
        with vmm.lock:
            # cloud-hypervisor snapshots only a paused VM.
            if self._needs("Paused") is None:
                return
            assert vmm.config is not None
            try:
                (target / "config.json").write_text(json.dumps(vmm.config))
                if faults.get("snapshot_fails_halfway"):
                    self._error(500, "Error from API", "Error snapshotting VM: fault injection")
                    return
                (target / "state.json").write_text(json.dumps({"ops": vmm.ops}))
            except OSError as exc:
                self._error(500, "Error from API", f"Error snapshotting VM: {exc}")
                return
            vmm.event("vm", "snapshotted")
        self._reply(204)

    def ep_vm_restore(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        source = self._file_url(body, "source_url")
        if source is None:
            return
        with vmm.lock:
            if vmm.state is not None:
                self._error(404, "Error from API", "The VM is already created")
                return
            try:
                config = json.loads((source / "config.json").read_text())
                state = json.loads((source / "state.json").read_text())
            except (OSError, ValueError) as exc:
                self._error(400, "Error from API", f"Error restoring VM: {exc}")
                return
            vmm.config = config
            vmm.ops = int(state.get("ops", 0))
            vmm.state = "Paused"
            vmm.booted_at = time.monotonic()
            vmm.event("vm", "restored")
        self._reply(204)

    # -- migration ---------------------------------------------------------------

    def _migration_request(self, body: bytes, key: str) -> tuple[dict[str, Any], str] | None:
        """The JSON body and its URL ``key``; else answers 400 (unparsable)
        or 500 (cloud-hypervisor fails a migration it cannot do with 500)."""
        try:
            data = json.loads(body)
        except ValueError as exc:
            self._error(400, "Error from API", f"Error parsing request body: {exc}")
            return None
        url = data.get(key) if isinstance(data, dict) else None
        if not isinstance(url, str):
            self._error(400, "Error from API", f"missing field `{key}`")
            return None
        refusal = None
        if not (url.startswith("unix:") or url.startswith("tcp:")):
            refusal = f"Invalid migration URL {url!r}: expected unix:<path> or tcp:<host>:<port>"
        elif data.get("tls_dir") is not None:
            refusal = "TLS is not supported by the fake"
        elif data.get("local"):
            refusal = "local migration needs shared guest memory, which the fake has not"
        elif data.get("memory_mode", "Precopy") != "Precopy":
            refusal = f"memory mode {data.get('memory_mode')} is not supported by the fake"
        if refusal is not None:
            self._error(500, "Error from API", "Error migrating VM", refusal)
            return None
        return data, url

    def ep_vm_receive_migration(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        request = self._migration_request(body, "receiver_url")
        if request is None:
            return
        _, url = request
        with vmm.lock:  # held for the whole migration: the VMM is busy
            if vmm.state is not None:
                self._error(500, "Error from API", "Error receiving migration", "VM exists")
                return
            try:
                received = _receive(vmm, url, faults)
            except (OSError, ValueError, _MigrationError) as exc:
                vmm.log(f"migration not received: {exc}")
                self._error(500, "Error from API", "Error receiving migration", str(exc))
                return
            vmm.config, vmm.ops, vmm.memory = received
            vmm.state = "Running"  # cloud-hypervisor resumes the VM on `complete`
            vmm.booted_at = time.monotonic()
            vmm.log(f"migration received; guest memory sha256 = {_sha256(vmm.memory)}")
            vmm.event("vm", "resumed")
        self._reply(204)

    def ep_vm_send_migration(self, body: bytes, faults: dict[str, Any]) -> None:
        vmm = self.server.vmm
        request = self._migration_request(body, "destination_url")
        if request is None:
            return
        data, url = request
        with vmm.lock:  # held for the whole migration: the VMM is busy
            if self._needs("Running", "Paused") is None:
                return
            try:
                _send(vmm, url, data, faults)
            except (OSError, ValueError, _MigrationError) as exc:
                vmm.log(f"migration failed: {exc}")
                if vmm.state == "Paused":  # cloud-hypervisor resumes a paused VM
                    vmm.state = "Running"
                    vmm.event("vm", "resuming")
                    vmm.event("vm", "resumed")
                self._error(500, "Error from API", "Error sending migration", str(exc))
                return
            vmm.log(f"migration sent; guest memory sha256 = {_sha256(vmm.memory)}")
            time.sleep(float(faults.get("migration_answer_delay", 0.0)))
        try:
            self._reply(204)
        finally:
            vmm.exit_clean(0)  # cloud-hypervisor exits once its VM has moved, heard or not


class _MigrationError(Exception):
    """The other end of a migration refused it, or broke the stream."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _migration_socket(
    url: str, *, listen: bool, timeout: float | None, listen_delay: float = 0.0
) -> socket.socket:
    """A connected socket to ``url`` (``listen``: the one accepted there,
    ``listen_delay`` seconds between binding and listening)."""
    if url.startswith("unix:"):
        path = url[len("unix:") :]
        if listen:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
                server.bind(path)
                time.sleep(listen_delay)  # the file is there, nobody listens yet
                server.listen(1)
                conn, _ = server.accept()
            os.unlink(path)
        else:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(timeout)
            try:
                conn.connect(path)
            except OSError:
                conn.close()
                raise
    else:
        host, _, port = url[len("tcp:") :].rpartition(":")
        if listen:
            with socket.create_server((host, int(port))) as server:
                conn, _ = server.accept()
        else:
            conn = socket.create_connection((host, int(port)), timeout=timeout)
    conn.settimeout(timeout)
    return conn


def _send(vmm: Vmm, url: str, data: dict[str, Any], faults: dict[str, Any]) -> None:
    """The sender's side of a migration (the caller holds ``vmm.lock``)."""
    assert vmm.config is not None
    limit = data.get("timeout_s", 3600)
    cancel = data.get("timeout_strategy", "Cancel") == "Cancel"
    deadline = time.monotonic() + int(limit)
    with _migration_socket(url, listen=False, timeout=float(limit)) as conn:
        stream = conn.makefile("rwb")

        def frame(command: str, payload: bytes = b"") -> None:
            time.sleep(float(faults.get("migration_frame_delay", 0.0)))
            if cancel and time.monotonic() > deadline:
                raise _MigrationError(f"timed out after {limit} s (timeout_strategy Cancel)")
            header = {"command": command, "length": len(payload)}
            stream.write(json.dumps(header).encode() + b"\n" + payload)
            stream.flush()
            answer = json.loads(stream.readline() or b"null")
            if not isinstance(answer, dict) or answer.get("status") != "ok":
                raise _MigrationError(f"the destination refused {command}: {answer!r}")

        frame("start")
        frame("config", json.dumps(vmm.config).encode())
        chunks = [vmm.memory[i : i + CHUNK] for i in range(0, len(vmm.memory), CHUNK)]
        for index, chunk in enumerate(chunks):
            if faults.get("migration_fails_halfway") and index >= len(chunks) // 2:
                raise _MigrationError("fault injection: stream broken halfway")
            frame("memory", chunk)
        if vmm.state == "Running":  # the last pass runs with the VM paused
            vmm.state = "Paused"
            vmm.event("vm", "pausing")
            vmm.event("vm", "paused")
        state = {"ops": vmm.ops, "memory_sha256": _sha256(vmm.memory)}
        frame("state", json.dumps(state).encode())
        frame("complete")


def _receive(vmm: Vmm, url: str, faults: dict[str, Any]) -> tuple[dict[str, Any], int, bytes]:
    """The receiver's side: (config, ops, memory) of the VM received."""
    delay = float(faults.get("listen_delay", 0.0))
    with _migration_socket(url, listen=True, timeout=60.0, listen_delay=delay) as conn:
        stream = conn.makefile("rwb")
        config: dict[str, Any] | None = None
        memory = bytearray()
        state: dict[str, Any] | None = None
        expected = None

        def answer(status: str, message: str = "") -> None:
            stream.write(json.dumps({"status": status, "message": message}).encode() + b"\n")
            stream.flush()

        while True:
            line = stream.readline()
            if not line:
                raise _MigrationError("the source closed the stream before `complete`")
            header = json.loads(line)
            if not isinstance(header, dict):
                raise _MigrationError(f"bad frame header {line[:80]!r}")
            command, length = header.get("command"), int(header.get("length", 0))
            payload = stream.read(length)
            if len(payload) != length:
                raise _MigrationError(f"the stream ended inside a {command} frame")
            if command == "config":
                config = json.loads(payload)
                pages = int(config.get("memory", {}).get("size", 0)) // PAGE
                expected = max(pages, 1)
            elif command == "memory":
                memory += payload
                if (
                    faults.get("migration_fails_halfway")
                    and expected
                    and (len(memory) >= expected // 2)
                ):
                    answer("error", "fault injection: stream broken halfway")
                    raise _MigrationError("fault injection: stream broken halfway")
            elif command == "state":
                state = json.loads(payload)
            elif command == "complete":
                if config is None or state is None:
                    answer("error", "complete before config and state")
                    raise _MigrationError("`complete` before config and state")
                if state.get("memory_sha256") != _sha256(bytes(memory)):
                    answer("error", "guest memory does not match its checksum")
                    raise _MigrationError("guest memory does not match its checksum")
                answer("ok")
                return config, int(state.get("ops", 0)), bytes(memory)
            elif command != "start":
                answer("error", f"unknown command {command!r}")
                raise _MigrationError(f"unknown command {command!r}")
            answer("ok")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm
        super().__init__(str(vmm.api_socket), Handler, bind_and_activate=False)


def _path_option(value: str) -> Path:
    for part in value.split(","):
        if part.startswith("path="):
            return Path(part[len("path=") :])
    raise argparse.ArgumentTypeError(f"expected path=<file>, got {value!r}")


# x86_64 system calls a VMM has no business making: changing mounts and
# namespaces, tracing, loading kernel code, keyrings, BPF, userfaultfd.
_DENIED_SYSCALLS = (
    101,  # ptrace
    155,  # pivot_root
    161,  # chroot
    165,  # mount
    166,  # umount2
    167,  # swapon
    168,  # swapoff
    169,  # reboot
    175,  # init_module
    176,  # delete_module
    246,  # kexec_load
    248,  # add_key
    249,  # request_key
    250,  # keyctl
    272,  # unshare
    298,  # perf_event_open
    304,  # open_by_handle_at
    308,  # setns
    313,  # finit_module
    320,  # kexec_file_load
    321,  # bpf
    323,  # userfaultfd
)


def _install_seccomp() -> None:
    """A classic-BPF seccomp filter: other architectures are killed, x32
    calls and ``_DENIED_SYSCALLS`` fail with EPERM, the rest is allowed."""
    ld_abs, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill, deny = 0x7FFF0000, 0x80000000, 0x00050000 | errno.EPERM
    count = len(_DENIED_SYSCALLS)
    program = [
        (ld_abs, 0, 0, 4),  # arch
        (jeq, 1, 0, 0xC000003E),  # AUDIT_ARCH_X86_64
        (ret, 0, 0, kill),
        (ld_abs, 0, 0, 0),  # nr
        (jge, count + 1, 0, 0x40000000),  # x32 ABI
    ]
    for index, number in enumerate(_DENIED_SYSCALLS):
        program.append((jeq, count - index, 0, number))
    program += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    code = b"".join(struct.pack("HBBI", *instruction) for instruction in program)
    buffer = ctypes.create_string_buffer(code)

    class _Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    prog = _Prog(len(program), ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


def _allocate(mib: int) -> None:
    """Allocate ``mib`` MiB and write every page (a cgroup charges only the
    pages a process touches), 16 MiB at a time."""
    held = []
    for _ in range(0, mib, 16):
        held.append(bytearray(b"\x01") * (16 << 20))
    time.sleep(3600)  # hold it: only the OOM killer should end this


def _outcome(action: Any) -> str:
    """``ok``, or the name of the errno ``action`` failed with."""
    try:
        action()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc))
    return "ok"


def _read(path: str) -> None:
    with open(path, "rb") as f:
        f.read(1)


def _write(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"escaped")


def _connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)


def _fork_until_refused(limit: int) -> dict[str, Any]:
    children = []
    error = "none"
    try:
        while len(children) < limit:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    except OSError as exc:
        error = errno.errorcode.get(exc.errno or 0, str(exc))
    finally:
        for pid in children:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
    return {"forked": len(children), "error": error}


def _probe(spec: dict[str, Any], out: Path) -> None:
    """Try what a jailed VMM must fail to do; write every outcome to ``out``.

    ``spec``: ``read`` / ``write`` / ``connect``: paths to open for reading,
    create for writing, connect to as unix sockets; ``signal``: pids to
    probe with signal 0; ``fork``: fork (sleeping children) until refused,
    at most this many; ``setuid``: try to become root again;
    ``namespaces``: try to make a user namespace and a mount namespace."""
    result: dict[str, Any] = {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "read": {p: _outcome(lambda p=p: _read(p)) for p in spec.get("read", ())},
        "write": {p: _outcome(lambda p=p: _write(p)) for p in spec.get("write", ())},
        "connect": {p: _outcome(lambda p=p: _connect(p)) for p in spec.get("connect", ())},
        "signal": {str(p): _outcome(lambda p=p: os.kill(p, 0)) for p in spec.get("signal", ())},
        "processes": sorted(int(e) for e in os.listdir("/proc") if e.isdigit()),
    }
    if spec.get("setuid"):
        result["setuid"] = _outcome(lambda: os.setuid(0))
        result["setgid"] = _outcome(lambda: os.setgid(0))
        result["setgroups"] = _outcome(lambda: os.setgroups([0]))
    if spec.get("namespaces"):
        libc = ctypes.CDLL(None, use_errno=True)

        def unshare(flags: int) -> None:
            if libc.unshare(flags) != 0:
                raise OSError(ctypes.get_errno(), "unshare")

        result["unshare_user"] = _outcome(lambda: unshare(0x10000000))  # CLONE_NEWUSER
        result["unshare_mount"] = _outcome(lambda: unshare(0x00020000))  # CLONE_NEWNS
    if spec.get("fork"):
        result["fork"] = _fork_until_refused(int(spec["fork"]))
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
    result["capabilities"] = int(status["CapEff"].strip(), 16)
    out.write_text(json.dumps(result))


def _landlock_rule(value: str) -> str:
    fields = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    if set(fields) != {"path", "access"} or fields["access"] not in ("r", "w", "rw"):
        raise argparse.ArgumentTypeError(f"expected path=<path>,access=r|w|rw, got {value!r}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(prog="cloud-hypervisor")
    parser.add_argument("--api-socket", type=_path_option, required=True)
    parser.add_argument("--event-monitor", type=_path_option)
    parser.add_argument("--log-file", type=Path)
    # cloud-hypervisor's own confinement, as a jailed launch asks for it:
    # --seccomp installs the fake's own filter (a small deny list standing in
    # for cloud-hypervisor's allow list, enough for /proc to show a filter and
    # for the escape probes to meet it); Landlock rules are checked for shape.
    parser.add_argument("--seccomp", choices=["true", "false", "log"], default="true")
    parser.add_argument("--landlock", action="store_true")
    parser.add_argument("--landlock-rules", type=_landlock_rule, action="append", default=[])
    parser.add_argument("-v", action="count", default=0)
    args = parser.parse_args()

    vmm = Vmm(args.api_socket, args.event_monitor, args.log_file)
    faults = vmm.faults()
    if faults.get("probe"):
        # Before its own filter: what the jail alone allows is probed.
        _probe(faults["probe"], args.api_socket.parent / "probe.json")
    if args.seccomp != "false":
        _install_seccomp()
    if faults.get("fail_start"):
        sys.stderr.write(f"Error: {faults['fail_start']}\n")
        sys.exit(1)

    # v53: one VMM per socket, enforced with a flock on <socket>.lock.
    lock_fd = os.open(f"{args.api_socket}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.stderr.write(f"Error: API socket {args.api_socket} is in use by another VMM\n")
        sys.exit(1)

    server = Server(vmm)
    if args.api_socket.exists():
        if faults.get("legacy_bind"):
            sys.stderr.write(
                f"Error: Failed to bind API socket {args.api_socket}: Address in use "
                f"(os error {errno.EADDRINUSE})\n"
            )
            sys.exit(1)
        args.api_socket.unlink()  # stale: the lock proves nobody serves it
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.server_bind()
    server.server_activate()

    def on_sigterm(signum: int, frame: object) -> None:
        if vmm.faults().get("ignore_sigterm"):
            vmm.log("ignoring SIGTERM (fault injection)")
            return
        vmm.exit_clean(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    vmm.log(f"API server listening on {args.api_socket}")
    vmm.event("vmm", "starting")
    server.serve_forever(poll_interval=0.5)


if __name__ == "__main__":
    main()
