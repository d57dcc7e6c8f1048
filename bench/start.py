"""1. Start throughput: N VMs on one worker through ``apply``, against a bare
loop doing the same VMM spawns and API calls directly, in the same run.

The procurator side is the product as deployed: real ``procurator master``
and ``procurator worker`` processes (``--no-network``, cloud-hypervisor
driver pointed at the lean fake VMM), a real image added to the Nix store,
one ``Control.apply`` of N VMs; the clock stops when the master's status
shows the worker's ``observedGeneration`` at the applied generation (every
VM running). The bare loop, at the worker's concurrency (8 threads): spawn
the same fake VMM, wait for its socket, ``vmm.ping``, ``vm.create``,
``vm.boot``, ``vm.info`` over one raw HTTP/1.1 connection. Ratio =
procurator / bare.

And what a start costs the worker itself (issue 31): the worker process's
CPU (its threads, not its children) from sending the apply until observed,
per VM, next to the CPU the fake VMMs spent in their whole lives (their
own start cost). So that the worker's figure cannot look small by moving
work elsewhere, two more figures stand beside it: what its helpers spent
over the same span (the jailer, whose forks become the VMMs and are
counted with them, and the children it reaped: ``nix-store`` runs), and a
floor, the bare loop's own CPU per start (a Python process that only
spawns the VMM and makes the four API calls: no image, no jail, no state).

The 1,000-VM fleet this leaves running is reused by ``change`` and
``idle`` (``one_worker_fleet``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bench._harness import (
    LEAN_VMM,
    Proc,
    Row,
    Run,
    control,
    cpu_seconds,
    fleet_of,
    fmt_ratio,
    fmt_s,
    free_port,
    marked_processes,
    wait_connected,
    wait_observed,
)
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmError, VmmGone, VmmHandle

NAME = "start"
WORKER_ID = "bench-a"
CONCURRENCY = 8  # the worker's default (--concurrency)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def vm_count(run: Run) -> int:
    return 100 if run.quick else 1000


# ---------------------------------------------------------------- bare loop


class _RawHttp:
    """HTTP/1.1 over one unix-socket connection, nothing else: the floor."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def request(self, method: str, endpoint: str, body: bytes = b"") -> tuple[int, bytes]:
        head = (
            f"{method} /api/v1/{endpoint} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {len(body)}\r\n"
        )
        if body:
            head += "Content-Type: application/json\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + body)
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        header, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        while len(rest) < length:
            rest += self._recv()
        self.buffer = rest[length:]
        return status, rest[:length]

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the VMM closed the connection")
        return data


def _connect(path: Path, proc: subprocess.Popen[bytes], deadline: float) -> socket.socket:
    """A connection to the fake VMM's socket once it listens, waited for as
    the worker waits (``process.wait_for_api``: woken by the socket's
    creation or the VMM's exit, no polling loop), so the bare loop's CPU is
    a floor and not the cost of asking every millisecond."""
    ticks = process.pid_start_ticks(proc.pid)
    if ticks is None:
        raise RuntimeError(f"fake VMM for {path} exited at once")

    def probe(timeout: float) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise VmmGone(f"{path}: nobody listens") from exc
        return sock

    handle = VmmHandle("bare", proc.pid, ticks, str(path))
    try:
        return process.wait_for_api(handle, probe, deadline=deadline, who="fake VMM")
    except VmmError as exc:
        raise RuntimeError(f"fake VMM for {path} did not start: {exc.message}") from None


