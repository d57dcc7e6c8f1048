"""The master's composition root (``procurator.app.master``), run in this
process on a real socket and a real SQLite file."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import trio

from procurator.app.master import MasterConfig, run_master
from procurator.core.errors import PermanentError


async def _start_and_stop(db: Path) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(run_master, MasterConfig(listen="127.0.0.1:0", db=db))
        nursery.cancel_scope.cancel()


async def test_a_master_makes_its_database_directory(tmp_path: Path) -> None:
    """A fresh host has no /var/lib/procurator: the master makes the
    directory of its database (the fleet is in there: 0700) and starts."""
    db = tmp_path / "var-lib" / "procurator" / "master.db"
    await _start_and_stop(db)
    assert db.is_file()
    assert stat.S_IMODE(db.parent.stat().st_mode) == 0o700
    assert db.parent.parent.is_dir()


async def test_an_existing_database_directory_is_left_as_it_is(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    await _start_and_stop(directory / "master.db")
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755


async def test_a_database_directory_that_cannot_be_made_is_named(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    config = MasterConfig(listen="127.0.0.1:0", db=tmp_path / "a-file" / "db" / "master.db")
    with pytest.raises(PermanentError, match=r"database directory .*a-file/db: Not a directory"):
        await run_master(config)  # refused before it starts anything
