"""Moves (issue 30): the fixtures of the master tests (tests/rpcfixtures.py,
tests/pgfixtures.py), and a store on each adapter."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pgfixtures import pg, pg_url
from rpcfixtures import bridge, fleet_of, master, master_factory

from procurator.master.store import Store, open_store

__all__ = ["bridge", "fleet_of", "master", "master_factory", "pg", "pg_url", "store"]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    target = (
        str(tmp_path / "m.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    )
    opened = await open_store(target)
    try:
        yield opened
    finally:
        await opened.aclose()
