"""The driver's QMP client against a scripted monitor on a real unix socket
(fast; the real QEMU is in test_boot.py). The handle names this test's own
process, which is alive, so every call reaches the monitor."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procurator.worker.vmm.base import (
    VmExit,
    VmmGone,
    VmmHandle,
    VmmPaths,
    VmmRejected,
    VmmTimeout,
    VmState,
)
from procurator.worker.vmm.process import pid_start_ticks
from procurator.worker.vmm.qemu import QemuDriver

Reply = Callable[[dict[str, Any]], list[dict[str, Any]]]
GREETING = {"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}}


class FakeMonitor:
    """Accepts sessions one at a time, like QEMU's monitor; answers each
    command with what ``reply`` returns (events and/or a response)."""

    def __init__(
        self,
        path: Path,
        reply: Reply,
        *,
        greet: bool = True,
        before_greeting: tuple[dict[str, Any], ...] = (),
    ) -> None:
        self.path = path
        self.reply = reply
        self.greet = greet
        self.before_greeting = before_greeting
        self.commands: list[str] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(4)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                if not self.greet:
                    self.stopping.wait()
                    return
                for message in (*self.before_greeting, GREETING):
                    stream.write(json.dumps(message).encode() + b"\r\n")
                stream.flush()
                for line in stream:
                    request = json.loads(line)
                    self.commands.append(request["execute"])
                    for message in self.reply(request):
                        stream.write(json.dumps(message).encode() + b"\r\n")
                    stream.flush()

    def close(self) -> None:
        self.stopping.set()
        # shutdown() wakes a thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()


def answer(mapping: dict[str, Any]) -> Reply:
    def reply(request: dict[str, Any]) -> list[dict[str, Any]]:
        command = request["execute"]
        if command == "qmp_capabilities":
            return [{"return": {}, "id": request["id"]}]
        result = mapping[command]
        if isinstance(result, dict) and "error" in result:
            return [{"error": result["error"], "id": request["id"]}]
        return [
            {"event": "RESUME", "timestamp": {"seconds": 0, "microseconds": 0}},
            {"return": result, "id": request["id"]},
        ]

    return reply


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path("/tmp") / f"pq-qmp-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
def monitor(sock_dir: Path) -> Iterator[Callable[..., FakeMonitor]]:
    made: list[FakeMonitor] = []

    def make(reply: Reply, **kwargs: Any) -> FakeMonitor:
        made.append(FakeMonitor(sock_dir / f"m{len(made)}.sock", reply, **kwargs))
        return made[-1]

    yield make
    for m in made:
        m.close()


def own_handle(path: Path) -> VmmHandle:
    ticks = pid_start_ticks(os.getpid())
    assert ticks is not None
    return VmmHandle("qemu", os.getpid(), ticks, str(path))


def test_state_maps_run_states_and_skips_events(monitor: Callable[..., FakeMonitor]) -> None:
    driver = QemuDriver(accel="tcg")
    for status, state in [
        ("running", VmState.RUNNING),
        ("paused", VmState.PAUSED),
        ("prelaunch", VmState.CREATED),
        ("shutdown", VmState.SHUTDOWN),
        ("guest-panicked", VmState.SHUTDOWN),
    ]:
        fake = monitor(answer({"query-status": {"status": status, "running": False}}))
        assert driver.state(own_handle(fake.path), timeout=5) is state
        assert fake.commands == ["qmp_capabilities", "query-status"]


def test_events_a_session_gets_before_its_greeting_are_skipped(
    monitor: Callable[..., FakeMonitor],
) -> None:
    # QEMU flushed an event queued for the previous client (a session that
    # timed out mid-move) to the next one before its greeting: the undo of a
    # failed live move found "no QMP greeting" and left the move undone (CI).
    stale = {
        "timestamp": {"seconds": 1, "microseconds": 0},
        "event": "BLOCK_JOB_ERROR",
        "data": {"device": "procurator-mirror-data", "operation": "write", "action": "report"},
    }
    m = monitor(answer({"query-status": {"status": "running"}}), before_greeting=(stale,))
    assert QemuDriver().state(own_handle(m.path), timeout=5.0) is VmState.RUNNING


def test_commands_map_to_qmp(monitor: Callable[..., FakeMonitor]) -> None:
    fake = monitor(answer({"stop": {}, "cont": {}, "system_powerdown": {}}))
    driver = QemuDriver(accel="tcg")
    handle = own_handle(fake.path)
    driver.pause(handle, timeout=5)
    driver.resume(handle, timeout=5)
    driver.power_button(handle, timeout=5)
    assert [c for c in fake.commands if c != "qmp_capabilities"] == [
        "stop",
        "cont",
        "system_powerdown",
    ]


def test_qmp_error_is_a_rejection_naming_class_and_desc(
    monitor: Callable[..., FakeMonitor],
) -> None:
    error = {"class": "GenericError", "desc": "Resetting the Virtual Machine is required"}
    fake = monitor(answer({"cont": {"error": error}}))
    with pytest.raises(VmmRejected) as raised:
        QemuDriver(accel="tcg").resume(own_handle(fake.path), timeout=5)
    assert "Resetting the Virtual Machine is required" in str(raised.value)
    assert "GenericError" in str(raised.value)
    assert fake.path.parent.name in str(raised.value)


def test_silent_monitor_times_out(monitor: Callable[..., FakeMonitor]) -> None:
    fake = monitor(answer({}), greet=False)
    with pytest.raises(VmmTimeout):
        QemuDriver(accel="tcg").state(own_handle(fake.path), timeout=0.3)


def test_nobody_listening_is_gone(sock_dir: Path) -> None:
    with pytest.raises(VmmGone):
        QemuDriver(accel="tcg").state(own_handle(sock_dir / "none.sock"), timeout=2)


def test_dead_process_is_gone_without_connecting(monitor: Callable[..., FakeMonitor]) -> None:
    fake = monitor(answer({"query-status": {"status": "running"}}))
    stale = VmmHandle("qemu", os.getpid(), -1, str(fake.path))  # start time differs
    with pytest.raises(VmmGone):
        QemuDriver(accel="tcg").state(stale, timeout=2)
    assert fake.commands == []
    # Stopping what is gone already succeeds.
    QemuDriver(accel="tcg").shutdown_vmm(stale, timeout=2)
    QemuDriver(accel="tcg").shutdown_vm(stale, timeout=2)


def test_counters_from_blockstats(monitor: Callable[..., FakeMonitor]) -> None:
    stats = {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 3, "wr_operations": 1}
    fake = monitor(
        answer(
            {
                "query-blockstats": [
                    {
                        "device": "drive-root",
                        "qdev": "/machine/peripheral/id-root/virtio-backend",
                        "stats": stats,
                    },
                    {"device": "drive-_disk1", "stats": stats},
                    {"device": "", "qdev": "/machine/unattached/x", "stats": stats},
                ]
            }
        )
    )
    counters = QemuDriver(accel="tcg").counters(own_handle(fake.path), timeout=5)
    expected = {"read_bytes": 4096, "write_bytes": 512, "read_ops": 3, "write_ops": 1}
    assert counters == {"root": expected, "_disk1": expected}


def test_adoption_and_exits_go_by_the_process_and_its_socket(
    monitor: Callable[..., FakeMonitor], sock_dir: Path
) -> None:
    fake = monitor(answer({}))
    paths = VmmPaths(sock_dir, fake.path, sock_dir / "e", sock_dir / "l", sock_dir / "s")
    driver = QemuDriver(accel="tcg")
    alive = own_handle(fake.path)
    assert driver.adopt(paths, alive) == alive
    stale = VmmHandle("qemu", os.getpid(), -1, str(fake.path))  # start time differs
    assert driver.adopt(paths, stale) is None
    # QEMU removes its QMP socket when it exits cleanly; a crash leaves it.
    # The socket is the one the QEMU's handle names (a QEMU started before
    # the VM's files moved to run/ has its socket where its handle says).
    assert driver.classify_exit(paths, stale) is VmExit.CRASHED
    gone = dataclasses.replace(stale, api_socket=str(sock_dir / "gone.sock"))
    assert driver.classify_exit(paths, gone) is VmExit.POWERED_OFF
