"""The store's semantics, written once in the SQL both databases speak.

Each adapter (``sqlite.py``, ``postgres.py``) opens transactions and hands
these functions a :class:`Tx`: run a statement (``?`` placeholders), run one
for many rows, say what changed (``notify``: PostgreSQL's ``NOTIFY``,
delivered on commit; nothing for SQLite, which has one master). The
dialect's few differences are attributes of the ``Tx``: the database's clock
(``{now}`` in ms, ``{now_us}`` in µs), row locks (``{lock}``: ``FOR UPDATE``,
``{share}``: ``FOR SHARE``; empty on SQLite, whose write transactions are
exclusive anyway), ``greatest`` and ``{next_version}`` (below).

**Worker versions follow the database's clock** (``{next_version}``: one
more than the last, or the clock in µs if that is greater), like event
seqs. A database may come back without its last commits (a crash that lost
commits made with ``synchronous_commit = off``, a failover to a replica
that was behind) after masters heard of them; the next write then gets a
version above every one handed out before, never one of the lost ones
again with other content, so a master's cache, which takes only newer
versions, cannot keep a lost write over the store's.

Lock order (PostgreSQL), the same in every transaction that takes more than
one: the ``generation`` row of ``meta`` → ``worker_state`` rows (by worker
id) → ``removals`` / ``vm_status`` rows → the ``event_seq`` row → the lease
row (``FOR SHARE``, a fenced write's last statement). So two masters never
deadlock on each other; should PostgreSQL still report one, the adapter
runs the transaction again.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from procurator.core.control import WorkerEvent
from procurator.core.drain import Handoff, ModeAction, ModeChange, WorkerMode
from procurator.core.drain import change_mode as core_change_mode
from procurator.core.errors import (
    NotFoundError,
    ProcuratorError,
    StaleGenerationError,
    ValidationError,
)
from procurator.core.models import (
    Assignment,
    EventKind,
    PlacementStrategy,
    PowerState,
    VmAssignment,
    VmEvent,
    WorkerInfo,
    WorkerState,
    WorkerStatus,
)
from procurator.core.move import MOVES_KEPT, Move, MoveKind, MovePhase
from procurator.core.rollout import Rollout, RolloutPhase
from procurator.core.rollout import decode as decode_rollout
from procurator.core.rollout import encode as encode_rollout
from procurator.core.snapshot import SnapshotInfo
from procurator.master.store.codec import (
    decode_diffs,
    decode_info,
    decode_prepared,
    decode_rules,
    decode_transfers,
    decode_vm_status,
    encode_diffs,
    encode_info,
    encode_prepared,
    encode_rules,
    encode_transfers,
    encode_vm_status,
)
from procurator.master.store.model import (
    ROLLOUTS_KEPT,
    AppliedRequest,
    Change,
    ChangeKind,
    Fence,
    FencedError,
    FleetDelta,
    FleetDump,
    LeaseState,
    PlacementRecord,
    Registration,
    Removal,
    RequestRecordedError,
    RolloutActiveError,
    RolloutChangedError,
    SessionEndedError,
    StatusWrite,
    StatusWritten,
    StoredFleet,
    StoredWorker,
    Versions,
    WorkerDump,
)

Row = tuple[Any, ...]

_POWER = {p.value: p for p in PowerState}
_KIND = {k.value: k for k in EventKind}


class Tx(Protocol):
    """One open transaction of an adapter (see the module docstring)."""

    def run(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Execute; the rows it returns ([] for none)."""
        ...

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Execute for each of ``rows``; the rows affected, in all."""
        ...

    def count(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute; the rows affected."""
        ...

    def notify(self, change: Change) -> None: ...


def _one(tx: Tx, sql: str, params: Sequence[Any] = ()) -> Row | None:
    rows = tx.run(sql, params)
    return rows[0] if rows else None


def _meta(tx: Tx, key: str, lock: bool = False) -> int:
    row = _one(tx, "SELECT value FROM meta WHERE key = ?" + (" {lock}" if lock else ""), (key,))
    if row is None:
        raise ProcuratorError(f"the store has no {key!r} row: not a procurator database")
    return int(row[0])


# ---------------------------------------------------------------- reading


def _vm(row: Row) -> VmAssignment:
    vm_id, vm_hash, path, power, vcpus, memory = row
    return VmAssignment(vm_id, vm_hash, path, _POWER[power], vcpus, memory)


_VM_COLUMNS = "vm_id, hash, nix_store_path, power, vcpus, memory_mib"


def _assignments(tx: Tx, where: str = "", params: Sequence[Any] = ()) -> dict[str, Assignment]:
    vms: dict[str, list[VmAssignment]] = {}
    for row in tx.run(
        f"SELECT worker_id, {_VM_COLUMNS} FROM vms "
        + (f"WHERE worker_id IN (SELECT worker_id FROM workers {where}) " if where else "")
        + "ORDER BY worker_id, vm_id",
        params,
    ):
        vms.setdefault(row[0], []).append(_vm(row[1:]))
    return {
        worker_id: Assignment(worker_id, generation, tuple(vms.get(worker_id, ())), op_id)
        for worker_id, generation, op_id in tx.run(
            f"SELECT worker_id, generation, op_id FROM workers {where}", params
        )
    }


def _removals(tx: Tx, worker_id: str | None = None) -> dict[str, dict[str, Removal]]:
    found: dict[str, dict[str, Removal]] = {}
    sql = "SELECT worker_id, vm_id, generation, acked_unix_ms FROM removals"
    rows = tx.run(sql + " WHERE worker_id = ?", (worker_id,)) if worker_id else tx.run(sql)
    for worker, vm_id, removed_by, acked in rows:
        found.setdefault(worker, {})[vm_id] = Removal(removed_by, acked)
    return found


_STATE_COLUMNS = (
    "worker_id, version, master_id, session, info, connected, since_unix_ms, "
    "renewed_unix_ms, expires_unix_ms, observed_generation, reported_unix_ms, prepared, "
    "transfers"
)


