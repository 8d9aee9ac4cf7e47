"""Bounded class queues (429 + Retry-After), client disconnects freeing capacity, and engine
failures losing no accepted request."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from tests.e2e.conftest import MODEL, LiveServer, assert_error, auth, settings_for

TINY = {"model": MODEL, "prompt": "wait", "max_tokens": 50, "stream": True}
UNHELD = "qwen3-8b"  # servable by the example fleet, held by no instance at start
SLOW_SPEEDUP = 0.001  # the ``slow`` server's clock speed (tests/e2e/conftest.py)


def _documented_retry_after(gw, model: str) -> int:
    """Retry-After as the docs define it (qlm_opt/server/admission.py), computed here from
    the estimator's own ``wait``: the 'tiny' class is the least urgent, so every queued request
    for the model is ahead, spread over the instances holding it."""
    from qlm_opt.core.queue import length_bucket
    from qlm_opt.server.openai_protocol import completion_prompt_tokens
    from qlm_opt.server.admission import estimator_of

    rt = gw.backend.runtime
    est = estimator_of(gw)
    ahead = sum(1 for j in gw.jobs.values() if j.req.model == model and j.queued)
    held = rt.ready_instances(model)
    p = ahead / len(held)
    prompt = completion_prompt_tokens(TINY["prompt"])
    wait = min(est.wait(i, rt.now(), p, p * est.prompt_mean, prompt,
                        lambda r: length_bucket(r.prompt_tokens)).mean_s for i in held)
    return max(1, min(3600, math.ceil(wait / SLOW_SPEEDUP)))


def _idle(srv: LiveServer):
    gw = srv.gateway
    rt = gw.backend.runtime
    return lambda: (not gw.jobs and rt.num_outstanding == 0
                    and all(i.engine.load() == 0 for i in rt.instances))


def test_queue_full_then_disconnect_frees_capacity(slow):
    gw = slow.gateway
    with httpx.Client(base_url=slow.url, headers={**auth(), "x-slo-class": "tiny"},
                      timeout=30) as c:
        with c.stream("POST", "/v1/completions", json=TINY) as s1, \
                c.stream("POST", "/v1/completions", json=TINY) as s2:
            assert s1.status_code == s2.status_code == 200
            assert slow.on_loop(lambda: gw.queued_by_class["tiny"]) == 2
            r = c.post("/v1/completions", json=TINY)
            assert_error(r, 429, "queue_full")
            after_held = int(r.headers["retry-after"])
            assert after_held == pytest.approx(slow.on_loop(_documented_retry_after, gw,
                                                            MODEL), abs=2)
            # a model no instance holds: the swap comes first
            r = c.post("/v1/completions", json={**TINY, "model": UNHELD})
            assert_error(r, 429, "queue_full")
            after_unheld = int(r.headers["retry-after"])
            swap_wall_s = slow.on_loop(lambda: min(
                gw.backend.runtime.swap_time_s(i, UNHELD) for i in gw.backend.runtime.instances
                if gw.backend.runtime.fleet.can_serve(i.spec, UNHELD))) / SLOW_SPEEDUP
            assert after_unheld >= min(3600, int(swap_wall_s)) and after_unheld > after_held
            # the requests sit in an engine (prefill takes minutes of wall time here)
            assert slow.on_loop(lambda: sum(i.engine.load() for i in
                                            gw.backend.runtime.instances)) == 2
        # both clients went away: their requests are aborted and the class queue is free
        slow.wait_until(_idle(slow))
        assert slow.on_loop(lambda: gw.queued_by_class["tiny"]) == 0
        with c.stream("POST", "/v1/completions", json=TINY) as s3:
            assert s3.status_code == 200
    slow.wait_until(_idle(slow))
    metrics = httpx.get(slow.url + "/metrics").text
    assert 'qlm_requests_total{outcome="cancelled",slo_class="tiny"} 3.0' in metrics
    assert 'qlm_requests_total{outcome="rejected",slo_class="tiny"} 2.0' in metrics


def test_non_streamed_disconnect_aborts(slow):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow.url + "/v1/completions", headers=auth(),
                   json={"model": MODEL, "prompt": "x", "max_tokens": 5}, timeout=0.5)
    slow.wait_until(_idle(slow))


def test_engine_failure_requeues_and_completes():
    srv = LiveServer(settings_for(5.0))
    try:
        gw = srv.gateway
        rt = gw.backend.runtime

        def fail_running() -> bool:
            for job in gw.jobs.values():
                req = job.req
                eng = rt.instances[req.instance_id].engine if req.instance_id is not None else None
                if eng is not None and eng.num_generated(req) >= 5:
                    eng.abort(req.id)
                    rt.on_failed(req, rt.now(), "engine_crash")
                    return True
            return False

        text, usage, failed = "", None, False
        with httpx.Client(base_url=srv.url, headers=auth(), timeout=60) as c:
            body = {"model": MODEL, "prompt": "long", "max_tokens": 400, "stream": True,
                    "stream_options": {"include_usage": True}}
            with c.stream("POST", "/v1/completions", json=body) as s:
                for line in s.iter_lines():
                    if not failed:
                        failed = srv.on_loop(fail_running)
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["text"]
                    if chunk.get("usage"):
                        usage = chunk["usage"]
        assert failed, "the request finished before the failure was injected"
        assert usage["completion_tokens"] == 400
        assert len(text.split()) == 400
        assert srv.on_loop(lambda: rt.lso_counts["pull"]) == 2  # dispatched again
    finally:
        srv.stop()
