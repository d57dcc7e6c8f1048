"""Hostile and broken answers to the cloud-hypervisor migration calls:
garbage bodies, wrong states, a refused receive, an unreachable target, a
garbage stream. Each ends in a clear ``VmmError`` (or ``VmmRejected``),
with nothing left behind and the source's VM left running.

The hostile VMM is an HTTP server of the test's own on a real unix socket
(``HostileVmm``); the others are the fake VMM."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest
from chmhelpers import TOKEN, Host
from vmmhelpers import OPENAPI, ApiValidator, config, definition

from procurator.worker.stream_auth import Gate, preamble
from procurator.worker.vmm import cloud_hypervisor, process
from procurator.worker.vmm.base import (
    Address,
    VmmError,
    VmmGone,
    VmmHandle,
    VmmRejected,
    VmState,
)

Answer = tuple[int, bytes]

_ERROR = json.dumps(["Error from API", "Invalid VM state transition"]).encode()


class HostileVmm:
    """Answers each endpoint with a canned (status, body), or never (None:
    until ``close``); records what was asked."""

    def __init__(self, path: Path, answers: dict[str, Answer | None]) -> None:
        self.path = path
        self.answers = answers
        self.asked: list[str] = []
        self.released = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                endpoint = self.path.rsplit("/", 1)[-1]
                outer.asked.append(f"{self.command} {endpoint}")
                answer = outer.answers.get(endpoint, (404, b'["unknown"]'))
                if answer is None:
                    outer.released.wait()
                    return
                status, body = answer
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if body:
                    self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = _answer

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,))
        self.thread.start()

    def handle(self) -> VmmHandle:
        ticks = process.pid_start_ticks(os.getpid())
        assert ticks is not None
        return VmmHandle("cloud-hypervisor", os.getpid(), ticks, str(self.path))

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def api() -> None:
    """The drivers here talk to VMMs that break the API on purpose: no
    validation (``test_the_validator_catches_bad_migration_bodies`` has
    its own)."""
    return None


@pytest.fixture
def hostile(source: Host) -> Iterator[HostileVmm]:
    paths = source.paths()
    vmm = HostileVmm(paths.api_socket, {})
    yield vmm
    vmm.close()


@pytest.fixture
def listening(address: Address) -> Iterator[Address]:
    """A TCP address a target listens on: it accepts the move's token (a
    real ``stream_auth.Gate``), then never says anything more."""
    with socket.create_server(address) as server:
        gate = Gate(server, TOKEN, what="a silent target")
        taken: list[socket.socket | None] = []
        thread = threading.Thread(target=lambda: taken.append(gate.accept()))
        thread.start()
        try:
            yield address
        finally:
            gate.interrupt()
            thread.join()
            gate.close()
            for conn in taken:
                if conn is not None:
                    conn.close()


def _info(state: str) -> Answer:
    return 200, json.dumps({"config": config(), "state": state}).encode()


@pytest.mark.parametrize(
    ("answers", "error", "match"),
    [
        ({"vm.info": (200, b"{not json")}, VmmError, "invalid JSON for /api/v1/vm.info"),
        ({"vm.info": (200, b"[1, 2]")}, VmmError, "sent list for /api/v1/vm.info"),
        ({"vm.info": (404, _ERROR)}, VmmRejected, "no VM to migrate"),
        (
            {"vm.info": _info("Running"), "vm.send-migration": (405, _ERROR)},
            VmmRejected,
            r"refused vm\.send-migration with HTTP 405",
        ),
        (
            {"vm.info": _info("Paused"), "vm.send-migration": (405, _ERROR)},
            VmmRejected,
            r"refused vm\.send-migration with HTTP 405",
        ),
        (
            {"vm.info": _info("Paused"), "vm.send-migration": (500, b"<html>oops</html>")},
            VmmError,
            r"refused vm\.send-migration with HTTP 500",
        ),
    ],
    ids=[
        "garbage-info",
        "info-not-an-object",
        "no-vm",
        "wrong-state",
        "refused-paused",
        "garbage-error",
    ],
)
def test_a_send_refused_or_garbled_is_a_clear_error(
    source: Host,
    hostile: HostileVmm,
    listening: Address,
    answers: dict[str, Answer],
    error: type[Exception],
    match: str,
) -> None:
    hostile.answers.update(answers)
    with pytest.raises(error, match=match) as raised:
        source.driver.send_migration(
            hostile.handle(), memory=listening, disks=None, token=TOKEN, timeout=30.0
        )
    # The relay is gone with the call, though its VMM never connected.
    assert not [t for t in threading.enumerate() if t.name.startswith("migration to")]
    asked = [a for a in hostile.asked if a != "GET vm.info"]
    if "vm.send-migration" in answers:
        assert asked[0] == "PUT vm.send-migration"
        if answers["vm.info"] == _info("Paused"):
            # Left paused after a failed or refused send: the driver
            # resumes it, and the VMM's own words are in the error.
            assert asked[1:] == ["PUT vm.resume"]
            body = answers["vm.send-migration"][1].decode()
            assert any(
                body in d or d in body
                for d in raised.value.details  # type: ignore[attr-defined]
            )
        else:
            assert asked[1:] == []
    else:
        assert asked == []  # refused before the VMM was asked to send
    assert not (source.paths().vmm_dir / "migrate.sock").exists()


def test_an_unreachable_target_fails_before_the_vmm_is_asked(
    source: Host, hostile: HostileVmm, address: Address
) -> None:
    hostile.answers["vm.info"] = _info("Paused")
    hostile.answers["vm.resume"] = (204, b"")
    with pytest.raises(VmmError, match=r"cannot reach the migration target at 127\.0\.0\.1:"):
        source.driver.send_migration(
            hostile.handle(), memory=address, disks=None, token=TOKEN, timeout=5.0
        )
    assert "PUT vm.send-migration" not in hostile.asked
    # The caller paused the VM to copy its disks: a failed move resumes it
    # (the port's promise), whatever step failed.
    assert hostile.asked[-1] == "PUT vm.resume"
    assert not (source.paths().vmm_dir / "migrate.sock").exists()


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (_info("Paused"), "reports the VM Paused after receiving its migration"),
        ((404, _ERROR), "reports the VM NotCreated after receiving its migration"),
        ((200, b"\x00\xff garbage"), "invalid JSON"),
        ((200, b'{"state": "Running", "config": 7}'), "without a config object"),
    ],
    ids=["paused", "no-vm", "garbage", "no-config"],
)
def test_finishing_a_migration_the_vmm_did_not_complete_is_a_clear_error(
    target: Host, answer: Answer, match: str
) -> None:
    """A restarted worker finishes a move its predecessor started: it has
    only the VMM's word, and that word must say Running."""
    hostile = HostileVmm(target.paths().api_socket, {"vm.info": answer})
    try:
        with pytest.raises(VmmError, match=match):
            target.driver.finish_incoming(hostile.handle(), timeout=5.0)
    finally:
        hostile.close()


