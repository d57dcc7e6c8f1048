"""Live moves: how long a 256 MiB guest is unreachable while the QEMU
driver moves it to another host with its disk, and how long the whole move
takes, next to a bare QEMU-to-QEMU migration run by hand in the same run
(issue 30). Snapshot create/restore against ``cp``: ``bench/snapshot.py``.

Two network namespaces ("hosts") a and b, each with a bridge and a tap,
the bridges joined by a veth; the guest (the test image,
``scripts/build-test-image.sh``: 256 MiB, TCG) has a writable data disk of
random bytes (64 MiB; 16 MiB with ``--quick``). The driver's calls run in
a thread that entered the namespace of their side, as a worker running
there would make them, so the move's TCP connections cross the veth.
Each round boots the guest on a, then:

- ``move``: the QEMU driver's live move a -> b (``launch_incoming`` on b,
  ``send_migration`` on a: the disk mirrored over NBD, then memory, the
  mirror completed at the switchover; ``finish_incoming`` on b);
- the floor: the guest moved back b -> a by hand, the way QEMU's manual
  shows it: a plain ``qemu-system-x86_64 ... -incoming tcp:`` on a, QMP
  ``migrate tcp:`` on b, ``cont`` on a; memory only (the disk shared, as
  on shared storage), the same bandwidth setting (unlimited);
- ``move`` of memory only: the driver's live move a -> b again, with
  ``disks=None`` (the disk shared, as the floor's): what the driver adds
  to a bare migration.

Measured for both: the longest gap between two replies of ``ping -i
0.01`` from a's bridge (the guest unreachable; 10 ms resolution), the
downtime QEMU itself reports (``query-migrate``), and the total, from the
first call until the guest runs on the other side.

The target's NBD export is reached through the worker's relay (TCP to the
unix socket QEMU serves on, after the token's check: ``_migration_relay``);
its cost alone: the disk's bytes pushed through a relay in this process
(loopback TCP in, unix socket out) against the same bytes over one
loopback TCP connection, 3 times each, medians.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pyroute2.netns import setns

from bench._harness import Row, Run, fmt_ratio, fmt_s, free_port, median
from bench.snapshot import _image as test_image
from procurator.core.vmdef import VmDefinition
from procurator.worker.state import StateDir
from procurator.worker.stream_auth import present
from procurator.worker.vmm import process
from procurator.worker.vmm._migration_relay import Relay
from procurator.worker.vmm.base import VmmError, VmmHandle, VmmPaths, VmmRejected
from procurator.worker.vmm.qemu import QemuDriver, _QmpSession, _Target, qemu_argv

#: The move's secret both ends get (the mover's transfer token).
TOKEN = secrets.token_bytes(16)

NAME = "move"
_READY = b"PROCURATOR-READY"
_GUEST = "10.79.0.2"
_HOST_A = "10.79.0.1"
_HOST_B = "10.79.0.3"
_PING_INTERVAL = 0.01
_T = TypeVar("_T")


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def _hosts(mark: str) -> Iterator[tuple[str, str]]:
    """Namespaces a and b: a bridge with tap0 each, joined by a veth."""
    made: list[str] = []
    try:
        for name, address in (("a", _HOST_A), ("b", _HOST_B)):
            netns = f"pbm{name}-{mark[:8]}"
            _sh("ip", "netns", "add", netns)
            made.append(netns)
            run = ("ip", "-n", netns)
            _sh(*run, "link", "add", "br0", "type", "bridge")
            _sh(*run, "tuntap", "add", "dev", "tap0", "mode", "tap")
            _sh(*run, "link", "set", "tap0", "master", "br0", "up")
            _sh(*run, "addr", "add", f"{address}/24", "dev", "br0")
            _sh(*run, "link", "set", "br0", "up")
        a, b = made
        _sh(
            "ip",
            "-n",
            a,
            "link",
            "add",
            "link0",
            "type",
            "veth",
            "peer",
            "name",
            "link0",
            "netns",
            b,
        )
        for netns in made:
            _sh("ip", "-n", netns, "link", "set", "link0", "master", "br0", "up")
        yield a, b
    finally:
        for netns in made:
            subprocess.run(["ip", "netns", "delete", netns], check=False, capture_output=True)


def _in_netns(netns: str, call: Callable[[], _T]) -> _T:
    """``call()`` in a thread that entered ``netns`` (sockets it opens, and
    processes it starts, are there)."""
    outcome: dict[str, Any] = {}

    def body() -> None:
        try:
            setns(netns, flags=0)  # this thread's only
            outcome["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=body, name=f"in-{netns}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]  # type: ignore[no-any-return]


class _Pinger:
    def __init__(self, netns: str) -> None:
        self._process = subprocess.Popen(
            ["ip", "netns", "exec", netns, "busybox", "ping", "-i", str(_PING_INTERVAL), _GUEST],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def stop(self) -> float:
        """The longest time between two replies."""
        self._process.send_signal(signal.SIGINT)
        out, _ = self._process.communicate(timeout=10)
        seqs = [int(m) for m in re.findall(r"seq=(\d+)", out)]
        if len(seqs) < 2:
            raise RuntimeError(f"the guest answered {len(seqs)} ping(s)")
        return max(later - earlier for earlier, later in itertools.pairwise(seqs)) * _PING_INTERVAL

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.communicate()


def _definition(image: Path, disk: Path, serial: Path) -> VmDefinition:
    config = json.loads((image / "vm-config.json").read_text())
    for key in ("kernel", "initramfs"):
        if key in config["payload"] and not os.path.isabs(config["payload"][key]):
            config["payload"][key] = str(image / config["payload"][key])
    config["payload"]["cmdline"] += f" ip={_GUEST}::{_HOST_A}:255.255.255.0:guest:eth0:off"
    config["disks"] = [{"path": str(disk), "id": "data", "readonly": False}]
    config["net"] = [{"tap": "tap0", "mac": "52:54:00:79:00:02"}]
    return dataclasses.replace(VmDefinition.from_vm_config(config), serial_file=str(serial))


def _qmp(handle: VmmHandle, command: str, arguments: dict[str, Any] | None = None) -> Any:
    session = _QmpSession(_Target("bench", handle.api_socket), time.monotonic() + 30)
    try:
        return session.execute(command, arguments)
    finally:
        session.close()


def _wait(what: str, done: Callable[[], bool], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {limit:.0f} s")
        time.sleep(0.02)


def _pings(netns: str) -> bool:
    ping = ["ip", "netns", "exec", netns, "busybox", "ping", "-c", "1", "-W", "1", _GUEST]
    return subprocess.run(ping, capture_output=True, check=False).returncode == 0


@dataclasses.dataclass
class _Round:
    gap: float
    downtime: float  # as QEMU reports it
    total: float


def _watched(a: str, source: VmmHandle, move: Callable[[], None]) -> _Round:
    """Run ``move`` with ``ping`` running from a; the gap, the downtime the
    source QEMU reports, the time ``move`` took."""
    pinger = _Pinger(a)
    try:
        time.sleep(0.5)
        started = time.perf_counter()
        move()
        total = time.perf_counter() - started
        _wait("ping after the move", lambda: _pings(a))
        time.sleep(0.5)
        gap = pinger.stop()
    finally:
        pinger.kill()
    return _Round(gap, _qmp(source, "query-migrate")["downtime"] / 1000, total)


def _driver_move(
    driver: QemuDriver,
    hosts: tuple[str, str],
    source: VmmHandle,
    definition: VmDefinition,
    paths: VmmPaths,
    *,
    disks: bool,
    stop: list[VmmHandle],
) -> tuple[_Round, VmmHandle]:
    """The QEMU driver's live move of ``source`` from a to b (the disk
    mirrored, or shared), each call in its side's namespace; its figures
    and the target."""
    a, b = hosts
    memory = (_HOST_B, free_port())
    nbd = (_HOST_B, free_port()) if disks else None
    target = _in_netns(
        b,
        lambda: driver.launch_incoming(
            definition, paths, memory=memory, disks=nbd, token=TOKEN, timeout=60.0
        ),
    )
    stop.append(target)

    def move() -> None:
        _in_netns(
            a,
            lambda: driver.send_migration(
                source, memory=memory, disks=nbd, token=TOKEN, timeout=300
            ),
        )
        _in_netns(b, lambda: driver.finish_incoming(target, timeout=60.0))

    return _watched(a, source, move), target


def _one_round(
    run: Run, image: Path, a: str, b: str, index: int, disk_mib: int, stop: list[VmmHandle]
) -> dict[str, _Round]:
    """Boot on a; the driver's move a -> b with the disk; the floor b -> a
    by hand; the driver's move a -> b of memory only (the disk shared)."""
    driver = QemuDriver(accel="tcg")
    paths = [StateDir(run.dir / f"move-{index}-{step}").paths("guest") for step in "abcd"]
    for vm_paths in paths:
        vm_paths.vmm_dir.mkdir(parents=True)
    disks = [paths[0].vm_dir / "data.img", paths[1].vm_dir / "data.img"]
    disks[0].write_bytes(os.urandom(disk_mib << 20))
    with open(disks[1], "wb") as f:
        f.truncate(disk_mib << 20)
    # The first runs on a's disk; the others on b's (mirrored, then shared).
    definitions = [_definition(image, disks[min(i, 1)], p.serial_file) for i, p in enumerate(paths)]
    rounds: dict[str, _Round] = {}

    source = _in_netns(a, lambda: driver.launch(definitions[0], paths[0], timeout=60.0))
    stop.append(source)
    _wait("boot", lambda: _READY in _read(paths[0].serial_file))
    _wait("ping", lambda: _pings(a))

    # The QEMU driver's live move, a -> b, the disk mirrored.
    rounds["disk"], target = _driver_move(
        driver, (a, b), source, definitions[1], paths[1], disks=True, stop=stop
    )
    driver.shutdown_vmm(source, timeout=30.0)

    # The floor: b -> a by hand, memory only, the disk shared (b's copy).
    port = free_port()
    argv = qemu_argv(definitions[2], paths[2], accel="tcg")
    argv += ["-incoming", f"tcp:{_HOST_A}:{port}"]
    pid, ticks = _in_netns(
        a,
        lambda: process.launch_detached(
            argv, vm_dir=paths[2].vm_dir, log_path=paths[2].log_file, cwd=paths[2].vmm_dir
        ),
    )
    back = VmmHandle("qemu", pid, ticks, str(paths[2].api_socket))
    stop.append(back)
    _wait("the floor's QEMU", lambda: _answers(back))

    def by_hand() -> None:
        _qmp(target, "migrate-set-parameters", {"max-bandwidth": 1 << 40})
        _qmp(target, "migrate", {"uri": f"tcp:{_HOST_A}:{port}"})
        _wait("migrate", lambda: _qmp(target, "query-migrate")["status"] == "completed")
        _wait("incoming", lambda: _qmp(back, "query-migrate").get("status") == "completed")
        _qmp(back, "cont")

    rounds["floor"] = _watched(a, target, by_hand)
    driver.shutdown_vmm(target, timeout=30.0)

    # The driver's live move of memory only, a -> b, the disk shared.
    rounds["memory"], again = _driver_move(
        driver, (a, b), back, definitions[3], paths[3], disks=False, stop=stop
    )
    for handle in (back, again):
        driver.shutdown_vmm(handle, timeout=30.0)
    return rounds


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def _answers(handle: VmmHandle) -> bool:
    try:
        _qmp(handle, "query-status")
    except (VmmError, VmmRejected):  # not up yet
        return False
    return True