def _workers(tx: Tx, worker_id: str | None = None) -> dict[str, StoredWorker]:
    where, params = (" WHERE worker_id = ?", (worker_id,)) if worker_id else ("", ())
    statuses: dict[str, list[Any]] = {}
    for worker, vm_id, text in tx.run(
        "SELECT worker_id, vm_id, status FROM vm_status" + where + " ORDER BY worker_id, vm_id",
        params,
    ):
        statuses.setdefault(worker, []).append(decode_vm_status(vm_id, text))
    removals = _removals(tx, worker_id)
    modes = _modes(tx, worker_id)
    found: dict[str, StoredWorker] = {}
    for row in tx.run(f"SELECT {_STATE_COLUMNS} FROM worker_state" + where, params):
        (worker, version, master_id, session, info, connected, since, renewed, expires) = row[:9]
        observed, reported, prepared, transfers = row[9:]
        registration = (
            Registration(
                master_id,
                session,
                decode_info(worker, info),
                bool(connected),
                since,
                renewed,
                expires,
            )
            if session
            else None
        )
        status = (
            WorkerStatus(
                worker,
                observed,
                tuple(statuses.get(worker, ())),
                decode_prepared(prepared),
                decode_transfers(transfers),
            )
            if observed is not None
            else None
        )
        found[worker] = StoredWorker(
            worker,
            version,
            registration,
            status,
            reported,
            removals.get(worker, {}),
            modes.get(worker),
        )
    return found


def _event(row: Row) -> WorkerEvent:
    seq, worker_id, vm_id, kind, message, op_id, unix_ms = row
    return WorkerEvent(
        worker_id, VmEvent(vm_id, _KIND.get(kind, EventKind.UNKNOWN), message, op_id, unix_ms), seq
    )


_EVENT_COLUMNS = "seq, worker_id, vm_id, kind, message, op_id, unix_ms"


def load(tx: Tx, events: int) -> StoredFleet:
    """Everything, in one snapshot (the adapter's transaction); the newest
    ``events`` events."""
    newest = tx.run(f"SELECT {_EVENT_COLUMNS} FROM events ORDER BY seq DESC LIMIT ?", (events,))
    return StoredFleet(
        generation=_meta(tx, "generation"),
        assignments=_assignments(tx),
        removals=_removals(tx),
        workers=_workers(tx),
        events=tuple(_event(row) for row in reversed(newest)),
        event_seq=_meta(tx, "event_seq"),
    )


def fleet_since(tx: Tx, generation: int) -> FleetDelta:
    return FleetDelta(
        _meta(tx, "generation"), _assignments(tx, "WHERE generation > ?", (generation,))
    )


def load_worker(tx: Tx, worker_id: str) -> StoredWorker:
    return _workers(tx, worker_id).get(worker_id) or StoredWorker(worker_id)


def versions(tx: Tx) -> Versions:
    return Versions(
        _meta(tx, "generation"),
        {
            worker_id: int(version)
            for worker_id, version in tx.run("SELECT worker_id, version FROM worker_state")
        },
        _meta(tx, "event_seq"),
    )


def events_since(tx: Tx, seq: int, limit: int) -> tuple[WorkerEvent, ...]:
    rows = tx.run(
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
    )
    return tuple(_event(row) for row in rows)


def find_request(tx: Tx, request_id: str) -> AppliedRequest | None:
    row = _one(
        tx,
        "SELECT r.generation, a.op_id, r.fleet_digest, r.diffs FROM requests r "
        "JOIN applies a ON a.generation = r.generation WHERE r.request_id = ?",
        (request_id,),
    )
    if row is None:
        return None
    generation, op_id, digest, blob = row
    return AppliedRequest(request_id, generation, op_id, digest, decode_diffs(bytes(blob)))


# ---------------------------------------------------------------- applies


def _bump(tx: Tx, worker_id: str) -> int:
    """A change to ``worker_id``'s state: its new version (noted)."""
    (version,) = tx.run(
        "INSERT INTO worker_state (worker_id, version) VALUES (?, {now_us}) "
        "ON CONFLICT (worker_id) DO UPDATE SET version = {next_version} "
        "RETURNING version",
        (worker_id,),
    )[0]
    tx.notify(Change(ChangeKind.WORKER, version, worker_id))
    return int(version)


def _row_changes(
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
) -> tuple[list[tuple[str, str]], list[Row], list[tuple[str, str]]]:
    """(vm_id, worker_id) rows to delete, rows to insert, and (worker_id,
    vm_id) of the VMs taken off their worker: a VM removed, replaced or
    otherwise changed is deleted, one added or changed inserted. A one-VM
    change in a 1,000-VM worker writes two rows, not 2,000. Positions
    where both lists hold the very same object (the master's lists share
    the entries a change leaves alone) are set aside at C speed, before any
    comparison: a one-VM change compares one VM, not the worker's (a
    worker holds a VM id once, so what is left compares as the whole lists
    would; an insertion that shifts the rest compares the rest)."""
    deletes: list[tuple[str, str]] = []
    inserts: list[Row] = []
    removed: list[tuple[str, str]] = []
    for worker_id, all_vms in changes.items():
        all_before = before.get(worker_id, ())
        differ = list(map(operator.is_not, all_vms, all_before))
        vms = [*itertools.compress(all_vms, differ), *all_vms[len(differ) :]]
        old = {
            vm.id: vm
            for vm in itertools.chain(
                itertools.compress(all_before, differ), all_before[len(differ) :]
            )
        }
        new_ids = set()
        for vm in vms:
            new_ids.add(vm.id)
            previous = old.get(vm.id)
            if previous == vm:
                continue
            if previous is not None:
                deletes.append((vm.id, worker_id))
            inserts.append(
                (
                    vm.id,
                    worker_id,
                    vm.hash,
                    vm.nix_store_path,
                    vm.power.value,
                    vm.vcpus,
                    vm.memory_mib,
                )
            )
        gone = sorted(old.keys() - new_ids)
        deletes.extend((vm_id, worker_id) for vm_id in gone)
        removed.extend((worker_id, vm_id) for vm_id in gone)
    return deletes, inserts, removed


def _delete_rows(
    tx: Tx,
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
    deletes: Sequence[tuple[str, str]],
    op_id: str,
) -> None:
    """Delete ``deletes``, after checking that the store holds what the
    caller's ``before`` says: the row delta is only right against that."""
    for worker_id in changes:
        (count,) = tx.run("SELECT count(*) FROM vms WHERE worker_id = ?", (worker_id,))[0]
        if count != len(before.get(worker_id, ())):
            raise ProcuratorError(
                f"apply {op_id}: the store holds {count} VM(s) for worker {worker_id}, "
                f"the master {len(before.get(worker_id, ()))}; nothing was applied"
            )
    # All deletes before any insert, so a VM that moves between two workers
    # in one apply never collides with itself.
    deleted = tx.many("DELETE FROM vms WHERE vm_id = ? AND worker_id = ?", deletes)
    if deletes and deleted != len(deletes):
        raise ProcuratorError(
            f"apply {op_id}: the store does not hold the VMs the master holds "
            f"({deleted} of {len(deletes)} to delete found); nothing was applied"
        )


