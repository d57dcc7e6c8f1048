"""Snapshots: what taking and restoring one costs, next to a raw ``cp``.

One real guest (the test image, ``scripts/build-test-image.sh``) under
QEMU/TCG through a ``VmManager`` (unjailed: the jail adds nothing to a
snapshot's path, which runs in the worker and QEMU, not through the
jailer), with a writable data disk of random bytes (64 MiB; 16 MiB with
``--quick``). Measured, each a few times in the same run:

- ``create``: ``SnapshotService.create`` end to end (pause, QMP migrate to
  a descriptor, disk copy, resume, metadata), and the part of it the
  guest was paused;
- ``restore``: ``SnapshotService.restore`` (stop the VMM, put the disk
  back, a QEMU started ``-incoming defer`` loads the state, ``cont``);
- the floor: ``cp --reflink=auto -r`` of the very files a snapshot holds
  (guest memory state and disk copy) into a fresh directory on the same
  file system, then ``sync`` of those files (a snapshot is made durable
  too): the bytes a snapshot must write, written by ``cp``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from bench._harness import REPO, Row, Run, fmt_ratio, fmt_s, median
from procurator.core.models import EventKind
from procurator.core.vmdef import VmDefinition
from procurator.worker.manager import Timeouts, VmManager
from procurator.worker.snapshots import SnapshotService
from procurator.worker.vmm.qemu import QemuDriver
from procurator.worker.vmrecord import VmSpec

NAME = "snapshot"
_READY = b"PROCURATOR-READY"


def _image(run: Run) -> Path:
    result = subprocess.run(
        [str(REPO / "scripts" / "build-test-image.sh")],
        capture_output=True,
        text=True,
        check=True,
        env=run.nix_env,
    )
    return Path(result.stdout.strip().splitlines()[-1])


def _definition(image: Path, disk: Path, serial: Path) -> VmDefinition:
    config = json.loads((image / "vm-config.json").read_text())
    for key in ("kernel", "initramfs"):
        if key in config["payload"] and not os.path.isabs(config["payload"][key]):
            config["payload"][key] = str(image / config["payload"][key])
    config["disks"] = [{"path": str(disk), "id": "data", "readonly": False}]
    return dataclasses.replace(VmDefinition.from_vm_config(config), serial_file=str(serial))


def measure(run: Run) -> list[Row]:
    if shutil.which("qemu-system-x86_64") is None or shutil.which("nix-build") is None:
        return [Row(NAME, "skipped", "n/a", note="needs qemu-system-x86_64 and nix-build")]
    rounds = 1 if run.quick else 3
    disk_mib = 16 if run.quick else 64
    image = _image(run)
    state = run.dir / "snapshot-worker"
    disk = state / "vms" / "bench" / "disks" / "img" / "data.img"
    disk.parent.mkdir(parents=True)
    with open(disk, "wb") as f:
        f.write(os.urandom(disk_mib << 20))
    events: list[tuple[EventKind, str]] = []
    manager = VmManager(
        state,
        QemuDriver(accel="tcg"),
        timeouts=Timeouts(boot=60.0, spawn=30.0, counters_interval=0),
        on_change=lambda obs, event: events.append((event.kind, event.message)) if event else None,
    )
    snapshots = SnapshotService(manager)
    creates: list[float] = []
    paused: list[float] = []
    restores: list[float] = []
    copies: list[float] = []
    size = 0
    try:
        paths = manager.state.paths("bench")
        manager.ensure(VmSpec("bench", "h1", _definition(image, disk, paths.serial_file)))
        deadline = time.monotonic() + 120
        while _READY not in (paths.serial_file.read_bytes() if paths.serial_file.exists() else b""):
            if time.monotonic() > deadline:
                raise RuntimeError("the guest did not boot")
            time.sleep(0.1)
        for index in range(rounds):
            name = f"r{index}"
            started = time.perf_counter()
            info = snapshots.create("bench", name)
            creates.append(time.perf_counter() - started)
            size = info.size_bytes
            said = next(m for k, m in reversed(events) if k is EventKind.SNAPSHOTTED)
            paused.append(float(said.rsplit("paused ", 1)[1].split(" s")[0]))
            started = time.perf_counter()
            snapshots.restore("bench", name)
            restores.append(time.perf_counter() - started)
            source = state / "vms" / "bench" / "snapshots" / name
            target = run.dir / f"cp-{index}"
            started = time.perf_counter()
            subprocess.run(["cp", "--reflink=auto", "-r", str(source), str(target)], check=True)
            copied = [str(p) for p in target.rglob("*") if p.is_file()]
            subprocess.run(["sync", *copied], check=True)  # fsync of those files only
            copies.append(time.perf_counter() - started)
            shutil.rmtree(target)
            snapshots.delete("bench", name)
    finally:
        for obs in manager.list():
            manager.remove(obs.vm_id)
        manager.close()
    floor = median(copies)
    note = (
        f"one 256 MiB guest under TCG, {disk_mib} MiB random data disk; snapshot "
        f"{size / (1 << 20):.0f} MiB; {rounds} round(s); baseline: cp --reflink=auto -r of "
        "the snapshot's files + sync of them"
    )
    return [
        Row(
            NAME,
            "create (end to end)",
            fmt_s(median(creates)),
            fmt_s(floor),
            fmt_ratio(median(creates), floor),
            note=note,
        ),
        Row(
            NAME,
            "guest paused by create",
            fmt_s(median(paused)),
            fmt_s(floor),
            fmt_ratio(median(paused), floor),
        ),
        Row(
            NAME,
            "restore (end to end)",
            fmt_s(median(restores)),
            fmt_s(floor),
            fmt_ratio(median(restores), floor),
        ),
    ]
