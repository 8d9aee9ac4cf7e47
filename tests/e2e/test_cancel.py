"""Cancellation through ``Runtime.cancel``: a request the policy still holds is taken out with
``policy.remove`` (never dispatched), and the policy is not told it finished."""

from __future__ import annotations

import httpx

from tests.e2e.conftest import MODEL, LiveServer, auth, settings_for


def test_disconnect_removes_request_from_policy_queue():
    # engine_slack = 0 and no free ride: qlm-rwt never gives an engine work, so requests stay
    # in its queue
    srv = LiveServer(settings_for(0.001, backend={
        "policy": "qlm-rwt",
        "policy_options": {"engine_slack": 0, "executor": {"free_ride": 0}}}))
    try:
        gw = srv.gateway
        rt = gw.backend.runtime
        policy = gw.backend.policy
        finished: list[int] = []
        srv.on_loop(rt.finish_hooks.append, lambda r: finished.append(r.id))
        body = {"model": MODEL, "prompt": "queued", "max_tokens": 5, "stream": True}
        with httpx.Client(base_url=srv.url, headers=auth(), timeout=30) as c:
            with c.stream("POST", "/v1/completions", json=body) as s:
                assert s.status_code == 200
                srv.wait_until(lambda: policy.num_queued() == 1)
                req = srv.on_loop(lambda: next(iter(gw.jobs.values())).req)
        srv.wait_until(lambda: not gw.jobs and rt.num_outstanding == 0)
        assert srv.on_loop(policy.num_queued) == 0
        assert req.drop_reason == "cancelled" and req.instance_id is None
        counts = srv.on_loop(lambda: dict(rt.lso_counts))
        assert counts.get("cancel") == 1 and counts.get("pull", 0) == 0
        assert finished == []
        assert srv.on_loop(lambda: rt.cancel(req)) is False  # already ended
        metrics = httpx.get(srv.url + "/metrics").text
        assert 'qlm_requests_total{outcome="cancelled",slo_class="interactive"} 1.0' in metrics
    finally:
        srv.stop()
