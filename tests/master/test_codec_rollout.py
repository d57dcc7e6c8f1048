"""The store's text for the rollout contract: a VM's health in its stored
status (written only when checked, so other rows keep their text), health
checks and prepared images (procurator.master.store.codec)."""

from __future__ import annotations

import json

from procurator.core.models import (
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    PreparedImage,
    PrepareState,
    VmStatus,
)
from procurator.master.store.codec import (
    decode_health_check,
    decode_prepared,
    decode_vm_status,
    encode_health_check,
    encode_prepared,
    encode_vm_status,
)

NEW = "/nix/store/" + "b" * 32 + "-web"


def test_health_is_stored_with_the_vm_status() -> None:
    for health in Health:
        status = VmStatus("web-1", Phase.RUNNING, "a", "m", 1, "10.0.0.2", health=health)
        assert decode_vm_status("web-1", encode_vm_status(status)) == status
    unchecked = encode_vm_status(VmStatus("web-1", Phase.RUNNING))
    assert "health" not in json.loads(unchecked)  # the text older releases wrote
    newer = json.dumps({"phase": "running", "health": "glowing"})
    assert decode_vm_status("web-1", newer).health is Health.UNCHECKED


def test_health_checks_and_prepared_images_round_trip() -> None:
    for check in (None, HealthCheck(), HealthCheck(HealthKind.HTTP, 80, "/h", 204, 5, 7)):
        assert decode_health_check(encode_health_check(check)) == check
    assert encode_health_check(None) == ""
    prepared = (
        PreparedImage(NEW),
        PreparedImage(NEW + "2", PrepareState.FAILED, "cannot be realised"),
    )
    assert decode_prepared(encode_prepared(prepared)) == prepared
    assert decode_prepared(encode_prepared(())) == ()
    newer = json.dumps({"prepared": [[NEW, "half-baked", ""]]})
    assert decode_prepared(newer) == (PreparedImage(NEW, PrepareState.PENDING),)
