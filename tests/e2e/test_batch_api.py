"""The Batch API through the unchanged ``openai`` client against a live uvicorn, on a SQLite
file and on a real PostgreSQL server (``batch_store`` runs each test on both)."""

from __future__ import annotations

import json
import os

import httpx
import openai
import pytest

from tests.e2e.batch_support import (  # noqa: F401 - fixtures
    ADMIN_KEY,
    BATCH_KEY,
    MODEL,
    USER_KEY,
    LiveServer,
    assert_each_once,
    batch_settings,
    batch_store,
    chat_line,
    client,
    postgres,
    read_results,
    upload,
    wait_batch,
)
from tests.e2e.conftest import assert_error, auth


@pytest.fixture()
def server(batch_store):
    srv = LiveServer(batch_settings(batch_store))
    yield srv
    srv.stop()


def test_batch_runs_to_completion_with_openai_client(server):
    c = client(server)
    lines = [chat_line(i) for i in range(40)]
    lines.insert(5, '{"custom_id": "broken", "method": "POST", ')  # line 6: not JSON
    lines.append(json.dumps({"custom_id": "bad-body", "method": "POST",
                             "url": "/v1/chat/completions", "body": {"model": MODEL}}))
    f = upload(c, lines)
    assert f.purpose == "batch" and f.bytes == len(("\n".join(lines) + "\n").encode())
    assert c.files.retrieve(f.id).id == f.id
    assert c.files.content(f.id).text.splitlines() == lines

    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="24h", metadata={"job": "nightly"})
    assert b.status in ("validating", "in_progress")
    assert b.request_counts.total == 42
    assert b.metadata == {"job": "nightly"}
    assert [e.line for e in b.errors.data] == [6, 42]

    b = wait_batch(c, b.id)
    assert b.status == "completed", b
    assert (b.request_counts.completed, b.request_counts.failed) == (40, 2)
    for ts in ("created_at", "in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(b, ts) is not None, ts
    assert b.created_at <= b.in_progress_at <= b.finalizing_at <= b.completed_at
    assert b.expires_at == b.created_at + 24 * 3600

    out, err = read_results(c, b)
    assert_each_once([f"req-{i}" for i in range(40)] + [None, "bad-body"], out, err)
    for o in out:
        assert o["error"] is None
        assert o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["object"] == "chat.completion" and body["model"] == MODEL
        assert body["usage"]["completion_tokens"] == 8
        assert body["choices"][0]["message"]["content"]
    # the malformed line is reported with its line number
    broken = next(e for e in err if e["custom_id"] is None)
    assert broken["error"]["line"] == 6 and broken["error"]["code"] == "invalid_json_line"
    assert "line 6" in broken["error"]["message"]
    bad = next(e for e in err if e["custom_id"] == "bad-body")
    assert bad["error"]["line"] == 42 and bad["error"]["param"] == "body.messages"

    # result files belong to the tenant and are listed
    assert c.files.retrieve(b.output_file_id).purpose == "batch_output"
    # the job's metrics
    text = server.app.state.metrics.render().decode()
    assert 'qlm_batch_lines_total{outcome="completed"} 40.0' in text
    assert 'qlm_batch_lines_total{outcome="failed"} 2.0' in text
    assert "qlm_batch_completion_window_fraction_count 1.0" in text
    assert 'qlm_batch_jobs{status="completed"} 1.0' in text


def test_completions_endpoint_and_list_pagination(server):
    c = client(server)
    ids = []
    for j in range(3):
        lines = [json.dumps({"custom_id": f"c{j}-{i}", "method": "POST", "url": "/v1/completions",
                             "body": {"model": MODEL, "prompt": "Say hi", "max_tokens": 3}})
                 for i in range(5)]
        f = upload(c, lines)
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                             completion_window="1h")
        ids.append(b.id)
    for bid in ids:
        b = wait_batch(c, bid)
        assert b.status == "completed" and b.request_counts.completed == 5
        out, _ = read_results(c, b)
        assert all(o["response"]["body"]["object"] == "text_completion" for o in out)
    page1 = c.batches.list(limit=2)
    assert [b.id for b in page1.data] == ids[::-1][:2]
    assert page1.has_more
    page2 = c.batches.list(limit=2, after=page1.data[-1].id)
    assert [b.id for b in page2.data] == ids[::-1][2:]
    assert not page2.has_more
    # the iterator follows `after` across pages
    assert [b.id for b in c.batches.list(limit=1)] == ids[::-1]


