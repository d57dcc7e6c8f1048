"""Finding processes by what their command line names, against real
processes: the search that finds an unrecorded VMM must not take a
bystander that names the same socket for it (and kill it)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator.worker.vmm import process


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


def _started(proc: subprocess.Popen[bytes], needle: str) -> None:
    """Wait until the child's command line is its own (exec done)."""
    deadline = time.monotonic() + 10
    while needle.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "child never exec'd"
        time.sleep(0.01)


def test_program_tells_the_vmm_from_a_bystander_naming_its_socket(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    sock = tmp_path / "vms" / "vm1" / "api.sock"
    script = tmp_path / "cloud-hypervisor"  # a VMM is the script an interpreter runs
    script.write_text("import time\ntime.sleep(300)\n")
    vmm = subprocess.Popen([sys.executable, str(script), "--api-socket", f"path={sock}"])
    # An operator's tools with the socket path on their command lines; the
    # second even names the program, but after the path (as an argument).
    sleep = "import time; time.sleep(300)"
    bystander = subprocess.Popen([sys.executable, "-c", sleep, "--unix-socket", str(sock)])
    quoting = subprocess.Popen([sys.executable, "-c", sleep, str(sock), str(script)])
    procs += [vmm, bystander, quoting]
    for proc in procs:
        _started(proc, str(sock))

    everyone = {pid for pid, _ in process.find_by_argument(sock)}
    assert {vmm.pid, bystander.pid, quoting.pid} <= everyone
    vmms = {pid for pid, _ in process.find_by_argument(sock, program="cloud-hypervisor")}
    assert vmms == {vmm.pid}
    assert process.find_by_argument(sock, program="qemu-system-x86_64") == []


def test_programs_filter_helpers_under_a_directory(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    roots = tmp_path / "gcroots"
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "nix-store"
    helper.symlink_to(sys.executable)  # argv[0] ends in nix-store
    nix = subprocess.Popen(
        [str(helper), "-c", "import time; time.sleep(300)", "--add-root", f"{roots}/vm1"]
    )
    shell = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", f"{roots}/vm1"])
    procs += [nix, shell]
    _started(nix, str(roots))
    _started(shell, str(roots))

    assert {nix.pid, shell.pid} <= {pid for pid, _ in process.find_by_argument_under(roots)}
    found = process.find_by_argument_under(roots, programs=("nix-store",))
    assert [pid for pid, _ in found] == [nix.pid]
