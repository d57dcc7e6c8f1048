"""Helpers for the fault-injection tests (fixtures: conftest.py).

``FaultLab`` is ``procurator.lab.Lab`` — real ``procurator master`` and
``worker`` processes inside a throwaway network namespace, with the network
on (a bridge and one tap per VM) — driving the fake cloud-hypervisor
(tests/fakes/cloud-hypervisor-fake.py), which boots at once and takes fault
controls. Images are real store paths (``nix-store --add``) holding a
``vm-config.json``, a dummy kernel and a writable disk, so every VM also gets
a GC root and a disk copy: all the things a crash could leak.

``leaks(lab, desired)`` is the one definition of "converged and clean" the
crash tests check after every iteration: exactly one VMM per desired VM
(counted by the API socket path on its command line, so a duplicate spawn is
seen), and no VMM, tap, address allocation, socket, VM directory, lock file,
disk copy or GC root (in the state dir and in Nix's ``gcroots/auto``) for
anything else.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from testnames import netns_name

from procurator.lab import Lab
from procurator.nix.store import auto_root_name

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fakes" / "cloud-hypervisor-fake.py"
NIX_CONF = "build-users-group =\nsubstituters =\nflake-registry =\n"
GCROOTS_AUTO = Path("/nix/var/nix/gcroots/auto")
DISK_BYTES = 64 << 10


def config(cmdline: str = "console=ttyS0", **extra: Any) -> dict[str, Any]:
    """A VmConfig for an image holding ``vmlinux`` and a writable ``disk.img``."""
    return {
        "payload": {"kernel": "vmlinux", "cmdline": cmdline},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
        "disks": [{"path": "disk.img"}],
        **extra,
    }


def add_image(
    nix_env: Mapping[str, str],
    workdir: Path,
    name: str,
    vm_config: Any,
    *,
    files: Mapping[str, bytes] | None = None,
    symlinks: Mapping[str, str] | None = None,
) -> str:
    """Add a directory image to the store; returns its store path.
    ``vm_config`` is written as JSON unless it is ``bytes`` (taken as is)."""
    src = workdir / f"{name}-{uuid.uuid4().hex[:8]}" / name
    src.mkdir(parents=True)
    (src / "vmlinux").write_bytes(b"\0" * 4096)
    (src / "disk.img").write_bytes(b"\0" * DISK_BYTES)
    raw = vm_config if isinstance(vm_config, bytes) else json.dumps(vm_config).encode()
    (src / "vm-config.json").write_bytes(raw)
    # Unique content, so a unique store path: two test runs on one host never
    # share (and delete under each other) an image.
    (src / "nonce").write_text(uuid.uuid4().hex)
    for rel, data in (files or {}).items():
        (src / rel).write_bytes(data)
    for rel, target in (symlinks or {}).items():
        (src / rel).symlink_to(target)
    return subprocess.run(
        ["nix-store", "--add", str(src)],
        env={**os.environ, **nix_env},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def delete_images(nix_env: Mapping[str, str], paths: Sequence[str]) -> list[str]:
    """Delete store paths; returns those Nix refused to delete (still rooted:
    a leaked GC root)."""
    refused = []
    for path in paths:
        result = subprocess.run(
            ["nix-store", "--delete", path],
            env={**os.environ, **nix_env},
            check=False,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0 and os.path.exists(path):
            refused.append(f"{path}: {result.stderr.strip()}")
    return refused


class FaultLab(Lab):
    """A ``Lab`` whose worker runs the fake cloud-hypervisor."""

    def __init__(
        self,
        *,
        worker_args: Sequence[str] = (),
        network: bool = True,
        resync_interval: float = 1.0,
        stop_grace: float = 2.0,
    ) -> None:
        args = ["--vmm-binary", sys.executable, "--vmm-arg", str(FAKE), *worker_args]
        if not network:
            args.append("--no-network")
        super().__init__(
            netns_name("pf"),
            driver="cloud-hypervisor",
            stop_grace=stop_grace,
            resync_interval=resync_interval,
            extra_worker_args=args,
        )
        self.network = network

    # -- processes -------------------------------------------------------------

    def kill_worker(self) -> None:
        """``kill -9`` the worker (its VMMs live on, in their own sessions)."""
        self.stop_worker(sig=signal.SIGKILL)

    def kill_master(self) -> None:
        if self.master is not None:
            self.master.popen.kill()
            self.master.popen.wait()
            self.master = None

    def worker_alive(self) -> bool:
        return self.worker is not None and self.worker.popen.poll() is None

    def master_alive(self) -> bool:
        return self.master is not None and self.master.popen.poll() is None

    def worker_log(self) -> str:
        path = self.dir / "worker.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def master_log(self) -> str:
        path = self.dir / "master.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # -- fleet -------------------------------------------------------------------

    def apply_async(self, vms: Sequence[tuple[str, str]]) -> subprocess.Popen[str]:
        """``procurator apply`` without waiting for it (nor for convergence)."""
        path = self.write_fleet(vms, name=f"fleet-{uuid.uuid4().hex[:6]}.toml")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROCURATOR_TLS_")}
        env["PROCURATOR_MASTER"] = self.master_addr
        return subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                self.netns,
                sys.executable,
                "-m",
                "procurator",
                "apply",
                str(path),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def apply_nowait(self, vms: Sequence[tuple[str, str]]) -> str:
        """Store a fleet (``apply`` without ``--wait``); returns its output."""
        path = self.write_fleet(vms, name=f"fleet-{uuid.uuid4().hex[:6]}.toml")
        return self.cli("apply", str(path)).stdout

    def apply_file(self, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
        return self.cli("apply", str(path), *args, check=False)

    def worker_status(self) -> dict[str, Any] | None:
        status = self.try_status()
        if status is None:
            return None
        for worker in status["workers"]:
            if worker["worker_id"] == self.worker_id:
                return dict(worker)
        return None

    def vms(self) -> dict[str, dict[str, Any]]:
        worker = self.worker_status()
        return {vm["id"]: vm for vm in worker["vms"]} if worker else {}

    def wait_status(
        self, predicate: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
    ) -> dict[str, Any]:
        """Poll ``status --json`` until ``predicate(worker status)`` holds."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while True:
            last = self.worker_status()
            if last is not None and predicate(last):
                return last
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout:g}s waiting for {what}; last status: "
                    f"{json.dumps(last)}\n--- worker log tail ---\n{self.worker_log()[-3000:]}"
                )
            time.sleep(0.2)

    def wait_converged(self, desired: Mapping[str, str], timeout: float = 90) -> dict[str, Any]:
        """Until the worker observed the desired generation with exactly the
        desired VMs running."""

        def converged(w: dict[str, Any]) -> bool:
            phases = {vm["id"]: vm["phase"] for vm in w["vms"]}
            return (
                w["connected"]
                and w["observed_generation"] == w["desired_generation"]
                and phases == dict.fromkeys(desired, "running")
            )

        return self.wait_status(converged, f"convergence on {sorted(desired)}", timeout)

    # -- observation ---------------------------------------------------------------

    def vmm_processes(self) -> dict[str, list[int]]:
        """VM id -> pids of every live VMM serving that VM's API socket."""
        vms_dir = str(self.state_dir / "vms") + "/"
        found: dict[str, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z" or "cloud-hypervisor" not in argv:
                continue
            args = argv.split("\0")
            for i, arg in enumerate(args[:-1]):
                if arg == "--api-socket" and args[i + 1].startswith(f"path={vms_dir}"):
                    vm_id = args[i + 1][len(f"path={vms_dir}") :].split("/", 1)[0]
                    found.setdefault(vm_id, []).append(int(entry))
        return found

    def worker_children(self, name: str) -> list[tuple[int, str]]:
        """(pid, command line) of the worker's live child processes called
        ``name`` (e.g. ``nix-store``)."""
        if self.worker is None:
            return []
        parent = str(self.worker.popen.pid)
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if fields[1] != parent:
                    continue
                argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0].decode(errors="replace")) == name:
                found.append((int(entry), " ".join(a.decode(errors="replace") for a in argv)))
        return found

    def allocations(self) -> dict[str, dict[str, str]]:
        path = self.state_dir / "network" / "addresses.json"
        if not path.exists():
            return {}
        data: dict[str, dict[str, str]] = json.loads(path.read_text())["vms"]
        return data


