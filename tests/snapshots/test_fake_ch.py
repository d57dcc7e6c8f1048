"""Snapshots through the VmManager with the fake cloud-hypervisor, jailed:
the request sequence (every body checked against the v53 OpenAPI file when
it is there), a snapshot that fails halfway, hostile names, another image's
snapshot, quotas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from vmmhelpers import ApiValidator, ManagerFactory, Recorder, definition, write_faults

from procurator.core.errors import (
    LimitExceededError,
    NotFoundError,
    TemporaryError,
    ValidationError,
)
from procurator.core.models import EventKind, Phase
from procurator.core.snapshot import SnapshotQuota
from procurator.worker.manager import VmManager
from procurator.worker.snapshots import SnapshotService
from procurator.worker.vmrecord import VmSpec

DISK = 64 * 1024


def _spec(state_dir: Path, vm_id: str = "vm1", hash: str = "h1") -> VmSpec:
    """A VM with one writable disk in its disks/ directory (where the
    worker puts disk copies, and the jail lets the VMM write)."""
    disk = state_dir / "vms" / vm_id / "disks" / "img" / "disk0.img"
    if not disk.exists():
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.write_bytes(b"A" * DISK)
    disks = [{"path": str(disk), "id": "disk0", "readonly": False}]
    return VmSpec(vm_id, hash, definition(disks=disks), image="/nix/store/x-img")


def _disk(state_dir: Path, vm_id: str = "vm1") -> Path:
    return state_dir / "vms" / vm_id / "disks" / "img" / "disk0.img"


def _vm_events(state_dir: Path, vm_id: str = "vm1") -> list[str]:
    """The fake VMM's own event log (the order requests reached it)."""
    lines = (state_dir / "vms" / vm_id / "run" / "events.json").read_text().splitlines()
    return [json.loads(line)["event"] for line in lines]


@pytest.fixture
def manager(make_manager: ManagerFactory) -> VmManager:
    return make_manager()


def test_snapshot_then_restore_puts_disk_and_state_back(
    manager: VmManager,
    state_dir: Path,
    recorder: Recorder,
    openapi: ApiValidator | None,
) -> None:
    before = manager.ensure(_spec(state_dir))
    snapshots = SnapshotService(manager)

    info = snapshots.create("vm1", "before", op_id="op-1")
    assert (info.vm_id, info.name, info.hash, info.op_id) == ("vm1", "before", "h1", "op-1")
    assert info.image == "/nix/store/x-img" and info.driver == "cloud-hypervisor"
    stored = state_dir / "vms" / "vm1" / "snapshots" / "before"
    assert sorted(p.name for p in stored.iterdir()) == ["disks", "meta.json", "state"]
    assert (stored / "disks" / "0.img").read_bytes() == b"A" * DISK
    # The VMM wrote its state itself, inside its jail; the worker moved it out.
    assert json.loads((stored / "state" / "config.json").read_text())["disks"][0]["id"] == "disk0"
    assert not (state_dir / "vms" / "vm1" / "run" / "snapshot.partial").exists()
    assert (
        info.size_bytes
        == sum(p.stat().st_size for p in stored.rglob("*") if p.is_file())
        - (stored / "meta.json").stat().st_size
    )
    # The VM ran on, in the same VMM: paused, snapshotted, resumed.
    running = manager.get_or_raise("vm1")
    assert running.pid == before.pid and running.phase is Phase.RUNNING
    assert _vm_events(state_dir)[-5:] == ["pausing", "paused", "snapshotted", "resuming", "resumed"]
    assert snapshots.list() == [info] and snapshots.list("vm1") == [info]

    _disk(state_dir).write_bytes(b"B" * DISK)
    restored = snapshots.restore("vm1", "before", op_id="op-2")
    assert restored == info
    assert _disk(state_dir).read_bytes() == b"A" * DISK
    # The supervisor tells of it once it sees the restored VM run.
    recorder.wait_for(lambda: EventKind.RESTORED in recorder.kinds("vm1"))
    after = manager.get_or_raise("vm1")
    assert after.pid != before.pid and after.phase is Phase.RUNNING
    # A new VMM (the event file is the VM's, appended to by each), loaded
    # from the snapshot, not booted.
    events = _vm_events(state_dir)
    last_start = len(events) - 1 - events[::-1].index("starting")
    assert events[last_start:] == ["starting", "restored", "resuming", "resumed"]
    assert not (state_dir / "vms" / "vm1" / "run" / "restore").exists()
    kinds = recorder.kinds("vm1")
    assert kinds.index(EventKind.SNAPSHOTTED) < kinds.index(EventKind.RESTORED)
    said = next(e for e in recorder.events("vm1") if e.kind is EventKind.RESTORED).message
    assert "clock" in said and "behind" in said
    if openapi is not None:
        for call in ("vm.pause", "vm.snapshot", "vm.resume", "vm.restore"):
            assert openapi.seen[f"PUT /api/v1/{call}"] >= 1, call

    snapshots.delete("vm1", "before")
    assert snapshots.list() == []
    with pytest.raises(NotFoundError):
        snapshots.delete("vm1", "before")


