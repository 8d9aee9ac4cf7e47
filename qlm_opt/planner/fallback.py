"""EDF/greedy planning: the solver's hint, its fallback, and the planner for capped-off groups.

It runs in O(G log G + G * holders) and never fails, so an epoch always gets a plan.

1. Coverage: for each needed model that no instance holds, reserve one instance to swap to
   it (the one free soonest among those whose current model is spare: nothing loaded, no
   group needs it, or another instance holds it too).
2. Groups in EDF order (deadline, then larger weight, then id) go to the instance holding
   their model where they finish earliest.
3. Only if step 1 found no instance for a model, its groups go wherever they finish
   earliest counting the swap, which may make an instance swap more than once.

Steps 1 and 2 give each instance a single model, so the plan is a complete, feasible hint for
the knapsack formulation as well as for the exact one.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from qlm_opt.planner.problem import PlanGroup, PlanningProblem, edf_key
from qlm_opt.planner.plan import Plan, PlanStatus, plan_from_sequences

__all__ = ["edf_key", "fallback_sequences", "fallback_plan"]


def fallback_sequences(
    instance: PlanningProblem,
    groups: Iterable[PlanGroup] | None = None,
    base: Mapping[int, Sequence[str]] | None = None,
) -> dict[int, list[str]]:
    """Greedy per-instance service orders.

    Args:
        instance: the planning problem.
        groups: the groups to place (default: all of `instance.groups`).
        base: sequences already fixed (e.g. the solver's plan for the capped groups); the new
            groups are appended after them.

    Returns:
        instance id -> group ids in service order (base first).
    """
    by_id = instance.group_index
    swap_time = instance.swap_time_ms
    todo = sorted(instance.groups if groups is None else groups, key=edf_key)
    seqs: dict[int, list[str]] = {i.id: list((base or {}).get(i.id, ())) for i in instance.instances}

    # Instance state after the base sequences: model held and when it is free (ms).
    held: dict[int, str | None] = {}
    free_at: dict[int, int] = {}
    for inst in instance.instances:
        m, t = inst.current_model, inst.busy_until_ms
        for gid in seqs[inst.id]:
            g = by_id[gid]
            t += swap_time(inst, m, g.model) + g.service_ms[inst.id]
            m = g.model
        held[inst.id], free_at[inst.id] = m, t
    insts = instance.instance_index

    # Step 1: coverage swaps. `target` is the model an instance will hold for the new groups.
    target = dict(held)
    needed = {g.model for g in todo}
    first_deadline: dict[str, int] = {}
    for g in todo:
        first_deadline.setdefault(g.model, g.deadline_ms)
    holders: dict[str | None, int] = {}
    for m in target.values():
        holders[m] = holders.get(m, 0) + 1
    for m in sorted(needed - set(target.values()), key=lambda m: (first_deadline[m], m)):
        fits = {i for g in todo if g.model == m for i in g.service_ms}
        best: tuple[int, int] | None = None
        for iid in sorted(fits):
            inst = insts[iid]
            cur = target[iid]
            spare = cur is None or cur not in needed or holders.get(cur, 0) > 1
            if not spare or not instance.can_hold(inst, m):
                continue
            cost = (free_at[iid] + instance.swap_time_ms(inst, cur, m), iid)
            if best is None or cost < best:
                best = cost
        if best is not None:
            iid = best[1]
            holders[target[iid]] -= 1
            target[iid] = m
            holders[m] = holders.get(m, 0) + 1

    by_model: dict[str | None, list[int]] = {}
    for iid, m in target.items():
        by_model.setdefault(m, []).append(iid)

    # Steps 2 and 3: EDF, earliest finish.
    for g in todo:
        best_iid, best_end = -1, 0
        model, service = g.model, g.service_ms
        for iid in by_model.get(model, ()):
            s = service.get(iid)
            if s is None:
                continue
            h = held[iid]  # no swap (0 ms) when it holds the model: most of these loops
            end = free_at[iid] + (0 if h == model else swap_time(insts[iid], h, model)) + s
            if best_iid < 0 or end < best_end:
                best_iid, best_end = iid, end
        if best_iid < 0:  # step 3: nobody holds it; swap wherever it ends first
            for iid, s in g.service_ms.items():
                inst = insts[iid]
                if not instance.can_hold(inst, g.model):
                    continue
                end = free_at[iid] + instance.swap_time_ms(inst, held[iid], g.model) + s
                if best_iid < 0 or (end, iid) < (best_end, best_iid):
                    best_iid, best_end = iid, end
            if best_iid < 0:
                raise ValueError(f"group {g.id}: no instance can serve model {g.model!r}")
            by_model.setdefault(g.model, []).append(best_iid)
            if target[best_iid] in by_model and best_iid in by_model[target[best_iid]]:
                by_model[target[best_iid]].remove(best_iid)
            target[best_iid] = g.model
        seqs[best_iid].append(g.id)
        free_at[best_iid] = best_end
        held[best_iid] = g.model
    return seqs


def fallback_plan(instance: PlanningProblem, build_ms: float = 0.0) -> Plan:
    """The EDF/greedy plan for every group, status FALLBACK."""
    if not instance.groups:
        return plan_from_sequences(instance, {}, PlanStatus.EMPTY, "fallback", build_ms=build_ms)
    seqs = fallback_sequences(instance)
    return plan_from_sequences(instance, seqs, PlanStatus.FALLBACK, "fallback", build_ms=build_ms)
