"""The simulated engine's prefix cache on hand-made block sequences: hits skip prefill, units
are chained (a unit matches only behind its whole prefix), free units are evicted least
recently freed first (a prompt's tail before its head), KV accounting counts shared units
once and reports cached ones, and requests without hashes are served exactly as before."""

from __future__ import annotations

import numpy as np
import pytest

from qlm_opt.catalog import Catalog
from qlm_opt.domain import Request, RequestState
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.engines.simulated import EngineConfig, SimEngine
from qlm_opt.hosts.simulated import Simulator

UNIT = 64  # tokens per hash unit (4 engine blocks of 16)


class _Listener:
    def on_first_token(self, req, at):
        pass

    def on_finished(self, req, at):
        pass

    def on_failed(self, req, at, reason):
        raise AssertionError(reason)


@pytest.fixture(scope="module")
def im():
    return iteration_model(Catalog.load(), "llama-3.1-8b", "A100-80GB", 1, PerfParams())


def _engine(im, cap=459_099, **cfg):
    sim = Simulator()
    eng = SimEngine(0, "llama-3.1-8b", im, cap, EngineConfig(**cfg), _Listener(), sim.now,
                    131072)
    eng.set_waker(sim.engine_waker)
    return sim, eng


def _req(i, prompt, out, hashes=None, at=0.0):
    return Request(i, "llama-3.1-8b", "c", prompt, out, at, at + 10,
                   prefix_hashes=tuple(hashes) if hashes is not None else None,
                   hash_block_tokens=UNIT if hashes is not None else 0)


def _serve(sim, eng, r):
    """Submit ``r`` once the engine is idle and run until it is idle again; returns TTFT."""
    t0 = max(sim.now(), eng.clock_at) + 1.0
    sim.call_at(t0, eng.submit, r, (r.id,))
    sim.run([], lambda x: None)
    assert r.state == RequestState.FINISHED
    return r.first_token_at - t0


def test_hit_skips_prefill_of_cached_units(im):
    sim, eng = _engine(im)
    a = _req(1, 640, 1, range(1, 11))  # 10 full units
    _serve(sim, eng, a)
    assert eng.stats().kv_cached_tokens == 640 and eng.stats().kv_used_tokens == 0
    # 10 units hit, 60 tokens (the partial 11th unit) prefilled
    b = _req(2, 700, 1, range(1, 12))
    ttft = _serve(sim, eng, b)
    assert ttft == pytest.approx(im.iteration_s(60, 640, 1), rel=1e-12)
    st = eng.stats()
    assert (st.prefix_query_tokens, st.prefix_hit_tokens) == (640 + 700, 640)
    # the same prompt without hashes prefills every token
    c = _req(3, 700, 1)
    assert _serve(sim, eng, c) == pytest.approx(im.iteration_s(700, 0, 1), rel=1e-12)
    assert eng.stats().prefix_hit_tokens == 640


def test_full_hit_still_computes_the_last_unit(im):
    sim, eng = _engine(im)
    _serve(sim, eng, _req(1, 640, 1, range(1, 11)))
    ttft = _serve(sim, eng, _req(2, 640, 1, range(1, 11)))
    # vLLM recomputes at least one token; here the last whole unit (64 tokens)
    assert ttft == pytest.approx(im.iteration_s(64, 576, 1), rel=1e-12)
    assert eng.stats().prefix_hit_tokens == 576


def test_units_are_chained_on_their_prefix(im):
    sim, eng = _engine(im)
    _serve(sim, eng, _req(1, 320, 1, [1, 2, 3, 4, 5]))
    # same later hashes behind a different first one: no hit
    _serve(sim, eng, _req(2, 320, 1, [9, 2, 3, 4, 5]))
    assert eng.stats().prefix_hit_tokens == 0
    # a shared head and a different tail: the head hits
    _serve(sim, eng, _req(3, 320, 1, [1, 2, 7, 8, 9]))
    assert eng.stats().prefix_hit_tokens == 2 * UNIT


