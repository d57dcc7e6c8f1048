"""scripts/setup-network.sh, run for real inside a throwaway namespace that
has a veth "uplink" with a default route."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from nethelpers import Netns

from procurator.core.netnames import bridge_mac, host_mac
from procurator.worker.network import NetworkManager

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup-network.sh"
# Not changes the script makes: bridge timers tick, IPv6 DAD finishes on its
# own, and a device that was ever up keeps the qdisc it got (noop -> noqueue).
_VOLATILE = re.compile(r"\b\w+_timer\s+[\d.]+|\btentative\b|\bqdisc \S+")


def run_script(*args: str, state_dir: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(SCRIPT), "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def snapshot(netns: Netns) -> dict[str, str]:
    def inside(*argv: str) -> str:
        return subprocess.run(
            ["ip", "netns", "exec", netns.name, *argv],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    return {
        "addr": _VOLATILE.sub("", netns.ip("-d", "addr").stdout),
        "routes": netns.ip("route").stdout,
        "nft": inside("nft", "list", "ruleset"),
        "forwarding": inside("sysctl", "net.ipv4.ip_forward"),
    }


def assert_same(before: dict[str, str], after: dict[str, str]) -> None:
    """Equal snapshots, or a failure showing a readable diff."""
    diffs = [
        "\n".join(difflib.unified_diff(before[k].splitlines(), after[k].splitlines(), k, k))
        for k in before
        if before[k] != after[k]
    ]
    assert not diffs, "\n".join(diffs)


@pytest.fixture
def uplinked(netns: Netns) -> Netns:
    netns.ip("link", "add", "up0", "type", "veth", "peer", "name", "up0-peer")
    netns.ip("addr", "add", "192.0.2.2/24", "dev", "up0")
    netns.ip("link", "set", "dev", "up0", "up")
    netns.ip("route", "add", "default", "via", "192.0.2.1")
    return netns


def test_help() -> None:
    result = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=True)
    for word in ("--down", "--bridge", "--subnet", "--uplink", "--netns", "PROCURATOR_BRIDGE"):
        assert word in result.stdout


@pytest.mark.root
def test_up_is_idempotent_and_down_leaves_nothing(uplinked: Netns, tmp_path: Path) -> None:
    state_dir = tmp_path / "netstate"
    before = snapshot(uplinked)

    run_script("--netns", uplinked.name, state_dir=state_dir)
    after_first = snapshot(uplinked)
    bridge = uplinked.link("br-procurator")
    assert bridge is not None and bridge["address"] == bridge_mac("br-procurator")
    assert uplinked.ipv4("br-procurator") == {"10.120.0.1/24"}
    assert "net.ipv4.ip_forward = 1" in after_first["forwarding"]
    assert "table ip procurator" in after_first["nft"]
    assert 'oifname "up0" masquerade' in after_first["nft"]
    assert "ip saddr 10.120.0.0/24" in after_first["nft"]

    second = run_script("--netns", uplinked.name, state_dir=state_dir)
    assert_same(after_first, snapshot(uplinked))
    assert second.stdout == ""  # it had nothing to do

    run_script("--netns", uplinked.name, "--down", state_dir=state_dir)
    assert_same(before, snapshot(uplinked))
    assert not state_dir.exists()


@pytest.mark.root
def test_down_undoes_only_what_it_made(uplinked: Netns, tmp_path: Path) -> None:
    # The operator already had the bridge, with its address, and forwarding on.
    uplinked.ip("link", "add", "br-vms", "type", "bridge")
    uplinked.ip("addr", "add", "10.50.0.1/24", "dev", "br-vms")
    subprocess.run(
        ["ip", "netns", "exec", uplinked.name, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
        check=True,
    )
    before = snapshot(uplinked)
    state_dir = tmp_path / "netstate"
    # Run under `ip netns exec` instead of --netns, configured by environment.
    result = subprocess.run(
        ["ip", "netns", "exec", uplinked.name, str(SCRIPT), "--state-dir", str(state_dir)],
        env={
            "PATH": os.environ["PATH"],
            "PROCURATOR_BRIDGE": "br-vms",
            "PROCURATOR_SUBNET": "10.50.0.0/24",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "UP" in uplinked.require("br-vms")["flags"]

    run_script("--netns", uplinked.name, "--bridge", "br-vms", "--subnet", "10.50.0.0/24",
               "--down", state_dir=state_dir)  # fmt: skip
    # Bridge, address and forwarding are kept; the bridge is down again.
    assert_same(before, snapshot(uplinked))
    assert uplinked.link("br-vms") is not None


@pytest.mark.root
def test_bad_input_is_refused_clearly(uplinked: Netns, tmp_path: Path) -> None:
    state_dir = tmp_path / "netstate"
    for args, message in [
        (["--subnet", "10.1.2.3/24"], "host bits are set"),
        (["--subnet", "10.0.0.0/31"], "bad subnet"),
        (["--uplink", "nope0"], "uplink nope0 does not exist"),
        (["--netns", "no-such-ns-here"], "does not exist"),
    ]:
        netns_args = [] if "--netns" in args else ["--netns", uplinked.name]
        result = run_script(*netns_args, *args, state_dir=state_dir, check=False)
        assert result.returncode != 0
        assert message in result.stderr, result.stderr
    uplinked.ip("route", "del", "default")
    result = run_script("--netns", uplinked.name, state_dir=state_dir, check=False)
    assert result.returncode != 0 and "--uplink" in result.stderr
    run_script("--netns", uplinked.name, "--down", state_dir=state_dir)
    assert uplinked.link("br-procurator") is None


@pytest.mark.root
def test_a_worker_uses_the_bridge_the_script_made(
    uplinked: Netns, tmp_path: Path, make_manager: Callable[..., NetworkManager]
) -> None:
    state_dir = tmp_path / "netstate"
    run_script("--netns", uplinked.name, state_dir=state_dir)
    manager = make_manager(manage_bridge=False)
    nic = manager.ensure_vm("web-1")
    tap = uplinked.link(nic.tap)
    assert tap is not None and tap["master"] == "br-procurator"
    assert tap["address"] == host_mac(nic.mac)
    manager.release_vm("web-1")
    run_script("--netns", uplinked.name, "--down", state_dir=state_dir)
    assert uplinked.link("br-procurator") is None
