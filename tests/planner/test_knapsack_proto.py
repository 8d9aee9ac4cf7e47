"""The knapsack model writes its constraints into the CP-SAT proto directly, in the form
OR-Tools' own ``model.add(LinearExpr.weighted_sum(...) <= ...)`` writes them. What-if runs
reproduce a plan only for a byte-identical model, so these forms are checked against
OR-Tools itself: this test fails when an OR-Tools upgrade changes how it writes them."""

from __future__ import annotations

import random

import pytest
from ortools.sat.python import cp_model

from qlm_opt.planner.cpsat import _add_at_most_one, _add_exactly_one, _add_le, _add_le_times

_L = cp_model.LinearExpr


def _last(m: cp_model.CpModel) -> str:
    return str(m.proto.constraints[len(m.proto.constraints) - 1])


def _cases(seed: int):
    rng = random.Random(seed)
    for _ in range(300):
        n = rng.randint(1, 6)
        idx = rng.sample(range(12), n + 1)  # in any order; the last one is the "lit"
        coefs = [rng.choice([-3, -1, 1, 2, 5, 1146]) for _ in range(n)]
        yield idx[:n], coefs, idx[n], rng.choice([0, 1, 2, 7, 3438]), rng


@pytest.mark.parametrize("seed", range(3))
def test_direct_constraints_match_what_ortools_writes(seed):
    for var_idx, coefs, lit_idx, cap, rng in _cases(seed):
        ref = cp_model.CpModel()
        xs = [ref.new_bool_var(f"x{k}") for k in range(12)]
        got = cp_model.CpModel()
        for k in range(12):
            got.new_bool_var(f"x{k}")
        terms = [xs[k] for k in var_idx]

        ref.add(_L.weighted_sum(terms, coefs) <= cap)
        _add_le(got.proto, list(var_idx), list(coefs), cap)
        assert _last(got) == _last(ref), ("<= constant", var_idx, coefs, cap)

        # a zero coefficient is left out, as OR-Tools does
        zcoefs = [0 if rng.random() < 0.3 else a for a in coefs]
        ref.add(_L.weighted_sum(terms, zcoefs) <= cap)
        _add_le(got.proto, list(var_idx), zcoefs, cap)
        assert _last(got) == _last(ref), ("zero coefficient", var_idx, zcoefs, cap)

        ref.add(_L.weighted_sum(terms, coefs) <= cap * xs[lit_idx])
        _add_le_times(got.proto, list(var_idx), list(coefs), cap, lit_idx)
        assert _last(got) == _last(ref), ("<= cap * lit", var_idx, coefs, cap, lit_idx)
    assert len(got.proto.constraints) == len(ref.proto.constraints)


def test_direct_constraints_reject_what_they_cannot_write():
    m = cp_model.CpModel()
    for k in range(3):
        m.new_bool_var(f"x{k}")
    with pytest.raises(ValueError, match="twice"):
        _add_le(m.proto, [0, 1, 0], [1, 2, 3], 4)
    with pytest.raises(ValueError, match="cap >= 0"):
        _add_le_times(m.proto, [0, 1], [1, 2], -1, 2)
    with pytest.raises(ValueError, match="non-zero"):
        _add_le_times(m.proto, [0, 1], [1, 0], 3, 2)


def test_at_most_one_and_exactly_one_keep_the_given_order():
    # `KnapsackModel._add_constraints` writes these two as literal lists in its own order,
    # as `add_at_most_one` / `add_exactly_one` do (one literal included)
    rng = random.Random(5)
    for _ in range(50):
        ref = cp_model.CpModel()
        xs = [ref.new_bool_var(f"x{k}") for k in range(8)]
        idx = rng.sample(range(8), rng.randint(1, 5))
        ref.add_at_most_one([xs[k] for k in idx])
        ref.add_exactly_one([xs[k] for k in idx])
        got = cp_model.CpModel()
        for k in range(8):
            got.new_bool_var(f"x{k}")
        _add_at_most_one(got.proto, idx)
        _add_exactly_one(got.proto, idx)
        assert str(got.proto) == str(ref.proto), idx
