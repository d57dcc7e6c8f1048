"""NetworkManager against the real kernel, each test in its own namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from nethelpers import Netns

from procurator.core.errors import LimitExceededError, PermanentError, TemporaryError
from procurator.core.netnames import VmNic, bridge_mac, host_mac, tap_name
from procurator.worker.network import (
    BridgeMissingError,
    InterfaceConflictError,
    NetworkManager,
    NetworkPermissionError,
)

pytestmark = pytest.mark.root

MakeManager = Callable[..., NetworkManager]


def _assert_wired(netns: Netns, tap: str, mac: str, vm_id: str, bridge: str = "br-procurator"):
    link = netns.link(tap)
    assert link is not None, f"tap {tap} missing"
    info = link["linkinfo"]
    assert info["info_kind"] == "tun"
    assert info["info_data"]["type"] == "tap"
    assert info["info_data"]["multi_queue"] is False
    assert info["info_data"]["persist"] is True
    assert link["master"] == bridge
    assert "UP" in link["flags"]
    assert link["address"] == host_mac(mac)
    assert link["ifalias"] == f"procurator:pvm:{vm_id}"


def test_ensure_vm_creates_a_tap_on_the_bridge(netns: Netns, make_manager: MakeManager) -> None:
    manager = make_manager()
    nic = manager.ensure_vm("web-1")

    assert nic.tap == "pvmweb-1"
    assert nic.gateway == "10.120.0.1" and nic.prefix_len == 24
    _assert_wired(netns, nic.tap, nic.mac, "web-1")
    bridge = netns.link("br-procurator")
    assert bridge is not None and "UP" in bridge["flags"]
    assert bridge["address"] == bridge_mac("br-procurator")
    assert netns.ipv4("br-procurator") == {"10.120.0.1/24"}
    assert manager.nic("web-1") == nic
    state = json.loads((manager_state(manager) / "addresses.json").read_text())
    assert state["vms"]["web-1"] == {"ip": nic.ip, "tap": nic.tap, "mac": nic.mac}


def manager_state(manager: NetworkManager) -> Path:
    return Path(manager._table.path).parent  # the test peeks at its own file


def test_ensure_vm_is_idempotent_and_repairs_drift(netns: Netns, make_manager: MakeManager) -> None:
    manager = make_manager()
    nic = manager.ensure_vm("web-1")
    index = netns.require(nic.tap)["ifindex"]
    assert manager.ensure_vm("web-1") == nic
    assert netns.require(nic.tap)["ifindex"] == index  # not re-created

    netns.ip("link", "set", "dev", nic.tap, "nomaster")
    netns.ip("link", "set", "dev", nic.tap, "down")
    netns.ip("link", "set", "dev", nic.tap, "address", "02:00:00:00:00:01")
    netns.ip("link", "set", "dev", nic.tap, "alias", "")
    assert manager.ensure_vm("web-1") == nic
    _assert_wired(netns, nic.tap, nic.mac, "web-1")
    assert netns.require(nic.tap)["ifindex"] == index  # fixed in place

    # A multi-queue tap cannot be fixed in place: it is re-created.
    netns.ip("link", "del", "dev", nic.tap)
    netns.ip("tuntap", "add", "dev", nic.tap, "mode", "tap", "multi_queue")
    assert manager.ensure_vm("web-1") == nic
    _assert_wired(netns, nic.tap, nic.mac, "web-1")

    # The bridge lost its address and went down: a managed bridge is repaired.
    netns.ip("addr", "flush", "dev", "br-procurator")
    netns.ip("link", "set", "dev", "br-procurator", "down")
    manager.ensure_vm("web-1")
    assert netns.ipv4("br-procurator") == {"10.120.0.1/24"}
    assert "UP" in netns.require("br-procurator")["flags"]


def test_addresses_survive_a_restart_and_a_replacement(
    netns: Netns, make_manager: MakeManager, tmp_path: Path
) -> None:
    first = make_manager()
    nics = {vm: first.ensure_vm(vm) for vm in ("a", "b", "web-frontend-production-7")}
    first.close()

    second = make_manager()  # same state dir: a worker restart
    for vm, nic in nics.items():
        assert second.nic(vm) == nic
    # A replacement (new hash) re-ensures the same VM id: same NIC, same tap.
    index = netns.require(nics["a"].tap)["ifindex"]
    assert second.ensure_vm("a") == nics["a"]
    assert netns.require(nics["a"].tap)["ifindex"] == index
    assert second.nic("never-seen") is None


def test_release_removes_the_tap_and_frees_the_address(
    netns: Netns, make_manager: MakeManager
) -> None:
    manager = make_manager(subnet="10.7.0.0/30")  # room for exactly one VM
    nic = manager.ensure_vm("one")
    with pytest.raises(LimitExceededError, match=r"'two'.*10\.7\.0\.0/30"):
        manager.ensure_vm("two")
    assert tap_name("pvm", "two") not in netns.taps()

    manager.release_vm("one")
    assert netns.link(nic.tap) is None
    assert manager.nic("one") is None
    manager.release_vm("one")  # idempotent

    assert manager.ensure_vm("two").ip == nic.ip == "10.7.0.2"


def test_sweep_removes_only_our_orphaned_taps(netns: Netns, make_manager: MakeManager) -> None:
    manager = make_manager()
    kept = manager.ensure_vm("kept")
    gone = manager.ensure_vm("gone")
    long_gone = manager.ensure_vm("long-gone-vm-with-a-long-id")
    # Taps that are not ours: a foreign tap with our prefix, a tap without it,
    # and a prefixed veth. A tap marked by us whose allocation was lost
    # (e.g. a state dir restored from an old backup) is ours.
    netns.ip("tuntap", "add", "dev", "pvmforeign", "mode", "tap")
    netns.ip("tuntap", "add", "dev", "other0", "mode", "tap")
    netns.ip("tuntap", "add", "dev", "pvmmarked", "mode", "tap")
    netns.ip("link", "set", "dev", "pvmmarked", "alias", "procurator:pvm:ghost")
    netns.ip("link", "add", "pvmveth", "type", "veth", "peer", "name", "peer0")

    removed = manager.sweep(owned=["kept"])

    assert sorted(removed) == sorted([gone.tap, long_gone.tap, "pvmmarked"])
    assert netns.taps() == {kept.tap, "pvmforeign", "other0"}
    assert netns.link("pvmveth") is not None
    assert manager.nic("gone") is None and manager.nic("long-gone-vm-with-a-long-id") is None
    assert manager.nic("kept") == kept
    assert manager.sweep(owned=["kept"]) == []


def test_missing_bridge_is_a_clear_temporary_error(netns: Netns, make_manager: MakeManager) -> None:
    manager = make_manager(manage_bridge=False)
    with pytest.raises(BridgeMissingError) as caught:
        manager.ensure_vm("web-1")
    assert isinstance(caught.value, TemporaryError)
    assert "br-procurator" in str(caught.value) and "web-1" in str(caught.value)
    assert netns.taps() == set()

    # Once an operator creates it, the same call succeeds; an unmanaged
    # bridge's addresses are left as they are.
    netns.ip("link", "add", "br-procurator", "type", "bridge")
    nic = manager.ensure_vm("web-1")
    _assert_wired(netns, nic.tap, nic.mac, "web-1")
    assert netns.ipv4("br-procurator") == set()


def test_a_name_taken_by_another_interface_fails_that_vm_only(
    netns: Netns, make_manager: MakeManager
) -> None:
    manager = make_manager()
    taken = tap_name("pvm", "web-1")
    netns.ip("link", "add", taken, "type", "veth", "peer", "name", "peer0")
    with pytest.raises(InterfaceConflictError) as caught:
        manager.ensure_vm("web-1")
    assert isinstance(caught.value, PermanentError)
    assert taken in str(caught.value) and "web-1" in str(caught.value)
    assert "veth" in str(caught.value)
    assert netns.require(taken)["linkinfo"]["info_kind"] == "veth"

    # A tap someone else marked as theirs is not taken over either.
    netns.ip("tuntap", "add", "dev", "pvmweb-2", "mode", "tap")
    netns.ip("link", "set", "dev", "pvmweb-2", "alias", "libvirt:guest-9")
    with pytest.raises(InterfaceConflictError, match="libvirt:guest-9"):
        manager.ensure_vm("web-2")

    # Other VMs go on.
    nic = manager.ensure_vm("web-3")
    _assert_wired(netns, nic.tap, nic.mac, "web-3")
    # Releasing the failed VM leaves the interface that is not ours alone.
    manager.release_vm("web-1")
    assert netns.link(taken) is not None


def test_a_bridge_name_taken_by_a_non_bridge_is_refused(
    netns: Netns, make_manager: MakeManager
) -> None:
    netns.ip("tuntap", "add", "dev", "br-procurator", "mode", "tap")
    manager = make_manager()
    with pytest.raises(InterfaceConflictError, match=r"br-procurator.*a tap, not a bridge"):
        manager.ensure_bridge()


def test_concurrent_ensure_vm_gives_distinct_addresses(
    netns: Netns, make_manager: MakeManager
) -> None:
    manager = make_manager()
    vm_ids = [f"vm-{i}-with-a-shared-long-prefix" if i % 2 else f"vm-{i}" for i in range(30)]
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(vm_ids))

    def run(vm_id: str) -> None:
        barrier.wait()
        try:
            results[vm_id] = manager.ensure_vm(vm_id)
        except BaseException as exc:  # reported below
            results[vm_id] = exc

    threads = [threading.Thread(target=run, args=(vm,)) for vm in vm_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    errors = [r for r in results.values() if not isinstance(r, VmNic)]
    assert not errors
    nics = [r for r in results.values() if isinstance(r, VmNic)]
    assert len(nics) == 30
    assert len({n.ip for n in nics}) == 30
    assert len({n.tap for n in nics}) == 30
    assert len({n.mac for n in nics}) == 30
    assert netns.taps() == {n.tap for n in nics}


def test_a_second_manager_on_the_same_state_dir_is_refused(make_manager: MakeManager) -> None:
    make_manager()
    with pytest.raises(TemporaryError, match="in use by another network manager"):
        make_manager()


_WITHOUT_NET_ADMIN = """
import sys
from pathlib import Path
from procurator.worker.network import NetworkConfig, NetworkManager, NetworkPermissionError
with NetworkManager(NetworkConfig(netns=sys.argv[1]), Path(sys.argv[2])) as m:
    try:
        m.ensure_vm("web-1")
    except NetworkPermissionError as exc:
        print(exc)
        sys.exit(3)
"""


def test_no_permission_is_a_clear_error(netns: Netns, tmp_path: Path) -> None:
    # Root without CAP_NET_ADMIN (dropped from the bounding set, so the
    # exec'd root process never gets it); it keeps CAP_SYS_ADMIN for setns.
    result = subprocess.run(
        [
            "setpriv",
            "--bounding-set=-net_admin",
            sys.executable,
            "-c",
            _WITHOUT_NET_ADMIN,
            netns.name,
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3, result.stderr
    assert "br-procurator" in result.stdout and "web-1" in result.stdout
    assert "CAP_NET_ADMIN" in result.stdout
    assert netns.links().keys() == {"lo"}
    assert NetworkPermissionError.code == "unauthorized"
