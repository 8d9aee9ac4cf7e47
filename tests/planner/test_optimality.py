"""Property tests on tiny instances (<= 5 groups, 2 instances): the exact formulation's
optimum equals a brute-force optimum over every assignment and order; every plan the planner
returns passes the independent validator."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlm_opt.planner.cpsat import solve
from qlm_opt.planner.fallback import fallback_plan
from qlm_opt.planner.problem import PlanGroup, PlanInstance, PlanningProblem
from qlm_opt.planner.plan import PlanStatus
from qlm_opt.planner.validator import validate_plan
from tests.planner.factories import WEIGHTS, brute_force_optimum, preset

MODELS = ("a", "b")


@st.composite
def tiny_instances(draw) -> PlanningProblem:
    instances = tuple(
        PlanInstance(
            id=i,
            gpu="gpu",
            current_model=draw(st.sampled_from((None, *MODELS))),
            busy_until_ms=draw(st.integers(0, 10)),
            can_swap=draw(st.booleans()) if i == 1 else True,  # instance 0 can always swap
        )
        for i in range(2)
    )
    groups = []
    for k in range(draw(st.integers(1, 5))):
        fits_1 = draw(st.booleans())
        service = {0: draw(st.integers(1, 20))}
        if fits_1:
            service[1] = draw(st.integers(1, 20))
        groups.append(
            PlanGroup(
                id=f"g{k}",
                model=draw(st.sampled_from(MODELS)),
                size=1,
                weight=draw(st.integers(0, 5)),
                deadline_ms=draw(st.integers(-5, 60)),
                service_ms=service,
            )
        )
    swap = {
        (a, b): draw(st.integers(0, 10)) for a in (None, *MODELS) for b in MODELS if a != b
    }
    return PlanningProblem(tuple(groups), instances, swap, weights=WEIGHTS)


FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


@FAST
@given(tiny_instances())
def test_exact_objective_equals_brute_force(pi: PlanningProblem):
    plan = solve(pi, preset(formulation="exact"))
    assert plan.status == PlanStatus.OPTIMAL
    report = validate_plan(pi, plan)
    assert report.ok, report.errors
    best = brute_force_optimum(pi)
    assert plan.objective == best
    assert plan.solver_objective == best  # the model's objective is the true one


@FAST
@given(tiny_instances())
def test_knapsack_and_fallback_are_valid_and_bounded(pi: PlanningProblem):
    best = brute_force_optimum(pi)
    for plan in (solve(pi, preset(formulation="knapsack")), fallback_plan(pi)):
        report = validate_plan(pi, plan)
        assert report.ok, report.errors
        assert plan.objective <= best
