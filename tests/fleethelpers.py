"""What the end-to-end tests with real ``procurator`` processes share
(tests/e2e, tests/ops): a private Nix configuration, images added to the
real store and deleted afterwards (each one private to the session that
added it: see ``add_image``), the CLI, daemons stopped with SIGTERM
(SIGKILL after 30 s), and ``fake_fleet``: a real ``procurator master`` and
``worker`` (cloud-hypervisor driver, the fake VMM of tests/fakes,
``--no-network``), the master logging text lines and the worker JSON lines
to files the tests read. Every VM is removed through the product at
teardown, so no VMM outlives a test."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from testnames import free_port

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fakes" / "cloud-hypervisor-fake.py"
NIX_CONF = "build-users-group =\nsubstituters =\nflake-registry =\n"
OP_RE = re.compile(r"\(op (op-[0-9a-f]{12})\)")


def live_processes() -> Iterator[tuple[int, bytes]]:
    """``(pid, cmdline)`` of each live process (a zombie is already dead:
    its parent reaps it); one that exits while it is read is skipped."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] != "Z":
            yield int(entry), cmdline


@pytest.fixture(scope="module")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    conf = tmp_path_factory.mktemp("nix-conf")
    (conf / "nix.conf").write_text(NIX_CONF)
    return {**os.environ, "NIX_CONF_DIR": str(conf)}


AddImage = Callable[..., str]