def _drain(conn: socket.socket, got: list[int]) -> None:
    count = 0
    buffer = bytearray(1 << 20)
    while read := conn.recv_into(buffer):
        count += read
    got.append(count)


def _push(sender: socket.socket, receiver: socket.socket, total: int) -> float:
    """Seconds to send ``total`` bytes from ``sender`` until ``receiver``
    read them all and the end of the stream."""
    got: list[int] = []
    reader = threading.Thread(target=_drain, args=(receiver, got))
    chunk = bytes(1 << 20)
    started = time.monotonic()
    reader.start()
    for _ in range(total // len(chunk)):
        sender.sendall(chunk)
    sender.shutdown(socket.SHUT_WR)
    reader.join()
    elapsed = time.monotonic() - started
    assert got == [total], got
    return elapsed


def _through_relay(total: int) -> float:
    """``total`` bytes through the worker's relay, as the NBD export's."""
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        path = Path(tmp) / "nbd.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as vmm:
            vmm.bind(str(path))
            vmm.listen(1)
            relay = Relay.incoming(("127.0.0.1", 0), TOKEN, hang_up=False, what="bench")
            try:
                relay.start(path)
                with socket.create_connection(relay.address) as peer:
                    present(peer, TOKEN, deadline=time.monotonic() + 10.0)
                    served, _ = vmm.accept()
                    with served:
                        return _push(peer, served, total)
            finally:
                relay.close()


def _direct(total: int) -> float:
    """``total`` bytes over one loopback TCP connection."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()[:2]) as peer,
    ):
        served, _ = server.accept()
        with served:
            return _push(peer, served, total)


def measure(run: Run) -> list[Row]:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("nix-build") is None:
        return [Row(NAME, "skipped", "n/a", note="needs qemu-system-x86_64 and nix-build")]
    rounds = 1 if run.quick else 3
    disk_mib = 16 if run.quick else 64
    image = test_image(run)  # the snapshot bench's: the same guest
    results: list[dict[str, _Round]] = []
    stop: list[VmmHandle] = []
    with _hosts(run.mark) as (a, b):
        try:
            for index in range(rounds):
                results.append(_one_round(run, image, a, b, index, disk_mib, stop))
        finally:
            for handle in stop:
                process.terminate(handle.pid, handle.pid_start_ticks, grace=5.0)
    note = (
        f"one 256 MiB guest under TCG with a {disk_mib} MiB random data disk, between two "
        f"network namespaces joined by a veth; {rounds} round(s), medians; baseline: a bare "
        "QEMU migrate tcp: by hand, memory only (disk shared), in the same run; gap: the "
        f"longest time between two replies of ping -i {_PING_INTERVAL}"
    )

    def row(kind: str, metric: str, pick: Callable[[_Round], float], **extra: str) -> Row:
        value = median([pick(r[kind]) for r in results])
        base = median([pick(r["floor"]) for r in results])
        return Row(NAME, metric, fmt_s(value), fmt_s(base), fmt_ratio(value, base), **extra)

    relayed = median([_through_relay(disk_mib << 20) for _ in range(3)])
    direct = median([_direct(disk_mib << 20) for _ in range(3)])
    return [
        row("disk", "live move: guest unreachable (ping gap)", lambda r: r.gap, note=note),
        row("disk", "live move: downtime as QEMU reports it", lambda r: r.downtime),
        row("disk", "live move: total (disk mirrored + memory)", lambda r: r.total),
        row("memory", "live move of memory only (disk shared): ping gap", lambda r: r.gap),
        row("memory", "... downtime as QEMU reports it", lambda r: r.downtime),
        row("memory", "... total", lambda r: r.total),
        Row(
            NAME,
            f"the NBD relay alone: {disk_mib} MiB, TCP in, unix out",
            fmt_s(relayed),
            fmt_s(direct),
            fmt_ratio(relayed, direct),
            note="baseline: the same bytes over one loopback TCP connection; one process",
        ),
    ]
