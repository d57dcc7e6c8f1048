"""A worker-like process for the crash tests that is killed (SIGKILL, sent
to itself) at one chosen point of a VM's life, so that it leaves exactly
what a worker killed there leaves:

    python dying_worker_proc.py <state_dir> <vm_id> <point>

Points:

- ``unlink-lock``: removing the VM, the moment its lock file would be
  unlinked (its VMM is stopped and its directory deleted already);
- ``write-spec``: creating the VM, the moment its ``vm.json`` would be
  written (its lock file exists already, its directory not yet).

The fault is injected through the ``StateDir`` the VmManager writes with;
everything else is the product, driving the fake VMM.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vmmhelpers import FAST, FAST_POLICY, definition, fake_driver

from procurator.worker.manager import VmManager, VmSpec
from procurator.worker.state import StateDir, VmLock


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _DyingStateDir(StateDir):
    def __init__(self, root: Path, point: str) -> None:
        super().__init__(root)
        self.point = point

    def write_spec(self, lock: VmLock, data: Mapping[str, Any]) -> None:
        if self.point == "write-spec":
            _die()
        super().write_spec(lock, data)

    def remove_vm(self, lock: VmLock) -> None:
        if self.point == "unlink-lock":
            lock.release_and_unlink = _die  # type: ignore[method-assign]
        super().remove_vm(lock)


def main() -> None:
    state_dir, vm_id, point = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    manager = VmManager(state_dir, fake_driver(), timeouts=FAST, policy=FAST_POLICY)
    if point == "unlink-lock":
        manager.ensure(VmSpec(vm_id, "h1", definition()))
        manager.state = _DyingStateDir(state_dir, point)
        manager.remove(vm_id)
    elif point == "write-spec":
        manager.state = _DyingStateDir(state_dir, point)
        manager.ensure(VmSpec(vm_id, "h1", definition()))
    raise SystemExit(f"not killed at {point!r}")


if __name__ == "__main__":
    main()
