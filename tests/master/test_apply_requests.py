"""Request ids make a retried apply safe: a request the master committed is
answered with that apply's result (``replayed``), never applied again, also
after the master died between the commit and the answer."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from masterhelpers import DiesAfterCommit, RestartableService, WallClock

from procurator.core.errors import StaleGenerationError, ValidationError
from procurator.core.models import Fleet, WorkerDiff
from procurator.master.service import MasterService
from procurator.rpc.bridge import Bridge

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[RestartableService]:
    async with trio.open_nursery() as nursery:
        running = RestartableService(nursery, tmp_path / "m.db", WallClock())
        await running.start()
        yield running
        nursery.cancel_scope.cancel()


def desired(service: MasterService) -> dict[str, list[str]]:
    return {w: [vm.id for vm in a.vms] for w, a in service._assignments.items() if a.vms}


async def test_a_retried_request_gets_its_first_result_and_applies_nothing(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    assert master.service is not None
    service = master.service
    mine = fleet_of({"host-a": [("web-1", "a")]})
    first = await service.apply(mine, expected_generation=0, request_id="req-1")
    theirs = await service.apply(fleet_of({"host-a": [("web-2", "b")]}))
    # The retry (same id, same fleet, same expected generation) is neither
    # stale nor applied over the newer fleet: it is the first answer again.
    again = await service.apply(mine, expected_generation=0, request_id="req-1")
    assert again.replayed and not first.replayed
    assert (again.generation, again.op_id, again.diffs) == (
        first.generation,
        first.op_id,
        first.diffs,
    )
    assert again.changed and not again.dry_run
    assert service.generation == theirs.generation
    assert desired(service) == {"host-a": ["web-2"]}
    # A dry run with the id tells whether it was applied, and changes nothing.
    dry = await service.apply(mine, dry_run=True, request_id="req-1")
    assert dry.replayed and dry.generation == first.generation
    # Without the id, the same fleet is a new apply (here: a stale one).
    with pytest.raises(StaleGenerationError):
        await service.apply(mine, expected_generation=0)
    # The id with another fleet is a client's mistake: refused, nothing applied.
    with pytest.raises(ValidationError, match="req-1 was used already, for another fleet"):
        await service.apply(fleet_of({"host-a": [("web-3", "c")]}), request_id="req-1")
    with pytest.raises(ValidationError, match="request id: 'no spaces' is not"):
        await service.apply(mine, request_id="no spaces")
    with pytest.raises(ValidationError, match="request id"):
        await service.apply(mine, request_id="x" * 65)
    # A no-op records nothing: the id is free for the next apply.
    noop = await service.apply(fleet_of({"host-a": [("web-2", "b")]}), request_id="req-2")
    assert not noop.changed and not noop.replayed
    applied = await service.apply(mine, request_id="req-2")
    assert applied.changed and not applied.replayed
    assert service.generation == theirs.generation + 1


async def test_a_request_committed_before_the_master_died_is_replayed_after_a_restart(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    await master.stop()
    service = await master.start(DiesAfterCommit)
    fleet = fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")]})
    async with trio.open_nursery() as nursery:
        # The client's call: it never gets an answer.
        nursery.start_soon(lambda: service.apply(fleet, op_id="op-first", request_id="req-lost"))
        await dying(master).committed.wait()
        nursery.cancel_scope.cancel()
    service = await master.restart()
    retried = await service.apply(fleet, expected_generation=0, request_id="req-lost")
    assert retried.replayed
    assert (retried.generation, retried.op_id) == (1, "op-first")
    assert sorted(d.worker_id for d in retried.diffs) == ["host-a", "host-b"]
    assert retried.diffs[0] == WorkerDiff("host-a", added=("web-1",))
    assert service.generation == 1  # applied once


def dying(master: RestartableService) -> DiesAfterCommit:
    assert isinstance(master.store, DiesAfterCommit)
    return master.store


# ------------------------------------------------------------ the CLI

Answer = tuple[int, str, str]  # exit status, stdout, stderr


async def run_cli(*args: str) -> Answer:
    done = await trio.run_process(
        [sys.executable, "-m", "procurator", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.fixture
async def served(bridge: Bridge, tmp_path: Path) -> AsyncIterator[RestartableService]:
    """A master on a real socket, not started yet."""
    async with trio.open_nursery() as nursery:
        yield RestartableService(nursery, tmp_path / "m.db", WallClock(), bridge=bridge)
        nursery.cancel_scope.cancel()


@pytest.fixture
def fleet_file(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.toml"
    path.write_text(
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "/nix/store/{"a" * 32}-vm" }} ]\n'
    )
    return path


async def apply_losing_the_answer(master: RestartableService, *args: str) -> list[Answer]:
    """Run ``procurator apply *args`` against ``master``, which dies right
    after it committed that apply; return once it is stopped. The list gets
    the CLI's answer when it ends."""
    await master.start(DiesAfterCommit)
    answers: list[Answer] = []

    async def apply() -> None:
        answers.append(await run_cli("apply", *args, "--master", master.listen))

    master.nursery.start_soon(apply)
    with trio.fail_after(60):
        while not dying(master).committed.is_set():
            assert not answers, f"the CLI ended before the master committed: {answers}"
            await trio.sleep(0.02)
    await master.stop()  # its connections close: the CLI's request is unanswered
    return answers


async def answer(answers: list[Answer]) -> Answer:
    with trio.fail_after(60):
        while not answers:
            await trio.sleep(0.05)
    return answers[0]


async def test_the_cli_retries_a_lost_apply_and_gets_its_first_result(
    served: RestartableService, fleet_file: Path
) -> None:
    answers = await apply_losing_the_answer(served, str(fleet_file))
    service = await served.start()  # back, on the same port and database
    code, out, err = await answer(answers)
    assert code == 0, out + err
    assert f"lost the master at {served.address} after sending request req-" in err
    assert "applied as generation 1 (op op-" in out
    assert "had been applied already, as generation 1" in out
    assert "nothing was applied again" in out
    assert service.generation == 1


async def test_the_cli_says_when_the_outcome_is_unknown_and_how_to_find_it_out(
    served: RestartableService, fleet_file: Path
) -> None:
    path, master = fleet_file, served
    # The master stays away longer than --retry-for.
    answers = await apply_losing_the_answer(master, str(path), "--retry-for", "1")
    code, out, err = await answer(answers)
    assert code == 6, out + err
    assert "the outcome is unknown" in err
    match = re.search(r"request (req-[0-9a-f]+)", err)
    assert match is not None, err
    request_id = match.group(1)
    address = master.listen
    check = f"procurator apply {path} --request-id {request_id} --master {address} --dry-run"
    assert check in err

    # The commands it suggests, once the master is back.
    service = await master.start()
    code, out, err = await run_cli(*check.split()[1:])
    assert code == 0, out + err
    assert f"request {request_id} had been applied already, as generation 1" in out
    code, out, err = await run_cli(
        "apply", str(path), "--request-id", request_id, "--master", address
    )
    assert code == 0 and "nothing was applied again" in out, out + err
    assert service.generation == 1
    # A request that never was: the dry run says so.
    code, out, err = await run_cli(
        "apply", str(path), "--request-id", "req-never", "--dry-run", "--master", address
    )
    assert code == 0 and "request req-never has not been applied" in out, out + err
