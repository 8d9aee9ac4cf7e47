"""The estimator learns an engine from its stats alone: from a wrong prior (the datasheet
roofline) it converges to the engine it observes (a perturbed model with known constants),
its calibration recovers a known bias and interval, and it learns the prefix-cache hit
fraction from the engine's counters."""

from __future__ import annotations

import types

import numpy as np
import pytest

from qlm_opt.catalog import Catalog
from qlm_opt.domain import Request
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.engines.simulated import EngineConfig, SimEngine
from qlm_opt.core.estimator import RWTEstimator
from qlm_opt.core.wait_calibration import WaitCalibrator, WaitEstimate, Z90
from qlm_opt.hosts.simulated import Simulator

MODEL, GPU = "llama-3.1-8b", "A100-80GB"
TRUTH = PerfParams(mfu=0.3, mbu=0.55, overhead_s=0.009)  # the engine as it really runs
PRIOR = PerfParams()  # datasheet roofline, default efficiencies


class _Listener:
    def __init__(self):
        self.first = {}

    def on_first_token(self, req, at):
        self.first[req.id] = at

    def on_finished(self, req, at):
        pass

    def on_failed(self, req, at, reason):
        raise AssertionError(reason)


def _setup():
    cat = Catalog.load()
    true_im = iteration_model(cat, MODEL, GPU, 1, TRUTH)
    prior_im = iteration_model(cat, MODEL, GPU, 1, PRIOR)
    sim = Simulator()
    lis = _Listener()
    eng = SimEngine(0, MODEL, true_im, 400_000, EngineConfig(), lis, sim.now, 131072)
    eng.set_waker(sim.engine_waker)
    inst = types.SimpleNamespace(id=0, engine=eng, model=MODEL)
    est = RWTEstimator(150.0, 150.0 ** 2, 1000.0, iter_model_of=lambda i: prior_im)
    return sim, eng, inst, est, true_im, prior_im, lis


def _ttft_prediction(est, inst, now, prompt):
    return est.wait_raw(inst, now, 0.0, 0.0, prompt, lambda r: 0).mean_s


def test_converges_from_wrong_prior_on_known_stream():
    sim, eng, inst, est, true_im, prior_im, lis = _setup()
    # the prior is far off: prefill 1.67x, decode ~1.4x too fast
    assert true_im.c_tok / prior_im.c_tok == pytest.approx(0.5 / 0.3)
    rng = np.random.default_rng(0)
    # a probe on the idle engine: predicted TTFT from the prior vs observed
    probe = Request(10_000, MODEL, "c", 2000, 1, 0.0, 10.0)
    before = _ttft_prediction(est, inst, 0.0, 2000)
    eng.submit(probe, (0,))
    sim.run([], lambda r: None)
    observed = lis.first[probe.id]
    assert abs(before / observed - 1) > 0.3  # the prior's error
    # a stream of traffic; the estimator samples the engine's stats once per arrival
    t = eng.clock_at + 1.0
    reqs = []
    for i in range(400):
        t += float(rng.exponential(0.05))
        r = Request(i, MODEL, "c", int(rng.integers(100, 3000)), int(rng.integers(10, 400)),
                    t, t + 10)
        reqs.append(r)

    def arrive(r):
        eng.submit(r, (r.id,))
        est.observe_engine(inst)

    sim.run(reqs, arrive)
    cal = est.engine_model(inst)
    assert cal.c_tok == pytest.approx(true_im.c_tok, rel=0.01)
    for b, kv in ((16, 20_000), (64, 80_000), (200, 250_000)):
        assert cal.iteration_s(b, kv, b) == pytest.approx(true_im.iteration_s(b, kv, b),
                                                          rel=0.05)
    # the same probe, predicted with the learned engine
    now = max(sim.now(), eng.clock_at) + 1.0
    after = _ttft_prediction(est, inst, now, 2000)
    p2 = Request(10_001, MODEL, "c", 2000, 1, now, now + 10)
    sim.call_at(now, eng.submit, p2, (0,))
    sim.run([], lambda r: None)
    assert after == pytest.approx(lis.first[p2.id] - now, rel=0.05)


