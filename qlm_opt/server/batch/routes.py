"""OpenAI's Files and Batches routes (``/v1/files``, ``/v1/batches``).

Every object belongs to the tenant of the API key that created it; another tenant's id answers
404, as an unknown id does. The admin key sees and acts on every tenant's objects. A request
that is refused stores nothing: uploads are written to a temporary file that becomes the file
only after every check, and a batch and its validation errors are stored in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from qlm_opt.server.auth import Principal
from qlm_opt.server.batch.files import (
    ENDPOINTS,
    MAX_REPORTED_ERRORS,
    BatchInputError,
    check_input,
    new_file_id,
)
from qlm_opt.server.batch.runner import line_error_row
from qlm_opt.server.batch.service import BatchService
from qlm_opt.server.batch.store import ACTIVE_STATUSES, BatchRecord, FileRecord
from qlm_opt.server.errors import APIError
from qlm_opt.server.openai_protocol import ErrorResponse, dumps
from qlm_opt.server.settings import window_seconds

log = logging.getLogger(__name__)

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`")
_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 409, 413, 422, 429, 503)}
_COPY_CHUNK = 1 << 20


async def get_service(request: Request) -> BatchService:
    svc = getattr(request.app.state, "batch", None)
    if svc is None:
        raise APIError(404, "the Batch API is disabled on this server (batch.enabled)",
                       code="batch_disabled")
    try:
        await svc.ready()
    except Exception:
        log.exception("batch store unavailable")
        raise APIError(503, "the batch store is unavailable", code="store_unavailable") from None
    return svc


async def batch_principal(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The caller: a tenant's key, or the admin key (``is_admin``, sees every tenant)."""
    keys = request.app.state.keys
    if creds is None:
        if keys.anonymous is not None:
            return keys.anonymous
        raise APIError(401, "You didn't provide an API key. Use 'Authorization: Bearer <key>'.",
                       code="missing_api_key")
    if keys.is_admin(creds.credentials):
        settings = request.app.state.settings
        return Principal(tenant="admin", default_class=settings.default_class, is_admin=True,
                         name="admin")
    who = keys.lookup(creds.credentials)
    if who is None:
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    who.check_rate()
    return who


Who = Annotated[Principal, Depends(batch_principal)]
Service = Annotated[BatchService, Depends(get_service)]


def _json(obj: Any, status: int = 200) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json")


def _owner(who: Principal) -> str | None:
    """The tenant whose objects the caller sees; None: all (admin)."""
    return None if who.is_admin else who.tenant


def _visible(who: Principal, tenant: str) -> bool:
    return who.is_admin or who.tenant == tenant


# -- files --------------------------------------------------------------------------------------
files_router = APIRouter(tags=["files"], responses=_ERRORS)


async def _own_file(svc: BatchService, who: Principal, file_id: str) -> FileRecord:
    rec = await svc.store.get_file(file_id)
    if rec is None or not _visible(who, rec.tenant):
        raise APIError(404, f"No such File object: {file_id}", code="file_not_found",
                       param="file_id")
    return rec


