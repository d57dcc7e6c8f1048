"""A worker partitioned from its master (issue 27), with real processes:
a master and worker ``host-b`` in the test's network namespace, worker
``host-a`` in a namespace of its own joined to the master's through a
veth pair, both workers running the fake VMM of tests/fakes. The link is
set down on host-a's side: host-a fences (pauses) its ``reschedule`` VMs,
the leader reschedules them on host-b once host-a's lease expired, and
when the link comes back host-a takes its new assignment and removes them.

**What "running" means here.** A sampler thread asks every fake VMM of
both workers for ``vm.info`` over its API socket, throughout the test,
and counts a VM as running on a worker when its VMM answers ``Running``,
or does not answer in time (counted as running: a VMM we cannot see may
be running its guest). ``Paused`` counts as not running: the fake's
guest then does nothing (its I/O counters stop), as cloud-hypervisor's
vCPUs stop on ``vm.pause``; ``Created``/``Shutdown``, a refused
connection or no socket count as not running. No VM may be running on
both workers in any sample. This asks the VMMs themselves, not the
workers' reports, which could lag behind or run ahead of the truth.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import (
    FAKE,
    AddImage,
    add_image,
    live_processes,
    nix_env,
    procurator_process,
    run_cli,
)
from testnames import free_port, netns_name

from procurator.worker.state import StateDir

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]

LEASE = "6"  # --worker-lease and --leader-lease: healing 6 s after the master lost host-a
FENCE_AFTER = "3"  # host-a pauses 3 s after its last answer: before 2/3 of a lease
VMS = ("web-1", "web-2", "web-3")
WAITS = "db-1"  # on_worker_lost = "wait": never moved, never fenced


def _fleet(image: str) -> str:
    entries = [
        f'[[vms]]\nid = "{vm}"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n' for vm in VMS
    ]
    entries.append(
        f'[[vms]]\nid = "{WAITS}"\nimage = "{image}"\nvcpus = 1\nmemory_mib = 64\n'
        'on_worker_lost = "wait"\n'
    )
    return "\n".join(entries)


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def vmm_state(api_socket: Path, timeout: float = 2.0) -> str | None:
    """What the VMM behind ``api_socket`` says of its VM (``Running``,
    ``Paused``, ...); ``"?"`` when it does not answer in time; None when
    no VMM listens there (no socket, refused) or it has no VM."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(api_socket))
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except OSError:
            return "?"
        try:
            sock.sendall(
                b"GET /api/v1/vm.info HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except TimeoutError:
            return "?"
        except OSError:
            return None  # the VMM went away meanwhile
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return None
    state = json.loads(body).get("state")
    return str(state)


@dataclass
class Sampler:
    """Samples every VMM of ``state_dirs`` (worker id -> state dir) until
    stopped; keeps each VM's worst sample."""

    state_dirs: dict[str, Path]
    samples: int = 0
    twice: list[str] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    seen: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # vm -> worker -> states
    _stop: threading.Event = field(default_factory=threading.Event)

    def running(self) -> dict[str, set[str]]:
        """VM id -> the workers it is running on, now."""
        found: dict[str, set[str]] = {}
        for worker_id, state_dir in self.state_dirs.items():
            try:
                vm_dirs = sorted((state_dir / "vms").iterdir())
            except FileNotFoundError:
                continue  # no VM yet
            for vm_dir in vm_dirs:
                state = vmm_state(StateDir(state_dir).paths(vm_dir.name).api_socket)
                if state is None:
                    continue
                seen = self.seen.setdefault(vm_dir.name, {}).setdefault(worker_id, set())
                seen.add(state)
                if state in ("Running", "?"):
                    found.setdefault(vm_dir.name, set()).add(worker_id)
        return found

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # the test asserts there is none
            self.errors.append(exc)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self.running()
            self.samples += 1
            self.twice += [
                f"sample {self.samples}: {vm} runs on {sorted(ws)}"
                for vm, ws in now.items()
                if len(ws) > 1
            ]
            self._stop.wait(0.05)

    @contextmanager
    def sampling(self) -> Iterator[Sampler]:
        thread = threading.Thread(target=self.run, name="sampler", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()


@contextmanager
def partitionable_namespace() -> Iterator[tuple[str, str, str]]:
    """A namespace joined to the test's through a veth pair on a random
    /30 of 10.231.0.0/16: yields (namespace, the master's address, the
    veth end inside the namespace). Deleting the namespace deletes the
    pair."""
    name = netns_name("pp")
    outside = f"pp{name[-10:]}"
    net = random.randrange(0, 1 << 14) * 4
    host = f"10.231.{net >> 8}.{(net & 0xFF) + 1}"
    peer = f"10.231.{net >> 8}.{(net & 0xFF) + 2}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ip = ["ip", "-n", name]
        subprocess.run([*ip, "link", "set", "lo", "up"], check=True)
        subprocess.run(
            ["ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", name],
            check=True,
        )
        subprocess.run(["ip", "addr", "add", f"{host}/30", "dev", outside], check=True)
        subprocess.run(["ip", "link", "set", outside, "up"], check=True)
        subprocess.run([*ip, "addr", "add", f"{peer}/30", "dev", "eth0"], check=True)
        subprocess.run([*ip, "link", "set", "eth0", "up"], check=True)
        yield name, host, "eth0"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def set_link(namespace: str, device: str, state: str) -> None:
    subprocess.run(["ip", "-n", namespace, "link", "set", device, state], check=True)


def _worker_args(worker_id: str, master: str, state: Path, *extra: str) -> list[str]:
    return [
        "worker",
        "--id",
        worker_id,
        "--master",
        master,
        "--insecure",
        "--state-dir",
        str(state),
        "--resync-interval",
        "1",
        "--driver",
        "cloud-hypervisor",
        "--vmm-binary",
        sys.executable,
        "--vmm-arg",
        str(FAKE),
        "--no-network",
        "--unconfined",
        "--cpu-overcommit",
        "4",
        "--metrics-listen",
        "",
        "--stop-grace",
        "2",
        "--fence-after",
        FENCE_AFTER,
        *extra,
    ]


@contextmanager
def nsenter_process(
    namespace: str, args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``procurator ARGS`` inside ``namespace``, with its output appended to
    ``log``; SIGTERM (SIGKILL after 30 s) at the end. ``nsenter --net``
    enters the network namespace only and execs, so the pid is
    procurator's (procurator.lab says why not ``ip netns exec``)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{namespace}", sys.executable, "-m", "procurator", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _remove_every_vm(
    env: dict[str, str], states: dict[str, Path], logs: list[Path], namespace: str, link: str
) -> None:
    """Leave no VMM behind: the link up, an empty fleet applied, and both
    workers seen to hold no VM (their VMMs stopped by the product, and
    ``--wait`` until they converged: a worker releases a removed VM's GC
    root after its VMM stops)."""
    set_link(namespace, link, "up")
    empty = states["host-a"].parent / "empty.toml"
    empty.write_text("[workers.host-a]\nvms = []\n\n[workers.host-b]\nvms = []\n")
    result = run_cli(
        env, "apply", str(empty), "--insecure", "--wait", "--timeout", "120", timeout=150
    )
    assert result.returncode == 0, result.stdout + result.stderr
    sampler = Sampler(states)
    wait_for("every VMM to stop", lambda: not sampler.running() and not _vmms(states), logs)


def _vmms(states: dict[str, Path]) -> list[int]:
    """Pids of live fake VMMs under ``states``."""
    found = []
    needles = [str(s).encode() for s in states.values()]
    for pid, cmdline in live_processes():
        argv = cmdline.split(b"\0")
        # The fake VMM (python FAKE ...), not a worker naming it in its flags.
        if len(argv) >= 2 and argv[1] == bytes(FAKE) and any(n in cmdline for n in needles):
            found.append(pid)
    return found


def wait_for(
    what: str, condition: Callable[[], bool], logs: list[Path], timeout: float = 90
) -> None:
    """Poll ``condition``; ``timeout`` is a hang guard, not a measurement."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


def test_a_partitioned_worker_fences_its_vms_which_run_elsewhere_and_never_twice(
    tmp_path: Path, nix_env: dict[str, str], add_image: AddImage
) -> None:
    image = add_image("partition-vm", _config())
    states = {"host-a": tmp_path / "host-a", "host-b": tmp_path / "host-b"}
    logs = [tmp_path / "master.log", tmp_path / "host-a.log", tmp_path / "host-b.log"]
    with ExitStack() as stack:
        namespace, host, link = stack.enter_context(partitionable_namespace())
        master = f"{host}:{free_port()}"
        env = {**nix_env, "PROCURATOR_MASTER": master}
        master_args = ["master", "--listen", master, "--insecure", "--db", str(tmp_path / "m.db")]
        master_args += ["--worker-lease", LEASE, "--leader-lease", LEASE, "--metrics-listen", ""]

        def cli(*args: str) -> Any:
            result = run_cli(env, *args, "--json", "--insecure")
            assert result.returncode == 0, result.stdout + result.stderr
            return json.loads(result.stdout)

        def workers() -> dict[str, dict[str, Any]]:
            return {w["worker_id"]: w for w in cli("status")["workers"]}

        stack.enter_context(procurator_process(master_args, env, logs[0]))
        wait_for("the master", lambda: run_cli(env, "status", "--insecure").returncode == 0, logs)
        a = _worker_args("host-a", master, states["host-a"])
        stack.enter_context(nsenter_process(namespace, a, env, logs[1]))
        stack.enter_context(
            procurator_process(_worker_args("host-b", master, states["host-b"]), env, logs[2])
        )
        # Every VM is removed through the product at the end, whatever happened.
        stack.callback(_remove_every_vm, env, states, logs, namespace, link)
        wait_for(
            "both workers to connect",
            lambda: all(workers().get(w, {}).get("connected") for w in ("host-a", "host-b")),
            logs,
        )
        fleet = tmp_path / "fleet.toml"
        fleet.write_text(_fleet(image))
        result = run_cli(env, "apply", str(fleet), "--wait", "--timeout", "60", "--insecure")
        assert result.returncode == 0, result.stdout + result.stderr
        sampler = Sampler(states)
        with sampler.sampling():
            # Equal workers, binpack: the lower id, host-a, takes all four.
            assert sorted(sampler.running()) == sorted([*VMS, WAITS])
            assert all(ws == {"host-a"} for ws in sampler.running().values())

            set_link(namespace, link, "down")

            def moved() -> bool:
                now = sampler.running()
                return all(now.get(vm) == {"host-b"} for vm in VMS)

            wait_for("the reschedule VMs to run on host-b", moved, logs)
            assert sampler.running().get(WAITS) == {"host-a"}  # never fenced, never moved
            assert all("Paused" in sampler.seen[vm]["host-a"] for vm in VMS), sampler.seen

            set_link(namespace, link, "up")

            def healed() -> bool:
                now = workers()
                a = now.get("host-a", {})
                return bool(
                    a.get("connected")
                    and a.get("observed_generation") == a.get("desired_generation")
                    and {vm["id"] for vm in a["vms"]} == {WAITS}
                )

            wait_for("host-a to take its new assignment", healed, logs)
            then = sampler.samples
            wait_for("more samples", lambda: sampler.samples > then + 10, logs)
        assert sampler.errors == [], sampler.errors
        assert sampler.twice == [], sampler.twice
        final = sampler.running()
        assert final == {**{vm: {"host-b"} for vm in VMS}, WAITS: {"host-a"}}, final
        assert sampler.samples > 20  # sampled throughout, not only at the ends
