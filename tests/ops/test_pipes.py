"""Every command in a pipe: real ``procurator`` processes writing into real
pipes whose reader went away (``procurator status | head``).

The rule (procurator/cli/pipes.py, README "Exit status"): a command whose reader
went away ends quietly with exit status 141 (128 + SIGPIPE), no traceback
and nothing on stderr; what it did before printing stays whole (an apply is
stored, certificates are complete); a daemon whose log reader went away
keeps serving and exits 0 when told to stop.

A pipe whose read end is already closed makes the first write fail every
time, so these tests do not depend on who is faster. Both of Python's output
modes are run: block-buffered (the default: the write fails at a flush,
possibly at exit) and unbuffered (``PYTHONUNBUFFERED``: the write fails
where it is made).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fleethelpers import AddImage, FakeFleet
from opshelpers import until_reader_gone, vm_config

EXIT_OUTPUT_CLOSED = 141
MODES = ["buffered", "unbuffered"]


def _env(base: dict[str, str], mode: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k != "PYTHONUNBUFFERED"}
    if mode == "unbuffered":
        env["PYTHONUNBUFFERED"] = "1"
    return env


@contextlib.contextmanager
def _closed_pipe() -> Iterator[int]:
    """The write end of a pipe nobody reads any more."""
    read, write = os.pipe()
    os.close(read)
    try:
        yield write
    finally:
        os.close(write)


def _into_closed_pipe(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``procurator ARGS | <a reader that is gone>``; stderr captured."""
    with _closed_pipe() as out:
        return subprocess.run(
            [sys.executable, "-m", "procurator", *args],
            stdout=out,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
            timeout=90,
            check=False,
        )


def _misbehaved(
    env: dict[str, str], commands: list[list[str]], cwd: Path | None = None
) -> dict[str, str]:
    """Each command that did not end quietly with 141: how it ended."""
    found = {}
    for args in commands:
        result = _into_closed_pipe(env, *args, cwd=cwd)
        if result.returncode != EXIT_OUTPUT_CLOSED or result.stderr:
            found[" ".join(args)] = f"exit {result.returncode}, stderr: {result.stderr[-600:]!r}"
    return found


@pytest.mark.parametrize("mode", MODES)
def test_help_and_version_into_a_closed_pipe(mode: str) -> None:
    env = _env(dict(os.environ), mode)
    commands = [
        ["--help"],
        ["--version"],
        ["status", "--help"],
        ["events", "--help"],
        ["master", "--help"],
        ["certs", "issue", "--help"],
    ]
    assert _misbehaved(env, commands) == {}


@pytest.mark.root
@pytest.mark.nix
@pytest.mark.parametrize("mode", MODES)
def test_client_commands_into_a_closed_pipe(
    fake_fleet: FakeFleet, add_image: AddImage, mode: str
) -> None:
    image = add_image("pipe-vm", vm_config())
    one = f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}" }} ]\n'
    fake_fleet.apply_ok(one)
    (fake_fleet.dir / "one.toml").write_text(one)
    env = _env(fake_fleet.env, mode)
    commands = [
        ["status"],
        ["status", "--json"],
        ["describe", "vm", "web-1"],
        ["describe", "vm", "web-1", "--json"],
        ["events"],
        ["events", "--json"],
        ["events", "--vm", "web-1", "--follow"],
        ["apply", "one.toml", "--dry-run"],
        ["apply", "one.toml"],
    ]
    assert _misbehaved(env, commands, cwd=fake_fleet.dir) == {}

    # An apply whose output nobody reads is still sent, stored and pushed
    # whole: its reader going away cannot cut it in half.
    two = one.replace(" ]\n", f', {{ id = "web-2", image = "{image}" }} ]\n')
    (fake_fleet.dir / "two.toml").write_text(two)
    assert _misbehaved(env, [["apply", "two.toml", "--wait"]], cwd=fake_fleet.dir) == {}
    assert fake_fleet.json("status")["generation"] == 2
    fake_fleet.wait_for(
        "web-2 to run",
        lambda: fake_fleet.status_vms().get("web-2", {}).get("phase") == "running",
    )


