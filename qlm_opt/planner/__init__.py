"""The planner: plain-data planning problem in, frozen Plan out.

Public entry points: `solve` (CP-SAT, exact or EDF-knapsack), `fallback_plan` (EDF/greedy),
`validate_plan` (independent checker) and `load_preset` (solver/*.toml). OR-Tools is imported
only when `qlm_opt.planner.cpsat` is, so importing the data types stays cheap.
"""

from qlm_opt.planner.fallback import fallback_plan
from qlm_opt.planner.problem import ObjectiveWeights, PlanGroup, PlanInstance, PlanningProblem
from qlm_opt.planner.plan import GroupTiming, InstancePlan, Plan, PlanStatus
from qlm_opt.planner.presets import SolverPreset, load_preset
from qlm_opt.planner.validator import ValidationReport, validate_plan

__all__ = [
    "ObjectiveWeights",
    "PlanGroup",
    "PlanInstance",
    "PlanningProblem",
    "Plan",
    "PlanStatus",
    "InstancePlan",
    "GroupTiming",
    "SolverPreset",
    "load_preset",
    "fallback_plan",
    "validate_plan",
    "ValidationReport",
    "solve",
]


def __getattr__(name: str):
    # Lazy: importing ortools costs ~100 ms, and most importers only need the data types.
    if name == "solve":
        from qlm_opt.planner.cpsat import solve

        return solve
    raise AttributeError(name)
