"""Fleet patches, the pure part (procurator.core.fleetpatch): a patch
assembled against any held fleet is exactly the client's fleet, or names
what is missing; hostile patches are refused whole."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.errors import ValidationError
from procurator.core.fleetpatch import (
    SETTINGS_PART,
    FleetParts,
    FleetPatch,
    PatchAnswer,
    assemble,
    make_patch,
    patch_rounds,
)
from procurator.core.models import (
    Fleet,
    OnWorkerLost,
    PlacementPolicy,
    PlacementStrategy,
    PowerState,
    RolloutPolicy,
    UnpinnedVm,
    VmAssignment,
)
from procurator.master.service import fleet_digest

_IMAGES = [f"/nix/store/{c * 32}-vm" for c in "abc"]


def _vm(
    vm_id: str, image: int, power: PowerState = PowerState.RUNNING, size: int = 0
) -> VmAssignment:
    path = _IMAGES[image]
    return VmAssignment(vm_id, path[11:43], path, power, size, 256 * size)


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    """Fleets over a small id space, so that two draws share parts."""
    ids = draw(st.lists(st.sampled_from([f"vm-{i}" for i in range(12)]), unique=True))
    workers: dict[str, list[VmAssignment]] = {}
    unpinned: list[UnpinnedVm] = []
    for vm_id in ids:
        where = draw(st.sampled_from(["w-a", "w-b", "w-c", "w-d", ""]))
        image = draw(st.integers(0, 2))
        power = draw(st.sampled_from(list(PowerState)))
        if where:
            workers.setdefault(where, []).append(_vm(vm_id, image, power))
        else:
            unpinned.append(
                UnpinnedVm(_vm(vm_id, image, power, 1), spread=draw(st.sampled_from(["", "g"])))
            )
    for empty in draw(st.lists(st.sampled_from(["w-e", "w-f"]), unique=True)):
        workers.setdefault(empty, [])
    strategy = draw(st.sampled_from(list(PlacementStrategy)))
    rollout = draw(st.sampled_from([None, RolloutPolicy(), RolloutPolicy(max_parallel=3)]))
    return Fleet(
        tuple((w, tuple(sorted(vms, key=lambda v: v.id))) for w, vms in sorted(workers.items())),
        tuple(sorted(unpinned, key=lambda u: u.id)),
        PlacementPolicy(strategy),
        rollout,
    )


def _patched(held: FleetParts | None, fleet: Fleet) -> FleetParts:
    """What a client does: digests first, then what the master asks for."""
    client = FleetParts.of(fleet)
    first = assemble(held, make_patch(client))
    if first.parts is not None:
        return first.parts
    second = assemble(held, make_patch(client, first.missing))
    assert second.parts is not None and not second.missing
    return second.parts


@settings(max_examples=150, deadline=None)
@given(fleets(), fleets())
def test_a_patch_against_any_held_fleet_is_the_clients_fleet(held: Fleet, wanted: Fleet) -> None:
    whole = FleetParts.of(wanted)
    for base in (None, FleetParts.of(held), _patched(FleetParts.of(held), held)):
        parts = _patched(base, wanted)
        assert parts.fleet() == wanted
        # Everything a later patch builds on is what a whole cut gives.
        assert dict(parts.digests) == dict(whole.digests)
        assert dict(parts.owners) == dict(whole.owners)
        assert dict(parts.canonical) == dict(whole.canonical)
        assert parts.request_digest() == fleet_digest(wanted)


def test_only_changed_parts_are_asked_for() -> None:
    held = Fleet((("w-a", (_vm("a1", 0),)), ("w-b", (_vm("b1", 0),))))
    changed = Fleet((("w-a", (_vm("a1", 1),)), ("w-b", (_vm("b1", 0),))))
    answer = assemble(FleetParts.of(held), make_patch(FleetParts.of(changed)))
    assert answer.parts is None and answer.missing == ("w-a",)
    # Nothing held (a restarted master): every part.
    answer = assemble(None, make_patch(FleetParts.of(changed)))
    assert answer.missing == (SETTINGS_PART, "w-a", "w-b")


def _refused(held: Fleet, patch: FleetPatch) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        assemble(FleetParts.of(held), patch)
    return list(caught.value.details)


def test_a_vm_id_of_an_unpatched_worker_is_refused_on_a_patched_one() -> None:
    held = Fleet((("w-a", (_vm("a1", 0),)), ("w-b", (_vm("b1", 0),))))
    # b1 also on w-a, while w-b (unpatched, digest unchanged) keeps it.
    wanted = FleetParts.of(Fleet((("w-a", (_vm("a1", 0), _vm("b1", 0))), ("w-b", (_vm("b1", 0),)))))
    assert _refused(held, make_patch(wanted, ["w-a"])) == [
        "workers.w-a.vms: VM id 'b1' is used more than once (also in worker 'w-b')"
    ]
    # An unpinned VM taking a pinned VM's id.
    settings_ = FleetParts.of(
        Fleet(
            (("w-a", (_vm("a1", 0),)), ("w-b", (_vm("b1", 0),))),
            (UnpinnedVm(_vm("a1", 0, size=1)),),
        )
    )
    assert _refused(held, make_patch(settings_, [SETTINGS_PART])) == [
        "vms: VM id 'a1' is used more than once (also in worker 'w-a')"
    ]
    # Moving a VM from one worker to another is not a duplicate when both
    # parts are sent, nor when the old one is dropped.
    moved = FleetParts.of(Fleet((("w-a", (_vm("a1", 0), _vm("b1", 0))), ("w-b", ()))))
    assert assemble(FleetParts.of(held), make_patch(moved, ["w-a", "w-b"])).parts is not None
    dropped = FleetParts.of(Fleet((("w-a", (_vm("a1", 0), _vm("b1", 0))),)))
    assert assemble(FleetParts.of(held), make_patch(dropped, ["w-a"])).parts is not None


def test_malformed_patches_are_refused_whole() -> None:
    held = Fleet((("w-a", (_vm("a1", 0),)),))
    good = make_patch(FleetParts.of(Fleet((("w-a", (_vm("a1", 1),)),))), ["w-a"])
    settings_digest = dict(good.parts)[SETTINGS_PART]
    # Contents that do not match their digest (a client bug, or a try at
    # planting a part under another part's digest).
    lying = FleetPatch(good.parts, Fleet((("w-a", (_vm("a1", 2),)),)))
    assert _refused(held, lying) == ["patch.fleet: part 'w-a' does not match its digest"]
    # A part sent but not listed; parts out of order; no settings part; a
    # bad worker id; a short digest.
    unlisted = FleetPatch(((SETTINGS_PART, settings_digest),), good.sent)
    assert _refused(held, unlisted) == ["patch.fleet: part 'w-a' is sent but not listed"]
    assert "patch.parts: names must be unique and sorted" in _refused(
        held, FleetPatch(tuple(reversed(good.parts)))
    )
    assert _refused(held, FleetPatch((("w-a", bytes(32)),))) == [
        "patch.parts: the settings part (named '') is not listed"
    ]
    bad = _refused(held, FleetPatch(((SETTINGS_PART, settings_digest), ("Bad_Id", b"x"))))
    assert any(d.startswith("patch.parts['Bad_Id']: ") for d in bad)
    assert "patch.parts['Bad_Id']: a digest is 32 bytes" in bad
    # The parts sent obey a fleet file's rules.
    invalid = FleetParts.of(Fleet((("w-a", (VmAssignment("a1", "x", "/tmp/not-a-store-path"),)),)))
    details = _refused(held, make_patch(invalid, ["w-a"]))
    assert any(d.startswith("workers.w-a.vms[0].image") for d in details)
    # Settings sent without being marked as sent.
    sneaky = FleetPatch(good.parts, Fleet(good.sent.workers, rollout=RolloutPolicy()))
    assert "patch.fleet: settings sent without settingsSent" in _refused(held, sneaky)


def test_unknown_digests_are_missing_never_guessed() -> None:
    held = Fleet((("w-a", (_vm("a1", 0),)),))
    parts = make_patch(FleetParts.of(held)).parts
    forged = tuple((name, bytes(32)) if name == "w-a" else (name, d) for name, d in parts)
    answer = assemble(FleetParts.of(held), FleetPatch(forged))
    assert answer.parts is None and answer.missing == ("w-a",)
    # A worker the held fleet never had.
    extra = tuple(sorted((*parts, ("w-new", bytes(32)))))
    assert assemble(FleetParts.of(held), FleetPatch(extra)).missing == ("w-new",)


async def test_a_master_asking_for_parts_the_fleet_does_not_have_is_refused_typed() -> None:
    """The master's ``missing`` is a peer's word: a name that is not a part
    of the client's fleet is a malformed answer (typed, as the RPC layer
    refuses other malformed answers), not a ``ValueError`` from deep in
    the client."""
    parts = FleetParts.of(Fleet((("w-a", (_vm("a1", 0),)),)))
    sent: list[FleetPatch] = []

    async def send(patch: FleetPatch) -> PatchAnswer:
        sent.append(patch)
        return PatchAnswer(None, ("w-a", "w-ghost"))

    with pytest.raises(ValidationError, match="w-ghost") as refused:
        await patch_rounds(parts, send)
    assert "not parts of the fleet sent" in refused.value.message
    assert len(sent) == 1  # nothing more is sent after such an answer


def test_on_worker_lost_and_rollouts_are_in_the_settings_part() -> None:
    base = Fleet(unpinned=(UnpinnedVm(_vm("u1", 0, size=1)),))
    for other in (
        Fleet(unpinned=(UnpinnedVm(_vm("u1", 0, size=1), on_worker_lost=OnWorkerLost.WAIT),)),
        Fleet(unpinned=base.unpinned, rollout=RolloutPolicy()),
        Fleet(unpinned=base.unpinned, vm_rollouts=(("u1", RolloutPolicy()),)),
        Fleet(unpinned=base.unpinned, placement=PlacementPolicy(PlacementStrategy.SPREAD)),
    ):
        assert (
            FleetParts.of(other).digests[SETTINGS_PART]
            != FleetParts.of(base).digests[SETTINGS_PART]
        )
