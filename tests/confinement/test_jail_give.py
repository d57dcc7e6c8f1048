"""A jailed VM's writable directories are given to its uid before each
launch (``procurator.worker.jail._give``): whatever is in one that exists
(a VMM that ran as that uid may have left files and symlinks there) is
walked and given, never through a symlink; one made for this launch is
empty, so it is not walked (issue 31: the walk was a dozen syscalls of
every VM's first start). Checked by the system calls of a real process
(``strace``) and by the owners it leaves."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

UID = 61_234  # a uid no one here uses


def _give_traced(tmp_path: Path, directory: Path) -> str:
    """The trace of the directory reads (``getdents64``) of ``directory``
    (and below) made by a process that gives it to ``UID``."""
    trace = tmp_path / "trace"
    script = (
        "from pathlib import Path\n"
        "from procurator.worker.jail import _give\n"
        f"_give(Path({str(directory)!r}), {UID}, {UID})\n"
    )
    strace = ["strace", "-f", "-qq", "-y", "-e", "trace=getdents64", "-o", str(trace)]
    subprocess.run([*strace, sys.executable, "-c", script], check=True, timeout=60)
    return "".join(line for line in trace.read_text().splitlines(True) if str(directory) in line)


def test_a_directory_made_for_the_launch_is_given_without_a_walk(tmp_path: Path) -> None:
    run = tmp_path / "vm" / "run"
    run.parent.mkdir()
    calls = _give_traced(tmp_path, run)
    assert "getdents64" not in calls, calls
    st = os.stat(run)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (UID, UID, 0o700)


def test_what_a_directory_holds_is_given_and_no_symlink_followed(tmp_path: Path) -> None:
    run = tmp_path / "vm" / "run"
    (run / "sub").mkdir(parents=True)
    (run / "sub" / "serial.log").write_text("left by the last VMM\n")
    outside = tmp_path / "host-file"
    outside.write_text("not the VM's\n")
    (run / "planted").symlink_to(outside)
    calls = _give_traced(tmp_path, run)
    assert "getdents64" in calls
    for path in (run, run / "sub", run / "sub" / "serial.log"):
        assert os.stat(path).st_uid == UID, path
    assert os.lstat(run / "planted").st_uid == UID
    assert os.stat(outside).st_uid == os.getuid()  # the link's target is left alone
