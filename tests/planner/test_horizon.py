"""The bounded model (rolling horizon): which groups go to CP-SAT, and the plan it gives."""

from __future__ import annotations

import pytest

from qlm_opt.planner.cpsat import solve
from qlm_opt.planner.fallback import edf_key
from qlm_opt.planner.horizon import bounded_group_ids, hopeless
from qlm_opt.planner.synthetic import random_instance
from qlm_opt.planner.validator import validate_plan
from tests.planner.factories import WEIGHTS, group, inst, planning, preset


@pytest.fixture(scope="module")
def big():
    return random_instance(200, 6, seed=5, weights=WEIGHTS)


def test_keeps_edf_first_and_hopeless_groups(big):
    K = 5
    keep = bounded_group_ids(big, K)
    assert keep is not None and len(keep) < len(big.groups)
    holders: dict[str, int] = {}
    for i in big.instances:
        holders[i.current_model] = holders.get(i.current_model, 0) + 1
    for m in big.models:
        cap = K * max(1, holders.get(m, 0))
        live = [g for g in sorted(big.groups, key=edf_key)
                if g.model == m and not hopeless(big, g)]
        assert {g.id for g in live[:cap]} <= keep  # every EDF-first (most urgent) group
        assert not {g.id for g in live[cap:]} & keep  # and no other live group
    assert {g.id for g in big.groups if hopeless(big, g)} <= keep


def test_no_bound_when_it_does_not_bind(big):
    assert bounded_group_ids(big, len(big.groups)) is None


def test_bad_bound():
    with pytest.raises(ValueError, match="per_model"):
        bounded_group_ids(planning([group("g0")], [inst(0), inst(1)]), 0)


def test_hopeless():
    pi = planning([group("late", deadline_ms=5), group("ok", deadline_ms=50)],
                  [inst(0, busy_until_ms=20), inst(1, busy_until_ms=0)])
    by = pi.group_by_id()
    assert hopeless(pi, by["late"]) and not hopeless(pi, by["ok"])


def test_bounded_plan_is_valid_for_the_full_problem(big):
    pre = preset(formulation="knapsack", max_groups_per_model=5, time_limit_s=2.0)
    plan = solve(big, pre)
    full = big.with_weights(WEIGHTS)
    assert set(plan.timings) == {g.id for g in big.groups}
    report = validate_plan(full, plan)
    assert report.ok, report.errors


def test_left_out_groups_go_before_the_late_ones():
    # One instance: g0 is urgent and too long to be on time, g1 fits; g2 and g3 (far
    # deadlines) are left out of the bounded model. They must run before g0, the late one,
    # so they stay on time.
    groups = [group("g0", service={0: 50}, deadline_ms=40, weight=1),
              group("g1", service={0: 10}, deadline_ms=30, weight=5),
              group("g2", service={0: 10}, deadline_ms=100, weight=5),
              group("g3", service={0: 10}, deadline_ms=110, weight=5)]
    pi = planning(groups, [inst(0)])
    plan = solve(pi, preset(formulation="knapsack", max_groups_per_model=1))
    seq = plan.instances[0].group_ids
    assert seq == ("g1", "g2", "g3", "g0")
    assert [plan.timings[g].on_time for g in seq] == [True, True, True, False]


def test_bulk_groups_sum_their_members_and_keep_them_on_time(big):
    from qlm_opt.planner.horizon import bulk_groups

    gs = [g for g in big.groups if g.model == big.groups[0].model]
    bulk = bulk_groups(big, gs, 3)
    assert 1 <= len(bulk) <= 3
    assert sum(b.weight for b in bulk) == sum(g.weight for g in gs)
    members = sorted(gs, key=edf_key)
    for b in bulk:
        # started at its start deadline on any instance, every member (EDF order) is on time
        run = []
        size = 0
        for g in members:
            if size >= b.size:
                break
            run.append(g)
            size += g.size
        members = members[len(run):]
        for i, total in b.service_ms.items():
            t = b.start_deadline_ms
            for g in run:
                t += g.service_ms[i]
                assert t <= g.deadline_on(i)
            assert t - b.start_deadline_ms == total
    with pytest.raises(ValueError, match="chunks_per_model"):
        bulk_groups(big, gs, 0)
