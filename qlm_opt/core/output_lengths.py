"""Output lengths as the RWT estimator learns them: mean and variance per (model, length
bucket) by Welford over a lognormal prior (``LengthStats``), and the per-request model of the
remaining output length (``OutputLengthModel``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qlm_opt.core.wait_calibration import Z90
from qlm_opt.domain import Request


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
        add_m = ms.append
        add_s = ss.append
        fits: dict[tuple, tuple | None] = {}
        get_fit = fits.get
        ridge = self.ridge
        log1p = math.log1p
        sqrt = math.sqrt
        pm, ps = self.prior
        for req in reqs:
            who = (req.model, req.slo_class, req.tenant)
            f = get_fit(who, False)
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
                add_m(pm)
                add_s(ps)
                continue
            mx, my, b, res, a1, den = f
            d = log1p(req.prompt_tokens) - mx
            add_m(my + b * d)
            add_s(sqrt(res * (a1 + d ** 2 / den)))  # ``** 2``: pow, not d * d (not always equal)
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