@files_router.post("/v1/files")
async def upload_file(
    who: Who,
    svc: Service,
    file: Annotated[UploadFile, File(description="JSONL, one request per line")],
    purpose: Annotated[str, Form(description="only 'batch'")],
) -> Response:
    """Upload a batch input file (``purpose`` "batch", JSONL, at most ``batch.max_file_bytes``)."""
    if purpose != "batch":
        raise APIError(400, f"purpose '{purpose}' is not supported; this server stores "
                       "batch input files (purpose 'batch')", code="invalid_purpose",
                       param="purpose")
    limit = svc.settings.batch.max_file_bytes
    tmp = svc.storage.temp_path()
    size = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := await file.read(_COPY_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise APIError(413, f"the file is larger than {limit} bytes",
                                   code="file_too_large", param="file")
                out.write(chunk)
        fid = new_file_id()
        path = await asyncio.to_thread(svc.storage.commit, tmp, fid)
    except BaseException:
        svc.storage.remove(tmp)
        raise
    rec = FileRecord(id=fid, tenant=who.tenant, purpose=purpose,
                     filename=(file.filename or "input.jsonl")[:1024], bytes=size,
                     created_at=int(time.time()), path=str(path), created_ns=time.time_ns())
    try:
        await svc.store.add_file(rec)
    except BaseException:
        svc.storage.remove(path)
        raise
    return _json(rec.to_openai())


@files_router.get("/v1/files")
async def list_files(
    who: Who, svc: Service,
    purpose: str | None = None,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
) -> Response:
    """The caller's files, newest first."""
    recs = await svc.store.list_files(_owner(who), purpose, after, limit + 1)
    more = len(recs) > limit
    recs = recs[:limit]
    return _json({"object": "list", "data": [r.to_openai() for r in recs],
                  "first_id": recs[0].id if recs else None,
                  "last_id": recs[-1].id if recs else None, "has_more": more})


@files_router.get("/v1/files/{file_id}")
async def get_file(file_id: str, who: Who, svc: Service) -> Response:
    return _json((await _own_file(svc, who, file_id)).to_openai())


@files_router.get("/v1/files/{file_id}/content", response_class=Response,
                  responses={200: {"content": {"application/jsonl": {}}}})
async def file_content(file_id: str, who: Who, svc: Service) -> Response:
    """The file's bytes, streamed from disk."""
    rec = await _own_file(svc, who, file_id)
    return FileResponse(rec.path, media_type="application/jsonl", filename=rec.filename)


@files_router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, who: Who, svc: Service) -> Response:
    rec = await _own_file(svc, who, file_id)
    if await svc.store.file_in_use(file_id):
        raise APIError(409, f"file {file_id} is the input of a batch that has not finished",
                       code="file_in_use", param="file_id")
    await svc.store.delete_file(file_id)
    svc.storage.remove(rec.path)
    return _json({"id": file_id, "object": "file", "deleted": True})


# -- batches ------------------------------------------------------------------------------------
batches_router = APIRouter(tags=["batches"], responses=_ERRORS)


class CreateBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(min_length=1, max_length=64)
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = Field(None, max_length=16)


async def _own_batch(svc: BatchService, who: Principal, batch_id: str) -> BatchRecord:
    rec = await svc.store.get_batch(batch_id)
    if rec is None or not _visible(who, rec.tenant):
        raise APIError(404, f"No such Batch object: {batch_id}", code="batch_not_found",
                       param="batch_id")
    return rec


@batches_router.post("/v1/batches")
async def create_batch(body: CreateBatch, who: Who, svc: Service) -> Response:
    """Create a batch from an uploaded file. The file is checked line by line first; what
    refuses the whole file is a 400 and nothing is stored. Lines that cannot run (bad JSON,
    a body that is not a valid request) go to the error file with their line numbers."""
    cfg = svc.settings.batch
    if body.endpoint not in ENDPOINTS:
        raise APIError(400, f"endpoint '{body.endpoint}' is not supported; use one of "
                       f"{', '.join(ENDPOINTS)}", code="invalid_endpoint", param="endpoint")
    if body.completion_window not in cfg.completion_windows:
        raise APIError(400, f"completion_window '{body.completion_window}' is not allowed; "
                       f"this server accepts {', '.join(cfg.completion_windows)}",
                       code="invalid_completion_window", param="completion_window")
    if body.metadata:
        for k, v in body.metadata.items():
            if len(k) > 64 or len(v) > 512:
                raise APIError(400, "metadata keys are at most 64 characters and values at "
                               "most 512", code="invalid_metadata", param="metadata")
    f = await svc.store.get_file(body.input_file_id)
    if f is None or not _visible(who, f.tenant):
        raise APIError(404, f"No such File object: {body.input_file_id}",
                       code="file_not_found", param="input_file_id")
    if f.purpose != "batch":
        raise APIError(400, f"file {f.id} has purpose '{f.purpose}', not 'batch'",
                       code="invalid_input_file", param="input_file_id")
    try:
        checked = await asyncio.to_thread(check_input, f.path, body.endpoint, svc.known_model,
                                          cfg.max_lines)
    except BatchInputError as e:
        raise APIError(400, str(e), code=e.code, param=e.param) from None
    except FileNotFoundError:
        raise APIError(404, f"the content of file {f.id} is gone", code="file_not_found",
                       param="input_file_id") from None
    now_ns = time.time_ns()
    now = now_ns // 1_000_000_000
    bid = "batch_" + uuid.uuid4().hex
    errors = [{"code": e.code, "message": e.message, "param": e.param, "line": e.line_no}
              for e in checked.errors[:MAX_REPORTED_ERRORS]]
    rec = BatchRecord(
        id=bid, tenant=f.tenant if who.is_admin else who.tenant, input_file_id=f.id,
        endpoint=body.endpoint, completion_window=body.completion_window,
        status="in_progress", num_lines=checked.num_lines, created_at=now, created_ns=now_ns,
        in_progress_at=now, expires_at=now + window_seconds(body.completion_window),
        metadata=body.metadata, errors=errors or None,
    )
    await svc.store.add_batch(rec, [line_error_row(bid, e) for e in checked.errors])
    rec.num_failed = len(checked.errors)
    svc.metrics.lines.labels("failed").inc(len(checked.errors))
    svc.runner.launch(rec)
    await svc.runner.refresh_counts()
    log.info("batch %s: %d lines (%d invalid), window %s, tenant %s", bid, rec.num_lines,
             len(checked.errors), rec.completion_window, rec.tenant)
    return _json(rec.to_openai())


