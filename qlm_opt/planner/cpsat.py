"""CP-SAT planning: two formulations behind one `solve(instance, preset, hint) -> Plan`.

* **exact** (small epochs): per instance a circuit over its candidate groups, node 0 being
  the instance's current state (model held, busy-until). Arc literals carry the
  sequence-dependent swap times; optional intervals + no-overlap strengthen propagation;
  `late[g]` makes deadlines soft. Checked against brute force in the tests.
* **knapsack** (scale): no ordering variables. `y[g,i]` = g on time on i, `w[i,m]` = i holds
  m. Jackson's rule (EDF is optimal for meeting deadlines with all jobs released now) turns
  "all on-time groups of i meet their deadlines" into one linear constraint per deadline
  level. Late groups are appended afterwards in EDF order by the greedy planner.

Both return sequences per instance, turned into the same frozen `Plan` by
`plan_from_sequences`. No OR-Tools object leaves this module.
"""

from __future__ import annotations

import logging
import time
from typing import Mapping, Sequence

import numpy as np
from ortools.sat.python import cp_model

from qlm_opt.planner.fallback import edf_key, fallback_plan, fallback_sequences
from qlm_opt.planner.problem import SWAP_SCALE, PlanGroup, PlanningProblem
from qlm_opt.planner.plan import (Plan, PlanStatus, plan_from_sequences, score_sequences,
                                  sequence_objective)
from qlm_opt.planner.presets import SolverPreset

__all__ = ["solve", "choose_formulation", "primary_objective", "search_limit_s", "ExactModel",
           "KnapsackModel", "deadline_levels", "can_be_on_time"]

logger = logging.getLogger(__name__)

_LinearExpr = cp_model.LinearExpr


class _CpModel(cp_model.CpModel):
    """A CpModel without the pre-PEP 8 aliases (``AddBoolOr`` for ``add_bool_or``, ...):
    OR-Tools adds ~70 of them to every new model through ``dir()`` and wrappers, ~2 ms per
    epoch; this module only uses the snake_case names."""

    def _add_pre_pep8_methods(self) -> None:
        pass


# ============================================================================ entry point
def solve(
    instance: PlanningProblem,
    preset: SolverPreset | None = None,
    hint: Plan | None = None,
) -> Plan:
    """Plan one epoch.

    Args:
        instance: the epoch's planning problem (times in ms from now). Its objective weights
            are replaced by the preset's, which are the source of truth.
        preset: solver settings (default: `SolverPreset()`, close to solver/balanced.toml).
        hint: the previous epoch's plan, used as a warm start (`add_hint`) where it still
            applies; groups it does not know are completed by the EDF fallback.

    Returns:
        A Plan. Status OPTIMAL/FEASIBLE from the solver; FALLBACK (the EDF/greedy plan) when
        the time limit is 0, the solver returns UNKNOWN or an infeasible/invalid model, or
        (knapsack only) the greedy plan scores higher; EMPTY with no groups.
    """
    preset = preset or SolverPreset()
    t0 = time.perf_counter()
    inst = instance.with_weights(preset.weights)
    if not inst.groups:
        return plan_from_sequences(inst, {}, PlanStatus.EMPTY, "fallback")
    if preset.time_limit_s <= 0:
        return fallback_plan(inst, build_ms=_ms_since(t0)).replace(
            fallback_cause="time_limit_zero")

    # Group cap: the most urgent groups go to CP-SAT, the rest are appended greedily. With
    # `cap_on_time_first`, groups that can still be on time come first: one already late
    # everywhere gets no variable in the model, yet it took a place in the cap.
    core = inst
    if len(inst.groups) > preset.max_groups:
        if preset.cap_on_time_first:
            live = can_be_on_time(inst)
            order = sorted(inst.groups, key=lambda g: (g.id not in live, edf_key(g)))
        else:
            order = sorted(inst.groups, key=edf_key)
        keep = {g.id for g in order[: preset.max_groups]}
        core = inst.subset(keep)

    greedy_seqs = fallback_sequences(core)
    # The greedy plan is only scored here; a Plan is built for it only if it is returned.
    greedy_score = score_sequences(core, greedy_seqs)
    start_seqs = _hint_sequences(core, hint, greedy_seqs, greedy_score[0])
    if core is not inst:
        # the fallback for the whole instance is computed when needed
        greedy_seqs, greedy_score = None, None
    formulation = choose_formulation(core, preset)
    model: ExactModel | KnapsackModel
    if formulation == "exact":
        model = ExactModel(core)
    else:
        model = KnapsackModel(core, preset, start_seqs)
    model.add_hint(start_seqs)
    build_ms = _ms_since(t0)

    result = _run_cpsat(model.model, preset, build_ms / 1000.0)
    if result.status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        if result.status in (cp_model.INFEASIBLE, cp_model.MODEL_INVALID):
            logger.warning("planner: %s model is %s; using the EDF fallback",
                           formulation, result.status_name)
        if greedy_seqs is None:
            greedy_seqs = fallback_sequences(inst)
        plan = plan_from_sequences(inst, greedy_seqs, PlanStatus.FALLBACK, "fallback",
                                   build_ms=build_ms)
        cause = {cp_model.INFEASIBLE: "infeasible", cp_model.MODEL_INVALID: "model_invalid"}
        return plan.replace(solve_ms=result.solve_ms, search_det_s=result.det_s,
                            fallback_cause=cause.get(result.status, "timeout"))

    seqs = model.read_sequences(result.values)
    if core is not inst:
        placed = {gid for s in seqs.values() for gid in s}
        rest = [g for g in inst.groups if g.id not in placed]
        seqs = fallback_sequences(inst, groups=rest, base=seqs)
    status = PlanStatus.OPTIMAL if result.status == cp_model.OPTIMAL else PlanStatus.FEASIBLE
    plan = plan_from_sequences(
        inst,
        seqs,
        status,
        formulation,
        solver_objective=result.objective,
        best_bound=result.bound,
        solve_ms=result.solve_ms,
        build_ms=build_ms,
        search_det_s=result.det_s,
        hint_objective=result.hint_objective,
    )
    if formulation == "knapsack":
        # The knapsack's deadline levels are conservative, so the greedy plan can get more
        # weight on time; then it is used. Its completion-time term is only a tie-break
        # that the knapsack approximates (service time, EDF order): a plan with the same
        # on-time weight and swaps is the solver's. The search figures stay on the plan.
        if greedy_seqs is None:
            greedy_seqs = fallback_sequences(inst)
            greedy_score = score_sequences(inst, greedy_seqs)
        if _primary(inst, greedy_score[1], greedy_score[2]) > primary_objective(inst, plan):
            plan = plan_from_sequences(
                inst, greedy_seqs, PlanStatus.FALLBACK, "fallback",
                build_ms=build_ms,
                solve_ms=result.solve_ms,
                search_det_s=result.det_s,
                solver_objective=result.objective,
                best_bound=result.bound,
                hint_objective=result.hint_objective,
                fallback_cause="greedy_better",
            )
    logger.debug(
        "planner: %s %s groups=%d instances=%d objective=%d bound=%s build=%.1fms solve=%.1fms",
        formulation, plan.status, len(inst.groups), len(inst.instances), plan.objective,
        result.bound, build_ms, result.solve_ms,
    )
    return plan


