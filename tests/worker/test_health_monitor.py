"""Guest health checks on a worker (procurator.worker.health): the monitor
with the real prober against real TCP and HTTP servers on loopback (where
the guest's address points), and with a hand-written prober where the
order of events is the point."""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from procurator.core.assignments import AssignmentChanges
from procurator.core.errors import ProcuratorError
from procurator.core.models import (
    Assignment,
    Health,
    HealthCheck,
    HealthKind,
    Phase,
    VmAssignment,
    VmStatus,
)
from procurator.core.status import StatusChanges
from procurator.worker.health import GuestProber, HealthMonitor

PATH = "/nix/store/" + "a" * 32 + "-web"
LOOPBACK = "127.0.0.1"


class Published:
    """What the monitor published, by VM: every entry, in order."""

    def __init__(self) -> None:
        self.entries: list[VmStatus] = []

    def __call__(self, changes: StatusChanges) -> None:
        assert not changes.removed
        self.entries.extend(changes.changed)

    def healths(self, vm_id: str) -> list[Health]:
        return [e.health for e in self.entries if e.id == vm_id]

    def last(self, vm_id: str) -> VmStatus:
        return [e for e in self.entries if e.id == vm_id][-1]

    async def wait(self, vm_id: str, health: Health) -> VmStatus:
        with trio.fail_after(20):
            while not any(e.id == vm_id for e in self.entries) or (
                self.last(vm_id).health is not health
            ):
                await trio.sleep(0.01)
        return self.last(vm_id)


async def serve(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[object]]
) -> tuple[int, Callable[[], None]]:
    """A TCP server on loopback, run in ``nursery`` (closed with it): its
    port, and what stops it (closes its socket: connections are refused)."""
    listeners = await trio.open_tcp_listeners(0, host=LOOPBACK)
    scope = trio.CancelScope()

    def stop() -> None:
        scope.cancel()
        for listener in listeners:
            listener.socket.close()

    async def run() -> None:
        try:
            with scope:
                await trio.serve_listeners(handler, listeners)
        finally:
            stop()

    nursery.start_soon(run)
    return listeners[0].socket.getsockname()[1], stop


async def close_at_once(stream: trio.SocketStream) -> None:
    await stream.aclose()


def running(vm_id: str = "web", restarts: int = 0, address: str = LOOPBACK) -> StatusChanges:
    status = VmStatus(vm_id, Phase.RUNNING, "h1", "running", restarts, address)
    return StatusChanges("host-a", 1, (status,))


def assigned(*vms: VmAssignment) -> Assignment:
    return Assignment("host-a", 1, vms, "op-1")


async def test_a_tcp_check_turns_healthy_then_unhealthy_and_a_restart_starts_again() -> None:
    published = Published()
    monitor = HealthMonitor("host-a", published, GuestProber(), interval=0.05)
    async with trio.open_nursery() as nursery:
        port, stop = await serve(nursery, close_at_once)
        await nursery.start(monitor.run)
        check = HealthCheck(HealthKind.TCP, port, min_healthy_ms=300, interval_ms=50)
        monitor.take_assignment(assigned(VmAssignment("web", "h1", PATH, health=check)))
        (shown,) = monitor.overlay(running()).changed
        assert shown.health is Health.PENDING and shown.message == "running"
        healthy = await published.wait("web", Health.HEALTHY)
        assert healthy.message == "running"
        assert Health.UNHEALTHY not in published.healths("web")
        assert monitor.counts()[Health.HEALTHY] == 1
        stop()
        unhealthy = await published.wait("web", Health.UNHEALTHY)
        assert unhealthy.message.startswith(f"tcp {LOOPBACK}:{port}: ")
        assert "refused" in unhealthy.message.lower()
        # Another boot of the guest is judged from the start.
        (shown,) = monitor.overlay(running(restarts=1)).changed
        assert shown.health is Health.PENDING and shown.message == "running"
        nursery.cancel_scope.cancel()
    assert monitor.checks > 2


