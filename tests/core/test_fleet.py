"""Fleet files: parsing, validation with precise locations, diffs."""

from __future__ import annotations

import json

import pytest

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.fleet import (
    diff_assignments,
    diff_fleets,
    parse_fleet,
    resolve_fleet,
    validate_fleet,
)
from procurator.core.models import (
    Assignment,
    Fleet,
    OnWorkerLost,
    Placement,
    PlacementPolicy,
    PlacementReason,
    PlacementStrategy,
    PowerChange,
    PowerState,
    UnpinnedVm,
    VmAssignment,
    VmPlacement,
)
from procurator.core.validation import LIMITS, default_hash

HASH_A = "a" * 32
HASH_B = "b" * 32
IMAGE_A = f"/nix/store/{HASH_A}-web-vm"
IMAGE_B = f"/nix/store/{HASH_B}-web-vm"


def problems_of(text: str, fmt: str = "toml") -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_fleet(text, fmt=fmt, source="fleet." + fmt)
    assert "nothing was applied" in info.value.message
    return list(info.value.details)


def test_toml_and_json_give_the_same_fleet() -> None:
    toml = f"""
[workers.host-b]
vms = [ {{ id = "db-1", image = "{IMAGE_B}", power = "stopped", vcpus = 2, memory_mib = 512 }} ]

[workers.host-a]
vms = [
  {{ id = "web-2", image = "{IMAGE_A}" }},
  {{ id = "web-1", image = "{IMAGE_A}", hash = "v1" }},
]
"""
    data = {
        "workers": {
            "host-b": {
                "vms": [
                    {
                        "id": "db-1",
                        "image": IMAGE_B,
                        "power": "stopped",
                        "vcpus": 2,
                        "memory_mib": 512,
                    }
                ]
            },
            "host-a": {
                "vms": [
                    {"id": "web-2", "image": IMAGE_A},
                    {"id": "web-1", "image": IMAGE_A, "hash": "v1"},
                ]
            },
        }
    }
    fleet = parse_fleet(toml)
    assert fleet == parse_fleet(json.dumps(data, indent=2), fmt="json")
    assert [w for w, _ in fleet.workers] == ["host-a", "host-b"]
    web1, web2 = fleet.as_dict()["host-a"]
    assert (web1.id, web1.hash) == ("web-1", "v1")
    assert (web2.id, web2.hash, web2.power) == ("web-2", HASH_A, PowerState.RUNNING)
    (db,) = fleet.as_dict()["host-b"]
    assert (db.power, db.vcpus, db.memory_mib) == (PowerState.STOPPED, 2, 512)
    # Resources change the default hash: the VM must be replaced.
    assert db.hash != HASH_B and len(db.hash) == 32
    assert fleet.vm_count == 3


def test_every_problem_is_reported_with_its_line() -> None:
    details = problems_of(
        f"""[workers.host-a]
vms = [
  {{ id = "ok-1", image = "{IMAGE_A}" }},
  {{ id = "Bad_Id", image = "{IMAGE_A}" }},
  {{ id = "web-3", image = "/nix/store/tooshort-x" }},
  {{ id = "web-4", image = "{IMAGE_A}", colour = "red" }},
  {{ id = "web-5", image = "{IMAGE_A}", power = "off", vcpus = 1000 }},
  {{ image = "{IMAGE_A}" }},
]
"""
    )
    text = "\n".join(details)
    assert "fleet.toml:4: workers.host-a.vms[1].id: 'Bad_Id' is not a valid VM id" in text
    assert "fleet.toml:5: workers.host-a.vms[2].image" in text
    assert "fleet.toml:6: workers.host-a.vms[3].colour: unknown key" in text
    assert "fleet.toml:7: workers.host-a.vms[4].power" in text
    assert "fleet.toml:7: workers.host-a.vms[4].vcpus: 1000 is out of range" in text
    assert "workers.host-a.vms[5].id: missing" in text


def test_ids_must_be_unique_across_the_fleet() -> None:
    details = problems_of(
        f"""[workers.host-a]
vms = [ {{ id = "web-1", image = "{IMAGE_A}" }} ]
[workers.host-b]
vms = [ {{ id = "web-1", image = "{IMAGE_B}" }} ]
"""
    )
    assert any("'web-1' is used more than once (also on worker 'host-a')" in d for d in details)


