"""The trio <-> capnp-thread bridge: results, errors and cancellation cross
both ways; capnp objects cannot leak to trio."""

from __future__ import annotations

import asyncio
import gc
import threading

import capnp
import pytest
import trio
from rpcfixtures import RunningMaster

from procurator.core.errors import PermanentError, UnavailableError, ValidationError
from procurator.rpc.bridge import Bridge, open_bridge, translate_exception
from procurator.rpc.clients import open_control
from procurator.rpc.schema import load_schema, schema_path


async def test_run_returns_plain_results_from_the_capnp_thread(bridge: Bridge) -> None:
    async def where() -> tuple[str, bool]:
        return threading.current_thread().name, asyncio.get_running_loop().is_running()

    name, running = await bridge.run(where)
    assert name == "procurator-capnp"
    assert running


async def test_errors_cross_with_their_type(bridge: Bridge) -> None:
    async def fails() -> None:
        raise ValidationError("bad thing", details=["x: y"])

    with pytest.raises(ValidationError) as info:
        await bridge.run(fails)
    assert info.value.details == ("x: y",)
    assert info.value.__traceback__ is not None  # re-raised on this side

    async def bug() -> None:
        raise KeyError("k")

    with pytest.raises(KeyError) as key_info:
        await bridge.run(bug)
    assert any("capnp thread traceback" in note for note in key_info.value.__notes__)


async def test_kj_exceptions_become_our_errors(bridge: Bridge) -> None:
    async def disconnected() -> None:
        raise capnp.KjException("peer went away", type="DISCONNECTED")

    with pytest.raises(UnavailableError, match="peer went away"):
        await bridge.run(disconnected, what="calling the peer")

    assert isinstance(
        translate_exception(capnp.KjException("nope", type="UNIMPLEMENTED"), "x"), PermanentError
    )
    assert isinstance(
        translate_exception(ConnectionRefusedError(111, "refused"), "x"), UnavailableError
    )


async def test_capnp_objects_may_not_cross(bridge: Bridge) -> None:
    async def leak() -> object:
        return load_schema().Assignment.new_message()

    with pytest.raises(TypeError, match="Cap'n Proto object"):
        await bridge.run(leak)


async def test_trio_cancellation_cancels_the_asyncio_task(bridge: Bridge) -> None:
    started = threading.Event()
    finished: list[str] = []

    async def slow() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            finished.append("cancelled")
            raise

    with trio.move_on_after(30) as scope:
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                await bridge.run(slow)

            nursery.start_soon(call)
            await trio.to_thread.run_sync(started.wait)
            nursery.cancel_scope.cancel()
    assert not scope.cancelled_caught
    # run() returns only after the asyncio task has finished.
    assert finished == ["cancelled"]


async def test_call_trio_from_a_capnp_coroutine(bridge: Bridge) -> None:
    trio_thread = threading.current_thread()

    async def on_trio(x: int) -> tuple[int, bool]:
        await trio.sleep(0)
        return x * 2, threading.current_thread() is trio_thread

    async def from_capnp() -> tuple[int, bool]:
        return await bridge.call_trio(on_trio, 21)

    assert await bridge.run(from_capnp) == (42, True)

    async def trio_fails() -> None:
        raise ValidationError("refused on trio")

    async def from_capnp_failing() -> None:
        await bridge.call_trio(trio_fails)

    with pytest.raises(ValidationError, match="refused on trio"):
        await bridge.run(from_capnp_failing)


async def test_cancelling_call_trio_cancels_the_trio_task(bridge: Bridge) -> None:
    cancelled = trio.Event()
    entered = trio.Event()

    async def forever() -> None:
        entered.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    async def from_capnp() -> str:
        future = bridge.call_trio(forever)
        await asyncio.sleep(0)
        # Wait until the trio side runs, then give up on it.
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(future), 0.01)
            except TimeoutError:
                if entered.is_set():
                    break
        future.cancel()
        return "gave up"

    assert await bridge.run(from_capnp) == "gave up"
    with trio.fail_after(30):
        await cancelled.wait()


async def test_bridges_share_one_thread_and_it_stops_with_the_last() -> None:
    async def thread_id() -> int:
        return threading.get_ident()

    async with open_bridge() as first, open_bridge() as second:
        assert await first.run(thread_id) == await second.run(thread_id)
    assert not any(t.name == "procurator-capnp" for t in threading.enumerate())


async def test_body_errors_leave_open_bridge_unwrapped() -> None:
    with pytest.raises(ValidationError):
        async with open_bridge():
            raise ValidationError("from the body")


def test_schema_is_found_and_loaded_once() -> None:
    assert schema_path().name == "procurator.capnp"
    assert load_schema() is load_schema()


async def test_a_closed_connection_is_freed_on_the_capnp_thread(master: RunningMaster) -> None:
    """Closing a client connection frees its capnp objects there and then,
    on the capnp thread, by reference count: none is left for the cyclic
    garbage collector, which runs on whatever thread allocates when it
    does (trio's, or the main thread as the process exits), where their
    destructors would touch the stream and the asyncio loop of another
    thread (invariant 1 of procurator.rpc.bridge)."""
    assert master.address is not None

    def clients() -> int:
        return sum(isinstance(o, capnp.TwoPartyClient) for o in gc.get_objects())

    gc.collect()
    gc.disable()
    try:
        async with open_bridge() as bridge:
            async with open_control(bridge, master.address) as control:
                await control.status()
                assert clients() == 1
            left = clients()
    finally:
        gc.enable()
    assert left == 0
