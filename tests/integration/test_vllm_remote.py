"""The Runtime driving vLLM OpenAI servers (``vllm_remote``, managed mode) on tiny models.

Two managed servers hold the same model. One is killed with SIGKILL mid-stream: its requests
come back through ``Runtime.on_failed`` -> ``policy.on_requeue`` and finish on the other
server, each stream continuing where it stopped.
"""

from __future__ import annotations

import pytest

from qlm_opt.profiling.devices import device_fleet
from qlm_opt.engines.vllm_local import VllmEngineConfig, payload
from qlm_opt.engines.vllm_remote import VllmRemoteEngine, parse_metrics
from qlm_opt.core.instance import InstanceState

from tests.engine_conformance import check_live_engine

from .conftest import run
from .helpers import make_request, make_runtime, prompt, settle, wait_until

M0 = "tiny-s0"


def test_parse_metrics():
    text = (
        "# HELP vllm:num_requests_running Number of requests.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
        'vllm:cache_config_info{block_size="128",num_gpu_blocks="256"} 1.0\n'
        'vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0\n'
    )
    m = parse_metrics(text)
    assert m["vllm:num_requests_running"] == 3.0
    assert m["vllm:num_requests_waiting"] == 2.0
    assert m["vllm:kv_cache_usage_perc"] == 0.25
    assert m["cache_config_info.num_gpu_blocks"] == 256.0
    assert m["cache_config_info.block_size"] == 128.0
    # only the named metrics: a longer name that starts with a wanted one stays out
    text += 'vllm:num_requests_running_max{engine="0"} 9.0\n'
    sub = parse_metrics(text, ("vllm:num_requests_running", "vllm:cache_config_info"))
    assert sub == {"vllm:num_requests_running": 3.0, "vllm:cache_config_info": 1.0,
                   "cache_config_info.block_size": 128.0,
                   "cache_config_info.num_gpu_blocks": 256.0}
    assert parse_metrics(text)["vllm:num_requests_running_max"] == 9.0


@pytest.fixture(scope="module")
def servers(loop, tiny_models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("vllm-logs")
    cfg = VllmEngineConfig(max_num_seqs=4, ignore_eos=True)
    engs = [VllmRemoteEngine.managed_server(i, M0, tiny_models, cfg, log_dir=logs)
            for i in range(2)]
    engs[0].restart_on_failure = False  # it is killed below; do not spend CPU restarting it

    async def start():
        for e in engs:  # staggered
            await e.start()

    try:
        run(loop, start(), timeout_s=300)
        yield engs
    finally:
        async def stop():
            for e in engs:
                await e.shutdown()
        run(loop, stop())


@pytest.mark.vllm
def test_engine_conforms_to_the_protocol(loop, servers):
    """``VllmRemoteEngine`` (a managed server) against ``engines.base.Engine``: surface,
    then one request submitted, read and aborted (``tests/engine_conformance.py``). Runs
    before the test that kills a server."""
    run(loop, check_live_engine(servers[1], M0, prompt(7)))
    assert servers[1].process_alive() is True


@pytest.mark.vllm
def test_requests_go_out_in_submit_on_kept_alive_connections(loop, servers):
    """The data path (``engines.http1``): with an idle keep-alive connection at hand, a
    request is written in ``submit`` itself, before its task runs; sequential requests share
    one connection; one aborted before its task ran closes its connection (so the server
    aborts it), and the next request opens a new one and completes."""
    import time

    from qlm_opt.domain import Request
    from qlm_opt.engines.vllm_local import attach_payload
    from tests.engine_conformance import RecordingListener

    eng = servers[1]
    lis = RecordingListener(time.monotonic)

    def new(k: int) -> Request:
        now = lis.now()
        r = Request(2 * 10**8 + k, M0, "interactive", 7, 3, now, now + 1000.0)
        attach_payload(r, prompt_token_ids=prompt(60 + k, 7), sampling={"ignore_eos": True})
        return r

    async def body():
        eng.bind(lis)
        opened = []
        for k in range(3):
            r = new(k)
            eng.submit(r, (0, r.id))
            conn = payload(r).run.state[0]
            if k:
                assert conn is not None and conn.reused  # written in submit
            await wait_until(lambda: r.is_done)
            assert r.num_generated == 3
            await wait_until(lambda: eng._pool._idle)  # read to its end, back in the pool
            opened.append(eng._pool.num_opened)
        r = new(3)
        eng.submit(r, (0, r.id))
        conn = payload(r).run.state[0]
        assert conn is not None
        eng.abort(r.id)
        assert conn.writer.is_closing()
        r2 = new(4)
        eng.submit(r2, (0, r2.id))
        assert payload(r2).run.state[0] is None  # nothing idle: the task connects
        await wait_until(lambda: r2.is_done)
        return opened, r, r2

    opened, aborted, r2 = run(loop, body())
    assert opened[1] == opened[2] == opened[0]
    assert eng._pool.num_opened == opened[0] + 1
    assert not aborted.is_done and r2.num_generated == 3
    assert ("failed", aborted.id) not in lis.events


@pytest.mark.vllm
def test_server_killed_mid_stream_requeues_and_completes(loop, servers, tiny_catalog):
    fleet = device_fleet(tiny_catalog, [M0, M0], models=[M0], max_num_seqs=4)
    rt, rec, pol = make_runtime(fleet, servers)
    i0, i1 = rt.instances
    n = 150

    async def body():
        # references: the same prompts served uninterrupted on the surviving server
        refs = []
        for k in range(3):
            r = make_request(rt, 40 + k, M0, prompt(40 + k), n, priority=1)
            rt.accept(r)
            rt.dispatch(r, i1, (1, r.id))
            refs.append(r)
        await settle(rt)
        assert servers[1].stats().kv_capacity_tokens > 0
        streams: dict[int, list[int]] = {}
        victims = []
        for k in range(3):
            streams[50 + k] = []
            r = make_request(rt, 50 + k, M0, prompt(40 + k), n, priority=1,
                             streamed=streams[50 + k])
            rt.accept(r)
            rt.dispatch(r, i0, (1, r.id))
            victims.append(r)
        await wait_until(lambda: all(v.num_generated >= 10 for v in victims))
        cut = [v.num_generated for v in victims]
        servers[0].kill()
        await settle(rt, timeout_s=120)
        return refs, victims, streams, cut

    refs, victims, streams, cut = run(loop, body())
    assert i0.state == InstanceState.DOWN  # down, not restarted: takes no work
    assert sorted(rec.requeued) == [50, 51, 52]
    for ref, v, c in zip(refs, victims, cut):
        assert 0 < c < n
        assert v.is_done and v.instance_id == 1 and v.num_generated == n
        assert payload(v).output_token_ids == payload(ref).output_token_ids
        assert streams[v.id] == payload(ref).output_token_ids  # nothing lost or repeated
    assert not rt.dropped
