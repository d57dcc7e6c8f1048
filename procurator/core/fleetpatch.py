"""Fleet patches: an apply that carries only the parts of the fleet that changed.

A fleet file is cut into **parts**: one per worker (its pinned VMs, named by
the worker id) and the *settings* part (named ``""``: the unpinned VMs, the
placement strategy and the rollout settings). Each part has a **digest**,
SHA-256 of its canonical JSON (below), computed the same way by the client
and the master. A patched apply (``Control.applyPatch``) lists every part of
the client's fleet with its digest and carries the contents of some of them;
the master takes the others from the parts of the fleet it last applied
(``FleetParts``, keyed by digest), and answers which parts it does not hold
(``missing``; nothing is applied) so the client sends those. The fleet the
master assembles is exactly the client's file whatever the master applied in
between: parts are content-addressed, so a stale cache costs a resend, never
a merge. Everything after the assembly (placement, the diff, rollouts, the
commit, request ids) is the whole apply's own path.

Canonical JSON (``separators=(",", ":")``, UTF-8):

- a worker part: ``[worker_id, [[id, hash, image, power, vcpus,
  memory_mib], ...]]``, VMs sorted by id;
- the settings part: ``[unpinned, strategy, rollout, group_rollouts,
  vm_rollouts]`` where ``unpinned`` is ``[[id, hash, image, power, vcpus,
  memory_mib, [[key, value], ...], spread, on_worker_lost], ...]`` sorted by
  id, a rollout policy is ``[max_parallel, [kind, port, path, expect,
  min_healthy_ms, interval_ms], healthy_deadline_ms, canary, auto_revert,
  auto_promote]`` (``null`` for none) and the named ones ``[[name,
  policy], ...]`` sorted by name.

**Chunks.** A worker part is itself cut into chunks, so that a one-VM
change in a big worker sends one chunk (tens of VMs), not the worker's
whole list. Over the part's VMs sorted by id, a chunk ends after a VM whose
id's CRC-32 has its low 5 bits zero, or after 128 VMs (``CHUNKING``): the
boundaries depend on the ids around them, so adding or removing a VM
changes the chunk it falls in (and the next, when it moves a boundary), not
every chunk after it. A chunk is named ``<worker id>/<first VM id>`` (``/``
is in neither alphabet, so no worker id takes that form) and addressed by
the SHA-256 of its canonical JSON, the worker part's form over its VMs:
``[worker_id, [rows...]]``. A patch lists a worker of two chunks or more by
its chunks (in place of its part), any other worker by its part; its
contents carry a chunk as an entry of ``fleet.workers`` under the worker's
id, one per chunk sent. A fleet whose listing in chunks would pass
``LISTING_FIRST_MAX`` entries lists its workers whole first and by their
chunks only the workers the master asks for (``patch_rounds``: one round
more, and every round's listing O(workers), not O(VMs / 32)). The master
accepts any boundaries (a client with another cut only costs itself
resends): each chunk 1-``CHUNK_MAX_VMS`` VMs, sorted, a worker's chunks in
order and not overlapping; it keeps the chunks of the fleet it holds only
(``FleetParts.chunk_index``, by digest: bounded by that fleet, replaced
with it), looks a listed chunk up by digest (a digest it holds under
another name is a malformed patch), and splices a worker's canonical JSON
from its chunks' bytes, so the worker part's digest, the owners index and
the request digest are exactly a whole cut's.

**What a client believes the master holds.** A client that applied a fleet
to this master before passes that fleet's digests (``FleetParts.entry_digests``)
to ``patch_rounds`` as ``held``: the first send then already carries every
listed entry whose digest is not among them (a big worker whose part changed
is listed by its chunks at once), so the usual one-VM change is one round,
not two (three past ``LISTING_FIRST_MAX``). The belief is a hint and nothing
more: the master assembles from what it holds and what is sent, checks every
digest, and asks for what it lacks as ever, so a wrong belief (another apply
came in between) costs the rounds it would have cost anyway, or a few bytes
sent for nothing, and never changes the fleet applied.

**What a client re-encodes.** Cutting a fleet (``FleetParts.of``) is
O(its VMs) in Python: a row, its JSON and a SHA-256 per chunk. A client
that keeps its last cut passes it as ``previous``: a chunk whose VMs equal
one cut before takes that chunk's rows and digest, and a worker whose
chunks are all taken its canonical JSON and digest, so a one-VM change
encodes one chunk and what stays O(the fleet) is a sort, a CRC-32 and a
comparison per VM. The control client keeps its last cut for this; the
CLI (``procurator apply``) runs one apply per process and cuts from
nothing, so only a long-lived client gains.

Compatibility: an older client lists whole parts only, which this module
takes as before. A master older than chunks checks every listed name as a
worker id and refuses a chunk's (``ValidationError``): ``patch_rounds``
recognises that refusal (``refuses_chunks``: the detail that master writes
for a listed chunk name) and starts again with whole parts, and the
control client lists no chunks to that master again. No schema change:
``FleetPatch`` carries chunks as it carried parts.

The whole fleet's request digest (``request_digest``, what a request id is
recorded with) is composed from the worker parts' canonical JSON, so a
patched apply and a whole apply of one file record the same digest, and it
is the digest this master recorded before patches existed.

Validation of a patch (``assemble``) keeps every rule of
``validate_fleet``: the rules about one part (ids, images, hashes,
resources, rollout bounds) run on the parts and chunks sent only, with
``validate_fleet`` itself (a worker's chunks sent as one list); the
fleet-wide ones run incrementally: VM ids unique across parts (the sent VMs
against an index of the cached fleet's, ``owners``, and within a worker by
its chunks' order), the number of workers, of a worker's VMs and of all VMs
(counts per part and chunk). Placement, rollouts and quotas are the apply's
and see the whole assembled fleet.

What keeps the rest of the apply per changed worker: an unchanged part is
the very list the worker's assignment was made from (the master's commit
keeps the lists it was given when no VM waits on a rollout), so the diff
passes it by identity (a worker listed in chunks too, when its chunks are
the very ones held); a fleet with no unpinned VMs skips the scheduler's
facts. A worker whose chunks changed costs the master its chunks sent plus
C-speed work over its VMs (the list's concatenation, the splice and one
SHA-256 of its JSON); its diff (``diff_patched``) compares the VMs of the
chunks that changed only, when its assignment is the held list (checked
by identity; the store's commit still compares the worker's VMs). What
stays O(the fleet) is C-speed copying and hashing: the VM-id index's
copy, the chunk index's rebuild (O(chunks)), and with a request id the
request digest (SHA-256 over the parts' canonical JSON).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import operator
import zlib
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from procurator.core.control import ApplyResult
from procurator.core.errors import LimitExceededError, ValidationError
from procurator.core.fleet import diff_fleets, validate_fleet
from procurator.core.models import (
    Assignment,
    Fleet,
    PlacementPolicy,
    RolloutPolicy,
    UnpinnedVm,
    VmAssignment,
    WorkerDiff,
)
from procurator.core.validation import LIMITS, check_vm_id, check_worker_id

__all__ = [
    "CHUNKING",
    "CHUNK_MAX_VMS",
    "SETTINGS_PART",
    "Assembled",
    "Chunk",
    "Chunking",
    "FleetParts",
    "FleetPatch",
    "PatchAnswer",
    "PatchRequest",
    "assemble",
    "diff_patched",
    "make_patch",
    "patch_rounds",
    "refuses_chunks",
]

SETTINGS_PART = ""
"""The name of the settings part (worker ids are never empty)."""

_DIGEST_BYTES = 32
PATCH_ROUNDS = 4
"""Sends of one patch at most: digests only, (in a big fleet) the chunks'
digests of the workers the master asked for, then what it asked for, then
once more if another apply replaced what it held in between."""

LISTING_FIRST_MAX = 256
"""The most entries a first send lists with every big worker in chunks
(~15 KB of digests); a bigger fleet lists its workers whole first and
only those the master asks for by their chunks, so that a round's listing
stays O(workers), not O(VMs / 32)."""


_ENCODER = json.JSONEncoder(separators=(",", ":"))  # json.dumps's, made once


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _vm_row(vm: VmAssignment) -> list[Any]:
    return [vm.id, vm.hash, vm.nix_store_path, vm.power.value, vm.vcpus, vm.memory_mib]


def worker_json(worker_id: str, vms: Iterable[VmAssignment]) -> bytes:
    """A worker part's canonical JSON (also the worker's element of the
    request digest)."""
    return _dumps([worker_id, sorted(_vm_row(vm) for vm in vms)])


def _unpinned_rows(unpinned: Iterable[UnpinnedVm]) -> list[list[Any]]:
    return sorted(
        [
            *_vm_row(u.vm),
            [list(pair) for pair in u.constraints],
            u.spread,
            u.on_worker_lost.value,
        ]
        for u in unpinned
    )


def _policy(policy: RolloutPolicy | None) -> list[Any] | None:
    if policy is None:
        return None
    health = policy.health
    return [
        policy.max_parallel,
        [
            health.kind.value,
            health.port,
            health.path,
            health.expect,
            health.min_healthy_ms,
            health.interval_ms,
        ],
        policy.healthy_deadline_ms,
        policy.canary,
        policy.auto_revert,
        policy.auto_promote,
    ]


def settings_json(fleet: Fleet) -> bytes:
    """The settings part's canonical JSON."""
    return _dumps(
        [
            _unpinned_rows(fleet.unpinned),
            fleet.placement.strategy.value,
            _policy(fleet.rollout),
            [[name, _policy(p)] for name, p in sorted(fleet.group_rollouts, key=lambda x: x[0])],
            [[name, _policy(p)] for name, p in sorted(fleet.vm_rollouts, key=lambda x: x[0])],
        ]
    )


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@dataclass(frozen=True, slots=True)
class Chunking:
    """Where a worker part is cut into chunks (module docstring): after a
    VM whose id's CRC-32 has its low ``bits`` bits zero (chunks of about
    ``2**bits`` VMs), or after ``cap`` VMs."""

    bits: int = 5
    cap: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.bits <= 16 or not 1 <= self.cap <= CHUNK_MAX_VMS:
            raise ValueError(
                f"chunking: bits must be 0-16 and cap 1-{CHUNK_MAX_VMS}, "
                f"not {self.bits} and {self.cap}"
            )


