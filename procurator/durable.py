"""Durable files and directories: what a power loss cannot take back.

An ``fsync`` of a file makes its data durable; its *name* is an entry of
its directory, made durable only by an ``fsync`` of that directory. A
directory made new is itself a name in its parent, and so on up: a record
written durably into a brand-new directory (a new VM's ``vms/<id>/vm.json``)
is lost with the directory after a power loss unless every directory made
for it was also fsynced into its parent. Hence one rule for every place
that keeps durable state (the worker's records, its VMs' disk copies,
snapshots, a move's received disks):

- ``make_dirs`` makes a directory and its missing parents like ``mkdir -p``
  and fsyncs the parent of each one it made, up to the first that existed
  (durable itself by the same rule when it was made);
- ``fsync_dir`` makes a directory's entries durable (after a rename or a
  link into it);
- ``fsync_tree`` makes a set of files built under a temporary directory
  durable (every file and every directory of it) before the set is renamed
  into place, so the name never stands for less than the whole set.

A worker that merely dies (even by SIGKILL) sees everything the kernel
accepted: fsyncs are only about the page cache not reaching the disk.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "fsync_tree", "make_dirs"]


def fsync_dir(directory: Path) -> None:
    """Make ``directory``'s entries (names made, renamed or removed in it)
    durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path, mode: int = 0o777) -> None:
    """Make ``path`` and its missing parents (``mode``, less the umask) and
    make each new one durable: an fsync of the parent of every directory
    made here, up to the first that existed. A directory that exists costs
    one ``stat``. One that another thread or process makes at the same
    moment is fsynced into its parent as well (its maker may not have yet).
    Raises ``OSError`` (``FileExistsError`` when a non-directory is in the
    way)."""
    missing: list[Path] = []
    at = path
    while not at.is_dir():
        missing.append(at)
        if at.parent == at:
            break
        at = at.parent
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:
            if not directory.is_dir():
                raise
    for directory in missing:
        fsync_dir(directory.parent)


def fsync_tree(root: Path) -> int:
    """Make every file and directory under ``root`` (itself included)
    durable; return the files' apparent bytes. Symbolic links are not
    followed."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fsync_dir(Path(folder))
    return total
