"""1. Start throughput: N VMs on one worker through ``apply``, against a bare
loop doing the same VMM spawns and API calls directly, in the same run,
twice: bare, and jailed with the worker's own jail primitives (the product
jails every VMM since issue 29, so the ratio of target 5 is taken against
the jailed loop: like with like).

The procurator side is the product as deployed: real ``procurator master``
and ``procurator worker`` processes (``--no-network``, cloud-hypervisor
driver pointed at the lean fake VMM), a real image added to the Nix store,
one ``Control.apply`` of N VMs; the clock stops when the master shows the
worker's ``observedGeneration`` at the applied generation (blocking
``describe`` reads of one VM, which carry the worker's generations:
``wait_worker_observed``; every VM running is checked after). The bare
loop, at the worker's concurrency (8 threads): spawn
the same fake VMM, wait for its socket, ``vmm.ping``, ``vm.create``,
``vm.boot``, ``vm.info`` over one raw HTTP/1.1 connection; jailed, each
VMM first goes through ``Jail.prepare`` and ``VmJail.spawn``
(``bare_start``). Ratio = procurator / jailed bare loop (and, for the
record, / the bare loop). The fake VMM is the run's (``--vmm``).

And what a start costs the worker itself (issue 31): the worker process's
CPU (its threads, not its children) from sending the apply until observed,
per VM, next to the CPU the fake VMMs spent in their whole lives (their
own start cost). So that the worker's figure cannot look small by moving
work elsewhere, two more figures stand beside it: what its helpers spent
over the same span (the jailer, whose forks become the VMMs and are
counted with them, and the children it reaped: ``nix-store`` runs), and a
floor, the bare loop's own CPU per start (a Python process that only
spawns the VMM and makes the four API calls: no image, no jail, no state).
And the floor the worker's figure is held to (issue 31 target 2): the
*design floor*, the jailed loop plus what the design asks of a VMM's
supervisor beyond it (the VMM's pidfd, the VM's record written with
fsync), its CPU split by part; what spawning costs the parent with
``subprocess.Popen`` and with ``os.posix_spawn``; the kernel's share of
the worker's CPU, the host's cpu cgroups (each VM's quota write walks them
all), one new file's CPU in the run's directory and one new entry's in
Nix's ``gcroots/auto`` (each VM's GC root makes one; ext4 without a
journal, as here, makes both depend on what the host deleted nearby):
the host's part of the figure, said in the same run. And every process's
CPU per start (master, worker, helpers, VMMs) against the jailed loop's,
with the worker's status and events reports the master served meanwhile,
by wire method (its exporter's ``procurator_master_rpc_calls_total``).

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
import threading
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from bench._harness import (
    DEPLOYED_OPEN_FILES,
    Proc,
    Row,
    Run,
    control,
    cpu_seconds,
    fake_vmm_pids,
    fleet_of,
    fmt_ratio,
    fmt_s,
    free_port,
    run_seconds,
    wait_connected,
    wait_worker_observed,
)
from procurator.core.jail import JailPolicy
from procurator.core.models import Phase
from procurator.core.vmdef import VmDefinition
from procurator.worker import cgroups
from procurator.worker.jail import Jail, instance_name
from procurator.worker.state import StateDir, write_json_atomic
from procurator.worker.vmm import closure, process
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


def _connect(path: Path, pid: int, ticks: int | None, deadline: float) -> socket.socket:
    """A connection to the fake VMM's socket once it listens, waited for as
    the worker waits (``process.wait_for_api``: woken by the socket's
    creation or the VMM's exit, no polling loop), so the bare loop's CPU is
    a floor and not the cost of asking every millisecond."""
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

    handle = VmmHandle("bare", pid, ticks, str(path))
    try:
        return process.wait_for_api(handle, probe, deadline=deadline, who="fake VMM")
    except VmmError as exc:
        raise RuntimeError(f"fake VMM for {path} did not start: {exc.message}") from None


def _boot(sock: socket.socket, body: bytes, where: Path) -> None:
    """ping, create, boot, info over one raw HTTP/1.1 connection."""
    http = _RawHttp(sock)
    for method, endpoint, payload, want in (
        ("GET", "vmm.ping", b"", 200),
        ("PUT", "vm.create", body, 204),
        ("PUT", "vm.boot", b"", 204),
        ("GET", "vm.info", b"", 200),
    ):
        status, answer = http.request(method, endpoint, payload)
        if status != want:
            raise RuntimeError(f"{endpoint} of {where}: HTTP {status} {answer!r}")
    if json.loads(answer)["state"] != "Running":
        raise RuntimeError(f"{where}: VM not running after vm.boot")


def bare_jail(run: Run, state_dir: Path) -> Jail:
    """A worker's jail without the worker, on ``state_dir``: VM cgroups
    under the run's parent (removed with the run), the default policy."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return Jail(
        JailPolicy(cgroup_parent=run.cgroup_parent),
        state_dir,
        cgroups=cgroups.detect(run.cgroup_parent, instance_name(state_dir)),
    )


