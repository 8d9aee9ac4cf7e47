"""An upper bound U on SLO attainment: no policy can do better under the simulator's engine model.

``compute_bound(requests, workload, fleet)`` returns U overall and per SLO class for one
request list (the one a what-if run replays). It is the optimum of a linear program (GLOP),
certified from the LP's dual so that solver tolerances cannot make it too low, then rounded
down to a whole number of requests. Every constraint of the LP is a *necessary* condition of
any run of the simulator (``engines/sim.py`` with the iteration model of ``engines/perf.py``),
so the set of on-time requests of any policy is a feasible LP point, and U is at least the
attainment of every policy. The argument follows.

What the simulator fixes (and the bound uses)
---------------------------------------------
* A request attains its SLO when it finishes, its first token comes at or before
  ``deadline_at`` (arrival + class TTFT target) and, where the class sets one, its mean TPOT
  is at or under target (``Request.attained``). Dropped or unfinished requests miss. A run
  ends ``drain_s`` after the last arrival; a request still unfinished then is dropped.
* An engine runs iterations one after another. An iteration of ``T`` tokens over ``n``
  sequences reading ``kv`` KV tokens lasts
  ``f · (overhead + s_seq·n + max(c_tok·T, m0 + m_kv·kv))``, where ``f`` is the machine's
  speed factor of its window (1 on a roofline engine; on a calibrated one at least
  ``f_min``, the smallest of ``slowdown_q``). ``T`` is at most ``max_num_batched_tokens``
  (B), ``n`` at most ``max_num_seqs`` (S).
* A request's first token is the end of the iteration holding its last prefill chunk, plus
  its per-request overhead (``request_overhead_for(id)``, exact per request). Its prefill
  runs in iterations that start at or after it reached the engine, so at or after its
  arrival; a prompt of P tokens needs at least ``n_P = max(1, ceil(P / B))`` iterations.
  After the first token it needs ``out_cap - 1`` more iterations, one token each.
* A prompt with ``P + 1 > max_model_len`` is dropped by the engine.
* An instance serves only the model it holds. Swapping to model m takes ``swap_s(m)``
  (warm or cold, as the fleet says), during which it runs no iteration; an instance holds
  its ``initial_model`` at time 0.

The relaxation (each step can only raise attainment)
----------------------------------------------------
1. **Requests on time in isolation.** On a candidate instance type, a request can be on time
   only if ``earliest + ttft_min + overhead_r <= deadline`` where ``earliest`` is its arrival
   (or ``swap_s`` when no instance of that type starts with its model: a swap cannot start
   before time 0), ``ttft_min = f_min · (n_P·(overhead + s_seq) + max(c_tok·P, n_P·m0))``
   (each prefill iteration at least that long, since ``Σ max(a,b) >= max(Σa, Σb)`` and the
   KV read is at least 0), its prompt fits ``max_model_len``, and, when its class sets a
   TPOT target, ``f_min·(overhead + s_seq + max(c_tok, m0 + m_kv·P))`` (a decode iteration
   that reads at least its own prompt's KV) is at most the target. A request that passes on
   no instance type misses under every policy; the LP drops it. The test is exact
   arithmetic on the simulator's own formulas, loosened only in the direction of "faster".
2. **Fluid work instead of iterations.** Each iteration's duration is at least the sum of
   linear per-request charges: with ``T <= B`` tokens, ``n <= S`` sequences and ``kv <= K``
   KV tokens read (``K``: the engine's KV capacity in whole blocks; admission and
   preemption keep every iteration's KV within it), ``overhead >= overhead·T/B``,
   ``overhead + m0 >= (overhead + m0)·n/S`` and ``overhead + m0 >= (overhead + m0)·kv/K``, so
     - *compute charge*: ``f_min·((c_tok + overhead/B)·tokens + s_seq·(iterations it is in))``;
     - *memory charge by seats*: ``f_min·(((overhead + m0)/S + s_seq)·(iterations it is in)
       + m_kv·(KV tokens it reads))``;
     - *memory charge by KV*: ``f_min·(s_seq·(iterations it is in)
       + ((overhead + m0)/K + m_kv)·(KV tokens it reads))``,
   and an iteration lasts at least the sum of any one of the three charges over its
   requests (the KV charge makes a long-context decode pay for the weights read of an
   iteration in proportion to the KV it occupies: at most ``K / context`` such decodes
   share an iteration). "KV tokens it reads" counts only its decode iterations, each
   reading its own prompt tokens plus the tokens generated so far; with prefix caching, a
   full prompt unit may be shared with other requests and counted once by the engine, so
   only the prompt tokens outside full units count as its own. A request's prefill charges
   lie in the time span of its prefill iterations, inside ``[earliest, deadline -
   overhead_r]`` when it is on time; its decode charges lie before the run's end (``last
   arrival + drain_s``, plus one longest iteration that may start at the end). The LP lets
   this work be split freely in time (preemptively, fluidly) and, inside a pool of
   identical instance types, across instances: both only enlarge the set of feasible
   schedules.
   *Groups.* Requests alike in class, model and (widened) window on every pool form a
   group; the LP chooses how many of a group are on time on each pool, ``y_g``. A
   request's prefill charge on pool g is at least ``a_g·(its prefill tokens) + b_g`` with
   ``a_g = f_min·(c_tok + overhead/B)`` and ``b_g = f_min·s_seq`` (one iteration at least).
   The LP charges pool g ``a_g·t_g + b_g·y_g``, where the token variable ``t_g`` lies above
   a few supporting lines of "the sum of the ``y_g`` smallest prompts of the group" (a
   convex, piecewise linear function of ``y_g``; its supporting lines lie below it), and,
   because the pools' on-time sets are disjoint, ``Σ_g t_g`` lies above the supporting
   lines of "the sum of the ``Σ_g y_g`` smallest". Any real on-time set satisfies both, so
   the LP never charges more prefill than the real schedule does. Decode charges of a
   group are taken at its cheapest member's (they are only checked against the run's end,
   step 4).
3. **Time in slots, windows widened.** Time is cut into slots up to the last prefill
   deadline (``slot_s``, by default half the tightest TTFT target, while windows of that
   class are open; later, at most ``max(slot_s, TTFT/8)`` of the classes still open); one
   tail slot reaches the end of the run. A window becomes the slots it
   touches; long windows are widened further to a few aligned dyadic blocks, never into the
   tail slot when they end before it. Wider windows only allow more.
4. **Capacity as necessary conditions.** For a family of time intervals I (the blocks of a
   binary segment tree over the slots, and every suffix ``[k·K slots, end]``), the work of
   on-time requests whose window lies inside I fits in the pool's instance-seconds during
   I (Horn's necessary condition; for the laminar segment-tree family, with the LP free to
   split each window into its canonical blocks, it is the exact fluid transportation
   problem). Only a subset of all intervals is checked: fewer constraints, a larger
   feasible set. Prefill work counts in the tree; decode work only in the suffix
   constraints (the compute charge and, separately, each memory charge fits).
5. **Model placement relaxed away.** Inside a pool, any instance may serve any model it
   can, at any time, with no swap time, except that a model no instance of the pool holds
   at time 0 cannot be served there before its ``swap_s`` (step 1). Dropping constraints
   only enlarges the feasible set. (An earlier version charged swaps for rises of a
   fractional placement per epoch; a fraction can time-share a GPU between models without
   ever rising, so that charge bought almost nothing and made the LP several times larger.)
6. **Rounding and certification.** The LP optimum over the on-time count is certified by
   weak duality from GLOP's dual values (any dual vector bounds the maximum, since every
   variable has a finite box), so solver tolerances or a time-out cannot make U too low;
   then it is floored: a run's on-time count is an integer. Per class, the LP is re-solved
   with only that class's requests in the objective, so ``U_class`` bounds that class under
   any policy, including ones that sacrifice the other classes. One shortcut is exact: when
   the LP puts on time every request that passes step 1, U equals that count and the
   per-class bounds are the classes' step-1 counts (no policy can do better than all of
   them at once).
7. **Prefix caching.** When the engine caches prefixes, a request carrying
   ``prefix_hashes`` is charged only the prompt tokens no cache hit could skip (all its full
   units may hit, leaving at least one token to compute), as if another request had just
   computed its prefix.

Why decode is not charged inside TTFT windows
---------------------------------------------
A request occupies a seat and KV memory from its admission until it finishes, so in a
real run its decode slows later requests' admission. The bound cannot count that against a
policy: the runtime's ``evict`` lets a policy abort a request right after its first token
(the request keeps ``first_token_at`` and its generated tokens) and re-dispatch it later,
when it recomputes its prompt and decodes, for example in the drain period. Such a request
holds KV only while it is prefilled. So the only valid place for decode work (and for the
recompute an eviction costs) is "before the run ends", which is where the suffix
constraints put it, with the KV-capacity charge above; with the scenario suite's hour-long
drain those constraints rarely bind, and U is then set by prefill capacity within the TTFT
windows, by the first swap of a model no instance holds, and by the isolation test. Requests that are not on time cost nothing in
the LP although a real run still serves them: ignoring work only raises U.
(``benchmarks/bound_scale/evict_defer.py`` runs such a policy: 99.9% on the mooncake
scenario at x4.23, where the planner attains 83.9%.)

What it does not model (and therefore never counts against a policy): seats and KV as
limits on concurrency within a window (see above), swaps after the first (step 5),
preemption and recompute, the in-flight
iteration an arrival waits for, the order of chunks within an iteration, and any TPOT
interaction beyond the per-request test. These are where U is loose, most of all when
misses come from decode congestion rather than from prefill capacity.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import Request
from qlm_opt.engines.perf import IterationModel, iteration_model, swap_s
from qlm_opt.errors import QLMError

log = logging.getLogger(__name__)

#: Progress callback: (stage, done, total).
Progress = Callable[[str, int, int], None]

_EPS = 1e-9  # Request.attained's tolerance on the TTFT and TPOT targets
_MAX_PIECES = 8  # dyadic blocks per window before it is widened
_PROMPT_RATIO = 1.25  # prompt-length classes of a group served by several pools (geometric)
_TANGENTS = 4  # supporting lines of a group's "y cheapest" prefill work


class BoundError(QLMError):
    """Bad input to the bound (the CLI prints it as one line, exit code 2)."""


@dataclass(slots=True)
class BoundResult:
    """U overall and per class, with how it was obtained.

    ``slo_attainment`` and ``per_class[c]`` are fractions in [0, 1] (per_class is None for a
    class with no request). ``isolation`` is the weaker bound of step 1 alone (requests that
    could be on time on an empty fleet). ``status`` is ``"optimal"`` when every LP solved,
    else ``"isolation"`` (U fell back to the isolation bound, still valid). Times in
    seconds; ``lp`` gives the LP's size.
    """

    slo_attainment: float
    per_class: dict[str, float | None]
    num_requests: int
    num_on_time_max: int  # U · num_requests
    per_class_requests: dict[str, int]
    isolation: float
    isolation_per_class: dict[str, float | None]
    status: str
    slot_s: float
    num_slots: int
    build_s: float
    solve_s: float
    wall_s: float
    lp: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The ``bound`` section of a what-if report."""
        return {
            "slo_attainment": self.slo_attainment,
            "per_class": {c: {"slo_attainment": v, "num_requests": self.per_class_requests[c]}
                          for c, v in self.per_class.items()},
            "num_requests": self.num_requests,
            "num_on_time_max": self.num_on_time_max,
            "isolation": {"slo_attainment": self.isolation,
                          "per_class": dict(self.isolation_per_class)},
            "status": self.status,
            "slot_s": self.slot_s,
            "num_slots": self.num_slots,
            "build_s": self.build_s,
            "solve_s": self.solve_s,
            "wall_s": self.wall_s,
            "lp": dict(self.lp),
        }


