"""A live move of a real guest through two worker processes (issue 30): a
master and two workers running QEMU under TCG (the offline test image,
jailed, ``--no-network``: the streams go over loopback; the version in
network namespaces, with the guest answering ping on the target, is
test_move_live_netns.py), one unpinned VM booted on host-a.

- ``procurator move --live`` moves it to host-b: the disks mirrored and
  the memory migrated by the QEMU driver, the switch made by the master.
  The guest is not booted again on host-b (its boot marker is not in
  host-b's serial log, which starts with the move), runs there in the one
  QEMU left, and the time the move took is printed (not asserted).
- The source worker killed (``kill -9``) in the migration and started
  again: the guest runs on in one QEMU, never twice, never booted again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import live_processes, procurator_process, run_cli
from testnames import free_port

from procurator.cli.exits import EXIT_FAILED, EXIT_OK
from procurator.lab import build_test_image
from procurator.worker.state import StateDir
from procurator.worker.vmrecord import MOVED_OUT_FILE

pytestmark = [pytest.mark.slow, pytest.mark.root, pytest.mark.nix]

READY = "PROCURATOR-READY"


@pytest.fixture(scope="module")
def image() -> str:
    return build_test_image("--argstr", "name", "live-move-vm")


def _worker(worker_id: str, state: Path) -> list[str]:
    return [
        "worker",
        "--id",
        worker_id,
        "--state-dir",
        str(state),
        "--driver",
        "qemu",
        "--qemu-accel",
        "tcg",
        "--no-network",
        "--resync-interval",
        "1",
        "--stop-grace",
        "10",
        "--metrics-listen",
        "",
        "--transfer-listen",
        "127.0.0.1:0",
    ]


def _qemu_pids(state: Path) -> list[int]:
    needle = f"{state}/vms/".encode()
    return [p for p, cmdline in live_processes() if b"qemu-system" in cmdline and needle in cmdline]


def _serial(state: Path) -> str:
    path = StateDir(state).paths("web-1").serial_file
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(what: str, condition: Callable[[], bool], logs: list[Path], timeout: float) -> None:
    """Poll ``condition``; ``timeout`` is a hang guard, not a measurement."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p.name}:\n{p.read_text()[-3000:]}" for p in logs if p.exists())
            raise AssertionError(f"timed out waiting for {what}\n{tails}")
        time.sleep(0.2)


