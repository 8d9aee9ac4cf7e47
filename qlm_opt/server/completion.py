"""Serving one completion request, shared by the FastAPI routes (``app``) and the fast path
(``fastpath``): resolve its SLO class, admit it through the gateway, then stream it as
server-sent events or wait for it and answer with JSON.

The two responses are Starlette ``Response`` subclasses (so that the routes can return them)
that build their raw ASGI headers directly and send their messages themselves: Starlette's
``Response`` re-parses a header mapping per response, and its ``StreamingResponse`` (below
ASGI spec 2.4, the only way it notices a disconnect) runs every stream in an anyio task group.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping

from fastapi.responses import Response

from qlm_opt.server.auth import Principal
from qlm_opt.server.gateway import ClientGone, Gateway
from qlm_opt.server.openai_protocol import (
    ChatCompletionRequest,
    ChunkWriter,
    CompletionRequest,
    chat_body,
    completion_body,
    new_id,
    usage,
)

_JSON = (b"content-type", b"application/json")


class JSONBytes(Response):
    """A JSON body already encoded, with headers given as raw ``(name, value)`` byte pairs
    (lower-case names). The wire headers are those of ``Response(content, headers=...,
    media_type="application/json")``: the given ones, then content-length and content-type."""

    media_type = "application/json"

    def __init__(self, content: bytes, raw_headers: list[tuple[bytes, bytes]],
                 status_code: int = 200) -> None:
        self.status_code = status_code
        self.body = content
        self.background = None
        raw_headers.append((b"content-length", str(len(content)).encode()))
        raw_headers.append(_JSON)
        self.raw_headers = raw_headers

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body})


class SSEResponse(Response):
    """Server-sent events: sends each chunk of ``chunks`` as it comes, and calls ``on_gone()``
    as soon as the client disconnects (the gateway then cancels the request, which ends the
    stream: whatever the stream still yields goes nowhere). The generator is closed in every
    case, so its ``finally`` runs."""

    media_type = "text/event-stream"

    def __init__(self, chunks: AsyncIterator[bytes], raw_headers: list[tuple[bytes, bytes]],
                 on_gone: Callable[[], None]) -> None:
        self.status_code = 200
        self.body_iterator = chunks
        self.background = None
        self.on_gone = on_gone
        raw_headers.append((b"content-type", b"text/event-stream; charset=utf-8"))
        self.raw_headers = raw_headers

    async def __call__(self, scope, receive, send) -> None:
        chunks = self.body_iterator
        done = False

        def gone(t: asyncio.Task) -> None:
            if not done and not t.cancelled() and t.exception() is None:
                self.on_gone()

        watcher = asyncio.get_running_loop().create_task(_wait_disconnect(receive))
        watcher.add_done_callback(gone)
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            done = True
            watcher.cancel()
            await chunks.aclose()


async def _wait_disconnect(receive: Callable) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


def json_error(status: int, body: dict, headers: Mapping[str, str] | None = None) -> Response:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    return JSONBytes(json.dumps(body).encode(), raw, status)


async def serve_completion(
    receive: Callable,
    gw: Gateway,
    who: Principal,
    body: CompletionRequest | ChatCompletionRequest,
    chat: bool,
    prompt_tokens: int,
    prompt: object,
    max_tokens: int | None,
    x_slo_class: str | None,
    x_slo_ttft_ms: str | None,
) -> Response:
    """``receive``: the request's ASGI receive channel (read for a disconnect while a
    non-streamed request runs)."""
    cls, ttft_s = gw.resolve_class(who, x_slo_class, x_slo_ttft_ms, body.priority)
    backend = gw.backend
    params = body.model_dump(exclude={"messages", "prompt"}, exclude_none=True) if (
        backend.kind != "simulated") else {}
    ids = await gw.prepare(body.model, prompt, chat)
    if ids is not None:  # real engines: the exact token count
        prompt, prompt_tokens = ids, len(ids)
    job = gw.admit(who, body.model, cls, ttft_s, prompt_tokens, max_tokens, prompt, params)
    rid = new_id("chatcmpl" if chat else "cmpl")
    headers = [(b"x-qlm-backend", backend.kind.encode()), (b"x-qlm-slo-class", cls.encode()),
               (b"x-request-id", rid.encode())]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(rid, body.model, chat, include_usage, backend.fingerprint)
        headers.append((b"cache-control", b"no-cache"))
        headers.append((b"x-accel-buffering", b"no"))
        return SSEResponse(gw.stream(job, writer), headers, lambda: gw.cancel(job))
    try:
        await gw.wait(job, receive)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; uvicorn drops it
    req = job.req
    if req.completed_at is not None:
        headers.append((b"x-qlm-processing-ms",
                        f"{(req.completed_at - req.arrived_at) * 1000:.1f}".encode()))
    build = chat_body if chat else completion_body
    content = build(rid, body.model, gw.text(job), job.finish_reason(),
                    usage(req.prompt_tokens, req.num_generated), backend.fingerprint)
    return JSONBytes(content, headers)
