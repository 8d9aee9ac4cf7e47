"""RWT estimator: the waiting-time distribution of a request at a queue position on an instance.

The same code serves simulated and live engines: it reads ``engine.stats()``,
``engine.running_requests()``, ``engine.waiting_requests()`` and the known request fields
(prompt tokens, generated tokens, class, model). ``Request.output_tokens`` — the hidden ground
truth in what-if runs — is read only when ``clairvoyant=True``.

Model (times in engine iterations, converted to seconds at the end)
-------------------------------------------------------------------
Continuous batching gives an instance ``S`` seats (``max_num_seqs``, or fewer when the KV cache
holds fewer average-size sequences). A waiting request gets a seat when a running one
finishes, not when all tokens ahead are generated: position ``j`` (0-based, behind the engine's
own waiting queue and the virtual queue ahead) starts at the (j + 1 - free)-th completion.

* Running request ``i`` with ``g_i`` tokens generated finishes after ``L - g_i`` more
  iterations, with ``L`` its bucket's output-length distribution (lognormal by moments)
  conditioned on ``L > g_i``: P_i(x) = (F(g_i + x) - F(g_i)) / (1 - F(g_i)).
* Every freed seat is refilled at once by the next request ahead, which then finishes after
  ``L`` iterations. Expected completions C(x) obey the renewal equation
  C(x) = sum_i P_i(x) + int_0^x F(x - s) dStarts(s),  Starts(x) = free + C(x),
  solved on a grid over the transient (about two mean service times); beyond it the
  renewal asymptote holds: one start every mu / S iterations (QLM's CLT regime).
* Start of position j: the x where Starts(x) = j + 1. Its variance is Var C / C'(x)^2, with
  Var C = sum_i P_i(1 - P_i) (running, Bernoulli) + completions-of-new-starts * cv^2
  (renewal), and n sigma^2 / S^2 per request in the asymptotic part (CLT).
* Seconds: iterations times the decode iteration time at batch S, plus the prefill of prompt
  tokens ahead and of the request's own prompt at the prefill throughput, plus the remaining
  model-swap time, plus one iteration for the first token. The iteration model is a *prior*
  (``iter_model_of``: in what-if runs the fleet's ``[estimator] prior``, which need not be
  the model the engines run) calibrated online from engine stats alone (``engine_model``):
  the decode terms by measured/modelled decode throughput, the per-token prefill cost by
  measured/modelled prefill throughput. Prompt tokens count at ``1 - hit_frac``, the share
  the engine's prefix cache did not serve lately (its hit counters).
* Requests that will cut ahead later (EDF: later arrivals of tighter classes) are added as
  ``cut_in_per_s * min(W, horizon)`` extra positions (a fixed point, two rounds; the horizon
  is when later arrivals' deadlines stop coming first).
* Prefill phase (``prefill_phase``): from the moment a seat is there, the rest of the
  iteration in flight (half of it on average) and chunked prefill of the tokens ahead and of
  the request's own prompt, ``max_num_batched_tokens - b`` per iteration, each iteration at
  the roofline ``overhead + max(c_tok * tokens, memory)``. With a free seat this is the whole
  wait; it replaces "prompt * c_tok + one decode iteration at full batch", which was 1.7x too
  long for waits under 50 ms and blind to prefill queued ahead.
* Online calibration (``WaitCalibrator``): completed predictions per (SLO class, band of the
  model mean) give a bias factor (median observed / predicted) and a split-conformal interval
  factor; callers that pass ``key`` get the calibrated estimate.

Online calibration: output length mean and variance per (model, bucket) by Welford, with the
workload spec's lognormal as a prior worth ``prior_weight`` pseudo-observations; the speed
ratios (a running mean, then EWMA), the per-sequence KV footprint and the prefix-cache hit
fraction from ``stats()`` samples.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from dataclasses import dataclass

import numpy as np

from qlm_opt.core.output_lengths import LengthStats, OutputLengthModel
from qlm_opt.core.wait_calibration import WaitCalibrator, WaitEstimate
from qlm_opt.domain import Request
from qlm_opt.engines.base import prefill_pass

log = logging.getLogger(__name__)


_SQRT2 = math.sqrt(2.0)


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, vectorised (Abramowitz-Stegun 7.1.26 erf, |err| < 1.5e-7):
    0.5 (1 + sign(z) erf(|z| / sqrt 2)), erf(x) = 1 - t (a1 + t (a2 + ... + t a5)) exp(-x^2),
    t = 1 / (1 + p x). Evaluated in place on three buffers, operation by operation as
    written (IEEE + and * commute), so the floats are those of the expression."""
    x = np.abs(z)
    x /= _SQRT2
    poly = _erfc_as(x)
    np.subtract(1.0, poly, out=poly)  # erf
    out = np.sign(z)
    out *= poly
    out += 1.0
    out *= 0.5
    return out


def _erfc_as(x: np.ndarray) -> np.ndarray:
    """erfc(x) for x >= 0 by Abramowitz-Stegun 7.1.26, t (a1 + t (a2 + ... + t a5))
    exp(-x^2) with t = 1 / (1 + p x), operation by operation on two buffers (``x`` is
    overwritten), so that both callers get the floats of the written expression."""
    t = 0.3275911 * x
    t += 1.0
    np.divide(1.0, t, out=t)
    poly = t * 1.061405429
    poly += -1.453152027
    poly *= t
    poly += 1.421413741
    poly *= t
    poly += -0.284496736
    poly *= t
    poly += 0.254829592
    poly *= t
    x *= x
    np.negative(x, out=x)
    np.exp(x, out=x)
    poly *= x
    return poly


def _norm_sf(z: np.ndarray) -> np.ndarray:
    """Standard normal survival function 1 - Phi(z) by the erf of ``_norm_cdf``, in the
    dtype of ``z`` (the profile's running-requests matrix: float32), written so that the
    upper tail keeps its relative precision: 0.5 t (a1 + ... ) exp(-x^2) for z >= 0, one
    minus it below (``1 - _norm_cdf(z)`` rounds the upper tail to the dtype's resolution
    near 1, which a conditional residual divides by a small survival). In place on two
    buffers."""
    x = np.abs(z)
    x *= 1.0 / _SQRT2
    poly = _erfc_as(x)
    poly *= 0.5  # the upper tail
    np.subtract(1.0, poly, out=poly, where=z < 0)
    return poly


