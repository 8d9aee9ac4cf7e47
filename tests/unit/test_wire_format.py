"""The response bytes of ``openai_protocol`` are what the stdlib encoder gave before the fast
encoder and the pre-encoded chunk parts: for every kind of chunk and body, and for texts that
need escaping (quotes, backslashes, control characters, non-ASCII, U+2028)."""

from __future__ import annotations

import json

import pytest

from qlm_opt.server import openai_protocol as op

_ref = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

TEXTS = ["", " the", 'say "hi"', "back\\slash", "line\nbreak\ttab\r\x00\x1f\x7f", "é 😀 中文",
         "a\u2028b\u2029", "</script>", "\ud7ff\ue000"]


class RefWriter:
    """The chunk writer as it was: every chunk built as a dict and encoded whole."""

    def __init__(self, w: op.ChunkWriter) -> None:
        self.w = w

    def _chunk(self, choice, use=None, last=False) -> bytes:
        w = self.w
        obj = {"id": w.rid, "object": "chat.completion.chunk" if w.chat else "text_completion",
               "created": w.created, "model": w.model, "system_fingerprint": w.fingerprint,
               "choices": [choice] if choice is not None else []}
        if w.include_usage:
            obj["usage"] = use
        elif last and use is not None:
            obj["usage"] = use
        return b"data: " + _ref(obj).encode() + b"\n\n"

    def role(self) -> bytes:
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""},
                            "logprobs": None, "finish_reason": None})

    def delta(self, text: str) -> bytes:
        if self.w.chat:
            choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                      "finish_reason": None}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": None}
        return self._chunk(choice)

    def finish(self, reason: str, use: dict) -> bytes:
        if self.w.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": reason}
        out = self._chunk(choice, None if self.w.include_usage else use, last=True)
        if self.w.include_usage:
            out += self._chunk(None, use)
        return out + b"data: [DONE]\n\n"


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("model", ["llama-3.2-1b", 'odd "model" é'])
def test_chunks_are_the_bytes_of_the_whole_object(chat, include_usage, model):
    w = op.ChunkWriter("chatcmpl-x1", model, chat, include_usage, "qlm-opt-sim")
    ref = RefWriter(w)
    assert w.role() == ref.role()
    for t in TEXTS:
        assert w.delta(t) == ref.delta(t), t
        json.loads(w.delta(t)[6:])  # and it is JSON
    for reason in ("stop", "length"):
        assert w.finish(reason, op.usage(7, 3)) == ref.finish(reason, op.usage(7, 3))


def test_bodies_and_errors_are_the_stdlib_bytes(monkeypatch):
    monkeypatch.setattr(op.time, "time", lambda: 1_700_000_000.5)
    for t in TEXTS:
        for build, obj in ((op.chat_body, "chat.completion"),
                           (op.completion_body, "text_completion")):
            got = build("cmpl-1", "m", t, "length", op.usage(3, 1), "fp")
            want = json.loads(got)
            assert want["object"] == obj
            assert got == _ref(want).encode()
    err = op.ChunkWriter.error(503, 'dropped "x"\n', "server_error", "cancelled")
    body = {"error": {"message": 'dropped "x"\n', "type": "server_error", "param": None,
                      "code": "cancelled"}}
    assert err == b"data: " + _ref(body).encode() + b"\n\ndata: [DONE]\n\n"
    assert op.dumps({"a": [1, 2.5, None, True], "b": "é"}) == _ref(
        {"a": [1, 2.5, None, True], "b": "é"}).encode()
