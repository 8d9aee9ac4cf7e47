"""The FastAPI app: OpenAI-compatible inference, health, metrics and admin routes.

``create_app(settings)`` builds one app with its own gateway, backend and metrics registry.
The backend starts in the app's lifespan (on uvicorn's event loop). Routes are small and typed;
errors are raised as ``APIError`` and turned into OpenAI-style bodies by one handler set.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlm_opt.errors import ConfigError, QLMError
from qlm_opt.server.auth import KeyStore, Principal
from qlm_opt.server.backends import Backend, SimBackend
from qlm_opt.server.completion import json_error, serve_completion
from qlm_opt.server.batch import BatchService, batches_router, files_router
from qlm_opt.server.batch.routes import patch_openapi as patch_batch_openapi
from qlm_opt.server.errors import ERROR_TYPES, APIError, error_body, error_bytes
from qlm_opt.server.gateway import Gateway
from qlm_opt.server.metrics import ServerMetrics
from qlm_opt.server.openai_protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelList,
    chat_prompt_tokens,
    completion_prompt_tokens,
    dumps,
)
from qlm_opt.server.settings import ServerSettings, load_settings

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")


def make_backend(settings: ServerSettings) -> Backend:
    """The backend named by ``backend.kind``. vLLM backends are imported lazily (and vLLM
    itself only when an engine starts), so the gateway and the simulated fleet never import
    vLLM."""
    kind = settings.backend.kind
    if kind == "sim":
        return SimBackend(settings)
    if kind in ("vllm_local", "vllm_remote"):
        from qlm_opt.server.vllm_backend import make_backend as make_vllm_backend

        return make_vllm_backend(settings)
    raise ConfigError(f"field 'backend.kind': unknown backend '{kind}'")


# -- dependencies -----------------------------------------------------------------------------
# All ``async def``: FastAPI runs plain ``def`` dependencies in a thread pool, which costs more
# than the work they do.
async def get_settings(request: Request) -> ServerSettings:
    return request.app.state.settings


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


async def get_keys(request: Request) -> KeyStore:
    return request.app.state.keys


Creds = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
GatewayDep = Annotated[Gateway, Depends(get_gateway)]
KeysDep = Annotated[KeyStore, Depends(get_keys)]


async def authenticated(creds: Creds, keys: KeysDep) -> Principal:
    """The caller's principal; 401 without a valid key (unless unauthenticated mode)."""
    if creds is None:
        if keys.anonymous is not None:
            return keys.anonymous
        raise APIError(401, "You didn't provide an API key. Use 'Authorization: Bearer <key>'.",
                       code="missing_api_key")
    who = keys.lookup(creds.credentials)
    if who is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return who


async def rate_limited(who: Annotated[Principal, Depends(authenticated)]) -> Principal:
    who.check_rate()
    return who


async def admin(creds: Creds, keys: KeysDep) -> None:
    if creds is None or not keys.is_admin(creds.credentials):
        raise APIError(401, "admin routes need the admin key", code="invalid_admin_key")


Who = Annotated[Principal, Depends(rate_limited)]
SLOClassHeader = Annotated[
    str | None, Header(description="SLO class name (see /admin/fleet or server.toml)")
]
SLOTTFTHeader = Annotated[
    float | None,
    Header(gt=0, le=86_400_000, description="TTFT target in milliseconds for this request"),
]

_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 413, 422, 429, 503)}


# One server-sent event: ``data`` is a chunk object as JSON (the same shape as the JSON
# response with ``delta``/``text`` per chunk), and the last event's data is ``[DONE]``.
_SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "a chunk as JSON, or [DONE] at the end"},
        "event": {"type": "string"},
    },
}


def _ok(model) -> dict:
    return {
        200: {
            "model": model,
            "content": {"text/event-stream": {"schema": _SSE_EVENT}},
            "description": "JSON, or server-sent events when `stream` is true",
        },
        **_ERRORS,
    }


# -- inference ----------------------------------------------------------------------------------
inference = APIRouter(tags=["inference"])


