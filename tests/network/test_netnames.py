"""The pure naming and address rules (no root, no OS)."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.netnames import (
    MAX_IFNAME,
    Allocation,
    SubnetPlan,
    VmNic,
    allocate,
    bridge_mac,
    guest_mac,
    host_mac,
    tap_name,
)
from procurator.core.vmdef import Payload, VmDefinition

VM_IDS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)
IFNAME_OK = re.compile(r"[a-z0-9_-]{1,15}")
OPENAPI = Path(__file__).resolve().parents[3] / "shared/reference/cloud-hypervisor-openapi.yaml"


def _locally_administered_unicast(mac: str) -> bool:
    first = int(mac.split(":", maxsplit=1)[0], 16)
    return bool(first & 0x02) and not first & 0x01


@given(vm_id=VM_IDS, prefix=st.sampled_from(["pvm", "p", "tap-", "procvm_x"]))
def test_tap_names_are_short_valid_and_deterministic(vm_id: str, prefix: str) -> None:
    name = tap_name(prefix, vm_id)
    assert len(name) <= MAX_IFNAME
    assert name.startswith(prefix)
    assert IFNAME_OK.fullmatch(name)
    assert name == tap_name(prefix, vm_id)


def test_short_ids_are_kept_verbatim_long_ones_get_a_readable_head_and_hash() -> None:
    assert tap_name("pvm", "web-1") == "pvmweb-1"
    assert tap_name("pvm", "abcdefghijkl") == "pvmabcdefghijkl"  # exactly 15
    long = tap_name("pvm", "web-frontend-production-7")
    assert long.startswith("pvmweb-f_") and len(long) == 15


@settings(derandomize=True, max_examples=200)
@given(
    head=st.from_regex(r"[a-z0-9][a-z0-9-]{10,40}", fullmatch=True),
    tails=st.lists(st.from_regex(r"[a-z0-9-]{0,12}", fullmatch=True), min_size=2, unique=True),
)
def test_tap_names_are_injective_over_ids_sharing_a_long_prefix(
    head: str, tails: list[str]
) -> None:
    ids = [(head + tail)[:63] for tail in tails]
    ids = list(dict.fromkeys(ids))
    names = [tap_name("pvm", vm_id) for vm_id in ids]
    assert len(set(names)) == len(names)


def test_tap_names_are_injective_over_a_large_fixed_set() -> None:
    ids = [f"customer-{c}-service-{s}" for c in range(100) for s in range(100)]
    ids += [f"w{i}" for i in range(10_000)]  # verbatim forms
    names = {tap_name("pvm", vm_id) for vm_id in ids}
    assert len(names) == len(ids)


def test_attempts_change_the_hash_only() -> None:
    names = {tap_name("pvm", "web-1", attempt) for attempt in range(20)}
    assert len(names) == 20
    assert all(n.startswith("pvmweb-1_") for n in names - {"pvmweb-1"})


def test_bad_prefixes_are_refused() -> None:
    for prefix in ("", "9vm", "toolongpfx", "p/x", "P"):
        with pytest.raises(ValidationError):
            tap_name(prefix, "web-1")


@given(vm_id=VM_IDS, attempt=st.integers(0, 5))
def test_macs_are_locally_administered_unicast_and_deterministic(vm_id: str, attempt: int) -> None:
    mac = guest_mac(vm_id, attempt)
    assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
    assert _locally_administered_unicast(mac)
    assert _locally_administered_unicast(host_mac(mac))
    assert host_mac(mac) != mac
    assert mac == guest_mac(vm_id, attempt)


def test_bridge_mac_matches_the_setup_script_derivation() -> None:
    # sha256("procurator/bridge-mac/br-procurator") starts 5f46bf1a69...
    assert bridge_mac("br-procurator") == "fe:5f:46:bf:1a:69"
    assert _locally_administered_unicast(bridge_mac("br0"))


def test_subnet_plan_reserves_network_gateway_and_broadcast() -> None:
    plan = SubnetPlan.parse("10.120.0.0/24")
    assert str(plan.gateway) == "10.120.0.1"
    assert plan.pool_size == 253
    assert str(plan.pool_address(0)) == "10.120.0.2"
    assert str(plan.pool_address(252)) == "10.120.0.254"
    assert not plan.in_pool("10.120.0.1")
    assert not plan.in_pool("10.120.0.255")
    assert plan.in_pool("10.120.0.254")
    assert SubnetPlan.parse("10.0.0.0/30").pool_size == 1
    for bad in ("10.0.0.0/31", "10.0.0.1/24", "fd00::/64", "nonsense"):
        with pytest.raises(ValidationError):
            SubnetPlan.parse(bad)


def test_allocate_fills_the_pool_without_duplicates_then_refuses() -> None:
    plan = SubnetPlan.parse("10.9.0.0/28")  # 13 VM addresses
    taken: list[Allocation] = []
    for i in range(plan.pool_size):
        taken.append(allocate(f"vm-{i}", taken, plan, "pvm"))
    assert len({a.ip for a in taken}) == plan.pool_size
    assert all(plan.in_pool(a.ip) for a in taken)
    with pytest.raises(LimitExceededError, match=r"vm-x.*10\.9\.0\.0/28"):
        allocate("vm-x", taken, plan, "pvm")


def test_allocate_is_deterministic_first_and_probes_past_collisions() -> None:
    plan = SubnetPlan.parse("10.120.0.0/24")
    alone = allocate("web-1", [], plan, "pvm")
    assert alone == allocate("web-1", [], plan, "pvm")
    # Another VM already holds everything web-1 would derive first.
    squatter = Allocation("other", alone.ip, alone.tap, alone.mac)
    moved = allocate("web-1", [squatter], plan, "pvm")
    assert moved.ip != alone.ip
    assert moved.tap != alone.tap and len(moved.tap) <= MAX_IFNAME
    assert moved.mac != alone.mac
    assert ipaddress.IPv4Address(moved.ip) == ipaddress.IPv4Address(alone.ip) + 1 or (
        alone.ip == "10.120.0.254" and moved.ip == "10.120.0.2"
    )


def _nic() -> VmNic:
    return VmNic(
        vm_id="web-1",
        tap="pvmweb-1",
        mac="02:aa:bb:cc:dd:ee",
        ip="10.120.0.7",
        prefix_len=24,
        gateway="10.120.0.1",
    )


def test_kernel_ip_arg() -> None:
    assert _nic().kernel_ip_arg() == "ip=10.120.0.7::10.120.0.1:255.255.255.0:web-1:eth0:off"


def test_the_nic_fits_the_cloud_hypervisor_netconfig_schema() -> None:
    if not OPENAPI.exists():
        pytest.skip(f"cloud-hypervisor OpenAPI description not found at {OPENAPI}")
    schema = yaml.safe_load(OPENAPI.read_text())["components"]["schemas"]["NetConfig"]
    definition = VmDefinition(payload=Payload(kernel="/k")).with_nic(_nic().device(), cmdline=None)
    (entry,) = definition.to_vm_config()["net"]
    assert entry == {
        "id": "net0",
        "tap": "pvmweb-1",
        "mac": "02:aa:bb:cc:dd:ee",
        "host_mac": "fe:aa:bb:cc:dd:ee",
    }
    for key, value in entry.items():
        assert key in schema["properties"], key
        assert schema["properties"][key]["type"] == "string"
        assert isinstance(value, str)
    assert not set(schema.get("required", [])) - set(entry)
