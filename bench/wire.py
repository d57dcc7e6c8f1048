"""6. Wire: an assignment of 10,000 VMs through ``procurator.rpc.convert``.

Encode = a new ``Assignment`` message filled by ``fill_assignment`` and
serialised (``to_bytes``, the RPC framing's unpacked segments); decode =
``from_bytes`` with the RPC traversal limit and ``assignment_from_reader``
(which validates every id, hash and store path). Baseline, same run and same
data: ``json.dumps`` / ``json.loads`` of the VMs as a list of objects plus
building the same ``VmAssignment`` tuples without validation — what a
JSON wire would have cost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from bench._harness import Row, Run, fmt_ratio, fmt_s, median
from procurator.core.models import Assignment, PowerState, VmAssignment
from procurator.rpc.bridge import TRAVERSAL_LIMIT_WORDS
from procurator.rpc.convert import assignment_from_reader, fill_assignment
from procurator.rpc.schema import load_schema

NAME = "wire"
N = 10_000


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
    ]
