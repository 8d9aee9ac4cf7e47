"""The Runtime driving in-process vLLM engines (``vllm_local``) on tiny CPU models.

Two engines for the module (both start with ``tiny-s0``; one slot each, so that waiting
queues form and orders are observable); the model-swap test runs last and swaps one of them.
Sampling is greedy, so every run of a prompt gives the same tokens and continuity after an
eviction is checked against an uninterrupted run.
"""

from __future__ import annotations

import pytest

from qlm_opt.profiling.devices import device_fleet
from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine, payload

from tests.engine_conformance import check_live_engine

from .conftest import run
from .helpers import arrive, make_request, make_runtime, prompt, settle, wait_until

pytestmark = pytest.mark.vllm

M0, M1 = "tiny-s0", "tiny-s1"


@pytest.fixture(scope="module")
def engines(loop, tiny_models):
    cfg = VllmEngineConfig(max_num_seqs=1, ignore_eos=True)
    engs = [VllmLocalEngine(i, M0, tiny_models, cfg) for i in range(2)]

    async def start():
        for e in engs:  # staggered: one start-up at a time
            await e.start()

    run(loop, start())
    yield engs
    run(loop, asyncio_gather_shutdown(engs))


async def asyncio_gather_shutdown(engs):
    for e in engs:
        await e.shutdown()


def fleet_for(tiny_catalog, n: int):
    return device_fleet(tiny_catalog, [M0] * n, models=[M0, M1], max_num_seqs=1)


def test_engine_conforms_to_the_protocol(loop, engines):
    """``VllmLocalEngine`` against ``engines.base.Engine``: surface, then one request
    submitted, read and aborted (``tests/engine_conformance.py``)."""
    run(loop, check_live_engine(engines[0], M0, prompt(7)))


def test_priority_pull_ordering(loop, engines, tiny_catalog):
    """Requests queued in one engine are served in priority order, not arrival order."""
    rt, rec, _ = make_runtime(fleet_for(tiny_catalog, 1), engines[:1])

    async def body():
        blocker = make_request(rt, 100, M0, prompt(100), 60, priority=9)
        arrive(rt, blocker)
        await wait_until(lambda: blocker.num_generated > 0)
        reqs = []
        for rid, prio in [(1, 3), (2, 1), (3, 2), (4, 0)]:
            r = make_request(rt, rid, M0, prompt(rid), 4, priority=prio)
            reqs.append(r)
            arrive(rt, r)
        assert [r.id for r in engines[0].waiting_requests()] == [4, 2, 3, 1]
        await settle(rt)
        return reqs

    reqs = run(loop, body())
    assert rec.finished == [100, 4, 2, 3, 1]
    assert [i for i in rec.first_tokens if i != 100] == [4, 2, 3, 1]
    assert all(r.num_generated == 4 for r in reqs)
    assert rt.num_outstanding == 0


def test_evict_resume_continues_stream(loop, engines, tiny_catalog):
    """An evicted request resumes by recompute; the client's stream has no gap or repeat."""
    rt, rec, pol = make_runtime(fleet_for(tiny_catalog, 1), engines[:1])
    n = 120

    async def body():
        ref = make_request(rt, 10, M0, prompt(7), n, priority=5)
        arrive(rt, ref)
        await wait_until(lambda: ref.is_done)
        streamed: list[int] = []
        victim = make_request(rt, 11, M0, prompt(7), n, priority=5, streamed=streamed)
        arrive(rt, victim)
        await wait_until(lambda: victim.num_generated >= 30)
        inst = rt.instances[0]
        got = rt.evict(inst, victim.id)
        assert got is victim and victim.num_evictions == 1
        cut = victim.num_generated
        urgent = make_request(rt, 12, M0, prompt(8), 8, priority=0)
        arrive(rt, urgent)
        pol.on_requeue(victim)  # the executor re-queues the evicted request
        await settle(rt)
        return ref, victim, urgent, streamed, cut

    ref, victim, urgent, streamed, cut = run(loop, body())
    ref_ids = payload(ref).output_token_ids
    assert 0 < cut < n
    assert len(ref_ids) == n
    assert payload(victim).output_token_ids == ref_ids
    assert streamed == ref_ids  # what the client saw: no lost or duplicated token
    assert victim.num_generated == n
    assert rec.finished.index(urgent.id) < rec.finished.index(victim.id)
    assert rec.first_tokens.count(victim.id) == 1


def test_rebalance_queued_work(loop, engines, tiny_catalog):
    """Queued requests are taken back from one instance and served by another."""
    rt, rec, _ = make_runtime(fleet_for(tiny_catalog, 2), engines)
    i0, i1 = rt.instances

    async def body():
        blocker = make_request(rt, 20, M0, prompt(20), 80, priority=1)
        rt.accept(blocker)
        rt.dispatch(blocker, i0, (1, 0))
        queued = []
        for rid in (21, 22, 23):
            r = make_request(rt, rid, M0, prompt(rid), 6, priority=1)
            rt.accept(r)
            rt.dispatch(r, i0, (1, rid))
            queued.append(r)
        await wait_until(lambda: blocker.num_generated > 0)
        waiting = i0.engine.waiting_requests()
        assert [r.id for r in waiting] == [21, 22, 23]
        for r in waiting:  # Rebalance LSO: abort queued work here, dispatch it there
            got = i0.engine.abort(r.id)
            assert got is r and got.num_generated == 0
            rt.dispatch(got, i1, (1, got.id))
        assert i0.engine.load() == 1
        await settle(rt)
        return blocker, queued

    blocker, queued = run(loop, body())
    assert all(r.instance_id == 1 and r.num_generated == 6 for r in queued)
    assert blocker.instance_id == 0 and blocker.num_generated == 80
    assert sorted(rec.finished) == [20, 21, 22, 23]
    assert rt.lso_counts["pull"] == 7  # 4 dispatches to i0, 3 to i1
    assert rt.num_outstanding == 0


def test_model_swap_between_tiny_models(loop, engines, tiny_catalog):
    """A request for a model no instance holds makes one instance swap (engine restart on
    CPU); the swap completes asynchronously and the request is served by the new model."""
    rt, rec, _ = make_runtime(fleet_for(tiny_catalog, 1), engines[1:2])
    engines[1].instance_id = 0  # alone in this fleet

    async def body():
        ids = prompt(30)
        r0 = make_request(rt, 30, M0, ids, 12)
        arrive(rt, r0)
        await wait_until(lambda: r0.is_done)
        r1 = make_request(rt, 31, M1, ids, 12)
        arrive(rt, r1)
        assert rt.instances[0].swap_to == M1 or rt.instances[0].model == M1
        await settle(rt, timeout_s=180)
        return r0, r1

    try:
        r0, r1 = run(loop, body())
    finally:
        engines[1].instance_id = 1
    inst = rt.instances[0]
    assert inst.model == M1 and inst.num_swaps == 1 and rt.lso_counts["swap"] == 1
    assert engines[1].last_swap_s is not None and engines[1].last_swap_s > 0
    assert r1.num_generated == 12 and r1.finish_reason == "length"
    # different weights (and vocabularies): the same prompt ids give other tokens
    assert payload(r0).output_token_ids != payload(r1).output_token_ids
