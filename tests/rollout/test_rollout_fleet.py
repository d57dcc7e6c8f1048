"""The fleet file's ``[rollout]`` section, its group and VM overrides, and
their located errors (procurator.core.fleet)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from procurator.core.errors import ValidationError
from procurator.core.fleet import parse_fleet, resolve_fleet, validate_fleet
from procurator.core.models import (
    HealthCheck,
    HealthKind,
    Placement,
    PlacementReason,
    RolloutPolicy,
    VmPlacement,
)

IMAGE = "/nix/store/" + "a" * 32 + "-web"

DB1_ROLLOUT = "rollout = { health = { tcp = 5432 }, auto_revert = false }"
FLEET = f"""
[rollout]
max_parallel = 5
health = {{ http = "/healthz", port = 8080, expect = 204 }}
min_healthy_time = "2s"
healthy_deadline = "90s"
canary = 1

[rollout.groups.web]
max_parallel = 2

[workers.host-a]
vms = [
  {{ id = "db-1", image = "{IMAGE}", {DB1_ROLLOUT} }},
  {{ id = "db-2", image = "{IMAGE}" }},
]

[[vms]]
id = "web-1"
image = "{IMAGE}"
vcpus = 1
memory_mib = 256
spread = "web"

[[vms]]
id = "web-2"
image = "{IMAGE}"
vcpus = 1
memory_mib = 256
spread = "web"
rollout = {{ healthy_deadline = 120 }}
"""


def test_without_rollout_settings_vms_are_replaced_at_once() -> None:
    fleet = parse_fleet(f'[workers.a]\nvms = [{{ id = "x", image = "{IMAGE}" }}]\n')
    assert fleet.rollout is None
    assert fleet.rollout_for("x") is None


def test_defaults_are_the_issues() -> None:
    fleet = parse_fleet(f'[workers.a]\nvms = [{{ id = "x", image = "{IMAGE}" }}]\n[rollout]\n')
    assert fleet.rollout == RolloutPolicy(
        max_parallel=1,
        health=HealthCheck(HealthKind.NONE, min_healthy_ms=10_000),
        healthy_deadline_ms=300_000,
        canary=0,
        auto_revert=True,
        auto_promote=False,
    )
    assert fleet.rollout_for("x") == fleet.rollout


def test_fleet_wide_group_and_vm_settings_resolve_in_that_order() -> None:
    fleet = parse_fleet(FLEET, source="fleet.toml")
    http = HealthCheck(HealthKind.HTTP, 8080, "/healthz", 204, min_healthy_ms=2000)
    wide = RolloutPolicy(5, http, 90_000, canary=1)
    assert fleet.rollout == wide
    web = replace(wide, max_parallel=2)
    assert fleet.group_rollouts == (("web", web),)
    assert fleet.rollout_for("db-2") == wide
    assert fleet.rollout_for("web-1", "web") == web
    # A VM's override starts from its group's settings.
    assert fleet.rollout_for("web-2", "web") == replace(web, healthy_deadline_ms=120_000)
    assert fleet.rollout_for("db-1") == replace(
        wide, health=HealthCheck(HealthKind.TCP, 5432, min_healthy_ms=2000), auto_revert=False
    )
    validate_fleet(fleet)


def test_json_carries_the_same_settings() -> None:
    data = {
        "workers": {"a": {"vms": [{"id": "x", "image": IMAGE, "rollout": {"canary": 0}}]}},
        "rollout": {"max_parallel": 3, "health": {"tcp": 22}, "min_healthy_time": 0.5},
    }
    fleet = parse_fleet(json.dumps(data), fmt="json")
    assert fleet.rollout == RolloutPolicy(3, HealthCheck(HealthKind.TCP, 22, min_healthy_ms=500))
    assert fleet.vm_rollouts == (("x", fleet.rollout),)


def test_resolving_a_placement_keeps_the_rollout_settings() -> None:
    fleet = parse_fleet(FLEET)
    placement = Placement(
        tuple(VmPlacement(u.id, "host-b", PlacementReason.NEW) for u in fleet.unpinned)
    )
    resolved = resolve_fleet(fleet, placement)
    assert resolved.unpinned == ()
    assert (resolved.rollout, resolved.group_rollouts, resolved.vm_rollouts) == (
        fleet.rollout,
        fleet.group_rollouts,
        fleet.vm_rollouts,
    )


@pytest.mark.parametrize(
    ("section", "problem"),
    [
        ("max_parallel = 0", "rollout.max_parallel: must be an integer in 1..10000, not 0"),
        ('canary = "two"', "rollout.canary: must be an integer in 0..10000, not 'two'"),
        ("auto_revert = 1", "rollout.auto_revert: must be true or false, not 1"),
        ("health = { tcp = 70000 }", "rollout.health.tcp: must be a port number 1..65535"),
        ('health = { http = "healthz", port = 80 }', "rollout.health.http: must be a URL path"),
        (
            'health = { http = "/", port = 80, expect = 42 }',
            "rollout.health.expect: must be an HTTP",
        ),
        ('health = { tcp = 22, http = "/" }', 'rollout.health: must be "none", { tcp = 22 }'),
        ("health = { tcp = 22, port = 1 }", "rollout.health.port: unknown key"),
        ('health = "ping"', 'rollout.health: must be "none"'),
        ('min_healthy_time = "10 parsecs"', "rollout.min_healthy_time: must be a duration"),
        ("healthy_deadline = -5", "rollout.healthy_deadline: must be a duration from 1s"),
        (
            'min_healthy_time = "5m"\nhealthy_deadline = "1m"',
            "must be shorter than healthy_deadline",
        ),
        ("max_paralel = 2", "rollout.max_paralel: unknown key (allowed: max_parallel"),
        (
            "[rollout.groups.nope]\nmax_parallel = 2",
            "rollout.groups.nope: no VM is in this spread group",
        ),
    ],
)
def test_bad_settings_are_located(section: str, problem: str) -> None:
    text = f'[workers.a]\nvms = [{{ id = "x", image = "{IMAGE}" }}]\n[rollout]\n{section}\n'
    with pytest.raises(ValidationError) as caught:
        parse_fleet(text, source="fleet.toml")
    details = caught.value.details
    assert any(problem in d for d in details), details
    assert all(d.startswith("fleet.toml:") for d in details)


def test_a_vm_override_is_located_at_its_entry() -> None:
    text = (
        f'[workers.a]\nvms = [{{ id = "x", image = "{IMAGE}" }},\n'
        f'  {{ id = "y", image = "{IMAGE}", rollout = {{ canary = -1 }} }}]\n'
    )
    with pytest.raises(ValidationError) as caught:
        parse_fleet(text, source="fleet.toml")
    assert list(caught.value.details) == [
        "fleet.toml:3: workers.a.vms[1].rollout.canary: must be an integer in 0..10000, not -1"
    ]


def test_a_fleet_from_the_wire_is_checked_too() -> None:
    fleet = parse_fleet(f'[workers.a]\nvms = [{{ id = "x", image = "{IMAGE}" }}]\n')
    assert fleet.rollout is None
    bad = replace(fleet, rollout=RolloutPolicy(max_parallel=0, healthy_deadline_ms=10))
    with pytest.raises(ValidationError) as caught:
        validate_fleet(bad)
    assert list(caught.value.details) == [
        "rollout: max_parallel 0 is out of range",
        "rollout: healthy_deadline 10 ms is out of range",
        "rollout: min_healthy_time must be shorter than healthy_deadline",
    ]
