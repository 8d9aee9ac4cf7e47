"""A feasible and an infeasible case per constraint of the exact (circuit) formulation.

Each test builds the model, pins a few variables the way a plan would, and checks that CP-SAT
accepts (or rejects) it.
"""

from __future__ import annotations

from ortools.sat.python import cp_model

from qlm_opt.planner.cpsat import ExactModel
from tests.planner.factories import group, inst, planning


def _status(model: ExactModel) -> int:
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = 10
    return solver.solve(model.model)


FEASIBLE = (cp_model.OPTIMAL, cp_model.FEASIBLE)


def test_fit_only_where_the_model_fits():
    pi = planning([group("g0", service={0: 10})], [inst(0), inst(1)])
    em = ExactModel(pi)
    assert (0, 0) in em.assign and (0, 1) not in em.assign
    assert _status(em) in FEASIBLE


def test_each_group_exactly_once():
    pi = planning([group("g0")], [inst(0), inst(1)])
    em = ExactModel(pi)
    em.model.add(em.assign[0, 0] == 1)
    assert _status(em) in FEASIBLE
    em.model.add(em.assign[0, 1] == 1)
    assert _status(em) == cp_model.INFEASIBLE


def test_no_overlap_on_one_instance():
    pi = planning([group("g0"), group("g1")], [inst(0), inst(1)])
    em = ExactModel(pi)
    for k in (0, 1):
        em.model.add(em.assign[k, 0] == 1)
    em.model.add(em.start[1] == em.end[0])  # back to back: fine
    assert _status(em) in FEASIBLE
    em2 = ExactModel(pi)
    for k in (0, 1):
        em2.model.add(em2.assign[k, 0] == 1)
    em2.model.add(em2.start[1] == em2.start[0] + 5)  # overlaps by 5 ms
    assert _status(em2) == cp_model.INFEASIBLE


def test_busy_until_and_swap_time_from_current_state():
    # Instance 0 holds "a", busy until 7; a "b" group needs a 5 ms swap first.
    pi = planning([group("g0", model="b", service={0: 10})], [inst(0, "a", busy_until_ms=7)])
    em = ExactModel(pi)
    em.model.add(em.start[0] == 12)
    assert _status(em) in FEASIBLE
    em2 = ExactModel(pi)
    em2.model.add(em2.start[0] == 11)
    assert _status(em2) == cp_model.INFEASIBLE


def test_sequence_dependent_swap_between_groups():
    groups = [group("g0", "a", {0: 10}), group("g1", "b", {0: 10})]
    pi = planning(groups, [inst(0, "a")], swap_ms=4)
    em = ExactModel(pi)
    em.model.add(em.start[1] == em.end[0] + 4)
    assert _status(em) in FEASIBLE
    em2 = ExactModel(pi)
    em2.model.add(em2.start[1] == em2.end[0] + 3)
    assert _status(em2) == cp_model.INFEASIBLE


def test_soft_deadline():
    # Cannot finish by 5 ms: fine as long as it may be late, infeasible if forced on time.
    pi = planning([group("g0", service={0: 10}, deadline_ms=5)], [inst(0)])
    em = ExactModel(pi)
    assert _status(em) in FEASIBLE
    em.model.add(em.late[0] == 0)
    assert _status(em) == cp_model.INFEASIBLE


def test_pinned_instance_never_swaps():
    pi = planning([group("g0", "b")], [inst(0, "a", can_swap=False), inst(1, "a")])
    em = ExactModel(pi)
    assert (0, 0) not in em.assign and (0, 1) in em.assign


def test_allowed_models():
    pi = planning([group("g0", "b")], [inst(0, "a", allowed=frozenset({"a"})), inst(1, "a")])
    em = ExactModel(pi)
    assert (0, 0) not in em.assign and (0, 1) in em.assign


def test_variables_are_named_after_indices():
    pi = planning([group("g0")], [inst(0), inst(1)])
    em = ExactModel(pi)
    assert em.assign[0, 1].name == "assign[g0,i1]"
