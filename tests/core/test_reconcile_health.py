"""A VM's health check is no part of its identity: an assignment entry
whose only change is its check is updated in place, never replaced
(procurator.core.reconcile; the worker's checker takes the new check)."""

from __future__ import annotations

from dataclasses import replace

import trio
from test_reconcile import FakeActuator, _settle, _start, running, vm

from procurator.core.assignments import AssignmentChanges
from procurator.core.models import Assignment, HealthCheck, HealthKind
from procurator.core.reconcile import plan

TCP = HealthCheck(HealthKind.TCP, 22)
HTTP = HealthCheck(HealthKind.HTTP, 80, "/healthz", min_healthy_ms=0)


def test_a_changed_check_plans_nothing() -> None:
    web = vm("web")
    for before, after in ((None, TCP), (TCP, HTTP), (HTTP, None)):
        assert (
            plan({"web": replace(web, health=after)}, {"web": running(replace(web, health=before))})
            == []
        )


async def test_a_changed_check_is_taken_in_place() -> None:
    actuator = FakeActuator()
    async with trio.open_nursery() as nursery:
        reconciler, reports = await _start(actuator, nursery)
        web = replace(vm("web"), health=TCP)
        reconciler.set_assignment(Assignment("w", 1, (web,), op_id="op-1"))
        await _settle()
        assert actuator.calls == [("ensure", "web")]
        before = reports[-1]
        for generation, check in ((2, HTTP), (3, None)):
            changes = AssignmentChanges(
                "w", generation - 1, generation, f"op-{generation}", (replace(web, health=check),)
            )
            assert reconciler.apply_changes(changes)
            await _settle()
            assert reconciler.assignment is not None
            assert reconciler.assignment.vms[0].health == check
        assert actuator.calls == [("ensure", "web")]  # not replaced, not touched
        assert reports[-1].observed_generation == 3
        assert reports[-1].vms == before.vms
        nursery.cancel_scope.cancel()
