"""Rollouts over the wire: a fleet's [rollout] settings reach the master
whole, ``apply`` answers the rollout's id, an apply during it is refused
unless ``supersede``, and ``Control.rollout`` shows and acts on it — a
real in-process master on a real socket, a plain control client, and the
``procurator rollout`` command as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from rpcfixtures import RunningMaster

from procurator.core.errors import NotFoundError, ValidationError
from procurator.core.fleet import parse_fleet
from procurator.core.rollout import RolloutAction
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import ControlClient, open_control
from procurator.rpc.convert import fill_fleet, fleet_from_reader
from procurator.rpc.schema import load_schema

OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"
NEWER = "/nix/store/" + "c" * 32 + "-web"


def fleet_text(path: str) -> str:
    return (
        f'[workers.w0]\nvms = [ {{ id = "web-1", image = "{path}" }}, '
        f'{{ id = "web-2", image = "{path}", rollout = {{ max_parallel = 2 }} }} ]\n'
        "[rollout]\nhealth = { http = '/up', port = 80 }\nmin_healthy_time = 1\n"
    )


def test_the_settings_cross_the_wire_whole() -> None:
    fleet = parse_fleet(
        fleet_text(OLD)
        + "[rollout.groups.db]\ncanary = 1\n"
        + f'[[vms]]\nid = "db-1"\nimage = "{OLD}"\nvcpus = 1\nmemory_mib = 256\nspread = "db"\n'
    )
    message = load_schema().Fleet.new_message()
    fill_fleet(message, fleet)
    assert fleet_from_reader(message.as_reader()) == fleet
    # A fleet without [rollout] stays without.
    bare = parse_fleet(f'[workers.w0]\nvms = [ {{ id = "web-1", image = "{OLD}" }} ]\n')
    message = load_schema().Fleet.new_message()
    fill_fleet(message, bare)
    assert fleet_from_reader(message.as_reader()).rollout is None


async def procurator(master: RunningMaster, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "procurator", *args, "--master", str(master.address)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def wait_over(control: ControlClient, rollout_id: str) -> str:
    with trio.fail_after(30):  # a hang guard: the leader steps every second
        while (shown := await control.rollout(rollout_id)).phase not in (
            "done",
            "failed",
            "reverted",
        ):
            await trio.sleep(0.05)
    return shown.phase


async def test_a_rollout_is_shown_paused_undone_and_superseded(
    master: RunningMaster, bridge: Bridge, tmp_path: Path
) -> None:
    assert master.address is not None
    async with open_control(bridge, master.address) as control:
        with pytest.raises(NotFoundError, match="no rollout yet"):
            await control.rollout()
        first = await control.apply(parse_fleet(fleet_text(OLD)))
        assert first.rollout_id == ""  # nothing replaced: no rollout
        second = await control.apply(parse_fleet(fleet_text(NEW)))
        assert second.rollout_id == "ro-" + second.op_id.removeprefix("op-")
        shown = await control.rollout()
        assert (shown.id, shown.op_id, shown.phase) == (
            second.rollout_id,
            second.op_id,
            "preparing",
        )
        assert [vm.vm_id for vm in shown.vms] == ["web-1", "web-2"]
        assert (shown.prepared_workers, shown.prepare_workers) == (0, 1)
        with pytest.raises(ValidationError, match=f"rollout {second.rollout_id} .* is under way"):
            await control.apply(parse_fleet(fleet_text(NEWER)))

        cli = await procurator(master, "rollout", "pause", "--json")
        assert cli.returncode == 0, cli.stderr
        paused = json.loads(cli.stdout)
        assert paused["paused"] and paused["id"] == second.rollout_id
        assert paused["message"].startswith(f"rollout {second.rollout_id} paused")
        again = await control.rollout(second.rollout_id, RolloutAction.PAUSE)
        assert again.message == f"rollout {second.rollout_id}: nothing changed (preparing)"

        cli = await procurator(master, "rollout", "undo", second.rollout_id)
        assert cli.returncode == 0, cli.stderr
        assert b"reverting: its touched VMs go back to their previous images" in cli.stdout
        # Nothing was touched yet: reverted at the leader's next step.
        assert await wait_over(control, second.rollout_id) == "reverted"

        # Over: applies go again; a new rollout is superseded by --supersede.
        third = await control.apply(parse_fleet(fleet_text(NEWER)))
        assert third.rollout_id
        path = tmp_path / "fleet.toml"
        path.write_text(fleet_text(NEW))
        refused = await procurator(master, "apply", str(path))
        assert refused.returncode == 1
        assert b"is under way" in refused.stderr and b"--supersede" in refused.stderr
        cli = await procurator(master, "apply", str(path), "--supersede")
        assert cli.returncode == 0, cli.stderr
        ended = await control.rollout(third.rollout_id)
        assert ended.phase == "failed"
        assert ended.reason.startswith("superseded by apply op-")
        fourth = await control.rollout()
        assert fourth.id != third.rollout_id
        assert f"rollout {fourth.id}: the replaced VMs switch".encode() in cli.stdout
        status = await procurator(master, "rollout", "status")
        assert status.returncode == 0, status.stderr
        assert f"rollout {fourth.id} (apply {fourth.op_id}): preparing".encode() in status.stdout
        assert b"prepared 0/1 workers" in status.stdout
