"""Operation ids end to end, events and ``describe``, through real master
and worker processes (fake cloud-hypervisor, real Nix store paths).

The master logs text lines and the worker JSON lines: one substring search
for the op id across both files must find the whole rollout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from fleethelpers import AddImage, FakeFleet, read_lines
from opshelpers import vm_config

pytestmark = [pytest.mark.root, pytest.mark.nix]


def _one_vm(vm_id: str, image: str, power: str = "running") -> str:
    return (
        f'[workers.host-a]\nvms = [ {{ id = "{vm_id}", image = "{image}", power = "{power}" }} ]\n'
    )


def _grep(path: Any, needle: str) -> list[str]:
    return [line for line in path.read_text().splitlines() if needle in line]


def test_one_grep_of_the_op_id_tells_the_rollout(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    image = add_image("story-vm", vm_config())
    op = fake_fleet.apply_ok(_one_vm("web-1", image))

    # The master: the apply, the push, the worker's events, convergence —
    # text lines, the op id both in the message and in the fields. The
    # events are waited for: a combined report stores (and logs) them after
    # the status that ended `apply --wait`.
    steps = (
        "applied " + op,
        "worker host-a: added web-1",
        "pushed generation 1 to worker host-a",
        "VM web-1 created",
        "VM web-1 booted",
        "worker host-a converged to generation 1",
    )
    fake_fleet.wait_for(
        "web-1's events in the master's log",
        lambda: "VM web-1 booted" in "\n".join(_grep(fake_fleet.master_log, op)),
    )
    master = "\n".join(_grep(fake_fleet.master_log, op))
    for step in steps:
        assert step in master, f"{step!r} not in:\n{master}"
    assert f"[op_id={op}" in master

    # The worker: receipt, the reconciler's action, the actuator's steps and
    # the VM's supervisor's turns (worker/supervisor.py) — JSON lines with the
    # same fields.
    lines = _grep(fake_fleet.worker_log, op)
    records = [json.loads(line) for line in lines]
    assert all(r["op_id"] == op and r["worker_id"] == "host-a" for r in records)
    by_logger: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_logger.setdefault(record["logger"], []).append(record)
    for logger in (
        "procurator.worker.link",
        "procurator.core.reconcile",
        "procurator.worker.actuator",
        "procurator.worker.supervisor",
    ):
        assert logger in by_logger, f"{logger} logged nothing with {op}:\n" + "\n".join(lines)
    assert by_logger["procurator.worker.link"][0]["generation"] == 1
    assert all(r["vm_id"] == "web-1" for r in by_logger["procurator.worker.supervisor"])
    assert any("booted" in r["message"] for r in by_logger["procurator.worker.supervisor"])

    # describe: desired vs observed, and the events with their op id.
    described = fake_fleet.describe("web-1")
    assert described["desired_op_id"] == op
    assert described["observed"]["op_id"] == op
    assert described["desired"]["hash"] == described["observed"]["hash"]
    assert described["worker_id"] == described["observed_by"] == "host-a"
    assert described["worker_connected"] is True
    assert [e["kind"] for e in described["events"]] == ["created", "booted"]
    assert {e["op_id"] for e in described["events"]} == {op}
    text = fake_fleet.cli("describe", "vm", "web-1")
    assert text.returncode == 0 and op in text.stdout and "booted" in text.stdout

    # A second apply is a second story: its power change carries its own id.
    pause_op = fake_fleet.apply_ok(_one_vm("web-1", image, "paused"))
    assert pause_op != op
    assert any("web-1: paused" in line for line in _grep(fake_fleet.worker_log, pause_op))
    fake_fleet.wait_for(
        "web-1's paused event in the master's log",
        lambda: any("VM web-1 paused" in line for line in _grep(fake_fleet.master_log, pause_op)),
    )


def test_a_refused_apply_carries_its_op_id(fake_fleet: FakeFleet, add_image: AddImage) -> None:
    image = add_image("refused-vm", vm_config())
    result = fake_fleet.apply(_one_vm("web-1", image), "--expect-generation", "41")
    assert result.returncode == 1
    assert "expected generation 41" in result.stderr
    op = result.stderr.rsplit("(op ", 1)[1].split(")", 1)[0]
    assert op.startswith("op-")
    (line,) = _grep(fake_fleet.master_log, f"apply {op} refused")
    assert f"op_id={op}" in line


def test_describe_of_an_unknown_vm_is_not_found(fake_fleet: FakeFleet) -> None:
    result = fake_fleet.cli("describe", "vm", "nobody")
    assert result.returncode == 1
    assert "'nobody' is neither desired nor reported" in result.stderr


def test_events_follow_streams_new_events_and_failures_name_the_reason(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    follower = subprocess.Popen(
        [sys.executable, "-m", "procurator", "events", "--follow", "--json", "--interval", "0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=fake_fleet.env,
    )
    try:
        good = add_image("follow-vm", vm_config())
        # A hostile image: refused before any VMM runs, reported as an event.
        evil = add_image("evil-vm", {**vm_config(), "disks": [{"path": "/etc/shadow"}]})
        fleet = (
            f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{good}" }},'
            f' {{ id = "evil", image = "{evil}" }} ]\n'
        )
        result = fake_fleet.apply(fleet, "--wait", "--timeout", "60")
        assert result.returncode == 4, result.stdout + result.stderr
        op = result.stdout.split("(op ", 1)[1].split(")", 1)[0]
        lines = read_lines(follower, 3, timeout=30).decode().splitlines()[:3]
    finally:
        follower.terminate()
        follower.wait(timeout=30)
        assert follower.stdout is not None
        follower.stdout.close()
    events = [json.loads(line) for line in lines]
    assert sorted((e["vm_id"], e["kind"]) for e in events) == [
        ("evil", "failed"),
        ("web-1", "booted"),
        ("web-1", "created"),
    ]
    assert {e["op_id"] for e in events} == {op}
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 3
    (failed,) = [e for e in events if e["kind"] == "failed"]
    assert "/etc/shadow" in failed["message"]

    described = fake_fleet.describe("evil")
    assert described["observed"]["phase"] == "failed"
    assert "/etc/shadow" in described["last_error"]
    # Once, not on every pass of the reconciler.
    assert [e["kind"] for e in described["events"]] == ["failed"]

    listed = fake_fleet.cli("events", "--vm", "web-1")
    assert listed.returncode == 0
    assert [line.split()[4] for line in listed.stdout.splitlines()] == ["created", "booted"]


def test_a_crash_is_told_with_its_backoff_and_restart(
    fake_fleet: FakeFleet, add_image: AddImage
) -> None:
    image = add_image("crash-vm", vm_config())
    op = fake_fleet.apply_ok(_one_vm("web-1", image))
    pid = fake_fleet.vmm_pid("web-1")
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    def restarted() -> bool:
        kinds = [e["kind"] for e in fake_fleet.describe("web-1")["events"]]
        return "restarted" in kinds

    fake_fleet.wait_for("the VM to be restarted", restarted)
    described = fake_fleet.describe("web-1")
    events = {e["kind"]: e for e in described["events"]}
    assert "restart in 1 s" in events["crashed"]["message"]
    assert "restarted after 1 s of backoff" in events["restarted"]["message"]
    # The restart serves the spec of the last apply: it carries its op id.
    assert events["crashed"]["op_id"] == events["restarted"]["op_id"] == op
    assert "crashed" in described["last_error"]
    fake_fleet.wait_for(
        "the restart to show", lambda: fake_fleet.status_vms()["web-1"]["restarts"] == 1
    )