def bare_start(
    run: Run,
    n: int,
    config: dict[str, Any],
    *,
    tag: str = "bare",
    jailed: bool = False,
    jail: Jail | None = None,
    design: bool = False,
) -> float:
    """Start ``n`` fake VMMs with a VM each, ``CONCURRENCY`` at a time, in
    ``run.dir / tag`` (unused before); returns the seconds it took. Every
    VMM is killed before returning. The CPU this process spent on it is
    left in ``run.shared["bare_cpu"]`` (seconds).

    ``jailed``: each VMM confined as the worker confines it, with the same
    primitives (``procurator.worker.jail``) and nothing else of the worker:
    ``Jail.prepare`` (the VM's uid slot, a fresh cgroup with its limits, its
    run directory given to that uid) and ``VmJail.spawn`` (the jailer's
    fork, namespaces, ``pivot_root`` into a root showing the VMM's runtime
    files, the VM's store paths and its run directory, the uid, the seccomp
    filter, ``/dev/kvm`` as the cloud-hypervisor driver asks). The VM's
    serial file is then in its run directory (a jail shows no other
    writable path). The CPU of the jailer is left in
    ``run.shared["bare_jailer_cpu"]``. ``jail``: one made by ``bare_jail``
    and kept by the caller (its jailer already started, so that a start
    of one VM is not charged the jailer's own start); else the loop makes
    its own and closes it.

    ``design`` (with ``jailed``): also what the design asks of the process
    that supervises a VMM and the jailed loop leaves out, the least of it:
    the VMM's pidfd opened (its exit watch) and the VM's record written
    durably (``write_json_atomic``, fsync of the file and its directory:
    the worker's ``vm.json``). The floor of the worker's own CPU per start
    (issue 31 target 2), in Python, with the worker's own primitives."""
    root = run.dir / tag
    argv = run.vmm_argv()
    procs: list[subprocess.Popen[bytes]] = []
    jailed_vmms: list[tuple[str, int, int]] = []  # (vm id, pid, start ticks)
    pidfds: list[int] = []
    own_jail = jail is None and jailed
    if own_jail:
        jail = bare_jail(run, root)
    runtime = closure.runtime_files(argv[0], argv[1:]) if jail is not None else ()

    parts: dict[str, float] = {}
    parts_lock = threading.Lock()

    def took(part: str, since: float) -> float:
        """Add the calling thread's CPU since ``since`` to ``part``."""
        now = time.thread_time()
        with parts_lock:
            parts[part] = parts.get(part, 0.0) + now - since
        return now

    def one(index: int) -> None:
        vm_id = f"vm-{index:05d}"
        mark = time.thread_time()
        if jail is None:
            vm_dir = root / vm_id
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
            pid, ticks, body = proc.pid, process.pid_start_ticks(proc.pid), json.dumps(config)
            mark = took("spawn", mark)
        else:
            paths = StateDir(root).paths(vm_id)
            paths.vmm_dir.mkdir(parents=True)
            vm_config = {**config, "serial": {"mode": "File", "file": str(paths.serial_file)}}
            vm_jail = jail.prepare(vm_id, VmDefinition.from_vm_config(vm_config), paths)
            mark = took("jail", mark)
            sock_path = paths.api_socket
            pid, ticks = vm_jail.spawn(
                [*argv, "--api-socket", f"path={sock_path}"],
                log_path=paths.vmm_dir / "vmm.stdout",
                env=None,
                cwd=paths.vmm_dir,
                runtime=runtime,
                devices=("/dev/kvm",),
            )
            jailed_vmms.append((vm_id, pid, ticks))
            body = json.dumps(vm_config)
            mark = took("spawn", mark)
            if design:
                pidfds.append(os.pidfd_open(pid))
                mark = took("pidfd", mark)
                write_json_atomic(paths.vm_dir / "vm.json", vm_config)
                mark = took("record", mark)
        sock = _connect(sock_path, pid, ticks, time.monotonic() + 30)
        mark = took("wait", mark)
        try:
            _boot(sock, body.encode(), sock_path)
        finally:
            sock.close()
        took("api", mark)

    try:
        jailer_cpu = 0.0
        if jail is not None and jail.jailer.pid is not None:
            jailer_cpu = run_seconds(jail.jailer.pid)
        started = time.perf_counter()
        cpu = time.process_time()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(one, range(n)))
        run.shared["bare_cpu"] = time.process_time() - cpu
        run.shared["bare_parts"] = parts
        if jail is not None and jail.jailer.pid is not None:
            # The jailer's CPU in ns (its forks' time before their exec is
            # the VMMs'): a few ms per 100 starts is below the 10 ms tick.
            run.shared["bare_jailer_cpu"] = run_seconds(jail.jailer.pid) - jailer_cpu
        return time.perf_counter() - started
    finally:
        for fd in pidfds:
            os.close(fd)
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
        for proc in procs:
            proc.wait()
        for _, pid, ticks in jailed_vmms:
            if process.pid_start_ticks(pid) == ticks:  # not a reused pid
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if jail is not None:
            for vm_id, pid, ticks in jailed_vmms:
                # The jailer reaps them; a cgroup goes once its VMM is gone.
                if process.wait_exit(pid, ticks, 30.0):
                    jail.release(vm_id)
            if own_jail:
                jail.close()


