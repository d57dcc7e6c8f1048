"""What writing a VM's records costs in system calls (issue 31: the
worker's CPU per VM start; each call is a GIL hand-off on a busy worker).
A start writes ``handles.json`` three times into the VM's directory,
made already by its ``vm.json``: those writes open, write and close it
in place (no temporary file, no rename: a new inode and a freed one
each, dear on ext4 without a journal), and make no directory and look
at none. A record's first write
into a directory that is not there yet still makes it (durable: fsynced
into its parent, ``test_durable_dirs``). Checked by the system calls of a
real process (``strace``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

_CALL = re.compile(r"^(?:\d+ +)?(?P<name>\w+)\((?P<args>.*)$", re.MULTILINE)


def _calls(tmp_path: Path, script: str, under: Path) -> list[str]:
    """The file-system calls (by name) a Python process running ``script``
    made on paths under ``under``, in order."""
    trace = tmp_path / "trace"
    strace = ["strace", "-f", "-qq", "-e", "trace=%file", "-o", str(trace)]
    subprocess.run([*strace, sys.executable, "-c", script], check=True, timeout=60)
    return [m["name"] for m in _CALL.finditer(trace.read_text()) if f'"{under}' in m["args"]]


def test_rewriting_a_record_makes_no_directory_and_stats_none(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "vms").mkdir(parents=True)
    vm_dir = root / "vms" / "vm-1"
    script = (
        "from pathlib import Path\n"
        "from procurator.worker.state import HandlesRecord, StateDir\n"
        f"state = StateDir(Path({str(root)!r}))\n"
        "lock = state.lock('vm-1')\n"
        "state.write_spec(lock, {'id': 'vm-1'})\n"
        "for hash in ('a', 'b', 'c'):\n"
        "    state.write_handles(lock, HandlesRecord('fake', hash=hash))\n"
        "lock.release()\n"
    )
    calls = _calls(tmp_path, script, vm_dir)
    # vm.json's write made the directory (and opened it to fsync it after
    # its rename); each handles.json write after it is one open of the
    # record itself.
    first = calls.index("rename")
    assert "mkdir" in calls[:first]
    assert calls[first + 1 :] == ["openat"] + ["openat"] * 3, calls
    record = (vm_dir / "handles.json").read_text()
    assert '"hash": "c"' in record


def test_a_records_first_write_makes_its_directory(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "vms").mkdir(parents=True)
    script = (
        "from pathlib import Path\n"
        "from procurator.worker.state import HandlesRecord, StateDir\n"
        f"state = StateDir(Path({str(root)!r}))\n"
        "lock = state.lock('vm-1')\n"
        "state.write_handles(lock, HandlesRecord('fake', hash='a'))\n"
        "lock.release()\n"
    )
    calls = _calls(tmp_path, script, root / "vms" / "vm-1")
    # The record's open finds no directory, so the directory is made, then
    # the record opened (made) again.
    first = calls.index("mkdir")
    assert calls[first - 1] == "openat" and calls[first + 1 :] == ["openat"], calls
    assert '"hash": "a"' in (root / "vms" / "vm-1" / "handles.json").read_text()
