"""Fixtures for the networking tests: every test that touches interfaces
runs in its own throwaway network namespace, deleted even when the test
fails, and inspects it with iproute2 (`ip -j`), a tool independent of the
pyroute2 code under test.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nethelpers import Netns
from pyroute2 import netns as pyroute2_netns
from testnames import netns_name

from procurator.worker.network import NetworkConfig, NetworkManager

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # This hook sees the whole session's items: touch only this directory's.
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (network namespaces, taps)")
        for item in items:
            if "root" in item.keywords and _HERE in item.path.resolve().parents:
                item.add_marker(skip)


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = netns_name("proc-t")
    pyroute2_netns.create(name)
    try:
        yield Netns(name)
    finally:
        # Deleting the namespace destroys every interface in it (taps too),
        # once the last thread inside it (a manager's netlink thread) is gone:
        # the managers fixture closes them first.
        pyroute2_netns.remove(name)


@pytest.fixture
def make_manager(netns: Netns, tmp_path: Path) -> Iterator[Callable[..., NetworkManager]]:
    """Build NetworkManagers inside the test's namespace; all are closed at
    teardown (before the namespace goes: fixtures unwind in reverse)."""
    managers: list[NetworkManager] = []

    def make(state_dir: Path | None = None, **config: Any) -> NetworkManager:
        manager = NetworkManager(
            NetworkConfig(netns=netns.name, **config), state_dir or tmp_path / "state"
        )
        managers.append(manager)
        return manager

    yield make
    for manager in managers:
        manager.close()
