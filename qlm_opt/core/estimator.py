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
from dataclasses import dataclass, field

import numpy as np

from qlm_opt.domain import Request

log = logging.getLogger(__name__)

Z90 = 1.6448536269514722  # two-sided 90% interval: mean +- Z90 * std


def _norm_cdf(z: np.ndarray) -> np.ndarray:
    """Standard normal CDF, vectorised (Abramowitz-Stegun 7.1.26 erf, |err| < 1.5e-7)."""
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def norm_sf(z: float) -> float:
    """P(N(0,1) > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


@dataclass(frozen=True, slots=True)
class WaitEstimate:
    """Predicted waiting time (seconds) until first token: approximately N(mean, std^2)."""

    mean_s: float
    std_s: float

    def quantile(self, z: float) -> float:
        """mean + z std, floored at 0 (use z = 1.28 for the 90th percentile)."""
        return max(0.0, self.mean_s + z * self.std_s)

    def interval(self, z: float = Z90) -> tuple[float, float]:
        return max(0.0, self.mean_s - z * self.std_s), self.mean_s + z * self.std_s

    def p_miss(self, slack_s: float) -> float:
        """P(wait > slack_s)."""
        if self.std_s <= 0:
            return 1.0 if self.mean_s > slack_s else 0.0
        return norm_sf((slack_s - self.mean_s) / self.std_s)


@dataclass(slots=True)
class LengthStats:
    """Output-token mean/variance: Welford over observations, shrunk towards a prior worth
    ``prior_n`` pseudo-observations (mean and variance pooled by weight; the prior's distance
    from the data is not added to the variance, so a wrong prior washes out as 1/n)."""

    prior_n: float
    prior_mean: float
    prior_var: float
    n: float = 0.0
    obs_mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def prior(cls, mean: float, var: float, weight: float) -> LengthStats:
        return cls(weight, mean, var)

    def update(self, x: float) -> None:
        self.n += 1.0
        d = x - self.obs_mean
        self.obs_mean += d / self.n
        self.m2 += d * (x - self.obs_mean)

    @property
    def mean(self) -> float:
        w = self.prior_n + self.n
        return (self.prior_n * self.prior_mean + self.n * self.obs_mean) / w if w else 0.0

    @property
    def var(self) -> float:
        w = self.prior_n + self.n
        return (self.prior_n * self.prior_var + self.m2) / w if w else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def lognormal(self) -> tuple[float, float]:
        """(log-mean, log-std) of the lognormal with this mean and variance."""
        m = max(self.mean, 1.0)
        s2 = math.log1p(max(self.var, 1e-9) / (m * m))
        return math.log(m) - s2 / 2.0, math.sqrt(s2)


class _LogFit:
    """Least squares of log(output) on log(prompt + 1), from running sums."""

    __slots__ = ("n", "sx", "sy", "sxx", "sxy", "syy")

    def __init__(self) -> None:
        self.n = 0
        self.sx = self.sy = self.sxx = self.sxy = self.syy = 0.0

    def add(self, x: float, y: float) -> None:
        self.n += 1
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y
        self.syy += y * y

    def predict(self, x: float, ridge: float) -> tuple[float, float]:
        """(log-mean, log-std) at ``x``; the slope is shrunk to 0 by ``ridge`` (per row)."""
        n = self.n
        mx, my = self.sx / n, self.sy / n
        vxx = self.sxx / n - mx * mx
        vxy = self.sxy / n - mx * my
        vyy = max(self.syy / n - my * my, 0.0)
        b = vxy / (vxx + ridge)
        res = max(vyy - 2 * b * vxy + b * b * vxx, 1e-4)
        # the fit's own uncertainty: the intercept's and the slope's at x
        var = res * (1.0 + 1.0 / n + (x - mx) ** 2 / max(n * (vxx + ridge), 1e-9))
        return my + b * (x - mx), math.sqrt(var)


class OutputLengthModel:
    """Output-length prediction learned online, per (model, class, tenant), falling back to
    (model, class), then (model), then the workload prior.

    Each cell fits log(output) = a + b log(prompt + 1) + noise by least squares (a slope
    shrunk towards 0, so a feature that carries no information costs nothing) and predicts a
    lognormal: its log-mean and log-std, fitted in log space rather than matched to the
    moments, which the heavy right tail of chat outputs distorts. A cell is used once it has
    ``min_n`` completions. ``max_tokens`` is not used: in what-if runs the request's cap is
    its true length.

    Its own error is scored prequentially: at each completion, the prediction the model made
    just before (and, beside it, the prompt-length bucket's) against the observed length:
    the mean log score (log density of log(output) under the predicted lognormal: the
    proper score of a predicted distribution, which is what the estimator uses), the
    coverage of the 90% interval, and the median absolute % error of the predicted median
    (a point score, which favours predicting low)."""

    def __init__(self, prior_log_mu: float, prior_log_sigma: float, min_n: int = 30,
                 ridge: float = 0.05) -> None:
        self.prior = (prior_log_mu, prior_log_sigma)
        self.min_n = min_n
        self.ridge = ridge
        self.cells: dict[tuple, _LogFit] = {}
        self.errors: list[tuple[float, float, float, float, float]] = []
        # (observed, log-mean, log-std, bucket log-mean, bucket log-std)

    def _keys(self, req: Request) -> tuple[tuple, ...]:
        if req.tenant is not None:
            return ((req.model, req.slo_class, req.tenant), (req.model, req.slo_class),
                    (req.model,))
        return ((req.model, req.slo_class), (req.model,))

    def predict(self, req: Request) -> tuple[float, float]:
        """(log-mean, log-std) of ``req``'s output tokens."""
        x = math.log1p(req.prompt_tokens)
        for k in self._keys(req):
            c = self.cells.get(k)
            if c is not None and c.n >= self.min_n:
                return c.predict(x, self.ridge)
        return self.prior

    def predict_many(self, reqs) -> tuple[list[float], list[float]]:
        """``predict`` of every request in ``reqs``: (log-means, log-stds), the same floats,
        with each cell's fit worked out once (``_LogFit.predict`` term by term)."""
        ms: list[float] = []
        ss: list[float] = []
        fits: dict[tuple, tuple | None] = {}
        ridge = self.ridge
        log1p = math.log1p
        sqrt = math.sqrt
        pm, ps = self.prior
        for req in reqs:
            who = (req.model, req.slo_class, req.tenant)
            f = fits.get(who, False)
            if f is False:
                f = None
                for k in self._keys(req):
                    c = self.cells.get(k)
                    if c is not None and c.n >= self.min_n:
                        n = c.n
                        mx, my = c.sx / n, c.sy / n
                        vxx = c.sxx / n - mx * mx
                        vxy = c.sxy / n - mx * my
                        vyy = max(c.syy / n - my * my, 0.0)
                        b = vxy / (vxx + ridge)
                        res = max(vyy - 2 * b * vxy + b * b * vxx, 1e-4)
                        f = (mx, my, b, res, 1.0 + 1.0 / n, max(n * (vxx + ridge), 1e-9))
                        break
                fits[who] = f
            if f is None:
                ms.append(pm)
                ss.append(ps)
                continue
            mx, my, b, res, a1, den = f
            x = log1p(req.prompt_tokens)
            ms.append(my + b * (x - mx))
            ss.append(sqrt(res * (a1 + (x - mx) ** 2 / den)))
        return ms, ss

    def observe(self, req: Request, n_out: float,
                baseline: tuple[float, float] | None = None) -> None:
        """``req`` finished with ``n_out`` tokens; ``baseline`` is the bucket's (log-mean,
        log-std) before this completion, scored beside."""
        m, sd = self.predict(req)
        bm, bs = baseline if baseline is not None else (math.nan, math.nan)
        self.errors.append((max(n_out, 1.0), m, sd, bm, bs))
        x, y = math.log1p(req.prompt_tokens), math.log(max(n_out, 1.0))
        for k in self._keys(req):
            c = self.cells.get(k)
            if c is None:
                c = self.cells[k] = _LogFit()
            c.add(x, y)

    def report(self) -> dict:
        """``log_score`` (mean log density of log(output), higher is better), ``coverage_90``
        and ``median_abs_pct_error`` of this model and of the prompt-length buckets
        (``bucket_*``) over every completion seen."""
        if not self.errors:
            return {"num": 0}
        a = np.asarray(self.errors, dtype=float)
        y = np.log(a[:, 0])

        def score(m, sd):
            ok = ~np.isnan(m)
            if not ok.any():
                return None, None, None
            m, sd, yy = m[ok], np.maximum(sd[ok], 1e-6), y[ok]
            ls = -np.log(sd) - 0.5 * math.log(2 * math.pi) - 0.5 * ((yy - m) / sd) ** 2
            cov = (np.abs(yy - m) <= Z90 * sd).mean()
            ape = np.abs(np.exp(m) - np.exp(yy)) / np.exp(yy) * 100.0
            return float(ls.mean()), float(cov), float(np.median(ape))

        s_, c_, e_ = score(a[:, 1], a[:, 2])
        bs_, bc_, be_ = score(a[:, 3], a[:, 4])
        return {"num": len(a), "log_score": s_, "coverage_90": c_, "median_abs_pct_error": e_,
                "bucket_log_score": bs_, "bucket_coverage_90": bc_,
                "bucket_median_abs_pct_error": be_}


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
        self._pp: list | None = None  # prefill-phase constants


def sorted_median(xs: np.ndarray) -> float:
    """``np.median`` of an ascending 1-d array, the same float without its overhead (the
    mean of the two middle values for an even size)."""
    n = len(xs)
    h = n // 2
    if n % 2:
        return float(xs[h])
    return float((xs[h - 1] + xs[h]) / 2)


def sorted_quantile(xs: np.ndarray, q: float) -> float:
    """``np.quantile(xs, q)`` (method "linear") of an ascending 1-d array, the same float:
    NumPy's index ``(n - 1) q`` and its two-sided ``lerp``."""
    n = len(xs)
    vi = (n - 1) * q
    if vi >= n - 1:
        return float(xs[n - 1])
    if vi < 0:
        return float(xs[0])
    lo = math.floor(vi)
    t = vi - lo
    a = xs[lo]
    b = xs[lo + 1]
    diff = b - a
    return float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)


