"""The official ``openai`` client against a live server: sync and streaming, both APIs."""

from __future__ import annotations

import openai
import pytest

from tests.e2e.conftest import BATCH_KEY, MODEL, USER_KEY


@pytest.fixture()
def oai(fast):
    with openai.OpenAI(base_url=fast.url + "/v1", api_key=USER_KEY, max_retries=0) as c:
        yield c


def test_completion(oai):
    r = oai.completions.create(model=MODEL, prompt="Say hello", max_tokens=12)
    assert r.object == "text_completion"
    assert r.model == MODEL
    assert r.system_fingerprint == "qlm-opt-sim"
    assert r.choices[0].text.strip()
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12
    assert r.usage.prompt_tokens == 3  # "Say hello": 9 chars -> ceil(9 / 4)
    assert r.usage.total_tokens == 15


def test_chat(oai):
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5
    )
    assert raw.headers["x-qlm-backend"] == "simulated"
    assert raw.headers["x-qlm-slo-class"] == "interactive"
    r = raw.parse()
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and len(msg.content.split()) == 5
    assert r.usage.completion_tokens == 5


def test_chat_without_max_tokens_uses_default(oai):
    r = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}])
    # output_lengths = "max_tokens" in the test config: the server default (256) is generated
    assert r.usage.completion_tokens == 256
    assert r.choices[0].finish_reason == "stop"


def test_stream_completion_with_usage(oai):
    chunks = list(oai.completions.create(
        model=MODEL, prompt="count", max_tokens=20, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len(text.split()) == 20
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_stream_chat(oai):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=30, stream=True,
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert len(text.split()) == 30
    assert chunks[-1].choices[0].finish_reason == "length"
    # without include_usage the finishing chunk still carries the usage
    assert chunks[-1].usage.completion_tokens == 30
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_models(oai):
    ids = [m.id for m in oai.models.list()]
    assert MODEL in ids


def test_key_default_class(fast):
    with openai.OpenAI(base_url=fast.url + "/v1", api_key=BATCH_KEY, max_retries=0) as c:
        raw = c.completions.with_raw_response.create(model=MODEL, prompt="x", max_tokens=2)
    assert raw.headers["x-qlm-slo-class"] == "batch"


def test_bad_key_is_authentication_error(fast):
    with openai.OpenAI(base_url=fast.url + "/v1", api_key="sk-wrong-key-000", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError) as ei:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert ei.value.code == "invalid_api_key"


def test_unknown_model_is_not_found(oai):
    with pytest.raises(openai.NotFoundError) as ei:
        oai.completions.create(model="gpt-nope", prompt="x", max_tokens=2)
    assert ei.value.code == "model_not_found"
