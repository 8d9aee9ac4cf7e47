"""The simulated engine against roofline numbers worked out by hand.

Llama-3.1-8B on one A100-80GB, mfu 0.5, mbu 0.8, overhead 4 ms:
  compute per token = 2 * 8,030,261,248 / (312e12 * 0.5)         = 1.029521e-4 s
  weight stream     = 16,060,522,496 B / (2039e9 B/s * 0.8)       = 9.845833e-3 s
  KV read per token = 131,072 B / (2039e9 * 0.8)                  = 8.035311e-8 s
"""

from __future__ import annotations

import pytest

from qlm_opt.catalog import Catalog
from qlm_opt.domain import Request, RequestState
from qlm_opt.engines.perf import PerfParams, iteration_model, swap_s
from qlm_opt.engines.simulated import EngineConfig, SimEngine
from qlm_opt.hosts.simulated import Simulator

C_TOK = 2 * 8_030_261_248 / (312e12 * 0.5)
M0 = 16_060_522_496 / (2039e9 * 0.8)
M_KV = 131_072 / (2039e9 * 0.8)
OVH = 0.004


@pytest.fixture(scope="module")
def im():
    return iteration_model(Catalog.load(), "llama-3.1-8b", "A100-80GB", 1, PerfParams())


def test_constants_match_hand_numbers(im):
    assert im.c_tok == pytest.approx(1.029521e-4, rel=1e-6)
    assert im.m0 == pytest.approx(9.845833e-3, rel=1e-6)
    assert im.m_kv == pytest.approx(8.035311e-8, rel=1e-6)
    assert C_TOK == pytest.approx(im.c_tok) and M0 == pytest.approx(im.m0)


def test_decode_iteration_is_memory_bound(im):
    # batch 32, 32,000 KV tokens: memory 9.8458 ms + 2.5713 ms > compute 3.2945 ms
    assert im.iteration_s(32, 32_000) == pytest.approx(0.004 + 0.0098458 + 0.0025713, rel=1e-4)


def test_prefill_iteration_is_compute_bound(im):
    # 2,048 prompt tokens: compute 210.85 ms dominates
    assert im.iteration_s(2048, 0) == pytest.approx(0.004 + 2048 * 1.029521e-4, rel=1e-6)


def test_closed_form_decode_run_equals_step_sum(im):
    for batch, kv0, n in [(1, 100, 50), (64, 50_000, 300), (200, 10, 7), (5000, 0, 40)]:
        steps = sum(im.iteration_s(batch, kv0 + k * batch) for k in range(n))
        assert im.decode_run_s(batch, kv0, n) == pytest.approx(steps, rel=1e-9)


def test_decode_iters_before(im):
    b, kv0 = 8, 1000
    for horizon in (0.0, 0.01, 0.1, 1.0):
        m = im.decode_iters_before(b, kv0, 1000, horizon)
        assert im.decode_run_s(b, kv0, m - 1) <= horizon if m else True
        assert im.decode_run_s(b, kv0, m) > horizon


class _Listener:
    def __init__(self):
        self.first, self.done, self.failed = [], [], []

    def on_first_token(self, req, at):
        self.first.append((req.id, at))

    def on_finished(self, req, at):
        self.done.append((req.id, at))

    def on_failed(self, req, at, reason):
        self.failed.append((req.id, reason))


def _engine(im, cap=459_099, **cfg):
    sim = Simulator()
    lis = _Listener()
    eng = SimEngine(0, "llama-3.1-8b", im, cap, EngineConfig(**cfg), lis, sim.now, 131072)
    eng.set_waker(sim.engine_waker)
    return sim, eng, lis


def _req(i, prompt, out, at=0.0, prio=0):
    return Request(i, "llama-3.1-8b", "c", prompt, out, at, at + 10, priority=prio)


def _drain(sim):
    sim.run([], lambda r: None)


def test_single_request_ttft_and_e2e_by_hand(im):
    sim, eng, lis = _engine(im)
    r = _req(1, 1000, 10)
    eng.submit(r, (0,))
    _drain(sim)
    ttft = OVH + 1000 * C_TOK  # prefill of 1,000 tokens is compute-bound
    assert r.first_token_at == pytest.approx(ttft, rel=1e-9)
    # nine decode iterations with 1,000..1,008 KV tokens, memory-bound
    decode = sum(OVH + M0 + M_KV * (1000 + k) for k in range(9))
    assert r.completed_at == pytest.approx(ttft + decode, rel=1e-9)
    assert r.num_generated == 10 and r.state == RequestState.FINISHED
    assert eng.busy_s == pytest.approx(r.completed_at, rel=1e-9)


def test_chunked_prefill_splits_long_prompt(im):
    sim, eng, _ = _engine(im, max_num_batched_tokens=4096)
    r = _req(1, 10_000, 1)
    eng.submit(r, (0,))
    _drain(sim)
    # 4096 + 4096 + 1808 tokens in three iterations
    expected = 3 * OVH + 10_000 * C_TOK
    assert r.completed_at == pytest.approx(expected, rel=1e-9)


