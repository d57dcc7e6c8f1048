"""Dying memory cgroups: what a removed VM's cgroup leaves in the kernel,
and what releasing its memory before the rmdir costs.

N VM cgroups (200; 20 with ``--quick``) made by ``procurator.worker.
cgroups`` as a worker makes them, one fake VMM (``--vmm``) in each, joined
before its exec as the jail joins it; each VM is created and booted over
its API socket (the fake appends the transitions to its event file), then
the VMMs end and the cgroups are removed. The event files stay until the
count is taken: they stand for the pages a real VMM leaves that outlive it
(its image read from the store, metadata blocks, a console log); then the
same with the files removed before the cgroups, the worker's own order for
a VM's directory (the release then finds little or nothing to do). Twice
per round, alternated: the worker's removal (memory released first, v1
``memory.force_empty``, v2 ``memory.reclaim``) and the baseline, the same
removal without the release; two rounds (one with ``--quick``).

Then a relaunch: the same N VMs started and ended, their files kept (a
relaunch keeps the VM's directory: its disk, its logs), and each VM's
cgroup prepared for a new VMM, alternated per round: the worker's way (the
empty cgroup kept, its limits rewritten) against the baseline, the cgroup
made anew as before the worker kept it (the last VMM's pages released,
the rmdir, the mkdir, the limits); then the VMs' removal, which still
releases (the pages left charged after it are a figure).

Figures: the bytes of pages still charged to the removed VM cgroups (the
worker directory's hierarchical page charges, which count removed children
that the kernel still keeps: this run's own, whatever other runs on the
host do), the host's count of dying memory cgroups before and after (moved
by every other run on the host too: a note, not a figure), and the time a
removal takes. docs/BENCHMARKS.md, "Session 7 (2026-12-07): dying memory
cgroups", and docs/SECURITY.md ("cgroup v1 and v2") tell the why.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from bench._harness import Row, Run, fmt_ratio, median
from procurator.core.jail import ResourceLimits
from procurator.worker import cgroups
from procurator.worker.cgroups import CgroupsV1, CgroupsV2

NAME = "memcg"
_LIMITS = ResourceLimits(memory_bytes=256 << 20, cpu_quota_us=100_000, pids=64)
_CONFIG = json.dumps(
    {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 128 << 20},
        "payload": {"kernel": "/nonexistent/vmlinux"},
    }
).encode()


class _V1Anew(CgroupsV1):
    """A relaunch that makes the cgroup anew (the baseline)."""

    def _kept(self, name: str) -> bool:
        super()._kept(name)  # what it checks still runs (a busy cgroup is refused)
        return False


class _V2Anew(CgroupsV2):
    """A relaunch that makes the cgroup anew (the baseline)."""

    def _kept(self, name: str) -> bool:
        super()._kept(name)
        return False


class _V1Baseline(CgroupsV1):
    """The removal without the release (the baseline)."""

    def _release(self, directory: Path) -> None:
        return None


class _V2Baseline(CgroupsV2):
    """The removal without the release (the baseline)."""

    def _release(self, directory: Path) -> None:
        return None


def _host_dying() -> int | None:
    """Memory cgroups the kernel counts minus those in the filesystem (v1);
    None without a v1 memory hierarchy."""
    root = Path("/sys/fs/cgroup/memory")
    counted = None
    for line in Path("/proc/cgroups").read_text().splitlines():
        fields = line.split()
        if fields[0] == "memory" and fields[1] != "0":
            counted = int(fields[2])
    if counted is None or not root.is_dir():
        return None
    live = sum(1 for _ in os.walk(root))
    return counted - live


def _charged_below(worker: Path) -> int:
    """Bytes of pages charged to the cgroups below ``worker``, removed ones
    included (the worker's directory holds no process of its own)."""
    stat = dict(line.split() for line in (worker / "memory.stat").read_text().splitlines())
    if "total_cache" in stat:  # v1: total_* are hierarchical
        return sum(int(stat[f"total_{k}"]) - int(stat[k]) for k in ("cache", "rss"))
    return int(stat["file"]) + int(stat["anon"])  # v2: hierarchical


def _http(sock: socket.socket, method: str, path: str, body: bytes = b"") -> None:
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
    if body:
        head += "Content-Type: application/json\r\n"
    sock.sendall(head.encode() + b"\r\n" + body)
    if not sock.recv(65536):
        raise RuntimeError(f"the fake VMM closed the connection on {method} {path}")


def _boot(api: Path) -> None:
    deadline = time.monotonic() + 30
    with socket.socket(socket.AF_UNIX) as sock:
        while True:
            try:
                sock.connect(str(api))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                # Not bound yet, or bound and not yet listening.
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the fake VMM does not listen on {api} after 30 s"
                    ) from None
                time.sleep(0.005)
        _http(sock, "PUT", "/api/v1/vm.create", _CONFIG)
        _http(sock, "PUT", "/api/v1/vm.boot")