def can_be_on_time(instance: PlanningProblem) -> set[str]:
    """Ids of the groups that would be on time on some instance if served there next: after
    its busy-until, the swap to the group's model and the group's release, its service ends
    by its deadline on that instance."""
    out: set[str] = set()
    insts = instance.instance_index
    free: dict[tuple[int, str], int | None] = {}  # (instance, model) -> busy-until + swap
    for g in instance.groups:
        for iid, s in g.service_ms.items():
            key = (iid, g.model)
            if key not in free:
                i = insts.get(iid)
                free[key] = (None if i is None or not instance.can_hold(i, g.model) else
                             i.busy_until_ms + instance.swap_time_ms(i, i.current_model, g.model))
            at = free[key]
            if at is not None and max(at, g.release_ms) + s <= g.deadline_on(iid):
                out.add(g.id)
                break
    return out


def primary_objective(instance: PlanningProblem, plan: Plan) -> int:
    """The objective without its completion-time tie-break: weight on time less swaps."""
    return _primary(instance, plan.on_time_weight, plan.num_swaps)


def _primary(instance: PlanningProblem, on_time_weight: int, num_swaps: int) -> int:
    w = instance.weights
    return w.on_time * on_time_weight - w.swap_penalty * num_swaps


def choose_formulation(instance: PlanningProblem, preset: SolverPreset) -> str:
    """"exact" or "knapsack", from the preset (or by size under "auto")."""
    if preset.formulation != "auto":
        return preset.formulation
    return "exact" if len(instance.groups) <= preset.exact_max_groups else "knapsack"


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _hint_sequences(instance: PlanningProblem, hint: Plan | None,
                    greedy: dict[int, list[str]] | None = None,
                    greedy_objective: int | None = None) -> dict[int, list[str]]:
    """A complete starting solution: the previous plan where it still applies, completed by
    the EDF fallback; or the EDF fallback alone when that scores higher."""
    if greedy is None:
        greedy = fallback_sequences(instance)
    if hint is None:
        return greedy
    groups = instance.group_index
    insts = instance.instance_index
    base: dict[int, list[str]] = {}
    for iid, seq in hint.sequences().items():
        inst = insts.get(iid)
        if inst is None:
            continue
        base[iid] = [gid for gid in seq if gid in groups and instance.can_serve(groups[gid], inst)]
    placed = {gid for s in base.values() for gid in s}
    warm = fallback_sequences(
        instance, groups=[g for g in instance.groups if g.id not in placed], base=base
    )
    score = lambda s: score_sequences(instance, s)[0]  # noqa: E731
    if greedy_objective is None:
        greedy_objective = score(greedy)
    return warm if score(warm) >= greedy_objective else greedy


# ============================================================================ search
class _Result:
    """What the planner keeps from a CP-SAT run (plain values only)."""

    __slots__ = ("status", "status_name", "values", "objective", "bound", "solve_ms",
                 "det_s", "hint_objective")

    def __init__(self) -> None:
        self.status = cp_model.UNKNOWN
        self.status_name = "UNKNOWN"
        self.values: np.ndarray = np.zeros(0, dtype=np.int64)
        self.objective: float | None = None
        self.bound: float | None = None
        self.solve_ms = 0.0
        self.det_s = 0.0
        self.hint_objective: float | None = None


