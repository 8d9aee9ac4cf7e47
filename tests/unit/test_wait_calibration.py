"""The admission-wait calibration: Kaplan-Meier quantiles of a censored sample, the censored
interval of ``WaitCalibrator`` on a stream whose long waits are still pending, and
forgetting a dropped request."""

from __future__ import annotations

import numpy as np
import pytest

from qlm_opt.core.wait_calibration import Z90, WaitCalibrator, WaitEstimate, km_quantile


def test_km_quantile_without_censoring_is_an_order_statistic():
    x = np.array([5.0, 1.0, 3.0, 2.0, 4.0])
    obs = np.ones(5, bool)
    assert km_quantile(x, obs, 0.5) == 3.0
    assert km_quantile(x, obs, 0.9) == 5.0
    assert km_quantile(x, obs, 0.1) == 1.0


def test_km_quantile_recovers_a_censored_median():
    rng = np.random.default_rng(1)
    t = rng.exponential(1.0, 20000)  # true median ln 2
    c = rng.exponential(2.0, 20000)  # censoring times, independent
    seen = np.minimum(t, c)
    obs = t <= c
    assert abs(km_quantile(seen, obs, 0.5) - np.log(2.0)) < 0.03
    # dropping the censored ones instead biases it low
    assert np.median(seen[obs]) < 0.8 * np.log(2.0)


def test_km_quantile_rejects_bad_input():
    with pytest.raises(ValueError):
        km_quantile(np.array([]), np.array([], bool), 0.5)
    with pytest.raises(ValueError):
        km_quantile(np.array([1.0]), np.array([True]), 1.0)
    with pytest.raises(ValueError):
        WaitCalibrator(bin_ratio=1.0)


def _stream(censored: bool, growth: float, seed: int = 0) -> float:
    """Coverage of the calibrated 90% interval on a stream of admissions, one every 0.5 s,
    predicted m = 10 s (std 0.5 s: far too narrow) while the waits are
    o = m (1 + growth t) e^Z, Z ~ N(0, 1): a backlog building up that the model does not
    see. Observations come back in order of first token, so at any moment the long waits
    of the recent past are still pending."""
    rng = np.random.default_rng(seed)
    cal = WaitCalibrator(censored=censored)
    m, s = 10.0, 0.5
    n = 4000
    at = np.arange(n) * 0.5
    obs = m * (1.0 + growth * at) * np.exp(rng.standard_normal(n))
    events = sorted([(at[i], 0, i) for i in range(n)] + [(at[i] + obs[i], 1, i)
                                                         for i in range(n)])
    hits = []
    for t, kind, i in events:
        if kind == 0:
            e = cal.adjust("c", WaitEstimate(m, s), now=t)
            if i >= 1000:  # past the warm-up
                hits.append(e.mean_s - Z90 * e.std_s <= obs[i] <= e.mean_s + Z90 * e.std_s)
            cal.admit("c", i, m, s, t)
        else:
            cal.observe("c", m, s, obs[i], req_id=i)
    return float(np.mean(hits))


def test_censored_interval_covers_a_growing_backlog_where_completed_ones_do_not():
    # the completed ones are the short waits of the past: their score quantile is too small
    assert _stream(censored=False, growth=0.01) < 0.8
    assert _stream(censored=True, growth=0.01) >= 0.87
    # and on a stationary stream the pending ones do not over-widen it
    assert 0.85 <= _stream(censored=True, growth=0.0) <= 0.95


def test_forget_stops_counting_a_dropped_request():
    cal = WaitCalibrator(censored=True, min_n=5)
    for i in range(10):
        cal.observe("c", 1.0, 0.1, 1.0, req_id=i)
    base = cal.adjust("c", WaitEstimate(1.0, 0.1), now=0.0)
    for i in range(100, 105):
        cal.admit("c", i, 1.0, 0.1, at=0.0)
    # a third of the cell has waited 100x its prediction: the interval takes them in
    wide = cal.adjust("c", WaitEstimate(1.0, 0.1), now=100.0)
    assert wide.std_s > 100 * base.std_s
    for i in range(100, 105):
        cal.forget("c", i, 1.0)
    back = cal.adjust("c", WaitEstimate(1.0, 0.1), now=200.0)
    assert back.std_s == pytest.approx(base.std_s)