def test_cancel_keeps_finished_results(batch_store):
    # Real-time simulation with few lines in flight, so the job is mid-way when cancelled.
    batch_store = {**batch_store, "max_lines_in_flight": 2, "min_lines_in_flight": 2}
    srv = LiveServer(batch_settings(batch_store, speedup=1.0))
    try:
        c = client(srv)
        f = upload(c, [chat_line(i, max_tokens=4) for i in range(300)])
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
        wait_batch(c, b.id, until=lambda x: x.request_counts.completed >= 5)
        b = c.batches.cancel(b.id)
        assert b.status in ("cancelling", "cancelled")
        assert b.cancelling_at is not None
        b = wait_batch(c, b.id)
        assert b.status == "cancelled" and b.cancelled_at is not None
        done, failed = b.request_counts.completed, b.request_counts.failed
        assert done >= 5 and failed > 0 and done + failed == 300
        out, err = read_results(c, b)
        assert_each_once([f"req-{i}" for i in range(300)], out, err)
        assert len(out) == done
        assert {e["error"]["code"] for e in err} == {"batch_cancelled"}
        # nothing of the job is left in the queue
        srv.wait_until(lambda: srv.gateway.inflight_by_class["batch"] == 0)
        with pytest.raises(openai.ConflictError):
            c.batches.cancel(b.id)
    finally:
        srv.stop()


def test_window_end_writes_batch_expired(batch_store):
    batch_store = {**batch_store, "max_lines_in_flight": 2, "min_lines_in_flight": 2}
    srv = LiveServer(batch_settings(batch_store, speedup=1.0))
    try:
        c = client(srv)
        f = upload(c, [chat_line(i, max_tokens=64) for i in range(400)])
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="3s")
        assert b.expires_at - b.created_at == 3
        b = wait_batch(c, b.id, timeout_s=20)
        assert b.status == "expired" and b.expired_at is not None
        out, err = read_results(c, b)
        assert_each_once([f"req-{i}" for i in range(400)], out, err)
        assert err and {e["error"]["code"] for e in err} == {"batch_expired"}
        assert b.request_counts.failed == len(err) and b.request_counts.completed == len(out)
        srv.wait_until(lambda: srv.gateway.inflight_by_class["batch"] == 0)
    finally:
        srv.stop()


def test_tenants_see_only_their_own_and_admin_sees_all(server):
    alice, bob, admin = client(server, USER_KEY), client(server, BATCH_KEY), client(server,
                                                                                     ADMIN_KEY)
    fa = upload(alice, [chat_line(i) for i in range(3)])
    ba = alice.batches.create(input_file_id=fa.id, endpoint="/v1/chat/completions",
                              completion_window="24h")
    fb = upload(bob, [chat_line(i) for i in range(2)])
    # bob can neither see nor use alice's objects: 404, as for an unknown id
    for call in (lambda: bob.files.retrieve(fa.id), lambda: bob.files.content(fa.id),
                 lambda: bob.files.delete(fa.id), lambda: bob.batches.retrieve(ba.id),
                 lambda: bob.batches.cancel(ba.id),
                 lambda: bob.batches.create(input_file_id=fa.id,
                                            endpoint="/v1/chat/completions",
                                            completion_window="24h")):
        with pytest.raises(openai.NotFoundError):
            call()
    assert [b.id for b in bob.batches.list()] == []
    assert [f.id for f in bob.files.list()] == [fb.id]
    # the admin key sees everything
    ba = wait_batch(admin, ba.id)
    assert ba.status == "completed"
    assert {f.id for f in admin.files.list()} >= {fa.id, fb.id, ba.output_file_id}
    assert [b.id for b in admin.batches.list()] == [ba.id]
    assert admin.files.content(ba.output_file_id).text.count("\n") == 3
    # alice's own view of her finished batch
    assert alice.files.content(ba.output_file_id).text == admin.files.content(
        ba.output_file_id).text
    with pytest.raises(openai.NotFoundError):
        bob.files.content(ba.output_file_id)
    # deleting: only the owner's file, and then it is gone
    assert alice.files.delete(fa.id).deleted
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(fa.id)


def _snapshot(srv, c) -> tuple:
    files_dir = srv.app.state.settings.batch.files_dir
    return (sorted(f.id for f in c.files.list()), sorted(b.id for b in c.batches.list()),
            sorted(os.listdir(files_dir)) if os.path.isdir(files_dir) else [])