# -- the engine model, per pool of identical instances ------------------------------------------
@dataclass(slots=True)
class _ModelOnPool:
    """One model on one pool's GPU type: the constants the bound needs."""

    im: IterationModel
    max_model_len: int
    swap_s: float
    f_min: float  # smallest speed factor (1 on a steady machine)
    max_iter_s: float  # longest possible iteration (end-of-run slack)
    kv_tokens: int  # KV tokens an iteration can read at most (whole blocks)


@dataclass(slots=True)
class _Pool:
    gpu: str
    tp: int
    count: int
    init: dict[str, int]  # model -> instances holding it at time 0
    models: dict[str, _ModelOnPool]  # models it may serve


def _pools(fleet: Fleet, wanted: set[str]) -> list[_Pool]:
    """Group instances with the same GPU type, degree and servable models."""
    by: dict[tuple, _Pool] = {}
    cache: dict[tuple, _ModelOnPool] = {}
    for spec in fleet.instances:
        serv = tuple(sorted(m for m in wanted if fleet.can_serve(spec, m)))
        key = (spec.gpu, spec.tp, serv)
        pool = by.get(key)
        if pool is None:
            models = {}
            for m in serv:
                k = (m, spec.gpu, spec.tp)
                if k not in cache:
                    cache[k] = _model_on(fleet, m, spec.gpu, spec.tp)
                models[m] = cache[k]
            pool = by[key] = _Pool(spec.gpu, spec.tp, 0, {}, models)
        pool.count += 1
        if spec.initial_model is not None:
            pool.init[spec.initial_model] = pool.init.get(spec.initial_model, 0) + 1
    return list(by.values())


