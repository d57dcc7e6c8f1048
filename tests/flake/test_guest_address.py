"""nix/lib/guest-address.sh: the guest side of the worker's ip= parameter.

The worker writes ``ip=<addr>::<gw>:<netmask>:<vm id>:eth0:off``
(``procurator.core.netnames``); a NixOS guest built with mkVmImage applies it
with this script. Run for real with --dry-run (it prints the ``ip`` commands
instead of running them) under every POSIX shell present: dash (/bin/sh on
Debian) and busybox sh.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from flakehelpers import NIX_LIB

from procurator.core.netnames import SubnetPlan

SCRIPT = NIX_LIB / "guest-address.sh"


def _shells() -> list[list[str]]:
    shells: list[list[str]] = []
    if shutil.which("dash"):
        shells.append([shutil.which("dash") or "dash"])
    if shutil.which("busybox"):
        shells.append([shutil.which("busybox") or "busybox", "sh"])
    return shells


SHELLS = _shells()


def run(
    shell: list[str], tmp_path: Path, cmdline: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    cmdline_file = tmp_path / "cmdline"
    cmdline_file.write_text(cmdline + "\n")
    return subprocess.run(
        [*shell, str(SCRIPT), "--dry-run", "--cmdline", str(cmdline_file), *extra],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture(params=SHELLS, ids=lambda s: Path(s[0]).name)
def shell(request: pytest.FixtureRequest) -> list[str]:
    return list(request.param)


def test_a_shell_is_available() -> None:
    assert SHELLS, "neither dash nor busybox found"


def test_the_workers_own_parameter(shell: list[str], tmp_path: Path) -> None:
    plan = SubnetPlan.parse("10.120.0.0/24")
    # The exact text the worker appends (procurator/core/netnames.py).
    param = f"ip={plan.pool_address(3)}::{plan.gateway}:{plan.netmask}:web-1:eth0:off"
    proc = run(shell, tmp_path, f"console=ttyS0 init=/nix/store/x/init {param}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "ip link set dev eth0 up",
        "ip addr replace 10.120.0.5/24 dev eth0",
        "ip route replace default via 10.120.0.1 dev eth0",
    ]


@pytest.mark.parametrize(
    ("cmdline", "expected"),
    [
        ("ip=10.1.2.3/16", ["ip link set dev ens9 up", "ip addr replace 10.1.2.3/16 dev ens9"]),
        (
            "ip=off ip=192.168.7.9:::255.255.254.0:::off",
            ["ip link set dev ens9 up", "ip addr replace 192.168.7.9/23 dev ens9"],
        ),
        (
            "ip=10.0.0.2:::20::eth1:off",
            ["ip link set dev eth1 up", "ip addr replace 10.0.0.2/20 dev eth1"],
        ),
        ("ip=10.0.0.2", ["ip link set dev ens9 up", "ip addr replace 10.0.0.2/24 dev ens9"]),
    ],
)
def test_forms(shell: list[str], tmp_path: Path, cmdline: str, expected: list[str]) -> None:
    proc = run(shell, tmp_path, cmdline, "--interface", "ens9")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == expected


@pytest.mark.parametrize("cmdline", ["quiet", "ip=off", "ip=dhcp", "ip=10.0.0.2/8 ip=none"])
def test_nothing_to_do(shell: list[str], tmp_path: Path, cmdline: str) -> None:
    proc = run(shell, tmp_path, cmdline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "nothing to do" in proc.stderr


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("ip=10.0.0.2:::255.0.255.0", "'255.0.255.0' is not a valid netmask"),
        ("ip=10.0.0.2:::255.255.255", "'255.255.255' is not a valid netmask"),
        ("ip=host.example:::24", "does not start with an IPv4 address"),
        ("ip=10.0.0.2/x", "has no valid prefix length"),
    ],
)
def test_refuses_garbage(shell: list[str], tmp_path: Path, cmdline: str, message: str) -> None:
    proc = run(shell, tmp_path, cmdline)
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert message in proc.stderr


def test_unknown_argument(shell: list[str]) -> None:
    proc = subprocess.run(
        [*shell, str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 2
    assert "unknown argument '--bogus'" in proc.stderr
