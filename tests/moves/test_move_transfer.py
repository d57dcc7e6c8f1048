"""A cold move's disk transfer (procurator.worker.move_transfer) over real
TCP sockets on loopback: what arrives is checked (size, sha256), only an
expected transfer with its token is taken, nothing half-written is kept,
a resend is idempotent, and hostile headers are refused."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from procurator.worker import stream_auth
from procurator.worker.move_service import send_disks_in_thread
from procurator.worker.move_transfer import (
    MAX_CONNECTIONS,
    Expected,
    Receiver,
    TransferError,
    disk_files,
    send_disks,
)
from procurator.worker.stream_auth import accept, preamble, read_token

BASE = "b" * 32 + "-web"
TOKEN = "7" * 32  # the master's: 32 hex digits
#: What a source opens a transfer with (its preamble, stream_auth).
OPENING = preamble(TOKEN.encode())


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    listener = socket.create_server(("127.0.0.1", 0))
    got = Receiver(listener, tmp_path / "target" / "incoming", timeout=5.0)
    thread = threading.Thread(target=got.serve)
    thread.start()
    try:
        yield got
    finally:
        got.close()
        thread.join()


def source_vm(tmp_path: Path) -> Path:
    vm_dir = tmp_path / "source" / "vms" / "web-1"
    disks = vm_dir / "disks" / BASE
    disks.mkdir(parents=True)
    (disks / "disk0.img").write_bytes(os.urandom(3 << 20) + b"the guest wrote this")
    with open(disks / "disk1.img", "wb") as sparse:
        sparse.truncate(8 << 20)
    return vm_dir


def test_the_disks_arrive_whole_and_a_resend_is_answered_at_once(
    tmp_path: Path, receiver: Receiver
) -> None:
    vm_dir = source_vm(tmp_path)
    files = disk_files(vm_dir)
    assert [name for name, _ in files] == [f"{BASE}/disk0.img", f"{BASE}/disk1.img"]
    receiver.expect([Expected("web-1", "op-m1", TOKEN)])
    seen: list[tuple[int, int]] = []
    send_disks(
        receiver.address,
        vm_id="web-1",
        op_id="op-m1",
        token=TOKEN,
        files=files,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert receiver.received("web-1") == "op-m1"
    for name, path in files:
        got = tmp_path / "target" / "incoming" / "web-1" / name
        assert got.read_bytes() == path.read_bytes()
    assert seen[-1] == ((11 << 20) + 20,) * 2
    # Idempotent: the source lost the answer and sends again.
    send_disks(receiver.address, vm_id="web-1", op_id="op-m1", token=TOKEN, files=files)
    # A set kept while its transfer is expected; once none names its op,
    # it goes.
    receiver.prune()
    assert receiver.received("web-1") == "op-m1"
    receiver.expect([])
    receiver.prune()
    incoming = tmp_path / "target" / "incoming"
    assert receiver.received("web-1") is None and list(incoming.iterdir()) == []


def test_only_the_expected_transfer_with_its_token_is_taken(
    tmp_path: Path, receiver: Receiver
) -> None:
    files = disk_files(source_vm(tmp_path))
    right, wrong = "r" * 32, "w" * 32
    receiver.expect([Expected("web-1", "op-m1", right)])
    for vm_id, op_id, token, why in (
        ("web-1", "op-m1", wrong, "no transfer is expected with this token"),
        ("web-1", "op-m2", right, "no transfer of VM web-1 for move op-m2 is expected here"),
        ("web-2", "op-m1", right, "no transfer of VM web-2 for move op-m1 is expected here"),
    ):
        with pytest.raises(TransferError, match=why):
            send_disks(receiver.address, vm_id=vm_id, op_id=op_id, token=token, files=files)
    assert receiver.received("web-1") is None
    # Refusing an unknown peer records no failure of the transfer expected:
    # anyone on the network could fail a move otherwise.
    assert receiver.failure("web-1") == ""
    assert list((tmp_path / "target" / "incoming").iterdir()) == []


def raw_send(address: tuple[str, int], header: object, body: bytes) -> str:
    with socket.create_connection(address, timeout=5) as conn:
        conn.sendall(OPENING + json.dumps(header).encode() + b"\n" + body)
        conn.shutdown(socket.SHUT_WR)
        answers = conn.makefile("rb")
        assert answers.readline() == b"ok\n"  # the token
        answer = answers.readline().decode().strip()
        return answers.readline().decode().strip() if answer == "go" else answer


def test_a_bad_checksum_a_short_file_or_a_hostile_name_keeps_nothing(
    tmp_path: Path, receiver: Receiver
) -> None:
    receiver.expect([Expected("web-1", "op-m1", TOKEN)])
    name = f"{BASE}/disk0.img"

    def header(files: object) -> dict[str, object]:
        return {"vm_id": "web-1", "op_id": "op-m1", "files": files}

    data = b"x" * 1000
    wrong = hashlib.sha256(b"y").hexdigest().encode()
    answer = raw_send(
        receiver.address, header([{"name": name, "size": 1000}]), data + wrong + b"\n"
    )
    assert answer.startswith("error: ") and "sha256" in answer
    assert "sha256" in receiver.failure("web-1")
    answer = raw_send(receiver.address, header([{"name": name, "size": 1000}]), data[:10])
    assert answer.startswith("error: ") and "went away after 10 of 1000 bytes" in answer
    for hostile in ("../../etc/passwd", f"{BASE}/../../x.img", "/abs/disk0.img", f"{BASE}/x"):
        answer = raw_send(receiver.address, header([{"name": hostile, "size": 1}]), b"z")
        assert answer.startswith("error: files: ") and "is not a disk copy's name" in answer
    answer = raw_send(receiver.address, header([{"name": name, "size": 1 << 62}]), b"")
    assert answer.startswith("error: the disks need")
    assert receiver.received("web-1") is None
    assert list((tmp_path / "target" / "incoming").iterdir()) == []
    with socket.create_connection(receiver.address, timeout=5) as conn:
        conn.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert conn.makefile("rb").readline() == b"error: not a procurator stream\n"
    with socket.create_connection(receiver.address, timeout=5) as conn:
        conn.sendall(preamble(b"w" * 32))
        answer = conn.makefile("rb").readline()
        assert answer == b"error: no transfer is expected with this token\n"
    # A header nested past the parser's recursion: refused with an answer
    # (its RecursionError ended the thread unanswered, a traceback logged).
    with socket.create_connection(receiver.address, timeout=5) as conn:
        conn.sendall(OPENING + b"[" * 60_000 + b"\n")
        answers = conn.makefile("rb")
        assert answers.readline() == b"ok\n"
        assert answers.readline() == b"error: the header nests too deep\n"


def test_a_vm_without_writable_disks_sends_an_empty_set(tmp_path: Path, receiver: Receiver) -> None:
    receiver.expect([Expected("web-9", "op-m9", TOKEN)])
    assert disk_files(tmp_path / "nothing") == []
    send_disks(receiver.address, vm_id="web-9", op_id="op-m9", token=TOKEN, files=[])
    assert receiver.received("web-9") == "op-m9"


def test_closing_the_receiver_cuts_a_transfer_under_way_and_keeps_nothing(
    tmp_path: Path,
) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    got = Receiver(listener, tmp_path / "incoming", timeout=60.0)
    thread = threading.Thread(target=got.serve)
    thread.start()
    got.expect([Expected("web-1", "op-m1", TOKEN)])
    header = {
        "vm_id": "web-1",
        "op_id": "op-m1",
        "files": [{"name": f"{BASE}/disk0.img", "size": 1 << 20}],
    }
    with socket.create_connection(got.address, timeout=5) as conn:
        conn.sendall(OPENING + json.dumps(header).encode() + b"\n" + b"x" * 1000)
        answers = conn.makefile("rb")
        assert answers.readline() == b"ok\n"
        assert answers.readline() == b"go\n"
        got.close()  # does not wait out the 60 s socket timeout
        thread.join()
    assert got.received("web-1") is None
    assert list((tmp_path / "incoming").iterdir()) == []


def test_an_image_with_a_name_as_long_as_nix_allows_carries_its_disk(
    tmp_path: Path, receiver: Receiver
) -> None:
    # Nix store names run to 211 characters (validation.STORE_PATH_RE);
    # a copy the transfer could not name was left out of the set, and the
    # target booted the VM on a fresh copy: the guest's writes lost.
    longest = "b" * 32 + "-" + "n" * 211
    disks = tmp_path / "source" / "vms" / "web-1" / "disks" / longest
    disks.mkdir(parents=True)
    (disks / "disk0.img").write_bytes(b"the guest wrote this")
    files = disk_files(tmp_path / "source" / "vms" / "web-1")
    assert [name for name, _ in files] == [f"{longest}/disk0.img"]
    receiver.expect([Expected("web-1", "op-m1", TOKEN)])
    send_disks(receiver.address, vm_id="web-1", op_id="op-m1", token=TOKEN, files=files)
    got = tmp_path / "target" / "incoming" / "web-1" / longest / "disk0.img"
    assert got.read_bytes() == b"the guest wrote this"


def test_a_disk_copy_the_transfer_cannot_name_fails_the_send_instead_of_staying_behind(
    tmp_path: Path,
) -> None:
    disks = tmp_path / "vms" / "web-1" / "disks" / "not-a-store-basename"
    disks.mkdir(parents=True)
    (disks / "disk0.img").write_bytes(b"the guest wrote this")
    with pytest.raises(
        TransferError, match=r"not-a-store-basename/disk0\.img is not a disk copy's name"
    ):
        disk_files(tmp_path / "vms" / "web-1")


def test_a_resend_while_the_first_is_still_received_never_stores_half_a_set(
    tmp_path: Path, receiver: Receiver
) -> None:
    # A source that timed out waiting for the answer (the target's fsync of
    # a big disk, say) sends again while the target still receives the
    # first connection: the first's set was renamed into place from the
    # directory the second had begun to write, half a disk reported received.
    receiver.expect([Expected("web-1", "op-m1", TOKEN)])
    name = f"{BASE}/disk0.img"
    data = os.urandom(1 << 20)
    digest = hashlib.sha256(data).hexdigest().encode() + b"\n"
    header = (
        OPENING
        + json.dumps(
            {
                "vm_id": "web-1",
                "op_id": "op-m1",
                "files": [{"name": name, "size": len(data)}],
            }
        ).encode()
        + b"\n"
    )
    incoming = tmp_path / "target" / "incoming"
    with (
        socket.create_connection(receiver.address, timeout=5) as first,
        socket.create_connection(receiver.address, timeout=5) as second,
    ):
        first_answers, second_answers = first.makefile("rb"), second.makefile("rb")
        first.sendall(header)
        assert first_answers.readline() == b"ok\n"  # the token
        assert first_answers.readline() == b"go\n"
        first.sendall(data)  # all but its checksum: the target holds it whole
        wait_for(lambda: sizes(incoming) == [len(data)])
        second.sendall(header)
        assert second_answers.readline() == b"ok\n"  # the token
        assert second_answers.readline() == b"go\n"
        second.sendall(data[:1000])
        wait_for(lambda: 0 in sizes(incoming))  # the second's copy begun
        first.sendall(digest)
        assert first_answers.readline() == b"ok\n"
        assert receiver.received("web-1") == "op-m1"
        assert (incoming / "web-1" / name).read_bytes() == data
        second.sendall(data[1000:] + digest)
        assert second_answers.readline() == b"ok\n"
    assert (incoming / "web-1" / name).read_bytes() == data
    assert [p.name for p in incoming.iterdir()] == ["web-1"]


def sizes(incoming: Path) -> list[int]:
    """The sizes of the disk copies being received (under a partial directory)."""
    return [p.stat().st_size for p in incoming.glob(".*.partial/*/disk0.img")]


def wait_for(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds (a receiving thread has got so far)."""
    while not condition():
        time.sleep(0.005)