CHUNK_MAX_VMS = 1024
"""The most VMs a master takes in one chunk."""

CHUNKING = Chunking()
"""The cut a client and a master make (another client's cut costs that
client resends of its chunks, never a wrong fleet)."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A run of one worker's VMs, consecutive by id: named
    ``<worker id>/<first VM id>``, addressed by ``digest``, SHA-256 of its
    canonical JSON ``[worker_id, [rows...]]`` (the worker part's form)."""

    worker_id: str
    vms: tuple[VmAssignment, ...]  # sorted by id, never empty
    rows: bytes  # the VMs' rows, canonical JSON without the list's brackets
    digest: bytes

    @property
    def name(self) -> str:
        return f"{self.worker_id}{CHUNK_SEP}{self.vms[0].id}"


CHUNK_SEP = "/"
"""Between a chunk's worker id and its first VM id: in neither alphabet."""


def _chunk(worker_id: str, pairs: Sequence[tuple[list[Any], VmAssignment]]) -> Chunk:
    rows = _dumps([row for row, _ in pairs])[1:-1]
    return Chunk(
        worker_id,
        tuple(vm for _, vm in pairs),
        rows,
        _digest(b"".join((b"[", _dumps(worker_id), b",[", rows, b"]]"))),
    )


_by_id = operator.attrgetter("id")


