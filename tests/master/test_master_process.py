"""The master as a real process: the CLI, restarts, and a client that knows
nothing but the schema file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from fleethelpers import run_cli
from testnames import free_port

from procurator.core.models import Assignment, WorkerInfo
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import CapnpMasterDialer
from procurator.worker.link import LinkSettings, MasterLink

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "schema" / "procurator.capnp"
IMAGE = "/nix/store/" + "a" * 32 + "-web-vm"
IMAGE2 = "/nix/store/" + "b" * 32 + "-web-vm"


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli({**os.environ, **(env or {})}, *args, timeout=60)


async def acli(*args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: cli(*args))


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"master exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise AssertionError(f"master did not listen on {port}: {log.read_text()}")


@contextmanager
def master_process(db: Path, port: int, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "procurator",
                "master",
                "--listen",
                f"127.0.0.1:{port}",
                "--db",
                str(db),
                "--log-level",
                "debug",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(port, proc, log)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def write_fleet(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path


def test_help_of_every_subcommand_explains_with_an_example() -> None:
    for command in ("master", "worker", "apply", "status"):
        result = cli(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "example:" in result.stdout
        assert f"procurator {command}" in result.stdout


def test_cli_apply_status_and_invalid_files(tmp_path: Path) -> None:
    port = free_port()
    master = f"127.0.0.1:{port}"
    with master_process(tmp_path / "m.db", port, tmp_path / "master.log") as proc:
        good = write_fleet(
            tmp_path / "fleet.toml",
            f"""\
            [workers.host-a]
            vms = [ {{ id = "web-1", image = "{IMAGE}" }},
                    {{ id = "web-2", image = "{IMAGE2}", power = "stopped" }} ]
            """,
        )
        dry = cli("apply", str(good), "--dry-run", "--master", master)
        assert dry.returncode == 0, dry.stderr
        assert "dry run: would change 1 worker(s)" in dry.stdout
        applied = cli("apply", str(good), "--master", master)
        assert applied.returncode == 0, applied.stderr
        assert "applied as generation 1" in applied.stdout
        assert "added:    web-1, web-2" in applied.stdout

        bad = write_fleet(
            tmp_path / "bad.toml",
            f"""\
            [workers.host-a]
            vms = [
              {{ id = "web-1", image = "{IMAGE}" }},
              {{ id = "Bad_Id", image = "/nix/store/short-x" }},
            ]
            """,
        )
        refused = cli("apply", str(bad), "--master", master)
        assert refused.returncode == 1
        assert f"{bad}:4: workers.host-a.vms[1].id" in refused.stderr
        assert "workers.host-a.vms[1].image" in refused.stderr
        assert "nothing was applied" in refused.stderr

        broken = tmp_path / "broken.json"
        broken.write_text('{"workers": {"host-a": {"vms": [}}}\n')
        refused_json = cli("apply", str(broken), "--master", master)
        assert refused_json.returncode == 1
        assert "broken.json:1: not valid JSON" in refused_json.stderr

        stale = cli("apply", str(good), "--expect-generation", "0", "--master", master)
        assert stale.returncode == 1
        assert "generation" in stale.stderr

        status = cli("status", "--json", "--master", master)
        assert status.returncode == 0, status.stderr
        data = json.loads(status.stdout)
        assert data["generation"] == 1
        (worker,) = data["workers"]
        assert (worker["worker_id"], worker["connected"], worker["vm_count"]) == (
            "host-a",
            False,
            2,
        )
        text = cli("status", env={"PROCURATOR_MASTER": master})
        assert text.returncode == 0, text.stderr
        assert "host-a" in text.stdout and "never connected" in text.stdout
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_cli_reports_an_unreachable_master(tmp_path: Path) -> None:
    good = write_fleet(tmp_path / "f.json", json.dumps({"workers": {}}))
    result = cli("apply", str(good), "--master", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot" in result.stderr or "refused" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_a_master_refused_plaintext_off_loopback_touches_nothing(tmp_path: Path) -> None:
    db = tmp_path / "x.db"
    result = cli("master", "--listen", "0.0.0.0:0", "--db", str(db), "--metrics-listen", "")
    assert result.returncode == 1, result.stderr
    assert "refusing plaintext" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no x.db, no x.db.lock


async def test_worker_reconnects_after_the_master_process_restarts(tmp_path: Path) -> None:
    port = free_port()
    db, log = tmp_path / "m.db", tmp_path / "master.log"
    fleet = write_fleet(
        tmp_path / "fleet.toml",
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{IMAGE}" }} ]\n',
    )
    received: list[Assignment] = []

    async def on_assignment(assignment: Assignment) -> None:
        received.append(assignment)

    settings = LinkSettings(
        resync_interval=0.5, call_timeout=5, backoff_initial=0.05, backoff_max=0.5
    )
    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        link = MasterLink(
            CapnpMasterDialer(bridge, f"127.0.0.1:{port}"),
            WorkerInfo("host-a"),
            on_assignment,
            settings=settings,
        )
        await nursery.start(link.run)  # ready before any master exists
        with master_process(db, port, log):
            with trio.fail_after(30):
                await link.wait_connected()
            assert (
                await acli("apply", str(fleet), "--master", f"127.0.0.1:{port}")
            ).returncode == 0
            with trio.fail_after(30):
                while not received:
                    await trio.sleep(0.02)
        # Killed (SIGKILL, by the context manager): the worker notices.
        with trio.fail_after(30):
            while link.connected:
                await trio.sleep(0.02)
        connects = link.connects
        with master_process(db, port, log):
            with trio.fail_after(30):
                while link.connects == connects or not link.connected:
                    await trio.sleep(0.02)
            fleet.write_text(
                f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{IMAGE2}" }} ]\n'
            )
            result = await acli("apply", str(fleet), "--master", f"127.0.0.1:{port}")
            assert result.returncode == 0, result.stderr
            assert "applied as generation 2" in result.stdout  # continued after restart
            with trio.fail_after(30):
                while received[-1].generation < 2:
                    await trio.sleep(0.02)
        assert received[-1].vms[0].nix_store_path == IMAGE2
        nursery.cancel_scope.cancel()


PLAIN_CLIENT = """
import asyncio, json, sys
import capnp

