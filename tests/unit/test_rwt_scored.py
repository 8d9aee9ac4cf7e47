"""The scored (admission) wait prediction's parts: cut-ins counted only until the request's
prefill starts (``RWTEstimator.wait_raw(cut_in_until_start=True)``), and with a seat free
the prefill ahead costed in chunked iterations as without cut-ins, a bias factor applied
only while it beats none (``WaitCalibrator(check_bias=True)``), and the tracker's scored
mean from the policy's model estimate (``RWTTracker.on_predict`` with ``raw``)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from qlm_opt.config import Workload
from qlm_opt.core.wait_calibration import Z90, WaitCalibrator, WaitEstimate
from qlm_opt.domain import Request
from qlm_opt.whatif.accuracy import RWTTracker
from tests.conftest import small_workload_dict
from tests.unit.test_estimator import _est, _inst

B = lambda r: 0  # noqa: E731


def test_cut_ins_do_not_delay_a_request_that_gets_a_seat_at_once():
    """4 of 64 seats taken, nothing ahead: the request's prefill starts now, so later
    arrivals cannot overtake it; the whole-wait count adds their prefill anyway."""
    est = _est()
    inst = _inst(4, 64)
    none = est.wait_raw(inst, 0.0, 0, 0, 500, B, 0.0)
    whole = est.wait_raw(inst, 0.0, 0, 0, 500, B, 20.0)
    start = est.wait_raw(inst, 0.0, 0, 0, 500, B, 20.0, cut_in_until_start=True)
    assert whole.mean_s > 1.05 * none.mean_s
    assert start.mean_s == pytest.approx(none.mean_s, rel=0.02)


def test_cut_ins_still_count_while_the_request_waits_for_a_seat():
    """Every seat taken: arrivals while it waits for one go first; only those during its
    own prefill (after its start) are left out."""
    est = _est()
    inst = _inst(32, 32)
    none = est.wait_raw(inst, 0.0, 0, 0, 4000, B, 0.0)
    whole = est.wait_raw(inst, 0.0, 0, 0, 4000, B, 20.0)
    start = est.wait_raw(inst, 0.0, 0, 0, 4000, B, 20.0, cut_in_until_start=True)
    assert none.mean_s < start.mean_s < whole.mean_s


def _inst_prefilling(pending_prompts: list[int]):
    """30 decoders of 64 seats, plus running requests whose prefill has not produced a
    first token yet (``pending_prompts`` tokens each)."""
    inst = _inst(30, 64)
    for k, p in enumerate(pending_prompts):
        inst.engine._running.append(Request(100 + k, "m", "batch", p, 100, 0.0, 600.0))
    return inst


def test_scored_prediction_with_a_free_seat_is_the_free_seat_one_as_cut_ins_vanish():
    """A seat is free, two requests (2,000 prompt tokens) are ahead and a 3,000-token prompt
    is prefilling: with no cut-ins the wait is the iteration in flight (carrying that
    prefill), then the prefill ahead and its own in chunked iterations. A vanishing cut-in
    rate must not switch the scored prediction to the profile's per-token cost of the
    pending prefill (the conv 3 batch requests that had to wait for another's prefill were
    under-predicted 1.4-1.6x that way). Decisions keep the profile's cost."""
    est = _est()
    inst = _inst_prefilling([3000])
    free = est.wait_raw(inst, 0.0, 2, 2000, 500, B, 0.0)
    scored = est.wait_raw(inst, 0.0, 2, 2000, 500, B, 1e-6, cut_in_until_start=True)
    decide = est.wait_raw(inst, 0.0, 2, 2000, 500, B, 1e-6)
    assert scored.mean_s == pytest.approx(free.mean_s, rel=1e-4)
    assert decide.mean_s > 1.2 * free.mean_s


def test_scored_prediction_keeps_the_profile_when_pending_prefill_exceeds_a_budget():
    """Pending prefill of 12,000 tokens, past one iteration's 8,192: engines report it as
    whole prompts, which overstates what is left, so the scored prediction keeps the
    profile's cost, as decisions do."""
    est = _est()
    inst = _inst_prefilling([6000, 6000])
    free = est.wait_raw(inst, 0.0, 2, 2000, 500, B, 0.0)
    scored = est.wait_raw(inst, 0.0, 2, 2000, 500, B, 1e-6, cut_in_until_start=True)
    decide = est.wait_raw(inst, 0.0, 2, 2000, 500, B, 1e-6)
    assert scored.mean_s == pytest.approx(decide.mean_s, rel=1e-4)
    assert abs(scored.mean_s - free.mean_s) > 0.1 * free.mean_s


