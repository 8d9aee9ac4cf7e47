"""The estimator's fast paths against the plain computations they replace: bit-identical,
or, where the floats differ (the profile's float32 matrix and its renewal by power series),
within the bounds each test states."""

from __future__ import annotations

from types import SimpleNamespace

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qlm_opt.domain import EngineStats, Request
from qlm_opt.engines.perf import IterationModel
from qlm_opt.core import estimator as _estimator
from qlm_opt.core.estimator import RWTEstimator
from qlm_opt.core.wait_calibration import WaitCalibrator, sorted_median, sorted_quantile

floats = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)


@settings(max_examples=400, deadline=None)
@given(st.lists(floats, min_size=1, max_size=450),
       st.sampled_from([0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0]))
def test_sorted_median_and_quantile_match_numpy(xs, q):
    a = np.asarray(xs, dtype=float)
    s = np.sort(a)
    assert sorted_median(s) == float(np.median(a))
    assert sorted_quantile(s, q) == float(np.quantile(a, q))


def _reference_fit(trips, window, coverage=0.9):
    """The calibrator's fit as first written: a deque of the last ``window`` triples."""
    a = np.asarray(trips[-window:], dtype=float)
    m, s, o = a[:, 0], a[:, 1], a[:, 2]
    c = float(np.exp(np.median(np.log(o / m))))
    score = np.abs(o - c * m) / (c * s)
    k = float(np.quantile(score, coverage))
    return c, max(k, 1.6448536269514722)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 50.0), st.floats(1e-3, 10.0), st.floats(1e-3, 80.0)),
                min_size=1, max_size=300),
       st.integers(5, 64))
def test_calibrator_ring_matches_deque(trips, window):
    cal = WaitCalibrator(window=window, min_n=4, refresh=3)
    seen: dict[tuple, list] = {}
    new: dict[tuple, int] = {}
    fits: dict[tuple, tuple[float, float]] = {}
    for m, s, o in trips:
        cal.observe("c", m, s, o)
        for cell in (("c", cal._bin(m)), ("c", None)):
            rows = seen.setdefault(cell, [])
            rows.append((max(m, 1e-6), max(s, 1e-6), max(o, 1e-6)))
            new[cell] = new.get(cell, 0) + 1
            if new[cell] >= 3 or cell not in fits and len(rows[-window:]) >= 4:
                new[cell] = 0
                if len(rows[-window:]) >= 4:
                    fits[cell] = _reference_fit(rows, window)
    assert cal._fit == fits


# -- EngineView: several estimates on one engine state give what separate calls give ----------
IM = IterationModel(c_tok=1e-4, m0=0.01, m_kv=1e-8, overhead_s=0.004)


class _Eng:
    def __init__(self, running, waiting, seats):
        self._running = running
        self._waiting = waiting
        self.seats = seats

    def stats(self):
        return EngineStats(num_running=len(self._running), num_waiting=self._waiting,
                           max_num_seqs=self.seats, kv_capacity_tokens=10**7,
                           kv_used_tokens=1000 * len(self._running),
                           decode_tokens_per_s=1000.0, prefill_tokens_per_s=1e4, model="m",
                           busy_until_at=0.05)

    def running_requests(self):
        return self._running

    # the rest of the protocol's reads the estimator makes (engines/base.py)
    config = SimpleNamespace(max_num_batched_tokens=None)

    def running_generated(self):
        return self._running, [r.num_generated for r in self._running]

    def prefill_summary(self, now_at):
        return None  # the estimator then runs prefill_pass itself

    def num_generated(self, r):
        return r.num_generated


class _Inst:
    def __init__(self, eng):
        self.engine = eng
        self.id = 0
        self.model = "m"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 40), st.integers(0, 6), st.integers(1, 48), st.data())
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_view_matches_separate_calls(nrun, nwait, seats, data):
    rng = np.random.default_rng(nrun * 100 + seats)
    running = []
    for i in range(nrun):
        r = Request(i, "m", "batch", int(rng.integers(1, 3000)), 10**6, 0.0, 600.0)
        r.num_generated = int(rng.integers(0, 300))
        r.first_token_at = [None, 0.5, 2.0][int(rng.integers(0, 3))]  # now is 1.0
        running.append(r)
    inst = _Inst(_Eng(running, nwait, seats))
    calls = data.draw(st.lists(st.tuples(st.floats(0, 300), st.floats(0, 1e5),
                                         st.integers(1, 20000), st.floats(0, 5.0),
                                         st.sampled_from([math.inf, 0.5, 3.0])),
                               min_size=1, max_size=6))
    for im_of in (lambda i: IM, None):
        a = RWTEstimator(150.0, 120.0**2, 500.0, iter_model_of=im_of)
        b = RWTEstimator(150.0, 120.0**2, 500.0, iter_model_of=im_of)
        view = b.view(inst, 1.0)
        for pos, ahead, own, cut, horizon in calls:
            wa = a.wait(inst, 1.0, pos, ahead, own, lambda r: 0, cut, cut_in_horizon_s=horizon)
            wb = b.wait(inst, 1.0, pos, ahead, own, lambda r: 0, cut, cut_in_horizon_s=horizon,
                        view=view)
            assert repr(wa) == repr(wb)  # exact, NaN included (overflowing inputs)
            for pending in (True, False):
                pa = a.prefill_phase(inst, inst.engine.stats(), 1.0, ahead, own, pending)
                pb = b.prefill_phase(inst, view.st, 1.0, ahead, own, pending, view=view)
                assert repr(pa) == repr(pb)