def test_structure_errors() -> None:
    assert any("unknown key" in d for d in problems_of("extra = 1\n[workers]\n"))
    details = problems_of('[workers."Host A"]\nvms = []\n')
    assert any("workers.Host A: 'Host A' is not a valid worker id" in d for d in details)
    assert any("must be a list" in d for d in problems_of("[workers.host-a]\nvms = 3\n"))
    assert any(
        "workers.host-a.nodes: unknown key" in d
        for d in problems_of("[workers.host-a]\nnodes = []\n")
    )
    with pytest.raises(ValidationError, match="not valid TOML"):
        parse_fleet("[workers\n")
    with pytest.raises(ValidationError, match=r"f.json:2: not valid JSON"):
        parse_fleet('{\n "workers": }', fmt="json", source="f.json")


def test_json_repeated_keys_are_refused() -> None:
    text = (
        '{"workers": {\n'
        f' "host-a": {{"vms": [{{"id": "web-1", "image": "{IMAGE_A}"}}]}},\n'
        ' "host-a": {"vms": []}\n'
        "}}"
    )
    details = problems_of(text, fmt="json")
    assert any("fleet.json:2: host-a: key given more than once" in d for d in details)


def test_an_empty_fleet_is_valid() -> None:
    assert parse_fleet("") == Fleet()
    assert parse_fleet('{"workers": {}}', fmt="json") == Fleet()


def test_file_size_is_bounded() -> None:
    with pytest.raises(LimitExceededError):
        parse_fleet(" " * (LIMITS.max_fleet_file_bytes + 1))


def test_validate_fleet_applies_the_same_rules_to_built_fleets() -> None:
    validate_fleet(parse_fleet(f'[workers.w]\nvms = [{{ id = "a", image = "{IMAGE_A}" }}]\n'))
    bad = Fleet(
        (
            (
                "w",
                (
                    VmAssignment("a", "h", IMAGE_A),
                    VmAssignment("a", "bad hash", "/tmp/x", vcpus=999),
                ),
            ),
            ("w", ()),
        )
    )
    with pytest.raises(ValidationError) as info:
        validate_fleet(bad)
    text = "\n".join(info.value.details)
    for expected in (
        "workers.w: worker listed more than once",
        "workers.w.vms[1].image",
        "workers.w.vms[1].hash",
        "workers.w.vms[1].vcpus",
        "'a' is used more than once",
    ):
        assert expected in text


def test_diffs_classify_every_change() -> None:
    old = (
        VmAssignment("keep", "h1", IMAGE_A),
        VmAssignment("swap", "h1", IMAGE_A),
        VmAssignment("gone", "h1", IMAGE_A),
        VmAssignment("power", "h1", IMAGE_A),
        VmAssignment("resize", "h1", IMAGE_A, vcpus=1),
    )
    new = (
        VmAssignment("keep", "h1", IMAGE_A),
        VmAssignment("swap", "h2", IMAGE_B),
        VmAssignment("power", "h1", IMAGE_A, PowerState.PAUSED),
        VmAssignment("resize", "h1", IMAGE_A, vcpus=2),
        VmAssignment("new", "h1", IMAGE_A),
    )
    diff = diff_assignments("w", old, new)
    assert diff.added == ("new",)
    assert diff.replaced == ("swap",)
    assert diff.removed == ("gone",)
    assert diff.power_changed == (PowerChange("power", PowerState.RUNNING, PowerState.PAUSED),)
    assert diff.updated == ("resize",)
    assert not diff.empty
    assert diff_assignments("w", old, old).empty


def test_fleet_diff_covers_new_and_dropped_workers_only_when_changed() -> None:
    current = {
        "a": Assignment("a", 3, (VmAssignment("x", "h", IMAGE_A),)),
        "b": Assignment("b", 2, (VmAssignment("y", "h", IMAGE_A),)),
        "empty": Assignment("empty", 1, ()),
    }
    new = Fleet(
        (("a", (VmAssignment("x", "h", IMAGE_A),)), ("c", (VmAssignment("z", "h", IMAGE_A),)))
    )
    diffs = diff_fleets(current, new)
    assert [(d.worker_id, d.added, d.removed) for d in diffs] == [
        ("b", (), ("y",)),
        ("c", ("z",), ()),
    ]