def test_a_refused_receive_leaves_no_vmm_and_frees_the_address(
    target: Host, address: Address
) -> None:
    paths = target.paths()
    Path(f"{paths.api_socket}.fault").write_text(
        json.dumps({"reject": {"vm.receive-migration": 500}})
    )
    with pytest.raises(VmmError, match=r"vm\.receive-migration with HTTP 500"):
        target.driver.launch_incoming(
            definition(), paths, memory=address, disks=None, token=TOKEN, timeout=20.0
        )
    assert process.find_launched(paths.vm_dir) == []
    with socket.create_server(address):
        pass  # the relay let go of it


def test_disk_mirroring_is_refused_before_anything_starts(target: Host, address: Address) -> None:
    paths = target.paths()
    with pytest.raises(VmmRejected, match="cannot mirror disks"):
        target.driver.launch_incoming(
            definition(), paths, memory=address, disks=address, token=TOKEN, timeout=20.0
        )
    assert process.find_launched(paths.vm_dir) == []
    assert target.calls.endpoints() == []


def test_intruders_on_the_targets_port_are_dropped_and_the_move_goes_on(
    source: Host, target: Host, address: Address
) -> None:
    """Whoever reaches the target's port before the source (garbage, the
    wrong token, or nothing at all) is refused by the worker, never
    reaches the VMM, and does not take the source's place: the real
    source, coming last, moves the VM."""
    src_paths, tgt_paths = source.paths(), target.paths()
    handle = source.driver.launch(definition(), src_paths, timeout=20.0)
    incoming = None
    try:
        source.driver.pause(handle, timeout=5.0)
        incoming = target.driver.launch_incoming(
            definition(), tgt_paths, memory=address, disks=None, token=TOKEN, timeout=20.0
        )
        with (
            socket.create_connection(address) as silent,  # holds on, says nothing
            socket.create_connection(address) as garbage,
            socket.create_connection(address) as wrong,
        ):
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert garbage.recv(1024) == b"error: not a procurator stream\n"
            wrong.sendall(preamble(bytes(16)))
            assert wrong.recv(1024) == b"error: wrong token\n"
            source.driver.send_migration(
                handle, memory=address, disks=None, token=TOKEN, timeout=20.0
            )
            target.driver.finish_incoming(incoming, timeout=20.0)
            # The silent one is dropped too once the source came (the
            # listener is closed: nobody else is taken).
            assert silent.recv(1024) == b""
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(address, timeout=5.0).close()
        assert target.driver.state(incoming, timeout=5.0) is VmState.RUNNING
        assert process.wait_exit(handle.pid, handle.pid_start_ticks, 10.0)
    finally:
        for host, made in ((source, handle), (target, incoming)):
            if made is not None:
                host.driver.shutdown_vmm(made, timeout=5.0)
                process.terminate(made.pid, made.pid_start_ticks, grace=2.0)


