"""A wait estimate (``WaitEstimate``: mean and standard deviation of a request's wait until
its first token) and the estimator's online, split-conformal calibration of it
(``WaitCalibrator``): completed predictions per (SLO class, band of the model mean) give a
bias factor (median observed / predicted) and an interval factor."""

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