def spawn_cost(run: Run, n: int) -> dict[str, float]:
    """CPU seconds of this process per VMM spawn, by way of spawning: the
    bare loop's ``subprocess.Popen`` (which vforks; its Python side builds
    pipes, reads the child's exec status and keeps a Popen object) against
    ``os.posix_spawn`` (glibc's clone(CLONE_VM|CLONE_VFORK) and exec, no
    Python around it). ``n`` unjailed fake VMMs each, one at a time; each
    is killed and reaped afterwards, outside the measured span."""
    argv = run.vmm_argv()
    root = run.dir / "spawn"
    root.mkdir()
    devnull = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    costs: dict[str, float] = {}
    for how in ("Popen", "posix_spawn"):
        pids: list[int] = []
        procs: list[subprocess.Popen[bytes]] = []
        try:
            cpu = time.process_time()
            for index in range(n):
                args = [*argv, "--api-socket", f"path={root / f'{how}-{index}.sock'}"]
                if how == "Popen":
                    proc = subprocess.Popen(
                        args,
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                    procs.append(proc)
                else:
                    pids.append(
                        os.posix_spawn(args[0], args, os.environ, file_actions=devnull, setsid=True)
                    )
            costs[how] = (time.process_time() - cpu) / n
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
    return costs


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
    start_worker_system: float = 0.0  # the kernel's share of start_worker_cpu
    start_master_cpu: float = 0.0  # the master's CPU seconds meanwhile
    # The worker's report calls the master served meanwhile, by wire method.
    start_report_calls: dict[str, float] = field(default_factory=dict)

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
    ``--unconfined``), running the run's fake VMM (``--vmm``)."""
    vmm = run.vmm_argv()
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
        vmm[0],
        *(f"--vmm-arg={arg}" for arg in vmm[1:]),
        "--no-network",
        "--metrics-listen",
        f"127.0.0.1:{free_port()}",
        "--stop-grace",
        "5",
        "--concurrency",
        str(CONCURRENCY),
        *run.daemon_log_args(),
        *extra,
    ]