def _model_on(fleet: Fleet, model: str, gpu: str, tp: int) -> _ModelOnPool:
    cat = fleet.catalog
    eng = fleet.engine
    im = iteration_model(cat, model, gpu, tp, fleet.perf)
    kv_cap = cat.kv_capacity_tokens(model, gpu, tp)
    bs = eng.block_size
    # SimEngine._set_model, with the runtime's max_model_len (the model's context)
    mml = cat.model(model).max_context or kv_cap
    if eng.max_model_len:
        mml = min(mml, eng.max_model_len)
    mml = min(mml, (kv_cap // bs) * bs - bs)
    q = im.slowdown_q
    f_min = min(q) if q else 1.0
    f_max = max(q) if q else 1.0
    longest = im.iteration_s(eng.max_num_batched_tokens, kv_cap, eng.max_num_seqs)
    return _ModelOnPool(
        im=im,
        max_model_len=mml,
        swap_s=swap_s(cat, model, gpu, tp, fleet.warm_swaps, fleet.perf),
        f_min=max(0.0, f_min),
        max_iter_s=longest * max(1.0, f_max) + im.overhead_s,
        kv_tokens=max(bs, (kv_cap // bs) * bs),
    )


# -- per-request quantities ---------------------------------------------------------------------
@dataclass(slots=True)
class _Need:
    """What one request needs on one pool, when it can be on time there."""

    start_at: float  # earliest start of its prefill
    end_at: float  # its prefill must end by then
    prefill_work_s: float  # compute charge of its prefill
    compute_work_s: float  # compute charge, prefill + decode
    memory_work_s: float  # memory charge by seats, prefill + decode
    kv_work_s: float  # memory charge by KV capacity, prefill + decode
    prefill_tokens: int  # prompt tokens it must compute at least
    prefill_per_token_s: float  # its prefill charge is at least this per token ...
    prefill_per_request_s: float  # ... plus this


def _min_prefill_tokens(r: Request, caching: bool) -> int:
    """Prompt tokens the engine must compute at least: with prefix caching, every full unit
    of its ``prefix_hashes`` may be a cache hit (as if another request had just computed it),
    except that at least one token is always computed (``SimEngine._pc_hits``)."""
    p = r.prompt_tokens
    hashes = getattr(r, "prefix_hashes", None)
    ut = getattr(r, "hash_block_tokens", 0)
    if not (caching and hashes and ut > 0 and p > 0):
        return p
    hits = min(len(hashes), p // ut, (p - 1) // ut)
    return p - hits * ut


def _need(r: Request, mp: _ModelOnPool, holds_at_start: bool, fleet: Fleet,
          horizon_at: float) -> _Need | None:
    """Step 1 of the argument: None when ``r`` cannot be on time on this pool at all."""
    im = mp.im
    eng = fleet.engine
    p = r.prompt_tokens
    if p + r.num_generated + 1 > mp.max_model_len:
        return None  # the engine drops it (prompt_too_long)
    big_b = eng.max_num_batched_tokens
    pre_tok = _min_prefill_tokens(r, eng.enable_prefix_caching)
    n_pre = max(1, -(-pre_tok // big_b))
    f = mp.f_min
    egress = im.request_overhead_for(r.id)
    start = r.arrived_at if holds_at_start else max(r.arrived_at, mp.swap_s)
    ttft_min = f * (n_pre * (im.overhead_s + im.s_seq)
                    + max(im.c_tok * pre_tok, n_pre * im.m0)) + egress
    if start + ttft_min > r.deadline_at + _EPS:
        return None
    out_cap = max(1, min(r.output_tokens, mp.max_model_len - p))
    n_dec = out_cap - 1
    if r.tpot_s is not None and n_dec >= 1:
        tpot_min = f * (im.overhead_s + im.s_seq + max(im.c_tok, im.m0 + im.m_kv * p))
        if tpot_min > r.tpot_s + _EPS:
            return None
    end = min(r.deadline_at + _EPS - egress, horizon_at)
    if end < start:
        return None
    per_tok = im.c_tok + im.overhead_s / big_b
    pre = f * (per_tok * pre_tok + im.s_seq * n_pre)
    dec = f * (per_tok + im.s_seq) * n_dec
    # KV tokens its decode iterations read at least: its own prompt tokens (a shared cached
    # unit counts once in the engine's KV, so none of its full units is counted) and the
    # tokens it generated so far.
    kv_read = n_dec * _own_kv_tokens(r, eng.enable_prefix_caching) + n_dec * (n_dec - 1) / 2.0
    fixed = im.overhead_s + im.m0
    mem = f * ((fixed / eng.max_num_seqs + im.s_seq) * (n_pre + n_dec) + im.m_kv * kv_read)
    kvw = f * (im.s_seq * (n_pre + n_dec) + (fixed / mp.kv_tokens + im.m_kv) * kv_read)
    return _Need(start, end, pre, pre + dec, mem, kvw, pre_tok, f * per_tok, f * im.s_seq)


def _own_kv_tokens(r: Request, caching: bool) -> int:
    """Prompt tokens of ``r`` in the KV cache that no other request can share: with prefix
    caching, all but its full units."""
    p = r.prompt_tokens
    hashes = getattr(r, "prefix_hashes", None)
    ut = getattr(r, "hash_block_tokens", 0)
    if not (caching and hashes and ut > 0):
        return p
    return p - min(len(hashes), p // ut) * ut


# -- a small sparse LP builder ------------------------------------------------------------------
class _LP:
    """Variables with finite boxes and rows lo <= a·x <= hi, kept as flat lists."""

    def __init__(self) -> None:
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.row_lo: list[float] = []
        self.row_hi: list[float] = []
        self.r_idx: list[int] = []
        self.c_idx: list[int] = []
        self.coef: list[float] = []

    def var(self, ub: float, lb: float = 0.0) -> int:
        self.lb.append(lb)
        self.ub.append(ub)
        return len(self.lb) - 1

    def row(self, idx: Sequence[int], coef: Sequence[float], lo: float = -math.inf,
            hi: float = math.inf) -> int:
        if len(set(idx)) != len(idx):  # a variable twice: one term (solvers reject both)
            merged: dict[int, float] = {}
            for i, c in zip(idx, coef):
                merged[i] = merged.get(i, 0.0) + c
            idx, coef = list(merged), list(merged.values())
        k = len(self.row_lo)
        self.row_lo.append(lo)
        self.row_hi.append(hi)
        self.r_idx.extend([k] * len(idx))
        self.c_idx.extend(idx)
        self.coef.extend(coef)
        return k

    @property
    def num_vars(self) -> int:
        return len(self.lb)

    @property
    def num_rows(self) -> int:
        return len(self.row_lo)


def _solve_lp(lp: _LP, obj: np.ndarray, time_limit_s: float | None,
              primal: bool = False) -> tuple[float | None, str]:
    """Maximize ``obj·x`` with GLOP (dual simplex). Returns (value, status): with ``primal``
    the optimal objective; otherwise a weak-duality bound on the optimum computed from the
    solver's row duals, valid whatever they are (also after a time-out); None when the
    solver gave nothing to work with."""
    from ortools.linear_solver.python import model_builder_helper as mbh

    h = mbh.ModelBuilderHelper()
    n = lp.num_vars
    lb = np.asarray(lp.lb, dtype=float)
    ub = np.asarray(lp.ub, dtype=float)
    h.add_var_array_with_bounds(lb, ub, np.zeros(n, dtype=bool), "x")
    nz = np.flatnonzero(obj)
    h.set_objective_coefficients(nz.tolist(), obj[nz].tolist())
    h.set_maximize(True)
    r_idx = np.asarray(lp.r_idx, dtype=np.int64)
    c_idx = np.asarray(lp.c_idx, dtype=np.int64)
    coef = np.asarray(lp.coef, dtype=float)
    order = np.argsort(r_idx, kind="stable")
    starts = np.searchsorted(r_idx[order], np.arange(lp.num_rows + 1))
    cs, vs = c_idx[order].tolist(), coef[order].tolist()
    add_row, set_lo, set_hi = h.add_linear_constraint, h.set_constraint_lower_bound, \
        h.set_constraint_upper_bound
    add_term = h.add_term_to_constraint
    for k in range(lp.num_rows):
        ct = add_row()
        set_lo(ct, lp.row_lo[k])
        set_hi(ct, lp.row_hi[k])
        for j in range(starts[k], starts[k + 1]):
            add_term(ct, cs[j], vs[j])
    s = mbh.ModelSolverHelper("glop")
    s.set_solver_specific_parameters("use_dual_simplex: true")
    if time_limit_s is not None:
        s.set_time_limit_in_seconds(max(0.1, time_limit_s))
    s.solve(h)
    status = s.status()
    st = str(status).rsplit(".", 1)[-1].lower()
    optimal = status == mbh.SolveStatus.OPTIMAL and s.has_solution()
    if primal:
        return (s.objective_value() if optimal else None), st
    try:
        y = np.asarray(s.dual_values(), dtype=float)
    except Exception:  # noqa: BLE001 - no response to read duals from
        y = np.zeros(0)
    if len(y) != lp.num_rows or not np.all(np.isfinite(y)):
        return None, st
    # Weak duality: for any row multipliers y, max obj·x over the LP is at most
    # Σ_k max over the row's range of y_k·(a_k·x) + Σ_j max over the box of (obj - Aᵀy)_j·x_j.
    lo = np.asarray(lp.row_lo, dtype=float)
    hi = np.asarray(lp.row_hi, dtype=float)
    y = np.where((y > 0) & ~np.isfinite(hi), 0.0, y)
    y = np.where((y < 0) & ~np.isfinite(lo), 0.0, y)
    rows_part = float(np.sum(np.where(y > 0, y * np.where(np.isfinite(hi), hi, 0.0),
                                      y * np.where(np.isfinite(lo), lo, 0.0))))
    aty = np.zeros(n)
    np.add.at(aty, c_idx, coef * y[r_idx])
    red = obj - aty
    cols_part = float(np.sum(np.maximum(red * lb, red * ub)))
    certified = rows_part + cols_part
    if optimal:
        primal_v = s.objective_value()
        log.debug("bound: primal %.6g, dual certificate %.6g", primal_v, certified)
        if not math.isfinite(certified) or certified < primal_v - 1e-6 * max(1.0, abs(primal_v)):
            log.warning("bound: dual certificate %.6g below the primal %.6g; using the primal",
                        certified, primal_v)
            certified = primal_v + 1e-6 * max(1.0, abs(primal_v))
    if not math.isfinite(certified):
        return None, st
    return certified, ("optimal" if optimal else st)


def _cheapest(lp: _LP, y: int, w: np.ndarray,
              lines: int = _TANGENTS) -> tuple[list[int], list[float]]:
    """A linear expression, in ``y`` and perhaps one new variable, that is at most the sum of
    the ``y`` smallest of the charges ``w`` (sorted): on time on a pool, any ``y`` requests of
    a group need at least that much. That sum is convex and piecewise linear in ``y``; the
    new variable lies above a few of its supporting lines (each below the function), so it
    can only be lower than the real work."""
    n = len(w)
    lo = float(w[0])
    if n == 1 or float(w[-1]) <= lo * 1.02:
        return [y], [lo]
    cs = np.concatenate(([0.0], np.cumsum(w)))
    big_w = lp.var(ub=float(cs[-1]))
    kk = min(n, lines)
    for k in sorted({int(round(j * n / kk)) for j in range(kk)}):
        slope = float(w[k])  # the (k+1)-th cheapest
        lp.row([big_w, y], [1.0, -slope], lo=float(cs[k]) - slope * k)
    return [big_w], [1.0]


def _cheapest_joint(lp: _LP, ys: list[int], ts: list[int], w: np.ndarray) -> None:
    """Rows ``Σ ts >= (sum of the Σ ys smallest of w)``, by supporting lines (see
    ``_cheapest``): the pools' on-time sets of a group are disjoint."""
    n = len(w)
    cs = np.concatenate(([0.0], np.cumsum(w)))
    kk = min(n, _TANGENTS)
    for k in sorted({int(round(j * n / kk)) for j in range(kk)}):
        slope = float(w[k])
        lp.row(list(ts) + list(ys), [1.0] * len(ts) + [-slope] * len(ys),
               lo=float(cs[k]) - slope * k)


# -- the segment tree over slots ----------------------------------------------------------------
def _pieces(s: int, e: int, size: int) -> list[int]:
    """Canonical segment-tree nodes (heap ids, leaves at ``size + i``) covering [s, e]."""
    out = []
    lo, hi = s + size, e + size + 1
    while lo < hi:
        if lo & 1:
            out.append(lo)
            lo += 1
        if hi & 1:
            hi -= 1
            out.append(hi)
        lo >>= 1
        hi >>= 1
    return out


def _widen(s: int, e: int, size: int, last: int) -> tuple[int, int]:
    """Widen [s, e] to aligned blocks until it is at most ``_MAX_PIECES`` tree nodes, never
    past ``last`` (a superset of [s, e] when ``e <= last``). The caller passes the last
    uniform slot for a window that ends before the tail: widening a window into the long
    tail slot would hand it the whole drain period."""
    s0, e0 = s, e
    k = 0
    while len(_pieces(s, e, size)) > _MAX_PIECES and (s > 0 or e < last):
        k += 1
        s = (s0 >> k) << k
        e = min((((e0 >> k) + 1) << k) - 1, last)
    return s, e


def _node_range(x: int, size: int) -> tuple[int, int]:
    depth = x.bit_length() - 1
    span = size >> depth
    first = (x - (1 << depth)) * span
    return first, first + span - 1


# -- the bound ----------------------------------------------------------------------------------
def compute_bound(
    requests: Sequence[Request],
    workload: Workload,
    fleet: Fleet,
    *,
    drain_s: float = 3600.0,
    slot_s: float | None = None,
    max_slots: int = 4096,
    per_class: bool = True,
    time_limit_s: float | None = 20.0,
    progress: Progress | None = None,
) -> BoundResult:
    """U for ``requests`` (as ``build_requests`` makes them, not yet simulated) on ``fleet``.

    ``drain_s`` must match the what-if run's (the run ends that long after the last arrival).
    ``slot_s`` is the LP's time step (default: half the tightest TTFT target, coarser when
    the run would need more than ``max_slots`` slots). ``per_class`` solves one more LP per
    class for the per-class bounds (otherwise per-class values are the isolation bounds).
    ``time_limit_s`` caps each LP solve (None: no cap); after a time-out U comes from the
    dual values reached so far (still a valid bound, maybe a weaker one), or else from the
    isolation bound.
    ``progress(stage, done, total)`` is called while building and solving.
    """
    t_start = time.perf_counter()
    _check(requests, workload, fleet, drain_s, slot_s, max_slots)
    classes = list(workload.classes)
    n_req = len(requests)
    cls_count = {c: 0 for c in classes}
    for r in requests:
        cls_count[r.slo_class] = cls_count.get(r.slo_class, 0) + 1
    if n_req == 0:
        return BoundResult(0.0, {c: None for c in classes}, 0, 0, cls_count, 0.0,
                           {c: None for c in classes}, "optimal", 0.0, 0, 0.0, 0.0, 0.0)

    wanted = {r.model for r in requests}
    pools = _pools(fleet, wanted)
    last_arrival = max(r.arrived_at for r in requests)
    slack = max((mp.max_iter_s for p in pools for mp in p.models.values()), default=0.0)
    horizon_at = last_arrival + drain_s + slack

    # Step 1: what each request needs on each pool, or None.
    needs: list[list[_Need | None]] = []
    step = max(1, n_req // 50)
    for k, r in enumerate(requests):
        row = []
        for p in pools:
            mp = p.models.get(r.model)
            row.append(None if mp is None else
                       _need(r, mp, p.init.get(r.model, 0) > 0, fleet, horizon_at))
        needs.append(row)
        if progress and k % step == 0:
            progress("isolation", k, n_req)
    if progress:
        progress("isolation", n_req, n_req)
    feasible = [any(x is not None for x in row) for row in needs]
    iso_cls = {c: 0 for c in cls_count}
    for r, ok in zip(requests, feasible):
        if ok:
            iso_cls[r.slo_class] += 1
    iso_total = sum(iso_cls.values())
    iso_frac = {c: (iso_cls[c] / cls_count[c] if cls_count[c] else None) for c in cls_count}

    # Slots: up to the last prefill end, then one tail slot to the run's end. Each class's
    # windows get slots of at most max(slot_s, its TTFT / 8) while any of its windows is
    # open (the default slot_s is half the tightest target), so a long-target class that
    # outlives the tight ones does not multiply the slots.
    ends: dict[str, float] = {}
    for r, row in zip(requests, needs):
        for x in row:
            if x is not None and x.end_at > ends.get(r.slo_class, -1.0):
                ends[r.slo_class] = x.end_at
    explicit = slot_s is not None
    if slot_s is None:
        tight = min(workload.classes[c].ttft_s for c in cls_count if cls_count[c])
        slot_s = tight / 2.0
    last_end = max(ends.values(), default=0.0)
    uniform_end = min(horizon_at, max(last_end, slot_s))
    slot_s = max(slot_s, uniform_end / max_slots)
    if explicit:
        regions = [(uniform_end, slot_s)]
    else:
        regions = []  # (end of region, step)
        for c, e in sorted(ends.items(), key=lambda kv: kv[1]):
            step = min(max(slot_s, workload.classes[k].ttft_s / 8.0)
                       for k, ek in ends.items() if ek >= e)
            regions.append((min(e, uniform_end), step))
        regions.append((uniform_end, regions[-1][1] if regions else slot_s))
    edges = [0.0]
    for end, step in regions:
        while edges[-1] < end - 1e-9 * max(1.0, end) and len(edges) <= 4 * max_slots:
            edges.append(min(end, edges[-1] + step) if end - edges[-1] > 1.5 * step
                         else end)
    n_uni = len(edges) - 1
    if n_uni == 0:
        edges.append(slot_s)
        n_uni = 1
    has_tail = horizon_at > edges[-1] + 1e-9
    if has_tail:
        edges.append(horizon_at)
    n_slots = len(edges) - 1
    edges_a = np.asarray(edges)

    def slot_of(t: float) -> int:
        if t >= edges[n_uni]:
            return n_slots - 1
        return max(0, min(n_uni - 1, int(np.searchsorted(edges_a, t, side="right")) - 1))

    size = 1 << max(0, (n_slots - 1).bit_length())
    ck_every = max(1, n_slots // 128)

    def _window(s: int, e: int) -> tuple[int, int]:
        return _widen(s, e, size, n_uni - 1 if e < n_uni else n_slots - 1)

    # Groups: requests alike in class, model and windows on every pool. Within a group the
    # LP counts how many are on time per pool; their work is bounded below by the convex
    # "sum of the y smallest" of each charge (see _cheapest).
    t_build = time.perf_counter()
    groups: dict[tuple, list[int]] = {}
    for k, (r, row) in enumerate(zip(requests, needs)):
        if not feasible[k]:
            continue
        win = tuple(
            None if x is None else _window(slot_of(x.start_at), slot_of(x.end_at))
            for x in row
        )
        groups.setdefault((r.slo_class, r.model, win), []).append(k)
        if progress and k % step == 0:
            progress("groups", k, n_req)
    # Per group and pool: the sorted charges, shared by both builds.
    charges: dict[tuple[int, int], list[np.ndarray]] = {}
    tokens: dict[int, np.ndarray] = {}  # per group: its prefill tokens, sorted
    prefill_rate: dict[tuple[int, int], tuple[float, float]] = {}
    for gi, ((_, _, win), members) in enumerate(groups.items()):
        tokens[gi] = np.sort(np.fromiter((next(x for x in needs[k] if x is not None)
                                          .prefill_tokens for k in members), float,
                                         len(members)))
        for g, w in enumerate(win):
            if w is not None:
                x = needs[members[0]][g]
                prefill_rate[gi, g] = (x.prefill_per_token_s, x.prefill_per_request_s)
        for g, w in enumerate(win):
            if w is None:
                continue
            ns = [needs[k][g] for k in members]
            charges[gi, g] = [np.sort(np.fromiter((getattr(x, a) for x in ns), float, len(ns)))
                              for a in ("compute_work_s", "memory_work_s", "kv_work_s")]

    # Suffix checkpoints: every ``ck_every`` slots; the run ends at horizon_at.
    slot_start = edges_a[:-1]
    pool_cnt = [float(p.count) for p in pools]

    def build() -> tuple[_LP, list[int], list[str]]:
        """The LP: per pool, prefill work in the blocks of a segment tree and all work from
        each checkpoint on fit in the pool's instance-seconds (step 4)."""
        lp = _LP()
        y_class: list[str] = []  # class of each y variable, by position in y_vars
        y_vars: list[int] = []
        # per pool: own work per tree node, suffix work per checkpoint
        own: list[dict[int, tuple[list[int], list[float]]]] = [{} for _ in pools]
        suffix: list[list[dict[int, tuple[list[int], list[float]]]]] = [
            [{}, {}, {}] for _ in pools]  # compute, memory by seats, memory by KV
        nb = len(groups)
        for gi, ((cls, _model, win), members) in enumerate(groups.items()):
            ys = []
            toks = tokens[gi]
            spread = float(toks[-1]) > float(toks[0]) * 1.02
            ts = []
            for g, w in enumerate(win):
                if w is None:
                    continue
                comp_s, mem_s, kvw_s = charges[gi, g]
                a, b = prefill_rate[gi, g]
                y = lp.var(ub=float(len(members)))
                ys.append(y)
                y_vars.append(y)
                y_class.append(cls)
                # prefill work on this pool >= a·(its prefill tokens) + b·(its requests)
                if spread:
                    t_i, t_c = _cheapest(lp, y, toks)
                    ts.append(t_i[0])
                    pre_i, pre_c = [t_i[0], y], [a, b]
                else:
                    pre_i, pre_c = [y], [a * float(toks[0]) + b]
                pre_cap = a * float(toks.sum()) + b * len(members)
                pieces = _pieces(w[0], w[1], size)
                node_own = own[g]
                if len(pieces) == 1:
                    vi, vc = node_own.setdefault(pieces[0], ([], []))
                    vi.extend(pre_i)
                    vc.extend(pre_c)
                else:
                    idx, cf = list(pre_i), [-c for c in pre_c]
                    for nd in pieces:
                        v = lp.var(ub=pre_cap)
                        vi, vc = node_own.setdefault(nd, ([], []))
                        vi.append(v)
                        vc.append(1.0)
                        idx.append(v)
                        cf.append(1.0)
                    lp.row(idx, cf, lo=0.0, hi=0.0)
                blk = w[0] // ck_every
                for table, sorted_w in zip(suffix[g], (comp_s, mem_s, kvw_s)):
                    ti, tc = table.setdefault(blk, ([], []))
                    ti.append(y)
                    tc.append(float(sorted_w[0]))  # the group's cheapest, for each one
            if ys:
                lp.row(ys, [1.0] * len(ys), hi=float(len(members)))
            if len(ts) > 1:
                # The pools' sets are disjoint: together they hold at least the tokens of
                # the (Σ y) smallest prompts, not the y smallest on every pool.
                _cheapest_joint(lp, ys, ts, toks)
            if progress and gi % max(1, nb // 50) == 0:
                progress("build LP", gi, nb + len(pools))

        for g in range(len(pools)):
            cnt = pool_cnt[g]
            # Segment-tree capacity (prefill windows): the work of the windows inside a node
            # fits in the node's instance-seconds.
            node_own = own[g]
            active = set()
            for nd in node_own:
                while nd >= 1 and nd not in active:
                    active.add(nd)
                    nd >>= 1
            sub: dict[int, int] = {}
            for nd in sorted(active, reverse=True):
                kids = [sub[c] for c in (2 * nd, 2 * nd + 1) if c in sub]
                mine = node_own.get(nd)
                if mine is None and len(kids) == 1:
                    sub[nd] = kids[0]  # same work; the child's (smaller) capacity rules
                    continue
                s, e = _node_range(nd, size)
                e = min(e, n_slots - 1)
                cap = cnt * float(edges_a[e + 1] - edges_a[s])
                wv = lp.var(ub=cap)
                idx = list(mine[0]) if mine else []
                cf = list(mine[1]) if mine else []
                lp.row(idx + kids + [wv], cf + [1.0] * len(kids) + [-1.0], lo=0.0, hi=0.0)
                sub[nd] = wv
            # Suffix capacity: all work of requests released from a checkpoint on fits in the
            # pool's instance-seconds from the checkpoint to the run's end.
            for table in suffix[g]:
                if not table:
                    continue
                nxt = None
                for blk in range(max(table), -1, -1):
                    cap = cnt * float(horizon_at - slot_start[min(blk * ck_every,
                                                                  n_slots - 1)])
                    rv = lp.var(ub=max(0.0, cap))
                    bi_, bc_ = table.get(blk, ([], []))
                    idx = list(bi_) + ([nxt] if nxt is not None else []) + [rv]
                    cf = list(bc_) + ([1.0] if nxt is not None else []) + [-1.0]
                    lp.row(idx, cf, lo=0.0, hi=0.0)
                    nxt = rv
            if progress:
                progress("build LP", nb + g + 1, nb + len(pools))
        return lp, y_vars, y_class

    todo = [None] + ([c for c in classes if cls_count.get(c)] if per_class else [])
    results: dict[str | None, float | None] = {}
    status = "optimal"
    solve_s = 0.0

    def solve(lp: _LP, y_vars: list[int], y_class: list[str], c: str | None) -> float | None:
        nonlocal solve_s
        t0 = time.perf_counter()
        yv = np.asarray(y_vars, dtype=np.int64)
        sel = yv if c is None else yv[np.asarray(y_class, dtype=object) == c]
        if len(sel) == 0:
            return 0.0
        obj = np.zeros(lp.num_vars)
        obj[sel] = 1.0
        nonlocal status
        val, st = _solve_lp(lp, obj, time_limit_s)
        solve_s += time.perf_counter() - t0
        if st != "optimal" and val is not None and status == "optimal":
            status = "dual"  # a time-out: the bound comes from the duals reached so far
        if st != "optimal":
            log.warning("bound: LP for %s ended %s; its dual still bounds it: %s",
                        c or "all classes", st, val)
        return val

    lp, y_vars, y_class = build()
    build_s = time.perf_counter() - t_build
    lp_size = {"variables": lp.num_vars, "rows": lp.num_rows, "nonzeros": len(lp.coef),
               "groups": len(groups), "pools": len(pools)}
    log.info("bound LP: %d vars, %d rows, %d nonzeros, %d groups, %d slots of %.3f s",
             lp.num_vars, lp.num_rows, len(lp.coef), len(groups), n_slots, slot_s)
    if progress:
        progress("solve LP", 0, len(todo))
    for i, c in enumerate(todo):
        results[c] = solve(lp, y_vars, y_class, c)
        if progress:
            progress("solve LP", i + 1, len(todo))
        if results[c] is None:
            status = "isolation"
        if c is None and results[c] is not None and results[c] >= iso_total - 1e-6:
            # every request passing step 1 fits at once: each class's bound is its own
            results.update({k: float(iso_cls[k]) for k in todo if k is not None})
            break
    if progress:
        progress("solve LP", len(todo), len(todo))

    def whole(v: float | None, cap: int) -> int:
        # A run's on-time count is an integer: floor, with room for LP round-off.
        if v is None:
            return cap
        return max(0, min(cap, int(math.floor(v + 1e-3))))

    total = whole(results.get(None), iso_total)
    pc: dict[str, float | None] = {}
    for c in cls_count:
        if not cls_count[c]:
            pc[c] = None
        elif per_class and c in results:
            pc[c] = whole(results[c], iso_cls[c]) / cls_count[c]
        else:
            pc[c] = iso_frac[c]
    return BoundResult(
        slo_attainment=total / n_req,
        per_class=pc,
        num_requests=n_req,
        num_on_time_max=total,
        per_class_requests=dict(cls_count),
        isolation=iso_total / n_req,
        isolation_per_class=iso_frac,
        status=status,
        slot_s=float(slot_s),
        num_slots=n_slots,
        build_s=build_s,
        solve_s=solve_s,
        wall_s=time.perf_counter() - t_start,
        lp=lp_size,
    )


def _check(requests, workload: Workload, fleet: Fleet, drain_s: float, slot_s, max_slots) -> None:
    """One clear message for each input the bound cannot take."""
    if not (drain_s >= 0 and math.isfinite(drain_s)):
        raise BoundError(f"drain_s must be a finite number >= 0, got {drain_s}")
    if slot_s is not None and not (slot_s > 0 and math.isfinite(slot_s)):
        raise BoundError(f"slot_s must be a finite number > 0, got {slot_s}")
    if max_slots < 1:
        raise BoundError(f"max_slots must be >= 1, got {max_slots}")
    workload.check_models(fleet.catalog)
    prev = -math.inf
    for r in requests:
        if r.slo_class not in workload.classes:
            raise BoundError(f"request {r.id}: unknown SLO class {r.slo_class!r} "
                             f"(workload has: {', '.join(workload.classes)})")
        if r.model not in fleet.catalog.models:
            raise BoundError(f"request {r.id}: unknown model {r.model!r}")
        if not (math.isfinite(r.arrived_at) and math.isfinite(r.deadline_at)):
            raise BoundError(f"request {r.id}: arrival and deadline must be finite")
        if r.arrived_at < 0:
            raise BoundError(f"request {r.id}: arrived_at must be >= 0, got {r.arrived_at}")
        if r.arrived_at < prev:
            raise BoundError("requests must be sorted by arrival time")
        if r.prompt_tokens < 0 or r.output_tokens < 1:
            raise BoundError(f"request {r.id}: needs prompt_tokens >= 0 and output_tokens >= 1")
        if r.is_done or r.first_token_at is not None:
            raise BoundError(f"request {r.id} was already simulated; pass fresh requests")
        prev = r.arrived_at


def bound_for_whatif(trace, workload: Workload, fleet: Fleet, seed: int | None = None,
                     drain_s: float = 3600.0, progress: Progress | None = None,
                     **kwargs) -> BoundResult:
    """U for exactly the request list a what-if run replays (same trace, seed and cuts)."""
    from qlm_opt.whatif.workload import prepare_requests

    workload.check_models(fleet.catalog)
    reqs = prepare_requests(trace, workload, seed)()
    return compute_bound(reqs, workload, fleet, drain_s=drain_s, progress=progress, **kwargs)
