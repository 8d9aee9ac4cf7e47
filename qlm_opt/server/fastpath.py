"""The inference hot path without FastAPI's per-request machinery.

``POST /v1/completions`` and ``POST /v1/chat/completions`` are declared as FastAPI routes (the
OpenAPI schema, validation errors, docs), but resolving their dependency tree (bearer scheme,
key store, principal, rate limit, gateway, two headers, the body) costs FastAPI about as much
CPU as the rest of the request put together (profiled with cProfile under the ``qlm`` policy
over the embedded fleet; ``benchmarks/gateway_overhead``). This ASGI middleware serves the
common case of those two routes directly, with the same code the routes call
(``completion.serve_completion``): a JSON body (``application/json``) with a Content-Length under the size
limit that validates, a valid bearer key, no ``x-slo-ttft-ms`` header. Everything else (missing or wrong key, invalid body, chunked or
oversized bodies, the TTFT header, other routes) goes on to the FastAPI app unchanged, with the
body replayed, so every error keeps the one format the exception handlers give it.
Errors raised after the request was accepted here (rate limit, admission) are answered here,
in the same OpenAI format and counted in the same metrics.
"""

from __future__ import annotations

import logging

from pydantic import ValidationError

from qlm_opt.errors import QLMError
from qlm_opt.server.completion import json_error, serve_completion
from qlm_opt.server.errors import APIError, error_body
from qlm_opt.server.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_prompt_tokens,
    completion_prompt_tokens,
)

log = logging.getLogger(__name__)

_PATHS = {b"/v1/completions": False, b"/v1/chat/completions": True}


class FastInference:
    """See the module docstring. ``app`` is the rest of the ASGI stack."""

    def __init__(self, app, fastapi_app, max_bytes: int) -> None:
        self.app = app
        self.fastapi_app = fastapi_app  # app.state: gateway, keys, metrics
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        chat = _PATHS.get(scope.get("raw_path") or scope["path"].encode())
        if chat is None:
            return await self.app(scope, receive, send)
        length = auth = slo_class = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                length = v
            elif k == b"authorization":
                auth = v
            elif k == b"x-slo-class":
                if slo_class is None:
                    slo_class = v.decode("latin-1")
            elif k == b"x-slo-ttft-ms":
                return await self.app(scope, receive, send)
            elif k == b"content-type" and not v.lower().startswith(b"application/json"):
                return await self.app(scope, receive, send)
        try:
            n = int(length) if length is not None else -1
        except ValueError:
            n = -1
        if not 0 <= n <= self.max_bytes or auth is None or auth[:7].lower() != b"bearer ":
            return await self.app(scope, receive, send)
        state = self.fastapi_app.state
        who = state.keys.lookup(auth[7:].decode("latin-1").strip())
        if who is None:
            return await self.app(scope, receive, send)
        body = await _read(receive)
        if body is None:  # the client went away while sending
            return
        try:
            req = (ChatCompletionRequest if chat else CompletionRequest).model_validate_json(body)
        except ValidationError:
            return await self.app(scope, _replay(body, receive), send)
        await self._serve(scope, receive, send, state, who, req, chat, slo_class)

    async def _serve(self, scope, receive, send, state, who, body, chat: bool,
                     slo_class: str | None) -> None:
        metrics = state.metrics
        gw = state.gateway
        try:
            who.check_rate()
            if chat:
                n = chat_prompt_tokens(body.messages)
                max_tokens = body.max_completion_tokens or body.max_tokens
                prompt = None
                if gw.backend.kind != "simulated":
                    prompt = [m.model_dump(exclude_none=True) for m in body.messages]
            else:
                n = completion_prompt_tokens(body.prompt)
                max_tokens = body.max_tokens
                prompt = body.prompt
            resp = await serve_completion(receive, gw, who, body, chat, n, prompt, max_tokens,
                                          slo_class, None)
        except APIError as e:
            metrics.http_errors[e.status] += 1
            resp = json_error(e.status, error_body(e.message, e.type, e.param, e.code),
                               e.headers)
        except QLMError as e:
            metrics.http_errors[400] += 1
            resp = json_error(400, error_body(str(e), "invalid_request_error"))
        except Exception:
            metrics.http_errors[500] += 1
            log.exception("unhandled error on POST %s", scope["path"])
            resp = json_error(500, error_body("internal server error", "server_error", None,
                                               "internal_error"))
        await resp(scope, receive, send)


async def _read(receive) -> bytes | None:
    chunks = []
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            return None
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    done = False

    async def replay():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

