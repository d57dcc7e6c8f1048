"""Writable copies of disk images that live in the (read-only) store.

A copy is made the cheapest way the filesystem allows:

1. a reflink (``FICLONE``): instant, shares blocks copy-on-write; possible
   when source and target are on one btrfs / XFS (reflink=1) / bcachefs...;
2. else a sparse copy: the source's data extents (``SEEK_DATA`` /
   ``SEEK_HOLE``) are read in 1 MiB chunks and written but for their
   all-zero 64 KiB blocks, which are left as holes. Store files are never
   sparse (a NAR has no holes), while a fresh disk image is mostly zeros, so
   this keeps the copy small.

A copy is built under a temporary name, flushed (``fsync``), then linked to
its final name, which must not exist yet: a file at the final name is
therefore always complete, even after a crash or power loss, and a copy in
use by a VM is never overwritten. The source is only ever opened read-only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Literal

from procurator.durable import fsync_dir

__all__ = ["CopyMethod", "clone_or_copy", "remove_partials"]

CopyMethod = Literal["reflink", "copy"]

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h
_CHUNK = 1 << 20
# Zero detection granularity: a multiple of any filesystem's block size,
# small enough to find the holes between a disk image's scattered metadata.
_BLOCK = 64 << 10
_ZEROS = bytes(_CHUNK)
# What FICLONE says when this pair of files cannot share blocks.
_NO_REFLINK = {errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY, errno.ENOSYS}


def clone_or_copy(source: Path, target: Path, *, allow_reflink: bool = True) -> CopyMethod:
    """Create ``target`` (which must not exist) as a writable (0600) copy of
    ``source``; return how. Raises ``FileExistsError`` if ``target`` appeared
    meanwhile (the other copy is kept), ``OSError`` on I/O errors (no partial
    file is left behind)."""
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial")
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as dst:
            method = _fill(src.fileno(), dst.fileno(), allow_reflink=allow_reflink)
            os.fsync(dst.fileno())
        os.link(partial, target)  # never replaces: FileExistsError if present
        fsync_dir(target.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
    return method


def remove_partials(directory: Path) -> None:
    """Delete the leftovers of copies interrupted by a crash."""
    with contextlib.suppress(FileNotFoundError):
        for entry in directory.iterdir():
            if entry.name.startswith(".") and entry.name.endswith(".partial"):
                entry.unlink(missing_ok=True)


def _fill(src: int, dst: int, *, allow_reflink: bool) -> CopyMethod:
    if allow_reflink:
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except OSError as err:
            if err.errno not in _NO_REFLINK:
                raise
        else:
            return "reflink"
    _sparse_copy(src, dst)
    return "copy"


def _sparse_copy(src: int, dst: int) -> None:
    size = os.fstat(src).st_size
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        end = os.lseek(src, start, os.SEEK_HOLE)
        position = start
        while position < end:
            chunk = os.pread(src, min(_CHUNK, end - position), position)
            if not chunk:  # the file shrank: impossible in the store
                raise OSError(errno.EIO, "source file shrank while being copied")
            if chunk != _ZEROS[: len(chunk)]:
                _write_nonzero_blocks(dst, chunk, position)
            position += len(chunk)
        offset = end
    os.ftruncate(dst, size)  # the trailing holes


def _write_nonzero_blocks(fd: int, chunk: bytes, offset: int) -> None:
    """Write ``chunk`` at ``offset``, leaving its all-zero blocks as holes
    (runs of non-zero blocks are written at once)."""
    start: int | None = None  # of the current run of non-zero blocks
    for at in range(0, len(chunk), _BLOCK):
        zero = chunk[at : at + _BLOCK] == _ZEROS[: min(_BLOCK, len(chunk) - at)]
        if zero and start is not None:
            _pwrite_all(fd, chunk[start:at], offset + start)
            start = None
        elif not zero and start is None:
            start = at
    if start is not None:
        _pwrite_all(fd, chunk[start:], offset + start)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