def test_max_num_seqs_limits_batch(im):
    sim, eng, _ = _engine(im, max_num_seqs=2)
    reqs = [_req(i, 10, 100) for i in range(3)]
    for r in reqs:
        eng.submit(r, (r.id,))
    _drain(sim)
    # the third request starts only after one of the first two has finished
    assert reqs[2].first_token_at >= min(reqs[0].completed_at, reqs[1].completed_at) - 1e-12
    assert all(r.state == RequestState.FINISHED for r in reqs)


def test_priority_order_in_engine_queue(im):
    sim, eng, _ = _engine(im, max_num_seqs=1)
    a, b, c = _req(1, 10, 5), _req(2, 10, 5), _req(3, 10, 5)
    eng.submit(a, (5,))
    eng.submit(b, (9,))
    eng.submit(c, (1,))
    _drain(sim)
    # a started on the idle engine at once; c jumps ahead of b in the waiting queue
    assert a.first_token_at < c.first_token_at < b.first_token_at


def test_kv_exhaustion_preempts_and_all_finish(im):
    # 2,000 tokens of KV: four requests of 300 prompt + 400 output cannot all fit.
    sim, eng, lis = _engine(im, cap=2000)
    reqs = [_req(i, 300, 400, prio=i) for i in range(4)]
    for r in reqs:
        eng.submit(r, (r.id,))
    _drain(sim)
    assert eng.num_preemptions > 0
    assert all(r.state == RequestState.FINISHED and r.num_generated == 400 for r in reqs)
    assert sum(r.num_preemptions for r in reqs) == eng.num_preemptions
    assert eng.generated_tokens >= 4 * 400


def test_prompt_longer_than_kv_fails(im):
    sim, eng, lis = _engine(im, cap=1000)
    r = _req(1, 5000, 5)
    eng.submit(r, (0,))
    assert lis.failed == [(1, "prompt_too_long")]


def test_abort_keeps_generated_tokens_and_resume(im):
    sim, eng, lis = _engine(im)
    r = _req(1, 100, 1000)
    eng.submit(r, (0,))
    sim.call_at(0.5, lambda: None)
    sim.run([], lambda x: None, until_at=0.5)
    got = eng.abort(1)
    assert got is r and r.state == RequestState.SWAPPED_OUT
    assert 0 < r.num_generated < 1000
    g = r.num_generated
    eng.submit(r, (0,))
    _drain(sim)
    assert r.num_generated == 1000 and r.first_token_at < 0.5
    assert g < 1000


def test_held_due_after_follows_submits_preemptions_aborts_and_finishes(im):
    """The engine's sorted deadlines answer what a pass over its running and waiting
    requests counts, at every step: submits, preemptions (KV exhaustion), aborts of waiting
    and running requests, and finishes."""
    sim, eng, _ = _engine(im, cap=2000)  # seven requests of 300 + 400 tokens do not fit
    reqs = [Request(i, "llama-3.1-8b", "c", 300, 400 + 20 * i, 0.0, float(5 * (i % 4)),
                    priority=i) for i in range(7)]

    def check():
        held = eng.running_requests() + eng.waiting_requests()
        for at in (-1.0, 0.0, 2.5, 5.0, 7.0, 10.0, 15.0, 20.0):
            assert eng.held_due_after(at) == sum(r.deadline_at > at for r in held), at

    for r in reqs:
        eng.submit(r, (r.id,))
        check()
    t = 0.0
    aborted = set()
    while not eng.is_idle:
        t += 0.05
        sim.clock.t = t
        eng.advance_to(t)
        check()
        if len(aborted) < 2:
            waiting = eng.waiting_requests()
            victim = waiting[-1] if not aborted and waiting else eng.running_requests()[0]
            assert eng.abort(victim.id) is victim
            aborted.add(victim.id)
            check()
    assert eng.num_preemptions > 0 and len(aborted) == 2
    assert eng.held_due_after(float("-inf")) == 0


def test_swap_times():
    cat = Catalog.load()
    p = PerfParams()
    w = 8_030_261_248 * 2
    assert swap_s(cat, "llama-3.1-8b", "A100-80GB", 1, True, p) == pytest.approx(0.5 + w / 32e9)
    assert swap_s(cat, "llama-3.1-8b", "A100-80GB", 1, False, p) == pytest.approx(20 + w / 5e9)


def test_runtime_requeues_failed_requests_then_drops_after_retries():
    """An engine failure re-queues the request; one that fails every time is dropped, so a
    poisoned request cannot loop forever."""
    from qlm_opt.config import Fleet
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.core.runtime import Runtime
    from tests.conftest import small_fleet_dict

    sim = Simulator()
    rt = Runtime(Fleet.from_dict(small_fleet_dict()), sim)
    requeued = []

    class P(FCFSPolicy):
        def on_requeue(self, req):
            requeued.append(req.id)

    rt.bind(P())
    r = _req(7, 10, 5)
    rt.accept(r)
    for k in range(rt.max_failures + 1):
        rt.on_failed(r, sim.now(), "engine_down")
        sim.run([], lambda x: None)
    assert requeued == [7] * rt.max_failures
    assert r.state == RequestState.DROPPED and r.drop_reason.startswith("engine_failed")
    assert rt.num_outstanding == 0
