"""Fixtures of the security tests; helpers live in sechelpers.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sechelpers import MasterProcess, Pki, make_pki, master_process, tls_master_args

from procurator.rpc.bridge import Bridge, open_bridge


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_master(tmp_path: Path, pki: Pki) -> Iterator[MasterProcess]:
    """A master on loopback with the fleet's mutual TLS."""
    with master_process(tmp_path, *tls_master_args(pki)) as proc:
        yield proc


@pytest.fixture
async def bridge() -> AsyncIterator[Bridge]:
    async with open_bridge() as b:
        yield b