def test_silent_connections_past_the_limit_cannot_keep_a_source_out(
    tmp_path: Path, receiver: Receiver
) -> None:
    # Anyone on the network can connect: each connection takes a thread and
    # a descriptor of the worker until its preamble's deadline, so their
    # number is bounded; but refusing every connection past the bound let
    # as many silent peers, renewed before their deadline, keep the source
    # out for good. The oldest waiting one makes room instead.
    files = disk_files(source_vm(tmp_path))
    receiver.expect([Expected("web-1", "op-m1", TOKEN)])
    idle = [socket.create_connection(receiver.address, timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        send_disks(receiver.address, vm_id="web-1", op_id="op-m1", token=TOKEN, files=files)
        assert receiver.received("web-1") == "op-m1"
        assert idle[0].recv(1024) == b""  # the oldest, cut to make room
    finally:
        for conn in idle:
            conn.close()


def test_a_peer_has_the_live_streams_preamble_deadline_not_the_transfers_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The transfer's timeout bounds its disk's reads and writes (30 s by
    # default); a preamble (at most 276 bytes) has stream_auth's deadline,
    # as on the live streams: an unauthenticated peer holds a thread and a
    # descriptor no longer than that.
    monkeypatch.setattr(stream_auth, "PREAMBLE_TIMEOUT", 0.1)
    listener = socket.create_server(("127.0.0.1", 0))
    receiver = Receiver(listener, tmp_path / "incoming", timeout=600.0)
    thread = threading.Thread(target=receiver.serve)
    thread.start()
    try:
        with (
            socket.create_connection(receiver.address, timeout=10) as silent,
            silent.makefile("rb") as answers,
        ):
            assert answers.readline() == b"error: no preamble in time\n"
            assert answers.readline() == b""  # and closed
    finally:
        receiver.close()
        thread.join()


def test_workers_of_the_first_version_are_told_why_on_both_ends(
    tmp_path: Path, receiver: Receiver
) -> None:
    # The cold transfer's first version opened with PROCURATOR-MOVE 1 and
    # its token in the JSON header; either end of a move mixing versions
    # must say so, not "not a procurator stream" (a worker of another
    # release is one).
    receiver.expect([Expected("web-1", "op-m1", TOKEN)])
    first = {"vm_id": "web-1", "op_id": "op-m1", "token": TOKEN, "files": []}
    with socket.create_connection(receiver.address, timeout=5) as conn:
        conn.sendall(b"PROCURATOR-MOVE 1\n" + json.dumps(first).encode() + b"\n")
        refused = conn.makefile("rb").readline().decode()
    assert refused.startswith("error: a procurator stream of another version")
    assert "same release" in refused
    # A target of the first version: what its receiver answered a stream
    # that did not open with its magic line (646b4a9^).
    with socket.create_server(("127.0.0.1", 0)) as old_target:

        def answer_as_the_first_version() -> None:
            conn, _ = old_target.accept()
            with conn, conn.makefile("rb") as lines:
                lines.readline(len(b"PROCURATOR-MOVE 1\n") + 1)
                conn.sendall(b"error: not a procurator move transfer\n")

        thread = threading.Thread(target=answer_as_the_first_version)
        thread.start()
        try:
            with pytest.raises(TransferError, match="runs an earlier procurator") as refusal:
                send_disks(
                    old_target.getsockname()[:2],
                    vm_id="web-1",
                    op_id="op-m1",
                    token=TOKEN,
                    files=disk_files(source_vm(tmp_path)),
                )
            assert "same release" in str(refusal.value)
        finally:
            thread.join()


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.root
def test_a_target_that_refuses_partway_gives_the_source_its_reason(tmp_path: Path) -> None:
    # The target's disk fills while the set arrives (past its free-space
    # check, which counts bytes: here the file system has room for 4 inodes,
    # the second disk's is one too many). It answered "error: No space left
    # on device" and closed while the source still sent the second disk;
    # the source reported "Broken pipe" / "Connection reset by peer".
    vm_dir = tmp_path / "source" / "vms" / "web-1"
    disks = vm_dir / "disks" / BASE
    disks.mkdir(parents=True)
    (disks / "disk0.img").write_bytes(os.urandom(1 << 20))
    with open(disks / "disk1.img", "wb") as sparse:
        sparse.truncate(256 << 20)  # more than the sockets' buffers hold
    incoming = tmp_path / "target" / "incoming"
    # Inodes: the root, the connection's directory, the image's, disk0.img.
    with tmpfs(incoming, "size=512m,nr_inodes=4"):
        listener = socket.create_server(("127.0.0.1", 0))
        got = Receiver(listener, incoming, timeout=30.0)
        thread = threading.Thread(target=got.serve)
        thread.start()
        try:
            got.expect([Expected("web-1", "op-m1", TOKEN)])
            with pytest.raises(TransferError) as refused:
                send_disks(
                    got.address, vm_id="web-1", op_id="op-m1", token=TOKEN, files=disk_files(vm_dir)
                )
        finally:
            got.close()
            thread.join()
        assert "refused VM web-1's disks: error: " in str(refused.value)
        assert "No space left on device" in str(refused.value)
        assert "No space left on device" in got.failure("web-1")
        assert got.received("web-1") is None and list(incoming.iterdir()) == []


async def test_a_cancelled_send_ends_at_once_and_leaves_no_thread_or_socket(
    tmp_path: Path,
) -> None:
    # Stopping the worker cancels its sends: the send ran in a thread the
    # cancel could not end, so the worker's stop waited until the whole disk
    # was through (or the socket timed out): minutes for a big disk, past
    # systemd's stop timeout. The target here takes the header and then
    # reads nothing until the cancel has returned (or, before the fix, until
    # its patience ran out, when it read the whole disk so the send ended).
    vm_dir = tmp_path / "vms" / "web-1"
    disks = vm_dir / "disks" / BASE
    disks.mkdir(parents=True)
    size = 256 << 20  # more than the sockets' buffers hold
    with open(disks / "disk0.img", "wb") as sparse:
        sparse.truncate(size)
    listener = socket.create_server(("127.0.0.1", 0))
    cancel_returned = threading.Event()
    target_got: list[int] = []

    def slow_target() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            assert read_token(conn, deadline=time.monotonic() + 30) == TOKEN.encode()
            accept(conn)
            stream = conn.makefile("rb")
            stream.readline()
            conn.sendall(b"go\n")
            cancel_returned.wait(30)  # patience: only before the fix
            got = 0
            with contextlib.suppress(OSError):
                while chunk := stream.read1(1 << 20):  # what is there: no waiting for more
                    got += len(chunk)
                    if got >= size + 65:  # the disk and its checksum line
                        conn.sendall(b"ok\n")
            target_got.append(got)

    target = threading.Thread(target=slow_target)
    target.start()
    fds = len(os.listdir("/proc/self/fd"))
    try:
        sending = trio.Event()
        token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        send_disks_in_thread,
                        listener.getsockname(),
                        vm_id="web-1",
                        op_id="op-m1",
                        token=TOKEN,
                        files=disk_files(vm_dir),
                        timeout=60.0,
                        progress=lambda done, total: token.run_sync_soon(sending.set),
                    )
                )
                await sending.wait()
                scope.cancel()
        # The send had not gone through when the cancel returned ...
        assert target_got == [], "the cancel waited for the whole disk"
        assert scope.cancelled_caught
        # ... and no thread is still in it.
        assert not any(
            frame.f_code.co_name == "send_disks"
            for top in sys._current_frames().values()
            for frame, _ in traceback.walk_stack(top)
        )
    finally:
        cancel_returned.set()
        target.join()
    # The target saw the transfer broken (less than the disk arrived), and
    # the send's socket is closed.
    assert target_got and target_got[0] < size
    assert len(os.listdir("/proc/self/fd")) == fds
    listener.close()
