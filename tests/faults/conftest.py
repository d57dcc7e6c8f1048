"""Fixtures for the fault-injection tests (helpers: faultlab.py).

Everything here is real: ``procurator master`` and ``worker`` processes in a
network namespace of their own (bridge, taps), the Nix store (images added
with ``nix-store --add``, deleted at teardown — ``nix-store --delete``
refuses a path that is still rooted, so a leaked GC root fails the test),
and the fake cloud-hypervisor as VMM. Needs root and nix-bin.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from faultlab import NIX_CONF, FaultLab, add_image, delete_images, leaks


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.root)
            item.add_marker(pytest.mark.nix)


def _wait_netns_gone(name: str) -> None:
    """``ip netns del`` cannot unlink the namespace file while a process that
    entered it (a VMM being killed, a CLI call timing out) still holds a
    mount namespace with it mounted: retry until those are gone."""
    deadline = time.monotonic() + 30
    while Path(f"/run/netns/{name}").exists() and time.monotonic() < deadline:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
        time.sleep(0.2)


@pytest.fixture(scope="session")
def nix_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if os.geteuid() != 0:
        pytest.skip("fault tests need root (network namespaces, the Nix store)")
    if shutil.which("nix-store") is None:
        pytest.skip("nix-store not found: install nix-bin (scripts/bootstrap.sh does)")
    conf = tmp_path_factory.mktemp("nix-conf")
    (conf / "nix.conf").write_text(NIX_CONF)
    return {"NIX_CONF_DIR": str(conf)}


@pytest.fixture
def images(
    nix_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., str]]:
    """``images(name, config, files=..., symlinks=...)`` adds an image to the
    store; every image is deleted at teardown, which fails on a leaked root.
    Also points this test's processes at the private nix.conf."""
    for key, value in nix_env.items():
        monkeypatch.setenv(key, value)
    added: list[str] = []

    def add(name: str, vm_config: Any, **kwargs: Any) -> str:
        path = add_image(nix_env, tmp_path, name, vm_config, **kwargs)
        added.append(path)
        return path

    yield add
    refused = delete_images(nix_env, added)
    assert not refused, f"images still rooted after the test (leaked GC roots): {refused}"


@pytest.fixture
def make_lab(images: Callable[..., str]) -> Iterator[Callable[..., FaultLab]]:
    """``make_lab(**FaultLab kwargs)``: a lab with its master running.

    Teardown removes every VM through the product (an empty fleet, applied
    and waited for) when master and worker still run, and checks that this
    left nothing behind; then it closes the lab (processes, VMMs, namespace,
    files). Depends on ``images`` so that the images outlive the labs."""
    labs: list[FaultLab] = []

    def make(**kwargs: Any) -> FaultLab:
        lab = FaultLab(**kwargs)
        labs.append(lab)
        lab.__enter__()
        lab.start_master()
        return lab

    yield make
    problems: list[str] = []
    for lab in labs:
        try:
            if lab.master_alive() and lab.worker_alive():
                lab.apply_file(lab.write_fleet([], name="teardown.toml"), "--wait")
                lab.wait_converged({}, timeout=60)
                problems += [
                    f"after removing every VM: {p}" for p in leaks(lab, {}, network=lab.network)
                ]
        finally:
            keep = os.environ.get("PROCURATOR_FAULT_KEEP_LOGS")
            if keep:
                for log in [*lab.dir.glob("*.log"), *lab.state_dir.glob("vms/*/run/vmm.log")]:
                    name = "-".join(log.relative_to(lab.dir).parts)
                    shutil.copy(log, Path(keep) / f"{lab.netns}-{name}")
            lab.close()
            _wait_netns_gone(lab.netns)
    assert not problems, problems
