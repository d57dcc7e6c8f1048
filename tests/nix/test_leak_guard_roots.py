"""The suite's leak guard (tests/conftest.py) on Nix GC roots, run for real:
an inner pytest session with the guard, in its own process, whose tests make
real indirect roots and delete their directories. A dangling root in a
directory the test made is the test's leak; one in a directory another
process made (a benchmark's ``/tmp/procurator-bench-*``, deleted while a test
runs) is not, and once failed whichever test was running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nixtool_helpers import NixTool

from procurator.nix.store import auto_root_name

TESTS = Path(__file__).resolve().parents[1]

# Makes an indirect root <dir>/root -> $STORE_PATH (the dir made by this
# process with the given prefix), records the link in $LINKS, deletes the dir.
_MAKE_DANGLING = """
import os, shutil, subprocess, sys, tempfile
made = tempfile.mkdtemp(prefix=sys.argv[1], dir="/tmp")
link = os.path.join(made, "root")
with open(os.environ["LINKS"], "a") as links:
    links.write(link + "\\n")
subprocess.run(["nix-store", "--realise", os.environ["STORE_PATH"], "--add-root", link],
               check=True, capture_output=True)
shutil.rmtree(made)
"""

_INNER = f"""
import os, shutil, subprocess, sys, tempfile

MAKE = {_MAKE_DANGLING!r}


def test_root_of_another_run():
    # Another process (a benchmark) made the directory and dropped it.
    subprocess.run([sys.executable, "-c", MAKE, "procurator-bench-"], check=True)


def test_root_in_own_dir_leaks():
    # The test made the directory, a child rooted in it, the test dropped it.
    made = tempfile.mkdtemp(prefix="plg-", dir="/tmp")
    subprocess.run([sys.executable, "-c", MAKE.replace("dir=\\"/tmp\\"", "dir=sys.argv[2]"),
                    "sub-", made], check=True)
    shutil.rmtree(made)
"""


def test_guard_blames_own_dangling_root_not_another_runs(
    nix: NixTool, nix_env: dict[str, str], tmp_path: Path
) -> None:
    path = nix.add({"vm-config.json": "{}"}, name="leak-guard")
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (inner / "test_inner_roots.py").write_text(_INNER)
    links = tmp_path / "links"
    env = {
        **os.environ,
        **nix_env,
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        "STORE_PATH": path,
        "LINKS": str(links),
    }
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-rA",
                "-p",
                "no:cacheprovider",
                "--rootdir",
                str(inner),
                "--basetemp",
                str(tmp_path / "basetemp"),
                str(inner),
            ],
            env=env,
            cwd=inner,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
    finally:
        auto = Path(os.environ.get("NIX_STATE_DIR", "/nix/var/nix")) / "gcroots" / "auto"
        for link in links.read_text().splitlines() if links.exists() else ():
            (auto / auto_root_name(link)).unlink(missing_ok=True)
    out = done.stdout
    # -rA lists a test's passed call and then its teardown's error apart.
    assert "PASSED test_inner_roots.py::test_root_of_another_run" in out, out
    assert "ERROR test_inner_roots.py::test_root_of_another_run" not in out, out
    assert "ERROR test_inner_roots.py::test_root_in_own_dir_leaks" in out, out
    assert "test leaked {'gc roots'" in out, out
    assert len(links.read_text().splitlines()) == 2