def bare_start(run: Run, n: int, config: dict[str, Any], *, tag: str = "bare") -> float:
    """Start ``n`` fake VMMs with a VM each, ``CONCURRENCY`` at a time, in
    ``run.dir / tag`` (unused before); returns the seconds it took. Every
    VMM is killed before returning. The CPU this process spent on it is
    left in ``run.shared["bare_cpu"]`` (seconds)."""
    root = run.dir / tag
    body = json.dumps(config).encode()
    argv = [sys.executable, "-S", "-I", str(LEAN_VMM)]
    procs: list[subprocess.Popen[bytes]] = []

    def one(index: int) -> None:
        vm_dir = root / f"vm-{index:05d}"
        vm_dir.mkdir(parents=True)
        sock_path = vm_dir / "api.sock"
        proc = subprocess.Popen(
            [*argv, "--api-socket", f"path={sock_path}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        procs.append(proc)
        sock = _connect(sock_path, proc, time.monotonic() + 30)
        try:
            http = _RawHttp(sock)
            for method, endpoint, payload, want in (
                ("GET", "vmm.ping", b"", 200),
                ("PUT", "vm.create", body, 204),
                ("PUT", "vm.boot", b"", 204),
                ("GET", "vm.info", b"", 200),
            ):
                status, answer = http.request(method, endpoint, payload)
                if status != want:
                    raise RuntimeError(f"{endpoint} of {sock_path}: HTTP {status} {answer!r}")
            if json.loads(answer)["state"] != "Running":
                raise RuntimeError(f"{sock_path}: VM not running after vm.boot")
        finally:
            sock.close()

    try:
        started = time.perf_counter()
        cpu = time.process_time()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(n)))
        run.shared["bare_cpu"] = time.process_time() - cpu
        return time.perf_counter() - started
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait()


# ---------------------------------------------------------------- procurator


@dataclass
class OneWorkerFleet:
    """A master and one worker running ``n`` VMs of image ``a``."""

    master: Proc
    port: int
    worker: Proc
    n: int
    images: dict[str, str]
    current: dict[str, str] = field(default_factory=dict)  # vm id -> image name
    start_worker_cpu: float = 0.0  # the worker's CPU seconds while starting the n VMs
    start_helper_cpu: float = 0.0  # its jailer's and reaped children's, meanwhile

    @property
    def vm_ids(self) -> list[str]:
        return sorted(self.current)

    def fleet(self) -> Any:
        return fleet_of(
            {WORKER_ID: [(vm_id, self.images[img]) for vm_id, img in self.current.items()]}
        )


def worker_args(
    run: Run, port: int, *, state: str = "worker-a", extra: Sequence[str] = ()
) -> list[str]:
    """The worker's flags (jailed, as deployed, unless ``extra`` says
    ``--unconfined``)."""
    return [
        "worker",
        "--id",
        WORKER_ID,
        "--master",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(run.dir / state),
        "--driver",
        "cloud-hypervisor",
        "--vmm-binary",
        sys.executable,
        "--vmm-arg=-S",
        "--vmm-arg=-I",
        "--vmm-arg",
        str(LEAN_VMM),
        "--no-network",
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
        "--stop-grace",
        "5",
        "--concurrency",
        str(CONCURRENCY),
        *extra,
    ]


def start_cluster(run: Run) -> tuple[Proc, int, Proc]:
    master, port = run.start_master()
    worker = run.procurator("worker-a", *worker_args(run, port))

    async def ready() -> None:
        async with control(port) as client:
            await wait_connected(client, [WORKER_ID], timeout=60)

    trio.run(ready)
    return master, port, worker


def procurator_start(run: Run, n: int) -> tuple[OneWorkerFleet, float]:
    master, port, worker = start_cluster(run)
    images = {"a": run.image("bench-vm-a"), "b": run.image("bench-vm-b")}
    fleet = OneWorkerFleet(master, port, worker, n, images)
    fleet.current = {f"vm-{i:05d}": "a" for i in range(n)}

    async def apply() -> float:
        async with control(port) as client:
            cpu = cpu_seconds(worker.pid)
            helpers = _helper_cpu(worker.pid)
            started = trio.current_time()
            result = await client.apply(fleet.fleet())
            seen = await wait_observed(
                client,
                result.generation,
                [WORKER_ID],
                timeout=900,
                interval=0.1,
                on_poll=worker.check_alive,
            )
            fleet.start_worker_cpu = cpu_seconds(worker.pid) - cpu
            fleet.start_helper_cpu = _helper_cpu(worker.pid) - helpers
            return seen - started

    return fleet, trio.run(apply)


