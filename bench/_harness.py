"""What every benchmark shares: the run context, processes, images, the
master's control client, /proc figures, the result rows.

Cleanup invariant: every process a benchmark starts — master, workers, VMMs
spawned by workers (orphans in their own sessions), VMMs of the bare loops —
inherits ``PROCURATOR_BENCH_RUN=<this run's id>`` in its environment, and
``Run.close`` (always called, also on Ctrl-C and SIGTERM) kills every process
carrying that mark, waits until none is left, deletes the Nix store paths
the run added and removes its temporary directory. Nothing relies on a
process having been recorded by whoever started it.

The fake VMM (``--vmm``): ``tiny`` is ``bench/tiny_vmm.c``, compiled into
the run's directory on first use (~180 KB private and under 1 ms of CPU per
process: 10,000 fit on this machine); ``python`` is ``bench/lean_vmm.py``
(~5 MB private each: 10,000 would need ~50 GB). Both serve the same API
(``tests/vmm/test_tiny_vmm.py`` holds the C one to the OpenAPI walk the
test fake passes). The default is ``tiny`` when a C compiler is there;
without one the run says so and uses ``python``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Sequence
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
    "TINY_VMM_SOURCE",
    "VMM_KINDS",
    "Row",
    "Run",
    "c_compiler",
    "control",
    "cpu_seconds",
    "fake_vmm_pids",
    "fleet_of",
    "free_port",
    "marked_processes",
    "percentile",
    "rss_bytes",
    "run_seconds",
    "wait_observed",
]

REPO = Path(__file__).resolve().parent.parent
LEAN_VMM = REPO / "bench" / "lean_vmm.py"
TINY_VMM_SOURCE = REPO / "bench" / "tiny_vmm.c"
VMM_KINDS = ("tiny", "python")
MARK_ENV = "PROCURATOR_BENCH_RUN"
#: The open-file limit a deployed worker runs with (nix/modules/worker.nix,
#: ``LimitNOFILE``): a worker holds ~4 descriptors per VM (its VMM's API
#: connection, pidfd, flock, event file), so this shell's 20,000 would stop
#: it short of 10,000 VMs.
DEPLOYED_OPEN_FILES = 1048576
_NIX_CONF = "build-users-group =\nsubstituters =\nflake-registry =\n"
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rmdir_cgroup(path: str, *, wait: float = 10.0) -> None:
    """Remove one empty cgroup; a killed VMM that has not finished exiting
    keeps it busy (EBUSY) for a moment, so wait for it (bounded) instead of
    leaving the cgroup behind: every leftover cgroup makes each later cpu
    quota write on the host walk it (docs/BENCHMARKS.md, target 2)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                print(f"bench: cannot remove cgroup {path}: {exc}", file=sys.stderr)
                return
            time.sleep(0.05)
        else:
            return


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


