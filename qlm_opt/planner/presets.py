"""Solver presets: TOML files in `solver/` (fast, balanced, thorough), validated with pydantic.

A preset holds every knob of the planner: search limits, the group cap, the objective
weights and the scaling formulation's parameters. `load_preset("balanced")` reads
`solver/balanced.toml`; `load_preset("path/to/mine.toml")` reads that file. Errors raise
`ConfigError` naming the file and the field.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qlm_opt.errors import ConfigError
from qlm_opt.planner.problem import ObjectiveWeights

__all__ = ["SolverPreset", "load_preset", "preset_dir", "PRESET_NAMES"]

PRESET_NAMES = ("fast", "balanced", "thorough")


@dataclass(frozen=True, slots=True)
class SolverPreset:
    """Planner settings for one epoch.

    Attributes:
        name: preset name (file stem).
        time_limit_s: the epoch's planning budget, wall s: model build plus CP-SAT search
            (the search gets what the build left, at least a tenth of the budget); 0 = always
            use the EDF fallback.
        num_workers: CP-SAT worker threads (at most the cores you can spare).
        random_seed: CP-SAT seed, for reproducible runs.
        max_groups: group cap; the most urgent `max_groups` groups go to CP-SAT, the rest are
            appended by the EDF fallback.
        horizon_s: deadlines beyond this are treated as this (knapsack), s.
        formulation: "auto" (exact up to `exact_max_groups`, else knapsack), "exact" or
            "knapsack".
        exact_max_groups: size limit of the exact (circuit) formulation under "auto".
        deadline_levels: at most this many deadline levels per instance (knapsack).
        candidates_per_group: instances that hold the group's model considered per group
            (knapsack), the soonest free first.
        swap_candidates: extra instances per group that would have to swap (knapsack).
        log_search: route CP-SAT's search log to this module's logger at DEBUG.
        presolve: run CP-SAT's presolve. Off by default: on the knapsack model (a few hundred
            booleans) presolve took 5-10x longer than the search it saves.
        weights: objective weights.
        deterministic_rate: what-if runs (``deterministic``) give CP-SAT
            ``time_limit_s * deterministic_rate`` deterministic seconds, the search a live
            planner reaches within its wall budget: measured on the reference machine (2-core
            VM, 2 workers) by ``benchmarks/solver_scaling/det_rate.py``. 1.0 reads the budget
            as deterministic seconds (about 3x the live search).
        hint_repair: knapsack hint per instance by weighted Moore-Hodgson (take the groups
            in deadline-level order; while a level is overfull, drop the chosen group of least
            weight per ms of service) instead of first fit. On the backlog rows' epochs it
            starts CP-SAT within about 2-3% of the plan it reaches at its limit.
        search_ref_vars: 0 = off. Otherwise a model with more variables than this gets
            ``search_ref_vars / variables`` of the search limit (deterministic in what-if runs,
            wall in live ones, where the tenth-of-the-budget floor still holds): fast on
            backlog epochs, but it lost up to 2.9 points on suite rows (scenarios README).
        lp_cuts: CP-SAT's cutting planes (``cut_level`` 0 when false).
        cap_on_time_first: the group cap takes the groups that can still be on time somewhere
            first (EDF among them), then the late ones; false: EDF over all groups.
    """

    name: str = "default"
    time_limit_s: float = 0.1
    num_workers: int = 2
    random_seed: int = 0
    max_groups: int = 256
    horizon_s: float = 3600.0
    formulation: Literal["auto", "exact", "knapsack"] = "auto"
    exact_max_groups: int = 8
    deadline_levels: int = 64
    candidates_per_group: int = 4
    swap_candidates: int = 2
    log_search: bool = False
    presolve: bool = False
    weights: ObjectiveWeights = field(default_factory=ObjectiveWeights)
    # Reproducible search (what-if runs): the time limit is read as CP-SAT deterministic time
    # and parallel workers interleave deterministically, so the same seed gives the same plan.
    deterministic: bool = False
    deterministic_rate: float = 0.3
    hint_repair: bool = True
    search_ref_vars: int = 0
    lp_cuts: bool = True
    cap_on_time_first: bool = True


class _ObjectiveFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on_time: int = Field(1000, ge=0)
    swap_penalty: int = Field(50, ge=0)
    completion_penalty: int = Field(1, ge=0)


class _PresetFile(BaseModel):
    """Schema of `solver/*.toml`."""

    model_config = ConfigDict(extra="forbid")
    time_limit_s: float = Field(ge=0, le=3600)
    num_workers: int = Field(ge=1, le=256)
    random_seed: int = 0
    max_groups: int = Field(ge=1)
    horizon_s: float = Field(gt=0)
    formulation: Literal["auto", "exact", "knapsack"] = "auto"
    exact_max_groups: int = Field(8, ge=0, le=64)
    deadline_levels: int = Field(ge=1, le=1000)
    candidates_per_group: int = Field(ge=1)
    swap_candidates: int = Field(2, ge=0)
    log_search: bool = False
    presolve: bool = False
    deterministic: bool = False
    deterministic_rate: float = Field(0.3, gt=0, le=10)
    hint_repair: bool = True
    search_ref_vars: int = Field(0, ge=0)
    lp_cuts: bool = True
    cap_on_time_first: bool = True
    objective: _ObjectiveFile = _ObjectiveFile()


def preset_dir() -> Path:
    """Where named presets live: $QLM_OPT_SOLVER_DIR, else the repo's `solver/`, else
    `./solver`."""
    env = os.environ.get("QLM_OPT_SOLVER_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2] / "solver"
    return repo if repo.is_dir() else Path.cwd() / "solver"


def load_preset(name_or_path: str | Path) -> SolverPreset:
    """Load a preset by name ("fast", "balanced", "thorough", or any `solver/<name>.toml`)
    or by path to a TOML file.

    Raises:
        ConfigError: the file is missing, is not TOML, or a field is missing/invalid; the
            message names the file and the field.
    """
    text = str(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or os.sep in text or "/" in text):
        path = preset_dir() / f"{text}.toml"
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such solver preset") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        parsed = _PresetFile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        raise ConfigError(f"{path}: field '{loc}': {err['msg']}") from None
    o = parsed.objective
    return SolverPreset(
        name=path.stem,
        time_limit_s=parsed.time_limit_s,
        num_workers=parsed.num_workers,
        random_seed=parsed.random_seed,
        max_groups=parsed.max_groups,
        horizon_s=parsed.horizon_s,
        formulation=parsed.formulation,
        exact_max_groups=parsed.exact_max_groups,
        deadline_levels=parsed.deadline_levels,
        candidates_per_group=parsed.candidates_per_group,
        swap_candidates=parsed.swap_candidates,
        log_search=parsed.log_search,
        presolve=parsed.presolve,
        weights=ObjectiveWeights(o.on_time, o.swap_penalty, o.completion_penalty),
        deterministic=parsed.deterministic,
        deterministic_rate=parsed.deterministic_rate,
        hint_repair=parsed.hint_repair,
        search_ref_vars=parsed.search_ref_vars,
        lp_cuts=parsed.lp_cuts,
        cap_on_time_first=parsed.cap_on_time_first,
    )


def preset_to_toml(preset: SolverPreset, header: str = "") -> str:
    """The TOML text of a preset, in the `solver/*.toml` schema (``load_preset`` reads it)."""
    import tomli_w

    data = {
        "time_limit_s": preset.time_limit_s,
        "num_workers": preset.num_workers,
        "random_seed": preset.random_seed,
        "max_groups": preset.max_groups,
        "horizon_s": preset.horizon_s,
        "formulation": preset.formulation,
        "exact_max_groups": preset.exact_max_groups,
        "deadline_levels": preset.deadline_levels,
        "candidates_per_group": preset.candidates_per_group,
        "swap_candidates": preset.swap_candidates,
        "log_search": preset.log_search,
        "presolve": preset.presolve,
        "deterministic": preset.deterministic,
        "deterministic_rate": preset.deterministic_rate,
        "hint_repair": preset.hint_repair,
        "search_ref_vars": preset.search_ref_vars,
        "lp_cuts": preset.lp_cuts,
        "cap_on_time_first": preset.cap_on_time_first,
        "objective": {
            "on_time": preset.weights.on_time,
            "swap_penalty": preset.weights.swap_penalty,
            "completion_penalty": preset.weights.completion_penalty,
        },
    }
    lines = "".join(f"# {ln}\n" for ln in header.splitlines())
    return lines + tomli_w.dumps(data)
