"""PostgreSQL fixtures shared by the master and HA tests (imported by their
conftest.py files): one throwaway cluster per test session (``pg``), a new
empty database per test (``pg_url``). Tests that stop the server make a
cluster of their own (``pgcluster.PgCluster``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgcluster import PgCluster


@pytest.fixture(scope="session")
def pg() -> Iterator[PgCluster]:
    with PgCluster() as cluster:
        yield cluster


@pytest.fixture
def pg_url(pg: PgCluster) -> str:
    return pg.new_database()