schema = capnp.load(sys.argv[1])
host, port = sys.argv[2].rsplit(":", 1)

async def main():
    stream = await capnp.AsyncIoStream.create_connection(host, int(port))
    client = capnp.TwoPartyClient(stream)
    master = client.bootstrap().cast_as(schema.Master)
    control = (await master.control()).result.control
    request = control.apply_request()
    workers = request.fleet.init("workers", 1)
    workers[0].workerId = "host-p"
    vms = workers[0].init("vms", 1)
    vms[0].id = "plain-1"
    vms[0].hash = "h1"
    vms[0].nixStorePath = sys.argv[3]
    request.dryRun = False
    result = (await request.send()).result
    assert result.which() == "ok", result
    bad = control.apply_request()
    bad.fleet.init("workers", 1)[0].workerId = "Not A Worker"
    refused = (await bad.send()).result
    status = (await control.status()).status
    print(json.dumps({
        "generation": result.ok.generation,
        "added": list(result.ok.diffs[0].added),
        "refused": str(refused.error.code),
        "status_generation": status.generation,
        "workers": [w.workerId for w in status.workers],
    }))

asyncio.run(capnp.run(main()))
"""


def test_a_plain_pycapnp_client_can_apply_and_read_status(tmp_path: Path) -> None:
    port = free_port()
    with master_process(tmp_path / "m.db", port, tmp_path / "master.log"):
        script = tmp_path / "client.py"
        script.write_text(PLAIN_CLIENT)
        result = subprocess.run(
            [sys.executable, str(script), str(SCHEMA), f"127.0.0.1:{port}", IMAGE],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        data = json.loads(result.stdout)
        assert data == {
            "generation": 1,
            "added": ["plain-1"],
            "refused": "invalid",
            "status_generation": 1,
            "workers": ["host-p"],
        }


@pytest.mark.parametrize("name", ["procurator.capnp"])
def test_schema_file_is_where_the_package_expects_it(name: str) -> None:
    assert (REPO / "schema" / name).is_file()