def _cut(
    worker_id: str,
    vms: Iterable[VmAssignment],
    chunking: Chunking,
    before: Iterable[Chunk] = (),
) -> tuple[Chunk, ...]:
    """A worker's VMs cut into chunks: content-defined, so adding or
    removing a VM changes the chunk it falls in (and the next one, when it
    moves a boundary or a cap), not all the chunks after it.

    ``before``: this worker's chunks in a cut made earlier (with the same
    ``chunking``). A chunk whose VMs equal one of them (by identity first,
    at C speed, then by value) takes its rows and digest instead of
    encoding and hashing them again: the result is the same, byte for
    byte, and a one-VM change re-encodes one chunk, not the worker."""
    ordered = sorted(vms, key=_by_id)
    mask = (1 << chunking.bits) - 1
    crc32 = zlib.crc32
    # Where the ids end a chunk (one pass at C speed: no Python frame per
    # VM), then the caps.
    crcs = map(crc32, map(str.encode, map(_by_id, ordered)))
    ends = list(
        itertools.compress(range(1, len(ordered) + 1), map(operator.not_, map(mask.__and__, crcs)))
    )
    if not ends or ends[-1] != len(ordered):
        ends.append(len(ordered))
    known = {chunk.vms[0].id: chunk for chunk in before}
    chunks: list[Chunk] = []

    def add(piece: tuple[VmAssignment, ...]) -> None:
        old = known.get(piece[0].id)
        if old is not None and old.vms == piece:
            # The piece's own objects (equal to the old ones, maybe not the same).
            chunks.append(Chunk(worker_id, piece, old.rows, old.digest))
        else:
            chunks.append(_chunk(worker_id, [(_vm_row(vm), vm) for vm in piece]))

    start = 0
    for end in ends:
        while end - start > chunking.cap:
            add(tuple(ordered[start : start + chunking.cap]))
            start += chunking.cap
        if end > start:
            add(tuple(ordered[start:end]))
            start = end
    return tuple(chunks)


def _spliced(worker_id: str, chunks: Iterable[Chunk]) -> bytes:
    """A worker part's canonical JSON from its chunks' (byte for byte what
    ``worker_json`` makes of their VMs)."""
    return b"".join((b"[", _dumps(worker_id), b",[", b",".join(c.rows for c in chunks), b"]]"))


