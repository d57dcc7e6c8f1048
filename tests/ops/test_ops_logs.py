"""procurator.logs: the correlation fields reach every record — across trio
tasks, ``to_thread`` calls and threads that bind their own — and the text
and JSON formats carry the same ones."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest
import trio

from procurator import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The root logger configured as the daemons do, restored afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    logs.configure("info", "json", static={"worker_id": "host-a"}, stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:], root.level = saved
        for name in ("httpx", "httpcore"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_fields_follow_tasks_and_worker_threads(captured: io.StringIO) -> None:
    log = logging.getLogger("procurator.test.ops")

    def in_thread() -> None:
        log.info("in a to_thread call")

    async def task() -> None:
        await trio.to_thread.run_sync(in_thread)

    with logs.log_context(op_id="op-000000000001", vm_id="web-1"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)
        log.info("in the task", extra={"generation": 7})
    log.info("outside")
    inside_thread, inside, outside = _records(captured)
    assert inside_thread["message"] == "in a to_thread call"
    for record in (inside_thread, inside):
        assert (record["op_id"], record["vm_id"], record["worker_id"]) == (
            "op-000000000001",
            "web-1",
            "host-a",
        )
    assert inside["generation"] == 7
    assert outside == {
        "time": outside["time"],
        "level": "info",
        "logger": "procurator.test.ops",
        "message": "outside",
        "worker_id": "host-a",
    }


def test_a_thread_binds_its_own_fields(captured: io.StringIO) -> None:
    log = logging.getLogger("procurator.test.ops")

    def supervisor() -> None:
        # A new thread starts with an empty context, as a VmManager
        # supervisor does: it binds the VM and the op of its spec.
        log.info("before bind")
        logs.bind(vm_id="web-2", op_id="op-000000000002")
        log.info("converging")
        logs.bind(op_id="")  # a spec without an op id
        log.info("after")

    with logs.log_context(op_id="op-ffffffffffff"):
        thread = threading.Thread(target=supervisor)
        thread.start()
        thread.join()
    before, converging, after = _records(captured)
    assert "op_id" not in before and "vm_id" not in before
    assert (converging["op_id"], converging["vm_id"]) == ("op-000000000002", "web-2")
    assert "op_id" not in after and after["vm_id"] == "web-2"


def test_text_and_json_lines_carry_the_same_fields() -> None:
    record = logging.LogRecord("procurator.x", logging.INFO, __file__, 1, "hello %s", ("vm",), None)
    with logs.log_context(op_id="op-0123456789ab", vm_id="web-1", generation=3):
        logs.ContextFilter({"worker_id": "host-b"}).filter(record)
    text = logs.TextFormatter().format(record)
    data = json.loads(logs.JsonFormatter().format(record))
    assert text.endswith(
        "procurator.x: hello vm [op_id=op-0123456789ab worker_id=host-b vm_id=web-1 generation=3]"
    )
    assert {k: data[k] for k in logs.FIELDS} == {
        "op_id": "op-0123456789ab",
        "worker_id": "host-b",
        "vm_id": "web-1",
        "generation": 3,
    }
    # The time to the microsecond: trace points a millisecond apart differ.
    assert data["time"] == round(record.created, 6)


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown log fields"), logs.log_context(vmid="x"):
        pass


def test_op_ids_are_fresh() -> None:
    ids = {logs.new_op_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("op-") and len(i) == 15 for i in ids)
