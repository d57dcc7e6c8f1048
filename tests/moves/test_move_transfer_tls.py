"""A cold move's disk transfer in TLS (procurator.worker.move_transfer,
``TransferTls``) between real sockets on loopback, with certificates of a
real fleet CA (procurator.certs): the disks cross encrypted, the source
checks the target's worker identity and never falls back to plain, and
the target takes only workers of the fleet, in TLS."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator.app.worker import transfer_tls
from procurator.certs import init_ca, issue
from procurator.rpc.tls import Role, TlsFiles
from procurator.worker.move_transfer import (
    Expected,
    Receiver,
    TransferError,
    TransferTls,
    disk_files,
    send_disks,
)

BASE = "c" * 32 + "-web"
TOKEN = "5" * 32
#: What the guest wrote: must never cross the wire in clear.
PATTERN = b"the guest's secret sector. "


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TransferTls]:
    """TLS of workers target-a, source-b and other-c, and of a control
    certificate (ops), from one fleet CA."""
    ca = tmp_path_factory.mktemp("ca")
    init_ca(ca)
    made = {}
    for role, name in (
        (Role.WORKER, "target-a"),
        (Role.WORKER, "source-b"),
        (Role.WORKER, "other-c"),
        (Role.CONTROL, "ops"),
    ):
        issued = issue(ca, role, name)
        made[name] = transfer_tls(TlsFiles(issued.cert, issued.key, ca / "ca.crt"))
    return made


@contextlib.contextmanager
def serving(tmp_path: Path, tls: TransferTls | None) -> Iterator[Receiver]:
    receiver = Receiver(
        socket.create_server(("127.0.0.1", 0)), tmp_path / "incoming", timeout=5.0, tls=tls
    )
    receiver.expect([Expected("web-1", "op-t1", TOKEN)])
    thread = threading.Thread(target=receiver.serve)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.close()
        thread.join()


def files(tmp_path: Path) -> list[tuple[str, Path]]:
    disks = tmp_path / "vm" / "disks" / BASE
    disks.mkdir(parents=True)
    (disks / "disk0.img").write_bytes(PATTERN * 4096 + os.urandom(1024))
    return disk_files(tmp_path / "vm")


def send(
    receiver: Receiver | tuple[str, int],
    disks: list[tuple[str, Path]],
    tls: TransferTls | None,
    tls_target: str = "",
) -> None:
    address = receiver.address if isinstance(receiver, Receiver) else receiver
    send_disks(
        address,
        vm_id="web-1",
        op_id="op-t1",
        token=TOKEN,
        files=disks,
        timeout=5.0,
        tls=tls,
        tls_target=tls_target,
    )


@contextlib.contextmanager
def recording_relay(target: tuple[str, int]) -> Iterator[tuple[tuple[str, int], bytearray]]:
    """A TCP relay to ``target`` that records what the source sends."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = bytearray()

    def pump(src: socket.socket, dst: socket.socket, record: bool) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(1 << 16):
                if record:
                    seen.extend(chunk)
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def relay() -> None:
        conn, _ = listener.accept()
        upstream = socket.create_connection(target)
        with conn, upstream:
            back = threading.Thread(target=pump, args=(upstream, conn, False))
            back.start()
            pump(conn, upstream, True)
            back.join()

    thread = threading.Thread(target=relay)
    thread.start()
    try:
        yield listener.getsockname()[:2], seen
    finally:
        thread.join()
        listener.close()


def test_the_disks_cross_in_tls_and_never_in_clear(
    tmp_path: Path, fleet: dict[str, TransferTls]
) -> None:
    disks = files(tmp_path)
    with (
        serving(tmp_path, fleet["target-a"]) as receiver,
        recording_relay(receiver.address) as (relay, seen),
    ):
        assert receiver.serves_tls
        send(relay, disks, fleet["source-b"], tls_target="target-a")
        assert receiver.received("web-1") == "op-t1"
    got = tmp_path / "incoming" / "web-1" / f"{BASE}/disk0.img"
    assert got.read_bytes() == disks[0][1].read_bytes()
    assert len(seen) > len(PATTERN) * 4096  # the disk went through the relay...
    assert PATTERN not in seen and TOKEN.encode() not in seen  # ...encrypted


def test_a_target_holding_another_workers_certificate_is_refused(
    tmp_path: Path, fleet: dict[str, TransferTls]
) -> None:
    with serving(tmp_path, fleet["other-c"]) as receiver:
        with pytest.raises(TransferError, match="certificate of worker 'other-c', not of the"):
            send(receiver, files(tmp_path), fleet["source-b"], tls_target="target-a")
        assert receiver.received("web-1") is None


def test_a_plain_source_is_refused_by_a_tls_target_saying_why(
    tmp_path: Path, fleet: dict[str, TransferTls]
) -> None:
    with serving(tmp_path, fleet["target-a"]) as receiver:
        with pytest.raises(TransferError, match="move transfers need TLS"):
            send(receiver, files(tmp_path), None)
        assert receiver.received("web-1") is None


def test_a_target_answering_plain_when_the_master_said_tls_fails_the_send(
    tmp_path: Path, fleet: dict[str, TransferTls]
) -> None:
    # A downgrade: whoever sits on the path answers plain TCP.
    with serving(tmp_path, None) as receiver:
        with pytest.raises(TransferError, match=r"did not complete a TLS handshake.*nothing is"):
            send(receiver, files(tmp_path), fleet["source-b"], tls_target="target-a")
        assert receiver.received("web-1") is None


def test_a_client_without_a_worker_certificate_is_refused(
    tmp_path: Path, fleet: dict[str, TransferTls]
) -> None:
    with serving(tmp_path, fleet["target-a"]) as receiver:
        with pytest.raises(TransferError, match=r"procurator://control/ops's, not a worker's"):
            send(receiver, files(tmp_path), fleet["ops"], tls_target="target-a")
        assert receiver.received("web-1") is None


def test_a_plain_target_gets_the_disks_unencrypted_and_logged(
    tmp_path: Path, fleet: dict[str, TransferTls], caplog: pytest.LogCaptureFixture
) -> None:
    # An older target (or one without certificates) says plain: allowed.
    with serving(tmp_path, None) as receiver, caplog.at_level(logging.WARNING):
        send(receiver, files(tmp_path), fleet["source-b"])
        assert receiver.received("web-1") == "op-t1"
    assert "UNENCRYPTED" in caplog.text


def test_a_source_told_tls_without_certificates_of_its_own_sends_nothing(
    tmp_path: Path, fleet: dict[str, TransferTls]
) -> None:
    with serving(tmp_path, fleet["target-a"]) as receiver:
        with pytest.raises(TransferError, match=r"only over TLS.*no certificate"):
            send(receiver, files(tmp_path), None, tls_target="target-a")
        assert receiver.received("web-1") is None