@inference.post("/v1/completions", responses=_ok(CompletionResponse),
                response_model=None)
async def completions(
    body: CompletionRequest,
    request: Request,
    gw: GatewayDep,
    who: Who,
    x_slo_class: SLOClassHeader = None,
    x_slo_ttft_ms: SLOTTFTHeader = None,
) -> Response:
    """OpenAI text completion (one prompt per request)."""
    n = completion_prompt_tokens(body.prompt)
    return await serve_completion(request.receive, gw, who, body, False, n, body.prompt,
                                  body.max_tokens, x_slo_class, x_slo_ttft_ms)


@inference.post("/v1/chat/completions", responses=_ok(ChatCompletionResponse),
                response_model=None)
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    gw: GatewayDep,
    who: Who,
    x_slo_class: SLOClassHeader = None,
    x_slo_ttft_ms: SLOTTFTHeader = None,
) -> Response:
    """OpenAI chat completion."""
    n = chat_prompt_tokens(body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    prompt = None
    if gw.backend.kind != "simulated":
        prompt = [m.model_dump(exclude_none=True) for m in body.messages]
    return await serve_completion(request.receive, gw, who, body, True, n, prompt, max_tokens,
                                  x_slo_class, x_slo_ttft_ms)


@inference.get("/v1/models", response_model=ModelList, responses=_ERRORS)
async def list_models(
    request: Request, gw: GatewayDep, who: Annotated[Principal, Depends(authenticated)]
) -> Response:
    """Models the fleet serves now or after a swap."""
    created = request.app.state.started_at
    data = [{"id": m, "object": "model", "created": created, "owned_by": "qlm-opt"}
            for m in gw.backend.models()]
    return Response(dumps({"object": "list", "data": data}), media_type="application/json")


# -- operations ---------------------------------------------------------------------------------
ops = APIRouter(tags=["operations"])


@ops.get("/health")
async def health(gw: GatewayDep) -> dict:
    """Liveness: the backend is up."""
    rt = gw.backend.runtime
    return {
        "status": "ok",
        "backend": gw.backend.kind,
        "num_instances": len(rt.instances) if rt else 0,
        "num_in_flight": len(gw.jobs),
    }


@ops.get("/metrics", response_class=Response,
         responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """Prometheus exposition format."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


# -- admin --------------------------------------------------------------------------------------
admin_router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin)],
                         responses={401: {"model": ErrorResponse}})


def _plain(x):
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return _plain(x.to_dict())
    return jsonable_encoder(x, custom_encoder={float: lambda v: v if v == v and abs(v) != float("inf") else None})


@admin_router.get("/fleet")
async def admin_fleet(gw: GatewayDep) -> dict:
    """Instances, models, states and engine stats."""
    rt = gw.backend.runtime
    insts = []
    for inst in rt.instances:
        insts.append({
            "id": inst.id,
            "name": inst.spec.name,
            "gpu": inst.spec.gpu,
            "tp": inst.spec.tp,
            "model": inst.model,
            "state": inst.state.name,
            "swap_to": inst.swap_to,
            "num_swaps": inst.num_swaps,
            "num_evictions": inst.num_evictions,
            # health (down, restarts) and measured load times (None where not measured)
            "health": {"down": inst.engine.down, "num_downs": inst.engine.num_downs,
                       "num_restarts": inst.engine.num_restarts,
                       "last_start_s": inst.engine.last_start_s,
                       "last_swap_s": inst.engine.last_swap_s},
            "stats": _plain(inst.engine.stats()),
        })
    models = {
        m: {"max_context": gw.backend.max_context(m),
            "instances": [i.spec.name for i in rt.instances if i.model == m]}
        for m in gw.backend.models()
    }
    return {
        "backend": gw.backend.kind,
        "policy": gw.backend.policy.name,
        "classes": {n: c.model_dump() for n, c in gw.settings.classes.items()},
        "models": models,
        "instances": insts,
        "lso_counts": dict(rt.lso_counts),
        "num_outstanding": rt.num_outstanding,
    }


@admin_router.get("/plan")
async def admin_plan(gw: GatewayDep) -> dict:
    """The policy's current plan (``policy.current_plan()``) when it has one, else the queue
    state: requests per class, in the policy and in each engine's own queue."""
    policy = gw.backend.policy
    rt = gw.backend.runtime
    out: dict = {"policy": policy.name, "plan": _plain(policy.current_plan()),
                 "report": _plain(policy.report())}  # what /metrics exports
    out["queues"] = {
        "queued_by_class": dict(gw.queued_by_class),
        "in_flight_by_class": dict(gw.inflight_by_class),
        "policy_queued": policy.num_queued(),
        "instances": [
            {
                "name": i.spec.name,
                "model": i.model,
                "running": [r.id for r in i.engine.running_requests()],
                "waiting": [r.id for r in i.engine.waiting_requests()],
            }
            for i in rt.instances
        ],
    }
    return out


# -- errors and limits --------------------------------------------------------------------------
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|tuple)\[.*\]|constrained-.*|"
                       r"function-.*|literal\[.*\]|[A-Z]\w*)$")


