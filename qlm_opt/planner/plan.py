"""The planner's output: a frozen `Plan`, plain data only.

The executor consumes a Plan and nothing else; no OR-Tools object ever appears here. Every
formulation (exact, knapsack, fallback) produces its service *sequences* per instance and
`plan_from_sequences` turns them into the same Plan with left-shifted ("compact") timings:
each group starts as soon as the instance is free and the model swap, if any, is done.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Mapping, Sequence

from qlm_opt.planner.problem import SWAP_SCALE, PlanInstance, PlanningProblem

__all__ = [
    "PlanStatus",
    "InstancePlan",
    "GroupTiming",
    "Plan",
    "plan_from_sequences",
    "score_sequences",
    "sequence_objective",
    "batch_seat_caps",
]


class PlanStatus(StrEnum):
    """How the plan was obtained."""

    OPTIMAL = "OPTIMAL"  # the solver proved its formulation's optimum
    FEASIBLE = "FEASIBLE"  # the solver's best within the time limit
    FALLBACK = "FALLBACK"  # EDF/greedy plan: zero time limit, UNKNOWN, infeasible model, ...
    EMPTY = "EMPTY"  # nothing to plan


@dataclass(frozen=True, slots=True)
class InstancePlan:
    """What one instance does during the plan.

    Attributes:
        instance_id: the instance.
        group_ids: groups in service order.
        start_model: model held now (None = nothing loaded).
        final_model: model held after the last group (swap when != start_model).
        num_swaps: model changes along the sequence.
    """

    instance_id: int
    group_ids: tuple[str, ...]
    start_model: str | None
    final_model: str | None
    num_swaps: int

    @property
    def swaps(self) -> bool:
        return self.num_swaps > 0


@dataclass(frozen=True, slots=True)
class GroupTiming:
    """Predicted timing of one group, ms from now."""

    group_id: str
    instance_id: int
    start_ms: int
    end_ms: int
    on_time: bool


@dataclass(frozen=True, slots=True)
class Plan:
    """One epoch's decision.

    Attributes:
        instances: one entry per instance of the planning problem, in its order.
        timings: group id -> predicted timing (every group appears once). Do not mutate.
        status: see PlanStatus.
        objective: the plan's objective, recomputed from its timings (see ObjectiveWeights);
            comparable across formulations.
        solver_objective: the formulation's own objective value (None for fallback plans).
        best_bound: the solver's bound on `solver_objective` (None for fallback plans).
        solve_ms: wall time inside CP-SAT, ms.
        build_ms: wall time building the model (and the fallback/hint), ms.
        search_det_s: CP-SAT's deterministic time for the search, s (0 without a search);
            what ``SolverPreset.deterministic_rate`` is measured from.
        formulation: "exact", "knapsack" or "fallback".
        num_on_time: groups predicted on time.
        on_time_weight: summed weight of those groups.
        hint_objective: the solver objective of the first solution when it came from the
            hint (tag "[hint]"), else None; tells whether the warm start was used.
        fallback_cause: why a FALLBACK plan is not the solver's: "time_limit_zero",
            "timeout" (no solution within the limit), "infeasible", "model_invalid" or
            "greedy_better" (the solver's plan scored lower than the EDF plan); None otherwise.
        batch_seats: instance id -> how many requests due later than the urgent window
            (batch work) the instance's engine may hold; the other seats are kept for the
            urgent arrivals the forecast expects (``batch_seat_caps``). An instance not in
            the map has no cap (every seat may take batch work). Set by the policy from the
            same epoch's forecast; empty for plans without admission (``qlm-rwt``).
        seat_caps: instance id -> how many requests of any class the instance's engine may
            hold, so that the tightest TPOT target of the classes it serves stays met
            (``RWTEstimator.tpot_seats``); empty when no class has a TPOT target.
    """

    instances: tuple[InstancePlan, ...]
    timings: Mapping[str, GroupTiming]
    status: PlanStatus
    objective: int
    solver_objective: float | None = None
    best_bound: float | None = None
    solve_ms: float = 0.0
    build_ms: float = 0.0
    search_det_s: float = 0.0
    formulation: str = "fallback"
    num_on_time: int = 0
    on_time_weight: int = 0
    hint_objective: float | None = None
    fallback_cause: str | None = None
    batch_seats: Mapping[int, int] = field(default_factory=dict)
    seat_caps: Mapping[int, int] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """Relative optimality gap of the solver objective, None when unknown."""
        if self.solver_objective is None or self.best_bound is None:
            return None
        denom = max(abs(self.best_bound), 1.0)
        return abs(self.best_bound - self.solver_objective) / denom

    def sequences(self) -> dict[int, tuple[str, ...]]:
        """instance id -> group ids in service order."""
        return {ip.instance_id: ip.group_ids for ip in self.instances}

    @property
    def num_swaps(self) -> int:
        return sum(ip.num_swaps for ip in self.instances)

    def replace(self, **changes: object) -> Plan:
        """A copy with some fields changed (the stats fields, typically)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def plan_from_sequences(
    instance: PlanningProblem,
    sequences: Mapping[int, Sequence[str]],
    status: PlanStatus,
    formulation: str,
    **stats: object,
) -> Plan:
    """Build a Plan from per-instance service orders, with compact timings.

    Each group starts at max(instance free, previous end) plus the swap time when its model
    differs from the one held, and not before its release. Instances missing from
    `sequences` stay idle.
    """
    timings: dict[str, GroupTiming] = {}
    inst_plans: list[InstancePlan] = []
    objective, num_on_time, on_time_weight, _ = _compact(instance, sequences, timings,
                                                         inst_plans)
    return Plan(
        instances=tuple(inst_plans),
        timings=timings,
        status=status,
        objective=objective,
        formulation=formulation,
        num_on_time=num_on_time,
        on_time_weight=on_time_weight,
        **stats,  # type: ignore[arg-type]
    )


def score_sequences(instance: PlanningProblem,
                    sequences: Mapping[int, Sequence[str]]) -> tuple[int, int, int]:
    """(objective, on-time weight, swaps) of the plan `plan_from_sequences` would build,
    without building it (no timings): for comparing candidate sequences."""
    objective, _, on_time_weight, num_swaps = _compact(instance, sequences, None, None)
    return objective, on_time_weight, num_swaps


def _compact(
    instance: PlanningProblem,
    sequences: Mapping[int, Sequence[str]],
    timings: dict[str, GroupTiming] | None,
    inst_plans: list[InstancePlan] | None,
) -> tuple[int, int, int, int]:
    """The compact schedule of `sequences`: fills `timings` and `inst_plans` when given and
    returns (objective, groups on time, on-time weight, swaps). The one implementation
    behind `plan_from_sequences` and `score_sequences`."""
    groups = instance.group_index
    w = instance.weights
    completion = w.completion_penalty
    objective = 0
    num_on_time = 0
    on_time_weight = 0
    total_swaps = 0
    for inst in instance.instances:
        seq = tuple(sequences.get(inst.id, ()))
        iid = inst.id
        held = inst.current_model
        t = inst.busy_until_ms
        num_swaps = 0
        for gid in seq:
            g = groups[gid]
            if g.model != held:
                t += instance.swap_time_ms(inst, held, g.model)
                held = g.model
                num_swaps += 1
            start = t = max(t, g.release_ms)
            service = g.service_ms[iid]
            t += service
            sd = g.start_deadline_ms  # `g.deadline_on(iid)`, inlined
            on_time = t <= (g.deadline_ms if sd is None else sd + service)
            if timings is not None:
                timings[gid] = GroupTiming(gid, iid, start, t, on_time)
            objective -= completion * t
            if on_time:
                num_on_time += 1
                on_time_weight += g.weight
        objective -= SWAP_SCALE * w.swap_penalty * num_swaps
        total_swaps += num_swaps
        if inst_plans is not None:
            inst_plans.append(InstancePlan(iid, seq, inst.current_model, held, num_swaps))
    objective += SWAP_SCALE * w.on_time * on_time_weight
    return objective, num_on_time, on_time_weight, total_swaps


def sequence_objective(instance: PlanningProblem, inst: PlanInstance, seq: Sequence[str]) -> int:
    """One instance's share of the objective for service order `seq` (compact timings).

    The objective is a sum over instances, so orders can be compared instance by instance.
    """
    w = instance.weights
    groups = instance.group_index
    held, t, total = inst.current_model, inst.busy_until_ms, 0
    for gid in seq:
        g = groups[gid]
        if g.model != held:
            t += instance.swap_time_ms(inst, held, g.model)
            held = g.model
            total -= SWAP_SCALE * w.swap_penalty
        t = max(t, g.release_ms) + g.service_ms[inst.id]
        total -= w.completion_penalty * t
        if t <= g.deadline_on(inst.id):
            total += SWAP_SCALE * w.on_time * g.weight
    return total


def batch_seat_caps(seats: Mapping[int, float], urgent_seats: Mapping[int, float],
                    margin: float = 1.0, min_batch_seats: int = 1) -> dict[int, int]:
    """Admission: how many seats batch work may take on each instance (trunk reservation).

    ``urgent_seats[i]`` is the number of seats the urgent arrivals forecast for instance
    ``i`` hold at once on average: their rate there times how long one holds a seat
    (Little's law). Arrivals are bursty around that mean, so the reserve adds ``margin``
    standard deviations of a Poisson count: ``reserve = d + margin * sqrt(d)``. Batch work
    may take ``seats[i] - reserve`` seats, never fewer than ``min_batch_seats`` (batch is
    slowed, never stopped; work that comes within the urgent window of its deadline is no
    longer batch and may take any seat). An instance with no urgent demand forecast gets no
    cap at all: batch work takes every seat, as without admission.
    """
    if margin < 0 or min_batch_seats < 0:
        raise ValueError(f"batch_seat_caps: margin ({margin}) and min_batch_seats "
                         f"({min_batch_seats}) must be >= 0")
    caps: dict[int, int] = {}
    for iid, s in seats.items():
        d = urgent_seats.get(iid, 0.0)
        if not d > 0.0:
            continue
        reserve = d + margin * math.sqrt(d)
        caps[iid] = max(min_batch_seats, int(math.floor(s - reserve)))
    return caps
