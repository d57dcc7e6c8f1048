"""Helpers of the security tests: the CLI, a fleet PKI made with
``procurator certs`` (plus a second, foreign CA), masters run as real
processes. A module of its own: several test directories have a conftest.py."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fleethelpers import run_cli

from procurator.rpc.tls import TlsFiles

_TLS_ENV = ("PROCURATOR_TLS_CERT", "PROCURATOR_TLS_KEY", "PROCURATOR_TLS_CA")


def plain_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: whatever TLS files the developer's shell
    names are dropped (the tests choose their own), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _TLS_ENV}
    env.update(extra or {})
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``procurator ARGS`` to completion."""
    return run_cli(plain_env(env), *args, timeout=timeout)


@dataclass(frozen=True)
class Pki:
    """Certificates of a fleet (``fleet``) and of a foreign CA (``foreign``)."""

    fleet: Path
    foreign: Path

    def files(self, stem: str, *, foreign: bool = False) -> TlsFiles:
        base = self.foreign if foreign else self.fleet
        return TlsFiles(base / f"{stem}.crt", base / f"{stem}.key", base / "ca.crt")

    def stranger(self, stem: str) -> TlsFiles:
        """A foreign CA's certificate and key that trusts the fleet CA: it
        accepts the master, so only the master can refuse it."""
        foreign = self.files(stem, foreign=True)
        return TlsFiles(foreign.cert, foreign.key, self.fleet / "ca.crt")

    def flags(self, stem: str, *, foreign: bool = False) -> list[str]:
        files = self.files(stem, foreign=foreign)
        return [
            "--tls-cert",
            str(files.cert),
            "--tls-key",
            str(files.key),
            "--tls-ca",
            str(files.ca),
        ]


def certs(*args: str) -> None:
    result = cli("certs", *args)
    assert result.returncode == 0, result.stderr


class MasterProcess:
    """A ``procurator master`` process; ``address`` once it listens."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path) -> None:
        self.popen = popen
        self.log = log
        self.address = ""

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, pattern: str, timeout: float = 30) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.text())
            if match is not None:
                return match
            if self.popen.poll() is not None:
                raise AssertionError(
                    f"master exited ({self.popen.returncode}) before logging {pattern!r}:\n"
                    + self.text()
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"master never logged {pattern!r}:\n" + self.text())
            time.sleep(0.05)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@contextlib.contextmanager
def master_process(tmp_path: Path, *args: str, name: str = "master") -> Iterator[MasterProcess]:
    """Run ``procurator master ARGS`` (its own db, no metrics) and wait until
    it listens; stopped on exit, whatever happened."""
    log = tmp_path / f"{name}.log"
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "procurator",
                "master",
                "--db",
                str(tmp_path / f"{name}.db"),
                "--metrics-listen",
                "",
                "--log-level",
                "debug",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=plain_env(),
        )
    proc = MasterProcess(popen, log)
    try:
        # The line saying where it listens, once bound; not the --insecure
        # warning, which names "the master listening on" the address asked
        # for (port 0) before binding.
        match = proc.wait_for_log(r"master listening on (\S+) \((?:mutual TLS|plaintext),")
        proc.address = match.group(1)
        yield proc
    finally:
        proc.stop()


def tls_master_args(pki: Pki, *extra: str) -> Sequence[str]:
    return ["--listen", "127.0.0.1:0", *pki.flags("master"), *extra]


def make_pki(root: Path) -> Pki:
    """The fleet's and a foreign CA's certificates, made with ``procurator certs``."""
    made = Pki(root / "fleet", root / "foreign")
    for base in (made.fleet, made.foreign):
        certs("init", str(base))
        certs("issue", str(base), "--master")
        certs("issue", str(base), "--worker", "host-a")
        certs("issue", str(base), "--control", "ci")
    certs("issue", str(made.fleet), "--worker", "host-b")
    return made
