"""The gateway: admission, SLO classes, request tracking, streaming and cancellation between
the HTTP routes and the runtime. Everything here runs on the event loop.

Lifecycle of a request:
  admit (class, limits, bounded class queue) -> ``runtime.accept`` + ``policy.on_arrival``
  -> engine events through the runtime's hooks (first token, finished, dropped)
  -> the route answers (JSON) or streams (SSE); a client that goes away cancels it.

Class queues are bounded: a class holds at most ``max_queue`` admitted requests without a first
token; beyond that the gateway answers 429 with a ``Retry-After`` from the RWT estimator: the
predicted wait of a request at the back of its class's queue for its model
(``qlm_opt.server.admission``).

Cancellation (client disconnect) frees capacity at once through ``Runtime.cancel``: a request
in an engine is aborted there, one in the policy's queue is taken out with
``policy.remove(req)``; either way it ends as DROPPED with reason ``cancelled`` and the policy
is not told it finished.

Streams read the backend's progress: simulated engines are polled by one timer for all streams
(every ``stream_interval_ms``); backends that push progress (real vLLM engines, whose tokens
arrive as events) wake the stream of a request as its tokens arrive.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import AsyncIterator, Callable

from qlm_opt.domain import Request, RequestState
from qlm_opt.server.admission import check_limits, retry_after_s
from qlm_opt.server.auth import Principal
from qlm_opt.server.backends import Backend
from qlm_opt.server.errors import APIError
from qlm_opt.server.metrics import ServerMetrics
from qlm_opt.server.openai_protocol import ChunkWriter, usage
from qlm_opt.server.settings import ServerSettings

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """The client disconnected; the request was cancelled."""


class Job:
    """One admitted request as the gateway tracks it."""

    __slots__ = ("req", "fut", "wake", "sent", "seen", "queued", "ended", "cancelled",
                 "max_tokens_given")

    def __init__(self, req: Request, fut: asyncio.Future, max_tokens_given: bool) -> None:
        # max_tokens_given: a simulated engine generated exactly max_tokens (finish "length");
        # real engines report their own finish reason, so they pass False.
        self.req = req
        self.fut = fut  # resolved when the request ends (finished, dropped or cancelled)
        self.wake: asyncio.Event | None = None  # streams: set when tokens or the end arrive
        self.sent = 0  # output tokens already streamed
        self.seen = 0  # output tokens the pump last saw
        self.queued = True  # counted in queued_by_class (no first token yet)
        self.ended = False
        self.cancelled = False
        self.max_tokens_given = max_tokens_given

    def finish_reason(self) -> str:
        r = self.req
        if r.finish_reason == "length" or self.max_tokens_given:
            return "length"
        return r.finish_reason or "stop"


class Gateway:
    """See the module docstring."""

    def __init__(self, settings: ServerSettings, backend: Backend, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self.jobs: dict[int, Job] = {}  # request id -> job
        self.queued_by_class: dict[str, int] = dict.fromkeys(settings.classes, 0)
        self.inflight_by_class: dict[str, int] = dict.fromkeys(settings.classes, 0)
        # (class, model) -> admitted requests without a first token (for Retry-After)
        self.queued_by_class_model: dict[tuple[str, str], int] = {}
        self._ids = itertools.count(1)
        self._streams: set[Job] = set()
        self._pump: asyncio.Task | None = None
        self._interval_s = settings.server.stream_interval_ms / 1000.0
        # priority -> class name, for vLLM's ``priority`` field
        self._by_priority = sorted((c.priority, n) for n, c in settings.classes.items())
        self.retry_estimator = None  # admission's own estimator, for policies without one
        metrics.bind(self)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        await self.backend.start()
        rt = self.backend.runtime
        rt.first_token_hooks.append(self._on_first_token)
        rt.finish_hooks.append(self._on_finished)
        rt.drop_hooks.append(self._on_dropped)
        if self.backend.pushes_progress:
            self.backend.on_progress = self._on_progress
        self.loop = asyncio.get_running_loop()

    async def stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
        for job in list(self.jobs.values()):
            self._end(job, cancelled=True)
        await self.backend.stop()

    # -- admission ----------------------------------------------------------------------------
    async def prepare(self, model: str, prompt: object, chat: bool) -> list[int] | None:
        """The exact prompt token ids, from backends with a tokenizer (real vLLM engines);
        None for the simulated fleet (admission then uses the approximate count). Raises
        APIError: 404 unknown model, 400 a prompt the model's tokenizer cannot take."""
        backend = self.backend
        if not backend.tokenizes:
            return None
        try:
            backend.max_context(model)
        except KeyError:
            raise APIError(404, f"The model '{model}' does not exist",
                           code="model_not_found", param="model") from None
        try:
            return await backend.prepare_prompt(model, prompt, chat)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"invalid prompt: {e}", code="invalid_prompt",
                           param="messages" if chat else "prompt") from None

    def resolve_class(
        self,
        who: Principal,
        header_class: str | None,
        header_ttft_ms: float | str | None,
        priority: int | None,
    ) -> tuple[str, float]:
        """SLO class and TTFT target (s). Precedence: ``x-slo-class``, then vLLM's
        ``priority`` (the class with that priority, else the nearest less urgent one), then the
        key's default class. ``x-slo-ttft-ms`` overrides the target; without an explicit class
        it also picks the tightest class whose target is at least that long."""
        classes = self.settings.classes
        ttft_s = None
        if header_ttft_ms is not None:
            try:
                ms = float(header_ttft_ms)
            except ValueError:
                ms = -1.0
            if not (ms > 0 and math.isfinite(ms)):
                raise APIError(400, "x-slo-ttft-ms must be a positive number of milliseconds",
                               code="invalid_slo", param="x-slo-ttft-ms")
            ttft_s = max(ms / 1000.0, 1e-6)
        if header_class is not None:
            if header_class not in classes:
                raise APIError(
                    400, f"unknown SLO class '{header_class}' (known: {', '.join(classes)})",
                    code="invalid_slo_class", param="x-slo-class",
                )
            name = header_class
        elif priority is not None:
            name = self._by_priority[-1][1]
            for p, n in self._by_priority:
                if p >= priority:
                    name = n
                    break
        elif ttft_s is not None:
            fits = [(c.ttft_s, n) for n, c in classes.items() if c.ttft_s >= ttft_s]
            name = min(fits)[1] if fits else max((c.ttft_s, n) for n, c in classes.items())[1]
        else:
            name = who.default_class
        if who.classes is not None and name not in who.classes:
            raise APIError(403, f"this API key may not use SLO class '{name}'",
                           code="slo_class_not_allowed", param="x-slo-class")
        return name, ttft_s if ttft_s is not None else classes[name].ttft_s

    def admit(
        self,
        who: Principal,
        model: str,
        slo_class: str,
        ttft_s: float,
        prompt_tokens: int,
        max_tokens: int | None,
        prompt: object,
        params: dict,
    ) -> Job:
        """Check limits and hand a new request to the policy. Raises APIError (404 unknown
        model, 413 prompt too long, 400 context exceeded, 429 class queue full)."""
        backend = self.backend
        ctx = check_limits(self.settings, backend, model, prompt_tokens, max_tokens)
        lim = self.settings.limits
        cls = self.settings.classes[slo_class]
        if self.queued_by_class[slo_class] >= cls.max_queue:
            self.metrics.on_rejected(slo_class)
            try:
                after = retry_after_s(self, model, slo_class, prompt_tokens)
            except Exception:  # an estimate must never turn a 429 into a 500
                log.exception("Retry-After estimate failed")
                after = 1
            raise APIError(
                429, f"the queue of SLO class '{slo_class}' is full; retry later",
                code="queue_full", headers={"Retry-After": str(after)},
            )
        cap = ctx - prompt_tokens
        default = self.settings.server.default_max_tokens
        if lim.max_tokens is not None:
            default = min(default, lim.max_tokens)
        out = backend.output_tokens(max_tokens, cap if max_tokens is not None else min(cap, default))
        rt = backend.runtime
        now = rt.now()
        req = Request(
            id=next(self._ids),
            model=model,
            slo_class=slo_class,
            prompt_tokens=max(1, prompt_tokens),
            output_tokens=out,
            arrived_at=now,
            deadline_at=now + ttft_s,
            tpot_s=cls.tpot_s,
            priority=cls.priority,
            tenant=who.tenant,
        )
        backend.attach(req, prompt, params)
        synthetic = backend.kind == "simulated"
        job = Job(req, self.loop.create_future(), synthetic and max_tokens is not None)
        self.jobs[req.id] = job
        self.queued_by_class[slo_class] += 1
        cm = self.queued_by_class_model
        cm[(slo_class, model)] = cm.get((slo_class, model), 0) + 1
        self.inflight_by_class[slo_class] += 1
        rt.accept(req)
        try:
            backend.policy.on_arrival(req)
        except Exception:
            log.exception("policy failed to take request %d", req.id)
            self._end(job, cancelled=True)
            rt.drop(req, "policy_error")
            raise APIError(503, "the scheduler could not take the request", code="server_error")
        return job

    # -- runtime hooks ------------------------------------------------------------------------
    def _dequeue(self, job: Job) -> None:
        if job.queued:
            job.queued = False
            req = job.req
            self.queued_by_class[req.slo_class] -= 1
            self.queued_by_class_model[(req.slo_class, req.model)] -= 1

    def _end(self, job: Job, cancelled: bool = False) -> None:
        if job.ended:
            return
        job.ended = True
        job.cancelled = cancelled
        self._dequeue(job)
        self.inflight_by_class[job.req.slo_class] -= 1
        self.jobs.pop(job.req.id, None)
        self.backend.detach(job.req)
        if not job.fut.done():
            job.fut.set_result(None)
        if job.wake is not None:
            job.wake.set()

    def _on_first_token(self, req: Request) -> None:
        if req.state == RequestState.DROPPED:  # cancelled before the event was delivered
            return
        self.metrics.on_first_token(req)
        job = self.jobs.get(req.id)
        if job is not None:
            self._dequeue(job)
            if job.wake is not None:
                job.wake.set()

    def _on_finished(self, req: Request) -> None:
        self.metrics.on_finished(req)
        job = self.jobs.get(req.id)
        if job is not None:
            self._end(job)

    def _on_dropped(self, req: Request) -> None:
        job = self.jobs.get(req.id)
        cancelled = req.drop_reason == "cancelled"
        self.metrics.on_dropped(req, cancelled)
        if job is not None:
            self._end(job, cancelled=cancelled)

    def _on_progress(self, req: Request) -> None:
        """Backends that push progress: new tokens (or the end) of ``req``."""
        job = self.jobs.get(req.id)
        if job is not None and job.wake is not None:
            job.wake.set()

    # -- cancellation -------------------------------------------------------------------------
    def cancel(self, job: Job) -> None:
        """The client went away: free the request's capacity (see the module docstring)."""
        if job.ended:
            return
        req = job.req
        self._end(job, cancelled=True)
        if not req.is_done:
            try:
                self.backend.runtime.cancel(req)
            except Exception:
                log.exception("cancelling request %d failed", req.id)

    # -- waiting and streaming ----------------------------------------------------------------
    async def wait(self, job: Job, receive: Callable) -> None:
        """Wait until the request ends; cancel it if the client disconnects first."""
        if not job.fut.done():
            watcher = self.loop.create_task(_wait_disconnect(receive))
            watcher.add_done_callback(lambda t: t.cancelled() or self.cancel(job))
            try:
                await job.fut
            finally:
                watcher.cancel()
        if job.cancelled:
            raise ClientGone()
        self._raise_if_dropped(job)

    def _raise_if_dropped(self, job: Job) -> None:
        req = job.req
        if req.state == RequestState.DROPPED:
            reason = req.drop_reason or "dropped"
            if reason == "prompt_too_long":
                raise APIError(413, "the prompt does not fit the model's context on the "
                               "instance that took it", code="prompt_too_long", param="prompt")
            raise APIError(503, f"the request was dropped by the scheduler ({reason})",
                           code=reason)

    def text(self, job: Job) -> str:
        return self.backend.text(job.req, 0, job.req.num_generated)

    async def stream(self, job: Job, writer: ChunkWriter) -> AsyncIterator[bytes]:
        """SSE chunks at the pace tokens are produced. Runs inside the response; if the
        client disconnects the response cancels this generator, which cancels the request."""
        job.wake = asyncio.Event()
        backend = self.backend
        if not backend.pushes_progress:
            self._streams.add(job)
            if self._pump is None or self._pump.done():
                self._pump = self.loop.create_task(self._run_pump())
        try:
            if writer.chat:
                yield writer.role()
            last = b""  # the tokens found at the end go out with the end, in one write
            while True:
                job.wake.clear()
                ended = job.ended
                n = job.req.num_generated if ended else backend.progress(job.req)
                if n > job.sent:
                    chunk = writer.delta(backend.text(job.req, job.sent, n))
                    job.sent = n
                    if ended:
                        last = chunk
                    else:
                        yield chunk
                if ended:
                    break
                await job.wake.wait()
            if job.req.state == RequestState.DROPPED:
                try:
                    self._raise_if_dropped(job)
                except APIError as e:
                    yield last + ChunkWriter.error(e.status, e.message, e.type, e.code)
                return
            yield last + writer.finish(job.finish_reason(), usage(job.req.prompt_tokens, job.sent))
        finally:
            self._streams.discard(job)
            if not job.ended:
                self.cancel(job)

    async def _run_pump(self) -> None:
        """One timer for all streams: bring their engines up to date every interval and wake
        the streams that have new tokens."""
        backend = self.backend
        streams = self._streams
        while streams:
            await asyncio.sleep(self._interval_s)
            live = [j for j in streams if not j.ended and not j.queued]
            if not live:
                continue
            try:
                backend.poll([j.req for j in live])
            except Exception:
                log.exception("polling engines failed")
            for j in live:
                n = backend.progress(j.req)
                if n != j.seen:
                    j.seen = n
                    j.wake.set()


async def _wait_disconnect(receive: Callable) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
