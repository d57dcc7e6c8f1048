"""Fixtures of the flake tests; shared helpers live in flakehelpers.py
(a module of its own: several test directories have a conftest.py)."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest
import yaml
from flakehelpers import NIX_CONF, OPENAPI, Nix


@pytest.fixture(scope="session")
def nix(tmp_path_factory: pytest.TempPathFactory) -> Nix:
    if shutil.which("nix-instantiate") is None:
        pytest.skip("nix-instantiate not found: install nix-bin (scripts/bootstrap.sh does)")
    conf = tmp_path_factory.mktemp("nix-conf")
    (conf / "nix.conf").write_text(NIX_CONF)
    return Nix({**os.environ, "NIX_CONF_DIR": str(conf)})


@pytest.fixture(scope="session")
def vm_config_schema() -> dict[str, Any]:
    """cloud-hypervisor's OpenAPI components, rooted at ``VmConfig``."""
    if not OPENAPI.exists():
        pytest.skip(
            f"{OPENAPI} is absent: cannot validate against cloud-hypervisor's "
            "OpenAPI VmConfig schema"
        )
    spec = yaml.safe_load(OPENAPI.read_text())
    return {"$ref": "#/components/schemas/VmConfig", "components": spec["components"]}
