"""httpx against a live server: errors with OpenAI bodies, SLO classes, metrics, admin."""

from __future__ import annotations

import httpx
from fastapi.testclient import TestClient

from qlm_opt.server.app import create_app
from tests.e2e.conftest import ADMIN_KEY, LIMITED_KEY, MODEL, assert_error, auth, settings_for

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


def test_401_missing_and_wrong_key(fast):
    r = httpx.post(fast.url + "/v1/chat/completions", json=CHAT)
    assert_error(r, 401, "missing_api_key")
    r = httpx.post(fast.url + "/v1/chat/completions", json=CHAT, headers=auth("sk-nope-nope-nope"))
    assert_error(r, 401, "invalid_api_key")
    assert r.json()["error"]["type"] == "authentication_error"


def test_400s(client):
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-slo-class": "gold"})
    assert assert_error(r, 400, "invalid_slo_class")["param"] == "x-slo-class"
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 5000})
    assert assert_error(r, 400, "invalid_value")["param"] == "max_tokens"  # limits.max_tokens
    r = client.post("/v1/completions", json={"model": "vicuna-13b", "prompt": "x" * 4000,
                                             "max_tokens": 4000})
    assert_error(r, 400, "context_length_exceeded")  # vicuna-13b: 4,096 tokens
    r = client.post("/v1/chat/completions", content=b"{not json",
                    headers={"content-type": "application/json"})
    err = assert_error(r, 400, "invalid_json")
    assert err["param"] is None and "not valid JSON at character 1" in err["message"]
    r = client.post("/v1/batches", content=b"[1", headers={"content-type": "application/json"})
    assert assert_error(r, 400, "invalid_json")["param"] is None


def test_404s(client):
    assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404,
                 "model_not_found")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_413_body_and_prompt(client):
    big = "x" * (1 << 20)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": big})
    assert_error(r, 413, "body_too_large")
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "word " * 5000})
    assert_error(r, 413, "prompt_too_long")


def test_413_chunked_body(client):
    def gen():
        for _ in range(20):
            yield b"x" * 65536

    r = client.post("/v1/completions", content=gen(), headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")


def test_422_validation(client):
    err = assert_error(client.post("/v1/chat/completions", json={"model": MODEL}), 422)
    assert err["param"] == "messages"
    err = assert_error(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 0}), 422)
    assert err["param"] == "max_tokens"
    assert_error(client.post("/v1/chat/completions",
                             json={**CHAT, "messages": [{"role": "robot", "content": "x"}]}), 422)
    assert_error(client.post("/v1/chat/completions", json={**CHAT, "n": 2}), 422)
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"]})
    assert assert_error(r, 422)["param"] == "prompt"  # one prompt per request
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-slo-ttft-ms": "-5"})
    assert assert_error(r, 422)["param"] == "header.x-slo-ttft-ms"


def test_429_rate_limit(fast):
    with httpx.Client(base_url=fast.url, headers=auth(LIMITED_KEY), timeout=30) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
        r = c.post("/v1/chat/completions", json=CHAT)
    assert_error(r, 429, "rate_limit_exceeded")
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert int(r.headers["retry-after"]) >= 1


def test_slo_class_sources(client):
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-slo-class": "batch"})
    assert r.headers["x-qlm-slo-class"] == "batch"
    r = client.post("/v1/chat/completions", json={**CHAT, "priority": 1})
    assert r.headers["x-qlm-slo-class"] == "batch"
    r = client.post("/v1/chat/completions", json={**CHAT, "priority": 7})
    assert r.headers["x-qlm-slo-class"] == "tiny"  # the least urgent class
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-slo-ttft-ms": "20000"})
    assert r.headers["x-qlm-slo-class"] == "tiny"  # tightest class with ttft >= 20 s
    r = client.post("/v1/chat/completions", json=CHAT, headers={"x-slo-ttft-ms": "500"})
    assert r.headers["x-qlm-slo-class"] == "interactive"


def test_health_and_metrics(client, fast):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/chat/completions", json=CHAT)
    text = httpx.get(fast.url + "/metrics").text
    for needle in (
        'qlm_queue_length{slo_class="interactive"}',
        'qlm_ttft_seconds_bucket{le="0.01",model="llama-3.1-8b",slo_class="interactive"}',
        "qlm_e2e_seconds_count",
        'qlm_slo_attainment{slo_class="interactive"}',
        'qlm_requests_total{outcome="finished",slo_class="interactive"}',
        'qlm_lso_total{lso="pull"}',
        "qlm_solver_ms",
        'qlm_solver_status{status="none"} 1.0',
        "qlm_instance_running",
        'qlm_http_errors_total{status="401"}',
    ):
        assert needle in text, needle


def test_admin_routes(fast):
    assert_error(httpx.get(fast.url + "/admin/fleet"), 401)
    assert_error(httpx.get(fast.url + "/admin/fleet", headers=auth()), 401)
    fleet = httpx.get(fast.url + "/admin/fleet", headers=auth(ADMIN_KEY)).json()
    assert fleet["backend"] == "simulated" and fleet["policy"] == "priority"
    assert len(fleet["instances"]) == 6
    inst = fleet["instances"][0]
    assert inst["state"] == "READY" and "kv_capacity_tokens" in inst["stats"]
    assert MODEL in fleet["models"]
    plan = httpx.get(fast.url + "/admin/plan", headers=auth(ADMIN_KEY)).json()
    assert plan["plan"] is None  # the priority policy has no plan
    assert set(plan["queues"]["queued_by_class"]) == {"interactive", "batch", "tiny"}


def test_unauthenticated_mode_is_explicit():
    s = settings_for(50.0, auth={"allow_unauthenticated": True, "keys": []})
    with TestClient(create_app(s, env={})) as c:
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 200, r.text


def test_keys_from_environment():
    s = settings_for(50.0, auth={"keys": [], "admin_key": None})
    env = {"QLM_API_KEYS": "sk-env-key-00001:eve:batch", "QLM_ADMIN_KEY": "sk-env-admin-01"}
    with TestClient(create_app(s, env=env)) as c:
        r = c.post("/v1/chat/completions", json=CHAT, headers=auth("sk-env-key-00001"))
        assert r.status_code == 200 and r.headers["x-qlm-slo-class"] == "batch"
        assert c.get("/admin/fleet", headers=auth("sk-env-admin-01")).status_code == 200
