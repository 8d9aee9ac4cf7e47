"""The batch job runner: feeds each job's lines into the global queue and commits results.

One asyncio task per job with work left. It reads the input file one line at a time and keeps
a bounded number of its lines admitted (refilled as they end), each a request of the batch
class (``settings.batch_class()``) whose deadline is the end of the job's window; the policy
schedules them like any other request. How many, and when, follows ``FeedRule``
(``qlm_opt.whatif.batch_jobs``, the one implementation, which what-if runs apply too):

- pace: enough lines in flight to finish by ``batch.pace_fraction`` of the window, by Little's
  law on the job's mean line latency so far, at least ``batch.min_lines_in_flight``;
- backpressure: the fleet has absorbed a request once it has its first token; a line is fed
  only while the requests of its model without one (every job's lines and interactive
  requests alike) are fewer than ``batch.prefills_per_instance`` per instance serving it;
- seats: at most the seats of the instances serving the model (``max_num_seqs``, or fewer
  when the KV cache holds fewer lines of the job's mean size), or ``batch.max_lines_in_flight``
  when set;
- gate: new lines only while every more urgent class's oldest request without a first token
  has waited less than ``batch.urgent_wait_fraction`` of its TTFT target.

Durability: a line's result is buffered and committed to the store in groups (every
``batch.commit_interval_ms``); it counts only once committed. On start the runner resumes every
unfinished job, skipping lines with a committed result, so a line whose result was lost with a
killed server runs again and each ``custom_id`` is written exactly once.

Endings:
- every line has a result: ``finalizing``, then ``completed`` with the output and error files;
- the window ends first: lines in flight are cancelled, and every line without a result is
  written as a ``batch_expired`` error; status ``expired``;
- the client cancels: queued lines are taken out of the queue, running ones finish and keep
  their results; lines not run are written as ``batch_cancelled`` errors; status ``cancelled``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from qlm_opt.domain import RequestState
from qlm_opt.server.auth import Principal
from qlm_opt.server.batch.files import (
    FileStorage,
    LineError,
    ParsedLine,
    iter_lines,
    parse_line,
)
from qlm_opt.server.batch.metrics import BatchMetrics
from qlm_opt.server.batch.store import BatchRecord, BatchStore, FileRecord, ResultRow
from qlm_opt.server.errors import APIError, error_body
from qlm_opt.server.gateway import Gateway, Job
from qlm_opt.server.openai_protocol import (
    chat_body,
    chat_prompt_tokens,
    completion_body,
    completion_prompt_tokens,
    new_id,
    usage,
)
from qlm_opt.server.settings import ServerSettings, window_seconds
from qlm_opt.core.batch_feed import FeedRule, Footprint, LineLatency, fleet_seats

log = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
_EXPIRED_MSG = "This request could not be executed before the completion window expired."
_CANCELLED_MSG = "This request was not executed because the batch was cancelled."


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output (``kind`` "output") or error file: fixed per batch, so a
    finalization that is repeated after a crash replaces the same file."""
    return "file-" + uuid.uuid5(uuid.NAMESPACE_URL, f"qlm-opt/{batch_id}/{kind}").hex


def _line_id(batch_id: str, line_no: int) -> str:
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line_no}"


def error_line(batch_id: str, line_no: int, custom_id: str | None, code: str, message: str,
               status: int | None = None, param: str | None = None) -> ResultRow:
    """An error-file line. With ``status`` the request ran and the server answered an error
    (``response`` carries it); without, it never ran (``error`` says why)."""
    if status is not None:
        t = "invalid_request_error" if status < 500 else "server_error"
        obj = {"id": _line_id(batch_id, line_no), "custom_id": custom_id,
               "response": {"status_code": status, "request_id": None,
                            "body": error_body(message, t, param, code)},
               "error": None}
    else:
        err = {"code": code, "message": message, "line": line_no}
        if param is not None:
            err["param"] = param
        obj = {"id": _line_id(batch_id, line_no), "custom_id": custom_id, "response": None,
               "error": err}
    return ResultRow(line_no, custom_id, False, json.dumps(obj, ensure_ascii=False))