class _Ring:
    """The last ``size`` (mean, std, observed) triples of a calibration cell, in a numpy ring
    (rows in rotated order once full), and how many arrived since the last fit."""

    __slots__ = ("buf", "n", "pos", "new")

    def __init__(self, size: int) -> None:
        self.buf = np.empty((size, 3))
        self.n = 0
        self.pos = 0
        self.new = 0

    def append(self, m: float, s: float, o: float) -> None:
        row = self.buf[self.pos]
        row[0] = m
        row[1] = s
        row[2] = o
        self.pos += 1
        if self.pos == len(self.buf):
            self.pos = 0
        if self.n < len(self.buf):
            self.n += 1


class WaitCalibrator:
    """Online (conformal-style) recalibration of wait predictions from completed ones.

    Every prediction whose first token has been seen gives a triple (model mean, model std,
    observed wait). Per ``(key, bin)`` — ``key`` an SLO class, ``bin`` the model mean in
    factor-``bin_ratio`` bands — the last ``window`` triples give
      * a bias factor ``c`` = exp(median log(observed / mean)), and
      * an interval factor ``k`` = the 90% quantile of |observed - c mean| / (c std),
    and a new prediction (m, s) becomes (c m, c s max(k, 1.645) / 1.645): its ±1.645 std
    interval is then the split-conformal 90% interval of the recent past, never narrower
    than the model's own. Cells with fewer than
    ``min_n`` triples fall back to the key's pooled cell, then to the model as is. Only
    predictions made before the observation use it (no look-ahead); the factors are
    refreshed every ``refresh`` new triples."""

    def __init__(self, window: int = 400, min_n: int = 30, refresh: int = 16,
                 bin_ratio: float = 2.0, coverage: float = 0.9) -> None:
        self.window = window
        self.min_n = min_n
        self.refresh = refresh
        self.log_bin = math.log(bin_ratio)
        self.coverage = coverage
        self._data: dict[tuple, _Ring] = {}  # cell -> last ``window`` (m, s, o)
        self._fit: dict[tuple, tuple[float, float]] = {}  # cell -> (c, k)

    def _bin(self, mean_s: float) -> int:
        return int(math.floor(math.log(max(mean_s, 1e-3) / 1e-3) / self.log_bin))

    def observe(self, key: str, mean_s: float, std_s: float, observed_s: float) -> None:
        m, sd, o = max(mean_s, 1e-6), max(std_s, 1e-6), max(observed_s, 1e-6)
        for cell in ((key, self._bin(mean_s)), (key, None)):
            d = self._data.get(cell)
            if d is None:
                d = self._data[cell] = _Ring(self.window)
            d.append(m, sd, o)
            d.new += 1
            if d.new >= self.refresh or cell not in self._fit and d.n >= self.min_n:
                self._refit(cell, d)

    def _refit(self, cell, d: _Ring) -> None:
        d.new = 0
        if d.n < self.min_n:
            return
        # The ring holds the last ``window`` triples in rotated order; the median and the
        # quantile do not depend on the order.
        a = d.buf if d.n == self.window else d.buf[: d.n]
        m, s, o = a[:, 0], a[:, 1], a[:, 2]
        c = float(np.exp(sorted_median(np.sort(np.log(o / m)))))
        score = np.abs(o - c * m) / (c * s)
        k = sorted_quantile(np.sort(score), self.coverage)
        # the interval only ever widens the model's: a backlog that builds up makes the
        # recent past too optimistic about the spread of what comes next
        self._fit[cell] = (c, max(k, Z90))

    def factors(self, key: str, mean_s: float) -> tuple[float, float] | None:
        f = self._fit.get((key, self._bin(mean_s)))
        return f if f is not None else self._fit.get((key, None))

    def adjust(self, key: str, est: WaitEstimate) -> WaitEstimate:
        f = self.factors(key, est.mean_s)
        if f is None:
            return est
        c, k = f
        return WaitEstimate(c * est.mean_s, c * est.std_s * k / Z90)


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
    def _service(self, req: Request, bucket: int) -> tuple[float, float]:
        st = self.stats_for(req.model, bucket)
        return st.lognormal()

    def basics(self, inst, st) -> tuple[float, float, float]:
        """(seats S, decode iteration seconds at batch S, prefill seconds per token) from
        ``stats()``, the roofline prior and the calibration."""
        cal = self._cal.get(inst.id) or self._cal.setdefault(inst.id, _InstCal())
        model = st.model or inst.model
        mu = self.model_stats(model).mean if model else self.prior_mean
        fp = cal.footprint_tokens or (self.prompt_mean + mu / 2.0)
        seats = float(st.max_num_seqs or 256)
        if st.kv_capacity_tokens > 0:
            seats = max(1.0, min(seats, st.kv_capacity_tokens / max(fp, 1.0)))
        im = self.engine_model(inst)
        keep = 1.0 - cal.hit_frac  # expected prefill per prompt token (prefix-cache hits)
        if im is not None:
            return seats, im.iteration_s(int(seats), int(seats * fp)), im.c_tok * keep
        tps = st.decode_tokens_per_s or 1.0
        c_tok = 1.0 / st.prefill_tokens_per_s if st.prefill_tokens_per_s else 0.0
        return seats, max(st.num_running, 1) / tps, c_tok * keep

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
        cal = self._cal.get(inst.id) or self._cal.setdefault(inst.id, _InstCal())
        model = st.model or inst.model
        mstats = self.model_stats(model) if model else LengthStats(1.0, self.prior_mean, self.prior_var)
        mu, var = max(mstats.mean, 1.0), max(mstats.var, 1.0)
        # Seats: max_num_seqs, or as many average sequences as the KV cache holds.
        seats, iter_s, c_tok = self.basics(inst, st)
        both = getattr(eng, "running_generated", None)
        if both is not None:
            running, gens = both()
        else:
            running = eng.running_requests()
            num_gen = getattr(eng, "num_generated", None)
            gens = [num_gen(r) for r in running] if num_gen is not None else [
                r.num_generated for r in running]
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
        x = np.linspace(0.0, horizon, n_pts + 1)
        if len(running):
            gg = g[:, None]
            lg = np.log(gg + 0.5)
            f0 = np.where(gg > 0, _norm_cdf((lg - lm[:, None]) / ls[:, None]), 0.0)
            fx = _norm_cdf((np.log(gg + 0.5 + x[None, :]) - lm[:, None]) / ls[:, None])
            surv = np.maximum(1.0 - f0, 1e-9)
            pij = np.clip((fx - f0) / surv, 0.0, 1.0)
            pij[:, 0] = 0.0
            c_run = pij.sum(axis=0)
            v_run = (pij * (1.0 - pij)).sum(axis=0)
        else:
            c_run = np.zeros(n_pts + 1)
            v_run = np.zeros(n_pts + 1)
        # Renewal of new starts on the grid.
        fcdf = _norm_cdf((np.log(np.maximum(x, 1e-9) + 0.5) - m_ln) / s_ln)
        fcdf[0] = 0.0
        fpmf = np.diff(fcdf)  # completion in (x[k-1], x[k]] after a start at 0
        d_start = np.zeros(n_pts + 1)
        c_new = np.zeros(n_pts + 1)
        d_start[0] = free
        d_run = np.diff(c_run, prepend=0.0)
        for k in range(1, n_pts + 1):
            # completions in step k from requests started at steps < k
            c_new[k] = np.dot(d_start[:k][::-1], fpmf[:k])
            d_start[k] = d_run[k] + c_new[k]
        starts = np.cumsum(d_start)
        new_done = np.cumsum(c_new)
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
        summary = getattr(eng, "prefill_summary", None)
        got = summary(now_at) if summary is not None else None
        if got is not None:
            b, pend = got
        else:
            b = 0
            pend = 0
            for r in eng.running_requests():
                ft = r.first_token_at
                # prefilling (its first token, if already set, lies at the end of the
                # iteration in flight): prompt plus tokens to recompute after an eviction
                if ft is None:
                    pend += r.prompt_tokens + r.num_generated
                elif ft > now_at:
                    pend += r.prompt_tokens
                else:
                    b += 1
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
            cfg = getattr(inst.engine, "config", None)
            total = getattr(cfg, "max_num_batched_tokens", None) or self.batch_budget
            budget = float(max(total - b, 1))
            st = v.st
            busy = st.num_running > 0 or st.num_waiting > 0
            full = im.iteration_s(int(b + budget), int(kv))
            # (b, pend, kv, budget, busy, full, residual with pending, without)
            pp = v._pp = [b, pend, kv, budget, busy, full, None, None]
        b, pend, kv, budget, busy, full = pp[:6]
        keep = 1.0 - cal.hit_frac  # expected prefix-cache hits are not prefilled
        resid_m = resid_v = 0.0
        q = (tokens_ahead + own) * keep if keep != 1.0 else tokens_ahead + own
        if busy:
            slot = 6 if include_pending else 7
            r = pp[slot]
            if r is None:
                flight = min(float(pend), budget) if include_pending else 0.0
                d = im.iteration_s(int(b + flight), int(kv))
                r = pp[slot] = (0.5 * d, d * d / 12.0)
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
    ) -> WaitEstimate:
        """Waiting time until first token of a request at ``position`` (0-based, counted
        behind the engine's own waiting queue's ``position`` requests — callers pass the
        total requests ahead, engine-waiting included) with ``prompt_ahead_tokens`` of prompts
        ahead of it, on ``inst``. With ``key`` (an SLO class, say) the online calibration
        of that key corrects the model's bias and interval (``WaitCalibrator``). ``view``
        (``self.view(inst, now_at)``) shares the engine's state between several calls."""
        raw = self.wait_raw(inst, now_at, position, prompt_ahead_tokens, own_prompt_tokens,
                            bucket_of, cut_in_per_s, cut_in_horizon_s, view)
        return raw if key is None else self.calib.adjust(key, raw)

    def wait_raw(self, inst, now_at, position, prompt_ahead_tokens, own_prompt_tokens,
                 bucket_of, cut_in_per_s: float = 0.0,
                 cut_in_horizon_s: float = math.inf,
                 view: EngineView | None = None) -> WaitEstimate:
        """The model's estimate, before the online calibration. Requests that cut in arrive
        at ``cut_in_per_s`` for at most ``cut_in_horizon_s`` (after that, later arrivals'
        deadlines fall after this request's)."""
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
            pre = (p.pending_prefill_tokens + prompt_ahead_tokens
                   + (j - position) * per_req_prompt) * c_tok
            mean = p.base_s + xm * p.iter_s + pre + own_m
            sd = math.sqrt(xv * p.iter_s ** 2 + own_v)
            if cut_in_per_s <= 0:
                break
            j = position + cut_in_per_s * max(0.0, min(mean, cut_in_horizon_s))
        sd = math.hypot(sd, self.config.rel_err * mean, self.config.min_std_s)
        return WaitEstimate(mean, sd)


