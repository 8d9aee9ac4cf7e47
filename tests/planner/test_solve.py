"""The planner entry point: warm start, fallback, group cap, formulations, snapshots."""

from __future__ import annotations

import pytest

from qlm_opt.planner import cpsat
from qlm_opt.planner.cpsat import choose_formulation, solve
from qlm_opt.planner.fallback import fallback_plan
from qlm_opt.planner.problem import PlanningProblem
from qlm_opt.planner.plan import PlanStatus
from qlm_opt.planner.synthetic import random_instance
from qlm_opt.planner.validator import validate_plan
from tests.planner.factories import WEIGHTS, group, inst, planning, preset


@pytest.fixture(scope="module")
def medium() -> PlanningProblem:
    return random_instance(40, 6, seed=3)


def test_zero_time_limit_returns_fallback(medium):
    pre = preset(time_limit_s=0.0, formulation="knapsack")
    plan = solve(medium, pre)
    medium = medium.with_weights(pre.weights)
    assert plan.status == PlanStatus.FALLBACK
    assert plan.formulation == "fallback"
    assert plan.objective == fallback_plan(medium).objective
    assert validate_plan(medium, plan).ok


def test_unknown_status_returns_fallback(medium, monkeypatch):
    def no_answer(model, pre, build_s=0.0):
        return cpsat._Result()  # status UNKNOWN, as when the limit hits before a solution

    monkeypatch.setattr(cpsat, "_run_cpsat", no_answer)
    plan = solve(medium, preset(formulation="knapsack"))
    assert plan.status == PlanStatus.FALLBACK
    assert validate_plan(medium.with_weights(WEIGHTS), plan).ok


def test_hint_is_used_exact():
    pi = planning(
        [group("g0", "a", deadline_ms=15), group("g1", "b", deadline_ms=40),
         group("g2", "a", deadline_ms=30)],
        [inst(0, "a"), inst(1, "b")],
    )
    first = solve(pi, preset())
    again = solve(pi, preset(), hint=first)
    # CP-SAT tags a first solution that came from a complete, feasible hint "[hint]".
    assert again.hint_objective == first.solver_objective
    assert again.objective == first.objective


def test_hint_is_used_knapsack(medium):
    pre = preset(formulation="knapsack", num_workers=1)
    first = solve(medium, pre)
    again = solve(medium, pre, hint=first)
    assert again.hint_objective is not None  # first solution tagged "[hint]"
    assert again.objective >= first.objective


def test_stale_hint_is_repaired():
    pi = planning([group("g0"), group("g1")], [inst(0), inst(1)])
    old = solve(pi, preset())
    smaller = planning([group("g1"), group("g9")], [inst(0), inst(1)])
    plan = solve(smaller, preset(), hint=old)
    assert validate_plan(smaller, plan).ok


def test_group_cap_plans_the_rest_greedily(medium):
    plan = solve(medium, preset(formulation="knapsack", max_groups=10))
    assert len(plan.timings) == len(medium.groups)
    assert validate_plan(medium.with_weights(WEIGHTS), plan).ok


def test_empty_instance():
    pi = planning([], [inst(0)])  # nothing queued
    plan = solve(pi, preset())
    assert plan.status == PlanStatus.EMPTY and plan.timings == {}


def test_preset_weights_win():
    pi = planning([group("g0", service={0: 10})], [inst(0)])
    plan = solve(pi, preset())
    assert plan.objective == 1000 * 10 * 1 - 10  # on time, ends at 10 ms


def test_choose_formulation():
    pi = planning([group(f"g{k}", service={0: 10}) for k in range(5)], [inst(0)])
    assert choose_formulation(pi, preset(formulation="auto", exact_max_groups=5)) == "exact"
    assert choose_formulation(pi, preset(formulation="auto", exact_max_groups=4)) == "knapsack"
    assert choose_formulation(pi, preset(formulation="knapsack")) == "knapsack"


def test_exact_prefers_on_time_over_swaps():
    # One "b" group can only be on time if instance 0 swaps; it is worth it.
    pi = planning([group("g0", "b", {0: 10, 1: 10}, deadline_ms=20)],
                  [inst(0, "a"), inst(1, "a", busy_until_ms=50)], swap_ms=5)
    plan = solve(pi, preset())
    assert plan.timings["g0"].instance_id == 0 and plan.timings["g0"].on_time
    assert plan.instances[0].final_model == "b" and plan.num_swaps == 1


def test_snapshot_json_roundtrip(medium):
    again = PlanningProblem.from_json(medium.to_json())
    assert again == medium


def test_same_weights_are_not_copied(medium):
    assert medium.with_weights(medium.weights) is medium
    other = medium.with_weights(WEIGHTS)
    assert other is not medium and other.weights == WEIGHTS and other.groups == medium.groups


def test_models_skip_the_pre_pep8_aliases(medium):
    # OR-Tools adds camelCase aliases to every CpModel (~0.7 ms); the planner's models skip
    # them and use only the snake_case API.
    km = cpsat.KnapsackModel(medium.with_weights(WEIGHTS), preset(formulation="knapsack"))
    assert not hasattr(km.model, "NewBoolVar") and hasattr(km.model, "new_bool_var")


def test_live_search_limit_is_the_budget_less_the_build():
    pre = preset(time_limit_s=0.1)
    assert cpsat.search_limit_s(pre, 0.03) == pytest.approx(0.07)
    # a build slower than the budget still leaves the search a tenth of it
    assert cpsat.search_limit_s(pre, 0.5) == pytest.approx(0.01)


def test_what_if_search_is_the_budget_times_the_deterministic_rate():
    """What-if runs limit CP-SAT in deterministic time: budget x rate (``SolverPreset.
    deterministic_rate``). This epoch is too hard to prove in either limit, so the search
    runs to the limit (CP-SAT checks it between steps: a few % over)."""
    pi = random_instance(256, 6, seed=3)
    reached = {}
    for rate in (0.1, 0.3):
        pre = preset(formulation="knapsack", time_limit_s=0.1, deterministic=True,
                     deterministic_rate=rate)
        reached[rate] = solve(pi, pre).search_det_s
    assert 0.007 < reached[0.1] < 0.013
    assert 0.025 < reached[0.3] < 0.04