# -- the profile's running-requests matrix, built in place ------------------------------------
def _norm_cdf_expression(z):
    """``_norm_cdf`` as first written (one temporary per operation)."""
    x = np.abs(z) / math.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * x)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
    erf = 1.0 - poly * np.exp(-x * x)
    return 0.5 * (1.0 + np.sign(z) * erf)


def _running_completions_expression(g, lm, ls, x):
    gg = g[:, None]
    lg = np.log(gg + 0.5)
    f0 = np.where(gg > 0, _norm_cdf_expression((lg - lm[:, None]) / ls[:, None]), 0.0)
    fx = _norm_cdf_expression((np.log(gg + 0.5 + x[None, :]) - lm[:, None]) / ls[:, None])
    surv = np.maximum(1.0 - f0, 1e-9)
    pij = np.clip((fx - f0) / surv, 0.0, 1.0)
    pij[:, 0] = 0.0
    return pij.sum(axis=0), (pij * (1.0 - pij)).sum(axis=0)


def _bits(a):
    return np.ascontiguousarray(a, dtype=float).view(np.int64)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-40.0, 40.0), min_size=1, max_size=200), st.integers(1, 7))
def test_norm_cdf_in_place_is_the_expression(zs, cols):
    z = np.resize(np.asarray(zs + [0.0, -0.0], dtype=float), (len(zs) + 2) * cols)
    z = z.reshape(-1, cols)
    before = z.copy()
    assert np.array_equal(_bits(_estimator._norm_cdf(z)), _bits(_norm_cdf_expression(z)))
    assert np.array_equal(_bits(z), _bits(before))  # its input is left alone


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.floats(8.0, 20000.0), st.integers(0, 2**31 - 1))
def test_running_completions_in_place_is_the_expression(nr, horizon, seed):
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 3000, nr).astype(float)
    g[rng.random(nr) < 0.2] = 0.0
    lm = rng.normal(5.0, 1.5, nr)
    ls = rng.uniform(1e-3, 2.5, nr)
    x = np.linspace(0.0, horizon, 49)
    got = _estimator._running_completions(g, lm, ls, x)
    want = _running_completions_expression(g, lm, ls, x)
    assert np.array_equal(_bits(got[0]), _bits(want[0]))
    assert np.array_equal(_bits(got[1]), _bits(want[1]))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.floats(8.0, 20000.0), st.integers(0, 2**31 - 1),
       st.floats(0.01, 0.5))
