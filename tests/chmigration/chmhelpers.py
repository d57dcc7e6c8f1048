"""Helpers for the cloud-hypervisor migration tests (fixtures: conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmmhelpers import ApiCalls

from procurator.worker.state import StateDir
from procurator.worker.vmm.base import VmmHandle, VmmPaths
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

#: A move's secret both ends get (the mover hands them its transfer token).
TOKEN = bytes(range(0x40, 0x50))


@dataclass
class Host:
    """One worker's side of a migration: its state directory, its driver
    and the API calls that driver made."""

    state_dir: Path
    driver: CloudHypervisorDriver
    calls: ApiCalls

    def paths(self, vm_id: str = "vm1") -> VmmPaths:
        paths = StateDir(self.state_dir).paths(vm_id)
        paths.vmm_dir.mkdir(parents=True, exist_ok=True)
        return paths

    def write_ops(self, handle: VmmHandle) -> int:
        """The I/O the fake's guest has done (its counters' state)."""
        return self.driver.counters(handle, timeout=5.0)["disk0"]["write_ops"]
