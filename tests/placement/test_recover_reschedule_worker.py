"""A worker started on a host whose VMMs died, before any master answers
(issue 27): the worker's own runtime (``ReconcilingHandler``, in process,
the fake VMM, no network, unconfined) holds one ``reschedule`` and one
``wait`` VM; the worker stops (its VMMs live on) and both VMMs are killed,
as a reboot would. A new worker on the same state dir, with no assignment
delivered (no master reachable), restarts the ``wait`` VM and leaves the
``reschedule`` one stopped: the master may have moved it. The assignment
that still names it then starts it.

Before recovery held reschedule VMs, the new worker restarted both, and a
moved VM ran on two workers until the assignment came."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from fleethelpers import FAKE, AddImage, add_image, nix_env

from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    Phase,
    PowerState,
    PreparedImage,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.core.validation import store_path_hash
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions
from procurator.worker.vmm import process

__all__ = ["add_image", "nix_env"]  # fixtures

pytestmark = [pytest.mark.root, pytest.mark.nix]

LIMIT = 60.0  # a hang guard only


class Link:
    """What the handler publishes, as a link would carry it to a master."""

    def __init__(self) -> None:
        self.vms: dict[str, VmStatus] = {}

    def publish_status(self, status: WorkerStatus) -> None:
        raise AssertionError("the reconciling worker publishes changes")

    def publish_status_changes(self, changes: StatusChanges) -> None:
        for vm in changes.changed:
            self.vms[vm.id] = vm
        for vm_id in changes.removed:
            self.vms.pop(vm_id, None)

    def publish_events(self, events: Sequence[VmEvent]) -> None:
        pass

    def publish_metrics(self, samples: Sequence[MetricSample]) -> None:
        pass

    def publish_prepared(self, prepared: tuple[PreparedImage, ...]) -> None:
        pass


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="prr-", dir="/tmp"))
    try:
        yield root
    finally:
        # A failed test may leave VMMs: their command lines name the dir.
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if str(root).encode() in (entry / "cmdline").read_bytes():
                        os.kill(int(entry.name), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)


def _config() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 64 << 20},
    }


def _handler(state_dir: Path) -> ReconcilingHandler:
    options = RuntimeOptions(
        driver="cloud-hypervisor",
        vmm_binary=sys.executable,
        vmm_args=(str(FAKE),),
        network=False,
        jail=None,
        stop_grace=2.0,
    )
    return ReconcilingHandler(
        worker_id="host-a", state_dir=state_dir, options=options, publisher=Link()
    )


def _link(handler: ReconcilingHandler) -> Link:
    link = handler._publisher
    assert isinstance(link, Link)
    return link


async def _until(what: str, condition: Any) -> None:
    with trio.move_on_after(LIMIT) as guard:
        while not condition():
            await trio.sleep(0.05)
    assert not guard.cancelled_caught, f"timed out waiting for {what}"


def _kill(pid: int | None) -> None:
    assert pid is not None
    ticks = process.pid_start_ticks(pid)
    assert ticks is not None
    os.kill(pid, signal.SIGKILL)
    assert process.wait_exit(pid, ticks, 10.0)


async def test_a_restarted_worker_restarts_its_dead_wait_vm_but_not_its_reschedule_vm(
    state_dir: Path, nix_env: dict[str, str], add_image: AddImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NIX_CONF_DIR", nix_env["NIX_CONF_DIR"])
    image = add_image("recover-reschedule-vm", _config())
    vms = (
        VmAssignment("moves", store_path_hash(image), image, reschedule=True),
        VmAssignment("stays", store_path_hash(image), image),  # on_worker_lost = "wait"
    )
    assignment = Assignment("host-a", 1, vms, op_id="op-000000000001")

    def running(handler: ReconcilingHandler, vm_id: str) -> bool:
        vm = _link(handler).vms.get(vm_id)
        return vm is not None and vm.phase is Phase.RUNNING

    first = _handler(state_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        assert await first.on_assignment(assignment)
        await _until(
            "both VMs running", lambda: running(first, "moves") and running(first, "stays")
        )
        pids = {vm_id: first.manager.get_or_raise(vm_id).pid for vm_id in ("moves", "stays")}
        nursery.cancel_scope.cancel()  # the worker stops; its VMMs run on
    first.driver.close()  # its API connections (a worker's end closes them)
    for pid in pids.values():  # the host reboots: every VMM dies
        _kill(pid)

    second = _handler(state_dir)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)  # recovery is done when it has started
        # No master answers: no assignment is delivered.
        stays = second.manager.get_or_raise("stays")
        assert stays.phase is Phase.RUNNING and stays.pid not in (None, pids["stays"])
        moves = second.manager.get_or_raise("moves")
        assert (moves.phase, moves.power, moves.pid) == (Phase.PENDING, PowerState.STOPPED, None)
        assert "reschedule" in moves.message

        # A master answers, and its assignment still names the VM: it starts.
        assert await second.on_assignment(assignment)
        await _until("the reschedule VM running", lambda: running(second, "moves"))
        assert second.manager.get_or_raise("moves").pid is not None

        # Clean up: an empty assignment removes both (VMMs, roots).
        assert await second.on_assignment(Assignment("host-a", 2, (), op_id="op-000000000002"))
        await _until("both VMs removed", lambda: not second.manager.list())
        nursery.cancel_scope.cancel()
    second.driver.close()
