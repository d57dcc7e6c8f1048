"""The per-VM state directory: atomic files, and the flock that makes a VM
belong to one process at a time."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from procurator.core.errors import PermanentError
from procurator.worker.state import (
    HandlesRecord,
    StateDir,
    StateError,
    VmLockedError,
    read_json_checked,
    write_json_atomic,
    write_json_in_place,
)
from procurator.worker.vmm.base import VmmHandle


@pytest.fixture
def state(tmp_path: Path) -> StateDir:
    sd = StateDir(tmp_path / "state")
    sd.prepare()
    return sd


def test_spec_and_handles_round_trip(state: StateDir) -> None:
    with state.lock("vm1") as lock:
        state.write_spec(lock, {"hash": "h1"})
        handle = VmmHandle("cloud-hypervisor", 123, 456, "/x/api.sock")
        state.write_handles(lock, HandlesRecord("cloud-hypervisor", handle=handle, hash="h1"))
        assert state.read_spec("vm1") == {"hash": "h1"}
        assert state.read_handles("vm1") == HandlesRecord(
            "cloud-hypervisor", handle=handle, hash="h1"
        )
        state.clear_handles(lock)
        assert state.read_handles("vm1") is None
    assert state.vm_ids() == ["vm1"]
    assert state.paths("vm1").api_socket == state.root / "vms" / "vm1" / "run" / "api.sock"


def test_atomic_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    for i in range(3):
        write_json_atomic(target, {"i": i})
    assert json.loads(target.read_text()) == {"i": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_in_place_write_keeps_the_inode_and_pads_a_shorter_record(tmp_path: Path) -> None:
    target = tmp_path / "handles.json"
    write_json_in_place(target, {"pid": 123456, "path": "x" * 200})
    inode = target.stat().st_ino
    write_json_in_place(target, {"pid": 1})
    # Rewritten where it lies: no temporary file, no new inode (none freed),
    # and the old record's tail is blanked, not left to be parsed.
    assert target.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["handles.json"]
    assert read_json_checked(target) == {"pid": 1}
    write_json_in_place(target, {"pid": 2, "path": "y" * 400})
    assert target.stat().st_ino == inode
    assert read_json_checked(target) == {"pid": 2, "path": "y" * 400}


def test_in_place_write_replaces_what_it_cannot_write_in_one_page(tmp_path: Path) -> None:
    target = tmp_path / "handles.json"
    write_json_in_place(target, {"pid": 1})
    inode = target.stat().st_ino
    # Longer than a page: one write could be cut between its pages, so
    # the record is replaced whole (a rename: a new inode).
    write_json_in_place(target, {"path": "z" * 5000})
    assert target.stat().st_ino != inode
    assert read_json_checked(target) == {"path": "z" * 5000}
    # Now the file is longer than a page: padding to it would be too, so
    # the short record replaces it whole as well, and the next one is in
    # place again.
    write_json_in_place(target, {"pid": 2})
    assert read_json_checked(target) == {"pid": 2}
    assert target.stat().st_size < 100
    inode = target.stat().st_ino
    write_json_in_place(target, {"pid": 3})
    assert target.stat().st_ino == inode


def test_in_place_write_replaces_a_symlink_and_never_writes_through_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("keep")
    target = tmp_path / "handles.json"
    target.symlink_to(elsewhere)
    write_json_in_place(target, {"pid": 1})
    assert not target.is_symlink()
    assert read_json_checked(target) == {"pid": 1}
    assert elsewhere.read_text() == "keep"


def test_a_torn_record_reads_as_unreadable(state: StateDir) -> None:
    """What a power loss (or a copy cut short as the writer is killed) may
    leave: the new record's first part over the old one's rest. Its check
    does not match, so it is unreadable, never a mix taken for a record."""
    old = HandlesRecord("cloud-hypervisor", previous="a" * 32, spawning=True)
    handle = VmmHandle("cloud-hypervisor", 4242, 99, "/x/api.sock")
    new = HandlesRecord("cloud-hypervisor", handle=handle, hash="b" * 32, owes="booted")
    path = state.root / "vms" / "vm1" / "handles.json"
    with state.lock("vm1") as lock:
        state.write_handles(lock, old)
        old_bytes = path.read_bytes()
        state.write_handles(lock, new)
        assert state.read_handles("vm1") == new
        new_bytes = path.read_bytes()
    differ = next(i for i, (a, b) in enumerate(zip(old_bytes, new_bytes, strict=False)) if a != b)
    for cut in (differ + 1, (differ + len(old_bytes)) // 2, len(old_bytes) - 1):
        torn = new_bytes[:cut] + old_bytes[cut:]
        assert torn not in (old_bytes, new_bytes)
        path.write_bytes(torn)
        try:
            data = json.loads(torn)
        except ValueError:
            data = None
        if data is not None:  # parses: the check is what catches it
            assert data.pop("crc32") is not None
        with pytest.raises(StateError, match=r"handles\.json (is torn|is not valid JSON)"):
            state.read_handles("vm1")
    path.write_bytes(b"")  # killed inside the first write
    with pytest.raises(StateError):
        state.read_handles("vm1")
    # A record without a check (a release before it wrote it) is read.
    path.write_text(json.dumps(new.to_json()))
    assert state.read_handles("vm1") == new


def test_in_place_write_replaces_a_fifo_or_a_linked_file_without_writing_into_it(
    tmp_path: Path,
) -> None:
    target = tmp_path / "handles.json"
    os.mkfifo(target)  # nobody reads it: an open for writing would wait
    write_json_in_place(target, {"pid": 1})
    assert target.is_file()
    assert json.loads(target.read_text())["pid"] == 1
    other = tmp_path / "other"
    os.link(target, other)  # a second name: writing in place would change it too
    before = other.read_bytes()
    write_json_in_place(target, {"pid": 2})
    assert json.loads(target.read_text())["pid"] == 2
    assert other.read_bytes() == before


def test_in_place_write_killed_at_any_moment_leaves_a_whole_record(tmp_path: Path) -> None:
    """SIGKILL a process rewriting a record (records of changing lengths)
    at 300 random moments: each time the file holds one whole record,
    never a torn or truncated one. (An open with O_TRUNC before the write
    would leave it empty when killed between the two.)"""
    target = tmp_path / "handles.json"
    records = [{"pid": n, "path": "p" * (n * 37 % 900)} for n in range(20)]
    write_json_in_place(target, records[0])
    rng = random.Random(31)
    for _ in range(300):
        pid = os.fork()
        if pid == 0:  # the writer: rewrites until killed
            try:
                while True:
                    for record in records:
                        write_json_in_place(target, record)
            finally:
                os._exit(1)
        try:
            time.sleep(rng.uniform(0, 0.003))
        finally:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), status
        assert read_json_checked(target) in records
    assert [p.name for p in tmp_path.iterdir()] == ["handles.json"]


def test_lock_is_exclusive_within_and_across_processes(state: StateDir) -> None:
    lock = state.lock("vm1")
    try:
        with pytest.raises(VmLockedError, match=rf"pid {os.getpid()}"):
            state.lock("vm1")
        code = (
            "import sys; from pathlib import Path; from procurator.worker.state import *\n"
            "try:\n    StateDir(Path(sys.argv[1])).lock('vm1')\n"
            "except VmLockedError:\n    sys.exit(3)\n"
        )
        other = subprocess.run([sys.executable, "-c", code, str(state.root)], check=False)
        assert other.returncode == 3
    finally:
        lock.release()
    state.lock("vm1").release()  # free again


def test_a_released_lock_can_be_taken_again_after_unlink(state: StateDir) -> None:
    # Removing a VM unlinks its lock file while holding it; a process that
    # opened the old file must not believe it owns the VM.
    lock = state.lock("vm1")
    taken: list[object] = []

    def contender() -> None:
        while True:
            try:
                taken.append(state.lock("vm1"))
                return
            except VmLockedError:
                continue

    thread = threading.Thread(target=contender)
    thread.start()
    state.remove_vm(lock)
    thread.join(10.0)
    assert len(taken) == 1
    new_lock = taken[0]
    assert isinstance(new_lock, type(lock))
    assert new_lock.path.exists()  # it locked the live file, not the unlinked one
    new_lock.release()


def test_remove_deletes_the_directory_and_the_lock(state: StateDir) -> None:
    lock = state.lock("vm1")
    state.write_spec(lock, {"hash": "h1"})
    state.remove_vm(lock)
    assert not state.exists("vm1")
    assert not (state.locks_dir / "vm1.lock").exists()
    assert not lock.held


def test_malformed_files_are_reported_with_their_path(state: StateDir) -> None:
    with state.lock("vm1") as lock:
        state.write_spec(lock, {"hash": "h1"})
    (state.root / "vms" / "vm1" / "vm.json").write_text("{nope")
    with pytest.raises(StateError, match=r"vm\.json is not valid JSON"):
        state.read_spec("vm1")
    (state.root / "vms" / "vm1" / "handles.json").write_text('{"handle": {"pid": 1}}')
    with pytest.raises(StateError, match=r"handles\.json is malformed"):
        state.read_handles("vm1")


def test_bad_ids_never_become_paths(state: StateDir) -> None:
    for bad in ("../x", "a/b", "", "UPPER", "x" * 64):
        with pytest.raises(PermanentError):
            state.vm_dir(bad)
    (state.vms_dir / "Not_A_VM").mkdir()
    assert state.vm_ids() == []


def test_changes_need_the_lock(state: StateDir) -> None:
    lock = state.lock("vm1")
    lock.release()
    with pytest.raises(RuntimeError, match="without holding its lock"):
        state.write_spec(lock, {})


def test_sweep_deletes_only_lock_files_no_vm_accounts_for(state: StateDir) -> None:
    # What a worker killed between deleting a VM's directory and unlinking
    # its lock file (or between making the lock and the directory) leaves.
    for vm_id in ("gone", "kept", "has-dir", "elsewhere"):
        state.lock(vm_id).release()
    with state.lock("has-dir") as lock:
        state.write_spec(lock, {"hash": "h1"})
    (state.locks_dir / "notes.txt").write_text("not a lock file")
    # A process holding a VM's lock manages it, directory or not.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from procurator.worker.state import StateDir\n"
            "lock = StateDir(Path(sys.argv[1])).lock('elsewhere'); print('locked', flush=True)\n"
            "sys.stdin.read()",
            str(state.root),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        assert state.sweep_locks(keep={"kept"}) == ["gone"]
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert state.lock_ids() == ["elsewhere", "has-dir", "kept"]
    assert (state.locks_dir / "notes.txt").exists()
    state.lock("gone").release()  # a swept VM can be made again
