"""The fence through the worker's link (procurator.worker.link) and its
reconciler: a fake master (our ``MasterDialer`` port) that goes away,
hangs, and comes back, on trio's MockClock. The VMs are an in-memory
actuator's."""

from __future__ import annotations

import random
from collections.abc import Sequence

import trio
import trio.testing
from fencehelpers import Actuator

from procurator.core.assignments import AssignmentUpdate
from procurator.core.errors import PermanentError, UnavailableError
from procurator.core.fence import fence_message
from procurator.core.metrics import MetricSample
from procurator.core.models import (
    Assignment,
    EventKind,
    PowerState,
    VmAssignment,
    VmEvent,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.reconcile import Reconciler
from procurator.core.status import StatusChanges
from procurator.worker.link import LinkSettings, MasterLink, OnAssignment

PATH = "/nix/store/" + "a" * 32 + "-web"
FENCE_AFTER = 12.0
SETTINGS = LinkSettings(
    resync_interval=30,
    call_timeout=5,
    backoff_initial=1,
    backoff_max=2,
    jitter=0.0,
    fence_after=FENCE_AFTER,
)
R = VmAssignment("r", "h1", PATH, reschedule=True)  # on_worker_lost = "reschedule"
W = VmAssignment("w", "h1", PATH)  # "wait"


class Session:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.gone = trio.Event()

    @property
    def connected(self) -> bool:
        return not self.gone.is_set()

    async def wait_disconnected(self) -> None:
        await self.gone.wait()

    async def _answer(self) -> None:
        if self.gone.is_set():
            raise UnavailableError("connection lost")
        await self.master.answering.wait()  # a frozen master never answers

    async def get_assignment(self, known_generation: int) -> Assignment | None:
        await self._answer()
        await self.master.serving_assignments.wait()
        self.master.pulls.append(known_generation)
        current = self.master.assignment
        return None if current.generation == known_generation else current

    async def report_status(self, status: WorkerStatus) -> None:
        await self._answer()

    async def report_status_changes(self, changes: StatusChanges) -> None:
        await self._answer()

    async def report_metrics(self, samples: Sequence[MetricSample], *, call_timeout: float) -> None:
        await self._answer()

    async def report_events(self, events: Sequence[VmEvent]) -> None:
        await self._answer()
        self.master.events.extend(events)

    async def report_status_and_events(
        self, changes: StatusChanges, events: Sequence[VmEvent]
    ) -> PermanentError | None:
        await self._answer()
        self.master.events.extend(events)
        return None

    async def aclose(self) -> None:
        self.gone.set()


class Master:
    """Up or down (refuses connections, drops sessions); answering or
    frozen (connections stay, calls hang)."""

    def __init__(self, assignment: Assignment) -> None:
        self.assignment = assignment
        self.up = True
        self.answering = trio.Event()
        self.answering.set()
        self.serving_assignments = trio.Event()  # cleared: pulls hang, the rest works
        self.serving_assignments.set()
        self.sessions: list[Session] = []
        self.pulls: list[int] = []
        self.events: list[VmEvent] = []

    async def connect(self, info: WorkerInfo, on_push: OnAssignment) -> Session:
        if not self.up:
            raise UnavailableError("connection refused")
        await self.answering.wait()
        session = Session(self)
        self.sessions.append(session)
        return session

    def go_away(self) -> None:
        self.up = False
        for session in self.sessions:
            session.gone.set()

    def freeze(self) -> None:
        self.answering = trio.Event()


class Worker:
    """A link delivering to a reconciler, as ``ReconcilingHandler`` wires
    them; records what the handler was told, in order."""

    def __init__(self, master: Master) -> None:
        self.actuator = Actuator()
        self.told: list[str] = []
        self.link = MasterLink(
            master,
            WorkerInfo("host-a"),
            self.on_assignment,
            settings=SETTINGS,
            rng=random.Random(1),
            on_fence=self.on_fence,
        )
        self.reconciler = Reconciler(
            actuator=self.actuator,
            on_status=self.link.publish_status_changes,
            worker_id="host-a",
            on_event=lambda event: self.link.publish_events([event]),
        )

    async def on_assignment(self, update: AssignmentUpdate) -> bool:
        assert isinstance(update, Assignment)
        self.told.append(f"assignment {update.generation}")
        self.reconciler.set_assignment(update)
        return True

    async def on_fence(self, fenced: bool, silent_for: float) -> None:
        self.told.append(f"fence {silent_for:g}" if fenced else "unfence")
        if fenced:
            self.reconciler.fence(fence_message(silent_for))
        else:
            self.reconciler.unfence()

    async def start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self.reconciler.run)
        await nursery.start(self.link.run)