def commit(
    tx: Tx,
    expected_generation: int,
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
    op_id: str,
    unix_ms: int,
    request: tuple[str, str, Sequence[Any], int] | None,
    *,
    placement: PlacementRecord | None = None,
    fence: Fence | None = None,
    rollout: Rollout | None = None,
    guard_rollouts: bool = False,
    supersede: bool = False,
    rollout_before: Rollout | None = None,
) -> int:
    """See ``Store.commit``. ``request``: (id, fleet digest, diffs, kept)."""
    deletes, inserts, removed = _row_changes(changes, before)
    # The generation row is locked until the commit: applies of every
    # master take their turns here.
    current = _meta(tx, "generation", lock=True)
    if current != expected_generation:
        raise StaleGenerationError(
            f"the fleet is at generation {current}, not {expected_generation}; nothing was applied",
            op_id=op_id,
        )
    if request is not None and _one(
        tx, "SELECT generation FROM requests WHERE request_id = ?", (request[0],)
    ):
        raise RequestRecordedError(
            f"request id {request[0]} is recorded already; nothing was applied", op_id=op_id
        )
    generation = current + 1
    tx.run("UPDATE meta SET value = ? WHERE key = 'generation'", (generation,))
    _delete_rows(tx, changes, before, deletes, op_id)
    tx.many(
        "INSERT INTO workers (worker_id, generation, op_id) VALUES (?, ?, ?) "
        "ON CONFLICT (worker_id) DO UPDATE SET generation = excluded.generation, "
        "op_id = excluded.op_id",
        [(w, generation, op_id) for w in changes],
    )
    tx.many("INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?, ?)", inserts)
    # Removals are part of the workers' state: their versions move first
    # (the lock order), then the rows.
    for worker_id in sorted({worker_id for worker_id, _ in removed}):
        _bump(tx, worker_id)
    tx.many(
        "INSERT INTO removals (worker_id, vm_id, generation, acked_unix_ms) "
        "VALUES (?, ?, ?, NULL) ON CONFLICT (worker_id, vm_id) DO UPDATE SET "
        "generation = excluded.generation, acked_unix_ms = NULL",
        [(worker_id, vm_id, generation) for worker_id, vm_id in removed],
    )
    request_id = request[0] if request else ""
    tx.run(
        "INSERT INTO applies (generation, op_id, unix_ms, workers_changed, request_id) "
        "VALUES (?, ?, ?, ?, ?)",
        (generation, op_id, unix_ms, len(changes), request_id),
    )
    if request is not None:
        _, digest, diffs, kept = request
        tx.run(
            "INSERT INTO requests VALUES (?, ?, ?, ?)",
            (request_id, generation, digest, encode_diffs(diffs)),
        )
        # The bound: the newest ``kept`` request ids (generations only grow).
        tx.run(
            "DELETE FROM requests WHERE generation <= ("
            "SELECT generation FROM requests ORDER BY generation DESC LIMIT 1 OFFSET ?)",
            (kept,),
        )
    if placement is not None:
        _write_placement(tx, placement)
    if guard_rollouts:
        _guard_rollouts(tx, op_id, unix_ms, supersede)
    if rollout is not None:
        _put_rollout(tx, rollout, rollout_before)
    if fence is not None:
        check_fence(tx, fence)
    tx.notify(Change(ChangeKind.GENERATION, generation))
    return generation


# ---------------------------------------------------------------- rollouts


def _put_rollout(tx: Tx, rollout: Rollout, before: Rollout | None = None) -> None:
    """Insert or update ``rollout`` (only over ``before``, when given: else
    ``RolloutChangedError``); keep the newest ``ROLLOUTS_KEPT`` that are
    over (one under way is never dropped)."""
    if before is not None:
        row = _one(tx, "SELECT state FROM rollouts WHERE id = ? {lock}", (before.id,))
        if row is None or row[0] != encode_rollout(before):
            raise RolloutChangedError(
                f"rollout {before.id} changed meanwhile (an operator's pause, promote or undo, "
                "or another master); nothing was written"
            )
    tx.run(
        "INSERT INTO rollouts (id, seq, active, state) VALUES "
        "(?, (SELECT coalesce(max(seq), 0) + 1 FROM rollouts), ?, ?) "
        "ON CONFLICT (id) DO UPDATE SET active = excluded.active, state = excluded.state",
        (rollout.id, not rollout.over, encode_rollout(rollout)),
    )
    tx.run(
        "DELETE FROM rollouts WHERE NOT active AND seq <= ("
        "SELECT seq FROM rollouts WHERE NOT active ORDER BY seq DESC LIMIT 1 OFFSET ?)",
        (ROLLOUTS_KEPT,),
    )


def _guard_rollouts(tx: Tx, op_id: str, unix_ms: int, supersede: bool) -> None:
    for (text,) in tx.run("SELECT state FROM rollouts WHERE active ORDER BY seq {lock}"):
        under_way = _decode_rollout(text)
        if not supersede:
            raise RolloutActiveError(
                f"rollout {under_way.id} (apply {under_way.op_id}) is under way "
                f"({under_way.phase.value}); nothing was applied: wait for it to end, "
                "stop it with `procurator rollout undo`, or apply with --supersede",
                op_id=op_id,
            )
        _put_rollout(
            tx,
            dataclasses.replace(
                under_way,
                phase=RolloutPhase.FAILED,
                reason=f"superseded by apply {op_id}",
                ended_ms=unix_ms,
            ),
        )


def _decode_rollout(text: str) -> Rollout:
    try:
        return decode_rollout(text)
    except ValueError as exc:
        raise ProcuratorError(f"the store holds a rollout it cannot read: {exc}") from None


def put_rollout(tx: Tx, rollout: Rollout, fence: Fence | None, before: Rollout | None) -> None:
    _put_rollout(tx, rollout, before)
    if fence is not None:
        check_fence(tx, fence)


def rollouts(tx: Tx, limit: int) -> tuple[Rollout, ...]:
    return tuple(
        _decode_rollout(text)
        for (text,) in tx.run("SELECT state FROM rollouts ORDER BY seq DESC LIMIT ?", (limit,))
    )


