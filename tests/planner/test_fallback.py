"""The EDF/greedy plan: valid, EDF-ordered, and swapping only when nobody holds the model."""

from __future__ import annotations

from qlm_opt.planner.fallback import edf_key, fallback_plan
from qlm_opt.planner.synthetic import random_instance
from qlm_opt.planner.validator import validate_plan
from tests.planner.factories import group, inst, planning


def test_valid_on_random_instances():
    for seed in range(5):
        pi = random_instance(60, 8, seed=seed)
        plan = fallback_plan(pi)
        assert validate_plan(pi, plan).ok


def test_edf_order_on_each_instance():
    pi = random_instance(60, 8, seed=1)
    groups = pi.group_by_id()
    for seq in fallback_plan(pi).sequences().values():
        keys = [edf_key(groups[g]) for g in seq]
        assert keys == sorted(keys)


def test_no_swap_when_a_holder_exists():
    pi = planning([group("g0", "a"), group("g1", "a")], [inst(0, "a", busy_until_ms=100), inst(1, "b")])
    plan = fallback_plan(pi)
    assert plan.num_swaps == 0
    assert plan.sequences()[0] == ("g0", "g1")


def test_swaps_a_spare_instance_for_an_unheld_model():
    pi = planning([group("g0", "a"), group("g1", "c")], [inst(0, "a"), inst(1, "b")])
    plan = fallback_plan(pi)
    assert plan.num_swaps == 1
    assert plan.instances[1].final_model == "c"


def test_group_by_id_is_a_copy_the_planner_does_not_share():
    # The planner reads the problem's own index (`group_index`); a caller that changes the
    # dict `group_by_id` gave it must not change what the planner sees.
    pi = random_instance(10, 2, seed=3)
    mine = pi.group_by_id()
    gid = pi.groups[0].id
    del mine[gid]
    assert gid in pi.group_index and gid in pi.group_by_id()
    assert validate_plan(pi, fallback_plan(pi)).ok
