"""The OpenAI wire format: request schemas (pydantic, at the HTTP edge only) and response and
SSE chunk builders (plain dicts encoded once, for speed).

Prompt token counting is an approximation, good enough for admission and scheduling without a
tokenizer in the gateway: one token per 4 characters of text (rounded up), token-id prompts
count exactly, and each chat message adds 4 tokens of framing plus 2 for the reply's priming
(OpenAI's cookbook rule). Real vLLM backends report the exact count in ``usage``.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field

# -- requests ---------------------------------------------------------------------------------


class _Req(BaseModel):
    # Clients send many optional OpenAI fields we do not use (logit_bias, user, ...): ignore.
    model_config = ConfigDict(extra="ignore")


TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]


class StreamOptions(_Req):
    include_usage: bool = False


class _Sampling(_Req):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    priority: int | None = Field(
        None, description="vLLM extension: scheduling priority (lower is more urgent); maps to "
        "the SLO class with that priority"
    )
    ignore_eos: bool | None = Field(
        None, description="vLLM extension: generate max_tokens tokens, past end-of-sequence "
        "(real vLLM backends; the simulated fleet always generates its output length)"
    )


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. One prompt per request (a string, or token ids)."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                    Field(min_length=1, max_length=1)]
    ) = Field(description="one prompt: a string or token ids (a list of one is accepted)")
    echo: Literal[False] = Field(False, description="not supported")
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")


class ChatMessage(_Req):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# -- documented responses (OpenAPI only; responses are built as dicts below) -------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- token counting ---------------------------------------------------------------------------


def approx_tokens(text: str) -> int:
    """~4 characters per token, rounded up (see the module docstring)."""
    return (len(text) + 3) // 4


def completion_prompt_tokens(prompt: str | list) -> int:
    """Prompt tokens of a completion request (one prompt; the schema allows no more)."""
    if isinstance(prompt, str):
        return approx_tokens(prompt)
    p = prompt[0]
    if isinstance(p, int):
        return len(prompt)
    return approx_tokens(p) if isinstance(p, str) else len(p)


def chat_prompt_tokens(messages: list[ChatMessage]) -> int:
    n = 2
    for m in messages:
        n += 4
        c = m.content
        if isinstance(c, str):
            n += approx_tokens(c)
        elif c:
            for part in c:
                t = part.get("text")
                if isinstance(t, str):
                    n += approx_tokens(t)
    return n


# -- responses --------------------------------------------------------------------------------

_ID_PREFIX = os.urandom(4).hex()
_ids = itertools.count(1)

# msgspec (a declared dependency) encodes the same compact JSON about 10x faster than the stdlib
_encode = msgspec.json.Encoder().encode


def dumps(obj: Any) -> bytes:
    """Compact JSON (no spaces, non-ASCII as UTF-8): the bytes of
    ``json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()``."""
    return _encode(obj)


def new_id(prefix: str) -> str:
    return f"{prefix}-{_ID_PREFIX}{next(_ids):x}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict, fingerprint: str
) -> bytes:
    return _encode({
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
        "usage": use,
    })


def chat_body(
    rid: str, model: str, text: str, finish_reason: str | None, use: dict, fingerprint: str
) -> bytes:
    return _encode({
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": finish_reason,
        }],
        "usage": use,
    })


class ChunkWriter:
    """SSE chunks of one streamed response, in OpenAI's format.

    With ``include_usage`` every chunk carries ``"usage": null`` and a last chunk with empty
    ``choices`` carries the usage (OpenAI's behaviour). Without it, the chunk that carries the
    ``finish_reason`` also carries the usage, so clients always get token counts.

    The parts of a chunk that do not change within a stream (id, object, created, model,
    fingerprint) are encoded once; each chunk encodes only its choice (and usage), and is
    byte for byte what encoding the whole chunk object would give.
    """

    __slots__ = ("rid", "model", "chat", "include_usage", "created", "fingerprint", "_head",
                 "_tail")

    def __init__(
        self, rid: str, model: str, chat: bool, include_usage: bool, fingerprint: str
    ) -> None:
        self.rid = rid
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(time.time())
        self.fingerprint = fingerprint
        # b'data: {"id":..,"system_fingerprint":..,"choices":[' and what closes a chunk
        head = _encode({
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": self.created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [],
        })
        self._head = b"data: " + head[:-2]  # drop the "]}" of the empty choices
        self._tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def _chunk(self, choice: dict | None, use: dict | None = None, last: bool = False) -> bytes:
        body = _encode(choice) if choice is not None else b""
        if use is not None and (self.include_usage or last):
            return self._head + body + b'],"usage":' + _encode(use) + b"}\n\n"
        return self._head + body + self._tail

    def role(self) -> bytes:
        """The chat stream's first chunk (role only); completions have none."""
        return self._head + (b'{"index":0,"delta":{"role":"assistant","content":""},'
                             b'"logprobs":null,"finish_reason":null}') + self._tail

    def delta(self, text: str) -> bytes:
        t = _encode(text)
        if self.chat:
            choice = b'{"index":0,"delta":{"content":' + t + b'},"logprobs":null,' \
                     b'"finish_reason":null}'
        else:
            choice = b'{"index":0,"text":' + t + b',"logprobs":null,"finish_reason":null}'
        return self._head + choice + self._tail

    def finish(self, finish_reason: str, use: dict) -> bytes:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        out = self._chunk(choice, None if self.include_usage else use, last=True)
        if self.include_usage:
            out += self._chunk(None, use)
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(status: int, message: str, type: str, code: str | None) -> bytes:
        """An error after the stream started (the status line is already sent)."""
        body = {"error": {"message": message, "type": type, "param": None, "code": code}}
        return b"data: " + _encode(body) + b"\n\ndata: [DONE]\n\n"
