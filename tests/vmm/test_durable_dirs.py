"""A record made durable is durable with every directory made for it: a new
VM's ``vms/<id>/vm.json`` is fsynced, and so is each directory that was
made new for it into its parent (``procurator.durable``). Checked by the
system calls a real process makes (``strace -y`` names each fsync's
directory), not by a power loss."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from procurator.durable import make_dirs

_FSYNC = re.compile(r"^(?:\d+ +)?fsync\(\d+<(?P<path>[^>]*)>\) += 0", re.MULTILINE)


def _fsynced(tmp_path: Path, script: str) -> list[Path]:
    """The paths a Python process running ``script`` fsynced, in order."""
    trace = tmp_path / "trace"
    strace = ["strace", "-f", "-qq", "-y", "-e", "trace=fsync", "-o", str(trace)]
    subprocess.run(
        [*strace, sys.executable, "-c", script],
        check=True,
        timeout=60,
    )
    return [Path(m["path"]) for m in _FSYNC.finditer(trace.read_text())]


def test_a_new_vms_record_is_durable_with_its_new_directories(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "vms").mkdir(parents=True)  # the worker's state dir, as prepared
    script = (
        "from pathlib import Path\n"
        "from procurator.worker.state import StateDir\n"
        f"state = StateDir(Path({str(root)!r}))\n"
        "lock = state.lock('vm-1')\n"
        "state.write_spec(lock, {'id': 'vm-1'})\n"
        "lock.release()\n"
    )
    fsynced = _fsynced(tmp_path, script)
    vm_dir = root / "vms" / "vm-1"
    assert vm_dir / "vm.json" in fsynced or any(p.parent == vm_dir for p in fsynced)
    # The new vms/vm-1 is a name in vms/: without vms/'s fsync a power loss
    # could take the VM's directory, and its record with it.
    assert vm_dir in fsynced, fsynced
    assert root / "vms" in fsynced, fsynced
    # Nothing above what existed: vms/ was there before.
    assert root not in fsynced, fsynced


def test_make_dirs_fsyncs_each_new_directory_into_its_parent(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    script = (
        "from pathlib import Path\n"
        "from procurator.durable import make_dirs\n"
        f"make_dirs(Path({str(tmp_path / 'a' / 'b' / 'c' / 'd')!r}))\n"
        # Again: all of it exists, nothing to make durable.
        f"make_dirs(Path({str(tmp_path / 'a' / 'b' / 'c' / 'd')!r}))\n"
    )
    fsynced = _fsynced(tmp_path, script)
    a = tmp_path / "a"
    assert sorted(fsynced) == sorted([a, a / "b", a / "b" / "c"])
    assert (a / "b" / "c" / "d").is_dir()


def test_make_dirs_refuses_a_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file")
    with pytest.raises(FileExistsError):
        make_dirs(tmp_path / "file" / "below")