def start_cluster(run: Run) -> tuple[Proc, int, Proc]:
    master, port = run.start_master(metrics=True)
    worker = run.procurator("worker-a", *worker_args(run, port), open_files=DEPLOYED_OPEN_FILES)

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
            calls = await trio.to_thread.run_sync(_report_calls, master.metrics_port)
            cpu = cpu_seconds(worker.pid)
            system = _system_seconds(worker.pid)
            helpers = _helper_cpu(worker.pid)
            master_cpu = cpu_seconds(master.pid)
            started = trio.current_time()
            result = await client.apply(fleet.fleet())
            seen = await wait_worker_observed(
                client, fleet.vm_ids[0], result.generation, timeout=900, on_poll=worker.check_alive
            )
            fleet.start_worker_cpu = cpu_seconds(worker.pid) - cpu
            fleet.start_worker_system = _system_seconds(worker.pid) - system
            fleet.start_helper_cpu = _helper_cpu(worker.pid) - helpers
            fleet.start_master_cpu = cpu_seconds(master.pid) - master_cpu
            after = await trio.to_thread.run_sync(_report_calls, master.metrics_port)
            fleet.start_report_calls = {m: after[m] - calls.get(m, 0.0) for m in after}
            # Outside the clock: the worker's observed generation counts a
            # VM that failed to start as done, the figure must not.
            running = sum(
                vm.phase is Phase.RUNNING
                for w in (await client.status()).workers
                if w.status is not None
                for vm in w.status.vms
            )
            if running != n:
                raise RuntimeError(f"the start ended with {running} of {n} VMs running")
            return seen - started

    return fleet, trio.run(apply)


_REPORTS = ("reportStatus", "reportStatusChanges", "reportEvents", "reportStatusAndEvents")


def _report_calls(port: int) -> dict[str, float]:
    """The master's ``procurator_master_rpc_calls_total`` of the worker's
    status and events reports, by method, from its exporter."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    calls: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "procurator_master_rpc_calls_total":
                method = sample.labels.get("method", "")
                if method in _REPORTS:
                    calls[method] = sample.value
    return calls


def _system_seconds(pid: int) -> float:
    """System (kernel) CPU seconds of ``pid``'s threads (the stat's stime)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / _CLOCK_TICKS


def _new_file_cost(directory: Path, n: int = 100) -> float:
    """CPU seconds to create one empty file in ``directory`` (a fresh
    subdirectory of it, removed after): what each new inode of a start
    (a record's temporary file, a directory, a GC root link) costs on this
    filesystem. ext4 without a journal, as here, skips inodes deleted in
    the last minutes when it allocates one, so the figure grows with how
    many files the host recently deleted near ``directory``."""
    where = directory / "new-files"
    where.mkdir()
    try:
        cpu = time.thread_time()
        for index in range(n):
            os.close(os.open(where / str(index), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        return (time.thread_time() - cpu) / n
    finally:
        for index in range(n):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where / str(index))
        where.rmdir()


def _new_root_record_cost(n: int = 100) -> float:
    """CPU seconds to make one entry in Nix's ``gcroots/auto`` (a symlink
    to nowhere, removed at once; the collector drops such entries anyway):
    what the record of each VM's GC root costs on this host. That
    directory lies outside the run's, in ``/nix/var``, where every test and
    benchmark that roots a path adds and deletes entries, so on this
    journal-less ext4 it is dearer than a new file of the run's."""
    auto = Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
    names = [auto / f"procurator-bench-probe-{os.getpid()}-{index}" for index in range(n)]
    # A host whose store never rooted a path has none yet (Nix makes it
    # with the first root, as the worker's first start would).
    auto.mkdir(parents=True, exist_ok=True)
    try:
        cpu = time.thread_time()
        for name in names:
            os.symlink("/nonexistent", name)
        return (time.thread_time() - cpu) / n
    finally:
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)


