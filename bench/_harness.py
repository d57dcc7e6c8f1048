"""What every benchmark shares: the run context, processes, images, the
master's control client, /proc figures, the result rows.

Cleanup invariant: every process a benchmark starts — master, workers, VMMs
spawned by workers (orphans in their own sessions), VMMs of the bare loops —
inherits ``PROCURATOR_BENCH_RUN=<this run's id>`` in its environment, and
``Run.close`` (always called, also on Ctrl-C and SIGTERM) kills every process
carrying that mark, waits until none is left, deletes the Nix store paths
the run added and removes its temporary directory. Nothing relies on a
process having been recorded by whoever started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from procurator.core.control import FleetStatus
from procurator.core.errors import ProcuratorError
from procurator.core.models import Fleet, VmAssignment
from procurator.core.validation import store_path_hash
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient, open_control

__all__ = [
    "LEAN_VMM",
    "MARK_ENV",
    "REPO",
    "Row",
    "Run",
    "control",
    "cpu_seconds",
    "fleet_of",
    "free_port",
    "marked_processes",
    "percentile",
    "rss_bytes",
    "wait_observed",
]

REPO = Path(__file__).resolve().parent.parent
LEAN_VMM = REPO / "bench" / "lean_vmm.py"
MARK_ENV = "PROCURATOR_BENCH_RUN"
_NIX_CONF = "build-users-group =\nsubstituters =\nflake-registry =\n"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Row:
    """One line of the table. ``value`` and ``baseline`` are measured in
    the same run; ``ratio`` is value / baseline when both are times."""

    bench: str
    metric: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    note: str = ""


def fmt_s(seconds: float) -> str:
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 0.001:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x" if baseline > 0 else "n/a"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- /proc


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE


def thread_count(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def marked_processes(mark: str) -> list[int]:
    """Pids of live processes (not zombies, not this one) carrying ``mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------- the run


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")


