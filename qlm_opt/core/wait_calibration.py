"""A wait estimate (``WaitEstimate``: mean and standard deviation of a request's wait until
its first token) and the estimator's online, split-conformal calibration of it
(``WaitCalibrator``): completed predictions per (key, band of the model mean) give a
bias factor (median observed / predicted) and an interval factor; predictions still
waiting may count as censored observations of the interval (``censored=True``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


Z90 = 1.6448536269514722  # two-sided 90% interval: mean +- Z90 * std


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
    """The last ``size`` (mean, std, observed, bias factor fitted when it was predicted)
    rows of a calibration cell, in a numpy ring (rows in rotated order once full), and how
    many arrived since the last fit."""

    __slots__ = ("buf", "n", "pos", "new")

    def __init__(self, size: int) -> None:
        self.buf = np.empty((size, 4))
        self.n = 0
        self.pos = 0
        self.new = 0

    def append(self, m: float, s: float, o: float, c: float = 1.0) -> None:
        row = self.buf[self.pos]
        row[0] = m
        row[1] = s
        row[2] = o
        row[3] = c
        self.pos += 1
        if self.pos == len(self.buf):
            self.pos = 0
        if self.n < len(self.buf):
            self.n += 1


def km_quantile(values: np.ndarray, observed: np.ndarray, q: float) -> float:
    """The ``q`` quantile of a right-censored sample by Kaplan-Meier: ``values[i]`` is an
    observation where ``observed[i]``, else a lower bound (the value is known to exceed it).
    The smallest observed value where the estimated CDF reaches ``q``; when it never does
    (too much of the sample censored), the largest value, a lower bound of the quantile."""
    n = len(values)
    if n == 0:
        raise ValueError("km_quantile of an empty sample")
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {q}")
    # ties: observed values before censored ones (a censored value is known to lie above)
    order = np.lexsort((~observed.astype(bool), values))
    v = values[order]
    e = observed[order].astype(bool)
    at_risk = n - np.arange(n)
    surv = np.cumprod(np.where(e, 1.0 - 1.0 / at_risk, 1.0))
    hit = np.flatnonzero(e & (surv <= 1.0 - q + 1e-12))
    return float(v[hit[0]] if len(hit) else v[-1])


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
    refreshed every ``refresh`` new triples.

    ``check_bias=True``: the bias factor is applied only while it has earned its place: at
    each refit, the cell's completed predictions are scored (median absolute % error) as
    corrected by the factor fitted when each was made, and as the model made them; when the
    correction did not do better, ``c`` is 1. Under a backlog that grows, the waits observed
    are those of requests predicted long before, and a factor learned from them can make
    the next predictions worse than the model's own; this check sees that from outcomes
    alone. Predictions must be announced with ``admit`` (its ``req_id`` matched by
    ``observe``) for their factor to be known; an unannounced one counts as uncorrected.

    ``censored=True``: predictions announced with ``admit`` and not observed yet are
    censored observations: a request admitted ``e`` seconds ago is known to wait more than
    ``e``. They enter the interval factor ``k`` (a Kaplan-Meier quantile of the scores, the
    censored ones at their lower bound ``(e - c m) / (c s)``), refreshed at most every
    ``censored_refresh_s`` clock seconds per cell. Without them, when waits grow (a backlog
    building up, requests sent to a late lane), the requests that got their first token are
    the ones that waited least, and the interval learns from them alone. The bias factor
    ``c`` stays the median of the completed ones."""

    def __init__(self, window: int = 400, min_n: int = 30, refresh: int = 16,
                 bin_ratio: float = 2.0, coverage: float = 0.9, censored: bool = False,
                 censored_refresh_s: float = 5.0, check_bias: bool = False) -> None:
        if window < 1 or min_n < 1 or refresh < 1:
            raise ValueError("window, min_n and refresh must be >= 1")
        if bin_ratio <= 1.0:
            raise ValueError(f"bin_ratio must exceed 1, got {bin_ratio}")
        if not 0.0 < coverage < 1.0:
            raise ValueError(f"coverage must lie in (0, 1), got {coverage}")
        if censored_refresh_s < 0:
            raise ValueError(f"censored_refresh_s must be >= 0, got {censored_refresh_s}")
        self.window = window
        self.min_n = min_n
        self.refresh = refresh
        self.log_bin = math.log(bin_ratio)
        self.coverage = coverage
        self.censored = censored
        self.censored_refresh_s = censored_refresh_s
        self.check_bias = check_bias
        # check_bias: cell -> the bias factor fitted (applied or not), and
        # req id -> {cell: that factor when the request was predicted}
        self._c_fit: dict[tuple, float] = {}
        self._c_at: dict[int, dict] = {}
        self._data: dict[tuple, _Ring] = {}  # cell -> last ``window`` (m, s, o)
        self._fit: dict[tuple, tuple[float, float]] = {}  # cell -> (c, k)
        # censored mode: cell -> {req id: (m, s, admitted at)} not observed yet, and
        # cell -> (clock time, k) when they were last counted
        self._pending: dict[tuple, dict] = {}
        self._kcens: dict[tuple, tuple[float, float]] = {}

    def _bin(self, mean_s: float) -> int:
        return int(math.floor(math.log(max(mean_s, 1e-3) / 1e-3) / self.log_bin))

    def _cells(self, key, mean_s: float) -> tuple:
        return (key, self._bin(mean_s)), (key, None)

    def admit(self, key, req_id: int, mean_s: float, std_s: float, at: float) -> None:
        """A prediction was made at clock time ``at``. Censored mode: until ``observe``
        with its ``req_id``, it counts as a wait longer than its age. ``check_bias``: the
        bias factors fitted now are kept, to score them when it is observed."""
        if self.check_bias:
            self._c_at[req_id] = {cell: self._c_fit.get(cell, 1.0)
                                  for cell in self._cells(key, mean_s)}
        if not self.censored:
            return
        row = (max(mean_s, 1e-6), max(std_s, 1e-6), at)
        for cell in self._cells(key, mean_s):
            self._pending.setdefault(cell, {})[req_id] = row

    def forget(self, key, req_id: int, mean_s: float) -> None:
        """A prediction that will never be observed (the request was dropped)."""
        self._c_at.pop(req_id, None)
        for cell in self._cells(key, mean_s):
            p = self._pending.get(cell)
            if p is not None:
                p.pop(req_id, None)

    def observe(self, key, mean_s: float, std_s: float, observed_s: float,
                req_id: int | None = None) -> None:
        m, sd, o = max(mean_s, 1e-6), max(std_s, 1e-6), max(observed_s, 1e-6)
        c_at = self._c_at.pop(req_id, None) if self._c_at and req_id is not None else None
        for cell in self._cells(key, mean_s):
            if req_id is not None and self._pending:
                p = self._pending.get(cell)
                if p is not None:
                    p.pop(req_id, None)
            d = self._data.get(cell)
            if d is None:
                d = self._data[cell] = _Ring(self.window)
            d.append(m, sd, o, 1.0 if c_at is None else c_at.get(cell, 1.0))
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
        if self.check_bias:
            self._c_fit[cell] = c
            corrected = sorted_median(np.sort(np.abs(a[:, 3] * m - o) / o))
            plain = sorted_median(np.sort(np.abs(m - o) / o))
            if not corrected < plain:
                c = 1.0
        score = np.abs(o - c * m) / (c * s)
        k = sorted_quantile(np.sort(score), self.coverage)
        # the interval only ever widens the model's: a backlog that builds up makes the
        # recent past too optimistic about the spread of what comes next
        self._fit[cell] = (c, max(k, Z90))

    def _censored_k(self, cell, c: float, k: float, now: float) -> float:
        """``k`` with the cell's pending predictions as censored scores (recomputed at most
        every ``censored_refresh_s`` of clock; a refit in between keeps the censored value
        as a floor until then)."""
        got = self._kcens.get(cell)
        if got is not None and now - got[0] < self.censored_refresh_s:
            return max(k, got[1])
        pend = self._pending.get(cell)
        out = k
        if pend:
            p = np.array(list(pend.values()))
            pm, ps, age = p[:, 0], p[:, 1], now - p[:, 2]
            # only the ones already waiting longer than predicted say anything about the
            # score: the others' could still be anything from 0 (a censored 0: left out)
            late = age > c * pm
            if late.any():
                d = self._data[cell]
                a = d.buf if d.n == self.window else d.buf[: d.n]
                done = np.abs(a[:, 2] - c * a[:, 0]) / (c * a[:, 1])
                lower = (age[late] - c * pm[late]) / (c * ps[late])
                vals = np.concatenate([done, lower])
                obs = np.concatenate([np.ones(len(done), bool), np.zeros(len(lower), bool)])
                out = max(k, km_quantile(vals, obs, self.coverage))
        self._kcens[cell] = (now, out)
        return out

    def factors(self, key, mean_s: float,
                now: float | None = None) -> tuple[float, float] | None:
        """(bias factor c, interval factor k) of the first fitted cell, or None. ``now``
        (censored mode) counts the cell's pending predictions into ``k``."""
        for cell in self._cells(key, mean_s):
            f = self._fit.get(cell)
            if f is not None:
                if self.censored and now is not None:
                    return f[0], self._censored_k(cell, f[0], f[1], now)
                return f
        return None

    def adjust(self, key, est: WaitEstimate, now: float | None = None) -> WaitEstimate:
        f = self.factors(key, est.mean_s, now)
        if f is None:
            return est
        c, k = f
        return WaitEstimate(c * est.mean_s, c * est.std_s * k / Z90)