def _remove_files(procs: list[tuple[str, subprocess.Popen[bytes], Path]]) -> None:
    for _, _, rundir in procs:
        if rundir.is_dir():
            for entry in rundir.iterdir():
                entry.unlink()
            rundir.rmdir()


def _start_and_end(
    run: Run, found: cgroups.Cgroups, n: int, where: Path
) -> tuple[list[tuple[str, subprocess.Popen[bytes], Path]], Path | None]:
    """N fake VMMs, each in a VM cgroup of ``found``, created, booted and
    ended (SIGTERM): (the VMs, the worker's memory directory)."""
    procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    worker = None
    try:
        for i in range(n):
            name = f"vm-{i:04d}"
            placement = found.create(name, _LIMITS)
            worker = Path(placement.path).parent
            rundir = where / name
            rundir.mkdir(parents=True)

            def join(files: tuple[str, ...] = placement.join) -> None:
                for path in files:
                    fd = os.open(path, os.O_WRONLY)
                    try:
                        os.write(fd, b"0")
                    finally:
                        os.close(fd)

            proc = subprocess.Popen(
                [
                    *run.vmm_argv(),
                    "--api-socket",
                    f"path={rundir / 'api.sock'}",
                    "--event-monitor",
                    f"path={rundir / 'events'}",
                ],
                preexec_fn=join,  # noqa: PLW1509 - the jail's own join, before exec
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append((name, proc, rundir))
        for _, _, rundir in procs:
            _boot(rundir / "api.sock")
    finally:
        for _, proc, _ in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for _, proc, _ in procs:
            proc.wait()
    return procs, worker


def _round(
    run: Run, found: cgroups.Cgroups, n: int, label: str, *, keep: bool
) -> tuple[int, float, int | None]:
    """(bytes left charged, seconds per removal, host dying delta).
    ``keep``: the VMs' files stay until the count is taken; else they go
    before the cgroups, as the worker removes a VM's directory first."""
    before = _host_dying()
    procs, worker = _start_and_end(run, found, n, run.dir / "memcg" / label)
    if not keep:
        _remove_files(procs)
    started = time.perf_counter()
    for name, _, _ in procs:
        found.remove(name)
    per_removal = (time.perf_counter() - started) / max(len(procs), 1)
    left = _charged_below(worker) if worker is not None else 0
    found.close()
    after = _host_dying()
    # The event files go now: what they kept charged goes with them.
    _remove_files(procs)
    dying = after - before if after is not None and before is not None else None
    return left, per_removal, dying


def _relaunch_round(run: Run, found: cgroups.Cgroups, n: int, label: str) -> tuple[float, int]:
    """(seconds per relaunch's ``create``, bytes left charged after the
    VMs' removal)."""
    procs, worker = _start_and_end(run, found, n, run.dir / "memcg" / label)
    try:
        started = time.perf_counter()
        for name, _, _ in procs:
            found.create(name, _LIMITS)
        per_relaunch = (time.perf_counter() - started) / max(len(procs), 1)
    finally:
        for name, _, _ in procs:
            found.remove(name)
    left = _charged_below(worker) if worker is not None else 0
    found.close()
    _remove_files(procs)
    return per_relaunch, left


def _relaunch_rows(run: Run, n: int, rounds: int, instance: str, version: int) -> list[Row]:
    figures: dict[str, list[tuple[float, int]]] = {"kept": [], "anew": []}
    for index in range(rounds):
        for label in ("anew", "kept"):
            tag = f"relaunch-{label}-{index}"
            found = cgroups.detect(run.cgroup_parent, f"{instance}-{tag}")
            if label == "anew":
                found = copy.copy(found)
                found.__class__ = _V1Anew if isinstance(found, CgroupsV1) else _V2Anew
            run.log(f"memcg: {tag}, {n} VMs")
            figures[label].append(_relaunch_round(run, found, n, tag))
    per = {k: median([f[0] for f in v]) for k, v in figures.items()}
    load = os.getloadavg()
    return [
        Row(
            NAME,
            f"relaunch: one VM's cgroup for its next VMM, files kept (v{version}, median)",
            f"{per['kept'] * 1000:.3f} ms kept",
            f"{per['anew'] * 1000:.3f} ms made anew",
            fmt_ratio(per["kept"], per["anew"]),
            note=(
                "per round, kept: "
                + ", ".join(f"{f[0] * 1000:.3f}" for f in figures["kept"])
                + " ms; anew: "
                + ", ".join(f"{f[0] * 1000:.3f}" for f in figures["anew"])
                + f" ms; load average {load[0]:.2f}"
            ),
        ),
        Row(
            NAME,
            f"pages left charged after removing {n} relaunched VMs",
            " ".join(f"{f[1] // 1024} KiB" for f in figures["kept"]) + " kept",
            " ".join(f"{f[1] // 1024} KiB" for f in figures["anew"]) + " made anew",
            "-",
        ),
    ]


def measure(run: Run) -> list[Row]:
    n = 20 if run.quick else 200
    rounds = 1 if run.quick else 2
    instance = f"memcg-{run.mark[:8]}"
    probe = cgroups.detect(run.cgroup_parent, instance)
    if "memory" not in probe.enforceable or not isinstance(probe, CgroupsV1 | CgroupsV2):
        return [Row(NAME, "not measured", "-", note=f"no memory controller: {probe.describe()}")]
    rows = []
    for keep in (True, False):
        files = "files kept" if keep else "files removed first"
        figures: dict[str, list[tuple[int, float, int | None]]] = {"release": [], "baseline": []}
        for index in range(rounds):
            for label in ("baseline", "release"):
                tag = f"{label}-{'kept' if keep else 'removed'}-{index}"
                found = cgroups.detect(run.cgroup_parent, f"{instance}-{tag}")
                if label == "baseline":
                    found = copy.copy(found)
                    found.__class__ = _V1Baseline if isinstance(found, CgroupsV1) else _V2Baseline
                run.log(f"memcg: {tag}, {n} VMs")
                figures[label].append(_round(run, found, n, tag, keep=keep))
        left = {k: [f[0] for f in v] for k, v in figures.items()}
        removal = {k: median([f[1] for f in v]) for k, v in figures.items()}
        dying = {k: [f[2] for f in v] for k, v in figures.items()}
        load = os.getloadavg()
        rows += [
            Row(
                NAME,
                f"pages left charged to {n} removed VM cgroups, {files} (v{probe.version})",
                " ".join(f"{b // 1024} KiB" for b in left["release"]),
                " ".join(f"{b // 1024} KiB" for b in left["baseline"]) + " without the release",
                "-",
                note=(
                    f"{files}: the host's dying memory cgroups, delta per round: "
                    f"{dying['release']} with the release, {dying['baseline']} without "
                    f"(every run on the host moves it); load average {load[0]:.2f}"
                ),
            ),
            Row(
                NAME,
                f"removal of one VM's cgroup, {files} (median of rounds)",
                f"{removal['release'] * 1000:.2f} ms",
                f"{removal['baseline'] * 1000:.2f} ms without the release",
                fmt_ratio(removal["release"], removal["baseline"]),
            ),
        ]
    return rows + _relaunch_rows(run, n, rounds, instance, probe.version)