def rollout(tx: Tx, rollout_id: str) -> Rollout | None:
    if rollout_id:
        row = _one(tx, "SELECT state FROM rollouts WHERE id = ?", (rollout_id,))
    else:
        row = _one(tx, "SELECT state FROM rollouts WHERE active ORDER BY seq DESC LIMIT 1")
    return _decode_rollout(row[0]) if row else None


_STRATEGIES = tuple(PlacementStrategy)  # the stored number is the index


def _write_placement(tx: Tx, record: PlacementRecord) -> None:
    """Make the stored placement rules ``record``'s, writing the rows that
    differ."""
    stored = {vm_id: text for vm_id, text in tx.run("SELECT vm_id, rules FROM unpinned")}
    wanted = {vm_id: encode_rules(rules) for vm_id, rules in record.unpinned.items()}
    stale = [(vm_id,) for vm_id, text in stored.items() if wanted.get(vm_id) != text]
    tx.many("DELETE FROM unpinned WHERE vm_id = ?", stale)
    tx.many(
        "INSERT INTO unpinned (vm_id, rules) VALUES (?, ?)",
        [(vm_id, text) for vm_id, text in wanted.items() if stored.get(vm_id) != text],
    )
    tx.run(
        "UPDATE meta SET value = ? WHERE key = 'strategy'",
        (_STRATEGIES.index(record.strategy),),
    )


def placement(tx: Tx) -> PlacementRecord:
    index = _meta(tx, "strategy")
    return PlacementRecord(
        {vm_id: decode_rules(text) for vm_id, text in tx.run("SELECT vm_id, rules FROM unpinned")},
        _STRATEGIES[index] if 0 <= index < len(_STRATEGIES) else PlacementStrategy.BINPACK,
    )


# ---------------------------------------------------------------- snapshots


def _snapshot_row(info: SnapshotInfo) -> tuple[str, str, str, str]:
    return (info.worker_id, info.vm_id, info.name, json.dumps(info.to_json()))


def put_snapshot(tx: Tx, info: SnapshotInfo) -> None:
    """Record (or update) one snapshot of ``info.worker_id``."""
    tx.run(
        "DELETE FROM snapshots WHERE worker_id = ? AND vm_id = ? AND name = ?",
        (info.worker_id, info.vm_id, info.name),
    )
    tx.run(
        "INSERT INTO snapshots (worker_id, vm_id, name, info) VALUES (?, ?, ?, ?)",
        _snapshot_row(info),
    )


def drop_snapshot(tx: Tx, worker_id: str, vm_id: str, name: str) -> None:
    tx.run(
        "DELETE FROM snapshots WHERE worker_id = ? AND vm_id = ? AND name = ?",
        (worker_id, vm_id, name),
    )


def replace_snapshots(
    tx: Tx, worker_id: str, vm_id: str | None, infos: Sequence[SnapshotInfo]
) -> None:
    """What ``worker_id`` answered a list with: its snapshots of ``vm_id``
    (None: of all its VMs) are now exactly ``infos``."""
    if vm_id is None:
        tx.run("DELETE FROM snapshots WHERE worker_id = ?", (worker_id,))
    else:
        tx.run("DELETE FROM snapshots WHERE worker_id = ? AND vm_id = ?", (worker_id, vm_id))
    tx.many(
        "INSERT INTO snapshots (worker_id, vm_id, name, info) VALUES (?, ?, ?, ?)",
        [_snapshot_row(info) for info in infos],
    )


def snapshots(tx: Tx, vm_id: str | None) -> tuple[SnapshotInfo, ...]:
    """The recorded snapshots (of ``vm_id``, or all), oldest first; a row
    that no longer reads is left out."""
    rows = (
        tx.run("SELECT worker_id, info FROM snapshots")
        if vm_id is None
        else tx.run("SELECT worker_id, info FROM snapshots WHERE vm_id = ?", (vm_id,))
    )
    found: list[SnapshotInfo] = []
    for worker_id, text in rows:
        try:
            found.append(SnapshotInfo.from_json(json.loads(text), worker_id=worker_id))
        except (ValueError, ProcuratorError):
            continue
    return tuple(sorted(found, key=lambda i: (i.created_unix_ms, i.vm_id, i.name)))


# ---------------------------------------------------------------- sessions


def register(
    tx: Tx, worker_id: str, master_id: str, info: WorkerInfo, unix_ms: int, lease_ms: int
) -> StoredWorker:
    """A new session of ``worker_id``, held by ``master_id``: numbered one
    more than the last, whoever held that."""
    (version,) = tx.run(
        "INSERT INTO worker_state (worker_id, version, master_id, session, info, connected, "
        "since_unix_ms, renewed_unix_ms, expires_unix_ms) "
        "VALUES (?, {now_us}, ?, 1, ?, TRUE, ?, {now}, {now} + ?) "
        "ON CONFLICT (worker_id) DO UPDATE SET version = {next_version}, "
        "master_id = excluded.master_id, session = worker_state.session + 1, "
        "info = excluded.info, connected = TRUE, since_unix_ms = excluded.since_unix_ms, "
        "renewed_unix_ms = excluded.renewed_unix_ms, expires_unix_ms = excluded.expires_unix_ms "
        "RETURNING version",
        (worker_id, master_id, encode_info(info), unix_ms, lease_ms),
    )[0]
    tx.notify(Change(ChangeKind.WORKER, version, worker_id))
    return load_worker(tx, worker_id)


def unregister(
    tx: Tx, worker_id: str, master_id: str, session: int, unix_ms: int
) -> StatusWritten | None:
    """The session ended; the worker's version before and after, or None
    when that session was not the worker's current one (nothing changed)."""
    found = _one(
        tx,
        "SELECT version FROM worker_state "
        "WHERE worker_id = ? AND master_id = ? AND session = ? AND connected {lock}",
        (worker_id, master_id, session),
    )
    if found is None:
        return None
    (version,) = tx.run(
        "UPDATE worker_state SET connected = FALSE, since_unix_ms = ?, version = {next_version} "
        "WHERE worker_id = ? RETURNING version",
        (unix_ms, worker_id),
    )[0]
    tx.notify(Change(ChangeKind.WORKER, version, worker_id))
    return StatusWritten(int(found[0]), int(version))


def renew_sessions(tx: Tx, master_id: str, lease_ms: int) -> dict[str, int]:
    """Extend the lease of every connected session ``master_id`` holds;
    worker id -> the session renewed."""
    rows = tx.run(
        "UPDATE worker_state SET renewed_unix_ms = {now}, expires_unix_ms = {now} + ? "
        "WHERE master_id = ? AND connected RETURNING worker_id, session",
        (lease_ms, master_id),
    )
    return {worker_id: session for worker_id, session in rows}


