"""A feasible and an infeasible case per constraint of the EDF-knapsack formulation."""

from __future__ import annotations

from ortools.sat.python import cp_model

from qlm_opt.planner.cpsat import KnapsackModel, deadline_levels
from tests.planner.factories import group, inst, planning, preset

import numpy as np

FEASIBLE = (cp_model.OPTIMAL, cp_model.FEASIBLE)


def _status(km: KnapsackModel) -> int:
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.max_time_in_seconds = 10
    return solver.solve(km.model)


def _y(km: KnapsackModel, r: int, iid: int):
    for j, (rr, c) in enumerate(km.y_pairs.tolist()):
        if rr == r and km.insts[c].id == iid:
            return km.y[j]
    raise KeyError((r, iid))


def test_jackson_capacity():
    # Deadlines 10 and 20, 10 ms each, busy until 0: both fit in EDF order; with 25 ms of
    # service the second cannot.
    pre = preset(formulation="knapsack")
    ok = planning([group("g0", service={0: 10}, deadline_ms=10),
                   group("g1", service={0: 10}, deadline_ms=20)], [inst(0)])
    km = KnapsackModel(ok, pre)
    km.model.add(_y(km, 0, 0) == 1)
    km.model.add(_y(km, 1, 0) == 1)
    assert _status(km) in FEASIBLE
    tight = planning([group("g0", service={0: 10}, deadline_ms=10),
                      group("g1", service={0: 15}, deadline_ms=20)], [inst(0)])
    km2 = KnapsackModel(tight, pre)
    km2.model.add(_y(km2, 0, 0) == 1)
    km2.model.add(_y(km2, 1, 0) == 1)
    assert _status(km2) == cp_model.INFEASIBLE


def test_swap_time_joins_busy_until():
    pre = preset(formulation="knapsack")
    pi = planning([group("g0", "b", service={0: 10}, deadline_ms=16)],
                  [inst(0, "a", busy_until_ms=1)], swap_ms=5)
    km = KnapsackModel(pi, pre)
    km.model.add(_y(km, 0, 0) == 1)
    assert _status(km) in FEASIBLE  # 1 + 5 + 10 = 16
    pi2 = planning([group("g0", "b", service={0: 10}, deadline_ms=15)],
                   [inst(0, "a", busy_until_ms=1)], swap_ms=5)
    km2 = KnapsackModel(pi2, pre)
    assert km2.y == []  # cannot be on time at all: no variable


def test_one_final_model_per_instance():
    # Instance 0 holds "a"; "b" and "c" cannot both be on time on it: it ends on one model.
    pre = preset(formulation="knapsack")
    pi = planning([group("g0", "b", {0: 10}, 100), group("g1", "c", {0: 10}, 100)],
                  [inst(0, "a")], swap_ms=5)
    km = KnapsackModel(pi, pre)
    km.model.add(_y(km, 0, 0) == 1)
    assert _status(km) in FEASIBLE
    km.model.add(_y(km, 1, 0) == 1)
    assert _status(km) == cp_model.INFEASIBLE


def test_serve_current_model_then_swap():
    # "a" is loaded: its group runs first (0-10), then the swap (10-15), then "b" (15-25).
    pre = preset(formulation="knapsack")
    fits = planning([group("g0", "a", {0: 10}, 100), group("g1", "b", {0: 10}, 25)],
                    [inst(0, "a")], swap_ms=5)
    km = KnapsackModel(fits, pre)
    km.model.add(_y(km, 0, 0) == 1)
    km.model.add(_y(km, 1, 0) == 1)
    assert _status(km) in FEASIBLE
    # b due at 24: alone it fits after the swap (5 + 10), behind a's group it does not
    tight = planning([group("g0", "a", {0: 10}, 100), group("g1", "b", {0: 10}, 24)],
                     [inst(0, "a")], swap_ms=5)
    km2 = KnapsackModel(tight, pre)
    km2.model.add(_y(km2, 1, 0) == 1)
    assert _status(km2) in FEASIBLE
    km2.model.add(_y(km2, 0, 0) == 1)
    assert _status(km2) == cp_model.INFEASIBLE


def test_on_time_at_most_once():
    pre = preset(formulation="knapsack")
    pi = planning([group("g0")], [inst(0), inst(1)])
    km = KnapsackModel(pi, pre)
    km.model.add(_y(km, 0, 0) == 1)
    assert _status(km) in FEASIBLE
    km.model.add(_y(km, 0, 1) == 1)
    assert _status(km) == cp_model.INFEASIBLE


def test_deadline_levels_are_conservative_and_bounded():
    d = np.array(sorted({int(x) for x in np.random.default_rng(0).integers(1, 600_000, 500)}))
    lv = deadline_levels(d, 12)
    assert len(lv) <= 13
    assert set(lv.tolist()) <= set(d.tolist())  # levels are actual deadlines
    assigned = lv[np.searchsorted(lv, d, side="right") - 1]
    assert (assigned <= d).all()
