"""The persisted allocation table, without touching any interface."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from procurator.core.errors import PermanentError, ProcuratorError, ValidationError
from procurator.worker.network import NetworkConfig, NetworkManager


def _write(state_dir: Path, vms: dict[str, dict[str, str]]) -> None:
    (state_dir / "network").mkdir(parents=True)
    (state_dir / "network" / "addresses.json").write_text(json.dumps({"version": 1, "vms": vms}))


def test_a_corrupt_table_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "network").mkdir()
    (tmp_path / "network" / "addresses.json").write_text("{not json")
    with pytest.raises(PermanentError, match=r"network/addresses\.json is unreadable"):
        NetworkManager(NetworkConfig(), tmp_path)
    # The lock was released: a fixed file can be used at once.
    (tmp_path / "network" / "addresses.json").unlink()
    NetworkManager(NetworkConfig(), tmp_path).close()


def test_entries_that_no_longer_fit_the_config_are_dropped(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "ok": {"ip": "10.120.0.9", "tap": "pvmok", "mac": "02:00:00:00:00:01"},
            "old-subnet": {"ip": "10.99.0.9", "tap": "pvmold-subnet", "mac": "02:00:00:00:00:02"},
            "old-prefix": {"ip": "10.120.0.10", "tap": "tapold", "mac": "02:00:00:00:00:03"},
            "dup-ip": {"ip": "10.120.0.9", "tap": "pvmdup-ip", "mac": "02:00:00:00:00:04"},
        },
    )
    with NetworkManager(NetworkConfig(), tmp_path) as manager:
        nic = manager.nic("ok")
        assert nic is not None and (nic.ip, nic.tap) == ("10.120.0.9", "pvmok")
        assert manager.nic("old-subnet") is None
        assert manager.nic("old-prefix") is None
        assert manager.nic("dup-ip") is None


def test_invalid_config_lists_every_problem() -> None:
    with pytest.raises(ValidationError) as caught:
        NetworkConfig(bridge="a-bridge-name-too-long", subnet="10.0.0.1/24", tap_prefix="9x")
    assert len(caught.value.details) == 3


def test_a_closed_manager_refuses_work(tmp_path: Path) -> None:
    manager = NetworkManager(NetworkConfig(), tmp_path)
    manager.close()
    manager.close()  # idempotent
    with pytest.raises(ProcuratorError, match="closed"):
        manager.ensure_bridge()
