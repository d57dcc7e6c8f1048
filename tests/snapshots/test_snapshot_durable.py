"""A snapshot is durable whole: its files, its directories and every
directory made for it are fsynced before its name stands for it
(``procurator.durable``; recorded at that module's ``fsync_dir`` seam,
which every directory fsync of the worker goes through)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vmmhelpers import ManagerFactory, definition

from procurator import durable
from procurator.worker.snapshots import SnapshotService
from procurator.worker.vmrecord import VmSpec


@pytest.fixture
def fsynced(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    seen: list[Path] = []
    real = durable.fsync_dir

    def record(directory: Path) -> None:
        seen.append(Path(directory))
        real(directory)

    monkeypatch.setattr(durable, "fsync_dir", record)
    return seen


def test_a_snapshot_and_its_new_directories_are_fsynced(
    make_manager: ManagerFactory, state_dir: Path, fsynced: list[Path]
) -> None:
    vm_dir = state_dir / "vms" / "vm1"
    disk = vm_dir / "disks" / "img" / "disk0.img"
    disk.parent.mkdir(parents=True)
    disk.write_bytes(b"A" * 4096)
    disks = [{"path": str(disk), "id": "disk0", "readonly": False}]
    manager = make_manager()
    manager.ensure(VmSpec("vm1", "h1", definition(disks=disks), image="/nix/store/x-img"))
    fsynced.clear()

    SnapshotService(manager).create("vm1", "before", op_id="op-1")

    snapshots = vm_dir / "snapshots"
    partial = snapshots / ".before.partial"
    # snapshots/ was made for it: a name in the VM's directory.
    assert vm_dir in fsynced, fsynced
    # The set's directories before the rename, the rename after it.
    for directory in (partial, partial / "disks", partial / "state"):
        assert directory in fsynced, (directory, fsynced)
    assert fsynced[-1] == snapshots, fsynced
    assert (snapshots / "before" / "meta.json").is_file()
