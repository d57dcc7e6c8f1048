"""nix/lib/net.nix agrees with the worker about its subnet.

The worker module declares the bridge's address with net.nix; the worker
computes the same address with ``procurator.core.netnames.SubnetPlan``. If
they disagreed, the host would carry one gateway and the guests be told
another. Checked on a few hundred subnets in one Nix evaluation.
"""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from flakehelpers import NIX_LIB, Nix, nix_path

from procurator.core.errors import ValidationError
from procurator.core.netnames import SubnetPlan

pytestmark = pytest.mark.nix

NET = nix_path(NIX_LIB / "net.nix")


def _subnets() -> list[str]:
    rng = random.Random(20240601)
    found = ["10.120.0.0/24", "0.0.0.0/0", "10.0.0.0/8", "192.168.1.4/30", "192.168.1.4/31"]
    found += ["10.120.0.1/24", "10.120.0.0/33", "10.120.0.256/24", "10.120.0/24", "a.b.c.d/8"]
    found += ["10.120.00.0/24", "10.120.0.0/", "/24", "10.120.0.0/24/1", ""]
    for _ in range(300):
        prefix = rng.randint(0, 32)
        address = ipaddress.IPv4Address(rng.getrandbits(32))
        network = ipaddress.IPv4Network(f"{address}/{prefix}", strict=False)
        # Half valid networks, half addresses with host bits (invalid).
        found.append(str(network) if rng.random() < 0.5 else f"{address}/{prefix}")
    return found


def _python(subnet: str) -> dict[str, object] | None:
    try:
        plan = SubnetPlan.parse(subnet)
    except ValidationError:
        return None
    return {
        "firstHost": str(plan.gateway),
        "netmask": plan.netmask,
        "prefixLength": plan.prefix_len,
        "network": str(plan.network.network_address),
    }


def test_bridge_address_and_validity_agree_with_the_worker(nix: Nix) -> None:
    subnets = _subnets()
    results = nix.eval(
        f"""let net = import {NET};
            one = s:
              let r = builtins.tryEval (builtins.deepSeq (net.parseCidr s) (net.parseCidr s));
              in if r.success
                then {{ inherit (r.value) firstHost netmask prefixLength network; }}
                else null;
        in map one (builtins.fromJSON {json.dumps(json.dumps(subnets))})"""
    )
    disagreements = [
        (subnet, nixed, _python(subnet))
        for subnet, nixed in zip(subnets, results, strict=True)
        if nixed != _python(subnet)
    ]
    assert disagreements == []
    assert sum(r is not None for r in results) > 100  # both kinds were exercised


def test_default_bridge_address(nix: Nix) -> None:
    assert nix.eval(f'(import {NET}).bridgeAddress "10.120.0.0/24"') == "10.120.0.1"


@pytest.mark.parametrize(
    ("subnet", "message"),
    [
        ("10.120.0.1/24", "'10.120.0.1/24' has host bits set; the subnet is 10.120.0.0/24"),
        ("10.120.0.0/31", "prefix length 31 leaves no room for a bridge and VMs"),
        ("10.120.0.0", "is not an IPv4 subnet in CIDR form"),
        ("10.120.010.0/24", "'010' has a leading zero"),
    ],
)
def test_bad_subnets_are_refused_with_a_message(nix: Nix, subnet: str, message: str) -> None:
    assert message in nix.eval_error(f'(import {NET}).parseCidr "{subnet}"')


def test_host_port(nix: Nix) -> None:
    assert nix.eval(
        f'let n = import {NET}; in [ (n.hostPort "0.0.0.0" 7300) (n.hostPort "::" 9301) ]'
    ) == ["0.0.0.0:7300", "[::]:9301"]
    assert "port 0 is not in 1-65535" in nix.eval_error(f'(import {NET}).hostPort "::" 0')
