"""A throwaway PostgreSQL cluster for tests and benchmarks.

``initdb`` in a fresh directory under /tmp, ``pg_ctl start`` on a free port
of 127.0.0.1 (trust authentication, user ``procurator``, the unix socket in
that directory), ``close()`` stops it (``-m immediate``) and removes the
directory. The server refuses to run as root, so as root every command runs
as the ``postgres`` user (``runuser``), which owns the directory.

The binaries come from ``pg_config --bindir``, else the newest
``/usr/lib/postgresql/*/bin``; without them this fails with a message
saying how to install PostgreSQL (``scripts/bootstrap.sh`` does), never
skips.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

from testnames import free_port

__all__ = ["PgCluster", "postgres_bindir"]

USER = "procurator"


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl are; RuntimeError naming the fix if nowhere."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    candidates += [
        Path(p)
        for p in sorted(
            glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[4]), reverse=True
        )
    ]
    for bindir in candidates:
        if (bindir / "initdb").exists() and (bindir / "pg_ctl").exists():
            return bindir
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql` "
        "package (scripts/bootstrap.sh does)"
    )


class PgCluster:
    """See the module docstring. ``start()`` after construction."""

    def __init__(self) -> None:
        self.bindir = postgres_bindir()
        self.dir = Path(tempfile.mkdtemp(prefix="procurator-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.port = free_port()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            shutil.chown(self.dir, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "--no-sync", "-E")
        self.running = False

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [str(self.bindir / tool), *args]
        if tool == "initdb":
            argv.append("UTF8")
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
        if result.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(
                f"{tool} {' '.join(args)} failed ({result.returncode}): "
                f"{result.stdout}{result.stderr}\n{log}"
            )
        return result

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c max_connections=200 -c full_page_writes=off"
        )
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.log), "-w", "start")
        self.running = True

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m MODE`` (immediate: as if the server crashed)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def snapshot(self) -> Path:
        """A copy of the stopped cluster's data directory (owner kept)."""
        assert not self.running, "snapshot a stopped cluster"
        copy = self.dir / f"snapshot-{uuid.uuid4().hex[:8]}"
        subprocess.run(["cp", "-a", str(self.data), str(copy)], check=True, timeout=120)
        return copy

    def restore(self, snapshot: Path) -> None:
        """The stopped cluster's data as it was at ``snapshot``: what was
        committed since is gone, as after a crash that lost commits not yet
        flushed (``synchronous_commit = off``) or a failover to a replica
        that was behind."""
        assert not self.running, "restore a stopped cluster"
        shutil.rmtree(self.data)
        subprocess.run(["cp", "-a", str(snapshot), str(self.data)], check=True, timeout=120)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        result = subprocess.run(
            [
                str(self.bindir / "psql"),
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.url(dbname),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql {sql!r}: {result.stderr}")
        return result.stdout

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