def reclaim_session(
    tx: Tx, worker_id: str, master_id: str, session: int, unix_ms: int, lease_ms: int
) -> int | None:
    """A session still alive here that the store shows disconnected (its
    lease expired while the database could not be reached): connected
    again, unless the worker registered since. The new version, or None."""
    row = _one(
        tx,
        "UPDATE worker_state SET connected = TRUE, since_unix_ms = ?, version = {next_version}, "
        "renewed_unix_ms = {now}, expires_unix_ms = {now} + ? "
        "WHERE worker_id = ? AND master_id = ? AND session = ? AND NOT connected "
        "RETURNING version",
        (unix_ms, lease_ms, worker_id, master_id, session),
    )
    if row is None:
        return None
    tx.notify(Change(ChangeKind.WORKER, row[0], worker_id))
    return int(row[0])


def end_sessions(tx: Tx, except_master: str, unix_ms: int) -> list[str]:
    """Every connected session not held by ``except_master`` ends (a store
    with one master: they are an earlier run's)."""
    rows = tx.run(
        "UPDATE worker_state SET connected = FALSE, since_unix_ms = ?, version = {next_version} "
        "WHERE connected AND master_id <> ? RETURNING worker_id, version",
        (unix_ms, except_master),
    )
    for worker_id, version in rows:
        tx.notify(Change(ChangeKind.WORKER, version, worker_id))
    return sorted(worker_id for worker_id, _ in rows)


# ---------------------------------------------------------------- status


def write_status(tx: Tx, write: StatusWrite) -> StatusWritten:
    """See ``StatusWrite``; the worker's version before and after."""
    holder = _one(
        tx,
        "SELECT master_id, session, version FROM worker_state WHERE worker_id = ? {lock}",
        (write.worker_id,),
    )
    if holder is None or tuple(holder[:2]) != (write.master_id, write.session):
        raise SessionEndedError(
            f"worker {write.worker_id}: this session has ended (the worker registered again, "
            "here or with another master); register again"
        )
    encoded = [(vm.id, encode_vm_status(vm)) for vm in write.upserts]
    deletes: Iterable[str] = write.deletes
    if write.whole:
        stored: dict[str, str] = dict(
            tx.run("SELECT vm_id, status FROM vm_status WHERE worker_id = ?", (write.worker_id,))
        )
        deletes = sorted(stored.keys() - {vm_id for vm_id, _ in encoded})
        encoded = [(vm_id, text) for vm_id, text in encoded if stored.get(vm_id) != text]
    tx.many(
        "DELETE FROM vm_status WHERE worker_id = ? AND vm_id = ?",
        [(write.worker_id, vm_id) for vm_id in deletes],
    )
    tx.many(
        "INSERT INTO vm_status (worker_id, vm_id, status) VALUES (?, ?, ?) "
        "ON CONFLICT (worker_id, vm_id) DO UPDATE SET status = excluded.status",
        [(write.worker_id, vm_id, text) for vm_id, text in encoded],
    )
    if write.ack is not None:
        tx.run(
            "UPDATE removals SET acked_unix_ms = ? WHERE worker_id = ? "
            "AND generation <= ? AND acked_unix_ms IS NULL",
            (write.ack.unix_ms, write.worker_id, write.ack.observed_generation),
        )
    (version,) = tx.run(
        "UPDATE worker_state SET observed_generation = ?, reported_unix_ms = ?, prepared = ?, "
        "transfers = ?, version = {next_version} WHERE worker_id = ? RETURNING version",
        (
            write.observed_generation,
            write.reported_unix_ms,
            encode_prepared(write.prepared),
            encode_transfers(write.transfers),
            write.worker_id,
        ),
    )[0]
    tx.notify(Change(ChangeKind.WORKER, version, write.worker_id))
    return StatusWritten(int(holder[2]), int(version))


# ---------------------------------------------------------------- events


def add_events(tx: Tx, worker_id: str, events: Sequence[VmEvent], per_vm: int, total: int) -> int:
    """Store ``events`` with the next seqs; keep at most ``per_vm`` per VM
    and ``total`` in all. Seqs follow the database's clock in µs (+1 when
    events come faster), so they keep growing across restarts and
    upgrades, and they are minted under the ``event_seq`` row's lock: no
    transaction commits a lower seq after a higher one became visible (a
    reader's cursor skips nothing). The newest seq."""
    if not events:
        return _meta(tx, "event_seq")
    (last,) = tx.run(
        "UPDATE meta SET value = {greatest}(value + 1, {now_us}) + ? "
        "WHERE key = 'event_seq' RETURNING value",
        (len(events) - 1,),
    )[0]
    first = int(last) - len(events) + 1
    tx.many(
        f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (first + i, worker_id, e.vm_id, e.kind.value, e.message, e.op_id, e.unix_time_ms)
            for i, e in enumerate(events)
        ],
    )
    tx.many(
        "DELETE FROM events WHERE vm_id = ? AND seq <= ("
        "SELECT seq FROM events WHERE vm_id = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)",
        [(vm_id, vm_id, per_vm) for vm_id in sorted({e.vm_id for e in events})],
    )
    tx.run(
        "DELETE FROM events WHERE seq <= (SELECT seq FROM events ORDER BY seq DESC "
        "LIMIT 1 OFFSET ?)",
        (total,),
    )
    tx.notify(Change(ChangeKind.EVENTS, last))
    return int(last)


# ---------------------------------------------------------------- leases


def _ensure_lease(tx: Tx, name: str) -> None:
    tx.run(
        "INSERT INTO leases (name, holder, epoch, expires_unix_ms) VALUES (?, '', 0, 0) "
        "ON CONFLICT (name) DO NOTHING",
        (name,),
    )


def acquire_lease(tx: Tx, name: str, holder: str, lease_ms: int) -> int | None:
    """Take lease ``name`` if nobody holds it live: the new epoch, or None."""
    _ensure_lease(tx, name)
    row = _one(
        tx,
        "UPDATE leases SET holder = ?, epoch = epoch + 1, expires_unix_ms = {now} + ? "
        "WHERE name = ? AND expires_unix_ms <= {now} RETURNING epoch",
        (holder, lease_ms, name),
    )
    return int(row[0]) if row else None