@dataclass(frozen=True, slots=True)
class FleetParts:
    """A fleet cut into parts and each worker part into chunks: what the
    master keeps of the fleet it last applied, and what a client computes
    of its file. Immutable; ``assemble`` makes the next one, sharing what
    did not change. Holds the chunks of this fleet only (``chunk_index``),
    so its memory is the fleet's (about twice its canonical JSON)."""

    workers: Mapping[str, tuple[VmAssignment, ...]]
    settings: Fleet  # the fleet's other fields (its ``workers`` empty)
    canonical: Mapping[str, bytes]  # worker id -> its canonical JSON
    digests: Mapping[str, bytes]  # part name -> SHA-256 (settings: SETTINGS_PART)
    # VM id -> the name of the part that has it (pinned: the worker's id;
    # unpinned: SETTINGS_PART).
    owners: Mapping[str, str]
    # worker id -> its chunks in order (an empty worker: none)
    chunks: Mapping[str, tuple[Chunk, ...]] = field(default_factory=dict)
    chunk_index: Mapping[bytes, Chunk] = field(default_factory=dict)  # digest -> chunk

    @classmethod
    def of(
        cls, fleet: Fleet, chunking: Chunking = CHUNKING, *, previous: FleetParts | None = None
    ) -> FleetParts:
        """O(the fleet): once per whole apply, or per client.

        ``previous``: a cut of an earlier fleet with the same ``chunking``
        (a long-lived client's last apply). Its chunks whose VMs are
        unchanged are taken, not encoded and hashed again, and a worker
        whose chunks are all taken keeps its canonical JSON and digest:
        what is left O(the fleet) is a sort, a CRC-32 and a comparison per
        VM (C speed when the VMs are the very objects cut before). The
        result equals a cut without ``previous``."""
        before = previous.chunks if previous is not None else {}
        chunks = {w: _cut(w, vms, chunking, before.get(w, ())) for w, vms in fleet.workers}
        canonical: dict[str, bytes] = {}
        digests: dict[str, bytes] = {}
        for w, these in chunks.items():
            old = before.get(w)
            if (
                previous is not None
                and old is not None
                and len(old) == len(these)
                and all(a.rows is b.rows for a, b in zip(these, old, strict=True))
            ):
                canonical[w] = previous.canonical[w]
                digests[w] = previous.digests[w]
            else:
                canonical[w] = _spliced(w, these)
                digests[w] = _digest(canonical[w])
        settings = _settings_of(fleet)
        digests[SETTINGS_PART] = _digest(settings_json(settings))
        owners = {u.id: SETTINGS_PART for u in fleet.unpinned}
        for worker_id, vms in fleet.workers:
            owners.update(dict.fromkeys(map(_by_id, vms), worker_id))
        index = {c.digest: c for cs in chunks.values() for c in cs}
        return cls(dict(fleet.workers), settings, canonical, digests, owners, chunks, index)

    def listing(self, chunked: Collection[str] | None = None) -> tuple[tuple[str, bytes], ...]:
        """What a patch of this fleet lists, sorted by name: the settings
        part, each worker of one chunk or none as its whole part, each
        other worker (of those in ``chunked``; None: all) as its chunks;
        every worker whole if the chunks would make more entries than a
        patch may list."""
        whole = sorted(self.digests.items())
        entries: list[tuple[str, bytes]] = []
        for name, digest in whole:
            chunks = self.chunks.get(name, ())
            if len(chunks) > 1 and (chunked is None or name in chunked):
                entries.extend((c.name, c.digest) for c in chunks)
            else:
                entries.append((name, digest))
        if len(entries) > MAX_ENTRIES:
            return tuple(whole)
        return tuple(sorted(entries))

    def entry_digests(self) -> frozenset[bytes]:
        """The digests of every part and chunk: what a master holds once it
        applied this fleet (``patch_rounds``'s ``held``)."""
        return frozenset(itertools.chain(self.digests.values(), self.chunk_index))

    def fleet(self) -> Fleet:
        """The whole fleet (O(workers): the parts' tuples are shared)."""
        return Fleet(
            tuple(sorted(self.workers.items())),
            self.settings.unpinned,
            self.settings.placement,
            self.settings.rollout,
            self.settings.group_rollouts,
            self.settings.vm_rollouts,
        )

    def request_digest(self) -> str:
        """What an apply of this fleet records with its request id: equal
        to ``procurator.master.service.fleet_digest`` of the whole fleet,
        computed from the parts' canonical JSON (no re-encoding)."""
        workers = b"[" + b",".join(self.canonical[w] for w in sorted(self.canonical)) + b"]"
        settings = self.settings
        if not settings.unpinned and settings.placement == PlacementPolicy():
            # A pinned fleet's digest is what it was before unpinned VMs existed.
            return hashlib.sha256(workers).hexdigest()
        whole = b"".join(
            (
                b"[",
                workers,
                b",",
                _dumps(_unpinned_rows(settings.unpinned)),
                b",",
                _dumps(settings.placement.strategy.value),
                b"]",
            )
        )
        return hashlib.sha256(whole).hexdigest()


MAX_ENTRIES = LIMITS.max_workers + 1
"""The most entries a patch lists (what a master before chunks took:
every worker and the settings)."""


def _settings_of(fleet: Fleet) -> Fleet:
    return Fleet(
        (),
        fleet.unpinned,
        fleet.placement,
        fleet.rollout,
        fleet.group_rollouts,
        fleet.vm_rollouts,
    )


@dataclass(frozen=True, slots=True)
class FleetPatch:
    """``Control.applyPatch``'s fleet: every entry (part or chunk) by name
    and digest, sorted by name (the settings part first), and the contents
    of the entries sent: ``sent.workers`` are the worker parts and chunks
    sent (a chunk as its worker's id with the chunk's VMs: a worker listed
    in chunks may appear once per chunk sent), ``sent``'s other fields the
    settings part when ``settings_sent``."""

    parts: tuple[tuple[str, bytes], ...]
    sent: Fleet = field(default_factory=Fleet)
    settings_sent: bool = False


