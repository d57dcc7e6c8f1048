"""6. Wire: an assignment of 10,000 VMs through ``procurator.rpc.convert``.

Encode = a new ``Assignment`` message filled by ``fill_assignment`` and
serialised (``to_bytes``, the RPC framing's unpacked segments); decode =
``from_bytes`` with the RPC traversal limit and ``assignment_from_reader``
(which validates every id, hash and store path). Baseline, same run and same
data: ``json.dumps`` / ``json.loads`` of the VMs as a list of objects plus
building the same ``VmAssignment`` tuples without validation — what a
JSON wire would have cost.

And what a one-VM change costs on the wire (issue 31): the whole 1,000-VM
assignment a push carries, against the ``AssignmentChanges`` of that one VM
(``Node.pushChanges``): bytes, encode and decode, validated alike.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bench._harness import Row, Run, fmt_ratio, fmt_s, median
from procurator.core.assignments import assignment_changes
from procurator.core.models import Assignment, PowerState, VmAssignment
from procurator.rpc.bridge import TRAVERSAL_LIMIT_WORDS
from procurator.rpc.convert import (
    assignment_changes_from_reader,
    assignment_from_reader,
    fill_assignment,
    fill_assignment_changes,
)
from procurator.rpc.schema import load_schema

NAME = "wire"
N = 10_000
CHANGE_FLEET = 1_000  # the worker's fleet in the one-VM change


def _assignment(n: int) -> Assignment:
    vms = tuple(
        VmAssignment(
            f"web-{i:05d}",
            f"{i:032d}"[-32:].replace("0", "a"),
            f"/nix/store/{i:032d}".replace("0", "b")[:43] + f"-web-vm-{i % 7}",
        )
        for i in range(n)
    )
    return Assignment("host-a", 42, vms, "op-0123456789ab")


def _best(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return median(times), result


def measure(run: Run) -> list[Row]:
    schema = load_schema()
    assignment = _assignment(N)
    repeats = 5 if run.quick else 15

    def encode() -> bytes:
        message = schema.Assignment.new_message()
        fill_assignment(message, assignment)
        data: bytes = message.to_bytes()
        return data

    def decode(data: bytes) -> Assignment:
        with schema.Assignment.from_bytes(
            data, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS
        ) as reader:
            return assignment_from_reader(reader)

    def json_encode() -> bytes:
        return json.dumps(
            {
                "workerId": assignment.worker_id,
                "generation": assignment.generation,
                "opId": assignment.op_id,
                "vms": [
                    {"id": vm.id, "hash": vm.hash, "nixStorePath": vm.nix_store_path}
                    for vm in assignment.vms
                ],
            }
        ).encode()

    def json_decode(data: bytes) -> Assignment:
        raw = json.loads(data)
        vms = tuple(
            VmAssignment(vm["id"], vm["hash"], vm["nixStorePath"], PowerState.RUNNING)
            for vm in raw["vms"]
        )
        return Assignment(raw["workerId"], raw["generation"], vms, raw["opId"])

    enc, data = _best(encode, repeats)
    dec, back = _best(lambda: decode(data), repeats)
    if back != assignment:
        raise RuntimeError("the assignment did not survive the round trip")
    jenc, jdata = _best(json_encode, repeats)
    jdec, jback = _best(lambda: json_decode(jdata), repeats)
    if jback != assignment:
        raise RuntimeError("the JSON baseline did not survive the round trip")
    run.log(f"wire: {len(data)} bytes, encode {enc * 1e3:.1f} ms, decode {dec * 1e3:.1f} ms")
    return [
        Row(
            NAME,
            f"assignment of {N:,} VMs: size",
            f"{len(data) / 1e6:.2f} MB",
            f"{len(jdata) / 1e6:.2f} MB JSON",
            f"{len(data) / len(jdata):.2f}x",
        ),
        Row(
            NAME,
            "encode (fill_assignment + to_bytes)",
            fmt_s(enc),
            f"{fmt_s(jenc)} json.dumps",
            fmt_ratio(enc, jenc),
        ),
        Row(
            NAME,
            "decode (from_bytes + assignment_from_reader, validated)",
            fmt_s(dec),
            f"{fmt_s(jdec)} json.loads + models",
            fmt_ratio(dec, jdec),
        ),
        *_change_rows(repeats),
    ]


def _change_rows(repeats: int) -> list[Row]:
    """One VM's new image in a 1,000-VM assignment: whole against changes."""
    schema = load_schema()
    base = _assignment(CHANGE_FLEET)
    changed = base.vms[CHANGE_FLEET // 2]
    vms = list(base.vms)
    vms[CHANGE_FLEET // 2] = VmAssignment(
        changed.id, "c" * 32, changed.nix_store_path[:-1] + "x", changed.power
    )
    new = Assignment(base.worker_id, base.generation + 1, tuple(vms), "op-change")
    changes = assignment_changes(base, new)
    if changes.size != 1:
        raise RuntimeError(f"a one-VM change carries {changes.size} entries")

    def whole() -> bytes:
        message = schema.Assignment.new_message()
        fill_assignment(message, new)
        data: bytes = message.to_bytes()
        return data

    def delta() -> bytes:
        message = schema.AssignmentChanges.new_message()
        fill_assignment_changes(message, changes)
        data: bytes = message.to_bytes()
        return data

    def read_whole(data: bytes) -> Assignment:
        with schema.Assignment.from_bytes(
            data, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS
        ) as reader:
            return assignment_from_reader(reader)

    def read_delta(data: bytes) -> object:
        with schema.AssignmentChanges.from_bytes(
            data, traversal_limit_in_words=TRAVERSAL_LIMIT_WORDS
        ) as reader:
            return assignment_changes_from_reader(reader)

    wenc, wdata = _best(whole, repeats)
    denc, ddata = _best(delta, repeats)
    wdec, wback = _best(lambda: read_whole(wdata), repeats)
    ddec, dback = _best(lambda: read_delta(ddata), repeats)
    if wback != new or dback != changes:
        raise RuntimeError("the one-VM change did not survive the round trip")
    return [
        Row(
            NAME,
            f"one VM changed in a {CHANGE_FLEET:,}-VM assignment: bytes, changes",
            f"{len(ddata):,} B",
            f"{len(wdata):,} B the whole assignment",
            f"{len(ddata) / len(wdata):.4f}x",
            "proportional to the change",
        ),
        Row(
            NAME,
            "... encode + decode (validated), changes",
            fmt_s(denc + ddec),
            f"{fmt_s(wenc + wdec)} the whole assignment",
            f"{(denc + ddec) / (wenc + wdec):.4f}x",
        ),
    ]
