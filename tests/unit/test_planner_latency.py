"""The knapsack hint's Moore-Hodgson repair and the size-scaled search limit."""

from __future__ import annotations

import dataclasses
import re

import pytest
from ortools.sat.python import cp_model

from qlm_opt.planner import cpsat
from qlm_opt.planner.cpsat import KnapsackModel, search_limit_s, search_scale
from qlm_opt.planner.presets import load_preset, preset_dir
from qlm_opt.planner.synthetic import random_instance
from qlm_opt.errors import ConfigError
from tests.planner.factories import group, inst, planning, preset


def _hint(km: KnapsackModel) -> dict[int, int]:
    h = km.model.proto.solution_hint
    return dict(zip(h.vars, h.values))


def _hinted_weight(km: KnapsackModel) -> int:
    hint = _hint(km)
    return sum(km.groups[r].weight for j, (r, _c) in enumerate(km.y_pairs.tolist())
               if hint[km.y_index[j]])


def _one_instance_trap():
    # EDF first-fit takes g0 (50 ms, weight 1) and then none of the four 15 ms groups of
    # weight 3 fits before their deadline at 60 ms; dropping g0 fits all four (weight 12).
    groups = [group("g0", service={0: 50}, deadline_ms=50, weight=1)]
    groups += [group(f"g{k}", service={0: 15}, deadline_ms=60, weight=3) for k in range(1, 5)]
    return planning(groups, [inst(0)])


@pytest.mark.parametrize("repair, weight", [(False, 1), (True, 12)])
def test_hint_repair_drops_the_least_dense_group(repair, weight):
    pi = _one_instance_trap()
    pre = preset(formulation="knapsack", hint_repair=repair)
    km = KnapsackModel(pi, pre)
    km.add_hint({0: [g.id for g in pi.groups]})
    assert _hinted_weight(km) == weight


def test_repaired_hint_is_feasible_on_two_instances_with_a_swap():
    # Instance 1 holds "b" and swaps to "a" for the tail; the repair also counts the head.
    groups = [group("h0", "b", service={1: 30}, deadline_ms=40, weight=1),
              group("a0", "a", service={0: 40, 1: 40}, deadline_ms=45, weight=1)]
    groups += [group(f"a{k}", "a", service={0: 10, 1: 15}, deadline_ms=60, weight=4)
               for k in range(1, 6)]
    pi = planning(groups, [inst(0, "a"), inst(1, "b")], swap_ms=5)
    km = KnapsackModel(pi, preset(formulation="knapsack"))
    km.add_hint({0: ["a0", "a1", "a2", "a3"], 1: ["h0", "a4", "a5"]})
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.fix_variables_to_their_hinted_value = True
    status = solver.solve(km.model)
    assert status in (cp_model.OPTIMAL, cp_model.FEASIBLE)
    # instance 0: after a0 (40 ms) only two of a1-a3 (10 ms each) end by 60 ms; all three
    # fit without a0. Instance 1: h0 (30 ms), the swap (5 ms), then a4 and a5 (15 ms each)
    # end at 65 > 60; without h0 they end at 35. First-fit would hint a0, a1, a2, h0, a4: 14.
    assert _hinted_weight(km) == 3 * 4 + 2 * 4


def test_search_scale():
    on = preset(time_limit_s=0.1, search_ref_vars=100)
    assert search_scale(on, 50) == 1.0
    assert search_scale(on, 400) == pytest.approx(0.25)
    assert search_scale(preset(search_ref_vars=0), 10_000) == 1.0
    assert search_limit_s(on, 0.03, 400) == pytest.approx(0.07 * 0.25)
    assert search_limit_s(on, 0.03, 4000) == pytest.approx(0.01)  # a tenth of the budget
    assert search_limit_s(on, 0.03) == pytest.approx(0.07)


