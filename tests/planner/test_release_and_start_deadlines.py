"""Forecast groups' release times and time-to-first-token (start) deadlines, in both
formulations and in the independent checker."""

from __future__ import annotations

import pytest

from qlm_opt.planner import PlanGroup
from qlm_opt.planner.cpsat import solve
from qlm_opt.planner.plan import PlanStatus
from qlm_opt.planner.validator import validate_plan
from tests.planner.factories import inst, planning, preset


def _g(gid, service, deadline_ms, release_ms=0, start_deadline_ms=None, weight=1):
    return PlanGroup(gid, "a", 1, weight, deadline_ms, service, release_ms,
                     start_deadline_ms)


@pytest.mark.parametrize("formulation", ["exact", "knapsack"])
def test_a_group_starts_no_earlier_than_its_release(formulation):
    # released at 5 s, far beyond the instance's work: the plan must wait for it
    pi = planning([_g("f", {0: 100}, 6000, release_ms=5000), _g("q", {0: 100}, 200)],
                  [inst(0)])
    plan = solve(pi, preset(formulation=formulation))
    assert plan.status in (PlanStatus.OPTIMAL, PlanStatus.FEASIBLE)
    assert validate_plan(pi.with_weights(preset().weights), plan).ok
    assert plan.timings["f"].start_ms >= 5000
    assert plan.timings["f"].on_time and plan.timings["q"].on_time


@pytest.mark.parametrize("formulation", ["exact", "knapsack"])
def test_start_deadline_differs_per_instance(formulation):
    # must start by 50 ms: instance 0 is busy until 60 ms (late there whatever its speed),
    # instance 1 is free but slow (800 ms of service): with a TTFT deadline it is on time
    # there; an end deadline of 300 ms would make it late everywhere
    ttft = _g("g", {0: 100, 1: 800}, 150, start_deadline_ms=50)
    pi = planning([ttft], [inst(0, busy_until_ms=60), inst(1)])
    plan = solve(pi, preset(formulation=formulation))
    assert plan.timings["g"].instance_id == 1 and plan.timings["g"].on_time
    end_only = planning([_g("g", {0: 100, 1: 800}, 300)],
                        [inst(0, busy_until_ms=60), inst(1)])
    plan2 = solve(end_only, preset(formulation=formulation))
    assert plan2.timings["g"].instance_id == 0  # ends at 160 ms: on time on instance 0 only


def test_checker_rejects_a_start_before_release():
    pi = planning([_g("f", {0: 100}, 6000, release_ms=5000)], [inst(0)])
    plan = solve(pi, preset(formulation="exact"))
    from qlm_opt.planner.plan import GroupTiming

    bad = plan.replace(timings={"f": GroupTiming("f", 0, 0, 100, True)})
    report = validate_plan(pi.with_weights(preset().weights), bad)
    assert not report.ok and any("release" in e for e in report.errors)