def test_lru_eviction_tail_first(im):
    # 40 blocks of 16 tokens; a unit is 4 blocks
    sim, eng = _engine(im, cap=640)
    _serve(sim, eng, _req(1, 192, 1, [1, 2, 3]))  # A
    _serve(sim, eng, _req(2, 192, 1, [4, 5, 6]))  # B
    assert eng.stats().kv_cached_tokens == 6 * UNIT  # 24 blocks cached, none in use
    # D (no hashes) holds 370 prompt tokens + its decodes: 24 blocks of 40 with the
    # one-block-per-request bound, so 16 blocks remain for the cache: two units go, the
    # least recently freed first: A's tail (3), then A's middle (2)
    _serve(sim, eng, _req(3, 370, 5))
    assert eng.num_prefix_evictions == 2
    assert eng.stats().kv_cached_tokens == 4 * UNIT
    # A's head survives, B is whole
    _serve(sim, eng, _req(4, 200, 1, [1, 2, 3]))
    assert eng.stats().prefix_hit_tokens == UNIT
    _serve(sim, eng, _req(5, 260, 1, [4, 5, 6, 7]))
    assert eng.stats().prefix_hit_tokens == UNIT + 3 * UNIT


def test_shared_units_count_once_in_kv(im):
    sim, eng = _engine(im)
    g = _req(1, 192, 50, [10, 11, 12])
    eng.submit(g, (1,))
    sim.run([], lambda x: None, until_at=0.05)  # g prefilled and decoding
    assert g.first_token_at is not None and g.state == RequestState.RUNNING
    h = _req(2, 200, 50, [10, 11, 12])
    eng.submit(h, (2,))
    sim.run([], lambda x: None, until_at=0.1)
    assert h.first_token_at is not None and h.state == RequestState.RUNNING
    ng, nh = eng.num_generated(g), eng.num_generated(h)
    # the 192 shared tokens once, h's own 8 prompt tokens, and each one's decoded KV
    assert eng.stats().kv_used_tokens == 192 + 8 + (ng - 1) + (nh - 1)
    eng.advance_to(1e9)  # (a run that stopped at ``until_at`` dropped the next wake)
    st = eng.stats()
    assert st.kv_used_tokens == 0 and st.kv_cached_tokens == 192


def test_requests_without_hashes_unchanged_by_the_cache(im):
    rng = np.random.default_rng(3)
    runs = []
    for on in (True, False):
        sim, eng = _engine(im, cap=30_000, enable_prefix_caching=on)
        reqs = [_req(i, int(rng.integers(50, 3000)), int(rng.integers(1, 400)),
                     at=float(i) * 0.05) for i in range(200)]
        rng = np.random.default_rng(3)  # same stream for the second run
        for r in reqs:
            sim.call_at(r.arrived_at, lambda r=r: eng.submit(r, (r.id,)))
        sim.run([], lambda x: None)
        runs.append([(r.first_token_at, r.completed_at) for r in reqs])
    assert runs[0] == runs[1]


def test_cache_off_ignores_hashes(im):
    sim, eng = _engine(im, enable_prefix_caching=False)
    _serve(sim, eng, _req(1, 640, 1, range(1, 11)))
    ttft = _serve(sim, eng, _req(2, 640, 1, range(1, 11)))
    assert ttft == pytest.approx(im.iteration_s(640, 0, 1), rel=1e-12)
    assert eng.stats().kv_cached_tokens == 0 and eng.stats().prefix_query_tokens == 0


def test_preemption_under_sharing_releases_every_reference(im):
    """A small cache, many requests on few shared prefixes, preemptions: everything
    finishes with its full output, and afterwards nothing is in use."""
    rng = np.random.default_rng(7)
    sim, eng = _engine(im, cap=6000)
    reqs = []
    for i in range(120):
        sysp = int(rng.integers(0, 4))
        n_units = int(rng.integers(1, 20))
        hashes = [1000 * sysp + k for k in range(3)] + [10_000 + 100 * i + k
                                                       for k in range(n_units)]
        prompt = UNIT * len(hashes) - int(rng.integers(0, UNIT))
        reqs.append(_req(i, prompt, int(rng.integers(1, 300)), hashes, at=i * 0.02))
    for r in reqs:
        sim.call_at(r.arrived_at, lambda r=r: eng.submit(r, (r.id,)))
    sim.run([], lambda x: None)
    assert eng.num_preemptions > 0 and eng.num_prefix_evictions > 0
    assert eng.stats().prefix_hit_tokens > 0
    assert all(r.state == RequestState.FINISHED and r.num_generated == r.output_tokens
               for r in reqs)
    assert eng.stats().kv_used_tokens == 0 and eng._kv_shared == 0
    assert all(e[0] == 0 for e in eng._pc.values())
    assert eng._pc_free_blocks * 16 <= 6000
