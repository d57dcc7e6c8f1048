"""Fixtures for the snapshot tests: managers running the fake
cloud-hypervisor jailed (every request validated against the OpenAPI
description when it is there), and real QEMU guests (test_qemu.py).

The VMM and QEMU helpers (tests/vmm/vmmhelpers.py, tests/qemu/qemuhelpers.py)
are reused: their directories are put on ``sys.path`` here, as pytest puts
each test directory there for its own modules.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "qemu"))

from fleethelpers import add_image, fake_fleet, nix_env
from vmmhelpers import (
    FAST,
    FAST_POLICY,
    OPENAPI,
    ApiValidator,
    ManagerFactory,
    Recorder,
    fake_driver,
    kill_all_under,
    make_jail,
)

from procurator.worker.jail import Jail
from procurator.worker.manager import VmManager
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver, default_transport

# The QEMU tests' fixtures (the test image, throwaway VM directories and
# network namespaces), from their conftest, loaded under another name.
_TESTS = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("qemu_conftest", _TESTS / "qemu" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_qemu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_qemu)
test_image = _qemu.test_image
vms = _qemu.vms
netns = _qemu.netns

__all__ = ["add_image", "fake_fleet", "netns", "nix_env", "test_image", "vms"]


@pytest.fixture(scope="session")
def _openapi_spec() -> ApiValidator | None:
    return ApiValidator(OPENAPI) if OPENAPI.is_file() else None


@pytest.fixture
def openapi(_openapi_spec: ApiValidator | None) -> Iterator[ApiValidator | None]:
    """The session's validator with a fresh record (None without the
    OpenAPI file); any invalid request or answer fails the test at
    teardown."""
    if _openapi_spec is None:
        yield None
        return
    _openapi_spec.errors.clear()
    _openapi_spec.seen.clear()
    yield _openapi_spec
    errors = list(_openapi_spec.errors)
    _openapi_spec.errors.clear()
    assert not errors, "messages that break the cloud-hypervisor API:\n" + "\n".join(errors)


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="ps-", dir="/tmp"))
    try:
        yield root
    finally:
        kill_all_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def driver(openapi: ApiValidator | None) -> Iterator[CloudHypervisorDriver]:
    drv = fake_driver(
        transport_factory=openapi.transport if openapi is not None else default_transport
    )
    yield drv
    drv.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def jail(state_dir: Path) -> Iterator[Jail]:
    if os.geteuid() != 0:
        pytest.skip("jailing a VMM needs root (namespaces, mounts, cgroups, setuid)")
    made = make_jail(state_dir)
    yield made
    made.close()


@pytest.fixture
def make_manager(
    state_dir: Path, driver: CloudHypervisorDriver, recorder: Recorder, jail: Jail
) -> Iterator[ManagerFactory]:
    """VmManagers on the test's state dir, VMMs jailed; every VM removed
    and every manager closed at teardown."""
    managers: list[VmManager] = []

    def make(**kwargs: Any) -> VmManager:
        kwargs.setdefault("timeouts", FAST)
        kwargs.setdefault("policy", FAST_POLICY)
        kwargs.setdefault("on_change", recorder)
        kwargs.setdefault("jail", jail)
        manager = VmManager(state_dir, kwargs.pop("driver", driver), **kwargs)
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        for obs in manager.list():
            manager.remove(obs.vm_id)
        manager.close()