@dataclass
class Run:
    """One ``python -m bench`` invocation. Use as a context manager."""

    quick: bool = False
    verbose: bool = False
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="procurator-bench-")))
    procs: list[Proc] = field(default_factory=list)
    store_paths: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # fixtures reused by benchmarks
    _images: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        os.environ[MARK_ENV] = self.mark  # inherited by everything started from here on
        # Every worker of the run puts its VMs' cgroups under this parent
        # (the default of --cgroup-parent), so the run can remove them all.
        self.cgroup_parent = f"procurator-bench-{self.mark[:12]}"
        os.environ["PROCURATOR_CGROUP_PARENT"] = self.cgroup_parent
        conf = self.dir / "nix-conf"
        conf.mkdir()
        (conf / "nix.conf").write_text(_NIX_CONF)
        self.nix_env = {**os.environ, "NIX_CONF_DIR": str(conf)}

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    # -- processes ------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], *, env: dict[str, str] | None = None) -> Proc:
        """Start a process in its own session (a Ctrl-C in the terminal
        reaches only the benchmark, which then stops everything in order)."""
        log = self.dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env if env is not None else self.nix_env,
                start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def procurator(self, name: str, *args: str) -> Proc:
        return self.spawn(name, [sys.executable, "-m", "procurator", *args])

    def start_master(self, *, metrics: bool = False) -> tuple[Proc, int]:
        port = free_port()
        proc = self.procurator(
            "master",
            "master",
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            str(self.dir / f"master-{port}.db"),
            "--metrics-listen",
            f"127.0.0.1:{free_port()}" if metrics else "",
            "--log-level",
            "warning",
        )
        return proc, port

    def stop(self, *procs: Proc, timeout: float = 30.0) -> None:
        """SIGTERM all of ``procs`` at once, then wait (SIGKILL after
        ``timeout`` seconds in all)."""
        for proc in procs:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in procs:
            try:
                proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
            with contextlib.suppress(ValueError):
                self.procs.remove(proc)

    def kill_marked(self, *, keep: Callable[[int], bool] = lambda pid: False) -> int:
        """SIGKILL every process of this run (but those ``keep`` spares) and
        wait until they are gone; returns how many there were."""
        total = 0
        deadline = time.monotonic() + 30
        while True:
            pids = [p for p in marked_processes(self.mark) if not keep(p)]
            if not pids:
                break
            total += len(pids)
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for proc in self.procs:  # reap our own children
                proc.popen.poll()
            if time.monotonic() > deadline:
                raise RuntimeError(f"processes of this run survive SIGKILL: {pids}")
            time.sleep(0.05)
        return total

    def remove_cgroups(self) -> None:
        """Remove the cgroups the run's workers left (their VMMs are gone:
        call after ``kill_marked``), deepest first, in every hierarchy."""
        points = [
            Path(fields[4])
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
            if "-" in (fields := line.split())
            and fields[fields.index("-") + 1] in ("cgroup", "cgroup2")
        ]
        for point in points:
            for root, dirs, _ in os.walk(point):
                if Path(root).name == self.cgroup_parent:
                    for inner, _, _ in sorted(os.walk(root), key=lambda w: -len(w[0])):
                        with contextlib.suppress(OSError):
                            os.rmdir(inner)
                    dirs.clear()
                elif len(Path(root).relative_to(point).parts) >= 4:
                    dirs.clear()

    def close(self) -> None:
        """Kill everything of this run, delete its cgroups, store paths and
        files."""
        for proc in list(self.procs):
            if proc.popen.poll() is None:
                proc.popen.kill()
        self.kill_marked()
        for proc in self.procs:
            proc.popen.wait()
        self.procs.clear()
        self.remove_cgroups()
        # The worker's GC roots live under self.dir, each with an entry in
        # Nix's gcroots/auto that keeps the image alive (and would dangle
        # after the rmtree): drop those first, so the store paths can go.
        auto = Path("/nix/var/nix/gcroots/auto")
        prefix = f"{self.dir}/"
        for entry in auto.iterdir() if auto.is_dir() else ():
            with contextlib.suppress(OSError):
                if os.readlink(entry).startswith(prefix):
                    entry.unlink()
        for path in self.store_paths:
            subprocess.run(
                ["nix-store", "--delete", path],
                env=self.nix_env,
                check=False,
                capture_output=True,
            )
        self.store_paths.clear()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- images -----------------------------------------------------------------

    def image(self, name: str) -> str:
        """A store path (``nix-store --add``) holding a VM image for the fake
        VMM: vm-config.json and a dummy kernel. One per name per run."""
        if name in self._images:
            return self._images[name]
        src = self.dir / "images" / name
        src.mkdir(parents=True)
        (src / "vmlinux").write_bytes(b"\0" * 4096)
        config = {
            "payload": {"kernel": "vmlinux", "cmdline": f"console=ttyS0 image={name}"},
            "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
            "memory": {"size": 64 << 20},
        }
        (src / "vm-config.json").write_text(json.dumps(config))
        out = subprocess.run(
            ["nix-store", "--add", str(src)],
            env=self.nix_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        self.store_paths.append(out)
        self._images[name] = out
        return out


def fleet_of(workers: dict[str, Sequence[tuple[str, str]]]) -> Fleet:
    """A fleet from ``{worker id: [(vm id, store path), ...]}`` (default
    hashes, as a fleet file without ``hash`` gets them)."""
    return Fleet(
        tuple(
            (
                worker_id,
                tuple(
                    VmAssignment(vm_id, store_path_hash(path), path) for vm_id, path in sorted(vms)
                ),
            )
            for worker_id, vms in sorted(workers.items())
        )
    )


@contextlib.asynccontextmanager
async def control(port: int, *, timeout: float = 30.0) -> AsyncIterator[ControlClient]:
    """The master's control client, once the master answers."""
    async with open_bridge() as bridge:
        deadline = trio.current_time() + timeout
        while True:  # the master may still be starting
            try:
                async with open_control(bridge, f"127.0.0.1:{port}") as probe:
                    await probe.status()
                break
            except ProcuratorError:
                if trio.current_time() > deadline:
                    raise
            await trio.sleep(0.1)
        async with open_control(bridge, f"127.0.0.1:{port}") as client:
            yield client


async def wait_observed(
    client: ControlClient,
    generation: int,
    worker_ids: Sequence[str],
    *,
    timeout: float,
    interval: float = 0.1,
    check: Callable[[FleetStatus], bool] | None = None,
    on_poll: Callable[[], None] | None = None,
) -> float:
    """Poll until every worker in ``worker_ids`` has observed its desired
    generation, the fleet being at ``generation`` or newer (and ``check``
    holds); returns ``trio.current_time()`` of the status that showed it.
    A worker the apply did not change keeps its older desired generation."""
    wanted = set(worker_ids)
    with trio.fail_after(timeout):
        while True:
            status = await client.status()
            now = trio.current_time()
            done = {
                w.worker_id
                for w in status.workers
                if w.worker_id in wanted
                and w.status is not None
                and status.generation >= generation
                and w.status.observed_generation >= w.desired_generation
            }
            if done == wanted and (check is None or check(status)):
                return now
            if on_poll is not None:
                on_poll()
            await trio.sleep(interval)


async def wait_connected(client: ControlClient, worker_ids: Sequence[str], timeout: float) -> None:
    wanted = set(worker_ids)
    with trio.fail_after(timeout):
        while True:
            status = await client.status()
            if wanted <= {w.worker_id for w in status.workers if w.connected}:
                return
            await trio.sleep(0.2)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t: ...``; then ``t[0]`` is the elapsed seconds."""
    out: list[float] = []
    started = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - started)
