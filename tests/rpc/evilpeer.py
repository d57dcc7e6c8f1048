"""A peer that speaks the master's protocol with malformed fields: run as a
process, ``python evilpeer.py ADDRESS`` (``host:port``), it prints one JSON
line per request it made (``scenario``, then the answer's ``code``,
``message``, ``details``, ``opId``, or ``exception`` when the call raised).

It is another implementation of the wire contract, as the schema promises
anyone can write, with a few fields declared differently: the schema is
``schema/procurator.capnp`` with the same ids (so the same interfaces and
methods on the wire) but ``Data`` where the master expects ``Text`` (so it
can send text without its NUL, or bytes that are not UTF-8) and
``AnyPointer`` for ``Master.register``'s ``info`` (so it can send text where
a struct is expected). A process of its own: loading a schema with the
master's file id next to the real one would abort the process.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import capnp

SCHEMA = Path(__file__).resolve().parents[2] / "schema" / "procurator.capnp"


def _retype(source: str, struct: str, field: str, new_type: str) -> str:
    """``source`` with the first ``field`` of struct (or interface)
    ``struct`` declared ``new_type``: a struct's field, or a parameter of
    one of the interface's methods."""
    block = re.search(rf"\n(struct|interface) {struct} \{{.*?\n\}}", source, re.DOTALL)
    assert block is not None, struct
    text = block.group(0)
    changed, count = re.subn(rf"(\b{field} (?:@\d+ )?):[A-Za-z]+", rf"\1:{new_type}", text, count=1)
    assert count == 1, (struct, field)
    return source.replace(text, changed)


def evil_schema(directory: Path) -> Any:
    source = SCHEMA.read_text()
    for struct, field, new_type in (
        ("WorkerInfo", "workerId", "Data"),
        ("VmStatus", "message", "Data"),
        ("VmEvent", "message", "Data"),
        ("VmAssignment", "id", "Data"),
        ("Master", "info", "AnyPointer"),
        ("Control", "vmId", "Data"),
    ):
        source = _retype(source, struct, field, new_type)
    path = directory / "procurator.capnp"
    path.write_text(source)
    return capnp.load(str(path), imports=[])


def _report(scenario: str, result: Any) -> None:
    if result.which() == "error":
        _report_error(scenario, result.error)
    else:
        print(json.dumps({"scenario": scenario, "ok": str(result.which())}), flush=True)


def _report_error(scenario: str, error: Any) -> None:
    print(
        json.dumps(
            {
                "scenario": scenario,
                "code": str(error.code),
                "message": error.message,
                "details": list(error.details),
                "opId": error.opId,
            }
        ),
        flush=True,
    )


async def _call(scenario: str, request: Any, answer: str) -> Any:
    """Send ``request``; report the error in ``answer`` ("result": a union
    arm, "error": a result) or the exception; return the response."""
    try:
        response = await request.send()
    except capnp.KjException as exc:
        print(json.dumps({"scenario": scenario, "exception": exc.description}), flush=True)
        return None
    if answer == "result":
        _report(scenario, response.result)
    elif answer == "eventsResult":  # a combined report: its status part, then its events'
        _report(f"{scenario} (status)", response.result)
        _report(scenario, response.eventsResult)
    elif response._has("error"):
        _report_error(scenario, response.error)
    else:
        print(json.dumps({"scenario": scenario, "ok": "answered"}), flush=True)
    return response


async def main(address: str) -> None:
    host, port = address.rsplit(":", 1)
    with tempfile.TemporaryDirectory() as tmp:
        schema = evil_schema(Path(tmp))

    class Node(schema.Node.Server):  # type: ignore[misc, name-defined]
        async def push(self, **_: Any) -> None:
            pass

    async with capnp.kj_loop():
        stream = await capnp.AsyncIoStream.create_connection(host, int(port))
        client = capnp.TwoPartyClient(stream)
        master = client.bootstrap().cast_as(schema.Master)

        request = master.register_request()
        request.info.set_as_text("a text where a WorkerInfo belongs")
        request.node = Node()
        await _call("register: text for a struct", request, "result")

        request = master.register_request()
        request.info.as_struct(schema.WorkerInfo).workerId = b"host-a"
        request.node = Node()
        await _call("register: text without its NUL", request, "result")

        request = master.register_request()
        request.info.as_struct(schema.WorkerInfo).workerId = b"host-\xff\x00"
        request.node = Node()
        await _call("register: text not UTF-8", request, "result")

        request = master.register_request()
        request.info.as_struct(schema.WorkerInfo).workerId = b"host-a\x00"
        request.node = Node()
        registered = await _call("register", request, "result")
        session = registered.result.session

        request = session.reportStatus_request()
        status = request.init("status")
        status.workerId = "host-a"
        vms = status.init("vms", 2)
        for index, vm in enumerate(vms):
            vm.id = f"web-{index}"
            vm.message = b"ok\x00"
        vms[1].message = b"\xff\xfe broken\x00"
        await _call("reportStatus: a message not UTF-8", request, "result")

        request = session.reportStatus_request()
        request.init("status").workerId = "host-a"
        await _call("reportStatus", request, "result")

        request = session.reportStatusAndEvents_request()
        request.init("changes").workerId = "host-a"
        event = request.init("events", 1)[0]
        event.vmId = "web-0"
        event.message = b"\xff\xfe broken\x00"
        await _call("reportStatusAndEvents: an event's message not UTF-8", request, "eventsResult")

        control = (await master.control()).result.control
        request = control.apply_request()
        worker = request.init("fleet").init("workers", 1)[0]
        worker.workerId = "host-a"
        vm = worker.init("vms", 1)[0]
        vm.id = b"web-1"
        vm.hash = "a" * 32
        vm.nixStorePath = "/nix/store/" + "a" * 32 + "-web"
        await _call("apply: a VM id without its NUL", request, "result")

        request = control.events_request()
        request.vmId = b"\xc3\x00"
        await _call("events: a VM id not UTF-8", request, "error")

        request = control.events_request()
        request.vmId = b"../../etc/passwd\x00"
        await _call("events: a path for a VM id", request, "error")

        await _call("status", control.status_request(), "error")
        client.close()
        stream.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