@dataclass(slots=True)
class AccuracyRecord:
    slo_class: str
    placed_at: float
    mean_s: float
    std_s: float
    raw: WaitEstimate | None = None  # the model's estimate before calibration
    calib: WaitCalibrator | None = None  # fed (raw, observed) at the first token
    key: object = None  # calibration cell key


@dataclass(slots=True)
class RWTAccuracy:
    """Predicted vs observed waiting time of requests.

    Definition: the scored prediction of a request is its *admission* prediction, the first
    one made for it: by a global-queue policy when it first places the request in an
    instance's virtual queue (reported through ``Runtime.predict_hooks``), or, for policies
    without their own predictions, by the observer when the request is first dispatched into
    an engine's queue. Observed wait = first_token_at - admission time. It stays the scored
    one whatever happens afterwards: re-placement, late lane, eviction, swap, engine failure
    and re-queue. The *dispatch* prediction (the latest one in force when the request last
    entered an engine before its first token, measured from that moment) is reported beside
    it (``dispatch_*``), for the same requests.
    """

    records: dict[int, AccuracyRecord] = field(default_factory=dict)  # admission, by req id
    dispatch: dict[int, AccuracyRecord] = field(default_factory=dict)  # latest dispatch
    pairs: list[tuple[str, float, float, float]] = field(default_factory=list)
    # (class, predicted mean s, predicted std s, observed s): admission predictions
    dispatch_pairs: list[tuple[str, float, float, float]] = field(default_factory=list)
    # the same requests' dispatch predictions (one per entry of ``pairs``, same order)

    def predict(self, req: Request, placed_at: float, est: WaitEstimate,
                raw: WaitEstimate | None = None, calib: WaitCalibrator | None = None,
                key=None) -> None:
        """An admission prediction: kept only when it is the request's first."""
        if req.first_token_at is not None or req.id in self.records:
            return
        self.records[req.id] = AccuracyRecord(req.slo_class, placed_at, est.mean_s, est.std_s,
                                              raw, calib, key)

    def predict_dispatch(self, req: Request, placed_at: float, est: WaitEstimate,
                         raw: WaitEstimate | None = None, calib: WaitCalibrator | None = None,
                         key=None) -> None:
        """The prediction in force when ``req`` entered an engine (replaces earlier ones);
        also the admission prediction when none was made before."""
        if req.first_token_at is not None:
            return
        rec = AccuracyRecord(req.slo_class, placed_at, est.mean_s, est.std_s, raw, calib, key)
        self.dispatch[req.id] = rec
        if req.id not in self.records:
            self.records[req.id] = rec

    def observe_first_token(self, req: Request) -> None:
        rec = self.records.pop(req.id, None)
        disp = self.dispatch.pop(req.id, None)
        if rec is None or req.first_token_at is None:
            return
        obs = req.first_token_at - rec.placed_at
        self.pairs.append((rec.slo_class, rec.mean_s, rec.std_s, obs))
        d = disp if disp is not None else rec
        self.dispatch_pairs.append((d.slo_class, d.mean_s, d.std_s,
                                    req.first_token_at - d.placed_at))
        # each calibrator learns from the prediction it adjusted
        for r in (rec, disp) if disp is not rec else (rec,):
            if r is not None and r.calib is not None and r.raw is not None:
                r.calib.observe(r.key, r.raw.mean_s, r.raw.std_s,
                                req.first_token_at - r.placed_at)

    @staticmethod
    def _stats(rows) -> dict:
        if not rows:
            return {"median_abs_pct_error": None, "coverage_90": None, "num": 0}
        a = np.array([(m, s, o) for _, m, s, o in rows], dtype=float)
        m, s, o = a[:, 0], a[:, 1], a[:, 2]
        ape = np.abs(m - o) / np.maximum(o, 1e-3) * 100.0
        inside = (o >= m - Z90 * s) & (o <= m + Z90 * s)
        return {
            "median_abs_pct_error": float(np.median(ape)),
            "coverage_90": float(inside.mean()),
            "num": len(rows),
            "observed_p50_s": float(np.median(o)),
            "predicted_p50_s": float(np.median(m)),
        }

    def summary(self) -> dict:
        """``median_abs_pct_error`` (%), ``coverage_90`` (fraction of observed waits inside
        mean +- 1.645 std), ``num``, of admission predictions; ``dispatch_*`` the same for
        dispatch predictions; overall and ``per_class``."""

        def both(idx) -> dict:
            out = self._stats([self.pairs[i] for i in idx])
            d = self._stats([self.dispatch_pairs[i] for i in idx])
            out["dispatch_median_abs_pct_error"] = d["median_abs_pct_error"]
            out["dispatch_coverage_90"] = d["coverage_90"]
            return out

        out = both(range(len(self.pairs)))
        classes = sorted({c for c, *_ in self.pairs})
        out["per_class"] = {c: both([i for i, r in enumerate(self.pairs) if r[0] == c])
                            for c in classes}
        return out