def _loc(loc) -> str:
    """A validation error's field path, without pydantic's union-member tags and 'body'."""
    return ".".join(str(p) for p in loc if p != "body" and not _TYPE_TAG.match(str(p)))


def _install_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    async def api_error(request: Request, e: APIError) -> Response:
        metrics.http_errors[e.status] += 1
        return json_error(e.status, error_body(e.message, e.type, e.param, e.code), e.headers)

    async def qlm_error(request: Request, e: QLMError) -> Response:
        metrics.http_errors[400] += 1
        return json_error(400, error_body(str(e), "invalid_request_error"))

    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            # FastAPI puts the character offset where a field name would be
            loc = first.get("loc", ())
            at = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
            why = (first.get("ctx") or {}).get("error")
            metrics.http_errors[400] += 1
            return json_error(400, error_body(
                f"The request body is not valid JSON{at}" + (f": {why}" if why else "."),
                "invalid_request_error", None, "invalid_json"))
        metrics.http_errors[422] += 1
        param = _loc(first.get("loc", ())) or None
        msg = "; ".join(f"{_loc(x.get('loc', ())) or 'body'}: {x.get('msg', 'invalid')}"
                        for x in errs[:5])
        return json_error(422, error_body(msg, "invalid_request_error", param,
                                           "invalid_request"))

    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        metrics.http_errors[e.status_code] += 1
        t = ERROR_TYPES.get(e.status_code, "invalid_request_error")
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return json_error(e.status_code, error_body(str(e.detail), t, None, code),
                           getattr(e, "headers", None))

    async def unexpected(request: Request, e: Exception) -> Response:
        metrics.http_errors[500] += 1
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return json_error(500, error_body("internal server error", "server_error", None,
                                           "internal_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(QLMError, qlm_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over ``max_bytes`` (by Content-Length, or counted
    when the body is chunked) before anything parses them."""

    def __init__(self, app, max_bytes: int, metrics: ServerMetrics,
                 path_limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        # path -> a limit of its own (batch input files are larger than requests)
        self._by_path = {p: BodyLimit(app, n, metrics) for p, n in (path_limits or {}).items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        inner = self._by_path.get(scope.get("path"))
        if inner is not None:
            return await inner(scope, receive, send)
        length = None
        for k, v in scope["headers"]:
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    length = -1
                break
        if length is not None:
            if length > self.max_bytes or length < 0:
                return await self._reject(send, length < 0)
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body up to the limit, then replay it.
        chunks = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                return await self._reject(send, False)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        done = False

        async def replay():
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _reject(self, send, bad_length: bool) -> None:
        status = 400 if bad_length else 413
        self.metrics.http_errors[status] += 1
        msg = ("invalid Content-Length" if bad_length
               else f"request body larger than {self.max_bytes} bytes")
        body = error_bytes(status, msg, "invalid_request" if bad_length else "body_too_large")
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]})
        await send({"type": "http.response.body", "body": body})


def _openapi(app: FastAPI, settings: ServerSettings, models: list[str]) -> dict:
    """The generated schema, plus what this config allows: model names and SLO classes as
    enums, and the max_tokens cap (so that schema-valid requests are the ones we accept)."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                         routes=app.routes)
    comps = schema.get("components", {}).get("schemas", {})
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        props = comps.get(name, {}).get("properties", {})
        if "model" in props and models:
            props["model"]["enum"] = list(models)
        cap = settings.limits.max_tokens
        for f in ("max_tokens", "max_completion_tokens"):
            if cap is not None and f in props:
                for alt in props[f].get("anyOf", [props[f]]):
                    if alt.get("type") == "integer":
                        alt["maximum"] = cap
    for path in schema.get("paths", {}).values():
        for op in path.values():
            for prm in op.get("parameters", []):
                sch = prm.get("schema", {})
                if prm.get("in") == "header" and "anyOf" in sch:
                    # An optional header is absent, never "null": keep the value's schema.
                    alts = [a for a in sch["anyOf"] if a.get("type") != "null"]
                    if len(alts) == 1:
                        extra = {k: v for k, v in sch.items() if k not in ("anyOf", "default")}
                        sch = prm["schema"] = {**alts[0], **extra}
                if prm.get("name") == "x-slo-class":
                    sch["enum"] = list(settings.classes)
    patch_batch_openapi(schema, settings)
    app.openapi_schema = schema
    return schema


# -- the app ------------------------------------------------------------------------------------
def create_app(
    settings: ServerSettings | None = None, env: Mapping[str, str] | None = None
) -> FastAPI:
    """Build an app over its own backend. Config errors raise ``ConfigError`` here, before
    the server starts; the backend itself starts in the lifespan."""
    settings = settings or load_settings()
    env = os.environ if env is None else env
    keys = KeyStore.from_settings(settings, env)
    if keys.num_keys == 0 and keys.anonymous is None:
        raise QLMError(
            "no API keys configured: add [[auth.keys]] to the config, set "
            f"${settings.auth.keys_env}, or set auth.allow_unauthenticated = true"
        )
    metrics = ServerMetrics()
    backend = make_backend(settings)
    gateway = Gateway(settings, backend, metrics)
    batch = BatchService(settings, gateway, metrics.registry) if settings.batch.enabled else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        if batch is not None:
            await batch.start()  # resumes unfinished batch jobs
        log.info("qlm-opt serving %s backend, policy %s, models %s", backend.kind,
                 settings.backend.policy, ", ".join(backend.models()))
        try:
            yield
        finally:
            try:
                if batch is not None:
                    await batch.stop()
            finally:
                await gateway.stop()

    docs = settings.server.expose_docs
    app = FastAPI(
        title="qlm-opt",
        summary="OpenAI-compatible gateway with SLO-aware global queueing",
        version="0.1.0",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.settings = settings
    app.state.keys = keys
    app.state.metrics = metrics
    app.state.gateway = gateway
    app.state.batch = batch
    app.state.started_at = int(time.time())
    app.openapi = lambda: _openapi(app, settings, backend.models())
    app.include_router(inference)
    app.include_router(ops)
    app.include_router(admin_router)
    app.include_router(files_router)
    app.include_router(batches_router)
    _install_error_handlers(app, metrics)
    # Batch input files have their own size limit (plus room for the multipart envelope).
    app.add_middleware(BodyLimit, max_bytes=settings.server.max_body_bytes, metrics=metrics,
                       path_limits={"/v1/files": settings.batch.max_file_bytes + 65536})
    # The inference routes' common case without FastAPI's dependency solving (fastpath.py).
    if settings.server.fast_path:
        from qlm_opt.server.fastpath import FastInference

        app.add_middleware(FastInference, fastapi_app=app,
                           max_bytes=settings.server.max_body_bytes)
    return app
