"""Several masters, from the side of those who dial them: the address
list (``--master a,b,c``, ``$PROCURATOR_MASTER``), a worker's failover
dialer, the CLI skipping a master that does not answer; and moving a
fleet between databases (``procurator master migrate / export / import``).

Real sockets and real ``procurator`` processes where the CLI is tested; the
failover dialer over fakes of the ``MasterDialer`` port."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import run_cli
from rpcfixtures import RunningMaster
from testnames import free_port

from procurator.app.masters import master_addresses
from procurator.core.errors import UnavailableError, ValidationError
from procurator.core.models import Assignment, WorkerInfo
from procurator.rpc.address import Address
from procurator.worker.link import FailoverDialer, OnAssignment

IMAGE = "/nix/store/" + "a" * 32 + "-web-vm"


def test_a_master_list_names_every_master_in_order() -> None:
    assert master_addresses("a:7300, b:7301,[::1]:7302,unix:/run/m.sock") == [
        Address("a", 7300),
        Address("b", 7301),
        Address("::1", 7302),
        Address(unix_path="/run/m.sock"),
    ]
    assert master_addresses("m") == [Address("m", 7300)]
    with pytest.raises(ValidationError, match="entry 2 is empty"):
        master_addresses("a:7300,,b:7300")
    with pytest.raises(ValidationError, match="a:7300 is given twice"):
        master_addresses("a:7300,a:7300")
    with pytest.raises(ValidationError, match=r"port must be 0\.\.65535"):
        master_addresses("a:7300,b:99999")
    with pytest.raises(ValidationError, match="no master address"):
        master_addresses(" , ")


class _Dialer:
    """A fake of the MasterDialer port: refuses, or hands out a session."""

    def __init__(self, name: str, up: bool) -> None:
        self.address = name
        self.up = up
        self.dialed = 0

    async def connect(self, info: WorkerInfo, on_push: OnAssignment) -> Any:
        self.dialed += 1
        if not self.up:
            raise UnavailableError(f"registering with the master at {self.address}: refused")
        return f"session with {self.address}"


async def _ignore(assignment: Assignment) -> None:
    return None


async def test_the_failover_dialer_tries_the_masters_in_turn() -> None:
    a, b, c = _Dialer("a", True), _Dialer("b", False), _Dialer("c", True)
    dialer = FailoverDialer([a, b, c])
    info = WorkerInfo("host-a")
    assert await dialer.connect(info, _ignore) == "session with a"
    # The session with a broke: the next attempt goes to the next master.
    with pytest.raises(UnavailableError, match="master at b"):
        await dialer.connect(info, _ignore)
    assert await dialer.connect(info, _ignore) == "session with c"
    a.up = False
    c.up = False
    for _ in range(3):  # every master down: each is tried, in turn
        with pytest.raises(UnavailableError):
            await dialer.connect(info, _ignore)
    assert (a.dialed, b.dialed, c.dialed) == (2, 2, 2)
    with pytest.raises(ValueError, match="at least one"):
        FailoverDialer([])


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli({**os.environ, **(env or {})}, *args, timeout=120)


async def test_the_cli_uses_the_first_master_that_answers(
    master: RunningMaster, tmp_path: Path
) -> None:
    import trio  # noqa: PLC0415

    dead = f"127.0.0.1:{free_port()}"
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{IMAGE}" }} ]\n')
    listed = f"{dead},{master.address}"
    applied = await trio.to_thread.run_sync(
        lambda: _cli("apply", str(fleet), env={"PROCURATOR_MASTER": listed})
    )
    assert applied.returncode == 0, applied.stderr
    assert f"using the master at {master.address} (1 did not answer: {dead}" in applied.stderr
    status = await trio.to_thread.run_sync(lambda: _cli("status", "--master", listed))
    assert status.returncode == 0 and "fleet generation 1" in status.stdout
    other = f"127.0.0.1:{free_port()}"
    down = await trio.to_thread.run_sync(lambda: _cli("status", "--master", f"{dead},{other}"))
    assert down.returncode == 1
    assert "none of the 2 masters answered" in down.stderr
    assert dead in down.stderr and other in down.stderr
    bad = await trio.to_thread.run_sync(lambda: _cli("status", "--master", f"{dead},,x"))
    assert bad.returncode == 1 and "entry 2 is empty" in bad.stderr


def test_a_fleet_moves_from_sqlite_to_postgresql(tmp_path: Path, pg_url: str) -> None:
    """export from the SQLite database of a stopped master, import into an
    empty PostgreSQL database, migrate again (a no-op): the same fleet at
    the same generation, and the apply log and request ids with it."""
    db = tmp_path / "m.db"
    port = free_port()
    env = {"PROCURATOR_MASTER": f"127.0.0.1:{port}"}
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{IMAGE}" }} ]\n')
    log = tmp_path / "master.log"
    for database in (str(db), pg_url):
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "procurator",
                    "master",
                    "--listen",
                    f"127.0.0.1:{port}",
                    "--database",
                    database,
                    "--metrics-listen",
                    "",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            from test_master_process import wait_listening  # noqa: PLC0415

            wait_listening(port, proc, log)  # type: ignore[arg-type]
            if database == str(db):
                first = _cli("apply", str(fleet), "--request-id", "req-move", env=env)
                assert first.returncode == 0, first.stderr
                # Locked by its master: stop it first.
                locked = _cli("master", "export", "--database", str(db))
                assert locked.returncode == 1 and "in use by another master" in locked.stderr
            else:
                again = _cli("apply", str(fleet), "--request-id", "req-move", env=env)
                assert again.returncode == 0, again.stderr
                assert "had been applied already, as generation 1" in again.stdout
                status = _cli("status", "--json", env=env)
                assert json.loads(status.stdout)["generation"] == 1
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        if database == str(db):
            exported = _cli(
                "master", "export", "--database", str(db), "-o", str(tmp_path / "f.json")
            )
            assert exported.returncode == 0, exported.stderr
            assert "exported generation 1: 1 worker(s), 1 VM(s), 1 apply(s)" in exported.stderr
            imported = _cli("master", "import", str(tmp_path / "f.json"), "--database", pg_url)
            assert imported.returncode == 0, imported.stderr
            assert "imported generation 1" in imported.stdout
            assert "secret" not in imported.stdout
            twice = _cli("master", "import", str(tmp_path / "f.json"), "--database", pg_url)
            assert twice.returncode == 1 and "is not empty" in twice.stderr
            migrated = _cli("master", "--database", pg_url, "migrate")
            assert migrated.returncode == 0 and "schema is up to date" in migrated.stdout
    garbage = tmp_path / "garbage.json"
    garbage.write_text(json.dumps({"format": "procurator-fleet-dump", "version": 1, "workers": 3}))
    refused = _cli("master", "import", str(garbage), "--database", str(tmp_path / "new.db"))
    assert refused.returncode == 1
    assert "garbage.json: workers: must be a list" in refused.stderr
