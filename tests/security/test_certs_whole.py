"""``procurator certs`` writes a certificate and its key together or not at
all: a write that fails half way (here: a file-size limit the key fits
under and the certificate does not, set with util-linux ``prlimit`` on a
real process) leaves nothing behind, says why without a traceback, and the
same command simply works once the cause is gone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# An ECDSA P-256 key in PEM is about 240 bytes, a certificate 500-700.
FITS_A_KEY_NOT_A_CERTIFICATE = 400


def _certs(*args: str, limit: int | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["prlimit", f"--fsize={limit}:{limit}"] if limit is not None else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "procurator", "certs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "args",
    [["init"], ["issue", "--worker", "host-a"]],
    ids=["init", "issue"],
)
def test_a_pair_that_cannot_be_written_leaves_nothing(tmp_path: Path, args: list[str]) -> None:
    pki = tmp_path / "pki"
    if args[0] == "issue":
        assert _certs("init", str(pki)).returncode == 0
    before = sorted(os.listdir(pki)) if pki.exists() else []

    failed = _certs(args[0], str(pki), *args[1:], limit=FITS_A_KEY_NOT_A_CERTIFICATE)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    assert "File too large" in failed.stderr, failed.stderr
    assert sorted(os.listdir(pki)) == before  # no key without its certificate, no temp file

    again = _certs(args[0], str(pki), *args[1:])
    assert again.returncode == 0, again.stderr
