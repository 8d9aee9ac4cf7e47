"""RWT estimator: monotone in queue position, variance grows with requests ahead, and the
online calibration converges."""

import math
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from qlm_opt.domain import EngineStats, Request
from qlm_opt.engines.perf import IterationModel
from qlm_opt.core.output_lengths import LengthStats
from qlm_opt.whatif.accuracy import RWTAccuracy
from qlm_opt.core.estimator import RWTEstimator
from qlm_opt.core.wait_calibration import WaitEstimate


class _Eng:
    def __init__(self, running, seats):
        self._running = running
        self.seats = seats

    def stats(self):
        return EngineStats(num_running=len(self._running), max_num_seqs=self.seats,
                           kv_capacity_tokens=10**7, decode_tokens_per_s=1000.0,
                           prefill_tokens_per_s=1e4, model="m")

    def running_requests(self):
        return self._running

    def waiting_requests(self):
        return []

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


IM = IterationModel(c_tok=1e-4, m0=0.01, m_kv=1e-8, overhead_s=0.004)


def _inst(num_running, seats, seed=0):
    rng = np.random.default_rng(seed)
    running = []
    for i in range(num_running):
        r = Request(i, "m", "batch", 200, 10**6, 0.0, 600.0)
        r.num_generated = int(rng.integers(1, 300))
        r.first_token_at = 0.0
        running.append(r)
    return _Inst(_Eng(running, seats))


def _est():
    return RWTEstimator(150.0, 120.0**2, 500.0, iter_model_of=lambda i: IM)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 64), st.integers(1, 64), st.integers(0, 400), st.integers(1, 400))
def test_wait_grows_with_position_and_variance_with_ahead(nrun, seats, pos, step):
    """The mean wait never falls as the request moves back. Its spread need not grow one
    position at a time: waiting for the k-th of the running requests' completions is an order
    statistic, whose variance can shrink with k (nrun=1, seats=45, pos 45 -> 46 does). One
    whole round of seats further back, it must grow: that wait adds a full service time."""
    est = _est()
    inst = _inst(nrun, seats)
    bucket = lambda r: 0  # noqa: E731
    a = est.wait(inst, 0.0, pos, pos * 500, 500, bucket)
    b = est.wait(inst, 0.0, pos + step, (pos + step) * 500, 500, bucket)
    assert b.mean_s >= a.mean_s - 1e-9
    back = pos + step + seats
    c = est.wait(inst, 0.0, back, back * 500, 500, bucket)
    assert c.mean_s >= b.mean_s - 1e-9
    assert c.std_s >= a.std_s - 1e-9
    assert a.mean_s >= 0 and a.std_s > 0


def test_waiting_request_gets_seat_at_completions_not_after_all_tokens():
    est = _est()
    inst = _inst(32, 32)
    w = est.wait(inst, 0.0, 0, 0, 500, lambda r: 0)
    # the first of 32 completions comes well before the mean residual of one request
    assert w.mean_s < 150 * IM.iteration_s(32, 32 * 575)


@settings(max_examples=10, deadline=None)
@given(st.floats(3.0, 6.0), st.floats(0.3, 1.0), st.integers(0, 2**16))
def test_calibration_converges(log_mu, log_sigma, seed):
    rng = np.random.default_rng(seed)
    xs = rng.lognormal(log_mu, log_sigma, 50000)
    s = LengthStats.prior(150.0, 150.0**2, 10.0)  # the workload prior, 10 pseudo-obs
    for x in xs:
        s.update(float(x))
    true_mean = math.exp(log_mu + log_sigma**2 / 2)
    true_std = math.sqrt((math.exp(log_sigma**2) - 1)) * true_mean
    assert abs(s.mean - true_mean) / true_mean < 0.1
    assert abs(s.std - true_std) / true_std < 0.25


def test_accuracy_summary():
    acc = RWTAccuracy()
    for i in range(10):
        r = Request(i, "m", "interactive", 10, 10, 0.0, 2.0)
        acc.predict(r, 0.0, WaitEstimate(1.0, 0.1))
        r.first_token_at = 1.0 if i < 9 else 3.0
        acc.observe_first_token(r)
    out = acc.summary()
    assert out["median_abs_pct_error"] == 0.0 and out["coverage_90"] == 0.9
    assert out["per_class"]["interactive"]["num"] == 10


def test_wait_calibrator_learns_bias_and_interval():
    from qlm_opt.core.wait_calibration import Z90, WaitCalibrator

    rng = np.random.default_rng(0)
    cal = WaitCalibrator()
    # the model underestimates by 2x and its std is 5x too narrow
    for _ in range(2000):
        m = float(rng.uniform(1.0, 1.5))
        o = 2.0 * m * float(rng.lognormal(0.0, 0.2))
        cal.observe("c", m, 0.01 * m, o)
    hits = []
    for _ in range(2000):
        m = float(rng.uniform(1.0, 1.5))
        e = cal.adjust("c", WaitEstimate(m, 0.01 * m))
        o = 2.0 * m * float(rng.lognormal(0.0, 0.2))
        hits.append(e.mean_s - Z90 * e.std_s <= o <= e.mean_s + Z90 * e.std_s)
    assert abs(cal.adjust("c", WaitEstimate(1.2, 0.012)).mean_s / 2.4 - 1) < 0.05
    assert 0.85 <= np.mean(hits) <= 0.95
    # an unseen key is left as the model says
    e = cal.adjust("other", WaitEstimate(1.0, 0.1))
    assert (e.mean_s, e.std_s) == (1.0, 0.1)


