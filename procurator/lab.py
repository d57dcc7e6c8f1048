"""A throwaway fleet on this host: one master and one worker, run as real
``procurator`` processes inside their own network namespace.

Used by ``make demo`` (``procurator.demo``) and by the end-to-end tests, so
what the tests prove is what the demo shows. Everything it makes — the
namespace (and with it the bridge and every tap), the processes, the VMs'
cgroups, the state dir with the GC roots — is removed by ``close()``, also
after a failure.

The worker is started with ``nsenter --net``, not ``ip netns exec``: that
one also mounts a fresh ``/sys`` for the namespace, without
``/sys/fs/cgroup``, and the worker would jail its VMMs without cgroups.

Needs root (network namespaces, taps, the Nix store).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procurator.core.defaults import MASTER_METRICS_PORT, WORKER_METRICS_PORT
from procurator.core.jail import JailPolicy
from procurator.rpc.address import DEFAULT_PORT
from procurator.worker.jail import remove_worker_cgroups

__all__ = [
    "MASTER_METRICS_PORT",
    "PORT",
    "WORKER_METRICS_PORT",
    "Lab",
    "build_test_image",
    "repo_root",
]

# The daemons' own defaults: the lab runs in its own namespace, where they
# are free, and the demo shows the ports a real fleet uses.
PORT = DEFAULT_PORT


# The lab's master listens on loopback inside its own namespace, so it runs
# plaintext; TLS settings from the caller's environment must not leak in.
_TLS_ENV = ("PROCURATOR_TLS_CERT", "PROCURATOR_TLS_KEY", "PROCURATOR_TLS_CA")


def _plain_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _TLS_ENV}
    env.update(extra)
    return env


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def build_test_image(*args: str) -> str:
    """Build (or reuse) the offline test image; returns its store path."""
    script = repo_root() / "scripts" / "build-test-image.sh"
    result = subprocess.run(
        ["bash", str(script), *args], check=True, capture_output=True, text=True
    )
    return result.stdout.strip().splitlines()[-1]


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


class Lab:
    """See the module docstring. Use as a context manager."""

    def __init__(
        self,
        name: str = "procurator-lab",
        *,
        worker_id: str = "host-a",
        driver: str = "qemu",
        qemu_accel: str = "tcg",
        stop_grace: float = 10.0,
        resync_interval: float = 5.0,
        extra_worker_args: Sequence[str] = (),
    ) -> None:
        self.netns = name
        self.worker_id = worker_id
        self.driver = driver
        self.qemu_accel = qemu_accel
        self.stop_grace = stop_grace
        self.resync_interval = resync_interval
        self.extra_worker_args = tuple(extra_worker_args)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.state_dir = self.dir / "worker"
        self.master_addr = f"127.0.0.1:{PORT}"
        self.master: _Proc | None = None
        self.worker: _Proc | None = None
        self._netns_made = False

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self._make_netns()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _make_netns(self) -> None:
        if Path(f"/run/netns/{self.netns}").exists():
            raise RuntimeError(
                f"network namespace {self.netns} exists already (another lab running? "
                f"if not: ip netns del {self.netns})"
            )
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        self._netns_made = True
        subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"], check=True)

    def close(self) -> None:
        """Stop everything and remove every trace. Safe to call twice."""
        for proc in (self.worker, self.master):
            if proc is not None:
                self._stop(proc)
        self.worker = self.master = None
        # VMMs run in their own sessions and outlive the worker on purpose;
        # a lab that is torn down must not leave them behind.
        self.kill_vmms()
        try:
            self._remove_cgroups()
        finally:
            if self._netns_made:
                subprocess.run(["ip", "netns", "del", self.netns], check=False)
                self._netns_made = False
            shutil.rmtree(self.dir, ignore_errors=True)
            self._drop_nix_root_records()

    def _remove_cgroups(self) -> None:
        """The VM cgroups the worker made (their VMMs are gone now) and its
        own directories under the cgroup parent: a worker leaves them to its
        VMs, which outlive it on purpose."""
        if not self.state_dir.exists():
            return  # no worker ever ran: nothing was made
        parent = os.environ.get("PROCURATOR_CGROUP_PARENT", JailPolicy().cgroup_parent)
        remove_worker_cgroups(self.state_dir, parent)

    def _drop_nix_root_records(self) -> None:
        """The worker's GC roots went with the lab's directory; Nix's records
        of them (``gcroots/auto``) must go too, or they dangle until a GC."""
        auto = Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
        prefix = f"{self.dir}/"
        with contextlib.suppress(FileNotFoundError):
            for entry in auto.iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(entry).startswith(prefix):
                        entry.unlink()

    def kill_vmms(self) -> None:
        for pid in self.vmm_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.vmm_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    # -- processes ----------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> _Proc:
        log = self.dir / f"{name}.log"
        env = _plain_env()
        env.setdefault("NIX_CONF_DIR", "/var/cache/procurator/test-image/nix-conf")
        # nsenter, not `ip netns exec`: that one also remounts /sys for the
        # namespace, which hides /sys/fs/cgroup, and the worker jails its VMMs
        # in cgroups there. Only the network namespace is entered.
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/run/netns/{self.netns}",
                    sys.executable,
                    "-m",
                    "procurator",
                    *args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        return _Proc(name, popen, log)

    def start_master(self) -> None:
        self.master = self._spawn(
            "master",
            [
                "master",
                "--listen",
                self.master_addr,
                "--db",
                str(self.dir / "master.db"),
                *self._metrics_args(MASTER_METRICS_PORT),
            ],
        )
        self._wait_for(lambda: self.try_status() is not None, "the master to answer", 20)

    @staticmethod
    def _metrics_args(port: int) -> list[str]:
        return ["--metrics-listen", f"127.0.0.1:{port}"]

    def start_worker(self) -> None:
        self.worker = self._spawn(
            "worker",
            [
                "worker",
                "--id",
                self.worker_id,
                "--master",
                self.master_addr,
                "--state-dir",
                str(self.state_dir),
                "--driver",
                self.driver,
                "--qemu-accel",
                self.qemu_accel,
                "--stop-grace",
                str(self.stop_grace),
                "--resync-interval",
                str(self.resync_interval),
                *self._metrics_args(WORKER_METRICS_PORT),
                "--metrics-interval",
                "2",
                *self.extra_worker_args,
            ],
        )

    def stop_master(self) -> None:
        if self.master is not None:
            self._stop(self.master)
            self.master = None

    def stop_worker(self, *, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.worker is not None:
            self._stop(self.worker, sig=sig)
            self.worker = None

    @staticmethod
    def _stop(proc: _Proc, *, sig: signal.Signals = signal.SIGTERM) -> None:
        if proc.popen.poll() is None:
            # nsenter execs the command, so the pid is procurator's.
            proc.popen.send_signal(sig)
            try:
                proc.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()

    # -- commands -------------------------------------------------------------

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run ``procurator ARGS`` inside the namespace against the master."""
        env = _plain_env(PROCURATOR_MASTER=self.master_addr)
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "procurator", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"procurator {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )
        return result

    def write_fleet(self, vms: Sequence[tuple[str, str]], name: str = "fleet.toml") -> Path:
        """A fleet file putting ``(vm id, store path)`` pairs on our worker."""
        entries = ",\n".join(f'  {{ id = "{vm_id}", image = "{image}" }}' for vm_id, image in vms)
        path = self.dir / name
        path.write_text(f"[workers.{self.worker_id}]\nvms = [\n{entries}\n]\n")
        return path

    def apply(self, vms: Sequence[tuple[str, str]], *, timeout: float = 180) -> str:
        path = self.write_fleet(vms)
        return self.cli("apply", str(path), "--wait", "--timeout", str(timeout)).stdout

    def try_status(self) -> dict[str, Any] | None:
        result = self.cli("status", "--json", check=False, timeout=30)
        if result.returncode != 0:
            return None
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def status(self) -> dict[str, Any]:
        data = self.try_status()
        if data is None:
            raise RuntimeError("the master does not answer")
        return data

    # -- observation ----------------------------------------------------------

    def vm_dir(self, vm_id: str) -> Path:
        return self.state_dir / "vms" / vm_id

    def serial(self, vm_id: str) -> str:
        path = self.vm_dir(vm_id) / "run" / "serial.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self, vm_id: str, timeout: float = 60) -> str:
        """Wait for the guest's readiness marker; returns its address."""
        marker = "PROCURATOR-READY "

        def ready() -> bool:
            return marker in self.serial(vm_id)

        self._wait_for(ready, f"VM {vm_id} to print its readiness marker", timeout)
        line = next(ln for ln in self.serial(vm_id).splitlines() if marker in ln)
        return line.split(marker, 1)[1].strip()

    def guest_status(self, address: str, timeout: float = 20) -> dict[str, Any]:
        """The guest's /cgi-bin/status, fetched from inside the namespace."""
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    "curl",
                    "-sf",
                    "-m",
                    "3",
                    f"http://{address}/cgi-bin/status",
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if result.returncode == 0:
                data: dict[str, Any] = json.loads(result.stdout)
                return data
            if time.monotonic() > deadline:
                raise RuntimeError(f"guest at {address} does not answer: {result.stderr}")
            time.sleep(0.5)

    def vmm_pids(self) -> dict[str, int]:
        """VM id -> pid of every VMM process of this lab (by its state dir)."""
        found: dict[str, int] = {}
        vms_dir = str(self.state_dir / "vms") + "/"
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state == "Z" or vms_dir not in cmdline:
                continue
            if "qemu-system" not in cmdline and "cloud-hypervisor" not in cmdline:
                continue
            vm_id = cmdline.split(vms_dir, 1)[1].split("/", 1)[0]
            found[vm_id] = int(entry)
        return found

    def taps(self) -> list[str]:
        result = subprocess.run(
            ["ip", "-n", self.netns, "-j", "link", "show", "type", "tun"],
            capture_output=True,
            text=True,
            check=True,
        )
        return sorted(link["ifname"] for link in json.loads(result.stdout or "[]"))

    def gc_roots(self) -> list[str]:
        roots = self.state_dir / "gcroots"
        return (
            sorted(str(p.relative_to(roots)) for p in roots.glob("*/*")) if roots.exists() else []
        )

    def fetch(self, url: str) -> str:
        """GET a URL from inside the namespace (metrics endpoints)."""
        result = subprocess.run(
            ["ip", "netns", "exec", self.netns, "curl", "-sf", "-m", "5", url],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout

    @staticmethod
    def _wait_for(condition: Any, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(0.2)