class _Cluster:
    """A master and the two QEMU workers, as processes; ``kill9`` and
    ``restart`` a worker."""

    def __init__(self, stack: ExitStack, tmp_path: Path) -> None:
        master = f"127.0.0.1:{free_port()}"
        nix_conf = os.environ.get("NIX_CONF_DIR", "/var/cache/procurator/test-image/nix-conf")
        self.env = {**os.environ, "PROCURATOR_MASTER": master, "NIX_CONF_DIR": nix_conf}
        self.states = {w: tmp_path / w for w in ("host-a", "host-b")}
        self.logs = [tmp_path / f"{n}.log" for n in ("master", "host-a", "host-b")]
        args = ["master", "--listen", master, "--db", str(tmp_path / "m.db")]
        stack.enter_context(
            procurator_process([*args, "--metrics-listen", ""], self.env, self.logs[0])
        )
        # The workers' own stack, entered before the removal's callback: a
        # worker restarted later still ends after the VMs are removed.
        self._workers = stack.enter_context(ExitStack())
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        for worker_id in self.states:
            self.restart(worker_id)
        stack.callback(_remove_every_vm, self.env, tmp_path, self.states, self.logs)
        self.wait_for(
            "both workers to connect",
            lambda: (
                run_cli(self.env, "status").returncode == 0
                and {w["worker_id"] for w in self.status()["workers"] if w["connected"]}
                == {"host-a", "host-b"}
            ),
            60,
        )

    def restart(self, worker_id: str) -> None:
        log = self.logs[1 + list(self.states).index(worker_id)]
        args = _worker(worker_id, self.states[worker_id])
        self.workers[worker_id] = self._workers.enter_context(
            procurator_process(args, self.env, log)
        )

    def kill9(self, worker_id: str) -> None:
        """kill -9 of the worker process (its QEMUs live on)."""
        self.workers[worker_id].kill()
        self.workers[worker_id].wait()

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float) -> None:
        wait_for(what, condition, self.logs, timeout)

    def status(self) -> dict[str, Any]:
        result = run_cli(self.env, "status", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def running_on(self) -> dict[str, str]:
        return {
            vm["id"]: w["worker_id"]
            for w in self.status()["workers"]
            for vm in w["vms"]
            if vm["phase"] == "running"
        }

    def boot_on_a(self, image: str) -> None:
        """web-1 applied to host-a, its guest up."""
        fleet = self.states["host-a"].parent / "fleet.toml"
        fleet.write_text(
            f'[workers.host-a]\nvms = [{{ id = "web-1", image = "{image}", vcpus = 1, '
            "memory_mib = 256 }]\n"
        )
        result = run_cli(self.env, "apply", str(fleet), "--wait", "--timeout", "180")
        assert result.returncode == 0, result.stdout + result.stderr
        self.wait_for("the guest on host-a", lambda: READY in _serial(self.states["host-a"]), 120)

    def move_command(self, target: str = "host-b") -> list[str]:
        command = [sys.executable, "-m", "procurator", "move", "web-1", "--to", target]
        return [*command, "--live", "--wait", "--timeout", "180", "--json"]


def test_a_qemu_guest_moves_live_between_two_worker_processes(tmp_path: Path, image: str) -> None:
    with ExitStack() as stack:
        cluster = _Cluster(stack, tmp_path)
        states = cluster.states
        cluster.boot_on_a(image)
        started = time.monotonic()
        moved = subprocess.run(
            cluster.move_command(),
            env=cluster.env,
            capture_output=True,
            text=True,
            check=False,
        )
        took = time.monotonic() - started
        assert moved.returncode == 0, moved.stdout + moved.stderr
        phases = [json.loads(line)["phase"] for line in moved.stdout.splitlines()]
        # A phase shorter than the command's two reads may not print.
        assert phases[-1] == "done", phases
        print(f"\nlive move of a TCG guest between two worker processes: {took:.2f} s in all")
        cluster.wait_for(
            "web-1 running on host-b", lambda: cluster.running_on() == {"web-1": "host-b"}, 60
        )
        cluster.wait_for("host-a's QEMU to go", lambda: not _qemu_pids(states["host-a"]), 60)
        assert len(_qemu_pids(states["host-b"])) == 1
        # Migrated, not booted again: host-b's serial log began with the move.
        assert READY not in _serial(states["host-b"])


def test_a_source_worker_killed_mid_migration_leaves_the_guest_running_once(
    tmp_path: Path, image: str
) -> None:
    """kill -9 of the source worker once it began migrating (its mark
    written, not yet sent), and a new worker started in its place: the move
    ends done or failed (never stuck), and the guest runs on in exactly one
    QEMU, never booted again: on the target migrated (its serial log starts
    with the move), or on the source in the same QEMU process. The kill
    lands anywhere from the mark to just before "sent". Seen here: right
    after the mark (QEMU not yet asked: the restarted worker finds nothing
    to undo, migrates again, and the move ends done), and after QEMU
    completed the migration (the worst window, the target holding the
    whole state: the restarted worker undoes it, ``abandon_migration``,
    its retry finds the target's listener closed, and the move ends
    failed). The outcome is printed."""
    with ExitStack() as stack:
        cluster = _Cluster(stack, tmp_path)
        states = cluster.states
        cluster.boot_on_a(image)
        source, target = "host-a", "host-b"
        for _ in range(3):
            (source_qemu,) = _qemu_pids(states[source])
            boots = _serial(states[source]).count(READY)
            move = subprocess.Popen(
                cluster.move_command(target),
                env=cluster.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            stack.callback(_ended, move)
            # The source's mark, written as its supervisor begins to
            # migrate (not yet sent): the kill lands in the migration. A
            # move that got past it between two looks (done: the mark went
            # with the VM's directory) is tried again the other way.
            mark = states[source] / "vms" / "web-1" / MOVED_OUT_FILE
            if _caught(mark, move):
                break
            out, errors = move.communicate(timeout=300)
            assert move.returncode == EXIT_OK, out + errors
            cluster.wait_for(
                f"web-1 running on {target}",
                lambda t=target: cluster.running_on() == {"web-1": t},
                60,
            )
            cluster.wait_for(
                f"{source}'s QEMU to go", lambda s=source: not _qemu_pids(states[s]), 60
            )
            source, target = target, source
        else:
            raise AssertionError("three moves went past the source's mark between two looks")
        cluster.kill9(source)
        cluster.restart(source)
        out, errors = move.communicate(timeout=300)  # a hang guard: --timeout 180 ends it
        assert move.returncode in (EXIT_OK, EXIT_FAILED), out + errors
        assert out, errors
        outcome = json.loads(out.splitlines()[-1])["phase"]
        assert outcome == ("done" if move.returncode == EXIT_OK else "failed"), out
        where, other = (target, source) if outcome == "done" else (source, target)
        cluster.wait_for(
            f"web-1 running on {where} alone",
            lambda: cluster.running_on() == {"web-1": where},
            120,
        )
        cluster.wait_for(f"{other}'s QEMU to go", lambda: not _qemu_pids(states[other]), 60)
        if outcome == "done":  # migrated: its serial log begins with the move
            assert len(_qemu_pids(states[where])) == 1
            assert READY not in _serial(states[where])
        else:  # the same QEMU ran on, not booted again
            assert _qemu_pids(states[where]) == [source_qemu]
            assert _serial(states[where]).count(READY) == boots
        print(f"\nsource worker killed while migrating: the move ended {outcome}")


def _caught(mark: Path, move: subprocess.Popen[str]) -> bool:
    """Look at ``mark`` every few ms until it says migrating (True) or the
    move ended first (False)."""
    deadline = time.monotonic() + 120  # a hang guard
    while not _not_sent(mark):
        if move.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the source never began migrating"
        time.sleep(0.002)
    return True


def _not_sent(mark: Path) -> bool:
    """Whether the live move's mark says migrating, not yet sent."""
    try:
        return json.loads(mark.read_text()).get("sent") is False
    except (OSError, ValueError):
        return False  # not there yet, or being written


def _ended(proc: subprocess.Popen[str]) -> None:
    """The command ended and its pipes closed, whatever became of it."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _remove_every_vm(
    env: dict[str, str], tmp_path: Path, states: dict[str, Path], logs: list[Path]
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("[workers.host-a]\nvms = []\n[workers.host-b]\nvms = []\n")
    result = subprocess.run(
        [sys.executable, "-m", "procurator", "apply", str(empty), "--wait", "--timeout", "120"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for state in states.values():
        wait_for("the QEMUs to stop", lambda s=state: not _qemu_pids(s), logs, 60)
