"""The inference fast path (``server.fast_path``) answers exactly as the FastAPI routes do:
the same status, body shape and headers for valid requests, every error, the rate limit and
a full class queue; requests it does not take (no key, bad body, the TTFT header, other
content types) fall through to the routes with their body intact."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from qlm_opt.server.app import create_app
from tests.e2e.conftest import LIMITED_KEY, MODEL, USER_KEY, settings_for

CASES = [
    ("/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 3}, {}),
    ("/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}, {}),
    ("/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
     {"x-slo-class": "batch"}),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2},
     {"x-slo-ttft-ms": "500"}),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, {}),  # 404
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 5000}, {}),  # 400
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 5000}, {}),  # 413
    ("/v1/chat/completions", {"model": MODEL}, {}),  # 422
    ("/v1/completions", {"model": MODEL, "prompt": "x"}, {"x-slo-class": "gold"}),  # 400
    ("/v1/completions", {"model": MODEL, "prompt": "x"},
     {"authorization": "Bearer sk-wrong-wrong"}),  # 401
    ("/v1/completions", {"model": MODEL, "prompt": "x"}, {"authorization": ""}),  # 401
]


def _answers(fast_path: bool) -> list[tuple]:
    s = settings_for(1000.0, server={"fast_path": fast_path})
    out = []
    with TestClient(create_app(s, env={})) as c:
        for path, body, headers in CASES:
            h = {"authorization": f"Bearer {USER_KEY}", **headers}
            r = c.post(path, json=body, headers=h)
            j = r.json()
            if r.status_code == 200:  # ids and timings differ between runs
                shape = (j["object"], j["model"], j["usage"], j["choices"][0]["finish_reason"],
                         r.headers["x-qlm-slo-class"])
            else:
                shape = j
            out.append((r.status_code, shape))
        # the rate limit (burst 1): the second request is refused with Retry-After
        lim = {"authorization": f"Bearer {LIMITED_KEY}"}
        r1 = c.post("/v1/completions", json=CASES[0][1], headers=lim)
        r2 = c.post("/v1/completions", json=CASES[0][1], headers=lim)
        out.append((r1.status_code, r2.status_code, r2.json()["error"]["code"],
                    "retry-after" in r2.headers))
        # a JSON body sent as text/plain goes to the route, which refuses it
        r = c.post("/v1/completions", content=b'{"model": "%s", "prompt": "x"}' % MODEL.encode(),
                   headers={"authorization": f"Bearer {USER_KEY}", "content-type": "text/plain"})
        out.append((r.status_code,))
        metrics = c.get("/metrics").text
        errors = sorted(line for line in metrics.splitlines()
                        if line.startswith("qlm_http_errors_total"))
        out.append(tuple(errors))
    return out


def test_fast_path_answers_like_the_routes():
    on, off = _answers(True), _answers(False)
    assert [a[0] for a in on[:len(CASES)]] == [200, 200, 200, 200, 404, 400, 413, 422, 400,
                                                401, 401]
    assert on[len(CASES)] == (200, 429, "rate_limit_exceeded", True)
    assert on[len(CASES) + 1] == (422,)
    for a, b in zip(on, off):
        assert a == b


@pytest.mark.parametrize("fast_path", [True, False])
def test_queue_full_has_the_same_answer(fast_path):
    s = settings_for(0.001, server={"fast_path": fast_path},
                     classes={"tiny": {"ttft_s": 30.0, "priority": 2, "max_queue": 1}})
    with TestClient(create_app(s, env={})) as c:
        h = {"authorization": f"Bearer {USER_KEY}", "x-slo-class": "tiny"}
        with c.stream("POST", "/v1/completions", headers=h,
                      json={"model": MODEL, "prompt": "wait", "max_tokens": 50, "stream": True}):
            r = c.post("/v1/completions", headers=h,
                       json={"model": MODEL, "prompt": "wait", "max_tokens": 50})
            assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
            assert int(r.headers["retry-after"]) >= 1
