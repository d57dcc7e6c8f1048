"""``procurator top``: the frame it builds from a status, what it prints in
plain mode, and the real command against a real master and worker, under a
pseudo-terminal (refreshing in place) and in a pipe (plain lines)."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable

import pytest
from fleethelpers import AddImage, FakeFleet
from rich.console import Console
from testnames import free_port

from procurator.cli.top import PlainPrinter, fleet_frame, render
from procurator.core.control import FleetStatus, WorkerConnection, WorkerEvent
from procurator.core.models import EventKind, Phase, VmEvent, VmStatus, WorkerStatus

NOW = 1_765_000_000.0
READ_LIMIT = 60  # seconds: an upper bound for the command to show a change, not a threshold


def _worker(
    worker_id: str, *, connected: bool, desired: int, observed: int, phases: list[Phase]
) -> WorkerConnection:
    vms = tuple(VmStatus(f"{worker_id}-vm-{i}", phase) for i, phase in enumerate(phases))
    return WorkerConnection(
        worker_id=worker_id,
        connected=connected,
        since_unix_ms=int((NOW - 90) * 1000),
        desired_generation=desired,
        status=WorkerStatus(worker_id, observed, vms),
        last_report_unix_ms=int((NOW - 3) * 1000),
        vm_count=len(phases),
    )


def _status(host_b_observed: int = 6) -> FleetStatus:
    return FleetStatus(
        generation=7,
        workers=(
            _worker(
                "host-a",
                connected=True,
                desired=7,
                observed=7,
                phases=[Phase.RUNNING, Phase.RUNNING, Phase.CRASH_LOOP],
            ),
            _worker(
                "host-b",
                connected=False,
                desired=7,
                observed=host_b_observed,
                phases=[Phase.FAILED, Phase.REALISING],
            ),
        ),
        change_index=42,
    )


def _event(seq: int, vm: str = "host-a-vm-2", kind: EventKind = EventKind.CRASHED) -> WorkerEvent:
    return WorkerEvent("host-a", VmEvent(vm, kind, "exited with 1", "op-0123456789ab"), seq)


def test_frame_counts_workers_convergence_and_phases() -> None:
    frame = fleet_frame("m:7300", _status(), [_event(1)], now_unix=NOW)
    assert (frame.connected, frame.converged, len(frame.workers)) == (1, 1, 2)
    totals = dict(frame.phase_totals)
    assert totals["running"] == 2
    assert totals["crashLoop"] == 1
    assert totals["failed"] == 1
    assert totals["starting"] == 1  # realising is on its way to starting
    assert frame.line() == (
        "fleet generation 7: 1/2 workers connected, 1/2 converged; "
        "VMs: running 2, starting 1, failed 1, crashLoop 1"
    )
    host_b = frame.workers[1]
    assert host_b.line() == (
        "worker host-b: disconnected, generation 6/7 (not converged), 2 VMs desired; "
        "starting 1 failed 1"
    )


def test_render_shows_every_worker_and_the_events() -> None:
    out = io.StringIO()
    Console(file=out, width=160, force_terminal=False).print(
        render(fleet_frame("m:7300", _status(), [_event(1)], now_unix=NOW))
    )
    text = out.getvalue()
    assert "procurator top" in text
    assert "1/2 connected" in text
    for cell in ("host-a", "host-b", "7/7", "6/7", "down 1m", "3s", "CRASHLOOP"):
        assert cell in text, cell
    assert "host-a-vm-2" in text and "crashed" in text


def test_plain_mode_prints_what_changed_once() -> None:
    out = io.StringIO()
    printer = PlainPrinter(out)
    printer.show(fleet_frame("m:7300", _status(), [_event(1)], now_unix=NOW))
    first = out.getvalue().splitlines()
    assert len(first) == 4  # the fleet, two workers, one event
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in first)
    assert "\x1b" not in out.getvalue()

    out.truncate(0)
    out.seek(0)
    # Nothing changed but the time: nothing printed.
    printer.show(fleet_frame("m:7300", _status(), [_event(1)], now_unix=NOW + 10))
    assert out.getvalue() == ""

    # host-b caught up and a new event came: those two lines, and the fleet's.
    printer.show(
        fleet_frame("m:7300", _status(host_b_observed=7), [_event(1), _event(2)], now_unix=NOW + 20)
    )
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert "worker host-b: disconnected, generation 7/7" in lines[0]
    assert "event " in lines[1] and "host-a-vm-2" in lines[1]


# ---------------------------------------------------------------- live


def _vm(vm_id: str, image: str) -> str:
    return f'{{ id = "{vm_id}", image = "{image}" }}'


def _image(add_image: AddImage) -> str:
    return add_image(
        "top-vm",
        {
            "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64 << 20},
        },
    )


def _read_until(fd: int, seen: bytearray, done: Callable[[bytes], bool]) -> None:
    """Read ``fd`` into ``seen`` until ``done(seen)``; fail after READ_LIMIT."""
    deadline = time.monotonic() + READ_LIMIT
    while not done(bytes(seen)):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out; output so far:\n{bytes(seen)[-3000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the pty's other side is closed
                chunk = b""
            if not chunk:
                raise AssertionError(f"output ended; so far:\n{bytes(seen)[-3000:]!r}")
            seen += chunk


def _top(fleet: FakeFleet, *args: str, **popen: object) -> subprocess.Popen[bytes]:
    env = {**fleet.env, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    env.pop("NO_COLOR", None)
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-m", "procurator", "top", *args], env=env, **popen
    )


@pytest.mark.root
@pytest.mark.nix
def test_top_refreshes_in_place_on_a_terminal(fake_fleet: FakeFleet, add_image: AddImage) -> None:
    image = _image(add_image)
    fake_fleet.apply_ok(f"[workers.host-a]\nvms = [ {_vm('web-1', image)} ]\n")
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    try:
        proc = _top(
            fake_fleet, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True
        )
        os.close(terminal)
        seen = bytearray()
        try:
            _read_until(controller, seen, lambda out: b"host-a" in out and b"web-1" in out)
            fake_fleet.apply_ok(
                f"[workers.host-a]\nvms = [ {_vm('web-1', image)}, {_vm('web-2', image)} ]\n"
            )
            _read_until(controller, seen, lambda out: b"web-2" in out and b"booted" in out)
            proc.send_signal(signal.SIGINT)  # Ctrl-C
            proc.wait(timeout=READ_LIMIT)
            with_rest = bytearray(seen)
            try:
                while select.select([controller], [], [], 0.5)[0]:
                    chunk = os.read(controller, 65536)
                    if not chunk:
                        break
                    with_rest += chunk
            except OSError:
                pass  # EIO once the process is gone
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(controller)
    text = bytes(with_rest)
    assert proc.returncode == 130, text[-2000:]
    # Refreshed in place: the view was drawn more than once, the cursor
    # moved back up over the previous drawing, and was shown again at the end.
    assert text.count(b"procurator top") >= 2
    assert re.search(rb"\x1b\[\d*A", text), "no cursor-up: the view was not redrawn in place"
    assert text.rstrip().endswith(b"\x1b[?25h") or b"\x1b[?25h" in text[-200:]
    assert b"Traceback" not in text


@pytest.mark.root
@pytest.mark.nix
def test_top_prints_plain_lines_in_a_pipe(fake_fleet: FakeFleet, add_image: AddImage) -> None:
    image = _image(add_image)
    fake_fleet.apply_ok(f"[workers.host-a]\nvms = [ {_vm('web-1', image)} ]\n")
    proc = _top(fake_fleet, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        seen = bytearray()
        _read_until(fd, seen, lambda out: b"worker host-a:" in out and b"running 1" in out)
        fake_fleet.apply_ok(
            f"[workers.host-a]\nvms = [ {_vm('web-1', image)}, {_vm('web-2', image)} ]\n"
        )
        # Until web-2's "booted" event: a combined report stores the status
        # before its events, and the master's change index moves on each, so
        # a read between the two shows "running 2" beside web-2's "created"
        # only; the "booted" line comes with the next read.
        _read_until(
            fd,
            seen,
            lambda out: b"running 2" in out and bool(re.search(rb"event .* web-2 +booted", out)),
        )
        # The reader goes away (`| head`): it ends at once, quietly, as a
        # tool killed by SIGPIPE would (128 + 13).
        proc.stdout.close()
        _, errors = proc.communicate(timeout=READ_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = bytes(seen).decode()
    assert "\x1b" not in text
    lines = text.splitlines()
    assert all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines
    assert any("fleet generation 1: 1/1 workers connected, 1/1 converged" in x for x in lines)
    assert any(re.search(r"event .* web-2 +booted", line) for line in lines), lines
    assert proc.returncode == 141, errors.decode()
    assert errors == b""


@pytest.mark.root
@pytest.mark.nix
def test_top_once_prints_the_fleet_and_exits(fake_fleet: FakeFleet) -> None:
    result = fake_fleet.cli("top", "--once")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].endswith(
        "fleet generation 0: 1/1 workers connected, 1/1 converged; VMs: none reported"
    )


def test_top_says_when_there_is_no_master() -> None:
    address = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "procurator", "top", "--once", "--master", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("procurator top: ")
    assert address in result.stderr
