"""A worker with hundreds of VMs holds file descriptors above FD_SETSIZE
(1024): supervision must keep working there (select() would raise)."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from vmmhelpers import ManagerFactory, Recorder, definition, write_faults

from procurator.core.models import EventKind, Phase
from procurator.worker.manager import VmSpec


@pytest.fixture
def high_fds() -> Iterator[None]:
    """Take every descriptor below 1100, so the next ones opened are higher."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    held = []
    try:
        while True:
            fd = os.eventfd(0)
            held.append(fd)
            if fd >= 1100:
                break
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_supervision_above_fd_setsize(
    high_fds: None, make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager()
    faults = write_faults(state_dir, "vm1", {"crash_after_boot": 0.2})
    first = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert first.phase is Phase.RUNNING
    # The crash is seen through the pidfd (a descriptor above 1024 now) and
    # the VM restarted.
    recorder.wait_for(lambda: (o := manager.get("vm1")) is not None and o.restarts >= 1)
    faults.unlink()
    recorder.wait_for(
        lambda: (
            (o := manager.get("vm1")) is not None
            and o.phase is Phase.RUNNING
            and o.pid != first.pid
        )
    )
    assert EventKind.RESTARTED in recorder.kinds("vm1")
    manager.remove("vm1")