def make_patch(
    parts: FleetParts, send: Iterable[str] = (), *, chunked: bool | Collection[str] = True
) -> FleetPatch:
    """The patch of a client's fleet carrying the contents of the entries
    named in ``send`` (none: digests only, what a first attempt sends).
    ``chunked``: the workers listed in chunks (True: every worker of two
    chunks or more; False: none, what a master older than chunks takes)."""
    listing = parts.listing(None if chunked is True else (chunked or ()))
    wanted = set(send)
    unknown = wanted - dict(listing).keys()
    if unknown:
        raise ValueError(f"not parts of this fleet: {sorted(unknown)[:5]}")
    settings = parts.settings
    settings_sent = SETTINGS_PART in wanted
    entries: list[tuple[str, tuple[VmAssignment, ...]]] = []
    by_name = {c.name: c for cs in parts.chunks.values() for c in cs}
    for name in sorted(wanted - {SETTINGS_PART}):
        chunk = by_name.get(name)
        if chunk is not None:
            entries.append((chunk.worker_id, chunk.vms))
        else:
            entries.append((name, parts.workers[name]))
    sent = Fleet(
        tuple(sorted(entries, key=lambda e: (e[0], e[1][0].id if e[1] else ""))),
        *(
            (
                settings.unpinned,
                settings.placement,
                settings.rollout,
                settings.group_rollouts,
                settings.vm_rollouts,
            )
            if settings_sent
            else ()
        ),
    )
    return FleetPatch(listing, sent, settings_sent)


@dataclass(frozen=True, slots=True)
class Assembled:
    """``assemble``'s answer: the parts of the client's whole fleet, or the
    names of the entries the master must be sent (then ``parts`` is None)."""

    parts: FleetParts | None
    missing: tuple[str, ...] = ()


_EMPTY = FleetParts({}, Fleet(), {}, {}, {})


