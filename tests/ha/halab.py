"""Several ``procurator master`` processes on one PostgreSQL database and
several ``procurator worker`` processes (the fake cloud-hypervisor,
``--no-network``), each worker given every master: ``HaLab``.

Masters listen on free loopback ports and log to files; worker ``host-<j>``
lists the masters starting with master ``j % masters`` (a worker tries them
in the order given), so workers start spread across masters. Leases and
intervals are short (``FAST_MASTER``), so that failover takes about a
second. ``close()`` removes every VM through the product when it can,
then stops everything and kills any VMM left (the suite's leak check
would fail the test otherwise)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from fleethelpers import FAKE, free_port

FAST_MASTER = (
    "--worker-lease",
    "2",
    "--leader-lease",
    "2",
    "--sync-interval",
    "1",
    "--push-timeout",
    "5",
)
GENERATION_RE = re.compile(r"generation (\d+)")


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class HaLab:
    """See the module docstring."""

    def __init__(
        self,
        base: Path,
        env: Mapping[str, str],
        database: str,
        *,
        masters: int = 3,
        workers: int = 3,
        master_args: Sequence[str] = FAST_MASTER,
    ) -> None:
        self.dir = base
        self.env = {k: v for k, v in env.items() if not k.startswith("PROCURATOR_TLS_")}
        self.database = database
        self.master_args = tuple(master_args)
        self.addresses = [f"127.0.0.1:{free_port()}" for _ in range(masters)]
        self.masters: list[Proc | None] = [None] * masters
        self.worker_ids = [f"host-{j}" for j in range(workers)]
        self.workers: dict[str, Proc] = {}
        self._fleets = 0

    # -- processes ----------------------------------------------------------

    def _spawn(self, name: str, args: Sequence[str]) -> Proc:
        log = self.dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "procurator", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
            )
        return Proc(name, popen, log)

    def start_master(self, index: int, *, wait: bool = True) -> Proc:
        proc = self._spawn(
            f"master-{index}",
            [
                "master",
                "--listen",
                self.addresses[index],
                "--database",
                self.database,
                "--master-id",
                f"m{index}",
                "--metrics-listen",
                "",
                *self.master_args,
            ],
        )
        self.masters[index] = proc
        if wait:
            self.wait_for(
                f"master {index} to answer",
                lambda: self.cli("status", masters=[index]).returncode == 0,
                proc=proc,
            )
        return proc

    def kill_master(self, index: int, sig: signal.Signals = signal.SIGKILL) -> None:
        proc = self.masters[index]
        if proc is not None and proc.alive:
            proc.popen.send_signal(sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                proc.popen.wait(timeout=30)
                self.masters[index] = None

    def signal_master(self, index: int, sig: signal.Signals) -> None:
        proc = self.masters[index]
        assert proc is not None
        proc.popen.send_signal(sig)

    def master_list(self, first: int = 0) -> str:
        """Every master's address, starting with master ``first``."""
        order = self.addresses[first:] + self.addresses[:first]
        return ",".join(order)

    def state_dir(self, worker_id: str) -> Path:
        return self.dir / worker_id

    def start_worker(self, worker_id: str) -> Proc:
        first = self.worker_ids.index(worker_id) % len(self.addresses)
        proc = self._spawn(
            worker_id,
            [
                "worker",
                "--id",
                worker_id,
                "--master",
                self.master_list(first),
                "--state-dir",
                str(self.state_dir(worker_id)),
                "--resync-interval",
                "1",
                "--driver",
                "cloud-hypervisor",
                "--vmm-binary",
                sys.executable,
                "--vmm-arg",
                str(FAKE),
                "--no-network",
                "--metrics-listen",
                "",
                "--stop-grace",
                "2",
            ],
        )
        self.workers[worker_id] = proc
        return proc

    def start(self) -> None:
        for index in range(len(self.addresses)):
            self.start_master(index, wait=False)
        for index in range(len(self.addresses)):
            self.wait_for(
                f"master {index} to answer",
                lambda i=index: self.cli("status", masters=[i]).returncode == 0,  # type: ignore[misc]
            )
        for worker_id in self.worker_ids:
            self.start_worker(worker_id)
        self.wait_for("every worker to connect", self.all_connected)

    def close(self) -> None:
        """Remove every VM through the product if it can; stop everything."""
        try:
            if any(p is not None and p.alive for p in self.masters) and all(
                p.alive for p in self.workers.values()
            ):
                result = self.apply({}, "--wait", "--timeout", "60")
                if result.returncode != 0:
                    print(f"teardown apply failed: {result.stdout}{result.stderr}")
        finally:
            for proc in [*self.workers.values(), *(p for p in self.masters if p is not None)]:
                if proc.alive:
                    proc.popen.send_signal(signal.SIGCONT)
                    proc.popen.terminate()
                    try:
                        proc.popen.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.popen.kill()
                        proc.popen.wait()
            self.kill_vmms()

    def kill_vmms(self) -> None:
        for pids in self.vmm_pids_by_worker().values():
            for pid in pids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    # -- the CLI --------------------------------------------------------------

    def cli(
        self, *args: str, masters: Sequence[int] | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """``procurator ARGS`` with ``$PROCURATOR_MASTER`` listing the
        masters (all, or the indexes given, in that order)."""
        chosen = masters if masters is not None else range(len(self.addresses))
        env = {**self.env, "PROCURATOR_MASTER": ",".join(self.addresses[i] for i in chosen)}
        return subprocess.run(
            [sys.executable, "-m", "procurator", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )

    def fleet_file(self, fleet: Mapping[str, Mapping[str, str]]) -> Path:
        """A fleet file: worker id -> {VM id: image}; every worker listed."""
        self._fleets += 1
        lines = []
        for worker_id in self.worker_ids:
            vms = ", ".join(
                f'{{ id = "{vm_id}", image = "{image}" }}'
                for vm_id, image in sorted(fleet.get(worker_id, {}).items())
            )
            lines.append(f"[workers.{worker_id}]\nvms = [ {vms} ]\n")
        path = self.dir / f"fleet-{self._fleets}.toml"
        path.write_text("\n".join(lines))
        return path

    def apply(
        self,
        fleet: Mapping[str, Mapping[str, str]],
        *args: str,
        masters: Sequence[int] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return self.cli("apply", str(self.fleet_file(fleet)), *args, masters=masters)

    def apply_async(
        self, fleet: Mapping[str, Mapping[str, str]], *args: str, first: int = 0
    ) -> subprocess.Popen[str]:
        """``procurator apply`` in the background, trying master ``first``
        first."""
        env = {**self.env, "PROCURATOR_MASTER": self.master_list(first)}
        return subprocess.Popen(
            [sys.executable, "-m", "procurator", "apply", str(self.fleet_file(fleet)), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )

    def status(self, masters: Sequence[int] | None = None) -> dict[str, Any] | None:
        result = self.cli("status", "--json", masters=masters, timeout=60)
        if result.returncode != 0:
            return None
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    # -- observation ------------------------------------------------------------

    def all_connected(self) -> bool:
        status = self.status()
        if status is None:
            return False
        connected = {w["worker_id"] for w in status["workers"] if w["connected"]}
        return connected >= set(self.worker_ids)

    def converged(self, fleet: Mapping[str, Mapping[str, str]], generation: int) -> bool:
        """The fleet at ``generation`` or later, and every worker connected,
        observed its desired generation (a worker an apply did not change
        keeps an older one) and runs exactly its VMs of ``fleet``."""
        status = self.status()
        if status is None or status["generation"] < generation:
            return False
        by_id = {w["worker_id"]: w for w in status["workers"]}
        for worker_id in self.worker_ids:
            worker = by_id.get(worker_id)
            want = dict.fromkeys(fleet.get(worker_id, {}), "running")
            if worker is None:
                if want:
                    return False
                continue
            phases = {vm["id"]: vm["phase"] for vm in worker["vms"]}
            if (
                not worker["connected"]
                or (worker["observed_generation"] or 0) < worker["desired_generation"]
                or phases != want
            ):
                return False
        return True

    def vmm_pids_by_worker(self) -> dict[str, dict[str, int]]:
        """worker id -> VM id -> pid of every live VMM of that worker."""
        found: dict[str, dict[str, int]] = {}
        dirs = {w: f"path={self.state_dir(w)}/vms/" for w in self.worker_ids}
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
            for worker_id, prefix in dirs.items():
                for arg in argv.split("\0"):
                    if arg.startswith(prefix):
                        vm_id = arg[len(prefix) :].split("/", 1)[0]
                        found.setdefault(worker_id, {})[vm_id] = int(entry)
        return found

    def views(self) -> str:
        """What ``status --json`` shows on each master now (for a failure
        message: which master's view was behind)."""
        parts = []
        for index, proc in enumerate(self.masters):
            if proc is None or not proc.alive:
                continue
            try:
                result = self.cli("status", "--json", masters=[index], timeout=30)
            except subprocess.TimeoutExpired:
                parts.append(f"--- status on master {index}: timed out")
                continue
            parts.append(f"--- status on master {index}:\n{result.stdout}{result.stderr}")
        try:
            with psycopg.connect(self.database, connect_timeout=5) as conn:
                for sql in (
                    "SELECT worker_id, version, master_id, session, connected, "
                    "observed_generation FROM worker_state ORDER BY worker_id",
                    "SELECT worker_id, vm_id, status FROM vm_status ORDER BY worker_id, vm_id",
                ):
                    rows = conn.execute(sql).fetchall()
                    parts.append(f"--- {sql}:\n" + "\n".join(map(str, rows)))
        except psycopg.Error as exc:
            parts.append(f"--- the database: {exc}")
        return "\n".join(parts)

    def logs(self) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)

    def wait_for(
        self,
        what: str,
        condition: Callable[[], bool],
        timeout: float = 60,
        proc: Proc | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if proc is not None and not proc.alive:
                raise AssertionError(f"{proc.name} exited:\n{proc.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout:g} s waiting for {what}\n{self.views()}\n"
                    f"{self.logs()}"
                )
            time.sleep(0.1)


def applied_generation(output: str) -> int:
    """The generation ``procurator apply`` printed (applied, or replayed)."""
    match = GENERATION_RE.search(output)
    assert match, output
    return int(match.group(1))
