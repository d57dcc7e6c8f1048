"""Fixtures for the VMM driver and VmManager tests (helpers: vmmhelpers.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from vmmhelpers import (
    FAST,
    FAST_POLICY,
    OPENAPI,
    ApiCalls,
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


@pytest.fixture(scope="session")
def _openapi_spec() -> ApiValidator | None:
    return ApiValidator(OPENAPI) if OPENAPI.is_file() else None


@pytest.fixture
def api_validator(_openapi_spec: ApiValidator | None) -> Iterator[ApiValidator | None]:
    """The session's validator with a fresh error list, or None when the
    OpenAPI file is absent. Fails the test at teardown on any invalid message."""
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
def openapi(api_validator: ApiValidator | None) -> ApiValidator:
    """For tests that are about conformance: skip without the OpenAPI file."""
    if api_validator is None:
        pytest.skip(f"cloud-hypervisor OpenAPI description not found at {OPENAPI}")
    return api_validator


@pytest.fixture
def state_dir() -> Iterator[Path]:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="pv-", dir="/tmp"))
    try:
        yield root
    finally:
        kill_all_under(root)  # safety net for a failed test; a passing one left none
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def api_calls() -> ApiCalls:
    return ApiCalls()


@pytest.fixture
def driver(
    api_validator: ApiValidator | None, api_calls: ApiCalls
) -> Iterator[CloudHypervisorDriver]:
    drv = fake_driver(
        on_api_call=api_calls,
        transport_factory=(
            api_validator.transport if api_validator is not None else default_transport
        ),
    )
    yield drv
    drv.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def jail(state_dir: Path) -> Iterator[Jail]:
    """The test's worker's jail (and jailer, started on first use): every
    manager of the test jails its VMMs, as a worker does unless
    --unconfined."""
    made = make_jail(state_dir)
    yield made
    made.close()


@pytest.fixture
def make_manager(
    state_dir: Path, driver: CloudHypervisorDriver, recorder: Recorder, jail: Jail
) -> Iterator[ManagerFactory]:
    """Builds VmManagers on the test's state dir (fast timeouts, recording
    changes, VMMs jailed unless ``jail=None``). At teardown every VM they
    manage is removed and they are closed."""
    managers: list[VmManager] = []

    def make(**kwargs: Any) -> VmManager:
        kwargs.setdefault("timeouts", FAST)
        kwargs.setdefault("policy", FAST_POLICY)
        kwargs.setdefault("on_change", recorder)
        kwargs.setdefault("jail", jail)
        manager = VmManager(
            kwargs.pop("state_dir", state_dir), kwargs.pop("driver", driver), **kwargs
        )
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        if manager.closed:
            continue
        for obs in manager.list():
            try:
                manager.remove(obs.vm_id)
            except Exception as exc:  # keep cleaning up; the safety net follows
                print(f"teardown: removing {obs.vm_id} failed: {exc}")
        manager.close()