def assemble(cached: FleetParts | None, patch: FleetPatch) -> Assembled:
    """The client's whole fleet from ``patch`` and the ``cached`` parts and
    chunks, or what is missing. Raises ``ValidationError`` for a patch that
    breaks a fleet rule (module docstring) or is malformed: an entry listed
    twice or out of order, a worker listed both whole and in chunks, a bad
    worker id, chunk name or digest, contents sent for an entry not listed
    or that do not match its digest, an empty or oversized chunk, a
    worker's chunks that overlap. The cost is the entries sent plus
    O(entries listed) plus, per worker whose chunks changed, C-speed
    copying and hashing of its VMs."""
    problems: list[str] = []
    names = [name for name, _ in patch.parts]
    listed = dict(patch.parts)
    if names != sorted(listed):
        problems.append("patch.parts: names must be unique and sorted")
    if SETTINGS_PART not in listed:
        problems.append("patch.parts: the settings part (named '') is not listed")
    over_limits: list[str] = []
    if len(listed) > MAX_ENTRIES:
        over_limits.append(f"patch.parts: {len(listed)} entries exceed the limit of {MAX_ENTRIES}")
    whole: dict[str, bytes] = {}  # worker listed whole -> its digest
    chunked: dict[str, list[tuple[str, bytes]]] = {}  # worker -> its chunks (name, digest)
    for name, digest in patch.parts:
        if CHUNK_SEP in name:
            worker_id, first = name.split(CHUNK_SEP, 1)
            problem = check_worker_id(worker_id) or check_vm_id(first)
            chunked.setdefault(worker_id, []).append((name, digest))
        else:
            problem = None if name == SETTINGS_PART else check_worker_id(name)
            whole[name] = digest
        if problem is not None:
            problems.append(f"patch.parts[{name!r}]: {problem}")
        if len(digest) != _DIGEST_BYTES:
            problems.append(f"patch.parts[{name!r}]: a digest is {_DIGEST_BYTES} bytes")
    for worker_id in sorted(whole.keys() & chunked.keys()):
        problems.append(f"patch.parts[{worker_id!r}]: listed both whole and in chunks")
    workers_listed = len((whole.keys() - {SETTINGS_PART}) | chunked.keys())
    if workers_listed > LIMITS.max_workers:
        over_limits.append(
            f"patch.parts: {workers_listed} workers exceed the limit of {LIMITS.max_workers}"
        )
    _raise(problems, over_limits)

    # What was sent: whole parts, chunks (by their names), the settings.
    sent_whole: list[tuple[str, tuple[VmAssignment, ...]]] = []
    sent_chunks: dict[str, Chunk] = {}
    merged: dict[str, list[VmAssignment]] = {}  # per worker, for the file's rules
    for worker_id, vms in patch.sent.workers:
        merged.setdefault(worker_id, []).extend(vms)
        if worker_id not in chunked:
            if any(w == worker_id for w, _ in sent_whole[-1:]):
                problems.append(f"patch.fleet: part {worker_id!r} is sent twice")
            sent_whole.append((worker_id, vms))
            continue
        if not vms:
            problems.append(f"patch.fleet: an empty chunk of worker {worker_id!r}")
            continue
        if len(vms) > CHUNK_MAX_VMS:
            problems.append(
                f"patch.fleet: a chunk of worker {worker_id!r} has {len(vms)} VMs, "
                f"more than {CHUNK_MAX_VMS}"
            )
            continue
        chunk = _chunk(
            worker_id, sorted(((_vm_row(vm), vm) for vm in vms), key=lambda pair: pair[0])
        )
        if chunk.name in sent_chunks:
            problems.append(f"patch.fleet: chunk {chunk.name!r} is sent twice")
        sent_chunks[chunk.name] = chunk
    if not patch.settings_sent and _settings_of(patch.sent) != Fleet():
        problems.append("patch.fleet: settings sent without settingsSent")
    # The sent entries' own rules, as a fleet file's (ids, images,
    # resources, duplicates among them, rollout bounds), a worker's chunks
    # sent together as one list.
    try:
        validate_fleet(replace(patch.sent, workers=tuple((w, tuple(v)) for w, v in merged.items())))
    except LimitExceededError as exc:
        over_limits.extend(exc.details)
    except ValidationError as exc:
        problems.extend(exc.details)
    sent = FleetParts.of(replace(patch.sent, workers=tuple(sent_whole)))
    sent_names = {w for w, _ in sent_whole}
    if patch.settings_sent:
        sent_names.add(SETTINGS_PART)
    for name in sorted(sent_names):
        if name not in whole:
            problems.append(f"patch.fleet: part {name!r} is sent but not listed")
        elif sent.digests[name] != whole[name]:
            problems.append(f"patch.fleet: part {name!r} does not match its digest")
    for name, chunk in sent_chunks.items():
        if name not in listed:
            problems.append(f"patch.fleet: chunk {name!r} is sent but not listed")
        elif chunk.digest != listed[name]:
            problems.append(f"patch.fleet: chunk {name!r} does not match its digest")
    _raise(problems, over_limits)

    held = cached or _EMPTY
    missing: list[str] = []
    for name, digest in patch.parts:
        if name in sent_names or name in sent_chunks:
            continue
        if CHUNK_SEP not in name:
            if held.digests.get(name) != digest:
                missing.append(name)
        elif (known := held.chunk_index.get(digest)) is None:
            missing.append(name)
        elif known.name != name:  # the digest names contents, the name their first VM
            problems.append(f"patch.parts[{name!r}]: the digest is chunk {known.name!r}'s")
    _raise(problems)
    if missing:
        return Assembled(None, tuple(missing))

    # The workers: kept whole, sent whole, or from their chunks.
    workers: dict[str, tuple[VmAssignment, ...]] = {}
    canonical: dict[str, bytes] = {}
    digests: dict[str, bytes] = {SETTINGS_PART: whole[SETTINGS_PART]}
    chunks: dict[str, tuple[Chunk, ...]] = {}
    for worker_id in whole.keys() - {SETTINGS_PART}:
        source = sent if worker_id in sent_names else held
        workers[worker_id] = source.workers[worker_id]
        canonical[worker_id] = source.canonical[worker_id]
        digests[worker_id] = whole[worker_id]
        chunks[worker_id] = source.chunks[worker_id]
    for worker_id, entries in chunked.items():
        these = tuple(sent_chunks.get(name) or held.chunk_index[d] for name, d in entries)
        before = held.chunks.get(worker_id)
        if (
            before is not None
            and all(a is b for a, b in zip(these, before, strict=False))
            and (len(these) == len(before))
        ):
            # Unchanged: the very list the worker's assignment was made from.
            workers[worker_id] = held.workers[worker_id]
            canonical[worker_id] = held.canonical[worker_id]
            digests[worker_id] = held.digests[worker_id]
            chunks[worker_id] = before
            continue
        for a, b in itertools.pairwise(these):
            if a.vms[-1].id >= b.vms[0].id:
                problems.append(
                    f"workers.{worker_id}.vms: chunks {a.name!r} and {b.name!r} overlap"
                )
        count = sum(len(c.vms) for c in these)
        if count > LIMITS.max_vms_per_worker:
            over_limits.append(
                f"workers.{worker_id}.vms: {count} VMs exceed the limit of "
                f"{LIMITS.max_vms_per_worker} per worker"
            )
        workers[worker_id] = tuple(itertools.chain.from_iterable(c.vms for c in these))
        canonical[worker_id] = _spliced(worker_id, these)
        digests[worker_id] = _digest(canonical[worker_id])
        chunks[worker_id] = these
    _raise(problems, over_limits)

    # Fleet-wide rules, incrementally: a sent VM's id may be owned in the
    # cached fleet only by an entry this patch replaces or drops.
    settings = sent.settings if patch.settings_sent else held.settings
    fresh: list[tuple[str, VmAssignment]] = [
        (chunk.worker_id, vm) for chunk in sent_chunks.values() for vm in chunk.vms
    ]
    for name in sent_names:
        if name == SETTINGS_PART:
            fresh.extend((name, u.vm) for u in settings.unpinned)
        else:
            fresh.extend((name, vm) for vm in sent.workers[name])
    for name, vm in fresh:
        owner = held.owners.get(vm.id)
        if (
            owner is None
            or owner == name
            or not _keeps(owner, vm.id, chunks, sent_names, sent_chunks)
        ):
            continue
        where = f"workers.{name}.vms" if name else "vms"
        other = f"worker {owner!r}" if owner else "vms"
        problems.append(f"{where}: VM id {vm.id!r} is used more than once (also in {other})")
    total = sum(len(vms) for vms in workers.values()) + len(settings.unpinned)
    if total > LIMITS.max_vms_total:
        problems.append(f"workers: {total} VMs exceed the fleet limit of {LIMITS.max_vms_total}")
    _raise(problems)

    # The index follows the entries that changed: a copy (C speed), less
    # the VMs of the parts and chunks replaced or dropped, plus the new.
    owners = dict(held.owners)
    added: list[tuple[str, Iterable[VmAssignment]]] = []
    for name in held.digests.keys() | digests.keys():
        if name == SETTINGS_PART:
            if SETTINGS_PART in sent_names:
                _drop(owners, name, [u.vm for u in held.settings.unpinned])
                added.append((name, [u.vm for u in settings.unpinned]))
            continue
        new = workers.get(name)
        if new is not None and new is held.workers.get(name):
            continue
        kept = {c.digest for c in chunks.get(name, ())} & {
            c.digest for c in held.chunks.get(name, ())
        }
        for chunk in held.chunks.get(name, ()):
            if chunk.digest not in kept:
                _drop(owners, name, chunk.vms)
        for chunk in chunks.get(name, ()):
            if chunk.digest not in kept:
                added.append((name, chunk.vms))
    for name, new_vms in added:
        owners.update((vm.id, name) for vm in new_vms)
    index = {c.digest: c for cs in chunks.values() for c in cs}
    return Assembled(FleetParts(workers, settings, canonical, digests, owners, chunks, index))