@batches_router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, who: Who, svc: Service) -> Response:
    return _json((await _own_batch(svc, who, batch_id)).to_openai())


@batches_router.get("/v1/batches")
async def list_batches(
    who: Who, svc: Service,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> Response:
    """The caller's batches, newest first; ``after`` is the last id of the previous page."""
    recs = await svc.store.list_batches(_owner(who), after, limit + 1)
    more = len(recs) > limit
    recs = recs[:limit]
    return _json({"object": "list", "data": [r.to_openai() for r in recs],
                  "first_id": recs[0].id if recs else None,
                  "last_id": recs[-1].id if recs else None, "has_more": more})


@batches_router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, who: Who, svc: Service) -> Response:
    """Stop a batch: queued lines leave the queue, running lines finish and keep their
    results; the batch is ``cancelling`` until its files are written, then ``cancelled``."""
    rec = await _own_batch(svc, who, batch_id)
    if rec.status not in ACTIVE_STATUSES:
        raise APIError(409, f"cannot cancel a batch with status '{rec.status}'",
                       code="invalid_batch_status", param="batch_id")
    if rec.status != "cancelling":
        changed = await svc.store.set_status(batch_id, "cancelling",
                                             only_from=("validating", "in_progress"),
                                             cancelling_at=int(time.time()))
        if changed:
            svc.runner.cancel(batch_id)
            await svc.runner.refresh_counts()
    rec = await svc.store.get_batch(batch_id)
    return _json(rec.to_openai())


# -- 405 with the right Allow header ------------------------------------------------------------
# Starlette answers a method no route of a path takes with the Allow header of the first route
# it tried, so a path served by two routes (GET and POST /v1/files) would list one method.
_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


def _not_allowed(router: APIRouter, path: str, allowed: tuple[str, ...]) -> None:
    async def not_allowed() -> Response:
        raise StarletteHTTPException(405, "Method Not Allowed",
                                     headers={"Allow": ", ".join(allowed)})

    others = [m for m in _METHODS if m not in allowed and not (m == "HEAD" and "GET" in allowed)]
    router.add_api_route(path, not_allowed, methods=others, include_in_schema=False)


_not_allowed(files_router, "/v1/files", ("GET", "POST"))
_not_allowed(files_router, "/v1/files/{file_id}", ("GET", "DELETE"))
_not_allowed(batches_router, "/v1/batches", ("GET", "POST"))


def patch_openapi(schema: dict, settings) -> None:
    """What this config accepts, as enums in the generated schema (so that schema-valid
    requests are the ones the routes take): the endpoints, the allowed completion windows,
    and the upload purpose."""
    comps = schema.get("components", {}).get("schemas", {})
    props = comps.get("CreateBatch", {}).get("properties", {})
    if "endpoint" in props:
        props["endpoint"]["enum"] = list(ENDPOINTS)
    if "completion_window" in props:
        props["completion_window"]["enum"] = list(settings.batch.completion_windows)
    for s in comps.values():
        p = s.get("properties", {})
        if "file" in p and "purpose" in p:
            p["purpose"]["enum"] = ["batch"]