def test_a_send_timing_out_as_its_vmm_exits_is_vmm_gone(
    source: Host, hostile: HostileVmm, listening: Address, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer to vm.send-migration times out, and the VMM is gone by
    then: it may have exited because the migration completed (the target
    runs the VM), so the send is ``VmmGone`` (the caller asks the target),
    not a timeout after which the caller would resume the source."""
    monkeypatch.setattr(cloud_hypervisor, "_GRACE", 0.2)  # the answer's wait beyond timeout_s
    hostile.answers["vm.info"] = _info("Paused")
    hostile.answers["vm.send-migration"] = None  # never answered
    gone = subprocess.Popen(["sleep", "60"])
    ticks = process.pid_start_ticks(gone.pid)
    gone.kill()
    gone.wait()
    assert ticks is not None
    handle = VmmHandle("cloud-hypervisor", gone.pid, ticks, str(hostile.path))
    with pytest.raises(VmmGone, match=r"exited while vm\.send-migration timed out"):
        source.driver.send_migration(handle, memory=listening, disks=None, token=TOKEN, timeout=1.0)
    assert "PUT vm.resume" not in hostile.asked  # never resumed: the target may run it


def test_a_target_that_refuses_the_token_fails_the_send_and_the_vm_runs_on(
    source: Host, hostile: HostileVmm, address: Address
) -> None:
    """A target that does not know the move's token (another move's, or
    not ours at all) refuses the stream before the VMM is asked to send."""
    hostile.answers["vm.info"] = _info("Paused")
    hostile.answers["vm.resume"] = (204, b"")
    with socket.create_server(address) as server:
        gate = Gate(server, bytes(range(16)), what="another move's target")
        thread = threading.Thread(target=gate.accept, args=(time.monotonic() + 10.0,))
        thread.start()
        try:
            with pytest.raises(VmmError, match="refused the stream: wrong token"):
                source.driver.send_migration(
                    hostile.handle(), memory=address, disks=None, token=TOKEN, timeout=5.0
                )
        finally:
            gate.interrupt()
            thread.join()
            gate.close()
    assert "PUT vm.send-migration" not in hostile.asked
    assert hostile.asked[-1] == "PUT vm.resume"
    assert not (source.paths().vmm_dir / "migrate.sock").exists()


def test_the_validator_catches_bad_migration_bodies(
    _openapi_spec: ApiValidator | None,
) -> None:
    """The migration bodies are really checked against the description."""
    if _openapi_spec is None:
        pytest.skip(f"cloud-hypervisor OpenAPI description not found at {OPENAPI}")
    openapi = _openapi_spec
    openapi.errors.clear()
    for path, body in [
        ("/api/v1/vm.receive-migration", {}),
        ("/api/v1/vm.receive-migration", {"receiver_url": 7}),
        ("/api/v1/vm.send-migration", {"destination_url": "unix:/x", "connections": 0}),
        ("/api/v1/vm.send-migration", {"destination_url": "unix:/x", "timeout_s": 0}),
        (
            "/api/v1/vm.send-migration",
            {"destination_url": "unix:/x", "timeout_strategy": "Later"},
        ),
    ]:
        openapi.check_request("put", path, json.dumps(body).encode(), "application/json")
    found = list(openapi.errors)
    openapi.errors.clear()
    assert len(found) == 5, found