def diff_patched(
    assignments: Mapping[str, Assignment], fleet: Fleet, held: FleetParts, parts: FleetParts
) -> list[WorkerDiff]:
    """``diff_fleets(assignments, fleet)`` for a ``fleet`` whose worker
    lists are those of ``parts``, assembled over ``held``: a worker whose
    assignment is the very list ``held`` has (its last commit was this
    fleet's part, no VM waiting on a rollout) and whose new list is the
    very one ``parts`` has is diffed over the VMs of its chunks that
    changed only, the chunks both share (the same objects) left out: they
    hold the same VMs on both sides and no VM id twice in a worker, so the
    diff is the same, at O(the chunks that changed) instead of O(the
    worker). Any other worker is diffed whole."""
    old = dict(assignments)
    workers: list[tuple[str, tuple[VmAssignment, ...]]] = []
    for worker_id, vms in fleet.workers:
        current = assignments.get(worker_id)
        before = held.chunks.get(worker_id)
        after = parts.chunks.get(worker_id)
        if (
            current is not None
            and before is not None
            and after is not None
            and current.vms is not vms
            and current.vms is held.workers.get(worker_id)
            and vms is parts.workers.get(worker_id)
        ):
            shared = {id(c) for c in before} & {id(c) for c in after}
            old[worker_id] = replace(
                current,
                vms=tuple(
                    itertools.chain.from_iterable(c.vms for c in before if id(c) not in shared)
                ),
            )
            changed = tuple(
                itertools.chain.from_iterable(c.vms for c in after if id(c) not in shared)
            )
            workers.append((worker_id, changed))
        else:
            workers.append((worker_id, vms))
    return diff_fleets(old, replace(fleet, workers=tuple(workers)))


def _keeps(
    owner: str,
    vm_id: str,
    chunks: Mapping[str, tuple[Chunk, ...]],
    sent_names: set[str],
    sent_chunks: Mapping[str, Chunk],
) -> bool:
    """Whether the assembled fleet keeps ``vm_id`` from the cached entry of
    part ``owner`` (sent entries' own duplicates are ``validate_fleet``'s)."""
    if owner in sent_names:
        return False
    if owner == SETTINGS_PART:
        return True  # the settings part listed and not sent: kept
    these = chunks.get(owner)
    if not these:
        return False  # dropped (or now empty)
    # The chunk whose range holds the id, if it came from the cache.
    at = bisect.bisect_right(these, vm_id, key=lambda c: c.vms[0].id) - 1
    if at < 0:
        return False
    chunk = these[at]
    found = bisect.bisect_left(chunk.vms, vm_id, key=lambda vm: vm.id)
    return found < len(chunk.vms) and chunk.vms[found].id == vm_id and chunk.name not in sent_chunks


def _drop(owners: dict[str, str], name: str, vms: Iterable[VmAssignment]) -> None:
    for vm in vms:
        if owners.get(vm.id) == name:
            del owners[vm.id]


@dataclass(frozen=True, slots=True)
class PatchRequest:
    """The parameters of ``Control.applyPatch``: ``Control.apply``'s, with
    a patch for the fleet."""

    patch: FleetPatch
    expected_generation: int | None = None  # None: any
    dry_run: bool = False
    request_id: str = ""
    supersede: bool = False


@dataclass(frozen=True, slots=True)
class PatchAnswer:
    """``Control.applyPatch``'s answer: the apply's result, or (``result``
    None) the parts the master does not hold; nothing was applied."""

    result: ApplyResult | None
    missing: tuple[str, ...] = ()


def _raise(problems: Sequence[str], over_limits: Sequence[str] = ()) -> None:
    """Refuse the patch with every problem found; ``LimitExceededError`` when
    some of them are limits exceeded (the class a whole apply over the same
    limit gets: a client tells "too big" from "wrong" by it), otherwise
    ``ValidationError``."""
    if over_limits:
        raise LimitExceededError(
            f"fleet patch: {len(over_limits) + len(problems)} problem(s), nothing was applied",
            details=[*over_limits, *problems],
        )
    if problems:
        raise ValidationError(
            f"fleet patch: {len(problems)} problem(s), nothing was applied",
            details=list(problems),
        )


