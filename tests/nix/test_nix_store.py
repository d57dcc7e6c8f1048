"""NixStore against the real nix-store, offline (private NIX_CONF_DIR)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from nixtool_helpers import GCROOTS_AUTO, NixTool

from procurator.core.errors import NotFoundError, TemporaryError, UnavailableError, ValidationError
from procurator.nix import NixStore
from procurator.nix.store import auto_root_name

pytestmark = pytest.mark.nix

ABSENT = "/nix/store/" + "0" * 32 + "-procurator-test-absent"


def test_check_valid_absent_and_malformed(nix: NixTool, store: NixStore) -> None:
    path = nix.add({"vm-config.json": "{}"})
    store.check(path)
    assert store.is_valid(path)
    assert not store.is_valid(ABSENT)
    with pytest.raises(NotFoundError, match="is not in the local Nix store"):
        store.check(ABSENT)
    for bad in ("/etc/passwd", "/nix/store/short-name", f"{path}/vm-config.json", "relative"):
        with pytest.raises(ValidationError, match="not a store path"):
            store.check(bad)


def test_closure_follows_references(nix: NixTool, store: NixStore) -> None:
    image, kernel = nix.build_with_kernel('{"payload":{"kernel":"@KERNEL@/vmlinux"}}')
    assert store.closure(image) == {image, kernel}
    assert store.closure(kernel) == {kernel}
    with pytest.raises(NotFoundError):
        store.closure(ABSENT)


def test_closure_is_queried_once_per_path(
    nix: NixTool, nix_env: dict[str, str], tmp_path: Path
) -> None:
    """A closure never changes: a worker starting many VMs of one image runs
    ``nix-store --query --requisites`` once. Counted with a shim in front of
    the real nix-store; a failed query is not cached."""
    real = shutil.which("nix-store")
    assert real is not None
    shim_dir = tmp_path / "bin"
    shim_dir.mkdir()
    calls = tmp_path / "calls"
    shim = shim_dir / "nix-store"
    shim.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    store = NixStore(extra_env=nix_env, nix_bin_dir=shim_dir)
    image, kernel = nix.build_with_kernel('{"payload":{"kernel":"@KERNEL@/vmlinux"}}')

    for _ in range(3):
        assert store.closure(image) == {image, kernel}
    assert store.closure(kernel) == {kernel}
    for _ in range(2):
        with pytest.raises(NotFoundError):
            store.closure(ABSENT)

    queries = [line for line in calls.read_text().splitlines() if "--requisites" in line]
    assert queries == [
        f"--query --requisites {image}",
        f"--query --requisites {kernel}",
        f"--query --requisites {ABSENT}",
        f"--query --requisites {ABSENT}",
    ]


def test_indirect_root_protects_the_path_and_leaves_nothing_once_removed(
    nix: NixTool, store: NixStore, tmp_path: Path
) -> None:
    path = nix.add({"vm-config.json": "{}"})
    link = tmp_path / "roots" / "vm" / "root"
    store.add_root(path, link)
    store.add_root(path, link)  # idempotent
    assert os.readlink(link) == path
    # Nix's own record of the indirect root, under the name we compute.
    auto = GCROOTS_AUTO / auto_root_name(str(link))
    assert os.readlink(auto) == str(link)
    assert path not in nix.dead()
    refused = nix.delete(path)
    assert refused.returncode != 0
    assert "still alive" in refused.stderr

    store.remove_root(link)
    store.remove_root(link)  # idempotent
    assert not link.is_symlink()
    assert not auto.is_symlink()
    assert path in nix.dead()
    assert nix.delete(path).returncode == 0


def test_add_root_never_fetches(nix: NixTool, store: NixStore, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=ABSENT):
        store.add_root(ABSENT, tmp_path / "root")
    assert not (tmp_path / "root").is_symlink()


def test_realise_fetches_from_a_binary_cache(
    nix: NixTool, nix_env: dict[str, str], tmp_path: Path
) -> None:
    path = nix.add({"vm-config.json": "{}", "vmlinux": "kernel"})
    cache = f"file://{tmp_path}/cache"
    nix.run("nix", "copy", "--to", cache, path)
    assert nix.delete(path).returncode == 0
    assert not nix.valid(path)

    store = NixStore(substituters=[cache], extra_env=nix_env)
    link = tmp_path / "root"
    store.realise(path, root=link)
    assert store.is_valid(path)
    assert Path(path, "vmlinux").read_text() == "kernel"
    assert path not in nix.dead()  # rooted, atomically with the fetch
    store.remove_root(link)


def test_realise_failure_is_temporary_and_carries_nix_message(
    nix: NixTool, nix_env: dict[str, str], tmp_path: Path
) -> None:
    empty_cache = f"file://{tmp_path}/empty-cache"
    store = NixStore(substituters=[empty_cache], extra_env=nix_env)
    with pytest.raises(TemporaryError) as info:
        store.realise(ABSENT, root=tmp_path / "root")
    message = str(info.value)
    assert message.startswith(f"could not realise {ABSENT} from {empty_cache}: ")
    assert "don't know how to build these paths" in message
    assert not (tmp_path / "root").is_symlink()


def test_missing_nix_binary_is_unavailable(nix_env: dict[str, str], tmp_path: Path) -> None:
    store = NixStore(extra_env=nix_env, nix_bin_dir=tmp_path)
    with pytest.raises(UnavailableError, match="is Nix \\(nix-bin\\) installed"):
        store.is_valid(ABSENT)


def test_auto_root_name_is_nix_base32_of_sha1() -> None:
    # Value computed by Nix 2.8 for this link (LocalStore::addIndirectRoot).
    assert auto_root_name("/tmp/nixtry/state/gcroots/vm1/x") == "cpiwc73ri5d1pvlkd1zmkv86fysvfz8i"


def test_remove_root_as_a_daemon_client_leaves_nixs_record_to_the_collector(
    tmp_path: Path,
) -> None:
    """The NixOS module runs the worker as its own user, a client of the Nix
    daemon, which may not write gcroots/auto. Removing a root must still
    work: the link goes, and Nix's record of it (now dangling) is the
    collector's to drop. Run as ``nobody`` against a state dir laid out as
    Nix's is (gcroots/auto owned by root, 0755)."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="pn-", dir="/tmp"))
    try:
        base.chmod(0o755)
        auto_dir = base / "state" / "gcroots" / "auto"
        auto_dir.mkdir(parents=True)
        links = base / "links"
        links.mkdir()
        os.chown(links, nobody.pw_uid, nobody.pw_gid)
        link = links / "vm-1"
        link.symlink_to("/nix/store/" + "a" * 32 + "-web-vm")
        auto = auto_dir / auto_root_name(str(link))
        auto.symlink_to(link)
        script = (
            # Imports first: the interpreter's own files may be root-only.
            "import os\n"
            "from pathlib import Path\n"
            "from procurator.nix.store import NixStore\n"
            f"store = NixStore(extra_env={{'NIX_STATE_DIR': '{base / 'state'}'}})\n"
            f"os.setgid({nobody.pw_gid}); os.setuid({nobody.pw_uid})\n"
            f"store.remove_root(Path('{link}'))\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert not link.is_symlink()
        assert auto.is_symlink()  # dangling now: the collector's to drop
    finally:
        shutil.rmtree(base, ignore_errors=True)
