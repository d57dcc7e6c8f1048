"""The live-move part of the VMM port: which drivers declare it, and what a
driver without it answers (no process started, a permanent refusal)."""

from __future__ import annotations

from pathlib import Path

import pytest

from procurator.worker.vmm.base import VmmHandle, VmmRejected
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver


def test_cloud_hypervisor_refuses_live_moves_without_starting_anything(tmp_path: Path) -> None:
    driver = CloudHypervisorDriver(binary="/nonexistent/cloud-hypervisor")
    assert not driver.capabilities.live_move
    handle = VmmHandle("cloud-hypervisor", 1, 1, str(tmp_path / "api.sock"))
    with pytest.raises(VmmRejected, match="not supported"):
        driver.send_migration(handle, memory=("127.0.0.1", 1), disks=None, timeout=1.0)
    with pytest.raises(VmmRejected, match="not supported"):
        driver.finish_incoming(handle, timeout=1.0)