def _differ(what: str, have: Iterable[str], want: Iterable[str]) -> list[str]:
    have_set, want_set = set(have), set(want)
    extra, missing = sorted(have_set - want_set), sorted(want_set - have_set)
    if not extra and not missing:
        return []
    return [f"{what}: left behind {extra}, missing {missing}"]


def leaks(lab: FaultLab, desired: Mapping[str, str], *, network: bool = True) -> list[str]:
    """Everything that differs from "each desired VM (id -> store path) runs
    exactly once and nothing else is left"; empty when clean."""
    problems: list[str] = []
    want = set(desired)
    state = lab.state_dir

    vmms = lab.vmm_processes()
    for vm_id in sorted(want):
        if len(vmms.get(vm_id, [])) != 1:
            problems.append(f"VM {vm_id}: {len(vmms.get(vm_id, []))} VMM processes, want 1")
    for vm_id in sorted(set(vmms) - want):
        problems.append(f"orphan VMM of removed VM {vm_id}: pids {vmms[vm_id]}")

    vm_dirs = {p.name for p in (state / "vms").iterdir()} if (state / "vms").exists() else set()
    problems += _differ("VM directories", vm_dirs, want)
    problems += _differ(
        "sockets",
        (str(p.relative_to(state)) for p in state.rglob("*.sock")),
        (f"vms/{v}/run/api.sock" for v in want),
    )
    # A claim makes none (issue 31): any lock file is one left behind.
    problems += _differ("VM lock files", (p.stem for p in state.glob("locks/*.lock")), ())
    problems += _differ(
        "disk copies",
        (str(p.relative_to(state)) for p in state.glob("vms/*/disks/*/*")),
        (f"vms/{v}/disks/{os.path.basename(image)}/disk0.img" for v, image in desired.items()),
    )
    want_roots = [f"gcroots/{v}/{os.path.basename(image)}" for v, image in desired.items()]
    problems += _differ(
        "GC roots", (str(p.relative_to(state)) for p in state.glob("gcroots/*/*")), want_roots
    )
    problems += _differ("GC root directories", (p.name for p in state.glob("gcroots/*")), want)
    problems += _differ(
        f"{GCROOTS_AUTO} entries",
        (
            os.readlink(p)
            for p in GCROOTS_AUTO.iterdir()
            if p.is_symlink() and os.readlink(p).startswith(f"{state}/")
        ),
        (str(state / r) for r in want_roots),
    )
    for r in want_roots:
        link = str(state / r)
        if not (GCROOTS_AUTO / auto_root_name(link)).is_symlink():
            problems.append(f"GC root {link} has no {GCROOTS_AUTO} entry: not a root")

    if network:
        allocated = lab.allocations()
        problems += _differ("address allocations", allocated, want)
        want_taps = [a["tap"] for v, a in allocated.items() if v in want]
        problems += _differ("taps", lab.taps(), want_taps)
        if len(want_taps) != len(want):
            problems.append(f"{len(want_taps)} taps allocated for {len(want)} VMs")
    return problems


def record(test: str, **figures: Any) -> None:
    """Print a test's figures and, when ``$PROCURATOR_FAULT_FIGURES`` names a
    file, append them to it as one JSON line (docs/RELIABILITY.md is written
    from those)."""
    line = json.dumps({"test": test, **figures}, sort_keys=True)
    print(f"FIGURES {line}")
    target = os.environ.get("PROCURATOR_FAULT_FIGURES")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


def random_fleet(rng: random.Random, ids: Sequence[str], images: Sequence[str]) -> dict[str, str]:
    """A random subset of ``ids`` (possibly empty), each on a random image."""
    chosen = [vm for vm in ids if rng.random() < 0.6]
    return {vm: rng.choice(images) for vm in chosen}
