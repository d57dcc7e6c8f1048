"""A health check kind this release does not know is refused where a fleet
comes in (a fleet file, an apply or a fleet patch over RPC), naming the VM
(or group) and the kind: read as ``none`` it would take a rollout's health
gate away without a word. A worker's assignment still reads it as ``none``
(test_convert_rollout), as the schema's evolution rules read an unknown
enumerant."""

from __future__ import annotations

from typing import Any

import capnp
import pytest

from procurator.core.errors import ValidationError
from procurator.core.fleet import parse_fleet
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()
IMAGE = "/nix/store/" + "a" * 32 + "-web"
UNKNOWN = 7  # an enumerant of a newer client's HealthKind


def _params(method: str) -> Any:
    """A builder of ``Control.<method>``'s parameters."""
    param_type = S.Control.schema.methods[method].param_type
    return capnp._MallocMessageBuilder().init_root(param_type)


def _fleet(builder: Any) -> None:
    worker = builder.init("workers", 1)[0]
    worker.workerId = "host-a"
    vm = worker.init("vms", 1)[0]
    vm.id, vm.hash, vm.nixStorePath = "web", "a" * 32, IMAGE
    named = builder.init("vmRollouts", 1)[0]
    named.name = "web"
    named.settings.maxParallel = 1
    named.settings.health.kind = UNKNOWN
    named.settings.health.port = 8080


def test_an_apply_with_an_unknown_check_kind_is_refused_naming_the_vm_and_the_kind() -> None:
    builder = _params("apply")
    _fleet(builder.init("fleet"))
    builder.fleet.init("rollout").health.kind = UNKNOWN
    with pytest.raises(ValidationError) as info:
        convert.apply_request_from_reader(builder.as_reader())
    details = "\n".join(info.value.details)
    assert "fleet.rollout.health.kind: unknown health check kind (enumerant 7;" in details
    assert "fleet.vmRollouts[0] (web).health.kind: unknown health check kind (enumerant 7;" in (
        details
    )


def test_a_fleet_patch_with_an_unknown_check_kind_is_refused() -> None:
    builder = _params("applyPatch")
    _fleet(builder.init("patch").init("fleet"))
    with pytest.raises(ValidationError) as info:
        convert.patch_request_from_reader(builder.as_reader())
    assert "patch.fleet.vmRollouts[0] (web).health.kind: unknown health check kind" in (
        "\n".join(info.value.details)
    )


def test_known_check_kinds_still_read() -> None:
    builder = S.Fleet.new_message()
    _fleet(builder)
    builder.vmRollouts[0].settings.health.kind = "tcp"
    builder.vmRollouts[0].settings.healthyDeadlineMs = 60_000
    with S.Fleet.from_bytes(builder.to_bytes()) as reader:
        fleet = convert.fleet_from_reader(reader)
    ((name, policy),) = fleet.vm_rollouts
    assert name == "web" and policy.health.kind.value == "tcp" and policy.health.port == 8080


@pytest.mark.parametrize(
    ("health", "kind"),
    [('"grpc"', "grpc"), ('"None"', "None"), ("{ grpc = 50051 }", "grpc")],
)
def test_a_fleet_file_with_an_unknown_check_kind_is_refused_naming_the_kind(
    health: str, kind: str
) -> None:
    text = (
        "[[workers.host-a.vms]]\n"
        'id = "web"\n'
        f'image = "{IMAGE}"\n'
        f"rollout = {{ health = {health} }}\n"
    )
    with pytest.raises(ValidationError) as info:
        parse_fleet(text, source="fleet.toml")
    (problem,) = info.value.details
    assert problem.startswith("fleet.toml:2: workers.host-a.vms[0].rollout.health: must be")
    assert problem.endswith(f"(unknown health check kind {kind!r})")