def test_without_cut_ins_the_scored_prediction_is_the_decisions_one():
    """The profile (refreshed once per simulated second) saw 4 free seats; the engine has
    filled them since. A request without cut-ins is then costed by the profile's start,
    scored or not: the scored prediction feeds ``qlm``'s urgent-miss trigger for such
    classes, so costing it as a free seat would change decisions. With cut-ins the scored
    prediction takes the free-seat cost."""
    est = _est()
    inst = _inst(60, 64)
    est.profile(inst, 0.0, B)
    for k in range(4):
        inst.engine._running.append(Request(200 + k, "m", "batch", 500, 100, 0.0, 600.0))
    scored = est.wait_raw(inst, 0.1, 1, 2000, 500, B, 0.0, cut_in_until_start=True)
    decide = est.wait_raw(inst, 0.1, 1, 2000, 500, B, 0.0)
    cut = est.wait_raw(inst, 0.1, 1, 2000, 500, B, 1e-6, cut_in_until_start=True)
    assert scored == decide
    assert cut.mean_s > 1.2 * scored.mean_s


def _run(cal: WaitCalibrator, ratio, n: int = 3000, m: float = 100.0, seed: int = 0):
    """Admissions every second predicted ``m``, observed ``m * ratio(t) * e^Z`` (Z ~ N(0,
    0.1)), each observation coming back when its wait ends. Returns the median absolute %
    error of the calibrated predictions, after a warm-up."""
    rng = np.random.default_rng(seed)
    at = np.arange(n, dtype=float)
    obs = m * np.array([ratio(t) for t in at]) * np.exp(0.1 * rng.standard_normal(n))
    events = sorted([(at[i], 1, i) for i in range(n)] + [(at[i] + obs[i], 0, i)
                                                         for i in range(n)])
    ape = []
    for t, kind, i in events:
        if kind == 1:
            e = cal.adjust("c", WaitEstimate(m, 10.0), t)
            cal.admit("c", i, m, 10.0, t)
            if i >= 600:
                ape.append(abs(e.mean_s - obs[i]) / obs[i])
        else:
            cal.observe("c", m, 10.0, obs[i], i)
    return float(np.median(ape)) * 100


def test_a_steady_bias_is_applied():
    """The model is 2x short all along: the factor beats none and is applied."""
    plain = _run(WaitCalibrator(), lambda t: 2.0)
    checked = _run(WaitCalibrator(check_bias=True), lambda t: 2.0)
    assert checked < 10.0
    assert checked == pytest.approx(plain, abs=1.0)


def test_a_stale_bias_is_withheld():
    """The model is right on average but the waits swing (x e^(0.3 sin(pi t / 200 s)))
    while each outcome comes back a wait (~100 s) later: the factor learned from the
    outcomes is out of phase, worse than none; the check sees that and leaves the model as
    it is."""
    swing = lambda t: float(np.exp(0.3 * np.sin(np.pi * t / 200.0)))  # noqa: E731
    kw = dict(window=100, min_n=10, refresh=5)
    model = 100 * np.median([abs(1 - swing(t)) / swing(t) for t in range(600, 3000)])
    for seed in (0, 1):
        plain = _run(WaitCalibrator(**kw), swing, seed=seed)
        checked = _run(WaitCalibrator(check_bias=True, **kw), swing, seed=seed)
        assert plain > model + 8.0  # the stale factor hurts ...
        assert checked <= model + 2.0  # ... and the check keeps it out


def test_forgotten_predictions_leave_no_factor_behind():
    cal = WaitCalibrator(check_bias=True)
    cal.admit("c", 1, 1.0, 0.1, 0.0)
    cal.forget("c", 1, 1.0)
    assert not cal._c_at


def _tracker():
    rt = SimpleNamespace(iteration_model=lambda *a: None, submit_hooks=[], predict_hooks=[],
                         first_token_hooks=[], finish_hooks=[], drop_hooks=[],
                         now=lambda: 0.0)
    return RWTTracker(rt, Workload.from_dict(small_workload_dict()))


def test_tracker_scores_the_model_estimate_with_a_checked_bias():
    """With the policy's model estimate given, the scored mean follows it (times the
    checked factor), not the policy's own calibration; the interval keeps the width of the
    policy's estimate recalibrated."""
    tr = _tracker()
    t = 0.0
    for i in range(400):
        r = Request(i, "m", "batch", 100, 10, t, t + 600.0)
        raw = WaitEstimate(10.0, 1.0)
        est = WaitEstimate(30.0, 3.0)  # the policy's calibration: 3x, wrong
        tr.on_predict(r, t, est, raw)
        rec = tr.acc.records[r.id]
        if i == 0:
            assert rec.mean_s == 10.0  # nothing learned yet: the model's estimate
            assert rec.std_s == tr.admission_calib.adjust("batch", est, t).std_s
        r.first_token_at = t + 20.0  # the truth: 2x the model
        tr.acc.observe_first_token(r)
        t += 1.0
    r = Request(10**6, "m", "batch", 100, 10, t, t + 600.0)
    tr.on_predict(r, t, WaitEstimate(30.0, 3.0), WaitEstimate(10.0, 1.0))
    assert tr.acc.records[r.id].mean_s == pytest.approx(20.0, rel=0.01)
    # without the model's estimate the policy's is recalibrated as before
    r2 = Request(10**6 + 1, "m", "batch", 100, 10, t, t + 600.0)
    tr.on_predict(r2, t, WaitEstimate(30.0, 3.0))
    assert tr.acc.records[r2.id].mean_s == pytest.approx(20.0, rel=0.01)
    assert Z90 > 0