class _FirstSolution(cp_model.CpSolverSolutionCallback):
    """Records whether the first solution was the hint (CP-SAT tags it "[hint]")."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False
        self.hint_objective: float | None = None

    def on_solution_callback(self) -> None:
        if self.seen:
            return
        self.seen = True
        if "hint" in self.response_proto.solution_info:
            self.hint_objective = self.objective_value


def search_limit_s(preset: SolverPreset, build_s: float, num_vars: int = 0) -> float:
    """CP-SAT's wall limit in a live epoch: the budget (``time_limit_s``, build included)
    less what the build took, times `search_scale` for a model of ``num_vars`` variables,
    but at least a tenth of the budget, so that the search can return the hint or better
    even after a slow build."""
    return max(0.1 * preset.time_limit_s,
               (preset.time_limit_s - build_s) * search_scale(preset, num_vars))


def search_scale(preset: SolverPreset, num_vars: int) -> float:
    """The share of the search limit a model of ``num_vars`` variables gets:
    ``min(1, search_ref_vars / num_vars)``, 1 when ``search_ref_vars`` is 0 (off). A latency
    option: on the backlog epochs CP-SAT runs to its limit, so their solve time is the limit;
    this cuts it, and with it some plan quality (measured in benchmarks/scenarios/README.md)."""
    ref = preset.search_ref_vars
    if ref <= 0 or num_vars <= ref:
        return 1.0
    return ref / num_vars


def _run_cpsat(model: cp_model.CpModel, preset: SolverPreset, build_s: float = 0.0) -> _Result:
    solver = cp_model.CpSolver()
    p = solver.parameters
    p.num_workers = preset.num_workers
    if preset.deterministic and preset.time_limit_s > 0:
        # What-if: the live budget as deterministic time (build included in the rate), so
        # that a what-if plan gets the search a live epoch would get, and reproducibly.
        p.max_deterministic_time = (preset.time_limit_s * preset.deterministic_rate
                                    * search_scale(preset, len(model.proto.variables)))
        # A safety net only: where it is hit the run is no longer reproducible. On a 2-core
        # machine at load 9, 0.1 deterministic s took 2 s of wall time (the old net was
        # max(1, 20 x limit) s and was hit in most hard epochs).
        p.max_time_in_seconds = max(10.0, 100 * preset.time_limit_s)
        p.num_workers = 1  # one worker is deterministic, and cheaper per deterministic second
    else:
        p.max_time_in_seconds = search_limit_s(preset, build_s, len(model.proto.variables))
    p.random_seed = preset.random_seed
    p.cp_model_presolve = preset.presolve
    if not preset.lp_cuts:
        p.cut_level = 0
    if preset.time_limit_s < 1.0:
        # These two LNS workers run sub-solves that ignore the deadline: at a 100 ms limit
        # they overshot to 180-270 ms (p95) at 256 x 32; without them the limit holds.
        p.ignore_subsolvers.extend(["graph_cst_lns", "graph_dec_lns"])
    if preset.log_search:
        p.log_search_progress = True
        p.log_to_stdout = False
        solver.log_callback = lambda line: logger.debug("cp-sat: %s", line)
    cb = _FirstSolution()
    t0 = time.perf_counter()
    status = solver.solve(model, cb)
    out = _Result()
    out.solve_ms = _ms_since(t0)
    out.status = status
    out.status_name = solver.status_name(status)
    out.det_s = solver.response_proto.deterministic_time
    if status in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        resp = solver.response_proto
        out.values = np.fromiter(resp.solution, dtype=np.int64, count=len(resp.solution))
        out.objective = solver.objective_value
        out.bound = solver.best_objective_bound
        out.hint_objective = cb.hint_objective
    return out


# ============================================================================ exact
class ExactModel:
    """The circuit formulation, for small epochs (O(G^2) arc literals per instance).

    Variables (named after indices, e.g. `assign[g3,i1]`):
        assign[g,i]  group g runs on instance i (only where `can_serve`);
        start[g], end[g]  ms from now;
        late[g]  g may miss its deadline;
        arc literals of each instance's circuit; node 0 = the instance's current state.
    Public attributes are for tests; use `read_sequences` to get the answer out.
    """

    def __init__(self, instance: PlanningProblem) -> None:
        self.instance = instance
        self.model = _CpModel()
        self.groups = list(instance.groups)
        self.gidx = {g.id: k for k, g in enumerate(self.groups)}
        self.horizon_ms = self._horizon_ms()
        self.assign: dict[tuple[int, int], cp_model.IntVar] = {}
        self.start: list[cp_model.IntVar] = []
        self.end: list[cp_model.IntVar] = []
        self.late: list[cp_model.IntVar] = []
        # instance id -> {(tail node, head node): literal}; node k+1 = k-th candidate group
        self.arcs: dict[int, dict[tuple[int, int], cp_model.IntVar]] = {}
        self.nodes: dict[int, list[int]] = {}  # instance id -> candidate group indices
        self.swap_arcs: list[cp_model.IntVar] = []
        self._add_variables()
        self._add_constraints()
        self._add_objective()

    def _horizon_ms(self) -> int:
        """An upper bound on any compact schedule's end: latest busy-until plus, per group,
        its slowest service and the slowest swap."""
        inst = self.instance
        max_swap = 0
        for i in inst.instances:
            for g in inst.groups:
                if inst.can_serve(g, i):
                    max_swap = max(max_swap, inst.swap_time_ms(i, i.current_model, g.model))
                    for h in inst.groups:
                        if h.model != g.model and inst.can_serve(h, i):
                            max_swap = max(max_swap, inst.swap_time_ms(i, g.model, h.model))
        busy = max((i.busy_until_ms for i in inst.instances), default=0)
        release = max((g.release_ms for g in inst.groups), default=0)
        work = sum(max(g.service_ms.values()) + max_swap for g in inst.groups)
        return max(busy, release) + work + 1

    def _add_variables(self) -> None:
        m, inst, H = self.model, self.instance, self.horizon_ms
        for k, g in enumerate(self.groups):
            self.start.append(m.new_int_var(0, H, f"start[g{k}]"))
            self.end.append(m.new_int_var(0, H, f"end[g{k}]"))
            self.late.append(m.new_bool_var(f"late[g{k}]"))
        for i in inst.instances:
            cands = [k for k, g in enumerate(self.groups) if inst.can_serve(g, i)]
            self.nodes[i.id] = cands
            for k in cands:
                self.assign[k, i.id] = m.new_bool_var(f"assign[g{k},i{i.id}]")

    def _add_constraints(self) -> None:
        m, inst = self.model, self.instance
        for k, g in enumerate(self.groups):
            lits = [self.assign[k, i.id] for i in inst.instances if (k, i.id) in self.assign]
            if not lits:
                raise ValueError(f"group {g.id}: no instance can serve model {g.model!r}")
            m.add_exactly_one(lits)
            if g.release_ms:
                m.add(self.start[k] >= g.release_ms)
            # Soft deadline: only an on-time group must end by its deadline (on the instance
            # it runs on, for a time-to-first-token deadline).
            if g.start_deadline_ms is None:
                m.add(self.end[k] <= g.deadline_ms).only_enforce_if(~self.late[k])
            else:
                m.add(self.start[k] <= g.start_deadline_ms).only_enforce_if(~self.late[k])
        for i in inst.instances:
            cands = self.nodes[i.id]
            intervals = []
            for k in cands:
                s = self.groups[k].service_ms[i.id]
                intervals.append(
                    m.new_optional_interval_var(
                        self.start[k], s, self.end[k], self.assign[k, i.id],
                        f"run[g{k},i{i.id}]",
                    )
                )
            # Redundant with the circuit but gives the solver a strong propagator.
            m.add_no_overlap(intervals)
            self._add_circuit(i, cands)

    def _add_circuit(self, i, cands: list[int]) -> None:
        m, inst = self.model, self.instance
        arcs: dict[tuple[int, int], cp_model.IntVar] = {}
        triples: list[tuple[int, int, object]] = []
        empty = m.new_bool_var(f"empty[i{i.id}]")
        arcs[0, 0] = empty
        triples.append((0, 0, empty))
        for a, k in enumerate(cands, start=1):
            g = self.groups[k]
            triples.append((a, a, ~self.assign[k, i.id]))  # skipped node: not on i
            first = m.new_bool_var(f"arc[i{i.id},0,g{k}]")
            last = m.new_bool_var(f"arc[i{i.id},g{k},0]")
            arcs[0, a], arcs[a, 0] = first, last
            triples += [(0, a, first), (a, 0, last)]
            swap = inst.swap_time_ms(i, i.current_model, g.model)
            m.add(self.start[k] >= i.busy_until_ms + swap).only_enforce_if(first)
            if g.model != i.current_model:
                self.swap_arcs.append(first)
            for b, h in enumerate(cands, start=1):
                if a == b:
                    continue
                gh = self.groups[h]
                lit = m.new_bool_var(f"arc[i{i.id},g{k},g{h}]")
                arcs[a, b] = lit
                triples.append((a, b, lit))
                swap = inst.swap_time_ms(i, g.model, gh.model)
                m.add(self.start[h] >= self.end[k] + swap).only_enforce_if(lit)
                if gh.model != g.model:
                    self.swap_arcs.append(lit)
        m.add_circuit(triples)
        self.arcs[i.id] = arcs

    def _add_objective(self) -> None:
        w = self.instance.weights
        terms: list[cp_model.IntVar] = []
        coefs: list[int] = []
        for k, g in enumerate(self.groups):
            terms += [self.late[k], self.end[k]]
            coefs += [-SWAP_SCALE * w.on_time * g.weight, -w.completion_penalty]
        terms += self.swap_arcs
        coefs += [-SWAP_SCALE * w.swap_penalty] * len(self.swap_arcs)
        on_time_max = SWAP_SCALE * w.on_time * sum(g.weight for g in self.groups)
        self.model.maximize(_LinearExpr.weighted_sum(terms, coefs) + on_time_max)

    def add_hint(self, sequences: Mapping[int, Sequence[str]]) -> None:
        """Hint every variable from per-instance service orders (compact timings)."""
        m, inst = self.model, self.instance
        plan = plan_from_sequences(inst, sequences, PlanStatus.FALLBACK, "")
        for k, g in enumerate(self.groups):
            t = plan.timings.get(g.id)
            if t is None:
                continue
            m.add_hint(self.start[k], t.start_ms)
            m.add_hint(self.end[k], t.end_ms)
            m.add_hint(self.late[k], not t.on_time)
        for i in inst.instances:
            cands = self.nodes[i.id]
            node = {k: a for a, k in enumerate(cands, start=1)}
            seq = [self.gidx[gid] for gid in sequences.get(i.id, ())]
            if any(k not in node for k in seq):
                continue  # the hint does not fit this instance; leave it to the solver
            on = set(seq)
            for k in cands:
                m.add_hint(self.assign[k, i.id], k in on)
            path = [0] + [node[k] for k in seq] + [0]
            chosen = set(zip(path, path[1:])) if seq else {(0, 0)}
            for key, lit in self.arcs[i.id].items():
                m.add_hint(lit, key in chosen)

    def read_sequences(self, values: np.ndarray) -> dict[int, list[str]]:
        """Per-instance service order from a solution vector (order by start time)."""
        out: dict[int, list[str]] = {}
        for i in self.instance.instances:
            on = [k for k in self.nodes[i.id] if values[self.assign[k, i.id].index]]
            on.sort(key=lambda k: (values[self.start[k].index], k))
            out[i.id] = [self.groups[k].id for k in on]
        return out


# ============================================================================ knapsack
def deadline_levels(deadlines_ms: np.ndarray, num_levels: int) -> np.ndarray:
    """Deadline levels (ms) for Jackson's constraints: at most `num_levels` values, each one
    an actual deadline, spread geometrically between the smallest and largest deadline.

    A group is checked at the largest level <= its deadline, which is conservative: a plan
    that meets the levels meets the true deadlines. Taking actual deadlines as levels (the
    geometric grid snapped down) loses nothing for the groups sitting on a level.
    """
    d = np.unique(deadlines_ms)
    if len(d) <= num_levels:
        return d
    lo, hi = float(max(d[0], 1)), float(d[-1])
    grid = np.geomspace(lo, hi, num_levels)
    snapped = d[np.searchsorted(d, grid, side="right") - 1]
    return np.unique(np.concatenate(([d[0]], snapped)))


_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


def _linear_terms(var_index: list[int], coefs: list[int]) -> tuple[list[int], list[int]]:
    """The terms as OR-Tools writes a linear expression: by variable index, zero
    coefficients left out. Variables must be distinct (OR-Tools would merge them)."""
    if len(set(var_index)) != len(var_index):
        raise ValueError(f"linear constraint: a variable appears twice in {var_index}")
    if sorted(var_index) != var_index or 0 in coefs:
        pairs = sorted((v, a) for v, a in zip(var_index, coefs) if a)
        var_index, coefs = [v for v, _ in pairs], [a for _, a in pairs]
    return var_index, coefs


def _add_at_most_one(proto, literals: list[int]) -> None:
    """``model.add_at_most_one`` by literal index: the literals in the given order."""
    proto.constraints.add().at_most_one.literals.extend(literals)


def _add_exactly_one(proto, literals: list[int]) -> None:
    """``model.add_exactly_one`` by literal index: the literals in the given order."""
    proto.constraints.add().exactly_one.literals.extend(literals)


def _add_le(proto, var_index: list[int], coefs: list[int], bound: int) -> None:
    """``sum(coefs * vars) <= bound`` written into the proto as ``model.add(
    LinearExpr.weighted_sum(vars, coefs) <= bound)`` writes it; variables by index."""
    var_index, coefs = _linear_terms(var_index, coefs)
    lin = proto.constraints.add().linear
    lin.vars.extend(var_index)
    lin.coeffs.extend(coefs)
    lin.domain.extend((_INT64_MIN, bound))


def _add_le_times(proto, var_index: list[int], coefs: list[int], cap: int, lit: int) -> None:
    """``sum(coefs * vars) <= cap * lit`` written as ``model.add(LinearExpr.weighted_sum(
    vars, coefs) <= cap * lit)`` writes it: ``sum - cap * lit <= 0`` for one term,
    ``cap * lit - sum >= 0`` for more, ``sum <= 0`` when ``cap`` is 0. Needs ``cap >= 0``
    and non-zero coefficients (`tests/planner/test_knapsack_proto.py` checks the forms
    against OR-Tools itself)."""
    if cap < 0 or 0 in coefs or not var_index:
        raise ValueError(f"_add_le_times: needs cap >= 0 ({cap}), non-zero coefficients "
                         f"and at least one term ({len(var_index)})")
    if cap == 0:
        _add_le(proto, var_index, coefs, 0)
        return
    if len(var_index) == 1:
        vs, cs = _linear_terms([var_index[0], lit], [coefs[0], -cap])
        domain = (_INT64_MIN, 0)
    else:
        vs, cs = _linear_terms([*var_index, lit], [*(-a for a in coefs), cap])
        domain = (0, _INT64_MAX)
    lin = proto.constraints.add().linear
    lin.vars.extend(vs)
    lin.coeffs.extend(cs)
    lin.domain.extend(domain)


class KnapsackModel:
    """The EDF-knapsack formulation for large epochs; no ordering variables.

    Variables:
        on_time[g,i]  (y) g is served on time on i; only for candidate pairs that could be
            on time on their own;
        hold[i,m]  (w) instance i holds model m for the plan (exactly one per instance; m may
            be None for an empty instance with nothing loaded).
    Constraints, per instance i, model m and deadline level L (Jackson's rule):
        sum(service[g,i] * y[g,i] : model(g) = m, level(g) <= L)
            <= max(0, L - busy_until[i] - swap[i](current -> m)) * w[i,m]
    which also makes y[g,i] imply w[i,model(g)]. Lower levels whose constraint cannot bind
    are skipped; the top level is always kept for that implication.

    "Serve these, then swap": groups of the model an instance holds now may be on time on it
    whatever model it ends with; they are served first. So their block is not tied to
    w[i,current], and each block of another model m also counts them:
        sum(service * y : current model on i) + sum(service * y : model m, level <= L)
            + (M - cap(L)) * w[i,m] <= M,   M = sum(service : current model on i)
    which is the Jackson constraint of the sequence "current groups, swap, m's groups" when
    w[i,m] = 1 and always holds when it is 0.
    """

    def __init__(
        self,
        instance: PlanningProblem,
        preset: SolverPreset,
        hint_sequences: Mapping[int, Sequence[str]] | None = None,
    ) -> None:
        self.instance = instance
        self.preset = preset
        self.repair_hint = preset.hint_repair
        self.model = _CpModel()
        self.groups = list(instance.groups)
        self.insts = list(instance.instances)
        self._prepare(hint_sequences or {})
        self._add_variables()
        self._add_constraints()
        self._add_objective()

    # ---------------------------------------------------------------- data preparation
    def _prepare(self, hint_sequences: Mapping[int, Sequence[str]]) -> None:
        """Candidate pairs, levels and capacities, all before touching the model."""
        inst, pre = self.instance, self.preset
        G, I = len(self.groups), len(self.insts)
        col = {i.id: c for c, i in enumerate(self.insts)}
        models = sorted({g.model for g in self.groups})
        midx = {m: k for k, m in enumerate(models)}
        g_model = np.array([midx[g.model] for g in self.groups], dtype=np.int64)
        busy = np.array([i.busy_until_ms for i in self.insts], dtype=np.int64)

        # service[g, c] (ms), 0 where g cannot run on instance c; filled in one scatter.
        service = np.zeros((G, I), dtype=np.int64)
        service.flat[[r * I + col[iid] for r, g in enumerate(self.groups)
                      for iid in g.service_ms]] = [
            s for g in self.groups for s in g.service_ms.values()]
        # swap[c, m] (ms) to go from the current model to m; -1 = not allowed.
        swap = np.full((I, len(models)), -1, dtype=np.int64)
        holds = np.zeros((I, len(models)), dtype=bool)
        for c, i in enumerate(self.insts):
            for m, k in midx.items():
                if inst.can_hold(i, m):
                    swap[c, k] = inst.swap_time_ms(i, i.current_model, m)
                holds[c, k] = i.current_model == m
        swap_g = swap[:, g_model].T  # (G, I)
        ok = (service > 0) & (swap_g >= 0)
        holder = ok & holds[:, g_model].T
        other = ok & ~holder

        # Candidate instances: soonest-done holders, plus a few that would swap, plus the
        # instance of the hint so the hint stays complete.
        big = np.iinfo(np.int64).max // 4
        release = np.array([g.release_ms for g in self.groups], dtype=np.int64)
        ready = np.maximum(busy[None, :] + np.where(swap_g >= 0, swap_g, 0),
                           release[:, None]) + service
        cand = np.zeros((G, I), dtype=bool)
        for mask, k in ((holder, pre.candidates_per_group), (other, pre.swap_candidates)):
            if k <= 0:
                continue
            cost = np.where(mask, ready, big)
            kk = min(k, I)
            part = np.argpartition(cost, kk - 1, axis=1)[:, :kk] if kk < I else np.tile(
                np.arange(I), (G, 1))
            rows = np.repeat(np.arange(G), part.shape[1])
            sel = part.ravel()
            cand[rows, sel] |= mask[rows, sel]
        gid_row = {g.id: r for r, g in enumerate(self.groups)}
        hint_r: list[int] = []
        hint_c: list[int] = []
        for iid, seq in hint_sequences.items():
            c = col.get(iid)
            if c is None:
                continue
            for gid in seq:
                r = gid_row.get(gid)
                if r is not None:
                    hint_r.append(r)
                    hint_c.append(c)
        if hint_r:
            hr, hc = np.array(hint_r, dtype=np.int64), np.array(hint_c, dtype=np.int64)
            sel = ok[hr, hc]
            cand[hr[sel], hc[sel]] = True

        # Deadline levels, conservative: per (instance, model) block, at most
        # `deadline_levels` levels, and each group is checked at the largest level <= its
        # deadline. Deadlines past the horizon count as the horizon. Per-block levels follow
        # that block's own deadlines, so they are much tighter than fleet-wide ones.
        # Deadlines are per (group, instance): a time-to-first-token deadline ends one
        # service later on each instance. Releases (forecast groups) only enter through
        # `ready` (a group alone must fit after its release); the cumulative constraints
        # ignore them, which is optimistic for forecast groups only.
        horizon_ms = int(pre.horizon_s * 1000)
        deadline = np.array([g.deadline_ms for g in self.groups], dtype=np.int64)
        start_by = [g.start_deadline_ms for g in self.groups]
        has_start = np.array([d is not None for d in start_by], dtype=bool)
        start_ms = np.array([0 if d is None else d for d in start_by], dtype=np.int64)
        dpair = np.where(has_start[:, None],
                         np.where(service > 0, start_ms[:, None] + service, 0),
                         deadline[:, None])
        clamped = np.minimum(dpair, horizon_ms)
        # A pair is worth a y variable only if g alone could be on time on i.
        pairs = np.argwhere(cand & (ready <= clamped))
        rows, cols = pairs[:, 0], pairs[:, 1]
        block = cols * len(models) + g_model[rows]
        dsel = clamped[rows, cols]
        order = np.lexsort((dsel, block))
        rows, cols, block, dsel = rows[order], cols[order], block[order], dsel[order]
        level_ms = np.empty(len(rows), dtype=np.int64)
        cuts = np.flatnonzero(np.diff(block)) + 1
        for lo, hi in zip(np.concatenate(([0], cuts)), np.concatenate((cuts, [len(rows)]))):
            d = dsel[lo:hi]  # sorted
            lv = deadline_levels(d, pre.deadline_levels)
            level_ms[lo:hi] = lv[np.searchsorted(lv, d, side="right") - 1]
        keep = ready[rows, cols] <= level_ms
        # y pairs sorted by (instance, model, level): Jackson blocks are contiguous runs.
        self.y_pairs = np.stack((rows[keep], cols[keep]), axis=1)
        self.y_level_ms = level_ms[keep]
        self.y_block = block[keep]

        self.models = models
        self.midx = midx
        self.g_model = g_model
        self.busy = busy
        self.service = service
        self.swap = swap
        self.cand = cand
        self.col = col

    # ---------------------------------------------------------------- model
    def _add_variables(self) -> None:
        m = self.model
        pairs = self.y_pairs.tolist()  # plain ints: numpy rows cost ~1 us each to unpack
        ids = [i.id for i in self.insts]
        new_bool_var = m.new_bool_var
        self.y = [new_bool_var(f"on_time[g{r},i{ids[c]}]") for r, c in pairs]
        self.y_index = np.array([v.index for v in self.y], dtype=np.int64)
        # Models each instance may end up holding: its current one (None included) and those
        # of its y candidates.
        self.hold: dict[tuple[int, int | None], cp_model.IntVar] = {}
        cur = [self.midx.get(i.current_model) if i.current_model is not None else None
               for i in self.insts]
        opts: list[set[int | None]] = [set() for _ in self.insts]
        for c in range(len(self.insts)):
            if self.insts[c].current_model is None or cur[c] is not None:
                opts[c].add(cur[c])
            else:  # holds a model no group needs: staying on it is an option
                opts[c].add(None)
        g_model = self.g_model.tolist()
        for r, c in pairs:
            opts[c].add(g_model[r])
        self.cur = cur
        for c, i in enumerate(self.insts):
            for k in sorted(opts[c], key=lambda x: -1 if x is None else x):
                name = "keep" if k is None else self.models[k]
                self.hold[c, k] = m.new_bool_var(f"hold[i{i.id},{name}]")

    def _add_constraints(self) -> None:
        # Written into the proto directly (`_add_at_most_one`, `_add_exactly_one`,
        # `_add_le`, `_add_le_times`), in the form and order OR-Tools' own `add_*` calls
        # write: building the expressions took ~2/3 of the constraint time.
        proto = self.model.proto
        y_idx = self.y_index.tolist()
        # Each group on time on at most one instance.
        by_group: dict[int, list[int]] = {}
        for r, v in zip(self.y_pairs[:, 0].tolist() if len(self.y_pairs) else [], y_idx):
            by_group.setdefault(r, []).append(v)
        for lits in by_group.values():
            if len(lits) > 1:
                _add_at_most_one(proto, lits)
        # One model per instance.
        per_inst: dict[int, list[int]] = {}
        for (c, _k), lit in self.hold.items():
            per_inst.setdefault(c, []).append(lit.index)
        for lits in per_inst.values():
            _add_exactly_one(proto, lits)
        # Jackson's rule per (instance, model) block, one constraint per level.
        if not len(self.y_pairs):
            return
        rows, cols = self.y_pairs[:, 0], self.y_pairs[:, 1]
        svc = self.service[rows, cols]
        svc_l = svc.tolist()
        level_l = self.y_level_ms.tolist()
        cuts = np.flatnonzero(np.diff(self.y_block)) + 1
        spans = list(zip(np.concatenate(([0], cuts)).tolist(),
                         np.concatenate((cuts, [len(rows)])).tolist()))
        heads = [(int(cols[lo]), int(self.g_model[rows[lo]])) for lo, _ in spans]
        # instance column -> (y indices, services) of its current model's groups
        current: dict[int, tuple[list[int], list[int]]] = {}
        for (lo, hi), (c, k) in zip(spans, heads):
            if k == self.cur[c]:
                current[c] = (y_idx[lo:hi], svc_l[lo:hi])
        for (lo, hi), (c, k) in zip(spans, heads):
            base = int(self.busy[c] + self.swap[c, k])
            lits = y_idx[lo:hi]
            sv = svc_l[lo:hi]
            cum = np.cumsum(svc[lo:hi]).tolist()
            lv = level_l[lo:hi]
            w = self.hold[c, k].index
            # end of each level's run (levels are sorted within the block)
            ends = [n for n in range(1, len(lv)) if lv[n] != lv[n - 1]] + [len(lv)]
            first = current.get(c) if k != self.cur[c] else None
            first_total = sum(first[1]) if first else 0
            for n, end in enumerate(ends):
                cap = max(0, lv[end - 1] - base)
                if k == self.cur[c]:
                    # served first, whatever the instance holds at the end
                    if cum[end - 1] > cap:
                        _add_le(proto, lits[:end], sv[:end], cap)
                    continue
                if n == len(ends) - 1 or cum[end - 1] > cap:
                    _add_le_times(proto, lits[:end], sv[:end], cap, w)
                if first and first_total + cum[end - 1] > cap:
                    _add_le(proto, [*first[0], *lits[:end], w],
                            [*first[1], *sv[:end], first_total - cap], first_total)

    def _add_objective(self) -> None:
        """On-time weight less swaps, in group-weight units: the plan's primary objective
        (``primary_objective``) divided by ``on_time``. Small coefficients keep the search
        fast; the completion-time tie-break is left to the order read off the solution
        (EDF per instance) and to the hint (the greedy plan finishes groups early)."""
        w = self.instance.weights
        weight = np.array([g.weight for g in self.groups], dtype=np.int64)
        rows = self.y_pairs[:, 0] if len(self.y_pairs) else np.zeros(0, dtype=np.int64)
        terms: list[cp_model.IntVar] = list(self.y)
        coefs: list[int] = weight[rows].tolist()
        swap_cost = -(-w.swap_penalty // w.on_time) if w.on_time else w.swap_penalty
        for (c, k), lit in self.hold.items():
            cur_model = self.insts[c].current_model
            if k is not None and self.models[k] != cur_model and swap_cost:
                terms.append(lit)
                coefs.append(-swap_cost)
        # Written into the proto directly (what `maximize` writes: negated coefficients,
        # scaling factor -1): `maximize` over ~1,000 terms took ~4 ms of the build.
        obj = self.model.proto.objective
        obj.vars.extend([v.index for v in terms])
        obj.coeffs.extend([-c for c in coefs])
        obj.scaling_factor = -1.0

    # ---------------------------------------------------------------- hint and answer
    def add_hint(self, sequences: Mapping[int, Sequence[str]]) -> None:
        """Hint every variable from per-instance service orders: the instance's single model,
        and, in level order, the groups that fit Jackson's constraints: first fit, or with
        ``hint_repair`` weighted Moore-Hodgson (an overfull level drops the chosen group of
        least weight per ms of service)."""
        m = self.model
        gid_row = {g.id: r for r, g in enumerate(self.groups)}
        # plain ints (numpy scalars cost ~1 us each to index and convert)
        pairs = self.y_pairs.tolist()
        y_at = {(r, c): j for j, (r, c) in enumerate(pairs)}
        y_level = self.y_level_ms.tolist()
        y_service = (self.service[self.y_pairs[:, 0], self.y_pairs[:, 1]].tolist()
                     if pairs else [])
        g_model = self.g_model.tolist()
        y_weight = ([self.groups[r].weight for r, _c in pairs] if self.repair_hint else [])
        y_val = [False] * len(self.y)
        hold_val: dict[tuple[int, int | None], bool] = {key: False for key in self.hold}
        for c, i in enumerate(self.insts):
            seq_rows = [gid_row[g] for g in sequences.get(i.id, ()) if g in gid_row]
            cur = self.cur[c]
            head = [r for r in seq_rows if g_model[r] == cur]
            tail = [r for r in seq_rows if g_model[r] != cur]
            kinds = {g_model[r] for r in tail}
            if len(kinds) > 1 or (tail and head and seq_rows.index(head[-1]) > seq_rows.index(
                    tail[0])):
                # not "current model's groups, then one other model": hint the current
                # model's groups only
                tail, kinds = [], set()
            k = kinds.pop() if kinds else cur
            if (c, k) not in self.hold:
                # None of i's hinted groups can be on time there: hint "keep the model".
                k, tail = cur, []
            hold_val[c, k] = True
            if cur is None and k is None:
                continue
            # current model's groups first (no swap), then the other model's after the swap
            total = 0
            chosen: list[int] = []  # y indices hinted on time on i
            for part, base in ((head, int(self.busy[c])), (tail, None)):
                if base is None:
                    if k is None or k == cur:
                        break
                    base = int(self.busy[c] + self.swap[c, k])
                cands = [(y_level[j], j) for r in part
                         if (j := y_at.get((r, c))) is not None]
                for level, j in sorted(cands):
                    s = y_service[j]
                    if self.repair_hint:
                        # Weighted Moore-Hodgson: take the group, and while the level is
                        # overfull drop the chosen group of least weight per ms of service.
                        # Dropping only loosens the lower levels, so all stay satisfied.
                        chosen.append(j)
                        total += s
                        while total > level - base and chosen:
                            out = min(chosen, key=lambda q: (y_weight[q] / y_service[q], -q))
                            chosen.remove(out)
                            total -= y_service[out]
                    elif total + s <= level - base:
                        total += s
                        chosen.append(j)
            for j in chosen:
                y_val[j] = True
        # A complete hint (every variable), written in bulk: one `add_hint` call per
        # variable cost ~20 us each, ~10% of the build.
        hint_vars: list[int] = self.y_index.tolist()
        hint_vals: list[int] = [int(v) for v in y_val]
        hint_vars += [lit.index for lit in self.hold.values()]
        hint_vals += [int(hold_val[key]) for key in self.hold]
        m.proto.solution_hint.vars.extend(hint_vars)
        m.proto.solution_hint.values.extend(hint_vals)

    def read_sequences(self, values: np.ndarray) -> dict[int, list[str]]:
        """On-time groups per instance in EDF order, then the late groups appended by the
        greedy planner (EDF order, after the on-time ones)."""
        on = values[self.y_index].astype(bool) if len(self.y_index) else np.zeros(0, bool)
        seqs: dict[int, list[PlanGroup]] = {i.id: [] for i in self.insts}
        placed: set[str] = set()
        for r, c in self.y_pairs[on].tolist():
            g = self.groups[r]
            seqs[self.insts[c].id].append(g)
            placed.add(g.id)
        # The current model's groups first ("serve these, then swap"), then EDF on each
        # instance's own deadlines (Jackson's order).
        held = {i.id: i.current_model for i in self.insts}
        rank = self.instance.edf_rank()  # EDF order as one int (ties are impossible)
        out = {
            iid: [g.id for g in sorted(gs, key=lambda g, i=iid: (
                g.model != held[i], g.deadline_on(i), rank[g.id]))]
            for iid, gs in seqs.items()
        }
        late = [g for g in self.groups if g.id not in placed]
        if late:
            out = fallback_sequences(self.instance, groups=late, base=out)
            # A "late" group may still make it when served in plain EDF order among the
            # on-time ones; keep that order where it scores higher for the instance.
            for i in self.insts:
                seq = out[i.id]
                edf = sorted(seq, key=rank.__getitem__)
                if edf != seq and sequence_objective(self.instance, i, edf) > sequence_objective(
                    self.instance, i, seq
                ):
                    out[i.id] = edf
        return out