@pytest.mark.root
@pytest.mark.nix
def test_follow_ends_when_its_reader_does(fake_fleet: FakeFleet, add_image: AddImage) -> None:
    """``events --follow | head -n 1`` ends after head does, though no new
    event ever comes: the follower notices the reader leave while it waits."""
    image = add_image("follow-vm", vm_config())
    fake_fleet.apply_ok(f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{image}" }} ]\n')
    lines = until_reader_gone(fake_fleet.env, "events --follow")
    assert len(lines) == 2 and "web-1" in lines[0], lines
    assert lines[1] == f"procurator exited {EXIT_OUTPUT_CLOSED}", lines


@pytest.mark.root
@pytest.mark.nix
@pytest.mark.parametrize("mode", MODES)
def test_daemons_outlive_their_log_reader(fake_fleet: FakeFleet, mode: str) -> None:
    """A master and a worker whose logs went into a pipe keep serving when
    the reader goes away (``procurator master 2>&1 | head``), and stop
    cleanly, exit status 0, when told to."""
    env = _env(fake_fleet.env, mode)
    sock = fake_fleet.dir / "piped.sock"
    daemons = {
        "master": [
            "master",
            "--listen",
            f"unix:{sock}",
            "--db",
            str(fake_fleet.dir / "piped.db"),
            "--metrics-listen",
            "",
            "--log-level",
            "debug",
        ],
        "worker": [
            "worker",
            "--id",
            "host-piped",
            "--state-dir",
            str(fake_fleet.dir / "piped-worker"),
            "--no-network",
            "--metrics-listen",
            "",
            "--log-level",
            "debug",
        ],
    }
    for name, args in daemons.items():
        read, write = os.pipe()
        popen = subprocess.Popen(
            [sys.executable, "-m", "procurator", *args],
            stdout=write,
            stderr=write,
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(write)
        try:
            with os.fdopen(read, "rb") as reader:
                assert reader.readline(), f"{name} logged nothing"
            # The reader is gone; every line logged from now on fails.
            if name == "worker":
                fake_fleet.wait_for(
                    "the piped worker to connect",
                    lambda: any(
                        w["worker_id"] == "host-piped" and w["connected"]
                        for w in fake_fleet.json("status")["workers"]
                    ),
                )
            else:
                # It serves: a client's connection is logged (and lost).
                fake_fleet.wait_for(
                    "the piped master to answer",
                    lambda: fake_fleet.cli("status", "--master", f"unix:{sock}").returncode == 0,
                )
            assert popen.poll() is None, f"{name} died when its log reader went away"
            popen.send_signal(signal.SIGTERM)
            assert popen.wait(timeout=60) == 0, f"{name} did not exit cleanly"
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()


@pytest.mark.parametrize("mode", MODES)
def test_master_database_commands_into_a_closed_pipe(tmp_path: Path, mode: str) -> None:
    """``procurator master migrate|export`` print and end: they are client
    commands under a daemon's name, so a reader gone away ends them with
    141 too (not 0 with their output silently dropped)."""
    env = _env(dict(os.environ), mode)
    db = str(tmp_path / "m.db")
    assert _misbehaved(env, [["master", "migrate", "--database", db]]) == {}
    # Once it has written, export says so on stderr (still read); nothing else.
    export = _into_closed_pipe(env, "master", "export", "--database", db)
    assert export.returncode == EXIT_OUTPUT_CLOSED, export.stderr
    said = export.stderr.splitlines()
    assert all(line.startswith("exported generation 0:") for line in said), export.stderr


@pytest.mark.parametrize("mode", MODES)
def test_certs_into_a_closed_pipe_leave_whole_files(tmp_path: Path, mode: str) -> None:
    env = _env(dict(os.environ), mode)
    pki = tmp_path / "pki"
    commands = [
        ["certs", "init", str(pki)],
        ["certs", "issue", str(pki), "--master"],
        ["certs", "issue", str(pki), "--worker", "host-a"],
    ]
    assert _misbehaved(env, commands) == {}
    assert sorted(p.name for p in pki.iterdir()) == [
        "ca.crt",
        "ca.key",
        "master.crt",
        "master.key",
        "worker-host-a.crt",
        "worker-host-a.key",
    ]
    ca = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    for stem in ("ca", "master", "worker-host-a"):
        cert = x509.load_pem_x509_certificate((pki / f"{stem}.crt").read_bytes())
        key = serialization.load_pem_private_key((pki / f"{stem}.key").read_bytes(), None)
        assert cert.public_key() == key.public_key(), f"{stem}: key and certificate differ"
        cert.verify_directly_issued_by(ca)