def test_running_completions_fast_is_close_to_the_expression(nr, horizon, seed, ls_lo):
    """The profile's matrix in float32 with survival functions (``fast``, what ``_compute``
    uses unless clairvoyant): not the floats of the float64 expression, but within 5e-5
    per request of its sums (a log-std as low as 0.01, the learned model's floor, magnifies
    the log's rounding), also for requests far in their length distribution's tail (a small
    survival ``1 - F(g)`` divides the residual). Typical errors are under 1.2e-5 per
    request; the largest found, 2.2e-5, is a request ~6 log-stds past its median (g 733,
    log-mean 6.13, log-std 0.08); hypothesis had found 1.1e-5 against an earlier 1e-5."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 3000, nr).astype(float)
    g[rng.random(nr) < 0.2] = 0.0
    lm = rng.normal(5.0, 1.5, nr)
    ls = rng.uniform(ls_lo, 2.5, nr)
    x = np.linspace(0.0, horizon, 49)
    got = _estimator._running_completions(g, lm, ls, x, fast=True)
    want = _running_completions_expression(g, lm, ls, x)
    for a, b in zip(got, want):
        assert a.dtype == np.float64 and a.shape == b.shape
        assert np.max(np.abs(a - b)) <= 5e-5 * nr


def test_norm_sf_keeps_the_upper_tail():
    """``_norm_sf`` in float32 is 1 - ``_norm_cdf`` (float64) within 3e-7 absolute (the
    rounding of z to float32), and within 1e-5 relative in the upper tail, where
    ``1 - _norm_cdf`` in float32 rounds to 0 or to multiples of 6e-8; in float64 it is
    1 - ``_norm_cdf`` where that subtraction is exact enough to compare (z < 6)."""
    z = np.linspace(-8.0, 8.0, 4001)
    want = 1.0 - _estimator._norm_cdf(z)
    got = _estimator._norm_sf(z.astype(np.float32)).astype(float)
    assert np.max(np.abs(got - want)) < 3e-7
    tail = (z > 3.0) & (z < 6.0)
    assert np.max(np.abs(got[tail] / want[tail] - 1.0)) < 1e-5
    sf64 = _estimator._norm_sf(z)
    assert np.max(np.abs(sf64[tail] / want[tail] - 1.0)) < 1e-6
    far = z > 6.0  # beyond float64's 1 - Phi: against the float64 tail
    assert np.max(np.abs(got[far] / sf64[far] - 1.0)) < 1e-5
    plain32 = 1.0 - _estimator._norm_cdf(z.astype(np.float32)).astype(float)
    assert np.max(np.abs(plain32[tail] / want[tail] - 1.0)) > 0.1  # what it avoids


def test_profiles_use_the_fast_matrix_unless_clairvoyant(monkeypatch):
    """``_compute`` builds the running-requests matrix with ``fast`` (float32), except for
    the clairvoyant estimator (a point mass: log-std 1e-3), which keeps float64."""
    seen = []
    plain = _estimator._running_completions

    def spy(g, lm, ls, x, fast=False):
        seen.append(fast)
        return plain(g, lm, ls, x, fast)

    monkeypatch.setattr(_estimator, "_running_completions", spy)
    for clair, want in ((False, True), (True, False)):
        running = [Request(i, "m", "batch", 100 + i, 50 + i, 0.0, 600.0) for i in range(12)]
        for i, r in enumerate(running):
            r.num_generated = i
        est = RWTEstimator(200.0, 150.0 ** 2, 300.0, clairvoyant=clair,
                           iter_model_of=lambda i: IM)
        est.profile(_Inst(_Eng(running, 0, 8)), 1.0, lambda r: 0)
        assert seen.pop() is want


def _renewal_expression(c_run, fcdf, free):
    """The renewal stepped on the grid, as the estimator wrote it before
    ``_renewal_series``."""
    n_pts = len(fcdf) - 1
    fpmf = np.diff(fcdf)
    d_start = np.zeros(n_pts + 1)
    c_new = np.zeros(n_pts + 1)
    d_start[0] = free
    d_run = np.diff(c_run, prepend=0.0)
    for k in range(1, n_pts + 1):
        c_new[k] = np.dot(d_start[:k][::-1], fpmf[:k])
        d_start[k] = d_run[k] + c_new[k]
    return np.cumsum(d_start), np.cumsum(c_new)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 300), st.floats(8.0, 20000.0), st.floats(0.0, 64.0),
       st.integers(0, 2**31 - 1))
def test_renewal_series_is_close_to_the_renewal(nr, horizon, free, seed):
    """``_renewal_series`` (what ``_compute`` uses) solves the renewal stepped on the grid
    in another summation order: within 1e-12 relative (of values at least 1)."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 3000, nr).astype(float)
    lm = rng.normal(5.0, 1.5, nr)
    ls = rng.uniform(1e-3, 2.5, nr)
    x = np.linspace(0.0, horizon, 49)
    c_run, _ = _estimator._running_completions(g, lm, ls, x)
    fcdf = _estimator._norm_cdf((np.log(np.maximum(x, 1e-9) + 0.5) - rng.normal(5.0, 1.0))
                                / rng.uniform(0.1, 2.0))
    fcdf[0] = 0.0
    got = _estimator._renewal_series(c_run, fcdf, free)
    want = _renewal_expression(c_run, fcdf, free)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)) < 1e-12
    assert got[0][0] == free and got[1][0] == 0.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.floats(1e-3, 1e9), st.sampled_from([1, 2, 7, 48, 64, 200])),
                min_size=1, max_size=6))
def test_grid_is_linspace(calls):
    # several horizons and sizes in a row: the cached arange of one size is reused, never
    # changed by a call
    for horizon, n_pts in calls:
        got = _estimator._grid(horizon, n_pts)
        assert np.array_equal(_bits(got), _bits(np.linspace(0.0, horizon, n_pts + 1)))