def renew_lease(tx: Tx, fence: Fence, lease_ms: int) -> bool:
    """Extend a live lease held in ``fence.epoch``; False once it expired
    or another holds it (then only ``acquire_lease`` can take it again, in
    a new epoch)."""
    return (
        tx.count(
            "UPDATE leases SET expires_unix_ms = {now} + ? WHERE name = ? AND holder = ? "
            "AND epoch = ? AND expires_unix_ms > {now}",
            (lease_ms, fence.name, fence.holder, fence.epoch),
        )
        == 1
    )


def release_lease(tx: Tx, fence: Fence) -> None:
    tx.run(
        "UPDATE leases SET expires_unix_ms = 0 WHERE name = ? AND holder = ? AND epoch = ?",
        (fence.name, fence.holder, fence.epoch),
    )


def read_lease(tx: Tx, name: str) -> LeaseState:
    row = _one(
        tx,
        "SELECT holder, epoch, expires_unix_ms, {now} FROM leases WHERE name = ?",
        (name,),
    )
    if row is None:
        (now,) = tx.run("SELECT {now}")[0]
        return LeaseState(name, "", 0, 0, int(now))
    holder, epoch, expires, now = row
    return LeaseState(name, holder, int(epoch), int(expires), int(now))


def check_fence(tx: Tx, fence: Fence) -> None:
    """Raise ``FencedError`` unless ``fence`` is the live lease; if it is,
    it stays so until this transaction ends (the row is share-locked: a new
    leader's ``acquire_lease`` waits for it). The last statement of a
    fenced transaction, so a duty blocked on its data does not hold up a
    new leader."""
    if _one(
        tx,
        "SELECT epoch FROM leases WHERE name = ? AND holder = ? AND epoch = ? "
        "AND expires_unix_ms > {now} {share}",
        (fence.name, fence.holder, fence.epoch),
    ):
        return
    now = read_lease(tx, fence.name)
    raise FencedError(
        f"lease {fence.name}: epoch {fence.epoch} of {fence.holder} is over (the lease is at "
        f"epoch {now.epoch}, held by {now.holder or 'nobody'}); nothing was written"
    )


def expire_sessions(tx: Tx, fence: Fence) -> list[tuple[str, int]]:
    """Fenced: every connected session whose lease expired is lost, since
    its last renewal. (worker id, last renewal in unix ms) of each."""
    rows = tx.run(
        "UPDATE worker_state SET connected = FALSE, since_unix_ms = renewed_unix_ms, "
        "version = {next_version} WHERE connected AND expires_unix_ms < {now} "
        "RETURNING worker_id, version, renewed_unix_ms"
    )
    check_fence(tx, fence)
    for worker_id, version, _ in rows:
        tx.notify(Change(ChangeKind.WORKER, version, worker_id))
    return sorted((worker_id, int(renewed)) for worker_id, _, renewed in rows)


def forget_removals(tx: Tx, fence: Fence, confirmed_before_unix_ms: int) -> list[str]:
    """Fenced: removals confirmed before the horizon are forgotten (the
    grace in which a worker may still mention them is over). The workers
    whose removals changed."""
    workers = sorted(
        worker_id
        for (worker_id,) in tx.run(
            "SELECT DISTINCT worker_id FROM removals WHERE acked_unix_ms < ?",
            (confirmed_before_unix_ms,),
        )
    )
    for worker_id in workers:
        _bump(tx, worker_id)
    tx.run("DELETE FROM removals WHERE acked_unix_ms < ?", (confirmed_before_unix_ms,))
    check_fence(tx, fence)
    return workers


# ---------------------------------------------------------------- export, import


def export(tx: Tx) -> FleetDump:
    assignments = _assignments(tx)
    return FleetDump(
        generation=_meta(tx, "generation"),
        workers=tuple(
            WorkerDump(a.worker_id, a.generation, a.op_id, a.vms)
            for a in sorted(assignments.values(), key=lambda a: a.worker_id)
        ),
        applies=tuple(
            (int(g), op, int(ms), int(n), req)
            for g, op, ms, n, req in tx.run(
                "SELECT generation, op_id, unix_ms, workers_changed, request_id FROM applies "
                "ORDER BY generation"
            )
        ),
        requests=tuple(
            (req, int(g), digest, bytes(blob))
            for req, g, digest, blob in tx.run(
                "SELECT request_id, generation, fleet_digest, diffs FROM requests "
                "ORDER BY generation"
            )
        ),
        removals=tuple(
            (w, vm, int(g), None if acked is None else int(acked))
            for w, vm, g, acked in tx.run(
                "SELECT worker_id, vm_id, generation, acked_unix_ms FROM removals "
                "ORDER BY worker_id, vm_id"
            )
        ),
        event_seq=_meta(tx, "event_seq"),
        placement=placement(tx),
    )


def import_(tx: Tx, dump: FleetDump, target: str) -> None:
    """Load ``dump`` into an empty store (generation 0, no workers, no
    applies); ``ProcuratorError`` naming ``target`` otherwise."""
    current = _meta(tx, "generation", lock=True)
    (applies,) = tx.run("SELECT count(*) FROM applies")[0]
    (workers,) = tx.run("SELECT count(*) FROM workers")[0]
    if current or applies or workers:
        raise ProcuratorError(
            f"{target} is not empty (generation {current}, {workers} worker(s), {applies} "
            "apply(s)): import only into a new database; nothing was imported"
        )
    tx.many(
        "INSERT INTO workers (worker_id, generation, op_id) VALUES (?, ?, ?)",
        [(w.worker_id, w.generation, w.op_id) for w in dump.workers],
    )
    tx.many(
        "INSERT INTO vms VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (v.id, w.worker_id, v.hash, v.nix_store_path, v.power.value, v.vcpus, v.memory_mib)
            for w in dump.workers
            for v in w.vms
        ],
    )
    tx.many(
        "INSERT INTO applies (generation, op_id, unix_ms, workers_changed, request_id) "
        "VALUES (?, ?, ?, ?, ?)",
        dump.applies,
    )
    tx.many("INSERT INTO requests VALUES (?, ?, ?, ?)", dump.requests)
    tx.many(
        "INSERT INTO removals (worker_id, vm_id, generation, acked_unix_ms) VALUES (?, ?, ?, ?)",
        dump.removals,
    )
    _write_placement(tx, dump.placement)
    for worker_id in sorted({w for w, *_ in dump.removals}):
        _bump(tx, worker_id)
    tx.run("UPDATE meta SET value = ? WHERE key = 'generation'", (dump.generation,))
    tx.run(
        "UPDATE meta SET value = {greatest}(value, ?) WHERE key = 'event_seq'", (dump.event_seq,)
    )
    tx.notify(Change(ChangeKind.GENERATION, dump.generation))