async def test_an_http_check_wants_the_expected_status_and_an_answer_in_time() -> None:
    published = Published()
    monitor = HealthMonitor("host-a", published, GuestProber(), interval=0.05)
    # A guest that never answers, with a monitor of its own: a short timeout.
    impatient = HealthMonitor("host-a", published, GuestProber(), interval=0.05, timeout=0.2)
    answer = {"status": b"503 Service Unavailable"}
    requests: list[bytes] = []

    async def http(stream: trio.SocketStream) -> None:
        request = await stream.receive_some(4096)
        requests.append(request)
        await stream.send_all(b"HTTP/1.0 " + answer["status"] + b"\r\n\r\nbody")
        await stream.aclose()

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        port, _ = await serve(nursery, http)
        mute, _ = await serve(nursery, silent)
        await nursery.start(monitor.run)
        await nursery.start(impatient.run)
        check = HealthCheck(HealthKind.HTTP, port, "/healthz", 200, min_healthy_ms=0)
        hung = HealthCheck(HealthKind.HTTP, mute, "/", 200, min_healthy_ms=0)
        monitor.take_assignment(assigned(VmAssignment("web", "h1", PATH, health=check)))
        impatient.take_assignment(assigned(VmAssignment("hung", "h1", PATH, health=hung)))
        monitor.overlay(running())
        impatient.overlay(running("hung"))
        failing = await published.wait("web", Health.UNHEALTHY)
        assert failing.message == (f"http {LOOPBACK}:{port}/healthz: status 503, expected 200")
        assert requests[0].startswith(b"GET /healthz HTTP/1.0\r\n")
        answer["status"] = b"200 OK"
        await published.wait("web", Health.HEALTHY)
        timed_out = await published.wait("hung", Health.UNHEALTHY)
        assert timed_out.message == f"http {LOOPBACK}:{mute}: no answer within 0.2 s"
        nursery.cancel_scope.cancel()


async def test_a_changed_check_is_judged_afresh_and_no_check_is_unchecked() -> None:
    published = Published()
    monitor = HealthMonitor("host-a", published, GuestProber(), interval=0.05)
    async with trio.open_nursery() as nursery:
        port, _ = await serve(nursery, close_at_once)
        await nursery.start(monitor.run)
        running_only = HealthCheck(HealthKind.NONE, min_healthy_ms=0)
        monitor.take_assignment(assigned(VmAssignment("web", "h1", PATH, health=running_only)))
        monitor.overlay(running())
        await published.wait("web", Health.HEALTHY)
        tcp = HealthCheck(HealthKind.TCP, port, min_healthy_ms=60_000)
        changes = AssignmentChanges(
            "host-a", 1, 2, "op-2", (VmAssignment("web", "h1", PATH, health=tcp),)
        )
        monitor.take_assignment(changes)
        assert published.last("web").health is Health.PENDING
        monitor.take_assignment(
            AssignmentChanges("host-a", 2, 3, "op-3", (VmAssignment("web", "h1", PATH),))
        )
        assert published.last("web").health is Health.UNCHECKED
        assert monitor.counts() == {
            Health.UNCHECKED: 1,
            Health.PENDING: 0,
            Health.HEALTHY: 0,
            Health.UNHEALTHY: 0,
        }
        # A guest that stops running is not checked either.
        monitor.take_assignment(changes)
        stopped = VmStatus("web", Phase.STOPPED, "h1", address=LOOPBACK)
        (shown,) = monitor.overlay(StatusChanges("host-a", 2, (stopped,))).changed
        assert shown.health is Health.UNCHECKED
        nursery.cancel_scope.cancel()


class HeldProber:
    """A prober whose checks end when the test says, with what it says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, trio.Event]] = []
        self.answers: list[str | None] = []

    async def probe(self, check: HealthCheck, address: str) -> str | None:
        done = trio.Event()
        self.calls.append((address, done))
        await done.wait()
        return self.answers.pop(0)


async def test_a_result_about_an_earlier_guest_is_dropped() -> None:
    published = Published()
    prober = HeldProber()
    monitor = HealthMonitor("host-a", published, prober, interval=30)
    check = HealthCheck(HealthKind.TCP, 80, min_healthy_ms=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        monitor.take_assignment(assigned(VmAssignment("web", "h1", PATH, health=check)))
        monitor.overlay(running(address="10.0.0.2"))
        with trio.fail_after(10):
            while not prober.calls:
                await trio.sleep(0.01)
        # The guest restarts while its check is in flight; the check fails.
        monitor.overlay(running(restarts=1, address="10.0.0.2"))
        prober.answers.append("tcp 10.0.0.2:80: refused")
        prober.calls[0][1].set()
        # The failure was the earlier guest's: the new one is checked at once.
        with trio.fail_after(10):
            while len(prober.calls) < 2:
                await trio.sleep(0.01)
        assert Health.UNHEALTHY not in published.healths("web")
        prober.answers.append(None)
        prober.calls[1][1].set()
        await published.wait("web", Health.HEALTHY)
        nursery.cancel_scope.cancel()


class AtOnceProber:
    """Every check passes at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def probe(self, check: HealthCheck, address: str) -> str | None:
        self.calls += 1
        await trio.lowlevel.checkpoint()
        return None


