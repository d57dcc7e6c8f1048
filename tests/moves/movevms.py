"""What the move tests that run a real VmManager over fake
cloud-hypervisor processes share: a short state root, the driver, the
manager. Fixtures are re-exported by the test modules that use them."""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from vmmhelpers import FAST, FAST_POLICY, fake_driver, kill_all_under

from procurator.worker.manager import VmManager
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver


@pytest.fixture
def root() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    made = Path(tempfile.mkdtemp(prefix="pmv-", dir="/tmp"))
    try:
        yield made
    finally:
        kill_all_under(made)  # safety net for a failed test; a passing one left none
        shutil.rmtree(made, ignore_errors=True)


@pytest.fixture
def driver() -> Iterator[CloudHypervisorDriver]:
    made = fake_driver()
    yield made
    made.close()


def manager(state_dir: Path, driver: CloudHypervisorDriver) -> VmManager:
    return VmManager(
        state_dir,
        driver,
        timeouts=FAST,
        policy=FAST_POLICY,
        on_change=lambda obs, event: None,
        jail=None,
    )
