"""``apply --wait`` and ``status`` when the apply leaves a worker with nothing
to run: a disconnected worker is not waited for (exit 5 says it has not
confirmed stopping its VMs), and it is listed until it confirms.

A real master and a real worker with the fake VMM (``fake_fleet``: host-a),
and host-b: a second worker, in this process, whose link is real (Cap'n
Proto on a real socket) and whose handler only records its assignments
(``run_worker`` with no runtime), so stopping it leaves no
VMM behind."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import trio
from fleethelpers import AddImage, FakeFleet
from opshelpers import until_reader_gone, vm_config

from procurator.app.worker import WorkerConfig, run_worker
from procurator.worker.link import LinkSettings


class HostB:
    """A worker that can be started and stopped (its connection closes)."""

    def __init__(self, nursery: trio.Nursery, fleet: FakeFleet, state_dir: Path) -> None:
        self._nursery = nursery
        self._config = WorkerConfig(
            worker_id="host-b",
            runtime=None,
            master=fleet.env["PROCURATOR_MASTER"],
            state_dir=state_dir,
            link=LinkSettings(backoff_max=0.5),
        )
        self._scope: trio.CancelScope | None = None

    async def start(self) -> None:
        async def run(task_status: trio.TaskStatus[None]) -> None:
            with trio.CancelScope() as scope:
                self._scope = scope
                task_status.started()
                await run_worker(self._config)

        await self._nursery.start(run)

    def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()


async def cli(fleet: FakeFleet, *args: str) -> Any:
    return await trio.to_thread.run_sync(lambda: fleet.cli(*args))


async def apply(fleet: FakeFleet, text: str, *args: str) -> Any:
    return await trio.to_thread.run_sync(lambda: fleet.apply(text, *args))


async def workers(fleet: FakeFleet) -> dict[str, dict[str, Any]]:
    result = await cli(fleet, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {w["worker_id"]: w for w in json.loads(result.stdout)["workers"]}


async def until(what: str, condition: Any) -> None:
    with trio.fail_after(60):
        while not await condition():
            await trio.sleep(0.1)


async def test_wait_does_not_hang_on_a_gone_worker_and_status_shows_it_until_it_confirms(
    fake_fleet: FakeFleet, add_image: AddImage, tmp_path: Path
) -> None:
    image = add_image("web-vm", vm_config())
    both = (
        f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}" }} ]\n'
        f'[workers.host-b]\nvms = [ {{ id = "db-1", image = "{image}" }},'
        f' {{ id = "db-2", image = "{image}" }} ]\n'
    )
    async with trio.open_nursery() as nursery:
        host_b = HostB(nursery, fake_fleet, tmp_path / "host-b")
        await host_b.start()
        result = await apply(fake_fleet, both, "--wait", "--timeout", "60")
        assert result.returncode == 0, result.stdout + result.stderr

        # host-b goes away; the next apply drops it and changes host-a.
        host_b.stop()
        await until("host-b down", lambda: _down(fake_fleet, "host-b"))
        only_a = f'[workers.host-a]\nvms = [ {{ id = "web-2", image = "{image}" }} ]\n'
        result = await apply(fake_fleet, only_a, "--wait", "--timeout", "60")
        # Not a timeout: host-a converged, host-b is not waited for...
        assert result.returncode == 5, result.stdout + result.stderr
        assert "host-a: observed 2/2" in result.stdout
        assert "host-b: observed 1/2 (disconnected)" in result.stdout
        # ...and the message says what that means.
        assert "host-b: db-1, db-2 (removed by generation 2); it may still run them" in (
            result.stderr
        )
        # status keeps listing it, and says why.
        listed = await workers(fake_fleet)
        assert (listed["host-b"]["connected"], listed["host-b"]["vm_count"]) == (False, 0)
        text = await cli(fake_fleet, "status")
        assert "host-b: nothing left to run, but it has not confirmed stopping its VMs" in (
            text.stdout
        )

        # Back, it confirms; once gone again it is not listed any more.
        await host_b.start()
        await until("host-b's confirmation", lambda: _observed(fake_fleet, "host-b", 2))
        host_b.stop()
        await until("host-b unlisted", lambda: _unlisted(fake_fleet, "host-b"))
        text = await cli(fake_fleet, "status")
        assert "host-b" not in text.stdout
        nursery.cancel_scope.cancel()


async def test_wait_ends_when_its_reader_does(
    fake_fleet: FakeFleet, add_image: AddImage, tmp_path: Path
) -> None:
    """``apply --wait | sed /observed/q`` ends once sed does, while the
    worker it waits for is away: the reader takes every line up to the wait's
    first and leaves; the wait is a read and stops then (exit 141), though
    it has nothing more to print. The apply itself is stored whole."""
    image = add_image("web-vm", vm_config())
    one = f'[workers.host-b]\nvms = [ {{ id = "db-1", image = "{image}" }} ]\n'
    two = one.replace(" ]\n", f', {{ id = "db-2", image = "{image}" }} ]\n')
    (tmp_path / "two.toml").write_text(two)
    async with trio.open_nursery() as nursery:
        host_b = HostB(nursery, fake_fleet, tmp_path / "host-b")
        await host_b.start()
        result = await apply(fake_fleet, one, "--wait", "--timeout", "60")
        assert result.returncode == 0, result.stdout + result.stderr
        host_b.stop()
        await until("host-b down", lambda: _down(fake_fleet, "host-b"))
        lines = await trio.to_thread.run_sync(
            lambda: until_reader_gone(
                fake_fleet.env,
                "apply two.toml --wait --timeout 600",
                reader="sed /observed/q",
                cwd=tmp_path,
            )
        )
        assert "applied as generation 2" in lines[0], lines
        assert lines[-2] == "  host-b: observed 1/2 (disconnected) [pending=1]", lines
        assert lines[-1] == "procurator exited 141", lines
        assert (await workers(fake_fleet))["host-b"]["desired_generation"] == 2
        nursery.cancel_scope.cancel()


async def _down(fleet: FakeFleet, worker_id: str) -> bool:
    return not (await workers(fleet))[worker_id]["connected"]


async def _observed(fleet: FakeFleet, worker_id: str, generation: int) -> bool:
    return (await workers(fleet))[worker_id]["observed_generation"] == generation


async def _unlisted(fleet: FakeFleet, worker_id: str) -> bool:
    return worker_id not in await workers(fleet)
