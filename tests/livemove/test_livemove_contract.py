"""The live-move part of the VMM port: which drivers declare it, and what a
driver without it answers (no process started, a permanent refusal)."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator.worker.vmm.base import VmmHandle, VmmRejected
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

TOKEN = bytes(range(16))


def test_cloud_hypervisor_moves_memory_only_and_refuses_disks_without_starting_anything(
    tmp_path: Path,
) -> None:
    # cloud-hypervisor migrates memory and device state, never disks
    # (tests/chmigration has its migrations): asked to mirror them, it
    # refuses before anything is started or asked of a VMM.
    driver = CloudHypervisorDriver(binary="/nonexistent/cloud-hypervisor")
    assert driver.capabilities.live_move
    handle = VmmHandle("cloud-hypervisor", 1, 1, str(tmp_path / "api.sock"))
    with pytest.raises(VmmRejected, match="cannot mirror disks"):
        driver.send_migration(
            handle, memory=("127.0.0.1", 1), disks=("127.0.0.1", 2), token=TOKEN, timeout=1.0
        )