# ---------------------------------------------------------------- unpinned VMs

UNPINNED_TOML = f"""
[workers.host-a]
vms = [ {{ id = "db-1", image = "{IMAGE_B}", vcpus = 2, memory_mib = 1024 }} ]

[placement]
strategy = "spread"

[[vms]]
id = "web-2"
image = "{IMAGE_A}"
vcpus = 2
memory_mib = 2048
spread = "web"

[[vms]]
id = "web-1"
image = "{IMAGE_A}"
vcpus = 4
memory_mib = 8192
constraints = {{ zone = "b", kvm = "true" }}
on_worker_lost = "wait"
hash = "v1"
"""


def parse_unpinned(text: str, fmt: str = "toml") -> Fleet:
    return parse_fleet(text, fmt=fmt, source="fleet." + fmt)


def unpinned_problems(text: str, fmt: str = "toml") -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_unpinned(text, fmt)
    assert "nothing was applied" in info.value.message
    return list(info.value.details)


def test_unpinned_vms_parse_the_same_from_toml_and_json() -> None:
    data = {
        "workers": {
            "host-a": {"vms": [{"id": "db-1", "image": IMAGE_B, "vcpus": 2, "memory_mib": 1024}]}
        },
        "placement": {"strategy": "spread"},
        "vms": [
            {"id": "web-2", "image": IMAGE_A, "vcpus": 2, "memory_mib": 2048, "spread": "web"},
            {
                "id": "web-1",
                "image": IMAGE_A,
                "vcpus": 4,
                "memory_mib": 8192,
                "constraints": {"zone": "b", "kvm": "true"},
                "on_worker_lost": "wait",
                "hash": "v1",
            },
        ],
    }
    fleet = parse_unpinned(UNPINNED_TOML)
    assert fleet == parse_unpinned(json.dumps(data, indent=2), fmt="json")
    assert fleet.placement == PlacementPolicy(PlacementStrategy.SPREAD)
    web1, web2 = fleet.unpinned  # sorted by id
    assert web1 == UnpinnedVm(
        VmAssignment("web-1", "v1", IMAGE_A, vcpus=4, memory_mib=8192),
        constraints=(("kvm", "true"), ("zone", "b")),
        on_worker_lost=OnWorkerLost.WAIT,
    )
    assert (web2.id, web2.spread, web2.on_worker_lost) == ("web-2", "web", OnWorkerLost.RESCHEDULE)
    assert web2.vm.hash == default_hash(IMAGE_A, 2, 2048)
    assert fleet.vm_count == 3
    # The pinned part is what it always was.
    assert (
        fleet.workers
        == parse_fleet(
            f'[workers.host-a]\nvms = [ {{ id = "db-1", image = "{IMAGE_B}", vcpus = 2, '
            "memory_mib = 1024 } ]\n"
        ).workers
    )


def test_a_fleet_without_unpinned_vms_has_the_default_policy() -> None:
    fleet = parse_fleet(f'[workers.w]\nvms = [{{ id = "a", image = "{IMAGE_A}" }}]\n')
    assert fleet.unpinned == ()
    assert fleet.placement == PlacementPolicy(PlacementStrategy.BINPACK)
    assert fleet == Fleet(fleet.workers)