def test_bad_input_gets_openai_4xx_and_stores_nothing(server):
    c = client(server)
    good = upload(c, [chat_line(i) for i in range(3)])
    before = _snapshot(server, c)

    def refused(exc, code, **kw):
        with pytest.raises(exc) as ei:
            c.batches.create(**{"input_file_id": good.id, "endpoint": "/v1/chat/completions",
                                "completion_window": "24h", **kw})
        assert ei.value.code == code, ei.value.body
        assert 400 <= ei.value.status_code < 500
        return ei.value

    # unknown model (line 2), wrong endpoint (parameter; and a line for another endpoint)
    unknown = upload(c, [chat_line(0), chat_line(1, model="no-such-model")])
    e = refused(openai.BadRequestError, "model_not_found", input_file_id=unknown.id)
    assert "line 2" in e.message
    refused(openai.BadRequestError, "invalid_endpoint", endpoint="/v1/embeddings")
    other = upload(c, [chat_line(0), chat_line(1, url="/v1/completions")])
    refused(openai.BadRequestError, "invalid_url", input_file_id=other.id)
    refused(openai.BadRequestError, "invalid_completion_window", completion_window="48h")
    dup = upload(c, [chat_line(0), chat_line(1, custom_id="req-0")])
    refused(openai.BadRequestError, "duplicate_custom_id", input_file_id=dup.id)
    empty = upload(c, ["", "   "])
    refused(openai.BadRequestError, "empty_file", input_file_id=empty.id)
    # unknown ids
    refused(openai.NotFoundError, "file_not_found", input_file_id="file-nope")
    with pytest.raises(openai.NotFoundError):
        c.batches.retrieve("batch_nope")
    with pytest.raises(openai.NotFoundError):
        c.batches.cancel("batch_nope")
    with pytest.raises(openai.NotFoundError):
        c.files.content("file-nope")
    with pytest.raises(openai.BadRequestError) as ei:
        c.files.create(file=("x.jsonl", b"{}\n"), purpose="fine-tune")
    assert ei.value.code == "invalid_purpose"
    # refused batches stored nothing; only the uploads are new files
    after = _snapshot(server, c)
    assert after[1] == before[1] == []
    assert set(after[0]) - set(before[0]) == {unknown.id, other.id, dup.id, empty.id}
    assert all(not n.startswith(".tmp") for n in after[2])


def test_oversized_file_is_413_and_leaves_nothing(batch_store):
    srv = LiveServer(batch_settings({**batch_store, "max_file_bytes": 4096}))
    try:
        c = client(srv)
        small = upload(c, [chat_line(0)])
        big = [chat_line(i) for i in range(200)]  # ~40 KB
        with pytest.raises(openai.APIStatusError) as ei:
            upload(c, big)
        assert ei.value.status_code == 413
        # a body that fits the envelope but not the file limit is counted while stored
        content = ("x" * 5000).encode()
        r = httpx.post(srv.url + "/v1/files", headers=auth(USER_KEY),
                       files={"file": ("y.jsonl", content)}, data={"purpose": "batch"})
        assert_error(r, 413, "file_too_large")
        assert [f.id for f in c.files.list()] == [small.id]
        assert sorted(os.listdir(batch_store["files_dir"])) == [small.id]
    finally:
        srv.stop()


def test_http_errors_are_openai_shaped(server):
    with httpx.Client(base_url=server.url, timeout=10) as h:
        assert_error(h.get("/v1/batches"), 401, "missing_api_key")
        assert_error(h.get("/v1/batches", headers=auth("sk-wrong-key-000")), 401,
                     "invalid_api_key")
        assert_error(h.get("/v1/batches/batch_x", headers=auth()), 404, "batch_not_found")
        assert_error(h.post("/v1/batches", headers=auth(), json={"endpoint": 3}), 422)
        assert_error(h.get("/v1/batches?limit=0", headers=auth()), 422)


def test_default_pacing_rule_completes_a_job(tmp_path):
    """The server's own feed rule (no overrides: the pace, the fleet's backpressure and seats)
    runs a job to completion, every line once."""
    cfg = {"files_dir": str(tmp_path / "files"), "sqlite_path": str(tmp_path / "b.sqlite3")}
    settings = batch_settings(cfg)
    assert settings.batch.max_lines_in_flight is None
    srv = LiveServer(settings)
    try:
        c = client(srv)
        f = upload(c, [chat_line(i) for i in range(60)])
        b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                             completion_window="24h")
        b = wait_batch(c, b.id, timeout_s=60)
        assert b.status == "completed" and b.request_counts.completed == 60
        out, err = read_results(c, b)
        assert_each_once([f"req-{i}" for i in range(60)], out, err)
    finally:
        srv.stop()