def test_free_seat_wait_counts_prefill_ahead():
    est = _est()
    inst = _inst(4, 64)
    a = est.wait(inst, 0.0, 0, 0, 500, lambda r: 0)
    b = est.wait(inst, 0.0, 3, 30000, 500, lambda r: 0)
    # 30k prompt tokens ahead take about 30k * c_tok of compute, in 8k-token chunks
    assert b.mean_s - a.mean_s > 0.8 * 30000 * IM.c_tok


def test_free_prefill_tokens_fill_a_memory_bound_iteration_and_no_more():
    """The prompt tokens an engine's next iteration prefills for free: with the decoders,
    the iteration's compute reaches ``stretch`` times its memory time and stops there."""
    est = _est()
    for nrun in (0, 10, 60):
        inst = _inst(nrun, 256)
        st = inst.engine.stats()
        mem = IM.m0 + IM.m_kv * st.kv_used_tokens
        for stretch in (1.0, 2.0):
            free = est.free_prefill_tokens(inst, st, 0.0, stretch)
            assert free == max(0.0, stretch * mem / IM.c_tok - nrun)
            b = nrun + free
            assert IM.iteration_s(int(b), 0) <= IM.overhead_s + stretch * mem + 1e-12
            if free > 0:  # ten tokens more would lengthen the iteration past that
                assert IM.iteration_s(int(b) + 10, 0) > IM.overhead_s + stretch * mem
    # a 50-ms cap on the iteration lets short prompts (5 ms of prefill) ride up to it, but
    # not long ones (20 ms, past the 14-ms fixed time: one a iteration keeps it busy)
    idle = _inst(0, 256)
    st0 = idle.engine.stats()
    short = est.free_prefill_tokens(idle, st0, 0.0, iter_cap_s=0.05, prompt_mean=50.0)
    assert short == (0.05 - IM.overhead_s) / IM.c_tok
    assert est.free_prefill_tokens(idle, st0, 0.0, iter_cap_s=0.05, prompt_mean=200.0) == \
        est.free_prefill_tokens(idle, st0, 0.0) == IM.m0 / IM.c_tok
    # more decoders than the free tokens: nothing rides
    assert est.free_prefill_tokens(_inst(150, 256), _inst(150, 256).engine.stats(), 0.0) == 0.0


def test_free_prefill_tokens_keep_pace_with_arrivals_the_engine_can_serve():
    """With requests arriving faster than one per iteration, ``pace`` prompt tokens a
    second, the iteration may take ``T`` more where ``T`` = headroom x pace x (the
    iteration's time with ``T``): admission keeps pace. An engine that could not prefill
    what arrives even compute-bound gets nothing more, nor one that gets fewer requests."""
    est = _est()
    inst = _inst(10, 256)
    st = inst.engine.stats()
    base = est.free_prefill_tokens(inst, st, 0.0)
    for pace in (4000.0, 4500.0):  # tokens/s; c_tok = 1e-4: compute-bound with the ride
        t = est.free_prefill_tokens(inst, st, 0.0, pace_req_s=pace / 10.0, prompt_mean=10.0,
                                    headroom=2.0)
        it = IM.overhead_s + IM.c_tok * (10 + t)  # compute-bound with the ten decoders
        rho = pace * IM.c_tok
        h = min(2.0, 0.5 * (1.0 + 1.0 / rho))  # the headroom, at most halfway to saturation
        assert it > IM.overhead_s + IM.m0 and t > base
        assert abs(t - h * pace * it) < 1e-6
    # at 8,000 tokens/s (80% of the engine's compute) headroom 2 would be past it: the
    # headroom stops halfway to saturation (90%), and the iteration stays finite
    t = est.free_prefill_tokens(inst, st, 0.0, pace_req_s=800.0, prompt_mean=10.0,
                                headroom=2.0)
    assert abs(t - 9000.0 * (IM.overhead_s + IM.c_tok * (10 + t))) < 1e-6
    # 20,000 tokens/s is more than it can prefill at all: no more than without a pace
    assert est.free_prefill_tokens(inst, st, 0.0, pace_req_s=2000.0, prompt_mean=10.0,
                                    headroom=2.0) == base
    # 4,000 tokens/s in 4 requests of 1,000 a second: fewer than one per iteration, which
    # one request waiting per engine keeps up with: no pace
    assert est.free_prefill_tokens(inst, st, 0.0, pace_req_s=4.0, prompt_mean=1000.0,
                                    headroom=2.0) == base
    # just over one a iteration (75 a second, 14-ms iterations), 130-token prompts: 97.5%
    # of the compute, and the pace holds
    assert est.free_prefill_tokens(inst, st, 0.0, pace_req_s=75.0, prompt_mean=130.0,
                                    headroom=2.0) > base
