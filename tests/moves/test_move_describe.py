"""A VM's move in ``procurator describe vm`` (issue 30): the move under way,
else the last one (phase, source -> target, op id, why it failed), from an
in-process master driving the simulated workers of test_move_master.py;
and ``VmDescription.move`` on the wire."""

from __future__ import annotations

import dataclasses
import io

import pytest
import trio
from test_move_master import IMAGE, lab, service, wait_over

from procurator.cli.ops import describe_json, print_description
from procurator.core.control import VmDescription
from procurator.core.errors import ValidationError
from procurator.core.move import Move, MoveKind, MovePhase, move_json
from procurator.master.service import MasterService
from procurator.rpc import convert
from procurator.rpc.schema import load_schema

S = load_schema()


def roundtrip(description: VmDescription) -> VmDescription:
    builder = S.DescribeResult.new_message()
    convert.fill_describe_result(builder, description)
    with S.DescribeResult.from_bytes(builder.to_bytes()) as reader:
        return convert.describe_result_from_reader(reader)


def on_the_wire(description: VmDescription) -> VmDescription:
    """``description`` as a reader gets it: a move's token and image stay
    in the master."""
    move = description.move
    if move is None:
        return description
    return dataclasses.replace(description, move=dataclasses.replace(move, token="", image=""))


def text_of(description: VmDescription) -> str:
    out = io.StringIO()
    print_description(description, out)
    return out.getvalue()


def move_row(description: VmDescription) -> str:
    (row,) = [line for line in text_of(description).splitlines() if line.startswith("  move:")]
    return row.removeprefix("  move:").strip()


__all__ = ["service"]  # the fixture of test_move_master.py


async def test_describe_shows_the_move_under_way_then_the_last_one(
    service: MasterService,
) -> None:
    async with trio.open_nursery() as nursery:
        _, a, b = await lab(service, nursery)
        before = await service.describe_vm("web-1")
        assert before.move is None and move_row(before) == "-"
        assert describe_json(before)["move"] is None

        b.receiving = False  # the disks never arrive: the move stays transferring
        move = await service.move("web-1", "host-b")
        with trio.fail_after(10):  # a hang guard
            while (await service.moves("web-1"))[0].phase is not MovePhase.TRANSFERRING:
                await trio.sleep(0.02)
        during = await service.describe_vm("web-1")
        assert during.move is not None
        assert (during.move.op_id, during.move.phase) == (move.op_id, MovePhase.TRANSFERRING)
        assert move_row(during) == f"transferring host-a -> host-b (cold, op {move.op_id})"
        assert describe_json(during)["move"] == move_json(during.move)
        assert roundtrip(during) == on_the_wire(during)

        b.receiving = True
        await b.take_again()
        assert (await wait_over(service, "web-1")).phase is MovePhase.DONE
        after = await service.describe_vm("web-1")
        assert after.worker_id == "host-b"
        assert move_row(after) == f"done host-a -> host-b (cold, op {move.op_id})"

        # A failed move is the last one, with its reason.
        a.bad_images.add(IMAGE)
        back = await service.move("web-1", "host-a")
        assert (await wait_over(service, "web-1")).phase is MovePhase.FAILED
        failed = await service.describe_vm("web-1")
        assert move_row(failed) == (
            f"failed host-b -> host-a (cold, op {back.op_id}): "
            "worker host-a cannot prepare the image"
        )
        assert roundtrip(failed) == on_the_wire(failed)
        nursery.cancel_scope.cancel()


def test_a_description_without_a_move_reads_as_none_and_a_bad_phase_is_refused() -> None:
    plain = VmDescription("web-1", 3, "host-a", 3, "op-1", None, "host-a", True, 3, None)
    assert roundtrip(plain).move is None
    moving = Move(
        "web-1", "host-a", "host-b", MoveKind.COLD, MovePhase.STOPPING, "op-m", 1, 2, generation=3
    )
    assert roundtrip(dataclasses.replace(plain, move=moving)).move == moving
    builder = S.DescribeResult.new_message()
    convert.fill_describe_result(builder, dataclasses.replace(plain, move=moving))
    builder.vm.move.phase = "teleporting"
    with (
        S.DescribeResult.from_bytes(builder.to_bytes()) as reader,
        pytest.raises(ValidationError, match=r"move\.phase.*teleporting"),
    ):
        convert.describe_result_from_reader(reader)