class RWTTracker:
    """Observer that records predicted vs observed waits for any policy (see
    ``RWTAccuracy``). Attached to a ``Runtime`` through its hooks; it owns an estimator
    calibrated from the run's completions. Policies that make their own predictions leave
    them on ``Request._sched`` (``placed_at``, ``pred_mean_s``, ``pred_std_s``), and those win.
    """

    def __init__(self, rt, workload, estimator: RWTEstimator | None = None) -> None:
        from qlm_opt.core.queue import length_bucket

        self.rt = rt
        im_of = rt.iteration_model

        self.iter_model_of = im_of
        self.est = estimator or RWTEstimator.from_workload(workload, iter_model_of=im_of)
        self.acc = RWTAccuracy()
        # Policies' admission predictions, recalibrated online (split-conformal, per class
        # and band) from earlier admission predictions and their outcomes: a policy's own
        # calibration learns from its latest placement, not from admission.
        self.admission_calib = WaitCalibrator()
        self.bucket_of = lambda r: length_bucket(r.prompt_tokens)
        # instance id -> sorted [(priority, req id, req)] believed waiting in the engine
        self._mirror: dict[int, list[tuple]] = {}
        self._mirror_prompt: dict[int, int] = {}
        rt.submit_hooks.append(self.on_submit)
        if hasattr(rt, "predict_hooks"):
            rt.predict_hooks.append(self.on_predict)
        rt.first_token_hooks.append(self.acc.observe_first_token)
        rt.finish_hooks.append(self.on_finish)

    def on_finish(self, req: Request) -> None:
        self.est.observe_completion(req, self.bucket_of(req))

    def on_predict(self, req: Request, at: float, est: WaitEstimate) -> None:
        """A policy predicted ``req``'s wait (placement): the first one is the admission
        prediction, reported as recalibrated now by ``admission_calib``."""
        if req.first_token_at is not None or req.id in self.acc.records:
            return
        key = req.slo_class
        self.acc.predict(req, at, self.admission_calib.adjust(key, est), est,
                         self.admission_calib, key)

    def on_submit(self, req: Request, inst, priority: tuple) -> None:
        import bisect

        now = self.rt.now()
        info = req._sched
        pm = getattr(info, "pred_mean_s", None)
        if pm is not None and getattr(info, "placed_at", None) is not None:
            self.acc.predict_dispatch(req, info.placed_at,
                                      WaitEstimate(pm, info.pred_std_s or 0.0))
            return
        if req.first_token_at is not None:
            return
        mirror = self._mirror.setdefault(inst.id, [])
        prompt = self._mirror_prompt.get(inst.id, 0)
        # Engines admit in priority order: entries that left the waiting queue sit in front.
        drop = 0
        while drop < len(mirror):
            r = mirror[drop][2]
            if r.state == 1 and r.instance_id == inst.id:  # RequestState.WAITING
                break
            prompt -= r.prompt_tokens
            drop += 1
        if drop:
            del mirror[:drop]
        entry = (priority, req.id, req)
        k = bisect.bisect_left(mirror, entry[:2])
        ahead_prompt = prompt * k / len(mirror) if mirror else 0.0
        self.est.observe_engine(inst)
        raw = self.est.wait_raw(inst, now, float(k), ahead_prompt, req.prompt_tokens,
                                self.bucket_of)
        key = req.slo_class
        est = self.est.calib.adjust(key, raw)
        self.acc.predict_dispatch(req, now, est, raw, self.est.calib, key)
        if req.state == 1:
            mirror.insert(k, entry)
            prompt += req.prompt_tokens
        self._mirror_prompt[inst.id] = prompt

    def report(self) -> dict:
        out = self.acc.summary()
        out["output_length"] = self.est.out_model.report()
        return out
