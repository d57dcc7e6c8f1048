"""Whether a target's transfer port serves TLS travels from its
registration (``WorkerInfo.transferTls``, kept in the store) to the
cold move's source (``DiskTransfer.peerTlsWorker``, from ``with_moves``):
an older worker, which sets neither, reads as plain."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from procurator.core.errors import ValidationError
from procurator.core.models import Assignment, DiskTransfer, WorkerInfo
from procurator.core.move import Move, MoveKind, MovePhase, advance
from procurator.master.move import with_moves
from procurator.master.store.codec import decode_info, encode_info
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()
TOKEN = "0123456789abcdef" * 2
PATH = "/nix/store/" + "p" * 32 + "-p"


def roundtrip(struct: Any, fill: Any, read: Any, value: Any) -> Any:
    builder = struct.new_message()
    fill(builder, value)
    with struct.from_bytes(builder.to_bytes()) as reader:
        return read(reader)


def test_the_target_says_tls_at_registration_and_an_older_one_reads_as_plain() -> None:
    info = WorkerInfo("host-a", transfer_address="10.0.0.2:7400", transfer_tls=True)
    back = roundtrip(S.WorkerInfo, convert.fill_worker_info, convert.worker_info_from_reader, info)
    assert back == info
    assert decode_info("host-a", encode_info(info)) == info
    # An older worker's registration and an older master's stored row.
    older = S.WorkerInfo.new_message(workerId="host-a", transferAddress="10.0.0.2:7400")
    with S.WorkerInfo.from_bytes(older.to_bytes()) as reader:
        assert convert.worker_info_from_reader(reader).transfer_tls is False
    assert decode_info("host-a", '{"transfer_address": "10.0.0.2:7400"}').transfer_tls is False


def test_the_source_is_told_to_require_tls_of_a_target_that_serves_it() -> None:
    fleet = {"w1": Assignment("w1", 5, ()), "w2": Assignment("w2", 5, ())}
    move = Move("a", "w1", "w2", MoveKind.COLD, MovePhase.PENDING, "op-m", 0, 1_000, image=PATH)
    transferring = dataclasses.replace(
        advance(move, MovePhase.TRANSFERRING, now_ms=2, generation=8), token=TOKEN
    )
    addresses = {"w2": "10.0.0.2:7400"}
    secure = with_moves(fleet["w1"], [transferring], fleet, addresses, tls_targets={"w2"})
    assert secure.transfers == (
        DiskTransfer("a", "op-m", False, TOKEN, "10.0.0.2:7400", peer_tls_worker="w2"),
    )
    plain = with_moves(fleet["w1"], [transferring], fleet, addresses, tls_targets={"w3"})
    assert plain.transfers[0].peer_tls_worker == ""
    # The target's own transfer names no peer.
    target = with_moves(fleet["w2"], [transferring], fleet, addresses, tls_targets={"w2"})
    assert target.transfers[0].peer_tls_worker == ""
    # On the wire, whole.
    sent = roundtrip(S.Assignment, convert.fill_assignment, convert.assignment_from_reader, secure)
    assert sent == secure


def test_a_malformed_tls_worker_is_refused_naming_the_field() -> None:
    bad = Assignment(
        "host-a",
        5,
        (),
        "",
        (),
        (DiskTransfer("web-1", "op", False, TOKEN, "10.0.0.2:7400", peer_tls_worker="no/such"),),
    )
    with pytest.raises(ValidationError) as caught:
        roundtrip(S.Assignment, convert.fill_assignment, convert.assignment_from_reader, bad)
    assert "transfers[0].peerTlsWorker" in "\n".join(caught.value.details)