def _helper_cpu(worker: int) -> float:
    """CPU seconds of the worker's helpers so far: its children that it
    reaped (``nix-store`` runs; the stat's cutime + cstime) and its live
    children that are not VMMs (the jailer, started on the first launch).
    VMMs are orphans, never its children, and a jailed VMM's time between
    the jailer's fork and its exec is the VMM's own."""
    stat = Path(f"/proc/{worker}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    total = (int(fields[13]) + int(fields[14])) / _CLOCK_TICKS
    for tid in os.listdir(f"/proc/{worker}/task"):
        try:
            children = Path(f"/proc/{worker}/task/{tid}/children").read_text().split()
        except OSError:
            continue  # the thread ended meanwhile
        for child in children:
            with contextlib.suppress(OSError):
                total += cpu_seconds(int(child))
    return total


def _vmm_cpu(run: Run) -> tuple[float, int]:
    """(CPU seconds the run's fake VMMs spent so far, how many run)."""
    total, count = 0.0, 0
    for pid in marked_processes(run.mark):
        try:
            line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            if str(LEAN_VMM) in line and "--api-socket" in line and "/bin/sh" not in line:
                total += cpu_seconds(pid)
                count += 1
        except OSError:
            continue  # gone meanwhile
    return total, count


def one_worker_fleet(run: Run) -> OneWorkerFleet:
    """The running N-VM fleet (started here if ``start`` did not run)."""
    fleet = run.shared.get("fleet1k")
    if fleet is None:
        run.log(f"starting a {vm_count(run)}-VM fleet")
        fleet, _ = procurator_start(run, vm_count(run))
        run.shared["fleet1k"] = fleet
    assert isinstance(fleet, OneWorkerFleet)
    return fleet


def fake_config(run: Run) -> dict[str, Any]:
    """What the worker gives the VMM for the bench image (kernel in the
    store, serial to a file), so the bare loop sends a body of that size."""
    image = run.image("bench-vm-a")
    config: dict[str, Any] = json.loads(Path(image, "vm-config.json").read_text())
    config["payload"]["kernel"] = os.path.join(image, "vmlinux")
    config["serial"] = {"mode": "File", "file": str(run.dir / "serial.log")}
    config["console"] = {"mode": "Off"}
    return config


def measure(run: Run) -> list[Row]:
    n = vm_count(run)
    run.log(f"start: bare loop, {n} fake VMMs")
    bare = bare_start(run, n, fake_config(run))
    run.log(f"start: bare loop took {bare:.2f}s; now through procurator")
    fleet, elapsed = procurator_start(run, n)
    run.shared["fleet1k"] = fleet
    run.log(f"start: procurator took {elapsed:.2f}s")
    vmm_cpu, vmms = _vmm_cpu(run)
    worker_ms = fleet.start_worker_cpu / n * 1000
    bare_ms = run.shared["bare_cpu"] / n * 1000
    return [
        Row(
            NAME,
            f"start {n} VMs on 1 worker (apply -> observed)",
            f"{fmt_s(elapsed)} ({n / elapsed:.0f} VM/s)",
            f"{fmt_s(bare)} ({n / bare:.0f} VM/s) bare loop",
            fmt_ratio(elapsed, bare),
            "<= 1.5x",
        ),
        Row(
            NAME,
            "worker CPU per VM start (the worker process's threads, apply -> observed)",
            f"{worker_ms:.2f} ms",
            f"{vmm_cpu / max(vmms, 1) * 1000:.2f} ms a fake VMM's own CPU ({vmms} VMMs)",
            fmt_ratio(fleet.start_worker_cpu / n, vmm_cpu / max(vmms, 1)),
            "<= 5 ms",
        ),
        Row(
            NAME,
            "... its helpers meanwhile, per VM start (the jailer; nix-store runs)",
            f"{fleet.start_helper_cpu / n * 1000:.2f} ms",
            f"{worker_ms:.2f} ms the worker's own",
            fmt_ratio(fleet.start_helper_cpu, fleet.start_worker_cpu),
        ),
        Row(
            NAME,
            "... floor: the bare loop's own CPU per start (spawn + 4 API calls)",
            f"{bare_ms:.2f} ms",
            f"{worker_ms:.2f} ms the worker's own",
            fmt_ratio(fleet.start_worker_cpu / n, run.shared["bare_cpu"] / n),
        ),
    ]
