"""Rules written once in procurator.core.validation and used by every
boundary that checks the same thing: a health check's HTTP path (the fleet
file, the wire, ``validate_fleet``) and a rollout id (the client and the
master's RPC layer). Each place had its own copy; ``validate_fleet``'s
path rule was looser than the others and let a path with spaces or a CRLF
through (a fleet built in process, or assembled from a patch) that every
worker would then refuse in its assignment."""

from __future__ import annotations

import json

import pytest

from procurator.core.errors import ProcuratorError, ValidationError
from procurator.core.fleet import parse_fleet, validate_fleet
from procurator.core.models import Fleet, HealthCheck, HealthKind, RolloutPolicy, VmAssignment
from procurator.core.validation import check_http_path, check_rollout_id
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()
IMAGE = "/nix/store/" + "a" * 32 + "-web"

PATHS = {
    "/": True,
    "/healthz?full=1&x=%20": True,
    "/sant\u00e9": True,  # non-ASCII: the prober percent-encodes it
    "/" + "a" * 1023: True,
    "/" + "a" * 1024: False,
    "": False,
    "healthz": False,
    "/a b": False,
    "/a\tb": False,
    "/a\r\nHost: evil": False,
    "/a\x00": False,
    "/a\u00a0b": False,  # a no-break space
}


def _by_file(path: str) -> bool:
    text = (
        "[rollout]\n"
        f"health = {{ http = {json.dumps(path)}, port = 80 }}\n"
        "[[workers.host-a.vms]]\n"
        f'id = "web"\nimage = "{IMAGE}"\n'
    )
    try:
        parse_fleet(text)
    except ValidationError:
        return False
    return True


def _by_wire(path: str) -> bool:
    builder = S.Fleet.new_message()
    health = builder.init("rollout").health
    health.kind, health.port, health.path = "http", 80, path
    try:
        with S.Fleet.from_bytes(builder.to_bytes()) as reader:
            convert.fleet_from_reader(reader)
    except ProcuratorError:  # ValidationError, or LimitExceededError for the length
        return False
    return True


def _by_validate_fleet(path: str) -> bool:
    policy = RolloutPolicy(health=HealthCheck(HealthKind.HTTP, 80, path, min_healthy_ms=0))
    fleet = Fleet((("host-a", (VmAssignment("web", "h", IMAGE),)),), rollout=policy)
    try:
        validate_fleet(fleet)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize("path", list(PATHS))
def test_every_boundary_takes_the_same_http_paths(path: str) -> None:
    ok = PATHS[path]
    assert (check_http_path(path) is None) is ok
    assert _by_file(path) is ok
    assert _by_wire(path) is ok
    assert _by_validate_fleet(path) is ok


def test_validate_fleet_refuses_a_path_with_a_space_naming_the_vm() -> None:
    # The looser copy let this through: a master fed it in process (or by a
    # patch) would push every worker an assignment it refuses.
    check = HealthCheck(HealthKind.HTTP, 80, "/a b", min_healthy_ms=0)
    fleet = Fleet(
        (("host-a", (VmAssignment("web", "h", IMAGE),)),),
        vm_rollouts=(("web", RolloutPolicy(health=check)),),
    )
    with pytest.raises(ValidationError) as info:
        validate_fleet(fleet)
    (problem,) = info.value.details
    assert problem.startswith("rollout of VM web: health check path: '/a b' is not an HTTP path")


@pytest.mark.parametrize(
    ("rollout_id", "ok"),
    [("", True), ("ro-3f9a0c12b7de", True), ("x" * 64, True), ("x" * 65, False), ("ro-\n", False)],
)
def test_a_rollout_id_is_checked_by_one_rule(rollout_id: str, ok: bool) -> None:
    problem = check_rollout_id(rollout_id)
    assert (problem is None) is ok
    if problem is not None:
        assert "is not a rollout id: at most 64 printable characters" in problem