def test_prior_equal_to_engine_stays_put():
    """With the engine's own model as the prior, calibration leaves it unchanged."""
    cat = Catalog.load()
    im = iteration_model(cat, MODEL, GPU, 1, PRIOR)
    sim = Simulator()
    eng = SimEngine(0, MODEL, im, 400_000, EngineConfig(), _Listener(), sim.now, 131072)
    eng.set_waker(sim.engine_waker)
    inst = types.SimpleNamespace(id=0, engine=eng, model=MODEL)
    est = RWTEstimator(150.0, 150.0 ** 2, 1000.0, iter_model_of=lambda i: im)
    reqs = [Request(i, MODEL, "c", 500, 50, 0.01 * i, 10) for i in range(100)]
    sim.run(reqs, lambda r: (eng.submit(r, (r.id,)), est.observe_engine(inst)))
    assert est.engine_model(inst) is im


def test_calibrator_recovers_known_bias_and_interval():
    """Model means off by a known factor 1.6 with lognormal noise (sigma 0.25): the
    calibrated mean recovers the factor and the 90% interval covers about 90%."""
    rng = np.random.default_rng(1)
    cal = WaitCalibrator()
    truth = 1.6
    for _ in range(2000):
        m = float(rng.uniform(0.5, 1.0))
        o = truth * m * float(rng.lognormal(0.0, 0.25))
        cal.observe("c", m, 0.1 * m, o)
    inside = 0
    n = 2000
    for _ in range(n):
        m = float(rng.uniform(0.5, 1.0))
        o = truth * m * float(rng.lognormal(0.0, 0.25))
        e = cal.adjust("c", WaitEstimate(m, 0.1 * m))
        inside += e.mean_s - Z90 * e.std_s <= o <= e.mean_s + Z90 * e.std_s
    c, _ = cal.factors("c", 0.75)
    assert c == pytest.approx(truth, rel=0.05)
    assert 0.85 <= inside / n <= 0.95


def test_learns_prefix_hit_fraction_and_shortens_prefill():
    sim, eng, inst, est, true_im, prior_im, lis = _setup()
    # every request: a shared 8-unit system prompt + 2 units of its own (80% reusable)
    reqs = []
    for i in range(200):
        hashes = tuple(range(8)) + (1000 + 2 * i, 1001 + 2 * i)
        reqs.append(Request(i, MODEL, "c", 10 * 512, 20, 0.2 * i, 0.2 * i + 10,
                            prefix_hashes=hashes, hash_block_tokens=512))
    sim.run(reqs, lambda r: (eng.submit(r, (r.id,)), est.observe_engine(inst)))
    st = eng.stats()
    assert st.prefix_hit_tokens / st.prefix_query_tokens > 0.75
    assert 1.0 - est.prefill_fraction(inst) == pytest.approx(0.8, abs=0.02)
    # the prefill term counts only the expected misses
    _, _, c_tok = est.basics(inst, eng.stats())
    assert c_tok == pytest.approx(est.engine_model(inst).c_tok * est.prefill_fraction(inst))


def test_fleet_option_makes_the_prior_explicit():
    from qlm_opt.config import Fleet
    from qlm_opt.core.runtime import Runtime
    from tests.conftest import small_fleet_dict

    d = small_fleet_dict()
    d["perf"] = {"mfu": 0.3, "mbu": 0.55, "overhead_ms": 9.0}
    sim = Simulator()
    rt = Runtime(Fleet.from_dict(d), sim)
    inst = rt.instances[0]
    # default: the scheduler gets the engines' own model
    assert rt.iteration_model(inst) == rt.iteration_model(inst, engine=True)
    d["estimator"] = {"prior": "datasheet"}
    rt = Runtime(Fleet.from_dict(d), sim)
    inst = rt.instances[0]
    prior, engine = rt.iteration_model(inst), rt.iteration_model(inst, engine=True)
    assert inst.engine.iter_model == engine
    assert prior.c_tok == pytest.approx(engine.c_tok * 0.3 / 0.5)
    assert prior.overhead_s == pytest.approx(0.004)
    d["estimator"] = {"prior": "datasheet", "mfu": 0.4}
    rt = Runtime(Fleet.from_dict(d), sim)
    assert rt.iteration_model(rt.instances[0]).c_tok == pytest.approx(engine.c_tok * 0.3 / 0.4)
