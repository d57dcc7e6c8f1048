"""Fleet files: parsing, validation with precise locations, diffs."""

from __future__ import annotations

import json

import pytest

from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.fleet import diff_assignments, diff_fleets, parse_fleet, validate_fleet
from procurator.core.models import (
    Assignment,
    Fleet,
    PowerChange,
    PowerState,
    VmAssignment,
)
from procurator.core.validation import LIMITS

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
