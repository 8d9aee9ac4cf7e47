"""Calibrated engine-model terms: the per-sequence step cost and the per-request overhead.

The closed-form decode jumps must equal the step-by-step sum with the new term, and the
roofline (no calibration) must be unchanged."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlm_opt.engines.calibration import (
    Calibration,
    ModelCalibration,
    fit_step_model,
    predict_step_s,
)
from qlm_opt.profiling.profiler import replay
from qlm_opt.catalog import Catalog
from qlm_opt.engines.perf import IterationModel, PerfParams, iteration_model

IM = IterationModel(c_tok=3.3e-5, m0=2e-4, m_kv=2e-8, overhead_s=1.9e-3, s_seq=2.9e-4,
                    request_overhead_s=4e-3)


def test_iteration_s_charges_per_sequence():
    base = IterationModel(c_tok=3.3e-5, m0=2e-4, m_kv=2e-8, overhead_s=1.9e-3)
    assert IM.iteration_s(100, 5000, 7) == pytest.approx(base.iteration_s(100, 5000) + 7 * 2.9e-4)
    # num_seqs defaults to 0: callers that do not pass it see the old form
    assert IM.iteration_s(100, 5000) == pytest.approx(base.iteration_s(100, 5000))


@pytest.mark.parametrize("batch,kv0,n", [(1, 0, 1), (3, 100, 17), (16, 4000, 200), (64, 10, 5),
                                         (8, 0, 1000)])
def test_decode_run_closed_form_equals_step_sum_with_s_seq(batch, kv0, n):
    steps = sum(IM.iteration_s(batch, kv0 + k * batch, batch) for k in range(n))
    assert IM.decode_run_s(batch, kv0, n) == pytest.approx(steps, rel=1e-9)


def test_decode_run_closed_form_memory_bound_crossing_with_s_seq():
    # compute-bound first, then memory-bound as KV grows: the crossing stays exact
    im = IterationModel(c_tok=1e-4, m0=1e-3, m_kv=1e-7, overhead_s=1e-3, s_seq=5e-4)
    for batch, kv0, n in [(32, 0, 400), (32, 20_000, 50), (4, 9_000, 3000)]:
        steps = sum(im.iteration_s(batch, kv0 + k * batch, batch) for k in range(n))
        assert im.decode_run_s(batch, kv0, n) == pytest.approx(steps, rel=1e-9)


def test_decode_iters_before_with_s_seq():
    for b, kv0, n, horizon in [(4, 100, 500, 0.05), (16, 0, 300, 0.31), (1, 0, 10, 1.0)]:
        m = IM.decode_iters_before(b, kv0, n, horizon)
        if m:
            assert IM.decode_run_s(b, kv0, m - 1) <= horizon
        if m < n:
            assert IM.decode_run_s(b, kv0, m) > horizon


def test_decode_tokens_per_s_includes_s_seq():
    assert IM.decode_tokens_per_s(8, 1000) == pytest.approx(8 / IM.iteration_s(8, 1000, 8))


def test_roofline_default_unchanged():
    cat = Catalog.load()
    im = iteration_model(cat, "llama-3.1-8b", "A100-80GB", 1, PerfParams())
    assert im.s_seq == 0.0 and im.request_overhead_s == 0.0


def test_calibration_supplies_new_terms(tmp_path):
    cat = Catalog.load()
    name = next(iter(cat.models))
    mc = ModelCalibration(c_tok=1e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                          request_overhead_s=5e-3)
    cal = Calibration("cpu", {name: mc})
    path = cal.save(tmp_path / "cal.toml")
    back = Calibration.load(path)
    assert back.models[name] == mc
    im = iteration_model(cat, name, "cpu", 1, PerfParams(calibration=back))
    assert im.s_seq == 3e-4 and im.request_overhead_s == 5e-3 and im.overhead_s == 2e-3
    # an old file without the new fields still loads, with both terms at 0
    old = ModelCalibration(c_tok=1e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3)
    Calibration("cpu", {name: old}).save(tmp_path / "old.toml")
    im = iteration_model(cat, name, "cpu", 1,
                         PerfParams(calibration=Calibration.load(tmp_path / "old.toml")))
    assert im.s_seq == 0.0 and im.request_overhead_s == 0.0


def _sim_steps(im, trace, **kw):
    return replay(im, trace, max_num_seqs=16, kv_capacity_tokens=65536, block_size=16,
                  max_num_batched_tokens=2048, **kw)


def test_sim_request_overhead_shifts_ttft_and_e2e():
    trace = [(0.0, 100, 20), (0.001, 50, 30), (0.05, 200, 10), (0.3, 16, 5)]
    im0 = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4)
    im1 = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                         request_overhead_s=0.007)
    a, b = _sim_steps(im0, trace), _sim_steps(im1, trace)
    for (t0, e0), (t1, e1) in zip(a, b):
        assert t1 == pytest.approx(t0 + 0.007)
        assert e1 == pytest.approx(e0 + 0.007)


def test_sim_single_request_matches_hand_computation():
    # one request alone: one prefill step (1 sequence, P tokens), then O-1 decode steps of 1
    im = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                        request_overhead_s=0.004)
    p, o = 120, 10
    ((ttft, e2e),) = _sim_steps(im, [(0.0, p, o)])
    prefill = 2e-3 + 3e-4 + 3e-5 * p
    decode = 2e-3 + 3e-4 + 3e-5 * 1
    assert ttft == pytest.approx(prefill + 0.004)
    assert e2e == pytest.approx(prefill + (o - 1) * decode + 0.004)


class _StepSum(IterationModel):
    """Reference: decode runs as the plain sum of their iterations (no closed form)."""

    def decode_run_s(self, batch, kv0, n):
        return sum(self.iteration_s(batch, kv0 + k * batch, batch) for k in range(max(n, 0)))


def test_sim_jumps_equal_stepping_with_s_seq():
    # The engine's closed-form decode jumps give the same times as summing every iteration.
    kw = dict(c_tok=3e-5, m0=5e-3, m_kv=1e-6, overhead_s=2e-3, s_seq=3e-4,
              request_overhead_s=0.003)
    rng = np.random.default_rng(1)
    t, trace = 0.0, []
    for _ in range(30):
        t += rng.exponential(0.05)
        trace.append((t, int(rng.integers(16, 256)), int(rng.integers(2, 80))))
    fast = _sim_steps(IterationModel(**kw), trace)
    ref = _sim_steps(_StepSum(**kw), trace)
    for (a0, a1), (b0, b1) in zip(fast, ref):
        assert a0 == pytest.approx(b0, rel=1e-9) and a1 == pytest.approx(b1, rel=1e-9)


def test_fit_step_model_recovers_parameters():
    rng = np.random.default_rng(0)
    n = 400
    seqs = rng.integers(1, 17, n)
    toks = seqs + rng.integers(0, 2, n) * rng.integers(16, 256, n)
    kv = seqs * rng.integers(20, 300, n)
    true = np.array([1.9e-3, 2.9e-4, 3.3e-5, 0.0, 0.0])
    y = predict_step_s(true, seqs, toks, kv) * (1 + 0.05 * rng.standard_normal(n))
    p, err = fit_step_model(seqs, toks, kv, y)
    assert p[0] == pytest.approx(true[0], rel=0.15)
    assert p[1] == pytest.approx(true[1], rel=0.15)
    assert p[2] == pytest.approx(true[2], rel=0.15)
    assert np.all(p >= 0) and 0 <= err < 0.1
    assert not math.isnan(err)


# -- per-request overhead distribution ----------------------------------------------------------
Q = tuple(np.linspace(-2e-3, 6e-3, 21))  # offsets around the median at quantiles 0 .. 1


def test_request_overhead_draw_is_deterministic_and_follows_the_quantiles():
    im = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3,
                        request_overhead_s=4e-3, request_overhead_q=Q)
    draws = np.array([im.request_overhead_for(i) for i in range(20_000)])
    assert [im.request_overhead_for(i) for i in range(50)] == list(draws[:50])  # replayable
    assert draws.min() >= 4e-3 - 2e-3 - 1e-12 and draws.max() <= 4e-3 + 6e-3 + 1e-12
    # uniform offsets on [-2, 6] ms: the draws' quantiles follow the table
    for p in (10, 50, 90):
        assert np.percentile(draws, p) == pytest.approx(4e-3 - 2e-3 + 8e-3 * p / 100, abs=2e-4)
    # a constant overhead without a table; never negative with one
    assert IM.request_overhead_for(7) == IM.request_overhead_s
    low = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3,
                         request_overhead_s=1e-3, request_overhead_q=Q)
    assert min(low.request_overhead_for(i) for i in range(2000)) == 0.0


def test_sim_applies_one_overhead_per_request_to_ttft_and_e2e():
    trace = [(0.5 * i, 64, 8) for i in range(40)]  # far apart: every request alone
    im0 = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4)
    im1 = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                         request_overhead_s=4e-3, request_overhead_q=Q)
    a, b = _sim_steps(im0, trace), _sim_steps(im1, trace)
    shifts = []
    for i, ((t0, e0), (t1, e1)) in enumerate(zip(a, b)):
        ro = im1.request_overhead_for(i)
        assert t1 == pytest.approx(t0 + ro) and e1 == pytest.approx(e0 + ro)
        shifts.append(ro)
    assert len(set(shifts)) > 30  # it varies from request to request


def test_calibration_file_keeps_the_overhead_distribution(tmp_path):
    cat = Catalog.load()
    name = next(iter(cat.models))
    mc = ModelCalibration(c_tok=1e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                          request_overhead_s=5e-3, request_overhead_q=Q)
    back = Calibration.load(Calibration("cpu", {name: mc}).save(tmp_path / "cal.toml"))
    assert back.models[name] == mc
    im = iteration_model(cat, name, "cpu", 1, PerfParams(calibration=back))
    assert im.request_overhead_q == Q


# -- the machine's speed over time -------------------------------------------------------------
def test_slowdown_draw_is_per_window_and_deterministic():
    q = tuple(np.linspace(0.8, 1.6, 21))
    im = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, slowdown_q=q,
                        slowdown_window_s=0.5)
    assert im.slowdown_at(0.1) == im.slowdown_at(0.4)  # one window, one factor
    draws = np.array([im.slowdown_at(0.5 * w + 0.01) for w in range(5000)])
    assert draws.min() >= 0.8 - 1e-12 and draws.max() <= 1.6 + 1e-12
    assert np.percentile(draws, 50) == pytest.approx(1.2, abs=0.03)
    assert IM.slowdown_at(123.0) == 1.0  # no table: a steady machine


def test_noise_seed_resamples_the_draws_with_the_same_distribution():
    q = tuple(np.linspace(0.8, 1.6, 21))
    ims = [IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, slowdown_q=q,
                          request_overhead_s=4e-3, request_overhead_q=Q, noise_seed=s)
           for s in range(3)]
    windows = [[im.slowdown_at(w + 0.5) for w in range(4000)] for im in ims]
    overheads = [[im.request_overhead_for(i) for i in range(4000)] for im in ims]
    for a, b in ((0, 1), (1, 2), (0, 2)):  # another sample: most draws differ
        assert np.mean(np.isclose(windows[a], windows[b])) < 0.05
        assert np.mean(np.isclose(overheads[a], overheads[b])) < 0.05
    for ws, os_ in zip(windows, overheads):  # of the same distribution
        assert np.percentile(ws, 50) == pytest.approx(1.2, abs=0.03)
        assert np.percentile(os_, 90) == pytest.approx(4e-3 - 2e-3 + 8e-3 * 0.9, abs=2e-4)
    # a fleet's [perf] noise_seed reaches the iteration model
    cat = Catalog.load()
    name = next(iter(cat.models))
    cal = Calibration("cpu", {name: ModelCalibration(c_tok=1e-5, m0=0.0, m_kv=0.0,
                                                    overhead_s=2e-3, slowdown_q=q)})
    im = iteration_model(cat, name, "cpu", 1, PerfParams(calibration=cal, noise_seed=5))
    assert im.noise_seed == 5
    from qlm_opt.config import Fleet
    from tests.conftest import small_fleet_dict

    assert Fleet.from_dict({**small_fleet_dict(), "perf": {"noise_seed": 7}}).perf.noise_seed == 7
    with pytest.raises(ValueError, match="noise_seed"):
        Fleet.from_dict({**small_fleet_dict(), "perf": {"noise_seed": -1}})


def test_sim_slowdown_scales_engine_time():
    # every window twice as slow: a lone request's engine time doubles, jumps included
    trace = [(0.0, 120, 40)]
    base = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4)
    slow = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                          slowdown_q=(2.0,) * 21)
    ((t0, e0),), ((t1, e1),) = _sim_steps(base, trace), _sim_steps(slow, trace)
    assert t1 == pytest.approx(2 * t0) and e1 == pytest.approx(2 * e0)
    # a varying speed keeps every request's events ordered and finishes everything
    rng = np.random.default_rng(3)
    t, tr = 0.0, []
    for _ in range(60):
        t += rng.exponential(0.05)
        tr.append((t, int(rng.integers(16, 256)), int(rng.integers(2, 80))))
    vary = IterationModel(c_tok=3e-5, m0=0.0, m_kv=0.0, overhead_s=2e-3, s_seq=3e-4,
                          slowdown_q=tuple(np.linspace(0.7, 2.5, 21)), slowdown_window_s=0.2)
    res = _sim_steps(vary, tr)
    ref = _sim_steps(base, tr)
    assert all(0 < a <= b for a, b in res)
    assert np.mean([b for _, b in res]) > np.mean([b for _, b in ref])
