"""An independent plan checker: feasibility and objective from the instance and the plan alone.

It shares no code with the formulations or with `plan_from_sequences`, so a bug there shows up
as a disagreement here. Used by the tests, by the solver benchmark, and by anyone loading a
plan from outside.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlm_opt.planner.problem import SWAP_SCALE, PlanningProblem
from qlm_opt.planner.plan import Plan

__all__ = ["ValidationReport", "validate_plan", "recompute_objective"]


@dataclass(frozen=True, slots=True)
class ValidationReport:
    """Result of `validate_plan`.

    Attributes:
        errors: one readable line per violation; empty when the plan is feasible and its
            stated figures match.
        objective: the objective recomputed from the plan's own timings.
    """

    errors: tuple[str, ...]
    objective: int

    @property
    def ok(self) -> bool:
        return not self.errors


def recompute_objective(instance: PlanningProblem, plan: Plan) -> int:
    """The objective of `plan`'s stated timings and swaps, per ObjectiveWeights."""
    w = instance.weights
    on_time_weight = 0
    total_end_ms = 0
    for g in instance.groups:
        t = plan.timings.get(g.id)
        if t is None:
            continue
        total_end_ms += t.end_ms
        if t.end_ms <= g.deadline_on(t.instance_id):
            on_time_weight += g.weight
    models = {g.id: g.model for g in instance.groups}
    swaps = 0
    for ip in plan.instances:
        prev = ip.start_model
        for gid in ip.group_ids:
            m = models.get(gid)
            if m is not None and m != prev:
                swaps += 1
                prev = m
    return SWAP_SCALE * (w.on_time * on_time_weight - w.swap_penalty * swaps) - (
        w.completion_penalty * total_end_ms
    )


def validate_plan(instance: PlanningProblem, plan: Plan) -> ValidationReport:
    """Check every constraint of the planning problem on `plan`.

    Checked: each group placed exactly once; the instance may serve it (fit, allowed model,
    no swap on a pinned instance); its timing is consistent with the sequence (start no
    earlier than busy-until / previous end plus the swap time, end = start + service), which
    also rules out overlaps; on-time flags; swap counts and final models; the objective.
    """
    errors: list[str] = []
    groups = {g.id: g for g in instance.groups}
    insts = {i.id: i for i in instance.instances}

    seen: dict[str, int] = {}
    listed: set[int] = set()
    for ip in plan.instances:
        if ip.instance_id not in insts:
            errors.append(f"plan names unknown instance {ip.instance_id}")
            continue
        if ip.instance_id in listed:
            errors.append(f"instance {ip.instance_id} listed twice")
        listed.add(ip.instance_id)
        for gid in ip.group_ids:
            if gid not in groups:
                errors.append(f"instance {ip.instance_id}: unknown group {gid}")
            elif gid in seen:
                errors.append(f"group {gid} placed on {seen[gid]} and {ip.instance_id}")
            else:
                seen[gid] = ip.instance_id
    for gid in groups:
        if gid not in seen:
            errors.append(f"group {gid} is not placed")
    if set(plan.timings) != set(seen):
        errors.append("timings do not cover exactly the placed groups")

    for ip in plan.instances:
        inst = insts.get(ip.instance_id)
        if inst is None:
            continue
        if ip.start_model != inst.current_model:
            errors.append(f"instance {inst.id}: start_model {ip.start_model!r} is not current")
        model = inst.current_model
        free_ms = inst.busy_until_ms
        swaps = 0
        for gid in ip.group_ids:
            g = groups.get(gid)
            if g is None:
                continue
            where = f"group {gid} on instance {inst.id}"
            if inst.id not in g.service_ms:
                errors.append(f"{where}: model {g.model} does not fit")
                continue
            t = plan.timings.get(gid)
            if t is None:
                errors.append(f"{where}: no timing")
                continue
            if t.instance_id != inst.id:
                errors.append(f"{where}: timing names instance {t.instance_id}")
            if g.model != model:
                if not inst.can_swap:
                    errors.append(f"{where}: swap on a pinned instance")
                if inst.allowed_models is not None and g.model not in inst.allowed_models:
                    errors.append(f"{where}: model {g.model} not allowed")
                free_ms += instance.swap_time_ms(inst, model, g.model)
                model = g.model
                swaps += 1
            if t.start_ms < free_ms:
                errors.append(
                    f"{where}: starts at {t.start_ms} ms before the instance is free "
                    f"(and swapped) at {free_ms} ms"
                )
            if t.start_ms < g.release_ms:
                errors.append(f"{where}: starts at {t.start_ms} ms before its release "
                              f"at {g.release_ms} ms")
            if t.end_ms != t.start_ms + g.service_ms[inst.id]:
                errors.append(f"{where}: end {t.end_ms} != start + service")
            if t.on_time != (t.end_ms <= g.deadline_on(t.instance_id)):
                errors.append(f"{where}: on_time flag is wrong")
            free_ms = max(free_ms, t.end_ms)
        if swaps != ip.num_swaps:
            errors.append(f"instance {inst.id}: num_swaps {ip.num_swaps} != {swaps}")
        if ip.final_model != model:
            errors.append(f"instance {inst.id}: final_model {ip.final_model!r} != {model!r}")

    objective = recompute_objective(instance, plan)
    if objective != plan.objective:
        errors.append(f"objective {plan.objective} != recomputed {objective}")
    return ValidationReport(tuple(errors), objective)
