"""Serving one completion request, shared by the FastAPI routes (``app``) and the fast path
(``fastpath``): resolve its SLO class, admit it through the gateway, then stream it as
server-sent events or wait for it and answer with JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

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


class SSEResponse(StreamingResponse):
    """Server-sent events that stop (and cancel the request) as soon as the client goes
    away. Starlette only watches for disconnects below ASGI spec 2.4, so it is pinned."""

    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send) -> None:
        scope = dict(scope)
        scope["asgi"] = {**scope.get("asgi", {}), "spec_version": "2.3"}
        await super().__call__(scope, receive, send)


def json_error(status: int, body: dict, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(body).encode(), status_code=status,
                    media_type="application/json", headers=headers)


async def serve_completion(
    request: Request,
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
    cls, ttft_s = gw.resolve_class(who, x_slo_class, x_slo_ttft_ms, body.priority)
    params = body.model_dump(exclude={"messages", "prompt"}, exclude_none=True) if (
        gw.backend.kind != "simulated") else {}
    ids = await gw.prepare(body.model, prompt, chat)
    if ids is not None:  # real engines: the exact token count
        prompt, prompt_tokens = ids, len(ids)
    job = gw.admit(who, body.model, cls, ttft_s, prompt_tokens, max_tokens, prompt, params)
    backend = gw.backend
    rid = new_id("chatcmpl" if chat else "cmpl")
    headers = {"x-qlm-backend": backend.kind, "x-qlm-slo-class": cls, "x-request-id": rid}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        writer = ChunkWriter(rid, body.model, chat, include_usage, backend.fingerprint)
        headers["cache-control"] = "no-cache"
        headers["x-accel-buffering"] = "no"
        return SSEResponse(gw.stream(job, writer), headers=headers)
    try:
        await gw.wait(job, request.receive)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; uvicorn drops it
    req = job.req
    if req.completed_at is not None:
        headers["x-qlm-processing-ms"] = f"{(req.completed_at - req.arrived_at) * 1000:.1f}"
    build = chat_body if chat else completion_body
    content = build(rid, body.model, gw.text(job), job.finish_reason(),
                    usage(req.prompt_tokens, req.num_generated), backend.fingerprint)
    return Response(content, media_type="application/json", headers=headers)
