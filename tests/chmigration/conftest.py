"""Fixtures for the cloud-hypervisor migration tests: two "workers" (state
directories), each with its own driver running the fake VMM, every request
and answer validated against the v53 OpenAPI description when it is there
(``api``, None without it; ``openapi`` skips, saying why, without it).

The VMM helpers (tests/vmm/vmmhelpers.py) are reused: their directory is
put on ``sys.path`` here, as pytest puts each test directory there for its
own modules.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "vmm"))

from chmhelpers import Host
from vmmhelpers import ApiCalls, ApiValidator, fake_driver, kill_all_under

from procurator.worker.vmm.base import Address
from procurator.worker.vmm.cloud_hypervisor import default_transport

# The validator's fixtures are the VMM tests' own (tests/vmm/conftest.py:
# ``_openapi_spec``, ``api_validator`` — None without the OpenAPI file, and
# failing the test at teardown on any invalid message — and ``openapi``,
# which skips without the file), loaded under another name.
_spec = importlib.util.spec_from_file_location(
    "vmm_conftest", Path(__file__).resolve().parents[1] / "vmm" / "conftest.py"
)
assert _spec is not None and _spec.loader is not None
_vmm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vmm)
_openapi_spec = _vmm._openapi_spec
api_validator = _vmm.api_validator
openapi = _vmm.openapi

__all__ = ["api_validator", "openapi"]


@pytest.fixture
def api(api_validator: ApiValidator | None) -> ApiValidator | None:
    """Validates every request and answer of both drivers (None without
    the OpenAPI file)."""
    return api_validator


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