_ZERO1 = np.zeros(1)
_ONE1 = np.ones(1)
_ARANGES: dict[int, np.ndarray] = {}


def _grid(horizon: float, n_pts: int) -> np.ndarray:
    """``np.linspace(0.0, horizon, n_pts + 1)`` for ``horizon > 0``: the same floats
    (NumPy's arange times the step ``horizon / n_pts``, plus the start, the last point set to
    ``horizon``) without its per-call argument handling."""
    a = _ARANGES.get(n_pts)
    if a is None:
        a = _ARANGES[n_pts] = np.arange(0, n_pts + 1, dtype=float)
    y = a * (horizon / n_pts)
    y += 0.0
    y[-1] = horizon
    return y


def _renewal_series(c_run: np.ndarray, fcdf: np.ndarray, free: float
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Expected starts by each grid point (``free`` seats at once, then one per completion)
    and completions of the new starts, from the running requests' expected completions
    ``c_run`` and a new request's completion CDF ``fcdf`` on the grid: the renewal
    equation, by power series rather than stepped on the grid. The starts per step solve
    d = b + L d with L the lower-triangular Toeplitz matrix of the completion pmf
    (d[k] = b[k] + sum_{m<k} d[m] fpmf[k-1-m], b = the running requests' completions per
    step, b[0] = ``free``), i.e. D(z) = B(z) / A(z) with A(z) = 1 - sum_k fpmf[k] z^(k+1).
    1 / A is found by Newton's iteration on power series (u <- u (2 - A u), doubling the
    correct terms each round: six rounds of two short convolutions for 49 points instead
    of 48 Python steps, about twice as fast). The stepped loop's quantities in another
    summation order: within 1e-12 relative of it (unit test), not its floats."""
    n = len(fcdf)
    a = np.empty(n)
    a[0] = 1.0
    np.subtract(fcdf[:-1], fcdf[1:], out=a[1:])  # -fpmf
    u = _ONE1
    m = 1
    conv = np.convolve
    while m < n:
        m = min(2 * m, n)
        e = conv(a[:m], u)[:m]
        e[0] -= 2.0
        u = conv(u, e)[:m]
        np.negative(u, out=u)
    b = c_run - np.concatenate((_ZERO1, c_run[:-1]))
    b[0] = free
    d_start = conv(u, b)[:n]
    c_new = d_start - b
    c_new[0] = 0.0
    return np.cumsum(d_start), np.cumsum(c_new)


def _running_completions(g: np.ndarray, lm: np.ndarray, ls: np.ndarray, x: np.ndarray,
                         fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Expected completions of the running requests by each grid point ``x`` (iterations
    from now) and their variance: sum_i P_i(x) and sum_i P_i(x) (1 - P_i(x)), with
    P_i(x) = clip((F_i(g_i + x) - F_i(g_i)) / max(1 - F_i(g_i), 1e-9), 0, 1), P_i(0) = 0,
    F_i(g_i) = 0 for g_i = 0, and F_i the lognormal CDF (log-mean ``lm``, log-std ``ls``)
    at log(tokens + 0.5); ``g`` holds the tokens generated so far. The running x grid matrix
    is built in place, the same operations in the same order as the expression.

    ``fast``: the running x grid matrix in float32 (the per-request terms and the sums
    stay float64), written with survival functions, P_i(x) = (S_i(g_i) - S_i(g_i + x)) /
    max(S_i(g_i), 1e-9) with S_i = 1 - F_i (``_norm_sf``): the same quantity, about twice
    as fast (half the bytes per pass, and NumPy's float32 ``log`` and ``exp`` are SIMD where
    float64's are not without AVX-512), within about 1e-6 of the float64 expression per
    request (unit test). Without ``fast``, the floats of the expression."""
    h = g + 0.5
    lmc = lm[:, None]
    lsc = ls[:, None]
    z0 = np.log(h)[:, None]
    z0 -= lmc
    z0 /= lsc
    f0 = np.where(g[:, None] > 0, _norm_cdf(z0), 0.0)
    if fast:
        s0 = 1.0 - f0  # S_i(g_i)
        den = np.maximum(s0, 1e-9)
        f32 = np.float32
        pij = h.astype(f32)[:, None] + x.astype(f32)[None, :]
        np.log(pij, out=pij)
        pij -= lmc.astype(f32)
        pij /= lsc.astype(f32)
        pij = _norm_sf(pij)  # S(g + x)
        np.subtract(s0.astype(f32), pij, out=pij)
        pij /= den.astype(f32)
    else:
        pij = h[:, None] + x[None, :]
        np.log(pij, out=pij)
        pij -= lmc
        pij /= lsc
        pij = _norm_cdf(pij)  # F(g + x)
        surv = 1.0 - f0
        np.maximum(surv, 1e-9, out=surv)
        pij -= f0
        pij /= surv
    np.clip(pij, 0.0, 1.0, out=pij)
    pij[:, 0] = 0.0
    q = 1.0 - pij
    q *= pij
    return pij.sum(axis=0, dtype=np.float64), q.sum(axis=0, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class EstimatorConfig:
    prior_weight: float = 50.0  # pseudo-observations behind the workload's length prior
    ewma_alpha: float = 0.05  # weight of a new throughput / footprint observation
    grid_points: int = 48  # grid of the renewal transient
    refresh_s: float = 1.0  # an instance profile is reused this long (clock seconds)
    rel_err: float = 0.08  # relative model error added to every std
    min_std_s: float = 0.01
    # running requests' remaining output: "learned" (OutputLengthModel, per model and class)
    # or "bucket" (prompt-length buckets, moment-matched lognormal)
    output_lengths: str = "learned"


@dataclass(slots=True)
class _Profile:
    """Start-time curve of one instance, valid for ``refresh_s``."""

    computed_at: float
    seats: float  # S
    free: float  # free seats now
    x: np.ndarray  # grid, iterations
    starts: np.ndarray  # expected starts by x (incl. free seats)
    var: np.ndarray  # variance of the start count at x
    mu_it: float  # mean service of a new request, iterations
    var_it: float  # its variance
    iter_s: float  # decode iteration time at batch S
    c_tok: float  # prefill seconds per prompt token
    pending_prefill_tokens: int  # running requests' prompts not yet prefilled
    base_s: float  # remaining swap time
    # x, starts and var as lists (``start_iters`` reads single values: Python floats are
    # cheaper than NumPy scalars and give the same results); None: not made
    lists: tuple | None = None


@dataclass(slots=True)
class _InstCal:
    """What the estimator learned about one instance's engine from its ``stats()``.

    ``ratio`` scales the prior's decode iteration time (modelled / measured decode
    throughput), ``prefill_ratio`` its seconds per prefill token (measured / modelled);
    both start at 1 (the prior) and follow a running mean over the first ``1 / alpha``
    samples, an EWMA after, so a wrong prior is forgotten within tens of samples.
    ``hit_frac`` is the fraction of prompt tokens the engine's prefix cache served, from its
    cumulative counters (decayed sums)."""

    ratio: float = 1.0
    footprint_tokens: float = 0.0  # KV tokens per running sequence (0: unknown)
    prefill_ratio: float = 1.0
    num_decode: int = 0  # samples behind ``ratio``
    num_prefill: int = 0  # samples behind ``prefill_ratio``
    hit_frac: float = 0.0
    last_query: int = -1  # engine counters at the last sample (-1: none yet)
    last_hit: int = 0
    query_sum: float = 0.0
    hit_sum: float = 0.0
    im_src: object = None  # the prior model the calibrated one was derived from
    im_cal: object = None  # the prior with the ratios applied
    im_key: tuple = ()


class _PrefillConsts:
    """The per-engine part of ``prefill_phase`` on one view: decoders ``b``, prefill tokens
    pending on running requests ``pend``, KV tokens ``kv``, the chunked-prefill ``budget``
    per iteration, whether the engine is ``busy``, a ``full`` iteration's seconds, and the
    (mean, variance) of the residual of the iteration in flight, with and without the pending
    prefill in it (each computed on first use)."""

    __slots__ = ("b", "pend", "kv", "budget", "busy", "full", "resid_with", "resid_without")

    def __init__(self, b, pend, kv, budget, busy, full) -> None:
        self.b, self.pend, self.kv = b, pend, kv
        self.budget, self.busy, self.full = budget, busy, full
        self.resid_with: tuple[float, float] | None = None
        self.resid_without: tuple[float, float] | None = None


class EngineView:
    """One instance's engine at one moment, shared by several estimates in a row.

    ``stats()`` is read once, and what the estimates derive from it (``basics``, the iteration
    model, the decoders and pending prefill of ``_engine_now``, the prefill-phase constants) is
    computed on first use and reused. Valid only while the engine does not change (no submit,
    abort or advance in between) and the estimator's calibration does not either; build a new
    one after any of those. Every value is the one a call without the view computes, in the
    same order of operations, so results are bit-identical."""

    __slots__ = ("inst", "st", "now_at", "basics", "_im", "_cal", "_now", "_pp")

    def __init__(self, inst, st, now_at: float) -> None:
        self.inst = inst
        self.st = st
        self.now_at = now_at
        self.basics: tuple[float, float, float] | None = None
        self._im = self  # sentinel: not looked up yet
        self._cal: _InstCal | None = None
        self._now: tuple[int, int, float] | None = None
        self._pp: _PrefillConsts | None = None


class RWTEstimator:
    """Waiting-time distributions per (instance, position); see the module docstring.

    ``bucket_of(req)`` maps a request to its output-length bucket; ``prior`` gives
    (mean, variance) of output tokens for cold start. ``iter_models[instance_id]`` is the
    instance's roofline ``IterationModel`` (the engine model); instances without one fall back
    to ``stats()`` alone.
    """

    def __init__(
        self,
        prior_mean: float,
        prior_var: float,
        prompt_mean: float,
        config: EstimatorConfig | None = None,
        clairvoyant: bool = False,
        iter_model_of=None,
    ) -> None:
        self.config = config or EstimatorConfig()
        self.prior_mean = prior_mean
        self.prior_var = prior_var
        self.prompt_mean = prompt_mean
        self.clairvoyant = clairvoyant
        self.iter_model_of = iter_model_of  # (instance) -> IterationModel | None
        self.lengths: dict[tuple[str, int], LengthStats] = {}  # (model, bucket) -> stats
        self.model_lengths: dict[str, LengthStats] = {}  # model -> stats over buckets
        self._cal: dict[int, _InstCal] = {}  # instance id -> calibration
        self._profiles: dict[int, _Profile] = {}  # instance id -> cached profile
        # instance id -> requests its engine may hold (a TPOT cap, ``tpot_seats``): the
        # policy sets it; ``basics`` counts no more seats than it
        self.seat_caps: dict[int, int] = {}
        self._now_cache: dict[int, tuple] = {}  # instance id -> (state key, engine summary)
        self.batch_budget = 8192  # max_num_batched_tokens (vLLM's default; set from config)
        self.calib = WaitCalibrator()
        self.num_profiles = 0
        s2 = math.log1p(max(prior_var, 1e-9) / max(prior_mean, 1.0) ** 2)
        self.out_model = OutputLengthModel(math.log(max(prior_mean, 1.0)) - s2 / 2.0,
                                           math.sqrt(s2))

    @classmethod
    def from_workload(cls, workload, fleet=None, runtime=None, **kw) -> RWTEstimator:
        """Prior from the workload spec's lognormal lengths (clipped moments)."""
        L = workload.data.lengths
        mu, s = L.output_log_mu, L.output_log_sigma
        mean = math.exp(mu + s * s / 2.0)
        var = (math.exp(s * s) - 1.0) * math.exp(2 * mu + s * s)
        mean = min(mean, float(L.output_max))
        var = min(var, (L.output_max / 2.0) ** 2)
        pm = min(math.exp(L.prompt_log_mu + L.prompt_log_sigma ** 2 / 2.0), float(L.prompt_max))
        return cls(mean, var, pm, **kw)

    # -- calibration -------------------------------------------------------------------------
    def stats_for(self, model: str, bucket: int) -> LengthStats:
        st = self.lengths.get((model, bucket))
        if st is None:
            st = self.lengths[(model, bucket)] = LengthStats.prior(
                self.prior_mean, self.prior_var, self.config.prior_weight
            )
        return st

    def model_stats(self, model: str) -> LengthStats:
        st = self.model_lengths.get(model)
        if st is None:
            st = self.model_lengths[model] = LengthStats.prior(
                self.prior_mean, self.prior_var, self.config.prior_weight
            )
        return st

    def observe_completion(self, req: Request, bucket: int) -> None:
        """A request finished: its generated tokens are an observed output length."""
        n = float(req.num_generated)
        st = self.stats_for(req.model, bucket)
        self.out_model.observe(req, n, st.lognormal())
        st.update(n)
        self.model_stats(req.model).update(n)

    def observe_engine(self, inst) -> None:
        """Fold a ``stats()`` sample into the decode and prefill speed ratios (the engine's
        measured throughput against the prior ``iter_model_of``), the KV footprint and the
        prefix-cache hit fraction."""
        st = inst.engine.stats()
        cal = self._cal.get(inst.id) or self._cal.setdefault(inst.id, _InstCal())
        a = self.config.ewma_alpha
        if st.num_running > 0 and st.kv_used_tokens > 0:
            fp = st.kv_used_tokens / st.num_running
            cal.footprint_tokens = fp if cal.footprint_tokens <= 0 else (
                (1 - a) * cal.footprint_tokens + a * fp)
        im = self.iter_model_of(inst) if self.iter_model_of else None
        batch = st.num_decoding if st.num_decoding >= 0 else st.num_running
        if im is not None and batch > 0 and st.decode_tokens_per_s > 0:
            model_tps = im.decode_tokens_per_s(batch, st.kv_used_tokens)
            if model_tps > 0:
                cal.num_decode += 1
                w = max(a, 1.0 / cal.num_decode)
                cal.ratio = (1 - w) * cal.ratio + w * (model_tps / st.decode_tokens_per_s)
        if im is not None and st.prefill_tokens_per_s > 0 and im.c_tok > 0:
            cal.num_prefill += 1
            w = max(a, 1.0 / cal.num_prefill)
            obs = 1.0 / (st.prefill_tokens_per_s * im.c_tok)
            cal.prefill_ratio = (1 - w) * cal.prefill_ratio + w * obs
        q, h = st.prefix_query_tokens, st.prefix_hit_tokens
        if cal.last_query >= 0 and q > cal.last_query:
            # decayed sums: about the last 1 / alpha samples' worth of admissions
            cal.query_sum = (1 - a) * cal.query_sum + (q - cal.last_query)
            cal.hit_sum = (1 - a) * cal.hit_sum + max(0, h - cal.last_hit)
            cal.hit_frac = min(0.99, cal.hit_sum / cal.query_sum)
        if q < cal.last_query:  # the engine restarted (a swap): counters start over
            cal.hit_frac = cal.query_sum = cal.hit_sum = 0.0
        cal.last_query, cal.last_hit = q, h

    def engine_model(self, inst):
        """The instance's iteration model as calibrated: the prior (``iter_model_of``)
        with its memory/overhead terms scaled by the decode ratio and its per-token compute
        by the prefill ratio. The prior itself until a ratio moves off 1; None without one."""
        im = self.iter_model_of(inst) if self.iter_model_of else None
        if im is None:
            return None
        cal = self._cal.get(inst.id) or self._cal.setdefault(inst.id, _InstCal())
        dr, pr = cal.ratio, cal.prefill_ratio
        if abs(dr - 1.0) < 1e-9 and abs(pr - 1.0) < 1e-9:
            return im
        key = (dr, pr)
        if cal.im_src is not im or cal.im_key != key:
            cal.im_src, cal.im_key = im, key
            cal.im_cal = dataclasses.replace(
                im, c_tok=im.c_tok * pr, m0=im.m0 * dr, m_kv=im.m_kv * dr,
                overhead_s=im.overhead_s * dr, s_seq=im.s_seq * dr)
        return cal.im_cal

    def prefill_fraction(self, inst) -> float:
        """Expected fraction of prompt tokens the instance must prefill (1 - expected
        prefix-cache hits)."""
        cal = self._cal.get(inst.id)
        return 1.0 - cal.hit_frac if cal is not None else 1.0

    def invalidate(self, inst_id: int | None = None) -> None:
        if inst_id is None:
            self._profiles.clear()
        else:
            self._profiles.pop(inst_id, None)

    # -- the profile -------------------------------------------------------------------------
    def _kv_seats(self, inst, st) -> tuple[_InstCal, float, float, float]:
        """(calibration, mean output tokens, footprint tokens, seats): seats are
        ``max_num_seqs``, or as many mean footprints as the KV cache holds; no cap applied."""
        cal = self._cal.get(inst.id) or self._cal.setdefault(inst.id, _InstCal())
        model = st.model or inst.model
        mu = self.model_stats(model).mean if model else self.prior_mean
        fp = cal.footprint_tokens or (self.prompt_mean + mu / 2.0)
        seats = float(st.max_num_seqs or 256)
        if st.kv_capacity_tokens > 0:
            seats = max(1.0, min(seats, st.kv_capacity_tokens / max(fp, 1.0)))
        return cal, mu, fp, seats

    def kv_peak_seats(self, inst, st) -> int | None:
        """Requests the KV cache holds at their peak: its capacity over the footprint a
        request reaches by its last token (the mean footprint of a running request, which is
        halfway through its output on average, plus half the mean output). None where the
        capacity is unknown or ``max_num_seqs`` binds first. Holding no more than this keeps
        the engine from preempting (and recomputing) running requests as their outputs grow."""
        if st.kv_capacity_tokens <= 0:
            return None
        _, mu, fp, _ = self._kv_seats(inst, st)
        cap = int(st.kv_capacity_tokens / max(fp + mu / 2.0, 1.0))
        mx = st.max_num_seqs or 256
        return max(1, cap) if cap < mx else None

    def free_prefill_tokens(self, inst, st, now_at: float, stretch: float = 1.0,
                            iter_cap_s: float = 0.0, pace_req_s: float = 0.0,
                            prompt_mean: float = 0.0, headroom: float = 1.0) -> float:
        """Prompt tokens ``inst``'s next iteration may prefill beyond what it already has:
        the most of (1) what keeps its compute within ``stretch`` times its memory time (a
        decode iteration is memory-bound, so up to ``stretch`` = 1 that prefill rides free
        and delays nobody), and, where prompts are short (a mean prompt of ``prompt_mean``
        tokens prefills within the iteration's fixed time, overhead and memory; a longer one
        keeps the engine busy at one new request per iteration), (2) what keeps it within ``iter_cap_s`` seconds, and (3)
        while requests arrive for it faster than one per iteration (``pace_req_s`` per
        second: a pace that one request waiting per engine cannot keep) and it can prefill them (``pace * c_tok < 1``, ``pace = pace_req_s * prompt_mean``),
        ``headroom`` times the prompt tokens that arrive during the iteration (with ``T``
        extra tokens it takes ``it(T)``; ``T = h * pace * it(T)``, ``h`` at most halfway from
        ``pace * c_tok`` to 1, where the solution stays finite), so that admission keeps pace
        with arrivals. An engine that cannot prefill what arrives even compute-bound gets no
        more than (1) and (2): there, more admission adds no throughput. The decoders and
        the running requests' pending prefill come first; at most the token budget. Prompt
        tokens count at ``1 - hit_frac`` (expected prefix-cache hits)."""
        b, pend, kv = self._engine_now(inst, st, now_at)
        im = self.engine_model(inst)
        total = float(inst.engine.config.max_num_batched_tokens or self.batch_budget)
        first = b + pend  # tokens the iteration computes before any new prompt
        if im is not None and im.c_tok > 0:
            c = im.c_tok
            over = im.overhead_s + im.s_seq * b
            mem = im.m0 + im.m_kv * kv
        else:
            # no roofline: the decode iteration (memory-bound) and the prefill time per token
            _, mem, c = self.basics(inst, st)
            over = 0.0
            if c <= 0:
                return 0.0
        cal = self._cal.get(inst.id)
        keep = max(1.0 - cal.hit_frac, 0.01) if cal is not None else 1.0
        # past the free prefill only for short prompts: one whose prefill outlasts the
        # iteration's fixed time (overhead, weights and KV read) keeps the engine busy at one
        # new request per iteration; shorter ones leave it to fixed costs that a batch shares
        short = prompt_mean * keep * c < over + mem
        free = (max(stretch * mem, iter_cap_s - over) if short else stretch * mem) / c - first
        pace = pace_req_s * prompt_mean * keep  # tokens to compute per second
        rho = pace * c  # the share of the engine's compute the arrivals' prefill needs
        if (short and 0.0 < rho < 1.0
                and pace_req_s * (over + max(c * first, mem)) > 1.0):
            # headroom to drain a backlog, but at most halfway from rho to 1: near saturation
            # the iteration that keeps pace grows without bound
            lam = pace * min(headroom, 0.5 * (1.0 + 1.0 / rho))
            t = lam * (over + mem)  # memory-bound: the iteration does not lengthen
            if c * (first + t) > mem:  # compute-bound: it(T) = over + c (first + T)
                t = lam * (over + c * first) / (1.0 - lam * c)
            free = max(free, t)
        free = min(free, total - first)
        if free <= 0.0:
            return 0.0
        return free / keep

    def basics(self, inst, st) -> tuple[float, float, float]:
        """(seats S, decode iteration seconds at batch S, prefill seconds per token) from
        ``stats()``, the roofline prior and the calibration."""
        cal, _, fp, seats = self._kv_seats(inst, st)
        cap = self.seat_caps.get(inst.id)
        if cap is not None and cap < seats:
            seats = float(cap)
        im = self.engine_model(inst)
        keep = 1.0 - cal.hit_frac  # expected prefill per prompt token (prefix-cache hits)
        if im is not None:
            return seats, im.iteration_s(int(seats), int(seats * fp)), im.c_tok * keep
        tps = st.decode_tokens_per_s or 1.0
        c_tok = 1.0 / st.prefill_tokens_per_s if st.prefill_tokens_per_s else 0.0
        return seats, max(st.num_running, 1) / tps, c_tok * keep

    def tpot_seats(self, inst, st, tpot_s: float, headroom: float) -> int | None:
        """The most requests ``inst``'s engine may hold so that a request's mean time per
        output token stays within ``headroom * tpot_s``; None when even one request cannot
        (a cap would only cost throughput) or the engine has no iteration model.

        With ``b`` requests held, an iteration decodes ``b`` tokens over a KV cache of ``b``
        footprints, and each request brings its prompt's prefill (less expected prefix-cache
        hits) once per mean output length: per output token, the engine also prefills
        ``b * prompt / output`` tokens. Prefill chunks come in lumps (a long prompt's chunk
        is compute-bound whatever the decode batch), so their time is added to the decode
        iteration's rather than hidden under its memory time."""
        im = self.engine_model(inst)
        if im is None or tpot_s <= 0:
            return None
        cal, mu, fp, seats = self._kv_seats(inst, st)
        prefill_per_token = im.c_tok * (1.0 - cal.hit_frac) * self.prompt_mean / max(mu, 1.0)
        limit = headroom * tpot_s

        def per_token(b: int) -> float:
            return im.iteration_s(b, int(b * fp), b) + b * prefill_per_token

        if per_token(1) > limit:
            return None
        lo, hi = 1, int(seats)  # per_token rises with b: the largest b within the limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if per_token(mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def profile(self, inst, now_at: float, bucket_of) -> _Profile:
        """The instance's start-time curve (cached for ``refresh_s``)."""
        p = self._profiles.get(inst.id)
        if p is not None and now_at - p.computed_at < self.config.refresh_s:
            return p
        p = self._compute(inst, now_at, bucket_of)
        self._profiles[inst.id] = p
        return p

    def _compute(self, inst, now_at: float, bucket_of) -> _Profile:
        self.num_profiles += 1
        cfg = self.config
        eng = inst.engine
        st = eng.stats()
        if inst.id not in self._cal:
            self._cal[inst.id] = _InstCal()
        model = st.model or inst.model
        mstats = self.model_stats(model) if model else LengthStats(1.0, self.prior_mean, self.prior_var)
        mu, var = max(mstats.mean, 1.0), max(mstats.var, 1.0)
        # Seats: max_num_seqs, or as many average sequences as the KV cache holds.
        seats, iter_s, c_tok = self.basics(inst, st)
        running, gens = eng.running_generated()
        nr = len(running)
        g = np.asarray(gens, dtype=float)
        pending_prefill = sum(
            r.prompt_tokens for r, n in zip(running, gens) if n == 0 or r.first_token_at is None
        )
        if self.clairvoyant:
            # Ground truth: a point mass at the true length (simulation only).
            lm = np.log(np.asarray([max(r.output_tokens, 1) for r in running], float) + 0.5)
            ls = np.full(nr, 1e-3)
        else:
            cache: dict[int, tuple[float, float]] = {}
            if cfg.output_lengths == "learned":
                ms, ss = self.out_model.predict_many(running)
                lm = np.array(ms, dtype=float) if nr else np.empty(0)
                ls = np.array(ss, dtype=float) if nr else np.empty(0)
            else:
                lm = np.empty(nr)
                ls = np.empty(nr)
                for k, r in enumerate(running):
                    b = getattr(r._sched, "bucket", None)
                    if b is None:
                        b = bucket_of(r)
                    ml = cache.get(b)
                    if ml is None:
                        ml = cache[b] = self.stats_for(model, b).lognormal()
                    lm[k], ls[k] = ml
        free = max(0.0, seats - len(running))
        # Grid over the transient: the longest likely residual, and two mean services.
        s_ln = math.sqrt(math.log1p(var / (mu * mu)))
        m_ln = math.log(mu) - s_ln * s_ln / 2.0
        horizon = max(2.0 * mu + 2.0 * math.sqrt(var), 8.0)
        n_pts = cfg.grid_points
        x = _grid(horizon, n_pts)
        if len(running):
            # the float32 matrix (``_running_completions``); a clairvoyant point mass
            # (log-std 1e-3) keeps float64: its CDF is too steep for float32's log
            c_run, v_run = _running_completions(g, lm, ls, x, not self.clairvoyant)
        else:
            c_run = np.zeros(n_pts + 1)
            v_run = np.zeros(n_pts + 1)
        # Renewal of new starts on the grid.
        fcdf = _norm_cdf((np.log(np.maximum(x, 1e-9) + 0.5) - m_ln) / s_ln)
        fcdf[0] = 0.0
        starts, new_done = _renewal_series(c_run, fcdf, free)
        cv2 = var / (mu * mu)
        vcount = v_run + new_done * cv2
        return _Profile(
            computed_at=now_at,
            seats=seats,
            free=free,
            x=x,
            starts=starts,
            var=vcount,
            mu_it=mu,
            var_it=var,
            iter_s=iter_s,
            c_tok=c_tok,
            pending_prefill_tokens=pending_prefill,
            base_s=max(0.0, st.busy_until_at - now_at),
        )

    # -- queries -----------------------------------------------------------------------------
    def start_iters(self, p: _Profile, j: float) -> tuple[float, float]:
        """(mean, variance) in iterations of the start of 0-based position ``j``."""
        need = j + 1.0
        if need <= p.free + 1e-9:
            return 0.0, 0.0
        lists = p.lists
        if lists is None:
            lists = p.lists = (p.x.tolist(), p.starts.tolist(), p.var.tolist())
        xs, starts, var = lists
        if need <= starts[-1]:
            # bisect_left on the non-decreasing starts is np.searchsorted's "left"
            k = bisect.bisect_left(starts, need)
            k = max(k, 1)
            s0, s1 = starts[k - 1], starts[k]
            frac = (need - s0) / (s1 - s0) if s1 > s0 else 1.0
            xm = xs[k - 1] + frac * (xs[k] - xs[k - 1])
            rate = (s1 - s0) / (xs[k] - xs[k - 1])
            v = var[k - 1] + frac * (var[k] - var[k - 1])
            return xm, v / max(rate, 1e-9) ** 2
        # Asymptotic renewal: one start every mu / S iterations, CLT variance n sigma^2 / S^2.
        h = xs[-1]
        rate = p.seats / p.mu_it
        extra = need - starts[-1]
        xm = h + extra / rate
        v_end = var[-1] / rate ** 2
        return xm, v_end + extra * p.var_it / (p.seats ** 2)

    def _engine_now(self, inst, st, now_at: float) -> tuple[int, int, float]:
        """(decoders b, prefill tokens in flight or pending on running requests, KV tokens)
        of ``inst`` now; cached while (now, running, waiting) do not change."""
        key = (now_at, st.num_running, st.num_waiting, st.kv_used_tokens)
        c = self._now_cache.get(inst.id)
        if c is not None and c[0] == key:
            return c[1]
        eng = inst.engine
        # a simulated engine knows without a pass over its batch
        got = eng.prefill_summary(now_at)
        b, pend = got if got is not None else prefill_pass(eng.running_requests(), now_at)
        out = (b, pend, float(st.kv_used_tokens))
        self._now_cache[inst.id] = (key, out)
        return out

    def view(self, inst, now_at: float, st=None) -> EngineView:
        """An ``EngineView`` of ``inst`` now (``st``: its ``stats()``, if already read)."""
        return EngineView(inst, inst.engine.stats() if st is None else st, now_at)

    def _view_basics(self, v: EngineView) -> tuple[float, float, float]:
        b = v.basics
        if b is None:
            b = v.basics = self.basics(v.inst, v.st)
        return b

    def prefill_phase(self, inst, st, now_at: float, tokens_ahead: float, own: float,
                      include_pending: bool = True, view: EngineView | None = None
                      ) -> tuple[float, float]:
        """(mean, variance) in seconds from the moment the request could be admitted to its
        first token: the rest of the iteration in flight (uniform: half of it on average),
        then chunked prefill of ``tokens_ahead`` (plus the running requests' pending prefill
        when ``include_pending``) and of its own ``own`` prompt, ``max_num_batched_tokens
        - b`` tokens per iteration, each iteration costing the roofline
        ``overhead + max(c_tok * tokens, memory)``; the last chunk samples the first token.
        ``view`` (of ``inst`` at ``now_at``, with ``st``) reuses what earlier calls on it
        derived."""
        if view is None:
            view = EngineView(inst, st, now_at)
        return self._prefill_phase_view(view, tokens_ahead, own, include_pending)

    def _prefill_phase_view(self, v: EngineView, tokens_ahead: float, own: float,
                            include_pending: bool) -> tuple[float, float]:
        """``prefill_phase`` on a view: the per-engine part is computed once per view."""
        inst = v.inst
        im = v._im
        if im is v:
            im = v._im = self.engine_model(inst)
        cal = v._cal
        if cal is None:
            cal = v._cal = self._cal.get(inst.id) or self._cal.setdefault(inst.id, _InstCal())
        if im is None:
            _, iter_s, c_tok = self._view_basics(v)
            m = (tokens_ahead + own) * c_tok + iter_s
            return m, (0.3 * iter_s) ** 2
        pp = v._pp
        if pp is None:
            b, pend, kv = v._now = self._engine_now(inst, v.st, v.now_at)
            total = inst.engine.config.max_num_batched_tokens or self.batch_budget
            budget = float(max(total - b, 1))
            st = v.st
            busy = st.num_running > 0 or st.num_waiting > 0
            full = im.iteration_s(int(b + budget), int(kv))
            pp = v._pp = _PrefillConsts(b, pend, kv, budget, busy, full)
        b, pend, kv, budget, busy, full = pp.b, pp.pend, pp.kv, pp.budget, pp.busy, pp.full
        keep = 1.0 - cal.hit_frac  # expected prefix-cache hits are not prefilled
        resid_m = resid_v = 0.0
        q = (tokens_ahead + own) * keep if keep != 1.0 else tokens_ahead + own
        if busy:
            r = pp.resid_with if include_pending else pp.resid_without
            if r is None:
                flight = min(float(pend), budget) if include_pending else 0.0
                d = im.iteration_s(int(b + flight), int(kv))
                r = (0.5 * d, d * d / 12.0)
                if include_pending:
                    pp.resid_with = r
                else:
                    pp.resid_without = r
            resid_m, resid_v = r
            if include_pending:
                q += max(0.0, pend * keep - budget)
        n = max(1, int(math.ceil(q / budget - 1e-9)))
        last = q - (n - 1) * budget
        t = (n - 1) * full + im.iteration_s(int(b + last), int(kv))
        h = cal.hit_frac
        if h > 0.0:
            # whether its own prompt hits the cache is a coin with odds h, not a fraction:
            # its prefill varies by about sqrt(h (1 - h)) of the whole
            own_s = own * im.c_tok
            resid_v += own_s * own_s * h * (1.0 - h)
        return resid_m + t, resid_v

    def _flight_fits(self, v: EngineView) -> bool:
        """Whether ``v``'s engine has an iteration model and the prefill pending on its
        running requests fits one iteration's budget. Engines report that pending prefill
        as whole prompts (``prefill_pass``: a prompt whose last chunk is in flight counts
        in full), so past one budget it overstates what is left by up to whole prompts
        (Mooncake's 12k-126k-token prompts), and the chunked-iteration cost built on it
        with them."""
        if v._pp is None:
            self._prefill_phase_view(v, 0.0, 0.0, False)
        pp = v._pp
        return pp is not None and pp.pend <= pp.budget

    def wait(
        self,
        inst,
        now_at: float,
        position: float,
        prompt_ahead_tokens: float,
        own_prompt_tokens: int,
        bucket_of,
        cut_in_per_s: float = 0.0,
        key=None,
        cut_in_horizon_s: float = math.inf,
        view: EngineView | None = None,
        cut_in_until_start: bool = False,
    ) -> WaitEstimate:
        """Waiting time until first token of a request at ``position`` (0-based, counted
        behind the engine's own waiting queue's ``position`` requests — callers pass the
        total requests ahead, engine-waiting included) with ``prompt_ahead_tokens`` of prompts
        ahead of it, on ``inst``. With ``key`` (an SLO class, say) the online calibration
        of that key corrects the model's bias and interval (``WaitCalibrator``). ``view``
        (``self.view(inst, now_at)``) shares the engine's state between several calls;
        ``cut_in_until_start`` as in ``wait_raw``."""
        raw = self.wait_raw(inst, now_at, position, prompt_ahead_tokens, own_prompt_tokens,
                            bucket_of, cut_in_per_s, cut_in_horizon_s, view,
                            cut_in_until_start=cut_in_until_start)
        return raw if key is None else self.calib.adjust(key, raw)

    def late_kept(self, inst, now_at: float, position: float, tokens_ahead: float, groups,
                  own_ahead, bound_s: float, late_ttft, waiting_tokens: float, bucket_of,
                  view: EngineView | None = None) -> tuple[int, int, int]:
        """Of the requests queued ahead of one, those an executor's late test will let into
        the engine at their turn: (how many, their prompt tokens, how many it will move to
        the late lane instead, without service). ``groups``: the virtual queue's groups
        ahead, in order (``RequestGroup``: members in arrival order, one class, so the last
        is due last), then ``own_ahead``: the requests of the predicted one's own group ahead
        of it. ``position`` / ``tokens_ahead``: requests and prompt tokens ahead of all of
        them (the engine's waiting queue).

        Each is tested as the executor tests it when it is pulled: past hope when its
        dispatch plus ``late_ttft(prompt, waiting)`` (the test's time to first token) passes
        its deadline. The first is dispatched now, behind the engine's ``waiting_tokens``;
        each later one when the one let in before it starts its prefill (one urgent request
        waits in an engine at a time: ``ExecutorConfig.engine_slack``), at the model's wait
        for that one's place among those let in (``wait_raw``, no cut-ins) less its own
        prefill phase, with nothing waiting ahead of it. Shortcuts, without a wait estimate: a group due
        (to its last member) before ``now + late_ttft(0, 0)`` goes whole; one due (from its
        first) after ``now + bound_s + late_ttft(its prompts, waiting)`` stays whole, where
        ``bound_s`` bounds every dispatch wait (the predicted request's own wait with all of
        them ahead). A request that already has its first token (evicted, re-queued) is not
        tested: it stays."""
        if view is None:
            view = EngineView(inst, inst.engine.stats(), now_at)
        floor = now_at + late_ttft(0.0, 0.0)
        kept = kept_p = dropped = 0
        waiting = waiting_tokens
        # when the last one let in starts its prefill (None: not estimated yet), its prompt
        start: float | None = now_at
        last = 0

        def test(r) -> bool:
            nonlocal start
            if r.first_token_at is not None:
                return True
            if start is None:  # the last one let in went without an estimate
                w = self.wait_raw(inst, now_at, position + kept - 1,
                                  tokens_ahead + kept_p - last, last, bucket_of,
                                  view=view).mean_s
                own = self._prefill_phase_view(view, 0.0, last, False)[0]
                start = now_at + max(0.0, w - own)
            return start + late_ttft(r.prompt_tokens, waiting) <= r.deadline_at

        def let_in(r) -> None:
            nonlocal kept, kept_p, waiting, start, last
            kept += 1
            kept_p += r.prompt_tokens
            waiting = 0
            start = None
            last = r.prompt_tokens

        for g in groups:
            members = g.members
            if not members:
                continue
            if not g.has_generated() and members[-1][2].deadline_at < floor:
                dropped += len(members)
                continue
            if g.deadline_at > now_at + bound_s + late_ttft(g.prompt_tokens, waiting):
                for _, _, r in members:
                    let_in(r)
                continue
            for _, _, r in members:
                if test(r):
                    let_in(r)
                else:
                    dropped += 1
        for r in own_ahead:
            if test(r):
                let_in(r)
            else:
                dropped += 1
        return kept, kept_p, dropped

    def wait_raw(self, inst, now_at, position, prompt_ahead_tokens, own_prompt_tokens,
                 bucket_of, cut_in_per_s: float = 0.0,
                 cut_in_horizon_s: float = math.inf,
                 view: EngineView | None = None,
                 cut_in_until_start: bool = False) -> WaitEstimate:
        """The model's estimate, before the online calibration. Requests that cut in arrive
        at ``cut_in_per_s`` for at most ``cut_in_horizon_s`` (after that, later arrivals'
        deadlines fall after this request's). By default they arrive over the whole wait;
        ``cut_in_until_start``: only until the request's own prefill starts (a seat is
        free and the prefill ahead of it is done). Once its prefill is under way it is a
        running request, and the engine finishes running requests' prefill before it
        admits waiting ones, however urgent. With it (the scored prediction), a request
        with cut-ins that finds a seat free for itself and them is also costed as the
        free-seat path costs one without cut-ins: the iteration in flight, then the prefill
        ahead and its own in chunked iterations (``prefill_phase``), instead of the
        profile's per-token prefill cost; unless the running requests' pending prefill
        exceeds one iteration's budget (``_flight_fits``)."""
        if view is None:
            view = EngineView(inst, inst.engine.stats(), now_at)
        st = view.st
        seats, iter_s, c_tok = self._view_basics(view)
        base = max(0.0, st.busy_until_at - now_at)
        if position + 1.0 <= seats - st.num_running and cut_in_per_s <= 0:
            # A seat is free: only prefill ahead and the request's own prefill remain.
            pm, pv = self._prefill_phase_view(view, prompt_ahead_tokens, own_prompt_tokens,
                                              True)
            mean = base + pm
            sd = math.sqrt(pv + (self.config.rel_err * mean) ** 2 + self.config.min_std_s ** 2)
            return WaitEstimate(mean, sd)
        p = self.profile(inst, now_at, bucket_of)
        own_m, own_v = self._prefill_phase_view(view, 0.0, own_prompt_tokens, False)
        j = position
        mean = sd = 0.0
        per_req_prompt = prompt_ahead_tokens / position if position > 0 else self.prompt_mean
        for _ in range(3 if cut_in_per_s > 0 else 1):
            xm, xv = self.start_iters(p, j)
            if (cut_in_until_start and cut_in_per_s > 0 and xm == 0.0
                    and self._flight_fits(view)):
                # A seat is free for it and for the cut-ins before its prefill starts: as
                # on the free-seat path above (taken without cut-ins), the prefill ahead
                # (cut-ins' prompts included) and its own run in chunked iterations after
                # the one in flight, each at a whole iteration's cost (the decode batch
                # rides along), not at the bare per-token prefill cost of the profile's
                # queue model. Only with cut-ins: without them this is a request the
                # engine's own count finds no seat for, and the profile's start stands.
                pm, pv = self._prefill_phase_view(
                    view, prompt_ahead_tokens + (j - position) * per_req_prompt,
                    own_prompt_tokens, True)
                mean = base + pm
                sd = math.sqrt(pv)
                span = mean - own_m
            else:
                pre = (p.pending_prefill_tokens + prompt_ahead_tokens
                       + (j - position) * per_req_prompt) * c_tok
                mean = p.base_s + xm * p.iter_s + pre + own_m
                sd = math.sqrt(xv * p.iter_s ** 2 + own_v)
                span = mean - own_m if cut_in_until_start else mean
            if cut_in_per_s <= 0:
                break
            j = position + cut_in_per_s * max(0.0, min(span, cut_in_horizon_s))
        sd = math.hypot(sd, self.config.rel_err * mean, self.config.min_std_s)
        return WaitEstimate(mean, sd)


