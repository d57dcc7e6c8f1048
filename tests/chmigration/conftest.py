"""Fixtures for the cloud-hypervisor migration tests: two "workers" (state
directories), each with its own driver running the fake VMM, every request
and answer validated against the v53 OpenAPI description when it is there
(``api``; ``openapi`` skips, saying why, without it).

The VMM helpers (tests/vmm/vmmhelpers.py) are reused: their directory is
put on ``sys.path`` here, as pytest puts each test directory there for its
own modules.
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from chmhelpers import Host
from vmmhelpers import OPENAPI, ApiCalls, ApiValidator, fake_driver, kill_all_under

from procurator.worker.vmm.base import Address
from procurator.worker.vmm.cloud_hypervisor import default_transport


@pytest.fixture(scope="session")
def _openapi_spec() -> ApiValidator | None:
    return ApiValidator(OPENAPI) if OPENAPI.is_file() else None


@pytest.fixture
def api(_openapi_spec: ApiValidator | None) -> Iterator[ApiValidator | None]:
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
def openapi(api: ApiValidator | None) -> ApiValidator:
    """For tests that are about conformance: skip without the OpenAPI file."""
    if api is None:
        pytest.skip(f"cloud-hypervisor OpenAPI description not found at {OPENAPI}")
    return api


def _host(prefix: str, api: ApiValidator | None) -> Host:
    # Short, under /tmp: unix socket paths must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    calls = ApiCalls()
    driver = fake_driver(
        on_api_call=calls,
        transport_factory=api.transport if api is not None else default_transport,
    )
    return Host(root, driver, calls)


def _drop(host: Host) -> None:
    host.driver.close()
    kill_all_under(host.state_dir)  # safety net for a failed test; a passing one left none
    shutil.rmtree(host.state_dir, ignore_errors=True)


@pytest.fixture
def source(api: ApiValidator | None) -> Iterator[Host]:
    host = _host("pms-", api)
    yield host
    _drop(host)


@pytest.fixture
def target(api: ApiValidator | None) -> Iterator[Host]:
    host = _host("pmt-", api)
    yield host
    _drop(host)


@pytest.fixture
def address() -> Address:
    """A loopback TCP address nothing listens on (a port the kernel just
    handed out and took back)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ("127.0.0.1", int(port))
