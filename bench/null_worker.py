"""A real worker with a null VMM driver, for the fan-out benchmark only.

``python -m bench.null_worker --id W --master HOST:PORT --state-dir DIR``

Everything is the product's: the Cap'n Proto link, ``run_worker``,
``ReconcilingHandler`` with its reconciler, ``WorkerActuator`` and
``VmManager`` (a supervisor per VM, its turns on the manager's pool,
state files, flocks). Two ports
get bench stand-ins, injected here and nowhere in the product's paths:

- ``NullDriver`` (``VmmDriver``): a VM "boots" instantly and runs, pauses
  and resumes in memory. Its handle names *this* worker process (pid and
  start ticks), so the manager's liveness checks and pidfd waits see a live
  process without one VMM process per VM — 10,000 VMMs would not fit here.
  It cannot stop a VM: the stop ladder would end in a signal to the worker
  itself, so its stop steps are refused and the fan-out benchmark never
  replaces or removes a VM (it changes power states).
- ``NullImages`` (an ``ImageManager`` whose ``prepare`` needs no Nix): the
  image is "prepared" without Nix, so 10,000 VMs do not cost 20,000
  ``nix-store`` runs; the fan-out is what is measured, ``start`` measures
  image preparation.
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import threading
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import trio

from procurator import __version__
from procurator.app.masters import master_addresses
from procurator.core.confinement import Confined, HostSide
from procurator.core.jail import JailPolicy
from procurator.core.models import Capacity, WorkerInfo
from procurator.core.vmdef import Payload, VmDefinition
from procurator.nix.image import ImageManager, PreparedImage
from procurator.nix.store import NixStore
from procurator.rpc.bridge import Bridge, open_bridge
from procurator.rpc.clients import CapnpMasterDialer
from procurator.worker.daemon import AssignmentHandler, StatusPublisher, run_worker
from procurator.worker.link import FailoverDialer, LinkSettings, MasterDialer
from procurator.worker.runtime import ReconcilingHandler, RuntimeOptions
from procurator.worker.vmm.base import (
    Capabilities,
    VmExit,
    VmmHandle,
    VmmPaths,
    VmmRejected,
    VmState,
)
from procurator.worker.vmm.process import pid_start_ticks


class NullDriver:
    """See the module docstring. Thread-safe (one lock over the states)."""

    name = "null"
    capabilities = Capabilities()

    def __init__(self) -> None:
        self._pid = os.getpid()
        ticks = pid_start_ticks(self._pid)
        assert ticks is not None
        self._ticks = ticks
        self._lock = threading.Lock()
        self._states: dict[str, VmState] = {}  # by api socket

    def check(self, definition: VmDefinition) -> None:
        """Runs anything (it runs nothing)."""

    def launch(
        self,
        definition: VmDefinition,
        paths: VmmPaths,
        *,
        timeout: float,
        jail: object = None,  # nothing runs, so nothing is jailed
    ) -> VmmHandle:
        handle = VmmHandle(self.name, self._pid, self._ticks, str(paths.api_socket))
        self._set(handle, VmState.RUNNING)
        return handle

    def adopt(self, paths: VmmPaths, recorded: VmmHandle) -> VmmHandle | None:
        return None  # the states lived in the last process

    def classify_exit(self, paths: VmmPaths, handle: VmmHandle) -> VmExit:
        return VmExit.CRASHED  # never: its "VMM" is this process

    def clear_leftovers(self, paths: VmmPaths, *, unrecorded: bool, grace: float) -> None:
        """Nothing is ever left."""

    def forget(self, handle: VmmHandle) -> None:
        """Nothing is kept per VMM but its state, which a launch resets."""

    def close(self) -> None:
        """Nothing is held."""

    def state(self, handle: VmmHandle, *, timeout: float) -> VmState:
        with self._lock:
            return self._states.get(handle.api_socket, VmState.NOT_CREATED)

    def pause(self, handle: VmmHandle, *, timeout: float) -> None:
        self._set(handle, VmState.PAUSED)

    def resume(self, handle: VmmHandle, *, timeout: float) -> None:
        self._set(handle, VmState.RUNNING)

    def _set(self, handle: VmmHandle, state: VmState) -> None:
        with self._lock:
            self._states[handle.api_socket] = state

    def _refuse(self, handle: VmmHandle, *, timeout: float) -> None:
        raise VmmRejected(f"the null driver cannot stop {handle.api_socket}")

    power_button = shutdown_vm = shutdown_vmm = _refuse

    def counters(self, handle: VmmHandle, *, timeout: float) -> Mapping[str, Mapping[str, int]]:
        return {}

    def state_mark(self, paths: VmmPaths) -> Hashable | None:
        return None


class NullImages(ImageManager):
    """An ``ImageManager`` whose ``prepare`` needs no Nix: the VM gets a
    config naming the image's kernel, and nothing is rooted or copied (so
    the inherited ``retire_others`` / ``release`` find nothing to drop)."""

    def prepare(
        self,
        vm_id: str,
        store_path: str,
        *,
        host: HostSide,
        on_realise: Callable[[], None] | None = None,
        incoming_op: str | None = None,
    ) -> PreparedImage:
        definition = VmDefinition(payload=Payload(kernel=f"{store_path}/vmlinux"))
        return PreparedImage(
            store_path=store_path, confined=Confined(definition, ()), disks=(), fresh=False
        )


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.null_worker")
    parser.add_argument("--id", required=True)
    parser.add_argument("--master", required=True)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--metrics-interval", type=float, default=15.0)
    parser.add_argument("--resync-interval", type=float, default=30.0)
    # What it reports for placement (bench/heal.py places unpinned VMs).
    parser.add_argument("--vcpus", type=int, default=0)
    parser.add_argument("--memory-mib", type=int, default=0)
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    options = RuntimeOptions(
        driver="cloud-hypervisor",
        network=False,
        metrics_listen="",
        metrics_interval=args.metrics_interval,
        # The worker's jail prepares a cgroup per VM even though nothing is
        # launched in it: under the run's parent (as `procurator worker`
        # reads it), so the run's clean-up removes them (bench/_harness.py).
        # The default parent left 1,000 per fan-out run for good, and every
        # later cpu quota write on the host walked them.
        jail=JailPolicy(
            cgroup_parent=os.environ.get("PROCURATOR_CGROUP_PARENT", JailPolicy().cgroup_parent)
        ),
    )
    state_dir = Path(args.state_dir)
    info = WorkerInfo(
        worker_id=args.id,
        version=__version__,
        capacity=Capacity(args.vcpus, args.memory_mib, 0),
        driver=NullDriver.name,
    )

    def factory(publisher: StatusPublisher) -> AssignmentHandler:
        handler = ReconcilingHandler(
            worker_id=args.id,
            state_dir=state_dir,
            options=options,
            publisher=publisher,
            driver=NullDriver(),
        )
        handler.actuator._images = NullImages(NixStore(), state_dir, limits=handler.images._limits)
        return handler

    async with open_bridge() as bridge, trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            nursery.start_soon(
                functools.partial(
                    run_worker,
                    _dialer(bridge, args.master),
                    info,
                    state_dir=state_dir,
                    settings=LinkSettings(resync_interval=args.resync_interval),
                    handler_factory=factory,
                )
            )
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def _dialer(bridge: Bridge, masters: str) -> MasterDialer:
    """One master, or several (comma-separated) tried in turn, as the
    worker's composition root does (procurator.app.worker)."""
    dialers = [CapnpMasterDialer(bridge, address) for address in master_addresses(masters)]
    return dialers[0] if len(dialers) == 1 else FailoverDialer(dialers)


def main(argv: list[str] | None = None) -> None:
    trio.run(_run, _parse(argv))


if __name__ == "__main__":
    main()