def line_error_row(batch_id: str, e: LineError) -> ResultRow:
    return error_line(batch_id, e.line_no, e.custom_id, e.code, e.message, param=e.param)


@dataclass(slots=True)
class _JobState:
    rec: BatchRecord
    inflight: dict[int, Job] = field(default_factory=dict)  # line -> admitted request
    latency: LineLatency = field(default_factory=LineLatency)  # wall s, admission to end
    footprint: Footprint = field(default_factory=Footprint)  # prompt and output tokens
    slot: asyncio.Event = field(default_factory=asyncio.Event)  # set when a line ends
    cancelled: bool = False
    expired: bool = False
    timer: asyncio.TimerHandle | None = None

    @property
    def halted(self) -> bool:
        return self.cancelled or self.expired


class BatchRunner:
    """See the module docstring. ``start`` after the gateway has started, ``stop`` before
    it stops; both on the server's event loop."""

    def __init__(self, settings: ServerSettings, store: BatchStore, storage: FileStorage,
                 gateway: Gateway, metrics: BatchMetrics) -> None:
        self.settings = settings
        self.cfg = settings.batch
        self.store = store
        self.storage = storage
        self.gateway = gateway
        self.metrics = metrics
        self.slo_class = settings.batch_class()
        batch_prio = settings.classes[self.slo_class].priority
        # class -> TTFT target (s), of the classes more urgent than batch lines
        self._urgent = {n: c.ttft_s for n, c in settings.classes.items()
                        if c.priority < batch_prio}
        c = self.cfg
        self._rule = feed_rule(c)
        self._jobs: dict[str, _JobState] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._buffer: list[tuple[str, ResultRow]] = []
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task | None = None
        self._urgent_checked_at = -1.0
        self._urgent_ok = True
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        for rec in await self.store.active_batches():
            log.info("batch %s: resuming (%s)", rec.id, rec.status)
            self.launch(rec)
        self.metrics.jobs_by_status = await self.store.count_by_status()
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def stop(self) -> None:
        """Stop feeding, cancel lines in flight (they run again after a restart) and commit
        the results already buffered."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        try:
            await self.flush()
        except Exception:
            log.exception("batch: committing buffered results at shutdown failed")

    def launch(self, rec: BatchRecord) -> None:
        """Run (or resume) a job in its own task."""
        if rec.id in self._tasks or self._stopping:
            return
        st = _JobState(rec, cancelled=rec.status == "cancelling")
        self._jobs[rec.id] = st
        task = asyncio.get_running_loop().create_task(self._run(st), name=f"batch {rec.id}")
        self._tasks[rec.id] = task

        def done(t: asyncio.Task, bid: str = rec.id) -> None:
            self._tasks.pop(bid, None)
            self._jobs.pop(bid, None)
            if not t.cancelled() and t.exception() is not None:
                log.error("batch %s: runner failed", bid, exc_info=t.exception())

        task.add_done_callback(done)

    def cancel(self, batch_id: str) -> None:
        """The client cancelled (the store already says ``cancelling``): take queued lines
        out of the queue; running lines finish and keep their results."""
        st = self._jobs.get(batch_id)
        if st is None:
            return
        st.cancelled = True
        st.slot.set()
        for job in list(st.inflight.values()):
            if job.queued:
                self.gateway.cancel(job)

    def _expire(self, st: _JobState) -> None:
        """The window ended: every line in flight stops; none of them counts."""
        st.expired = True
        st.slot.set()
        log.info("batch %s: completion window ended with %d lines in flight", st.rec.id,
                 len(st.inflight))
        for job in list(st.inflight.values()):
            self.gateway.cancel(job)

    # -- one job ------------------------------------------------------------------------------
    async def _run(self, st: _JobState) -> None:
        rec = st.rec
        loop = asyncio.get_running_loop()
        left_s = rec.expires_at - time.time()
        try:
            if rec.status in ("validating", "in_progress") and not st.cancelled:
                if left_s <= 0:
                    st.expired = True
                else:
                    st.timer = loop.call_later(left_s, self._expire, st)
                    await self._feed(st)
            if st.timer is not None:
                st.timer.cancel()
            await self._commit_all()
            if st.cancelled:
                final = "cancelled"
            elif st.expired:
                final = "expired"
            else:
                final = "completed"
            await self._finalize(st, final)
        except asyncio.CancelledError:
            if st.timer is not None:
                st.timer.cancel()
            raise

    async def _feed(self, st: _JobState) -> None:
        rec = st.rec
        done = await self.store.done_lines(rec.id)
        path = self.storage.path(rec.input_file_id)
        tasks: set[asyncio.Task] = set()
        loop = asyncio.get_running_loop()
        lines_left = max(0, rec.num_lines - len(done))
        window_s = rec.expires_at - rec.created_at
        gate_poll_s = self.cfg.commit_interval_ms / 1000.0

        def line_ended(t: asyncio.Task) -> None:
            tasks.discard(t)
            st.slot.set()

        try:
            for line_no, raw in iter_lines(path):
                if line_no in done:
                    continue
                if st.halted:
                    break
                p = parse_line(line_no, raw, rec.endpoint)
                if isinstance(p, LineError):  # stored at creation; kept for a changed file
                    lines_left -= 1
                    self._emit(rec.id, line_error_row(rec.id, p))
                    continue
                while not st.halted:  # wait for the rule to allow one more
                    room = self._room(st, p.body.model, lines_left, len(tasks), window_s)
                    if room and self._may_feed():
                        break
                    st.slot.clear()
                    try:
                        # the target grows as the window runs out, the fleet absorbs lines
                        # (first tokens), the gate opens as interactive requests start: look
                        # again after a while
                        await asyncio.wait_for(st.slot.wait(), gate_poll_s)
                    except TimeoutError:
                        pass
                if st.halted:
                    break
                lines_left -= 1
                t = loop.create_task(self._run_line(st, p))
                tasks.add(t)
                t.add_done_callback(line_ended)
            if tasks:
                await asyncio.gather(*list(tasks))
        finally:
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)

    def _room(self, st: _JobState, model: str, lines_left: int, in_flight: int,
              window_s: float) -> bool:
        """The pace, the seats and the backpressure of ``FeedRule`` allow one more line of
        ``model`` (wall clock; the fleet as the runtime sees it now)."""
        rt = self.gateway.backend.runtime
        instances = rt.ready_instances(model)
        target = self._rule.target_in_flight(
            lines_left, time.time(), st.rec.created_at, window_s, st.latency.mean_s,
            fleet_seats(instances, st.footprint.mean))
        if in_flight >= target:
            return False
        # requests of the model admitted without a first token: every job's lines and the
        # interactive (or any other) requests waiting for their prefill
        unstarted = sum(1 for j in self.gateway.jobs.values()
                        if j.req.model == model and j.req.first_token_at is None)
        return self._rule.fleet_ok(unstarted, len(instances))

    def _may_feed(self) -> bool:
        """False while a more urgent class has a request waiting for its first token longer
        than ``urgent_wait_fraction`` of its target (checked at most every commit interval)."""
        if not self._urgent:
            return True
        gw = self.gateway
        rt = gw.backend.runtime
        now = rt.now()
        if now - self._urgent_checked_at < self.cfg.commit_interval_ms / 1000.0 * _speedup(gw):
            return self._urgent_ok
        self._urgent_checked_at = now
        ok = True
        if any(gw.queued_by_class.get(n, 0) for n in self._urgent):
            ok = self._rule.urgent_ok(now, (j.req for j in gw.jobs.values() if j.queued),
                                      self._urgent)
        self._urgent_ok = ok
        return ok

    async def _run_line(self, st: _JobState, p: ParsedLine) -> None:
        rec = st.rec
        attempts = 0
        while not st.halted:
            try:
                job = await self._admit(st, p)
            except APIError as e:
                if st.halted:
                    return  # expired or cancelled while being admitted: no result
                if e.status == 429:  # the batch class's queue is full: wait for room
                    await asyncio.sleep(0.05)
                    continue
                self._emit(rec.id, error_line(rec.id, p.line_no, p.custom_id, e.code or "error",
                                              e.message, status=e.status, param=e.param))
                return
            st.inflight[p.line_no] = job
            self.metrics.lines_in_flight += 1
            try:
                await asyncio.shield(job.fut)
            finally:
                st.inflight.pop(p.line_no, None)
                self.metrics.lines_in_flight -= 1
                if not job.ended:  # this task was cancelled (shutdown)
                    self.gateway.cancel(job)
            if job.cancelled:
                return  # expired, cancelled or stopping: the line has no result
            req = job.req
            if req.completed_at is not None:
                st.latency.add((req.completed_at - req.arrived_at) / _speedup(self.gateway))
                st.footprint.add(req.prompt_tokens, req.num_generated)
            if req.state == RequestState.DROPPED:
                attempts += 1
                reason = req.drop_reason or "dropped"
                if attempts < self.cfg.max_attempts and reason != "prompt_too_long":
                    continue
                status = 413 if reason == "prompt_too_long" else 503
                self._emit(rec.id, error_line(
                    rec.id, p.line_no, p.custom_id, reason,
                    f"the request was dropped by the scheduler ({reason})", status=status))
                return
            self._emit(rec.id, self._output_line(st, p, job))
            return

    async def _admit(self, st: _JobState, p: ParsedLine) -> Job:
        """Admit one line as a request of the batch class (see ``app._serve``)."""
        gw = self.gateway
        rec = st.rec
        body = p.body
        chat = rec.endpoint == CHAT
        simulated = gw.backend.kind == "simulated"
        if chat:
            n = chat_prompt_tokens(body.messages)
            max_tokens = body.max_completion_tokens or body.max_tokens
            prompt = None if simulated else [m.model_dump(exclude_none=True)
                                             for m in body.messages]
        else:
            n = completion_prompt_tokens(body.prompt)
            max_tokens = body.max_tokens
            prompt = body.prompt
        params = {} if simulated else body.model_dump(
            exclude={"messages", "prompt", "stream", "stream_options"}, exclude_none=True)
        ids = await gw.prepare(body.model, prompt, chat)
        if ids is not None:
            prompt, n = ids, len(ids)
        if st.halted:
            raise APIError(409, "halted", code="halted")
        who = Principal(tenant=rec.tenant, default_class=self.slo_class)
        # The deadline is the window's end, on the scheduler's clock.
        left_s = max(rec.expires_at - time.time(), 1e-3)
        return gw.admit(who, body.model, self.slo_class, left_s * _speedup(gw), n, max_tokens,
                        prompt, params)

    def _output_line(self, st: _JobState, p: ParsedLine, job: Job) -> ResultRow:
        gw = self.gateway
        chat = st.rec.endpoint == CHAT
        rid = new_id("chatcmpl" if chat else "cmpl")
        req = job.req
        build = chat_body if chat else completion_body
        content = build(rid, p.body.model, gw.text(job), job.finish_reason(),
                        usage(req.prompt_tokens, req.num_generated), gw.backend.fingerprint)
        obj = {"id": _line_id(st.rec.id, p.line_no), "custom_id": p.custom_id,
               "response": {"status_code": 200, "request_id": rid,
                            "body": json.loads(content)},
               "error": None}
        return ResultRow(p.line_no, p.custom_id, True, json.dumps(obj, ensure_ascii=False))

    # -- results ------------------------------------------------------------------------------
    def _emit(self, batch_id: str, row: ResultRow) -> None:
        self._buffer.append((batch_id, row))

    async def flush(self) -> None:
        """Commit buffered results (one transaction per job)."""
        async with self._flush_lock:
            if not self._buffer:
                return
            rows, self._buffer = self._buffer, []
            by_job: dict[str, list[ResultRow]] = {}
            for bid, r in rows:
                by_job.setdefault(bid, []).append(r)
            for bid, rs in by_job.items():
                try:
                    await self.store.add_results(bid, rs)
                except Exception:
                    # Not committed: keep them for the next try (they have not counted yet).
                    self._buffer.extend((bid, r) for r in rs)
                    raise
                ok = sum(1 for r in rs if r.ok)
                self.metrics.lines.labels("completed").inc(ok)
                self.metrics.lines.labels("failed").inc(len(rs) - ok)

    async def _commit_all(self) -> None:
        """Commit every buffered result, retrying while the store fails (a job is finalized
        only from committed results)."""
        delay_s = 0.1
        while True:
            try:
                await self.flush()
                return
            except Exception:
                log.exception("batch: committing results failed; retrying in %.1f s", delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(2 * delay_s, 5.0)

    async def refresh_counts(self) -> None:
        """Re-read jobs by status for the metrics (after a change of status)."""
        self.metrics.jobs_by_status = await self.store.count_by_status()

    async def _flush_loop(self) -> None:
        interval_s = self.cfg.commit_interval_ms / 1000.0
        next_count_at = 0.0
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
                if time.monotonic() >= next_count_at:
                    next_count_at = time.monotonic() + 1.0
                    self.metrics.jobs_by_status = await self.store.count_by_status()
            except Exception:
                log.exception("batch: committing results failed; retrying")

    # -- endings ------------------------------------------------------------------------------
    async def _finalize(self, st: _JobState, final: str) -> None:
        """Write every line without a result as an error (expired, cancelled), then the
        output and error files, then the final status; each step may be repeated after a
        crash and gives the same files."""
        rec = st.rec
        store = self.store
        now = int(time.time())
        if final == "completed":
            await store.set_status(rec.id, "finalizing", only_from=("in_progress", "validating"),
                                   finalizing_at=now)
        if final in ("expired", "cancelled"):
            code, msg = (("batch_expired", _EXPIRED_MSG) if final == "expired"
                         else ("batch_cancelled", _CANCELLED_MSG))
            done = await store.done_lines(rec.id)
            chunk: list[ResultRow] = []
            for line_no, raw in iter_lines(self.storage.path(rec.input_file_id)):
                if line_no in done:
                    continue
                chunk.append(error_line(rec.id, line_no, _custom_id(raw), code, msg))
                if len(chunk) >= 1000:
                    await store.add_results(rec.id, chunk)
                    self.metrics.lines.labels("failed").inc(len(chunk))
                    chunk = []
            if chunk:
                await store.add_results(rec.id, chunk)
                self.metrics.lines.labels("failed").inc(len(chunk))
        files: list[FileRecord] = []
        ids: dict[str, str | None] = {"output_file_id": None, "error_file_id": None}
        for kind, ok in (("output", True), ("error", False)):
            f = await self._write_results(rec, kind, ok)
            if f is not None:
                files.append(f)
                ids[f"{kind}_file_id"] = f.id
        done_at = int(time.time())
        await store.finish_batch(rec.id, final, files, **ids, **{f"{final}_at": done_at})
        await self.refresh_counts()
        if final == "completed":
            window_s = window_seconds(rec.completion_window) or 1
            self.metrics.window_fraction.observe((done_at - rec.created_at) / window_s)
        log.info("batch %s: %s (%s)", rec.id, final,
                 ", ".join(f"{k}={v}" for k, v in ids.items() if v))

    async def _write_results(self, rec: BatchRecord, kind: str, ok: bool) -> FileRecord | None:
        tmp = self.storage.temp_path()
        n = 0
        size = 0
        with open(tmp, "wb") as f:
            async for r in self.store.iter_results(rec.id, ok):
                b = r.body.encode() + b"\n"
                f.write(b)
                size += len(b)
                n += 1
        if n == 0:
            self.storage.remove(tmp)
            return None
        fid = output_file_id(rec.id, kind)
        path = self.storage.commit(tmp, fid)
        return FileRecord(id=fid, tenant=rec.tenant, purpose="batch_output",
                          filename=f"{rec.id}_{kind}.jsonl", bytes=size,
                          created_at=int(time.time()), path=str(path),
                          created_ns=time.time_ns())


def feed_rule(cfg) -> FeedRule:
    """The ``FeedRule`` of a ``[batch]`` config section (``ServerSettings.batch``)."""
    return FeedRule(pace_fraction=cfg.pace_fraction, min_lines_in_flight=cfg.min_lines_in_flight,
                    prefills_per_instance=cfg.prefills_per_instance,
                    max_lines_in_flight=cfg.max_lines_in_flight,
                    urgent_wait_fraction=cfg.urgent_wait_fraction)


def _custom_id(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) else None


def _speedup(gw: Gateway) -> float:
    """Scheduler-clock seconds per wall second (the simulated fleet may run faster)."""
    host = gw.backend.host
    return host.speedup if host is not None else 1.0