def test_unpinned_vms_must_say_what_they_need() -> None:
    details = unpinned_problems(
        f"""[[vms]]
id = "web-1"
image = "{IMAGE_A}"

[[vms]]
id = "web-2"
image = "{IMAGE_A}"
vcpus = 0
memory_mib = 8
"""
    )
    text = "\n".join(details)
    assert "fleet.toml:2: vms[0].vcpus: missing (required for a VM the scheduler places)" in text
    assert "fleet.toml:2: vms[0].memory_mib: missing" in text
    assert "fleet.toml:6: vms[1].vcpus: 0 is out of range 1..256" in text
    assert "fleet.toml:6: vms[1].memory_mib: 8 is out of range 16..1048576" in text
    assert len(details) == 4, details


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("constraints = 3", "vms[0].constraints: must be a table/object of worker labels"),
        ('constraints = { "Zone" = "b" }', "vms[0].constraints: 'Zone' is not a valid label key"),
        (
            'constraints = { "../etc" = "b" }',
            "vms[0].constraints: '../etc' is not a valid label key",
        ),
        (
            "constraints = { kvm = true }",
            'vms[0].constraints.kvm: must be a string, not bool (write "true" in quotes)',
        ),
        ('constraints = { zone = "" }', "vms[0].constraints.zone: '' is not a valid label value"),
        (
            'constraints = { zone = "b\\nc" }',
            "vms[0].constraints.zone: 'b\\nc' is not a valid label value",
        ),
        (
            "constraints = { zone = { x = 1 } }",
            "vms[0].constraints.zone: must be a string, not dict",
        ),
        ('spread = "Web Tier"', "vms[0].spread: 'Web Tier' is not a valid group name"),
        ("spread = 7", "vms[0].spread: must be a string, not int"),
        ('on_worker_lost = "panic"', "vms[0].on_worker_lost: 'panic' is not one of"),
        ('devices = ["/dev/sda"]', "vms[0].devices: unknown key (allowed: constraints, hash,"),
    ],
)
def test_unpinned_keys_are_checked(entry: str, expected: str) -> None:
    text = f'[[vms]]\nid = "web-1"\nimage = "{IMAGE_A}"\nvcpus = 1\nmemory_mib = 64\n{entry}\n'
    details = unpinned_problems(text)
    assert any(f"fleet.toml:2: {expected}" in d for d in details), details


def test_constraints_are_bounded() -> None:
    labels = ", ".join(f'k{i} = "v"' for i in range(LIMITS.max_labels + 1))
    text = (
        f'[[vms]]\nid = "web-1"\nimage = "{IMAGE_A}"\nvcpus = 1\nmemory_mib = 64\n'
        f"constraints = {{ {labels} }}\n"
    )
    details = unpinned_problems(text)
    assert any(
        f"vms[0].constraints: {LIMITS.max_labels + 1} constraints exceed the limit of "
        f"{LIMITS.max_labels}" in d
        for d in details
    )
    exactly = ", ".join(f'k{i} = "v"' for i in range(LIMITS.max_labels))
    fleet = parse_unpinned(text.replace(labels, exactly))
    assert len(fleet.unpinned[0].constraints) == LIMITS.max_labels


def test_placement_section_errors() -> None:
    details = unpinned_problems('[placement]\nstrategy = "binpack"\ncpu_overcommit = 4.0\n')
    assert any(
        "fleet.toml:1: placement.cpu_overcommit: unknown key (only 'strategy' is allowed; "
        "overcommit ratios are set in each worker's configuration)" in d
        for d in details
    ), details
    assert any(
        "fleet.toml:2: placement.strategy: 'fastest' is not one of ['binpack', 'spread']" in d
        for d in unpinned_problems('[placement]\nstrategy = "fastest"\n')
    )
    assert any(
        "placement: must be a table/object" in d
        for d in unpinned_problems('{"placement": 3}', fmt="json")
    )
    assert any(
        "vms: must be a list of VM entries" in d
        for d in unpinned_problems('{"vms": {"web-1": {}}}', fmt="json")
    )


def test_ids_are_unique_across_pinned_and_unpinned_vms() -> None:
    details = unpinned_problems(
        f"""[workers.host-a]
vms = [ {{ id = "web-1", image = "{IMAGE_A}" }} ]

[[vms]]
id = "web-1"
image = "{IMAGE_A}"
vcpus = 1
memory_mib = 64

[[vms]]
id = "web-2"
image = "{IMAGE_A}"
vcpus = 1
memory_mib = 64

[[vms]]
id = "web-2"
image = "{IMAGE_B}"
vcpus = 1
memory_mib = 64
"""
    )
    text = "\n".join(details)
    assert "vms[0].id: VM id 'web-1' is used more than once (also pinned to worker 'host-a')" in (
        text
    )
    assert "vms[2].id: VM id 'web-2' is used more than once (also in vms)" in text