# ---------------------------------------------------------------- cordon, drain, handoffs
# (procurator.core.drain; schema version 6). Lock order: after the
# worker_state rows, the worker_modes rows, then the handoffs rows.

_STATES = {s.value: s for s in WorkerState}
_MODE_COLUMNS = "worker_id, state, op_id, since_unix_ms, max_unavailable, moved, total, blocked"


def _modes(tx: Tx, worker_id: str | None = None) -> dict[str, WorkerMode]:
    where, params = (" WHERE worker_id = ?", (worker_id,)) if worker_id else ("", ())
    return {
        worker: WorkerMode(
            _STATES[state], op_id, int(since), int(bound), int(moved), int(total), why
        )
        for worker, state, op_id, since, bound, moved, total, why in tx.run(
            f"SELECT {_MODE_COLUMNS} FROM worker_modes" + where, params
        )
    }


def _put_mode(tx: Tx, worker_id: str, mode: WorkerMode | None) -> None:
    tx.run("DELETE FROM worker_modes WHERE worker_id = ?", (worker_id,))
    if mode is not None:
        tx.run(
            f"INSERT INTO worker_modes ({_MODE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                worker_id,
                mode.state.value,
                mode.op_id,
                mode.since_unix_ms,
                mode.max_unavailable,
                mode.moved,
                mode.total,
                mode.blocked,
            ),
        )


def change_mode(
    tx: Tx, worker_id: str, action: ModeAction, op_id: str, unix_ms: int, max_unavailable: int
) -> ModeChange:
    """``action`` on ``worker_id``'s mode, decided (``core.drain.change_mode``)
    against the mode as stored, in this transaction: two masters changing
    one worker's mode at once take turns. ``NotFoundError`` for a worker
    the store has never heard of (no registration, no assignment)."""
    state = _one(tx, "SELECT version FROM worker_state WHERE worker_id = ? {lock}", (worker_id,))
    assigned = _one(tx, "SELECT generation FROM workers WHERE worker_id = ?", (worker_id,))
    if state is None and assigned is None:
        raise NotFoundError(
            f"worker {worker_id!r} is unknown: it never registered and has no VMs assigned; "
            "nothing was changed"
        )
    (total,) = tx.run(
        "SELECT count(*) FROM vms WHERE worker_id = ? AND vm_id IN (SELECT vm_id FROM unpinned)",
        (worker_id,),
    )[0]
    (all_vms,) = tx.run("SELECT count(*) FROM vms WHERE worker_id = ?", (worker_id,))[0]
    answer = core_change_mode(
        worker_id,
        _modes(tx, worker_id).get(worker_id),
        action,
        op_id=op_id,
        now_ms=unix_ms,
        max_unavailable=max_unavailable,
        total=int(total),
        pinned=int(all_vms) - int(total),
    )
    if answer.changed:
        _bump(tx, worker_id)
        _put_mode(tx, worker_id, answer.mode)
    return answer


def update_drain(
    tx: Tx, fence: Fence, worker_id: str, op_id: str, blocked: str, finished: bool
) -> bool:
    """Fenced: drain ``op_id`` of ``worker_id`` is blocked (why; "" no
    longer), or finished (the worker stays cordoned, with its progress).
    False when that drain is no longer the worker's (nothing written)."""
    mode = _modes(tx, worker_id).get(worker_id)
    if mode is None or mode.op_id != op_id or mode.state is not WorkerState.DRAINING:
        check_fence(tx, fence)
        return False
    _bump(tx, worker_id)
    _put_mode(
        tx,
        worker_id,
        dataclasses.replace(
            mode, blocked=blocked, state=WorkerState.CORDONED if finished else mode.state
        ),
    )
    check_fence(tx, fence)
    return True


def drain_moved(tx: Tx, fence: Fence, worker_id: str, op_id: str) -> bool:
    """Fenced: drain ``op_id`` of ``worker_id`` has one more VM off the
    worker (a move ended: ``procurator.master.drain``, live moves). False
    when that drain is no longer the worker's (nothing written)."""
    counted = _count_drained(tx, worker_id, op_id)
    check_fence(tx, fence)
    return counted


def _count_drained(tx: Tx, worker_id: str, op_id: str) -> bool:
    mode = _modes(tx, worker_id).get(worker_id)
    if mode is None or mode.op_id != op_id or mode.state is not WorkerState.DRAINING:
        return False
    _bump(tx, worker_id)
    _put_mode(tx, worker_id, dataclasses.replace(mode, moved=mode.moved + 1))
    return True


def lease_renewals(tx: Tx) -> tuple[int, dict[str, int]]:
    (now,) = tx.run("SELECT {now}")[0]
    return int(now), {
        worker_id: int(renewed)
        for worker_id, renewed in tx.run(
            "SELECT worker_id, renewed_unix_ms FROM worker_state WHERE session > 0"
        )
    }


def handoffs(tx: Tx) -> dict[str, Handoff]:
    return {
        vm_id: Handoff(vm_id, source, target, op_id, int(generation), int(started))
        for vm_id, source, target, op_id, generation, started in tx.run(
            "SELECT vm_id, source_worker, target_worker, op_id, generation, started_unix_ms "
            "FROM handoffs"
        )
    }