@pytest.fixture(scope="module")
def add_image(
    nix_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AddImage]:
    """``add_image(name, config, files={})``: a store path holding
    vm-config.json, a dummy kernel and ``files``; deleted afterwards.

    Every call makes its own store path (a ``nonce`` file of random
    content), even for the same name and files: store paths are
    content-addressed, so two test sessions on one host adding the same
    image would share it, and the first one's teardown would delete it under
    the other, whose worker could then not realise it (tests/faults does the
    same, tests/e2e/test_private_images.py says why)."""
    added: list[str] = []

    def add(name: str, config: dict[str, Any], files: dict[str, bytes] | None = None) -> str:
        src = tmp_path_factory.mktemp("image") / name
        src.mkdir()
        (src / "vmlinux").write_bytes(b"\0" * 4096)
        (src / "vm-config.json").write_text(json.dumps(config))
        (src / "nonce").write_text(uuid.uuid4().hex)
        for file_name, data in (files or {}).items():
            (src / file_name).write_bytes(data)
        out = subprocess.run(
            ["nix-store", "--add", str(src)],
            env=nix_env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        added.append(out)
        return out

    yield add
    for path in added:
        subprocess.run(
            ["nix-store", "--delete", path], env=nix_env, check=False, capture_output=True
        )


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "procurator", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


@contextmanager
def procurator_process(
    args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``procurator <args>`` with its output appended to ``log``."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "procurator", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class FakeFleet:
    """The running master and worker, and the CLI against them."""

    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.dir = tmp_path
        self.env = env
        self.state = tmp_path / "state"
        self.master_log = tmp_path / "master.log"
        self.worker_log = tmp_path / "worker.log"
        self.metrics_urls: dict[str, str] = {}  # "master"/"worker" -> /metrics URL
        self.master: subprocess.Popen[bytes] | None = None  # the master process
        self._fleets = 0

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(self.env, *args)

    def apply(self, text: str, *args: str) -> subprocess.CompletedProcess[str]:
        self._fleets += 1
        path = self.dir / f"fleet-{self._fleets}.toml"
        path.write_text(text)
        return self.cli("apply", str(path), *args)

    def apply_ok(self, text: str) -> str:
        """Apply and wait for convergence; returns the apply's op id."""
        result = self.apply(text, "--wait", "--timeout", "60")
        assert result.returncode == 0, result.stdout + result.stderr
        match = OP_RE.search(result.stdout)
        assert match is not None, result.stdout
        return match.group(1)

    def json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def status_vms(self) -> dict[str, dict[str, Any]]:
        status = self.json("status")
        return {vm["id"]: vm for w in status["workers"] for vm in w["vms"]}

    def describe(self, vm_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self.json("describe", "vm", vm_id)
        return data

    def vmm_pid(self, vm_id: str) -> int | None:
        """The pid of the VM's VMM as the worker recorded it (None: none)."""
        path = self.state / "vms" / vm_id / "handles.json"
        if not path.exists():
            return None
        handle = json.loads(path.read_text()).get("handle")
        return int(handle["pid"]) if handle else None

    def disk_copies(self, vm_id: str) -> list[Path]:
        return sorted((self.state / "vms" / vm_id / "disks").glob("*/disk*.img"))

    def worker_records(self) -> list[dict[str, Any]]:
        """The worker's log: one JSON object per whole line (the last line
        is left out until its newline is written: the worker may be
        writing it as this reads)."""
        text = self.worker_log.read_text()
        whole = text[: text.rfind("\n") + 1]
        return [json.loads(line) for line in whole.splitlines() if line.startswith("{")]

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}\nmaster log:\n"
                    f"{self.master_log.read_text()[-4000:]}\nworker log:\n"
                    f"{self.worker_log.read_text()[-4000:]}"
                )
            time.sleep(0.2)


@pytest.fixture
def fake_fleet(tmp_path: Path, nix_env: dict[str, str]) -> Iterator[FakeFleet]:
    with running_fake_fleet(tmp_path, nix_env) as fleet:
        yield fleet


@contextmanager
def running_fake_fleet(
    tmp_path: Path,
    nix_env: dict[str, str],
    *,
    metrics: bool = False,
    worker_args: tuple[str, ...] = (),
) -> Iterator[FakeFleet]:
    """The fleet of ``fake_fleet``; with ``metrics``, the master and the
    worker also serve /metrics on free loopback ports
    (``FakeFleet.metrics_urls``); ``worker_args``: more worker flags."""
    port = free_port()
    env = {**nix_env, "PROCURATOR_MASTER": f"127.0.0.1:{port}"}
    fleet = FakeFleet(tmp_path, env)
    master_metrics = f"127.0.0.1:{free_port()}" if metrics else ""
    worker_metrics = f"127.0.0.1:{free_port()}" if metrics else ""
    if metrics:
        fleet.metrics_urls = {
            "master": f"http://{master_metrics}/metrics",
            "worker": f"http://{worker_metrics}/metrics",
        }
    master_args = [
        "master",
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        str(tmp_path / "m.db"),
        "--metrics-listen",
        master_metrics,
    ]
    worker_command = [
        "worker",
        "--id",
        "host-a",
        "--state-dir",
        str(fleet.state),
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
        worker_metrics,
        "--stop-grace",
        "2",
        "--log-format",
        "json",
        *worker_args,
    ]
    with (
        procurator_process(master_args, env, fleet.master_log) as master,
        procurator_process(worker_command, env, fleet.worker_log) as worker,
    ):
        fleet.master = master
        # Yield once host-a is registered and connected, not merely once the
        # master answers: a test that reads the fleet right away (top --once)
        # otherwise races the worker's registration (CI saw "0/0 workers").

        def host_a_connected() -> bool:
            result = fleet.cli("status", "--json")
            if result.returncode != 0:
                return False
            workers = json.loads(result.stdout)["workers"]
            return any(
                w["worker_id"] == "host-a"
                and w["connected"]
                and w["observed_generation"] == w["desired_generation"]
                for w in workers
            )

        fleet.wait_for("host-a to register and report", host_a_connected)
        yield fleet
        assert worker.poll() is None, fleet.worker_log.read_text()
        # Leave no VMM behind: remove every VM through the product.
        result = fleet.apply("[workers.host-a]\nvms = []\n")
        assert result.returncode == 0, result.stdout + result.stderr

        def all_removed() -> bool:
            status = fleet.json("status")
            (host_a,) = [w for w in status["workers"] if w["worker_id"] == "host-a"]
            return bool(
                host_a["observed_generation"] == host_a["desired_generation"] and not host_a["vms"]
            )

        fleet.wait_for("every VM to be removed", all_removed)


def read_lines(proc: subprocess.Popen[bytes], want: int, timeout: float) -> bytes:
    """What ``proc`` wrote to its stdout pipe once it has written ``want``
    lines, it closed it, or ``timeout`` seconds passed (a guard, not a
    measurement); read from the pipe itself, as a buffered reader would hide
    from ``select`` what it already took."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while data.count(b"\n") < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    return data