RUNNING_BOTH = {"r": PowerState.RUNNING, "w": PowerState.RUNNING}


async def test_a_worker_without_a_master_pauses_reschedule_vms_then_takes_the_new_assignment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = Master(Assignment("host-a", 2, (R, W), "op-1"))
    worker = Worker(master)
    async with trio.open_nursery() as nursery:
        await worker.start(nursery)
        await worker.link.wait_connected()
        await trio.sleep(1)
        assert worker.actuator.powers() == RUNNING_BOTH
        # A healthy, idle link (resync every 30 s) never fences: the link
        # hears from its master four times per fence delay.
        await trio.sleep(100)
        assert worker.link.fences == 0 and not worker.link.fenced

        lost_at = trio.current_time()
        master.go_away()
        await trio.sleep_until(lost_at + FENCE_AFTER - 4)
        assert worker.actuator.powers() == RUNNING_BOTH
        await trio.sleep_until(lost_at + FENCE_AFTER + 1)
        assert worker.link.fenced
        assert worker.actuator.powers() == {"r": PowerState.PAUSED, "w": PowerState.RUNNING}

        # The master healed meanwhile: r runs elsewhere now. It comes back
        # answering registrations and reports but not (yet) the pull of
        # the assignment: r stays paused however long that takes.
        master.assignment = Assignment("host-a", 3, (W,), "op-heal")
        master.serving_assignments = trio.Event()
        master.up = True
        await trio.sleep(60)
        assert len(master.sessions) > 1  # it did answer
        assert worker.link.fenced
        assert worker.actuator.powers() == {"r": PowerState.PAUSED, "w": PowerState.RUNNING}

        master.serving_assignments.set()
        await trio.sleep(5)
        assert not worker.link.fenced
        assert worker.actuator.powers() == {"w": PowerState.RUNNING}
        assert worker.told[-3:] == [f"fence {FENCE_AFTER:g}", "assignment 3", "unfence"]
        # The event saying why reached the master once it was back.
        fenced = [e for e in master.events if e.kind is EventKind.PAUSED]
        assert [e.vm_id for e in fenced] == ["r"]
        assert f"no master for {FENCE_AFTER:.0f} s" in fenced[0].message
        nursery.cancel_scope.cancel()


async def test_a_vm_still_assigned_resumes_only_after_the_whole_assignment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = Master(Assignment("host-a", 2, (R, W), "op-1"))
    worker = Worker(master)
    async with trio.open_nursery() as nursery:
        await worker.start(nursery)
        await worker.link.wait_connected()
        await trio.sleep(1)
        # A frozen master: the connection stays, every call hangs (SIGSTOP).
        master.freeze()
        await trio.sleep(FENCE_AFTER + 1)
        assert worker.link.fenced
        assert worker.actuator.powers() == {"r": PowerState.PAUSED, "w": PowerState.RUNNING}
        pulls = len(master.pulls)

        # It thaws with the same generation (nothing was healed): the link
        # asks for the whole assignment (known generation 0), and only
        # then does r run again.
        master.answering.set()
        await trio.sleep(5)
        assert master.pulls[pulls] == 0
        assert worker.told[-3:] == [f"fence {FENCE_AFTER:g}", "assignment 2", "unfence"]
        assert worker.actuator.powers() == RUNNING_BOTH
        assert not worker.link.fenced
        nursery.cancel_scope.cancel()


async def test_a_worker_that_starts_without_a_master_fences_what_it_is_given_later(
    autojump_clock: trio.testing.MockClock,
) -> None:
    master = Master(Assignment("host-a", 2, (R, W), "op-1"))
    master.up = False
    worker = Worker(master)
    async with trio.open_nursery() as nursery:
        await worker.start(nursery)
        await trio.sleep(FENCE_AFTER + 1)
        assert worker.link.fenced and worker.told == [f"fence {FENCE_AFTER + 0:g}"]
        master.up = True
        await trio.sleep(5)
        assert worker.told == [f"fence {FENCE_AFTER:g}", "assignment 2", "unfence"]
        assert worker.actuator.powers() == RUNNING_BOTH
        nursery.cancel_scope.cancel()