def commit_handoffs(
    tx: Tx,
    fence: Fence,
    expected_generation: int,
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
    op_id: str,
    unix_ms: int,
    start: Sequence[Handoff],
    end: Sequence[Handoff],
    cancel: Sequence[Handoff],
) -> int:
    """Fenced, one generation: the assignments ``changes`` (as ``commit``:
    completed handoffs move their VM from source to target; a started or
    cancelled one changes its target's generation only), the handoffs
    ``start`` begun (their ``generation`` is set to the new one), ``end``
    completed (each counted as moved by its source's drain, if the drain
    that started it is still on) and ``cancel`` called off (the target's
    copy becomes its pending removal: it stops it and may report it until
    then). The new generation."""
    generation = commit(tx, expected_generation, changes, before, op_id, unix_ms, None)
    # A copy the target is not assigned (a heal may have placed the VM
    # there meanwhile: then it is the target's own and stays).
    stopping = [
        h
        for h in cancel
        if not _one(tx, "SELECT 1 FROM vms WHERE vm_id = ? AND worker_id = ?", (h.vm_id, h.target))
    ]
    for worker_id in sorted({h.target for h in stopping}):
        _bump(tx, worker_id)
    tx.many(
        "INSERT INTO removals (worker_id, vm_id, generation, acked_unix_ms) "
        "VALUES (?, ?, ?, NULL) ON CONFLICT (worker_id, vm_id) DO UPDATE SET "
        "generation = excluded.generation, acked_unix_ms = NULL",
        [(h.target, h.vm_id, generation) for h in stopping],
    )
    moved: dict[str, list[Handoff]] = {}
    for h in end:
        moved.setdefault(h.source, []).append(h)
    modes = {w: m for w, m in _modes(tx).items() if w in moved}
    for worker_id, ended in sorted(moved.items()):
        mode = modes.get(worker_id)
        counted = sum(1 for h in ended if mode is not None and h.op_id == mode.op_id)
        if mode is not None and counted:
            _bump(tx, worker_id)
            _put_mode(tx, worker_id, dataclasses.replace(mode, moved=mode.moved + counted))
    gone = [(h.vm_id,) for h in (*end, *cancel)]
    if gone and tx.many("DELETE FROM handoffs WHERE vm_id = ?", gone) != len(gone):
        raise ProcuratorError(
            f"drain {op_id}: a handoff to end is not in the store; nothing was written"
        )
    for h in start:
        if _one(tx, "SELECT source_worker FROM handoffs WHERE vm_id = ?", (h.vm_id,)):
            raise ProcuratorError(
                f"drain {op_id}: VM {h.vm_id} is in a handoff already; nothing was written"
            )
    tx.many(
        "INSERT INTO handoffs (vm_id, source_worker, target_worker, op_id, generation, "
        "started_unix_ms) VALUES (?, ?, ?, ?, ?, ?)",
        [(h.vm_id, h.source, h.target, h.op_id, generation, h.started_unix_ms) for h in start],
    )
    check_fence(tx, fence)
    return generation


# ---------------------------------------------------------------- moves
# (procurator.core.move; schema version 9). A move's row changes with the
# generation of its phase, in the same transaction (``commit_move``), or
# alone (``put_move``); both compare-and-set on the phase it was decided
# over, so two leaders (one of them fenced out) or a leader and an
# operator never both win. Lock order: after the generation row, the
# moves rows.

_MOVE_COLUMNS = (
    "op_id, vm_id, source_worker, target_worker, kind, phase, power, generation, "
    "started_unix_ms, updated_unix_ms, deadline_unix_ms, reason, active, token, image"
)


def _move(row: Row) -> Move:
    (op_id, vm_id, source, target, kind, phase, power, generation, started, updated, deadline) = (
        row[:11]
    )
    try:
        return Move(
            vm_id,
            source,
            target,
            MoveKind(kind),
            MovePhase(phase),
            op_id,
            int(started),
            int(deadline),
            _POWER[power],
            int(generation),
            int(updated),
            row[11],
            row[13],
            image=row[14],
        )
    except (ValueError, KeyError) as exc:
        raise ProcuratorError(f"the store holds a move it cannot read ({op_id}): {exc}") from None


def _move_row(move: Move) -> tuple[Any, ...]:
    return (
        move.op_id,
        move.vm_id,
        move.source,
        move.target,
        move.kind.value,
        move.phase.value,
        move.power.value,
        move.generation,
        move.started_unix_ms,
        move.updated_unix_ms,
        move.deadline_unix_ms,
        move.reason,
        not move.over,
        move.token,
        move.image,
    )


def start_move(tx: Tx, move: Move) -> None:
    """Record a new move (``pending``); ``ValidationError`` when the VM is
    moving already (the check and the insert are one transaction, and the
    unique index on active moves backs it)."""
    found = _one(tx, "SELECT op_id FROM moves WHERE vm_id = ? AND active {lock}", (move.vm_id,))
    if found:
        raise ValidationError(
            f"VM {move.vm_id} is moving already (move {found[0]}); nothing was changed",
            op_id=move.op_id,
        )
    tx.run(
        f"INSERT INTO moves ({_MOVE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        _move_row(move),
    )


def _put_move(tx: Tx, move: Move, before: Move) -> None:
    changed = tx.count(
        "UPDATE moves SET phase = ?, generation = ?, updated_unix_ms = ?, reason = ?, "
        "active = ?, token = ? WHERE op_id = ? AND phase = ? AND generation = ?",
        (
            move.phase.value,
            move.generation,
            move.updated_unix_ms,
            move.reason,
            not move.over,
            move.token,
            before.op_id,
            before.phase.value,
            before.generation,
        ),
    )
    if changed != 1:
        raise ProcuratorError(
            f"move {before.op_id} of VM {before.vm_id} changed meanwhile (another master); "
            "nothing was written"
        )
    if move.over:
        tx.run(
            "DELETE FROM moves WHERE NOT active AND started_unix_ms <= ("
            "SELECT started_unix_ms FROM moves WHERE NOT active "
            "ORDER BY started_unix_ms DESC LIMIT 1 OFFSET ?)",
            (MOVES_KEPT,),
        )


def put_move(tx: Tx, fence: Fence, move: Move, before: Move, drain: str = "") -> None:
    _put_move(tx, move, before)
    if drain and move.phase is MovePhase.DONE:
        _count_drained(tx, move.source, drain)
    check_fence(tx, fence)


def commit_move(
    tx: Tx,
    fence: Fence,
    expected_generation: int,
    changes: Mapping[str, Sequence[VmAssignment]],
    before: Mapping[str, Sequence[VmAssignment]],
    unix_ms: int,
    move: Move,
    move_before: Move,
) -> int:
    """Fenced, one generation (as ``commit``, under the move's op id): the
    assignments ``changes`` and the move's new phase, whose generation is
    set to the new one. The new generation."""
    generation = commit(tx, expected_generation, changes, before, move.op_id, unix_ms, None)
    _put_move(tx, dataclasses.replace(move, generation=generation), move_before)
    check_fence(tx, fence)
    return generation


def moves(tx: Tx, vm_id: str | None, limit: int) -> tuple[Move, ...]:
    """The moves under way, then the newest ``limit`` over, newest first;
    of one VM when ``vm_id`` is given."""
    where, params = ("WHERE vm_id = ?", (vm_id,)) if vm_id else ("", ())
    rows = tx.run(
        f"SELECT {_MOVE_COLUMNS} FROM moves {where} "
        "ORDER BY active DESC, started_unix_ms DESC, op_id DESC",
        params,
    )
    active = [r for r in rows if r[12]]
    over = [r for r in rows if not r[12]][:limit]
    return tuple(_move(r) for r in (*active, *over))