def stopping(restarts: int) -> StatusChanges:
    status = VmStatus("web", Phase.STOPPING, "h1", "replacing", restarts, LOOPBACK)
    return StatusChanges("host-a", 1, (status,))


async def test_a_guest_gone_before_its_due_check_starts_takes_nothing_down() -> None:
    # A check comes due and its task is started; before the task first runs,
    # the guest goes (the VM stops for a replacement). The task checks the
    # guest it was started for and its result is dropped: it once asserted
    # that the VM still had a guest, and that took the whole worker down
    # mid-rollout (CI). Whether the stop lands between the start and the
    # task's first step depends on trio's order within a batch (random), so
    # the sequence runs many times.
    published = Published()
    prober = AtOnceProber()
    monitor = HealthMonitor("host-a", published, prober, interval=30)
    check = HealthCheck(HealthKind.TCP, 80, min_healthy_ms=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        monitor.take_assignment(assigned(VmAssignment("web", "h1", PATH, health=check)))
        for restarts in range(40):
            monitor.overlay(running(restarts=restarts))  # due now: the loop wakes
            await trio.lowlevel.checkpoint()
            monitor.overlay(stopping(restarts))
            await trio.sleep(0.001)
        monitor.overlay(running(restarts=99))
        await published.wait("web", Health.HEALTHY)
        nursery.cancel_scope.cancel()


def kept_ids(path: Path) -> set[str]:
    """The VMs the state file keeps as healthy."""
    return set(json.loads(path.read_text())["healthy"]) if path.exists() else set()


async def test_a_healthy_guest_stays_healthy_across_a_worker_restart(tmp_path: Path) -> None:
    kept = tmp_path / "health.json"
    async with trio.open_nursery() as nursery:
        port, stop = await serve(nursery, close_at_once)
        check = HealthCheck(HealthKind.TCP, port, min_healthy_ms=100, interval_ms=50)
        vms = assigned(
            VmAssignment("web", "h1", PATH, health=check),
            VmAssignment("db", "h1", PATH, health=check),
        )
        published = Published()
        first = HealthMonitor("host-a", published, GuestProber(), state_file=kept)
        async with trio.open_nursery() as worker:
            await worker.start(first.run)
            first.take_assignment(vms)
            first.overlay(running("web"))
            first.overlay(running("db"))
            await published.wait("web", Health.HEALTHY)
            await published.wait("db", Health.HEALTHY)
            with trio.fail_after(20):
                while kept_ids(kept) != {"web", "db"}:
                    await trio.sleep(0.01)
            worker.cancel_scope.cancel()

        # The next worker: its reconciler reports the re-adopted VMs first,
        # then the assignment comes. The same guest is healthy at once; a
        # guest that restarted meanwhile is judged from the start.
        published = Published()
        second = HealthMonitor("host-a", published, GuestProber(), state_file=kept)
        async with trio.open_nursery() as worker:
            await worker.start(second.run)
            second.overlay(running("web"))
            second.overlay(running("db", restarts=1))
            second.take_assignment(vms)
            assert published.last("web").health is Health.HEALTHY
            assert published.last("db").health is Health.PENDING
            # Healthy as ever: one failure and it is not.
            stop()
            await published.wait("web", Health.UNHEALTHY)
            with trio.fail_after(20):
                while "web" in kept_ids(kept):
                    await trio.sleep(0.01)
            worker.cancel_scope.cancel()
        nursery.cancel_scope.cancel()


async def test_checks_of_a_whole_assignment_go_out_as_one_report() -> None:
    reports: list[StatusChanges] = []
    monitor = HealthMonitor("host-a", reports.append, HeldProber())
    ids = [f"vm-{i}" for i in range(50)]
    for vm_id in ids:
        monitor.overlay(running(vm_id))
    check = HealthCheck(HealthKind.TCP, 80)
    monitor.take_assignment(assigned(*(VmAssignment(i, "h1", PATH, health=check) for i in ids)))
    (report,) = reports
    assert [entry.id for entry in report.changed] == ids
    assert {entry.health for entry in report.changed} == {Health.PENDING}


async def test_a_check_that_cannot_make_its_socket_fails_and_nothing_else() -> None:
    def closed() -> socket.socket:
        raise ProcuratorError("the network manager is closed")

    prober = GuestProber(closed, in_thread=True)
    problem = await prober.probe(HealthCheck(HealthKind.TCP, 80), "10.0.0.2")
    assert problem == "tcp 10.0.0.2:80: the network manager is closed"


async def test_an_http_path_goes_into_the_request_line_quoted() -> None:
    requests: list[bytes] = []

    async def http(stream: trio.SocketStream) -> None:
        requests.append(await stream.receive_some(4096))
        await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        port, _ = await serve(nursery, http)
        check = HealthCheck(HealthKind.HTTP, port, "/caf\u00e9 x?a=1", 200)
        assert await GuestProber().probe(check, LOOPBACK) is None
        assert requests[0].startswith(b"GET /caf%C3%A9%20x?a=1 HTTP/1.0\r\n")
        nursery.cancel_scope.cancel()


class BreakingProber:
    """Passes every check, except that a check of an address in ``broken``
    raises what no prober should (a bug)."""

    def __init__(self) -> None:
        self.broken: set[str] = set()
        self.calls: dict[str, int] = {}

    async def probe(self, check: HealthCheck, address: str) -> str | None:
        self.calls[address] = self.calls.get(address, 0) + 1
        await trio.lowlevel.checkpoint()
        if address in self.broken:
            raise RuntimeError("a bug in a prober")
        return None


async def test_a_check_that_breaks_costs_its_vm_its_judgement_and_nothing_else(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # An exception escaping a check task once took the monitor's nursery,
    # and the whole worker with it, down mid-rollout (3bc14d4). Whatever a
    # check raises is now its VM's problem alone: logged with its id,
    # counted, the VM not known to be healthy until a check works again.
    published = Published()
    prober = BreakingProber()
    errors: list[None] = []
    monitor = HealthMonitor(
        "host-a", published, prober, interval=0.02, on_error=lambda: errors.append(None)
    )
    check = HealthCheck(HealthKind.TCP, 80, min_healthy_ms=0)
    web, other = "10.0.0.2", "10.0.0.3"
    async with trio.open_nursery() as nursery:
        await nursery.start(monitor.run)
        monitor.take_assignment(
            assigned(
                VmAssignment("web", "h1", PATH, health=check),
                VmAssignment("other", "h1", PATH, health=check),
            )
        )
        monitor.overlay(running("web", address=web))
        monitor.overlay(running("other", address=other))
        await published.wait("web", Health.HEALTHY)
        await published.wait("other", Health.HEALTHY)
        prober.broken.add(web)
        shown = await published.wait("web", Health.PENDING)
        assert "the check broke" in shown.message and "a bug in a prober" in shown.message
        assert monitor.counts()[Health.HEALTHY] == 1
        # The monitor goes on: the other VM is still checked, the broken
        # one again and again (each time counted), and stays not healthy.
        checked = prober.calls[other]
        with trio.fail_after(20):
            while prober.calls[other] < checked + 3 or len(errors) < 3:
                await trio.sleep(0.01)
        assert monitor.errors == len(errors)
        assert published.last("web").health is Health.PENDING
        assert published.last("other").health is Health.HEALTHY
        # Once its checks work again, the VM is judged as always.
        prober.broken.clear()
        healthy = await published.wait("web", Health.HEALTHY)
        assert healthy.message == "running"
        nursery.cancel_scope.cancel()
    broke = [r for r in caplog.records if "health check broke" in r.getMessage()]
    assert broke and all("VM web:" in r.getMessage() for r in broke)
    assert broke[0].levelname == "ERROR" and broke[0].exc_info is not None
