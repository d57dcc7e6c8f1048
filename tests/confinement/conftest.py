"""Fixtures for the jail tests: real jailed VMMs (the fake cloud-hypervisor
of tests/fakes, launched through the worker's own launch path: the jailer,
namespaces, pivot_root, the VM's uid, a real cgroup), real cgroups (v1 on
this machine; v2 where a unified hierarchy is mounted), real network
namespaces and taps, real Nix store paths.

The VMM test helpers (tests/vmm/vmmhelpers.py) are reused: tests/vmm is put
on ``sys.path`` here, as pytest puts each test directory there for its own
modules.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from fleethelpers import add_image, nix_env
from vmmhelpers import (
    FAST,
    FAST_POLICY,
    ManagerFactory,
    Recorder,
    fake_driver,
    kill_all_under,
    make_jail,
)

from procurator.worker.jail import Jail
from procurator.worker.manager import VmManager
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

__all__ = ["add_image", "nix_env"]


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.skip("jailing a VMM needs root (namespaces, mounts, cgroups, setuid)")


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="pj-", dir="/tmp"))
    try:
        yield root
    finally:
        kill_all_under(root)  # safety net for a failed test; a passing one left none
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver() -> Iterator[CloudHypervisorDriver]:
    drv = fake_driver()
    yield drv
    drv.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_manager(
    state_dir: Path, driver: CloudHypervisorDriver, recorder: Recorder
) -> Iterator[ManagerFactory]:
    """Builds jailed VmManagers on the test's state dir (``jail=`` a jail,
    or the keywords of ``JailPolicy`` as ``policy_*``). At teardown every VM
    is removed, every manager and jail closed."""
    made: list[tuple[VmManager, Jail | None]] = []

    def make(**kwargs: Any) -> VmManager:
        policy = {
            k.removeprefix("policy_"): kwargs.pop(k)
            for k in list(kwargs)
            if k.startswith("policy_")
        }
        jail = kwargs.pop("jail", None) if "jail" in kwargs else make_jail(state_dir, **policy)
        kwargs.setdefault("timeouts", FAST)
        kwargs.setdefault("policy", FAST_POLICY)
        kwargs.setdefault("on_change", recorder)
        manager = VmManager(state_dir, kwargs.pop("driver", driver), jail=jail, **kwargs)
        made.append((manager, jail))
        return manager

    yield make
    for manager, jail in made:
        if not manager.closed:
            for obs in manager.list():
                try:
                    manager.remove(obs.vm_id)
                except Exception as exc:  # keep cleaning up; the safety net follows
                    print(f"teardown: removing {obs.vm_id} failed: {exc}")
            manager.close()
        if jail is not None:
            jail.close()