def test_scaled_deterministic_limit_reaches_the_solver():
    pi = random_instance(256, 16, seed=1)
    base = dataclasses.replace(load_preset("balanced"), deterministic=True, search_ref_vars=0)
    full = cpsat.solve(pi, base)
    scaled = cpsat.solve(pi, dataclasses.replace(base, search_ref_vars=20))
    assert full.search_det_s > 0.02  # this epoch uses its whole 0.03 deterministic s
    # the model has hundreds of variables: 20 / n of the limit, plus CP-SAT's overshoot
    assert scaled.search_det_s < 0.005
    assert scaled.status.name in ("OPTIMAL", "FEASIBLE", "FALLBACK")


def test_preset_fields_load_and_reject_bad_values(tmp_path):
    body = (preset_dir() / "balanced.toml").read_text()
    assert load_preset("balanced").hint_repair and load_preset("balanced").search_ref_vars == 0
    ok = tmp_path / "ok.toml"
    ok.write_text(re.sub(r"(?m)^search_ref_vars = 0", "search_ref_vars = 40",
                         re.sub(r"(?m)^hint_repair = true", "hint_repair = false",
                                re.sub(r"(?m)^lp_cuts = true", "lp_cuts = false", body))))
    p = load_preset(ok)
    assert (p.search_ref_vars, p.hint_repair, p.lp_cuts) == (40, False, False)
    bad = tmp_path / "bad.toml"
    bad.write_text(re.sub(r"(?m)^search_ref_vars = 0", "search_ref_vars = -1", body))
    with pytest.raises(ConfigError, match="search_ref_vars"):
        load_preset(bad)


def test_lp_cuts_off_reaches_the_solver():
    # The same epoch with and without cutting planes: the LP statistics differ only if the
    # setting reaches CP-SAT (a knapsack epoch with a backlog adds cuts at the root).
    pi = random_instance(256, 16, seed=1)
    base = dataclasses.replace(load_preset("balanced"), deterministic=True)
    logs: dict[bool, list[str]] = {True: [], False: []}
    for cuts in (True, False):
        real = cp_model.CpSolver

        class Logged(real):
            def solve(self, model, cb=None, _cuts=cuts):
                self.parameters.log_search_progress = True
                self.parameters.log_to_stdout = False
                self.log_callback = logs[_cuts].append
                return super().solve(model, cb)

        cpsat.cp_model.CpSolver = Logged
        try:
            cpsat.solve(pi, dataclasses.replace(base, lp_cuts=cuts))
        finally:
            cpsat.cp_model.CpSolver = real
    assert any("cut_level: 0" in ln for ln in logs[False])
    assert not any("cut_level: 0" in ln for ln in logs[True])


def _late_first_problem():
    # h1, h2 are late everywhere (deadline -10 ms) and come first in EDF order; a and b can
    # still be on time if served next (10 ms each, due at 30 and 40 ms).
    groups = [group("h1", service={0: 50}, deadline_ms=-10, weight=1),
              group("h2", service={0: 50}, deadline_ms=-10, weight=1),
              group("a", service={0: 10}, deadline_ms=30, weight=5),
              group("b", service={0: 10}, deadline_ms=40, weight=5)]
    return planning(groups, [inst(0)])


def test_can_be_on_time():
    assert cpsat.can_be_on_time(_late_first_problem()) == {"a", "b"}
    # busy until 25 ms: only b (ends at 35 <= 40) can still make it
    pi = _late_first_problem()
    pi = planning(list(pi.groups), [inst(0, busy_until_ms=25)])
    assert cpsat.can_be_on_time(pi) == {"b"}


@pytest.mark.parametrize("on_time_first, weight", [(True, 10), (False, 0)])
def test_group_cap_takes_groups_that_can_be_on_time_first(on_time_first, weight):
    pi = _late_first_problem()
    pre = preset(formulation="knapsack", max_groups=2, cap_on_time_first=on_time_first)
    plan = cpsat.solve(pi, pre)
    assert plan.on_time_weight == weight
    assert sorted(g for s in plan.sequences().values() for g in s) == ["a", "b", "h1", "h2"]