def test_the_vm_limit_counts_unpinned_vms(monkeypatch: pytest.MonkeyPatch) -> None:
    # A smaller limit than the real one keeps the file small; the rule is the same.
    monkeypatch.setattr(LIMITS, "max_vms_total", 3)
    entries = [{"id": f"web-{i}", "image": IMAGE_A, "vcpus": 1, "memory_mib": 64} for i in range(3)]
    pinned = {"host-a": {"vms": [{"id": "db-1", "image": IMAGE_B}]}}
    details = unpinned_problems(json.dumps({"workers": pinned, "vms": entries}), fmt="json")
    assert any("vms: 4 VMs exceed the fleet limit of 3" in d for d in details), details
    fleet = parse_unpinned(json.dumps({"vms": entries}), fmt="json")
    assert fleet.vm_count == 3


def test_validate_fleet_checks_unpinned_vms() -> None:
    validate_fleet(parse_unpinned(UNPINNED_TOML))
    bad = Fleet(
        (("w", (VmAssignment("a", "h", IMAGE_A),)),),
        (
            UnpinnedVm(VmAssignment("a", "h", IMAGE_A, vcpus=1, memory_mib=64)),
            UnpinnedVm(
                VmAssignment("b", "h", "/tmp/x"),
                constraints=(("zone", "b"), ("Zone", "b\n")),
                spread="Bad Group",
            ),
        ),
    )
    with pytest.raises(ValidationError) as info:
        validate_fleet(bad)
    text = "\n".join(info.value.details)
    for expected in (
        "vms[0].id: VM id 'a' is used more than once (also pinned to worker 'w')",
        "vms[1].image",
        "vms[1].vcpus: missing",
        "vms[1].memory_mib: missing",
        "vms[1].constraints: keys must be unique and sorted",
        "vms[1].constraints: 'Zone' is not a valid label key",
        "vms[1].spread: 'Bad Group' is not a valid group name",
    ):
        assert expected in text, text


def test_resolve_fleet_pins_each_vm_where_the_placement_puts_it() -> None:
    fleet = parse_unpinned(UNPINNED_TOML)
    placement = Placement(
        (
            VmPlacement("web-1", "host-b", PlacementReason.NEW),
            VmPlacement("web-2", "host-a", PlacementReason.NEW),
        )
    )
    resolved = resolve_fleet(fleet, placement)
    assert resolved.unpinned == ()
    assert [(w, [vm.id for vm in vms]) for w, vms in resolved.workers] == [
        ("host-a", ["db-1", "web-2"]),
        ("host-b", ["web-1"]),
    ]
    validate_fleet(resolved)
    assert [d.worker_id for d in diff_fleets({}, resolved)] == ["host-a", "host-b"]
    with pytest.raises(ValueError, match=r"unplaced \['web-2'\]"):
        resolve_fleet(fleet, Placement(placement.vms[:1]))


def test_diff_fleets_refuses_an_unresolved_fleet() -> None:
    """Unpinned VMs are nobody's until placed: diffing them as absent would
    stop them."""
    with pytest.raises(ValueError, match="2 unpinned VM"):
        diff_fleets({}, parse_unpinned(UNPINNED_TOML))


def test_a_limit_exceeded_is_refused_as_such_and_other_problems_as_invalid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A client tells "too big" from "wrong" by the class, whichever way the
    # fleet came: parsed from a file, or validated as a patch's parts are.
    monkeypatch.setattr(LIMITS, "max_vms_per_worker", 2)
    vms = tuple(VmAssignment(f"web-{i}", HASH_A, IMAGE_A) for i in range(3))
    with pytest.raises(LimitExceededError) as raised:
        validate_fleet(Fleet((("host-a", vms),)))
    assert "workers.host-a.vms: 3 VMs exceed the limit of 2 per worker" in raised.value.details
    entries = [{"id": vm.id, "image": IMAGE_A} for vm in vms]
    with pytest.raises(LimitExceededError):
        parse_fleet(json.dumps({"workers": {"host-a": {"vms": entries}}}), fmt="json")
    with pytest.raises(ValidationError) as invalid:
        validate_fleet(Fleet((("host-a", (*vms[:1], vms[0])),)))
    assert not isinstance(invalid.value, LimitExceededError)
