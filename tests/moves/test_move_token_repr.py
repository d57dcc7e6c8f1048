"""A move's one-time token is a credential (docs/SECURITY.md): whoever holds
it may present a VM's disks or memory to the move's target. The records that
carry it keep it out of their ``repr`` (and so out of ``str``, of logs and of
exception messages that format them); it is still a field, and still stored
and sent where the move needs it."""

from __future__ import annotations

from procurator.core.models import DiskTransfer
from procurator.core.move import Move, MoveKind, MovePhase
from procurator.worker.move_transfer import Expected
from procurator.worker.vmrecord import Incoming

TOKEN = "0123456789abcdef0123456789abcdef"


def test_records_carrying_a_move_token_do_not_show_it() -> None:
    records: list[object] = [
        DiskTransfer("vm-1", "op-1", True, TOKEN, "10.0.0.2:7000", live=True),
        Move(
            "vm-1",
            "host-a",
            "host-b",
            MoveKind.LIVE,
            MovePhase.TRANSFERRING,
            "op-1",
            1,
            2,
            token=TOKEN,
        ),
        Expected("vm-1", "op-1", TOKEN),
        Incoming("op-1", ("10.0.0.2", 7000), None, bytes.fromhex(TOKEN)),
    ]
    for record in records:
        shown = repr(record) + str(record) + f"{record}"
        assert TOKEN not in shown, shown
        assert "token" not in shown, shown
    # Still carried: the records are equal only with the same token.
    assert Incoming("op-1", ("h", 1), None, b"a") != Incoming("op-1", ("h", 1), None, b"b")
