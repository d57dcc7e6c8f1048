"""Chunks within a worker's part (procurator.core.fleetpatch): client and
master cut the same chunks; a patch of chunks assembles exactly the
client's file whatever the master held; a one-VM change sends one chunk;
boundaries move locally under insertions and removals; hostile chunks are
refused whole; a master older than chunks gets whole parts."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core import fleetpatch
from procurator.core.control import ApplyResult
from procurator.core.errors import ValidationError
from procurator.core.fleet import diff_fleets
from procurator.core.fleetpatch import (
    CHUNK_MAX_VMS,
    CHUNK_SEP,
    CHUNKING,
    SETTINGS_PART,
    Chunking,
    FleetParts,
    FleetPatch,
    PatchAnswer,
    assemble,
    diff_patched,
    make_patch,
    patch_rounds,
)
from procurator.core.models import Assignment, Fleet, PowerState, UnpinnedVm, VmAssignment
from procurator.core.validation import check_worker_id
from procurator.master.service import fleet_digest

_IMAGES = [f"/nix/store/{c * 32}-vm" for c in "abc"]
_SMALL = Chunking(bits=1, cap=3)  # chunks of 1-3 VMs: small fleets get many


def _vm(vm_id: str, image: int = 0, power: PowerState = PowerState.RUNNING) -> VmAssignment:
    path = _IMAGES[image]
    return VmAssignment(vm_id, path[11:43], path, power)


def _worker(worker_id: str, ids: list[str], changed: str = "") -> Fleet:
    vms = tuple(_vm(i, 1 if i == changed else 0) for i in sorted(ids))
    return Fleet(((worker_id, vms),))


_IDS = [f"vm-{i:04d}" for i in range(1000)]


@st.composite
def fleets(draw: st.DrawFn) -> Fleet:
    """Two workers over 30 ids and some unpinned VMs, so that draws share
    chunks, move VMs between chunks, workers and the settings part."""
    ids = draw(st.lists(st.sampled_from([f"vm-{i}" for i in range(30)]), unique=True))
    workers: dict[str, list[VmAssignment]] = {"w-a": [], "w-b": []}
    unpinned: list[UnpinnedVm] = []
    for vm_id in ids:
        where = draw(st.sampled_from(["w-a", "w-a", "w-b", ""]))
        vm = _vm(vm_id, draw(st.integers(0, 2)), draw(st.sampled_from(list(PowerState))))
        if where:
            workers[where].append(vm)
        else:
            unpinned.append(
                UnpinnedVm(VmAssignment(vm.id, vm.hash, vm.nix_store_path, vm.power, 1, 256))
            )
    return Fleet(
        tuple(
            (w, tuple(sorted(v, key=lambda x: x.id)))
            for w, v in sorted(workers.items())
            if v or draw(st.booleans())
        ),
        tuple(sorted(unpinned, key=lambda u: u.id)),
    )


def _rounds(held: FleetParts | None, client: FleetParts) -> tuple[FleetParts, list[FleetPatch]]:
    """What a client does: digests first, then what the master asks for."""
    patches = [make_patch(client)]
    first = assemble(held, patches[0])
    if first.parts is not None:
        return first.parts, patches
    patches.append(make_patch(client, first.missing))
    second = assemble(held, patches[1])
    assert second.parts is not None and not second.missing
    return second.parts, patches


@settings(max_examples=150, deadline=None)
@given(fleets(), fleets(), st.sampled_from([_SMALL, CHUNKING, Chunking(bits=2, cap=5)]))
def test_chunks_assemble_the_clients_fleet_against_any_held_one(
    held: Fleet, wanted: Fleet, cut: Chunking
) -> None:
    whole = FleetParts.of(wanted)
    client = FleetParts.of(wanted, cut)
    bases = (None, FleetParts.of(held), FleetParts.of(held, _SMALL))
    for base in (*bases, _rounds(FleetParts.of(held), FleetParts.of(held, cut))[0]):
        parts, _ = _rounds(base, client)
        assert parts.fleet() == wanted
        # Whatever the chunks, the parts' digests are the whole cut's (the
        # digests a master before chunks, or a whole apply, computes).
        assert dict(parts.digests) == dict(whole.digests)
        assert dict(parts.owners) == dict(whole.owners)
        assert dict(parts.canonical) == dict(whole.canonical)
        assert parts.request_digest() == fleet_digest(wanted)
        # The master holds the client's chunks of each worker listed in
        # chunks: the next patch of the same file needs nothing sent.
        for worker_id, chunks in client.chunks.items():
            if len(chunks) > 1:
                assert parts.chunks[worker_id] == chunks
        again = assemble(parts, make_patch(client))
        assert again.parts is not None and again.parts.fleet() == wanted


def test_client_and_master_cut_the_same_chunks() -> None:
    fleet = _worker("w-a", _IDS)
    client, master = FleetParts.of(fleet), FleetParts.of(fleet)
    assert [c.digest for c in client.chunks["w-a"]] == [c.digest for c in master.chunks["w-a"]]
    chunks = client.chunks["w-a"]
    assert 10 < len(chunks) < 100  # about 1,000 / 32
    assert all(len(c.vms) <= CHUNKING.cap for c in chunks)
    assert tuple(vm for c in chunks for vm in c.vms) == fleet.workers[0][1]
    # The listing names chunks by worker and first VM, never a worker id.
    listing = dict(make_patch(client).parts)
    assert "w-a" not in listing and len(listing) == len(chunks) + 1
    assert all(check_worker_id(name) is not None for name in listing if name)


def _changed(before: FleetParts, after: FleetParts) -> int:
    old = {c.digest for c in before.chunks["w-a"]}
    new = {c.digest for c in after.chunks["w-a"]}
    return max(len(old - new), len(new - old))


def test_boundaries_move_locally_under_insertion_and_removal() -> None:
    base_ids = _IDS[::2]  # room between every two ids
    base = FleetParts.of(_worker("w-a", base_ids))
    assert max(len(c.vms) for c in base.chunks["w-a"]) < CHUNKING.cap  # boundaries by content
    for at in range(0, len(base_ids), 7):
        inserted = FleetParts.of(_worker("w-a", [*base_ids, _IDS[2 * at + 1]]))
        assert _changed(base, inserted) <= 2, at
        removed = FleetParts.of(_worker("w-a", base_ids[:at] + base_ids[at + 1 :]))
        assert _changed(base, removed) <= 2, at
        replaced = FleetParts.of(_worker("w-a", base_ids, changed=base_ids[at]))
        assert _changed(base, replaced) == 1, at


def test_the_cap_bounds_chunks_where_no_id_ends_one() -> None:
    parts = FleetParts.of(_worker("w-a", _IDS), Chunking(bits=16, cap=50))
    assert [len(c.vms) for c in parts.chunks["w-a"]][:-1] == [50] * 19
    with pytest.raises(ValueError, match="cap"):
        Chunking(cap=CHUNK_MAX_VMS + 1)


def test_a_one_vm_change_sends_one_chunk_and_keeps_the_rest_by_identity() -> None:
    held = FleetParts.of(Fleet((*_worker("w-a", _IDS).workers, *_worker("w-b", ["b-1"]).workers)))
    ids_b = ["b-1"]
    changed = Fleet(
        (*_worker("w-a", _IDS, changed="vm-0500").workers, *_worker("w-b", ids_b).workers)
    )
    parts, patches = _rounds(held, FleetParts.of(changed))
    assert len(patches) == 2
    assert parts.fleet() == changed
    (name,) = [
        n
        for n, _ in patches[1].parts
        if n not in dict(patches[0].parts) or n in (assemble(held, patches[0]).missing)
    ]
    assert name.startswith("w-a/")
    ((worker, vms),) = patches[1].sent.workers
    assert worker == "w-a" and len(vms) <= CHUNKING.cap and "vm-0500" in {v.id for v in vms}
    # The unchanged worker's list and chunks are the held ones themselves.
    assert parts.workers["w-b"] is held.workers["w-b"]
    kept = [a is b for a, b in zip(parts.chunks["w-a"], held.chunks["w-a"], strict=True)]
    assert kept.count(False) == 1
    # The same file again: one round, the chunked worker passed by identity.
    again, patches = _rounds(parts, FleetParts.of(changed))
    assert len(patches) == 1 and again.workers["w-a"] is parts.workers["w-a"]


def test_a_stale_or_unknown_chunk_is_missing_never_guessed() -> None:
    held = FleetParts.of(_worker("w-a", _IDS[:200]))
    patch = make_patch(FleetParts.of(_worker("w-a", _IDS[:200])))
    forged_name = patch.parts[3][0]
    forged = tuple((n, bytes(32) if n == forged_name else d) for n, d in patch.parts)
    assert assemble(held, FleetPatch(forged)).missing == (forged_name,)
    # Nothing held (a restarted master): every entry.
    assert assemble(None, patch).missing == tuple(n for n, _ in patch.parts)


def _refused(held: FleetParts | None, patch: FleetPatch) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        assemble(held, patch)
    return list(caught.value.details)


def test_hostile_chunks_are_refused_whole() -> None:
    fleet = _worker("w-a", _IDS[:200])
    held = FleetParts.of(fleet)
    client = FleetParts.of(fleet)
    patch = make_patch(client)
    entries = list(patch.parts)
    settings_entry, first, second = entries[0], entries[1], entries[2]
    # The same chunk digest under two names: the second name is not what
    # the digest holds.
    twice = FleetPatch((settings_entry, first, (second[0], first[1]), *entries[3:]))
    assert _refused(held, twice) == [
        f"patch.parts[{second[0]!r}]: the digest is chunk {first[0]!r}'s"
    ]
    # A name listed twice; a worker listed whole and in chunks; a chunk of
    # a bad worker id, of a bad VM id.
    assert "patch.parts: names must be unique and sorted" in _refused(
        held, FleetPatch((settings_entry, first, first, *entries[2:]))
    )
    both = FleetPatch(tuple(sorted((*entries, ("w-a", held.digests["w-a"])))))
    assert _refused(held, both) == ["patch.parts['w-a']: listed both whole and in chunks"]
    bad = _refused(
        None, FleetPatch((settings_entry, ("W_A/vm-1", bytes(32)), ("w-a/V!", bytes(32))))
    )
    assert bad[0].startswith("patch.parts['W_A/vm-1']: 'W_A' is not a valid worker id")
    assert bad[1].startswith("patch.parts['w-a/V!']: 'V!' is not a valid VM id")
    # A chunk's VMs sent under a worker that is not listed (the chunk
    # names its worker: its digest covers the worker id).
    (chunk_vms,) = [c.vms for c in client.chunks["w-a"] if c.name == first[0]]
    stray = FleetPatch(patch.parts, Fleet((("w-b", chunk_vms),)))
    assert _refused(held, stray) == ["patch.fleet: part 'w-b' is sent but not listed"]
    # Contents that do not match the chunk's digest; an empty chunk; an
    # oversized one; two chunks of a worker that overlap.
    lying = FleetPatch(patch.parts, Fleet((("w-a", (_vm(chunk_vms[0].id, 2), *chunk_vms[1:])),)))
    assert _refused(held, lying) == [f"patch.fleet: chunk {first[0]!r} does not match its digest"]
    empty = FleetPatch(patch.parts, Fleet((("w-a", ()),)))
    assert _refused(held, empty) == ["patch.fleet: an empty chunk of worker 'w-a'"]
    big_ids = [f"x-{i:05d}" for i in range(CHUNK_MAX_VMS + 1)]
    big = Fleet((("w-a", tuple(_vm(i) for i in big_ids)),))
    oversized = make_patch(FleetParts.of(big, Chunking(bits=0, cap=1)))
    over = FleetPatch(
        ((SETTINGS_PART, held.digests[SETTINGS_PART]), ("w-a/x-00000", bytes(32))), big
    )
    assert oversized.parts  # (a listing of one-VM chunks is fine)
    assert _refused(held, over) == [
        f"patch.fleet: a chunk of worker 'w-a' has {CHUNK_MAX_VMS + 1} VMs, "
        f"more than {CHUNK_MAX_VMS}"
    ]
    ids = _IDS[:10]
    lower = FleetParts.of(_worker("w-a", ids[:6]), Chunking(bits=16, cap=6))
    low = lower.chunks["w-a"][0]
    high = FleetParts.of(_worker("w-a", ids[4:]), Chunking(bits=16, cap=6)).chunks["w-a"][0]
    listing = (
        (SETTINGS_PART, lower.digests[SETTINGS_PART]),
        (low.name, low.digest),
        (high.name, high.digest),
    )
    # Held and sent: the assembly's check; both sent: the file's own.
    overlap = FleetPatch(listing, Fleet((("w-a", high.vms),)))
    assert _refused(lower, overlap) == [
        f"workers.w-a.vms: chunks {low.name!r} and {high.name!r} overlap"
    ]
    overlap = FleetPatch(listing, Fleet((("w-a", low.vms), ("w-a", high.vms))))
    assert _refused(lower, overlap) == [
        "workers.w-a.vms: VM id 'vm-0004' is used more than once",
        "workers.w-a.vms: VM id 'vm-0005' is used more than once",
    ]


def test_a_chunk_may_not_take_a_vm_another_worker_keeps() -> None:
    held = FleetParts.of(
        Fleet((*_worker("w-a", _IDS[:200]).workers, *_worker("w-b", _IDS[200:400]).workers))
    )
    # vm-0300 (w-b's, in a chunk w-b keeps) also on w-a.
    stolen = Fleet(
        (
            *_worker("w-a", [*_IDS[:200], "vm-0300"]).workers,
            *_worker("w-b", _IDS[200:400]).workers,
        )
    )
    client = FleetParts.of(stolen)
    first = assemble(held, make_patch(client))
    assert first.parts is None and all(n.startswith("w-a/") for n in first.missing)
    assert _refused(held, make_patch(client, first.missing)) == [
        "workers.w-a.vms: VM id 'vm-0300' is used more than once (also in worker 'w-b')"
    ]
    # Moved, not copied: w-b's chunk that had it is sent too.
    moved = Fleet(
        (
            *_worker("w-a", [*_IDS[:200], "vm-0300"]).workers,
            *_worker("w-b", [i for i in _IDS[200:400] if i != "vm-0300"]).workers,
        )
    )
    parts, _ = _rounds(held, FleetParts.of(moved))
    assert parts.fleet() == moved and parts.owners["vm-0300"] == "w-a"


class _Master:
    """A master holding ``held`` (None: nothing) that takes patches: it
    records each one (``sent``), asks for what it lacks, and applies once
    the assembled fleet is whole, which must be ``expected``."""

    def __init__(self, held: FleetParts | None, expected: Fleet) -> None:
        self.held = held
        self.expected = expected
        self.sent: list[FleetPatch] = []

    async def __call__(self, patch: FleetPatch) -> PatchAnswer:
        self.sent.append(patch)
        answer = assemble(self.held, patch)
        if answer.parts is None:
            return PatchAnswer(None, answer.missing)
        assert answer.parts.fleet() == self.expected
        return PatchAnswer(ApplyResult(2, True, (), "op-1"))


async def test_a_master_older_than_chunks_gets_whole_parts() -> None:
    """An older master (fleet patches, no chunks) checks every listed name
    as a worker id and refuses the patch: the client starts again with
    whole parts, and says so once."""
    client = FleetParts.of(_worker("w-a", _IDS[:300], changed="vm-0100"))
    held = FleetParts.of(_worker("w-a", _IDS[:300]))
    sent: list[FleetPatch] = []
    refused: list[bool] = []

    async def older(patch: FleetPatch) -> PatchAnswer:
        sent.append(patch)
        # The older master's first check of a patch, in the words it was
        # released with (a literal: refuses_chunks must keep recognising
        # them if check_worker_id's wording ever changes).
        problems = [
            f"patch.parts[{name!r}]: {name!r} is not a valid worker id: 1-63 characters of "
            "a-z, 0-9, '.' and '-', starting with a letter or digit"
            for name, _ in patch.parts
            if CHUNK_SEP in name
        ]
        if problems:
            raise ValidationError("fleet patch: refused", details=problems)
        answer = assemble(held, patch)
        if answer.parts is None:
            return PatchAnswer(None, answer.missing)
        return PatchAnswer(ApplyResult(2, True, (), "op-1"))

    result = await patch_rounds(client, older, chunks_refused=lambda: refused.append(True))
    assert result is not None and result.generation == 2
    assert refused == [True]
    assert [[w for w, _ in p.sent.workers] for p in sent] == [[], [], ["w-a"]]
    assert dict(sent[1].parts)["w-a"] == client.digests["w-a"]

    # A refusal that is not about chunks is the master's answer.
    async def invalid(patch: FleetPatch) -> PatchAnswer:
        raise ValidationError("fleet patch: 1 problem", details=["workers: too many"])

    with pytest.raises(ValidationError, match="1 problem"):
        await patch_rounds(client, invalid, chunks_refused=lambda: refused.append(True))
    assert refused == [True]


async def test_a_big_fleet_lists_workers_whole_first_then_the_asked_ones_in_chunks() -> None:
    """Past ``listing_max`` entries in chunks, a first send lists workers
    whole (a round's listing stays O(workers)); the workers the master
    asks for are listed by their chunks next, and only the changed chunk
    is sent. From nothing held, every entry is sent in the third round."""
    ids = {w: [f"{w[-1]}{i:03d}" for i in range(200)] for w in ("w-a", "w-b", "w-c")}
    before = Fleet(tuple(_worker(w, v).workers[0] for w, v in ids.items()))
    after = Fleet(
        tuple(_worker(w, v, "b100" if w == "w-b" else "").workers[0] for w, v in ids.items())
    )
    for held, changed in ((FleetParts.of(before), True), (None, False)):
        master = _Master(held, after)
        sent = master.sent
        result = await patch_rounds(FleetParts.of(after), master, listing_max=10)
        assert result is not None and len(sent) == 3
        assert [n for n, _ in sent[0].parts] == [SETTINGS_PART, "w-a", "w-b", "w-c"]
        if changed:
            listed = [n for n, _ in sent[1].parts]
            assert listed[:2] == [SETTINGS_PART, "w-a"] and listed[-1] == "w-c"
            assert all(n.startswith("w-b/") for n in listed[2:-1])
            assert [[w for w, _ in p.sent.workers] for p in sent] == [[], [], ["w-b"]]
            assert "b100" in {vm.id for vm in sent[2].sent.workers[0][1]}
        else:
            assert sum(len(vms) for _, vms in sent[2].sent.workers) == 600


async def test_digests_believed_held_make_one_send_of_what_changed() -> None:
    """With the digests of the fleet the client applied last (``held``), the
    first send carries what changed since, the changed big worker listed by
    its chunks even past ``listing_max``: one send instead of two (three).
    A wrong belief costs rounds, never the fleet: against a master holding
    another fleet (or nothing) the rounds still assemble the client's."""
    ids = {w: [f"{w[-1]}{i:03d}" for i in range(200)] for w in ("w-a", "w-b", "w-c")}
    before = Fleet(tuple(_worker(w, v).workers[0] for w, v in ids.items()))
    after = Fleet(
        tuple(_worker(w, v, "b100" if w == "w-b" else "").workers[0] for w, v in ids.items())
    )
    other = Fleet(
        tuple(_worker(w, v, "a007" if w == "w-a" else "").workers[0] for w, v in ids.items())
    )
    believed = FleetParts.of(before).entry_digests()
    for master_holds, listing_max, sends in (
        (FleetParts.of(before), 10, 1),
        (FleetParts.of(before), 10_000, 1),
        # w-a differs: asked for whole, then listed by its chunks, then its chunk.
        (FleetParts.of(other), 10, 3),
        (FleetParts.of(other), 10_000, 2),
        (None, 10, 3),  # holds nothing: as without a belief, but w-b's chunk goes first
    ):
        master = _Master(master_holds, after)
        sent = master.sent
        result = await patch_rounds(
            FleetParts.of(after), master, listing_max=listing_max, held=believed
        )
        assert result is not None and len(sent) == sends, (listing_max, len(sent))
        first = sent[0]
        in_chunks = {n.split(CHUNK_SEP)[0] for n, _ in first.parts if CHUNK_SEP in n}
        assert in_chunks == ({"w-b"} if listing_max == 10 else {"w-a", "w-b", "w-c"})
        ((worker, vms),) = first.sent.workers
        assert worker == "w-b" and "b100" in {vm.id for vm in vms} and len(vms) < 200


async def test_a_stale_belief_whose_chunks_overflow_the_listing_costs_rounds_not_the_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A belief that is stale (another client applied since) lists the
    client's changed worker by its chunks and asks for its changed chunk;
    the master then asks for a worker the client believed it held, whose
    chunks push the listing past ``MAX_ENTRIES``, so the next round lists
    every worker whole: what was asked by chunk is sent as its worker
    (the name asked is translated to the listing of the round, never a
    name the round does not list)."""
    monkeypatch.setattr(fleetpatch, "MAX_ENTRIES", 12)
    ids = {w: [f"{w[-1]}{i:03d}" for i in range(200)] for w in ("w-a", "w-b", "w-c")}

    def fleet(changed: str = "") -> Fleet:
        return Fleet(tuple(_worker(w, v, changed).workers[0] for w, v in ids.items()))

    believed = FleetParts.of(fleet()).entry_digests()  # what this client applied
    master_holds = FleetParts.of(fleet("b007"))  # another client applied since
    mine = FleetParts.of(fleet("a100"))
    master = _Master(master_holds, mine.fleet())
    assert sum(len(chunks) for chunks in mine.chunks.values()) > 12  # all in chunks: too many
    assert await patch_rounds(mine, master, listing_max=3, held=believed) is not None
    assert all(CHUNK_SEP not in name for name, _ in master.sent[-1].parts)  # whole at the end


@settings(max_examples=200, deadline=None)
@given(fleets(), fleets(), st.sampled_from([CHUNKING, _SMALL]), st.sampled_from([CHUNKING, _SMALL]))
def test_a_cut_that_reuses_a_previous_cut_is_the_cut_itself(
    before: Fleet, after: Fleet, chunking: Chunking, earlier: Chunking
) -> None:
    # Whatever the earlier fleet and its cut: the same parts, chunks,
    # digests and index as a cut from nothing.
    previous = FleetParts.of(before, earlier)
    assert FleetParts.of(after, chunking, previous=previous) == FleetParts.of(after, chunking)


def test_a_cut_that_reuses_a_previous_cut_encodes_only_the_changed_chunk() -> None:
    # A long-lived client's next apply (ControlClient keeps its last cut):
    # the fleet is built anew (equal VMs, other objects) with one VM changed.
    previous = FleetParts.of(_worker("w-a", _IDS))
    changed = _worker("w-a", _IDS, changed="vm-0500")
    parts = FleetParts.of(changed, previous=previous)
    old_rows = {id(c.rows) for c in previous.chunks["w-a"]}
    encoded = [c for c in parts.chunks["w-a"] if id(c.rows) not in old_rows]
    assert [c.vms[0].id <= "vm-0500" <= c.vms[-1].id for c in encoded] == [True]
    # Every chunk carries the new fleet's own VM objects.
    assert [vm for c in parts.chunks["w-a"] for vm in c.vms] == list(changed.workers[0][1])
    assert all(
        a is b
        for a, b in zip(
            (vm for c in parts.chunks["w-a"] for vm in c.vms), changed.workers[0][1], strict=True
        )
    )
    assert parts == FleetParts.of(changed)
    # Nothing changed: the worker's canonical JSON is the one cut before.
    again = FleetParts.of(changed, previous=parts)
    assert again.canonical["w-a"] is parts.canonical["w-a"]
    assert again == parts


@settings(max_examples=200, deadline=None)
@given(fleets(), fleets(), st.sampled_from([_SMALL, CHUNKING]), st.booleans())
def test_the_diff_over_the_changed_chunks_is_the_whole_diff(
    before: Fleet, after: Fleet, cut: Chunking, committed: bool
) -> None:
    # The master's diff of a patched apply: the held fleet's chunks
    # against the assembled ones. ``committed``: the assignments are the
    # held lists themselves (the fast path) or equal copies (the whole diff).
    before, after = replace(before, unpinned=()), replace(after, unpinned=())
    held, _ = _rounds(None, FleetParts.of(before, cut))
    parts, _ = _rounds(held, FleetParts.of(after, cut))
    assignments = {
        w: Assignment(w, 1, vms if committed else tuple(list(vms)))
        for w, vms in held.workers.items()
    }
    fleet = parts.fleet()
    assert diff_patched(assignments, fleet, held, parts) == diff_fleets(assignments, fleet)


def test_a_one_vm_change_is_diffed_as_one_replaced_vm() -> None:
    held, _ = _rounds(None, FleetParts.of(_worker("w-a", _IDS)))
    parts, patches = _rounds(held, FleetParts.of(_worker("w-a", _IDS, changed="vm-0500")))
    assert len(patches[-1].sent.workers) == 1  # one chunk sent
    assignments = {"w-a": Assignment("w-a", 1, held.workers["w-a"])}
    (diff,) = diff_patched(assignments, parts.fleet(), held, parts)
    assert (diff.worker_id, diff.replaced, diff.added, diff.removed) == (
        "w-a",
        ("vm-0500",),
        (),
        (),
    )
    assert [diff] == diff_fleets(assignments, parts.fleet())