def run_seconds(pid: int) -> float:
    """CPU seconds ``pid``'s main thread ran, to the nanosecond
    (``/proc/<pid>/schedstat``): for single-threaded processes whose whole
    life is below the 10 ms tick ``cpu_seconds`` counts in (a tiny VMM's
    start is well under 1 ms)."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9


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


def c_compiler() -> str | None:
    """The C compiler that builds ``bench/tiny_vmm.c`` (``cc``, else
    ``gcc``), or None."""
    return shutil.which("cc") or shutil.which("gcc")


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
    metrics_port: int = 0  # its Prometheus exporter's (0: none)

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
    vmm: str = "tiny"  # the fake VMM: one of VMM_KINDS (module docstring)
    mark: str = field(default_factory=lambda: uuid.uuid4().hex)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="procurator-bench-")))
    procs: list[Proc] = field(default_factory=list)
    store_paths: list[str] = field(default_factory=list)
    shared: dict[str, Any] = field(default_factory=dict)  # fixtures reused by benchmarks
    #: ``--daemon-logs DIR``: masters and workers log at DEBUG as JSON (the
    #: trace points along a change), and their logs are copied to DIR at the
    #: end; None: they log as ever (the master at WARNING) and go with the run.
    daemon_logs: Path | None = None
    _images: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.vmm not in VMM_KINDS:
            raise ValueError(f"--vmm {self.vmm!r}: one of {', '.join(VMM_KINDS)}")
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

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        open_files: int | None = None,
    ) -> Proc:
        """Start a process in its own session (a Ctrl-C in the terminal
        reaches only the benchmark, which then stops everything in order),
        with ``open_files`` as its open-file limit (soft and hard) if given."""

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
        if open_files is not None:  # set from here: no preexec_fn in a threaded parent
            try:
                resource.prlimit(popen.pid, resource.RLIMIT_NOFILE, (open_files, open_files))
            except PermissionError:  # no CAP_SYS_RESOURCE (a container): keep ours
                limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                self.log(f"{name}: cannot raise its open-file limit to {open_files}: {limit}")
        return proc

    def procurator(self, name: str, *args: str, open_files: int | None = None) -> Proc:
        return self.spawn(name, [sys.executable, "-m", "procurator", *args], open_files=open_files)

    def daemon_log_args(self, level: str | None = None) -> list[str]:
        """A daemon's logging flags: DEBUG as JSON with ``--daemon-logs``,
        else ``level`` (None: the daemon's default)."""
        if self.daemon_logs is not None:
            return ["--log-level", "debug", "--log-format", "json"]
        return ["--log-level", level] if level is not None else []

    def start_master(self, *, metrics: bool = False) -> tuple[Proc, int]:
        port = free_port()
        metrics_port = free_port() if metrics else 0
        proc = self.procurator(
            "master",
            "master",
            "--listen",
            f"127.0.0.1:{port}",
            "--db",
            str(self.dir / f"master-{port}.db"),
            "--metrics-listen",
            f"127.0.0.1:{metrics_port}" if metrics else "",
            *self.daemon_log_args("warning"),
        )
        proc.metrics_port = metrics_port
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
                        _rmdir_cgroup(inner)
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
        if self.daemon_logs is not None:
            self.daemon_logs.mkdir(parents=True, exist_ok=True)
            for log in self.dir.glob("*.log"):
                shutil.copy2(log, self.daemon_logs / log.name)
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- the fake VMM ---------------------------------------------------------------

    def vmm_argv(self) -> list[str]:
        """The fake VMM's command line before its flags (``--api-socket``
        ...): the tiny VMM's binary (built on first use), or the lean
        Python one as ``python -S -I bench/lean_vmm.py``."""
        if self.vmm == "python":
            return [sys.executable, "-S", "-I", str(LEAN_VMM)]
        return [str(self.tiny_vmm())]

    def tiny_vmm(self) -> Path:
        """``bench/tiny_vmm.c`` compiled into the run's directory (once)."""
        binary = self.dir / "tiny_vmm"
        if binary.exists():
            return binary
        compiler = c_compiler()
        if compiler is None:
            raise RuntimeError(
                "--vmm tiny needs a C compiler for bench/tiny_vmm.c (apt-get install gcc); "
                "--vmm python runs bench/lean_vmm.py instead (~5 MB each: not 10,000 VMs)"
            )
        built = subprocess.run(
            [compiler, "-O2", "-o", str(binary), str(TINY_VMM_SOURCE)],
            check=False,
            capture_output=True,
            text=True,
        )
        if built.returncode != 0:
            raise RuntimeError(f"{compiler} could not build {TINY_VMM_SOURCE}:\n{built.stderr}")
        return binary

    # -- images -----------------------------------------------------------------

    def image(self, name: str) -> str:
        """A store path (``nix-store --add``) holding a VM image for the fake
        VMM: vm-config.json and a dummy kernel. One per name per run, and
        the run's own: the kernel command line names the run, so two runs
        at once (engineers share this machine) never add the same path,
        which the first to end would delete under the other."""
        if name in self._images:
            return self._images[name]
        src = self.dir / "images" / name
        src.mkdir(parents=True)
        (src / "vmlinux").write_bytes(b"\0" * 4096)
        config = {
            "payload": {
                "kernel": "vmlinux",
                "cmdline": f"console=ttyS0 image={name} bench-run={self.mark}",
            },
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


def fake_vmm_pids(run: Run, *, exclude: Collection[int] = ()) -> list[int]:
    """Pids of the run's live fake VMMs (either kind; jailed or not), but
    those in ``exclude``."""
    names = (str(LEAN_VMM).encode(), str(run.dir / "tiny_vmm").encode())
    found = []
    for pid in marked_processes(run.mark):
        if pid in exclude:
            continue
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        # The VMM itself, not a shell that launches it (``--unconfined``).
        if argv[0] != b"/bin/sh" and b"--api-socket" in argv and any(n in argv[:4] for n in names):
            found.append(pid)
    return found


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


async def wait_worker_observed(
    client: ControlClient,
    vm_id: str,
    generation: int,
    *,
    timeout: float,
    spacing: float = 0.05,
    on_poll: Callable[[], None] | None = None,
) -> float:
    """``wait_observed`` for the one worker ``vm_id`` is assigned to, read
    from ``describe`` of that VM (the worker's desired and observed
    generations come with it): a read costs the master one VM, not the
    fleet. (Reading the whole fleet's status every 0.1 s took ~13 % of the
    master's Python during a 1,000-VM start, on the cores the start runs
    on: docs/BENCHMARKS.md.) Blocking reads, each passing the change index
    of the answer before, so a read answers as soon as something changed;
    at most one every ``spacing`` seconds, since during a start the index
    moves with every report (back to back, they were one read per VM
    started), so the clock may stop up to ``spacing`` late (the old poll:
    up to 0.1 s). As in ``wait_observed``, a worker the apply did not
    change keeps its older desired generation. ``trio.current_time()`` of
    the answer that showed it."""
    index = 0
    with trio.fail_after(timeout):
        while True:
            asked = trio.current_time()
            desc = await client.describe_vm(vm_id, event_limit=0, wait_index=index, wait=10)
            now = trio.current_time()
            if (
                desc.fleet_generation >= generation
                and desc.observed_generation >= desc.desired_generation
            ):
                return now
            index = desc.change_index
            if on_poll is not None:
                on_poll()
            await trio.sleep_until(asked + spacing)


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