async def patch_rounds(
    parts: FleetParts,
    send: Callable[[FleetPatch], Awaitable[PatchAnswer]],
    *,
    chunked: bool = True,
    chunks_refused: Callable[[], None] = lambda: None,
    listing_max: int = LISTING_FIRST_MAX,
    held: Collection[bytes] = frozenset(),
) -> ApplyResult | None:
    """A client's side of a patched apply of the fleet ``parts`` cut:
    digests first, then the entries the master asks for (the union of what
    it asked, so an entry is never asked twice), at most ``PATCH_ROUNDS``
    sends. None: the master kept asking (applies in between kept replacing
    what it holds); the caller applies the whole fleet instead.
    ``ValidationError`` when the master asks for an entry the patch did not
    name (a malformed answer: nothing more is sent).

    ``chunked``: list workers in chunks. A master older than chunks refuses
    a chunk's name as a worker id (``refuses_chunks``): then
    ``chunks_refused`` is called and the rounds start again with whole
    parts (the caller need not list chunks to that master again). A fleet
    whose listing in chunks is longer than ``listing_max`` entries lists
    its workers whole first, then by their chunks those the master asked
    for (one round more, a listing per round of O(workers)).

    ``held``: the digests the caller believes the master holds (those of
    the fleet it last applied there, ``FleetParts.entry_digests``). The
    first send then carries the contents of every listed entry whose digest
    is not among them, and lists by its chunks every big worker whose part
    is not, so a one-VM change after the caller's own apply is one send of
    one chunk instead of two (three in a big fleet). A hint, never trusted:
    the master still checks every digest and assembles the client's fleet
    whatever it holds; a wrong hint costs a few bytes sent for nothing or
    the rounds it would have cost without one."""
    asked: set[str] = set()
    # The workers listed in chunks (None: every big one).
    in_chunks: set[str] | None = None
    if chunked and len(parts.listing()) > listing_max:
        in_chunks = set()
    if held:
        if in_chunks is not None:
            in_chunks.update(
                name
                for name, digest in parts.digests.items()
                if digest not in held and len(parts.chunks.get(name, ())) > 1
            )
        # What the first send lists (as ``make_patch`` below lists it).
        listing = parts.listing(in_chunks if chunked else ())
        asked.update(name for name, digest in listing if digest not in held)
    for _ in range(PATCH_ROUNDS):
        listed_in_chunks = chunked and (True if in_chunks is None else in_chunks)
        asked = _as_listed(parts, asked, listed_in_chunks)
        patch = make_patch(parts, asked, chunked=listed_in_chunks)
        try:
            answer = await send(patch)
        except ValidationError as exc:
            if not (chunked and refuses_chunks(patch, exc)):
                raise
            chunks_refused()
            return await patch_rounds(
                parts, send, chunked=False, listing_max=listing_max, held=held
            )
        if answer.result is not None:
            return answer.result
        unknown = set(answer.missing) - {name for name, _ in patch.parts}
        if unknown:
            raise ValidationError(
                "invalid applyPatch answer received: the master asked for parts that are "
                "not parts of the fleet sent: "
                f"{sorted(unknown)[:5]}"
            )
        for name in answer.missing:
            if (
                in_chunks is not None
                and name not in in_chunks
                and len(parts.chunks.get(name, ())) > 1
            ):
                in_chunks.add(name)  # listed by its chunks next: the master says which
            else:
                asked.add(name)
    return None


def _as_listed(parts: FleetParts, asked: set[str], chunked: bool | Collection[str]) -> set[str]:
    """``asked`` in the names of the listing ``make_patch`` makes with
    ``chunked``: a round may list a worker otherwise than the round that
    asked for it (by its chunks once the master asked for it whole; whole
    again when its chunks push the listing past ``MAX_ENTRIES``), so a
    chunk of a worker listed whole is asked as its worker, and a worker
    listed by its chunks as all of them."""
    listing = dict(parts.listing(None if chunked is True else (chunked or ())))
    if asked <= listing.keys():
        return asked
    result: set[str] = set()
    for name in asked:
        if name in listing:
            result.add(name)
            continue
        worker_id = name.split(CHUNK_SEP, 1)[0]
        if worker_id in listing:
            result.add(worker_id)
        else:
            result.update(chunk.name for chunk in parts.chunks.get(worker_id, ()))
    return result


def refuses_chunks(patch: FleetPatch, exc: ValidationError) -> bool:
    """Whether ``exc`` is a master older than chunks refusing ``patch``'s:
    it checks every listed name as a worker id, so it names a chunk of the
    patch with exactly what ``check_worker_id`` says of that name (a master
    that takes chunks never does: it checks the worker id before the
    separator)."""
    details = set(exc.details)
    return any(
        f"patch.parts[{name!r}]: {check_worker_id(name)}" in details
        for name, _ in patch.parts
        if CHUNK_SEP in name
    )