def test_a_snapshot_failing_halfway_leaves_the_vm_running(
    manager: VmManager, state_dir: Path
) -> None:
    before = manager.ensure(_spec(state_dir))
    write_faults(state_dir, "vm1", {"snapshot_fails_halfway": True})
    snapshots = SnapshotService(manager)
    with pytest.raises(TemporaryError, match=r"vm\.snapshot with HTTP 500"):
        snapshots.create("vm1", "broken")
    assert _vm_events(state_dir)[-2:] == ["resuming", "resumed"]
    now = manager.get_or_raise("vm1")
    assert now.pid == before.pid and now.phase is Phase.RUNNING
    assert snapshots.list() == []
    # Nothing half-written is left, in the VM's directory or its jail.
    assert list((state_dir / "vms" / "vm1" / "snapshots").iterdir()) == []
    assert not (state_dir / "vms" / "vm1" / "run" / "snapshot.partial").exists()


@pytest.mark.parametrize(
    "name",
    ["../vm2", "a/b", ".hidden", "..", "A", "-x", "x" * 64, "a\n", "snap shot", "é"],
)
def test_hostile_snapshot_names_are_refused_before_anything(
    manager: VmManager, state_dir: Path, name: str
) -> None:
    snapshots = SnapshotService(manager)
    for attempt in (
        lambda: snapshots.create("vm1", name),
        lambda: snapshots.restore("vm1", name),
        lambda: snapshots.delete("vm1", name),
        lambda: snapshots.get("vm1", name),
    ):
        with pytest.raises(ValidationError, match="not a valid snapshot name"):
            attempt()
    with pytest.raises(ValidationError, match="not a valid VM id"):
        snapshots.create("../etc", "ok")
    assert not (state_dir / "vms" / "vm1").exists()


def test_metadata_naming_another_snapshot_is_ignored(manager: VmManager, state_dir: Path) -> None:
    manager.ensure(_spec(state_dir))
    snapshots = SnapshotService(manager)
    info = snapshots.create("vm1", "real")
    # A snapshot directory whose metadata names another VM's snapshot (or a
    # path) is not listed, nor restorable.
    forged = state_dir / "vms" / "vm1" / "snapshots" / "forged"
    forged.mkdir()
    meta = dict(info.to_json(), vm_id="vm2", name="forged")
    (forged / "meta.json").write_text(json.dumps(meta))
    assert [s.name for s in snapshots.list("vm1")] == ["real"]
    with pytest.raises(NotFoundError):
        snapshots.restore("vm1", "forged")


def test_restore_of_another_image_is_refused_unless_forced(
    manager: VmManager, state_dir: Path, recorder: Recorder
) -> None:
    manager.ensure(_spec(state_dir, hash="h1"))
    snapshots = SnapshotService(manager)
    snapshots.create("vm1", "old")
    replaced = manager.ensure(_spec(state_dir, hash="h2"))
    with pytest.raises(ValidationError, match=r"taken of h1, the VM now is h2.*--force"):
        snapshots.restore("vm1", "old")
    assert manager.get_or_raise("vm1").pid == replaced.pid  # untouched
    snapshots.restore("vm1", "old", force=True)
    now = manager.get_or_raise("vm1")
    assert now.pid != replaced.pid and now.observed_hash == "h2"
    recorder.wait_for(lambda: EventKind.RESTORED in recorder.kinds("vm1"))
    assert manager.get_or_raise("vm1").phase is Phase.RUNNING


def test_quotas_refuse_clearly_and_take_nothing(manager: VmManager, state_dir: Path) -> None:
    manager.ensure(_spec(state_dir))
    counted = SnapshotService(manager, quota=SnapshotQuota(max_per_vm=1))
    counted.create("vm1", "one")
    with pytest.raises(LimitExceededError, match="already has 1 snapshots"):
        counted.create("vm1", "two")
    worker = SnapshotService(manager, quota=SnapshotQuota(max_per_worker=1))
    with pytest.raises(LimitExceededError, match="the worker already keeps 1"):
        worker.create("vm1", "two")
    events = len(_vm_events(state_dir))
    # 256 MiB of guest memory alone is over this: refused before the pause.
    sized = SnapshotService(manager, quota=SnapshotQuota(max_bytes_per_vm=100 << 20))
    with pytest.raises(LimitExceededError, match="would take"):
        sized.create("vm1", "big")
    assert len(_vm_events(state_dir)) == events
    assert [s.name for s in counted.list()] == ["one"]
    with pytest.raises(ValidationError, match="already has a snapshot named 'one'"):
        SnapshotService(manager).create("vm1", "one")
