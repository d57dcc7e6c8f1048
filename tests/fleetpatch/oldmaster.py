"""A master of the release before fleet patches, as far as a control client
can tell: run as a process, ``python oldmaster.py``, it serves the schema
without ``Control.applyPatch`` on a free loopback port (printed first, as
``{"port": N}``), answers ``Control.apply`` with generation 1, and prints one
JSON line per apply it received (``{"workers": {worker: [vm ids]}}``).

Another implementation of the wire contract (the schema file with that
method cut out), in a process of its own: loading a schema with the
master's file id next to the real one would abort the process.
"""

from __future__ import annotations

import asyncio
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import capnp

SCHEMA = Path(__file__).resolve().parents[2] / "schema" / "procurator.capnp"


def old_schema(directory: Path) -> Any:
    source = SCHEMA.read_text()
    # The method and its comment block, up to the end of the interface.
    older, count = re.subn(r"\n  applyPatch @\d+ .*?(?=\n\})", "", source, count=1, flags=re.DOTALL)
    assert count == 1
    path = directory / "procurator.capnp"
    path.write_text(older)
    return capnp.load(str(path), imports=[])


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        schema = old_schema(Path(tmp))

    class Control(schema.Control.Server):  # type: ignore[misc, name-defined]
        async def apply(self, fleet: Any, _context: Any, **_: Any) -> None:
            workers = {w.workerId: [vm.id for vm in w.vms] for w in fleet.workers}
            print(json.dumps({"workers": workers}), flush=True)
            ok = _context.results.result.init("ok")
            ok.generation = 1
            ok.changed = True
            ok.opId = "op-0123456789ab"

    class Master(schema.Master.Server):  # type: ignore[misc, name-defined]
        async def control(self, _context: Any, **_: Any) -> None:
            _context.results.result.control = Control()

    async def serve(stream: Any) -> None:
        await capnp.TwoPartyServer(stream, bootstrap=Master()).on_disconnect()

    async with capnp.kj_loop():
        server = await capnp.AsyncIoStream.create_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(json.dumps({"port": port}), flush=True)
        async with server:
            await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
