"""Factories for planner tests: tiny hand-made instances and a brute-force optimum."""

from __future__ import annotations

import itertools

from qlm_opt.planner.problem import (
    SWAP_SCALE,
    ObjectiveWeights,
    PlanGroup,
    PlanInstance,
    PlanningProblem,
)
from qlm_opt.planner.presets import SolverPreset

# Small weights keep tiny objectives readable: on time = 10 per weight unit, swap = 3.
WEIGHTS = ObjectiveWeights(on_time=10, swap_penalty=3, completion_penalty=1)


def preset(**changes) -> SolverPreset:
    """A deterministic test preset: 1 worker, generous time limit, the test weights."""
    base = dict(
        name="test",
        time_limit_s=10.0,
        num_workers=1,
        random_seed=0,
        max_groups=1000,
        formulation="exact",
        weights=WEIGHTS,
    )
    base.update(changes)
    return SolverPreset(**base)


def group(gid, model="a", service=None, deadline_ms=100, weight=1, size=1) -> PlanGroup:
    return PlanGroup(gid, model, size, weight, deadline_ms, service or {0: 10, 1: 10})


def inst(iid, model="a", busy_until_ms=0, can_swap=True, allowed=None) -> PlanInstance:
    return PlanInstance(iid, "gpu", model, busy_until_ms, can_swap, allowed)


def planning(groups, instances, swap_ms=5, weights=WEIGHTS) -> PlanningProblem:
    models = sorted({g.model for g in groups} | {i.current_model for i in instances if i.current_model})
    table = {(a, b): swap_ms for a in (None, *models) for b in models if a != b}
    return PlanningProblem(tuple(groups), tuple(instances), table, weights=weights)


# ---------------------------------------------------------------------- brute force
def _score(pi: PlanningProblem, seqs: dict[int, tuple[str, ...]]) -> int | None:
    """Objective of the compact schedule of `seqs`, None if some group cannot run there."""
    groups = {g.id: g for g in pi.groups}
    w = pi.weights
    total = 0
    for i in pi.instances:
        held, t = i.current_model, i.busy_until_ms
        for gid in seqs.get(i.id, ()):
            g = groups[gid]
            if i.id not in g.service_ms:
                return None
            if g.model != held:
                if not i.can_swap:
                    return None
                if i.allowed_models is not None and g.model not in i.allowed_models:
                    return None
                t += pi.swap_time_ms(i, held, g.model)
                held = g.model
                total -= SWAP_SCALE * w.swap_penalty
            t += g.service_ms[i.id]
            total -= w.completion_penalty * t
            if t <= g.deadline_ms:
                total += SWAP_SCALE * w.on_time * g.weight
    return total


def brute_force_optimum(pi: PlanningProblem) -> int:
    """Best objective over every assignment and every order (fine up to ~6 groups)."""
    ids = [g.id for g in pi.groups]
    inst_ids = [i.id for i in pi.instances]
    best = None
    for perm in itertools.permutations(ids):
        for where in itertools.product(inst_ids, repeat=len(ids)):
            seqs: dict[int, list[str]] = {i: [] for i in inst_ids}
            for gid, iid in zip(perm, where):
                seqs[iid].append(gid)
            s = _score(pi, {k: tuple(v) for k, v in seqs.items()})
            if s is not None and (best is None or s > best):
                best = s
    assert best is not None, "instance has no feasible plan"
    return best
