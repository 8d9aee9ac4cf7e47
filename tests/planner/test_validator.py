"""The independent checker catches each kind of broken plan."""

from __future__ import annotations

import dataclasses

import pytest

from qlm_opt.planner.fallback import fallback_plan
from qlm_opt.planner.plan import InstancePlan, PlanStatus, plan_from_sequences
from qlm_opt.planner.validator import validate_plan
from tests.planner.factories import group, inst, planning


@pytest.fixture
def pi():
    return planning(
        [group("g0", "a", deadline_ms=15), group("g1", "b", {0: 10}, deadline_ms=40),
         group("g2", "a", deadline_ms=30)],
        [inst(0, "a"), inst(1, "a", can_swap=False)],
    )


def _plan(pi, seqs):
    return plan_from_sequences(pi, seqs, PlanStatus.FEASIBLE, "test")


def test_good_plan_passes(pi):
    report = validate_plan(pi, _plan(pi, {0: ["g0", "g1"], 1: ["g2"]}))
    assert report.ok, report.errors
    assert validate_plan(pi, fallback_plan(pi)).ok


def test_missing_and_duplicate_groups(pi):
    plan = _plan(pi, {0: ["g0", "g1"], 1: ["g2"]})
    dropped = plan.replace(
        instances=(plan.instances[0], dataclasses.replace(plan.instances[1], group_ids=()))
    )
    assert any("g2 is not placed" in e for e in validate_plan(pi, dropped).errors)
    doubled = plan.replace(
        instances=(plan.instances[0], dataclasses.replace(plan.instances[1], group_ids=("g2", "g0")))
    )
    assert any("placed on" in e for e in validate_plan(pi, doubled).errors)


def test_model_does_not_fit(pi):
    plan = _plan(pi, {0: ["g0", "g2"], 1: []})
    bad = plan.replace(instances=(
        dataclasses.replace(plan.instances[0], group_ids=("g0", "g2")),
        InstancePlan(1, ("g1",), "a", "b", 1),
    ))
    errors = validate_plan(pi, bad).errors
    assert any("does not fit" in e for e in errors)


def test_swap_on_pinned_instance():
    pi2 = planning([group("g1", "b")], [inst(0, "a"), inst(1, "a", can_swap=False)])
    plan = _plan(pi2, {1: ["g1"]})
    assert any("pinned" in e for e in validate_plan(pi2, plan).errors)


def test_overlap_and_swap_time(pi):
    plan = _plan(pi, {0: ["g0", "g1"], 1: ["g2"]})
    t = plan.timings["g1"]  # a -> b swap of 5 ms after g0 ends at 10
    assert t.start_ms == 15
    for start in (10, 12):  # no swap time / overlapping the swap
        moved = dict(plan.timings)
        moved["g1"] = dataclasses.replace(t, start_ms=start, end_ms=start + 10)
        errors = validate_plan(pi, plan.replace(timings=moved)).errors
        assert any("before the instance is free" in e for e in errors)
    moved = dict(plan.timings)
    moved["g1"] = dataclasses.replace(t, start_ms=5, end_ms=15)  # overlaps g0
    assert not validate_plan(pi, plan.replace(timings=moved)).ok


def test_wrong_duration_flag_and_objective(pi):
    plan = _plan(pi, {0: ["g0", "g1"], 1: ["g2"]})
    t = plan.timings["g0"]
    short = dict(plan.timings)
    short["g0"] = dataclasses.replace(t, end_ms=t.end_ms - 1)
    assert any("start + service" in e for e in validate_plan(pi, plan.replace(timings=short)).errors)
    flag = dict(plan.timings)
    flag["g0"] = dataclasses.replace(t, on_time=not t.on_time)
    assert any("on_time" in e for e in validate_plan(pi, plan.replace(timings=flag)).errors)
    assert any("objective" in e for e in validate_plan(pi, plan.replace(objective=plan.objective + 1)).errors)


def test_swap_count_and_final_model(pi):
    plan = _plan(pi, {0: ["g0", "g1"], 1: ["g2"]})
    ip = plan.instances[0]
    bad = plan.replace(instances=(dataclasses.replace(ip, num_swaps=0, final_model="a"),
                                  plan.instances[1]))
    errors = validate_plan(pi, bad).errors
    assert any("num_swaps" in e for e in errors) and any("final_model" in e for e in errors)