def _cpu_cgroups() -> int:
    """How many cgroups the host's v1 cpu hierarchy holds: each write of a
    cpu quota walks them all (``tg_set_bandwidth``), so a VM's start costs
    more on a host that holds more (leftovers included)."""
    root = Path("/sys/fs/cgroup/cpu")
    if not (root / "cpu.cfs_quota_us").exists():
        return 0
    return sum(1 for _ in os.walk(root))


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
    """(CPU seconds the run's fake VMMs spent so far, how many run). Both
    fakes are single-threaded: their main thread's run time, in ns."""
    total, count = 0.0, 0
    for pid in fake_vmm_pids(run):
        try:
            total += run_seconds(pid)
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
    run.log(f"start: bare loop, {n} fake VMMs ({run.vmm})")
    bare = bare_start(run, n, fake_config(run))
    bare_cpu = run.shared["bare_cpu"]
    run.log(f"start: bare loop took {bare:.2f}s; now jailed")
    jailed = bare_start(run, n, fake_config(run), tag="bare-jailed", jailed=True)
    jailed_cpu = run.shared["bare_cpu"] + run.shared.get("bare_jailer_cpu", 0.0)
    run.log(f"start: jailed bare loop took {jailed:.2f}s; now the design floor")
    bare_start(run, n, fake_config(run), tag="bare-design", jailed=True, design=True)
    design_cpu = run.shared["bare_cpu"]
    design_jailer_cpu = run.shared.get("bare_jailer_cpu", 0.0)
    design_parts = ", ".join(
        f"{part} {seconds / n * 1000:.2f}" for part, seconds in run.shared["bare_parts"].items()
    )
    spawn = spawn_cost(run, min(n, 100))
    cgroups_on_host = _cpu_cgroups()
    new_file = _new_file_cost(run.dir)
    root_record = _new_root_record_cost()
    run.log("start: floors measured; now through procurator")
    fleet, elapsed = procurator_start(run, n)
    run.shared["fleet1k"] = fleet
    run.log(f"start: procurator took {elapsed:.2f}s")
    vmm_cpu, vmms = _vmm_cpu(run)
    worker_ms = fleet.start_worker_cpu / n * 1000
    system_ms = fleet.start_worker_system / n * 1000
    bare_ms = bare_cpu / n * 1000
    design_ms = design_cpu / n * 1000
    master_ms = fleet.start_master_cpu / n * 1000
    helper_ms = fleet.start_helper_cpu / n * 1000
    vmm_ms = vmm_cpu / max(vmms, 1) * 1000
    product_ms = master_ms + worker_ms + helper_ms + vmm_ms
    jailed_ms = jailed_cpu / n * 1000 + vmm_ms
    cores = os.cpu_count() or 1
    calls = fleet.start_report_calls
    report_calls = (
        f"{sum(calls.values()) / n:.2f} a VM ("
        + ", ".join(f"{method} {count:.0f}" for method, count in calls.items() if count)
        + ")"
    )
    product_busy = product_ms * n / 1000 / (elapsed * cores)
    jailed_busy = jailed_ms * n / 1000 / (jailed * cores)
    return [
        Row(
            NAME,
            f"start {n} VMs on 1 worker (apply -> observed)",
            f"{fmt_s(elapsed)} ({n / elapsed:.0f} VM/s)",
            f"{fmt_s(jailed)} ({n / jailed:.0f} VM/s) jailed bare loop",
            fmt_ratio(elapsed, jailed),
            "<= 1.5x",
            note=(
                f"fake VMM: {run.vmm}; the jailed bare loop confines each VMM with the worker's "
                "jail primitives (Jail.prepare + VmJail.spawn) and nothing else of the worker; "
                f"its CPU per start {jailed_cpu / n * 1000:.2f} ms (this process and the jailer)"
            ),
        ),
        Row(
            NAME,
            "... CPU per VM start, every process (master, worker, helpers, VMM)",
            f"{product_ms:.2f} ms",
            f"{jailed_ms:.2f} ms the jailed bare loop's (with its jailer and VMM)",
            fmt_ratio(product_ms, jailed_ms),
            "",
            note=(
                f"the start's CPU, per VM: master {master_ms:.2f} ms (with its answers to "
                f"this bench's describe reads), worker {worker_ms:.2f}, its helpers "
                f"{helper_ms:.2f}, a VMM {vmm_ms:.2f} (procurator's VMMs over their lives, "
                f"counted on both sides); the jailed bare loop {jailed_ms - vmm_ms:.2f}. The "
                f"host's {cores} cores were busy {product_busy:.0%} of the procurator start, "
                f"{jailed_busy:.0%} of the jailed loop's: where both are near 100 %, this "
                "ratio is about the least the wall clock's can be (issue 31, target 5); "
                "the worker's status and events reports the master served until then: "
                f"{report_calls}"
            ),
        ),
        Row(
            NAME,
            "... against the bare loop without a jail",
            f"{fmt_s(elapsed)}",
            f"{fmt_s(bare)} ({n / bare:.0f} VM/s) bare loop",
            fmt_ratio(elapsed, bare),
            "",
            note=f"the jail alone: jailed bare loop / bare loop = {fmt_ratio(jailed, bare)}",
        ),
        Row(
            NAME,
            "worker CPU per VM start (the worker process's threads, apply -> observed)",
            f"{worker_ms:.2f} ms",
            f"{vmm_ms:.2f} ms a fake VMM's own CPU ({vmms} VMMs)",
            fmt_ratio(fleet.start_worker_cpu / n, vmm_cpu / max(vmms, 1)),
            "<= 5 ms",
            note=(
                f"of the worker's {worker_ms:.2f} ms, {system_ms:.2f} ms in the kernel "
                f"(stime; ticks summed over {n} starts); the host holds {cgroups_on_host} "
                "v1 cpu cgroups, each of which a VM's cpu quota write walks; one new file in "
                f"the run's directory costs {new_file * 1e6:.0f} us of CPU here (its filesystem's "
                "inode allocation: a start makes eight), the record of its GC root in Nix's "
                f"gcroots/auto {root_record * 1e6:.0f} us (one a start; the design floor "
                "makes neither the root nor five of the eight)"
            ),
        ),
        Row(
            NAME,
            "... its helpers meanwhile, per VM start (the jailer; nix-store runs)",
            f"{helper_ms:.2f} ms",
            f"{worker_ms:.2f} ms the worker's own",
            fmt_ratio(fleet.start_helper_cpu, fleet.start_worker_cpu),
        ),
        Row(
            NAME,
            "... floor: the bare loop's own CPU per start (spawn + 4 API calls)",
            f"{bare_ms:.2f} ms",
            f"{worker_ms:.2f} ms the worker's own",
            fmt_ratio(fleet.start_worker_cpu / n, bare_cpu / n),
        ),
        Row(
            NAME,
            "... floor as designed: jailed spawn, pidfd, 4 API calls, one durable record",
            f"{design_ms:.2f} ms",
            f"{worker_ms:.2f} ms the worker's own",
            fmt_ratio(fleet.start_worker_cpu / n, design_cpu / n),
            "",
            note=(
                "the design floor: the jailed bare loop (Jail.prepare: uid slot, cgroup with "
                "limits, run directory given to the uid; VmJail.spawn through the warm jailer) "
                "plus the VMM's pidfd and the VM's record written with fsync, in one Python "
                f"process; its jailer meanwhile {design_jailer_cpu / n * 1000:.2f} ms per start "
                "(counted with the worker's helpers, not with the worker); by part, ms of the "
                f"starting threads' CPU per start: {design_parts} (the rest of the process's "
                "time is its pool's threads and interpreter)"
            ),
        ),
        Row(
            NAME,
            "... spawning one unjailed fake VMM: subprocess.Popen, CPU of the parent",
            f"{spawn['Popen'] * 1000:.3f} ms",
            f"{spawn['posix_spawn'] * 1000:.3f} ms os.posix_spawn",
            fmt_ratio(spawn["Popen"], spawn["posix_spawn"]),
        ),
    ]
