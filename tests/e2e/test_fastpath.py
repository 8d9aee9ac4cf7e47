"""The inference fast path (``server.fast_path``) answers exactly as the FastAPI routes do:
the same status, body shape and headers for valid requests, every error, the rate limit and
a full class queue; requests it does not take (no key, bad body, the TTFT header, other
content types) fall through to the routes with their body intact."""

from __future__ import annotations

import json

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


def _served(fast_path: bool) -> tuple:
    """Headers and SSE framing of a streamed and a non-streamed answer, and the latency
    histograms' counts after them (ids and timings left out)."""
    s = settings_for(1000.0, server={"fast_path": fast_path})
    with TestClient(create_app(s, env={})) as c:
        h = {"authorization": f"Bearer {USER_KEY}"}
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
        with c.stream("POST", "/v1/chat/completions", headers=h, json=chat) as r:
            sse_headers = sorted((k, v) for k, v in r.headers.items()
                                 if k not in ("x-request-id", "date"))
            raw = b"".join(r.iter_bytes())
        events = raw.split(b"\n\n")
        assert events[-1] == b"" and events[-2] == b"data: [DONE]"
        chunks = [json.loads(e[len(b"data: "):]) for e in events[:-2]]
        assert all(e.startswith(b'data: {"id":"chatcmpl-') for e in events[:-2])
        rid = chunks[0]["id"]
        assert r.headers["x-request-id"] == rid and {ch["id"] for ch in chunks} == {rid}
        text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks
                       if ch["choices"])
        shape = [(sorted(ch), [ch["choices"][0].get("finish_reason")] if ch["choices"] else [],
                  ch["usage"]) for ch in chunks]
        r = c.post("/v1/completions", headers=h,
                   json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
        # the id's length (a hex counter) changes content-length between requests
        json_headers = sorted((k, v) for k, v in r.headers.items() if k not in (
            "x-request-id", "x-qlm-processing-ms", "date", "content-length"))
        assert "x-qlm-processing-ms" in r.headers
        assert int(r.headers["content-length"]) == len(r.content)
        metrics = c.get("/metrics").text
        counts = sorted(line for line in metrics.splitlines()
                        if line.startswith(("qlm_ttft_seconds_count", "qlm_e2e_seconds_count",
                                            "qlm_requests_total")))
    return sse_headers, len(text.split()), shape, json_headers, counts


def test_responses_and_metrics_are_the_same_on_both_paths():
    on, off = _served(True), _served(False)
    assert on == off
    sse_headers, words, shape, json_headers, counts = on
    assert dict(sse_headers)["content-type"] == "text/event-stream; charset=utf-8"
    assert dict(sse_headers)["cache-control"] == "no-cache"
    assert words == 3  # the simulated fleet writes one word per token
    assert shape[-1][2] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert dict(json_headers)["content-type"] == "application/json"
    assert any(c.startswith("qlm_ttft_seconds_count") and c.endswith(" 2.0") for c in counts)
    assert any(c.startswith("qlm_e2e_seconds_count") and c.endswith(" 2.0") for c in counts)
