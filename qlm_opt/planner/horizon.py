"""A bounded CP-SAT model per epoch (rolling horizon).

The plan is recomputed every epoch, so only the groups that can start soon need exact
decisions. `bounded_group_ids` picks, per model, the EDF-first groups that could still be on
time (at most ``per_model`` per instance holding the model now, at least ``per_model``); the
groups that cannot be on time anywhere cost the model nothing and are kept. The solver plans
the kept groups and the EDF fallback appends the others after them (``cpsat.solve``), so the
model size follows ``per_model`` and the fleet, not the backlog.
"""

from __future__ import annotations

from qlm_opt.planner.fallback import edf_key
from qlm_opt.planner.problem import PlanGroup, PlanningProblem

__all__ = ["bounded_group_ids", "bulk_groups", "hopeless"]


def hopeless(instance: PlanningProblem, g: PlanGroup) -> bool:
    """Whether `g` misses its deadline on every instance even if served first (after the
    instance's busy-until, without a swap): no plan can get it on time."""
    for i in instance.instances:
        s = g.service_ms.get(i.id)
        if s is None or not instance.can_hold(i, g.model):
            continue
        if max(i.busy_until_ms, g.release_ms) + s <= g.deadline_on(i.id):
            return False
    return True


def bounded_group_ids(instance: PlanningProblem, per_model: int) -> set[str] | None:
    """The groups to give the solver, or None when every group fits the bound.

    Per model: every group that cannot be on time anywhere (`hopeless`), and the EDF-first
    others up to ``per_model * max(1, instances holding the model now)``.
    """
    if per_model <= 0:
        raise ValueError(f"per_model must be >= 1, got {per_model}")
    holders: dict[str | None, int] = {}
    for i in instance.instances:
        holders[i.current_model] = holders.get(i.current_model, 0) + 1
    taken: dict[str, int] = {}
    keep: set[str] = set()
    dropped = False
    for g in sorted(instance.groups, key=edf_key):
        cap = per_model * max(1, holders.get(g.model, 0))
        n = taken.get(g.model, 0)
        if n < cap:
            if not hopeless(instance, g):
                taken[g.model] = n + 1
            keep.add(g.id)
        elif hopeless(instance, g):
            keep.add(g.id)
        else:
            dropped = True
    return keep if dropped else None


def bulk_groups(instance: PlanningProblem, groups: list[PlanGroup], chunks_per_model: int
                ) -> list[PlanGroup]:
    """Stand-ins for groups left out of a bounded model, so that the solver still weighs
    them: per model, its groups in EDF order cut into at most ``chunks_per_model`` runs of
    about equal service, each run one bulk group (summed size, weight and service on the
    instances that can serve every member; id ``~bulk:<model>:<k>``).

    A bulk group is on time when, served from its start in EDF order, every member is:
    its start deadline is the latest start that keeps each member on time on every
    instance. The plan never contains bulk groups: ``cpsat.solve`` drops them from the
    solver's answer and appends the members by the EDF rule.
    """
    if chunks_per_model <= 0:
        raise ValueError(f"chunks_per_model must be >= 1, got {chunks_per_model}")
    by_model: dict[str, list[PlanGroup]] = {}
    for g in sorted(groups, key=edf_key):
        by_model.setdefault(g.model, []).append(g)
    out: list[PlanGroup] = []
    for model, gs in sorted(by_model.items()):
        ref = [min(g.service_ms.values()) for g in gs]
        target = sum(ref) / chunks_per_model
        runs: list[list[PlanGroup]] = [[]]
        acc = 0.0
        for g, s in zip(gs, ref):
            if runs[-1] and acc + s / 2 > target * len(runs) and len(runs) < chunks_per_model:
                runs.append([])
            runs[-1].append(g)
            acc += s
        for k, run in enumerate(runs):
            iids = set(run[0].service_ms)
            for g in run[1:]:
                iids &= set(g.service_ms)
            if not iids:
                continue  # no instance serves every member: they stay unweighed
            service = {i: sum(g.service_ms[i] for g in run) for i in sorted(iids)}
            start_by = None
            for i in iids:
                cum = 0
                for g in run:
                    cum += g.service_ms[i]
                    # latest start on i that keeps g on time: deadline on i less the work
                    # up to and including g
                    latest = g.deadline_on(i) - cum
                    start_by = latest if start_by is None else min(start_by, latest)
            assert start_by is not None
            out.append(PlanGroup(
                f"~bulk:{model}:{k}", model, sum(g.size for g in run),
                sum(g.weight for g in run), start_by + min(service.values()), service,
                release_ms=max(g.release_ms for g in run), start_deadline_ms=start_by))
    return out
