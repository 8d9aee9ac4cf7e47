"""Live engines: an in-process vLLM ``AsyncLLM`` per instance, and the parts shared with
``vllm_remote`` (request payloads, priority labels, request tracking, throughput EWMA).

The Runtime and the policies are synchronous callbacks on the event loop thread, so nothing
here blocks: ``submit`` creates one asyncio task per request that consumes the engine's
token stream and reports to the listener (``Runtime.on_first_token/on_finished/on_failed``);
``abort`` marks the request aborted at once (no token arrives after it returns) and tells
vLLM in the background; a model swap runs as a task and reports ``listener.on_swap_done``.

Requests carry their content in a ``LivePayload`` (on ``Request._eng``, which survives
eviction): the prompt token ids and every token generated so far, across resumes. A resumed
request is re-submitted as prompt + generated token ids with ``max_tokens`` reduced by what
was generated, so with greedy decoding the client's stream continues with nothing lost or
repeated. ``vllm`` is imported only when an engine starts.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from qlm_opt.domain import EngineStats, Request, RequestState
from qlm_opt.engines.base import prefill_pass

log = logging.getLogger(__name__)

#: called with (req, new_token_ids, new_text, finished) as tokens arrive (the HTTP stream)
OutputSink = Callable[[Request, list[int], str, bool], None]

# One vLLM engine starts at a time in this process: start-up is CPU-bound, and the CPU
# thread-binding variable is read from the environment when the engine process spawns.
_START_LOCK = threading.Lock()


# -- request payload ------------------------------------------------------------------------------
class LivePayload:
    """A live request's content and stream, kept on ``Request._eng`` across engines.

    ``prompt_token_ids`` is filled at first submission (tokenizing ``prompt`` when needed, or
    synthesizing ``Request.prompt_tokens`` ids for traces that carry only lengths).
    ``output_token_ids``/``output_text`` hold everything generated so far.
    """

    __slots__ = ("prompt", "prompt_token_ids", "output_token_ids", "output_text", "sampling",
                 "on_output", "run")

    def __init__(self, prompt: str | None = None, prompt_token_ids: list[int] | None = None,
                 sampling: dict | None = None, on_output: OutputSink | None = None) -> None:
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else None
        self.output_token_ids: list[int] = []
        self.output_text = ""
        self.sampling = dict(sampling or {})  # extra vLLM SamplingParams (temperature, stop...)
        self.on_output = on_output
        self.run: _Run | None = None  # the engine run in progress, if any


def attach_payload(req: Request, prompt: str | None = None,
                   prompt_token_ids: list[int] | None = None, sampling: dict | None = None,
                   on_output: OutputSink | None = None) -> LivePayload:
    """Give ``req`` its content before it is accepted; returns the payload. ``sampling``
    holds vLLM SamplingParams fields (``temperature``, ``seed``, ``stop``, ``ignore_eos``).
    ``req.output_tokens`` is ``max_tokens``."""
    pl = LivePayload(prompt, prompt_token_ids, sampling, on_output)
    if prompt_token_ids is not None:
        req.prompt_tokens = len(prompt_token_ids)
    req._eng = pl
    return pl


def payload(req: Request) -> LivePayload:
    """The request's payload, created empty (length-only request) when it has none."""
    pl = req._eng
    if not isinstance(pl, LivePayload):
        pl = req._eng = LivePayload()
    return pl


def synthetic_prompt_ids(req_id: int, num_tokens: int, vocab_size: int,
                         first_id: int = 16) -> list[int]:
    """Deterministic prompt ids for requests that carry only a length (traces, benchmarks)."""
    rng = random.Random(req_id)
    return [rng.randrange(first_id, vocab_size) for _ in range(max(1, num_tokens))]


# -- priority labels ------------------------------------------------------------------------------
class PriorityLabeler:
    """Maps priority tuples to vLLM's int priorities, keeping their order.

    vLLM fixes a request's priority when it is added, so the label of a new key is chosen
    between the labels of its neighbours among the keys held now (order-maintenance labels
    in a 62-bit space). When a gap is used up the label ties with a neighbour; vLLM then
    breaks the tie by arrival, which is the right order for the usual (class, arrival) keys.
    """

    _SPAN = 1 << 61
    _STEP = 1 << 32

    def __init__(self) -> None:
        self._keys: list[tuple] = []  # sorted (key, seq)
        self._labels: list[int] = []  # parallel to _keys
        self._seq = 0

    def add(self, key: tuple) -> tuple[tuple, int]:
        """Register ``key``; returns (handle, label). Release the handle with ``discard``."""
        self._seq += 1
        k = (tuple(key), self._seq)
        i = bisect.bisect(self._keys, k)
        lo = self._labels[i - 1] if i > 0 else None
        hi = self._labels[i] if i < len(self._labels) else None
        if lo is None and hi is None:
            label = 0
        elif lo is None:
            label = max(hi - self._STEP, -self._SPAN)
        elif hi is None:
            label = min(lo + self._STEP, self._SPAN)
        else:
            label = (lo + hi) // 2
        self._keys.insert(i, k)
        self._labels.insert(i, label)
        return k, label

    def discard(self, handle: tuple) -> None:
        i = bisect.bisect_left(self._keys, handle)
        if i < len(self._keys) and self._keys[i] == handle:
            del self._keys[i]
            del self._labels[i]

    def __len__(self) -> int:
        return len(self._keys)


# -- engine configuration -------------------------------------------------------------------------
@dataclass(slots=True)
class VllmEngineConfig:
    """vLLM engine arguments. The defaults are the CPU settings of the tiny test models
    (the project notes on vLLM on CPU (shared/notes/vllm-on-cpu.md)); on a GPU set ``kv_cache_memory_bytes=None`` and
    ``dtype="auto"``."""

    max_num_seqs: int = 64
    max_model_len: int = 512
    max_num_batched_tokens: int | None = None
    dtype: str = "float32"
    enforce_eager: bool = True
    kv_cache_memory_bytes: int | None = 64 << 20
    gpu_memory_utilization: float | None = None
    seed: int = 0
    cpu_threads_bind: str | None = "nobind"  # VLLM_CPU_OMP_THREADS_BIND ("0", "1", "nobind")
    ignore_eos: bool = False  # benchmarks/tests: run every request to its max_tokens
    enable_sleep_mode: bool = False  # GPU: swap by sleep/wake when both models stay resident
    extra: dict = field(default_factory=dict)  # any other AsyncEngineArgs field

    def engine_args(self, model_path: str, served_name: str | None = None) -> dict:
        args = dict(
            model=model_path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            enforce_eager=self.enforce_eager,
            scheduling_policy="priority",
            seed=self.seed,
        )
        if served_name:
            args["served_model_name"] = served_name
        if self.kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = self.kv_cache_memory_bytes
        if self.gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = self.gpu_memory_utilization
        if self.max_num_batched_tokens is not None:
            args["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.enable_sleep_mode:
            args["enable_sleep_mode"] = True
        args.update(self.extra)
        return args


def vllm_env(cpu_threads_bind: str | None = "nobind") -> dict[str, str]:
    """Environment for vLLM on this machine kind (single process engine core, offline)."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cpu_threads_bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
    return env


class _Run:
    """One submission of a request to one engine (a resume is a new run)."""

    __slots__ = ("req", "vid", "task", "handle", "aborted", "running", "started_at", "state")

    def __init__(self, req: Request, vid: str, handle: tuple) -> None:
        self.req = req
        self.vid = vid  # the engine's request id
        self.task: asyncio.Task | None = None
        self.handle = handle  # PriorityLabeler handle
        self.aborted = False
        self.running = False  # first token of this run seen
        self.started_at = 0.0
        self.state = None  # engine-specific (the HTTP response of vllm_remote)


class Ewma:
    """Exponentially weighted moving average of rate samples."""

    __slots__ = ("alpha", "value")

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value = 0.0

    def add(self, x: float) -> None:
        self.value = x if self.value == 0.0 else self.value + self.alpha * (x - self.value)


# -- shared live-engine logic ---------------------------------------------------------------------
class LiveEngine:
    """What every live engine shares: run tracking, listener calls, payload bookkeeping.

    Subclasses implement ``_start_run`` (a coroutine consuming the stream, calling
    ``_deliver``/``_complete``/``_fail``), ``_cancel_run`` and the swap.
    """

    #: the runtime waits for ``listener.on_swap_done`` instead of a timer
    reports_swap_done = True
    #: whether ``_record(scheduler_stats, iteration_stats)`` is called once per engine step
    #: (the profiler's step recorder wraps it); only the in-process engine sees its steps
    records_steps = False

    def __init__(self, instance_id: int, model: str | None, config: VllmEngineConfig,
                 listener, now: Callable[[], float]) -> None:
        self.instance_id = instance_id
        self.model = model
        self.config = config
        self.listener = listener  # set after the Runtime exists: engine.listener = runtime
        self._now = now
        self._runs: dict[int, _Run] = {}  # req id -> run in progress
        self._labels = PriorityLabeler()
        self._num_vids = 0
        self.busy_s = 0.0  # seconds with work in the engine (measured)
        self.num_preemptions = 0  # engine-internal preemptions (KV pressure)
        self.generated_tokens = 0
        self.swap_until_at = 0.0  # expected end of a swap in progress
        self.swapping = False
        self.last_swap_s: float | None = None  # measured duration of the last swap
        self.decode_tps = Ewma()  # output tokens/s while decoding
        self.prefill_tps = Ewma()  # prompt tokens/s while prefilling
        self._vocab_size = 1000
        self._kv_capacity_tokens = 0
        self._kv_usage = 0.0  # fraction, from the engine's own stats
        self._eng_running: int | None = None  # the engine's own counts, when it reports them
        self._eng_waiting: int | None = None
        self.max_model_len = config.max_model_len
        self.down = False  # the engine died and is not back yet
        self.restart_on_failure = False
        self.restarting = False  # a restart after a failure is in progress
        self.num_restarts = 0  # restarts after failures that brought the engine back
        self.num_downs = 0  # times the engine was found dead
        self.last_start_s: float | None = None  # measured duration of the last model load
        # the running engine's KV block and chunked-prefill budget, once it reports them
        self.block_size: int | None = None
        self.max_num_batched_tokens: int | None = config.max_num_batched_tokens
        # model -> engine arguments of that model (an instance that may hold several); the
        # model in ``config`` is the one loaded or loading now
        self.model_configs: dict[str, VllmEngineConfig] = {}
        self.closed = False  # shut down: no restart or swap may start an engine after this

    def bind(self, runtime) -> None:
        """Report to ``runtime`` (the EngineListener) and read its clock: event times must be
        on the host's clock. Call once the Runtime exists."""
        self.listener = runtime
        self._now = runtime.now

    # -- Engine interface --------------------------------------------------------------------
    def submit(self, req: Request, priority: tuple) -> None:
        now = self._now()
        if self.swapping or self.model != req.model or not self._ready():
            raise RuntimeError(
                f"instance {self.instance_id} holds {self.model!r}"
                f"{' (swapping)' if self.swapping else ''}, cannot take {req.model!r}"
            )
        pl = payload(req)
        if pl.prompt_token_ids is None:
            if pl.prompt is not None:
                pl.prompt_token_ids = self._tokenize(pl.prompt)
            else:
                pl.prompt_token_ids = synthetic_prompt_ids(req.id, req.prompt_tokens,
                                                           self._vocab_size)
            req.prompt_tokens = len(pl.prompt_token_ids)
        ids = pl.prompt_token_ids + pl.output_token_ids
        req.instance_id = self.instance_id
        if len(ids) + 1 > self.max_model_len:
            req.state = RequestState.QUEUED
            self.listener.on_failed(req, now, "prompt_too_long")
            return
        remaining = req.output_tokens - req.num_generated
        max_tokens = min(remaining, self.max_model_len - len(ids))
        handle, label = self._labels.add(priority)
        self._num_vids += 1
        run = _Run(req, f"q{req.id}-i{self.instance_id}-{self._num_vids}", handle)
        run.started_at = now
        pl.run = run
        self._runs[req.id] = run
        req.state = RequestState.WAITING
        if remaining <= 0:  # evicted right after its last token: nothing left to generate
            run.task = asyncio.get_running_loop().create_task(self._finish_now(run))
            return
        self._begin_run(run, ids, max_tokens, label)
        run.task = asyncio.get_running_loop().create_task(
            self._run_guarded(run, ids, max_tokens, label))

    def abort(self, req_id: int) -> Request | None:
        run = self._runs.get(req_id)
        if run is None:
            return None
        self._end_run(run)
        run.aborted = True
        req = run.req
        req.state = RequestState.SWAPPED_OUT
        self._cancel_run(run)
        return req

    def stats(self) -> EngineStats:
        cap = self._kv_capacity_tokens
        return EngineStats(
            num_running=self._num_running(),
            num_waiting=self._num_waiting(),
            kv_used_tokens=int(self._kv_usage * cap),
            kv_capacity_tokens=cap,
            max_num_seqs=self.config.max_num_seqs,
            decode_tokens_per_s=self.decode_tps.value,
            prefill_tokens_per_s=self.prefill_tps.value,
            waiting_prompt_tokens=sum(
                r.req.prompt_tokens + r.req.num_generated for r in self._runs.values()
                if not r.running),
            busy_until_at=self.swap_until_at if (self.swapping or self.down) else 0.0,
            model=self.model,
            extra={"engine_running": self._eng_running, "engine_waiting": self._eng_waiting},
        )

    def running_requests(self) -> list[Request]:
        return [r.req for r in self._runs.values() if r.running]

    def waiting_requests(self) -> list[Request]:
        runs = sorted((r for r in self._runs.values() if not r.running), key=lambda r: r.handle)
        return [r.req for r in runs]

    def load(self) -> int:
        return len(self._runs)

    @property
    def is_idle(self) -> bool:
        return not self._runs

    def num_generated(self, req: Request) -> int:
        return req.num_generated  # counted as tokens arrive

    def running_generated(self) -> tuple[list[Request], list[int]]:
        running = self.running_requests()
        return running, [r.num_generated for r in running]

    def prefill_summary(self, now_at: float) -> tuple[int, int]:
        return prefill_pass(self.running_requests(), now_at)

    def waiting_tokens(self) -> int:
        return sum(r.req.prompt_tokens + r.req.num_generated for r in self._runs.values()
                   if not r.running)

    def seat_counts(self) -> tuple[int, int, int]:
        return self._num_running(), self._num_waiting(), self.config.max_num_seqs

    def held_due_after(self, at: float) -> int:
        return sum(1 for r in self._runs.values() if r.req.deadline_at > at)

    def end_swap(self, now: float) -> None:
        """Nothing to do: a live engine reports the end of its swap (``on_swap_done``)."""

    @property
    def can_swap(self) -> bool:
        return True  # an in-process engine loads any model of its instance

    def process_alive(self) -> bool | None:
        return None  # in-process: no server process to watch

    def _num_running(self) -> int:
        return sum(1 for r in self._runs.values() if r.running)

    def _num_waiting(self) -> int:
        return sum(1 for r in self._runs.values() if not r.running)

    # -- run bookkeeping (called by subclasses from their stream consumers) -------------------
    async def _run_guarded(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> None:
        try:
            await self._start_run(run, ids, max_tokens, label)
        except asyncio.CancelledError:
            if not run.aborted:
                raise
        except Exception as e:  # engine died, connection lost, bad request
            if run.aborted:
                return
            if self._is_dead(e):
                self._engine_down()
            reason = "prompt_too_long" if _is_too_long(e) else "engine_failed"
            log.warning("instance %d: request %d failed (%s): %r", self.instance_id,
                        run.req.id, reason, e)
            self._fail(run, reason)
            return
        if not run.aborted and self._runs.get(run.req.id) is run:
            # The stream ended without a final message (server closed it): a failure.
            self._fail(run, "engine_failed")

    async def _finish_now(self, run: _Run) -> None:
        self._complete(run, "length")

    def _deliver(self, run: _Run, token_ids: list[int], text: str) -> None:
        """New tokens of ``run``; ignored once it was aborted."""
        if run.aborted or not token_ids:
            return
        req = run.req
        pl = payload(req)
        if not run.running:
            run.running = True
            req.state = RequestState.RUNNING
        pl.output_token_ids.extend(token_ids)
        pl.output_text += text
        req.num_generated += len(token_ids)
        self.generated_tokens += len(token_ids)
        now = self._now()
        if req.first_token_at is None:
            req.first_token_at = now
            self.listener.on_first_token(req, now)
        if pl.on_output is not None:
            pl.on_output(req, list(token_ids), text, False)

    def _complete(self, run: _Run, finish_reason: str | None) -> None:
        if run.aborted:
            return
        self._end_run(run)
        req = run.req
        now = self._now()
        req.state = RequestState.FINISHED
        req.completed_at = now
        req.finish_reason = finish_reason or "stop"
        pl = payload(req)
        pl.run = None
        if pl.on_output is not None:
            pl.on_output(req, [], "", True)
        self.listener.on_finished(req, now)

    def _fail(self, run: _Run, reason: str) -> None:
        if run.aborted:
            return
        self._end_run(run)
        run.aborted = True
        req = run.req
        req.state = RequestState.SWAPPED_OUT
        payload(req).run = None
        self.listener.on_failed(req, self._now(), reason)

    def _end_run(self, run: _Run) -> None:
        if self._runs.get(run.req.id) is run:
            del self._runs[run.req.id]
            self._labels.discard(run.handle)

    def _swap_finished(self, ok: bool) -> None:
        self.swapping = False
        if not ok:
            # The new model did not load: the instance is down with the model it should
            # hold, and is restarted with it (now, and by the health loop when that fails).
            self._engine_down("swap failed")
            return
        self.listener.on_swap_done(self, self._now())

    def config_of(self, model: str | None) -> VllmEngineConfig:
        """The engine arguments of ``model`` on this instance (the instance's own by
        default)."""
        return self.model_configs.get(model, self.config) if model else self.config

    def _engine_down(self, reason: str = "engine died") -> None:
        """The engine died: tell the runtime once (before failing the requests, so they are
        not routed back here), then restart it when configured to."""
        if self.down:
            return
        self.down = True
        self.num_downs += 1
        log.warning("instance %d: engine down (%s)", self.instance_id, reason)
        # until it is back the planner sees it busy for one start-up
        self.swap_until_at = self._now() + (self.last_start_s or 30.0)
        self.listener.on_engine_down(self, self._now())
        if self.restart_on_failure:
            self.restart()

    def mark_down(self, reason: str) -> None:
        """The health loop found the engine dead: mark it down (the runtime stops routing to
        it), fail the requests it held (the runtime re-queues them; they resume by recompute
        elsewhere or after the restart) and restart it when configured to."""
        if self.down:
            return
        self._engine_down(reason)
        for run in list(self._runs.values()):
            self._cancel_run(run)
            self._fail(run, "engine_failed")

    def mark_up(self) -> None:
        """An engine that was down answers its health checks again (an external server
        that came back): the instance takes work again."""
        if not self.down or self.restarting:
            return
        self.down = False
        log.warning("instance %d: engine up again", self.instance_id)
        self._swap_finished(True)

    def restart(self) -> bool:
        """Start a restart in the background (once at a time). The engine stays down until
        it is back; a failed restart leaves it down for the health loop to try again."""
        if self.restarting:
            return False
        self.restarting = True
        self.swapping = True
        asyncio.get_running_loop().create_task(self._restart_guarded())
        return True

    async def _restart_guarded(self) -> None:
        t0 = self._now()
        try:
            await self._restart()
        except Exception as e:
            self.restarting = False
            self.swapping = False
            log.error("instance %d: restart failed (%r); the health loop tries again",
                      self.instance_id, e)
            return
        self.restarting = False
        self.down = False
        self.num_restarts += 1
        log.warning("instance %d: restarted in %.1f s", self.instance_id, self._now() - t0)
        self._swap_finished(True)

    async def probe(self, timeout_s: float) -> bool:
        """One health check: True when the engine answers within ``timeout_s``."""
        raise NotImplementedError

    async def _restart(self) -> None:
        """Stop what is left of the engine and start it again with ``self.model``; raise on
        failure."""
        raise NotImplementedError

    def _is_dead(self, e: BaseException) -> bool:
        return False

    # -- for subclasses ---------------------------------------------------------------------
    def _ready(self) -> bool:
        raise NotImplementedError

    def _tokenize(self, text: str) -> list[int]:
        raise NotImplementedError

    def _begin_run(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> None:
        """Called in ``submit`` before the run's task is created: an engine that can start
        the run synchronously (``vllm_remote`` writes the request on an idle connection)
        does it here, so that the engine works on it while the caller goes on."""

    async def _start_run(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> None:
        raise NotImplementedError

    def _cancel_run(self, run: _Run) -> None:
        raise NotImplementedError

    def sampling_kwargs(self, req: Request, max_tokens: int) -> dict:
        kw = {"temperature": 0.0, "max_tokens": max_tokens}
        if self.config.ignore_eos:
            kw["ignore_eos"] = True
        kw.update(payload(req).sampling)
        kw["max_tokens"] = max_tokens
        return kw


def _is_too_long(e: BaseException) -> bool:
    s = str(e).lower()
    return "too long" in s or "maximum context length" in s or "max_model_len" in s


# -- the in-process engine ------------------------------------------------------------------------
class VllmLocalEngine(LiveEngine):
    """One vLLM ``AsyncLLM`` in this process (its engine core is a child process).

    ``model_paths`` maps catalog model names to Hugging Face folders: the models this
    instance can hold; ``model_configs`` the engine arguments of some of them (default:
    ``config``). ``await engine.start()`` loads the initial model.
    """

    records_steps = True

    def __init__(self, instance_id: int, model: str | None, model_paths: dict[str, str],
                 config: VllmEngineConfig | None = None, listener=None,
                 now: Callable[[], float] | None = None,
                 model_configs: dict[str, VllmEngineConfig] | None = None) -> None:
        import time

        super().__init__(instance_id, model, config or VllmEngineConfig(), listener,
                         now or time.monotonic)
        self.model_paths = {k: str(v) for k, v in model_paths.items()}
        self.model_configs = {m: self.config for m in self.model_paths}
        self.model_configs.update(model_configs or {})
        self._llm = None  # AsyncLLM
        self._sleeping: dict[str, object] = {}  # model -> AsyncLLM asleep (sleep mode)
        self._tokenizer = None
        self._last_iter_at: float | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the initial model (about 20 s on CPU). Idempotent."""
        if self._llm is None and self.model is not None:
            self._llm = await self._start_llm(self.model)

    async def _start_llm(self, model: str):
        path = self.model_paths.get(model)
        if path is None:
            raise KeyError(f"instance {self.instance_id}: no path for model {model!r}")
        if self.closed:
            raise RuntimeError(f"instance {self.instance_id}: shut down")
        loop = asyncio.get_running_loop()
        cfg = self.config_of(model)
        t0 = self._now()
        llm = await loop.run_in_executor(None, self._create_llm, model, path, cfg)
        if self.closed:  # shut down while it was starting
            await loop.run_in_executor(None, llm.shutdown)
            raise RuntimeError(f"instance {self.instance_id}: shut down")
        self.config = cfg
        self.last_start_s = self._now() - t0
        self._on_loaded(llm)
        return llm

    def _create_llm(self, model: str, path: str, cfg: VllmEngineConfig | None = None):
        cfg = cfg or self.config
        os.environ.update(vllm_env(cfg.cpu_threads_bind))
        with _START_LOCK:
            os.environ.update(vllm_env(cfg.cpu_threads_bind))
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            args = AsyncEngineArgs(**cfg.engine_args(path, served_name=model))
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[self._stat_logger_factory()])
        if cfg.extra.get("enable_logging_iteration_details"):
            # the details are for our per-step hook (profiling); vLLM would also log one
            # INFO line per engine step, which costs the output loop time and floods logs
            logging.getLogger("vllm.v1.metrics.loggers").setLevel(logging.WARNING)
        return llm

    def _on_loaded(self, llm) -> None:
        mc = llm.model_config
        self.max_model_len = mc.max_model_len
        self._vocab_size = mc.get_vocab_size()
        cc = llm.vllm_config.cache_config
        self._kv_capacity_tokens = int((cc.num_gpu_blocks or 0) * (cc.block_size or 16))
        self._tokenizer = llm.get_tokenizer()
        self._last_iter_at = None
        self.block_size = cc.block_size
        self.max_num_batched_tokens = llm.vllm_config.scheduler_config.max_num_batched_tokens

    async def shutdown(self) -> None:
        """Stop every engine this instance holds; requests in flight fail."""
        self.closed = True
        llms = [self._llm, *self._sleeping.values()]
        self._llm = None
        self._sleeping.clear()
        for llm in llms:
            if llm is not None:
                await asyncio.get_running_loop().run_in_executor(None, llm.shutdown)

    def _ready(self) -> bool:
        return self._llm is not None

    def _tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    # -- runs ----------------------------------------------------------------------------------
    async def _start_run(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(output_kind=RequestOutputKind.DELTA,
                            **self.sampling_kwargs(run.req, max_tokens))
        llm = self._llm
        async for out in llm.generate({"prompt_token_ids": ids}, sp, run.vid, priority=label):
            if run.aborted:
                return
            o = out.outputs[0]
            self._deliver(run, list(o.token_ids), o.text)
            if out.finished:
                if o.finish_reason == "abort":
                    self._fail(run, "engine_aborted")
                else:
                    self._complete(run, o.finish_reason)
                return

    def _is_dead(self, e: BaseException) -> bool:
        from vllm.v1.engine.exceptions import EngineDeadError

        return isinstance(e, EngineDeadError) or isinstance(e.__cause__, EngineDeadError)

    async def _restart(self) -> None:
        old, self._llm = self._llm, None
        if old is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(None, old.shutdown)
            except Exception as e:  # it is dead already
                log.debug("instance %d: shutdown of the dead engine: %r", self.instance_id, e)
        self._llm = await self._start_llm(self.model)

    async def probe(self, timeout_s: float) -> bool:
        """The engine core answers (``AsyncLLM.check_health``) and has not errored."""
        llm = self._llm
        if llm is None:
            return False
        if getattr(llm, "errored", False):
            return False
        try:
            await asyncio.wait_for(llm.check_health(), timeout_s)
        except Exception:
            return False
        return True

    def _cancel_run(self, run: _Run) -> None:
        if run.task is not None and not run.task.done():
            run.task.cancel()  # generate() aborts the request in vLLM when cancelled
        llm = self._llm
        if llm is not None:
            asyncio.get_running_loop().create_task(self._abort_quietly(llm, run.vid))

    @staticmethod
    async def _abort_quietly(llm, vid: str) -> None:
        try:
            await llm.abort(vid)
        except Exception:  # already gone
            pass

    # -- stats ---------------------------------------------------------------------------------
    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        eng = self

        class _QlmStats(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0) -> None:
                eng._record(scheduler_stats, iteration_stats)

            def log_engine_initialized(self) -> None:
                pass

        return _QlmStats

    def _record(self, ss, it) -> None:
        """Called by vLLM's output handler once per engine step."""
        now = self._now()
        if ss is not None:
            self._eng_running = ss.num_running_reqs
            self._eng_waiting = ss.num_waiting_reqs
            self._kv_usage = ss.kv_cache_usage
        if it is None:
            return
        self.num_preemptions += it.num_preempted_reqs
        gen, pre = it.num_generation_tokens, it.num_prompt_tokens
        last = self._last_iter_at
        self._last_iter_at = now
        if last is None or not (gen or pre):
            return
        dt = now - last
        if dt <= 0 or dt > 1.0:  # the engine was idle in between
            return
        self.busy_s += dt
        if gen and not pre:
            self.decode_tps.add(gen / dt)
        elif pre:
            self.prefill_tps.add(pre / dt)

    # -- swap ----------------------------------------------------------------------------------
    def start_swap(self, model: str, duration_s: float, iter_model=None,
                   kv_capacity_tokens: int = 0, max_model_len: int | None = None) -> float:
        """Begin loading ``model``; reports ``listener.on_swap_done(engine, at)`` when it is
        servable. Returns ``duration_s``, the runtime's estimate."""
        if self._runs:
            raise RuntimeError(f"instance {self.instance_id}: swap requested while busy")
        if model not in self.model_paths:
            raise KeyError(f"instance {self.instance_id}: no path for model {model!r}")
        self.swapping = True
        self.swap_until_at = self._now() + duration_s
        old_model, self.model = self.model, model
        asyncio.get_running_loop().create_task(self._swap(old_model, model))
        return duration_s

    async def _swap(self, old_model: str | None, model: str) -> None:
        t0 = self._now()
        old, self._llm = self._llm, None
        ok = True
        sleep_mode = self.config_of(model).enable_sleep_mode and (
            old_model is None or self.config_of(old_model).enable_sleep_mode)
        try:
            if sleep_mode and _sleep_supported():
                if old is not None and old_model is not None:
                    await old.sleep(level=1)
                    self._sleeping[old_model] = old
                llm = self._sleeping.pop(model, None)
                if llm is not None:
                    await llm.wake_up()
                    self.config = self.config_of(model)
                    self._on_loaded(llm)
                else:
                    llm = await self._start_llm(model)
            else:
                # CPU: sleep() is a no-op, so a swap stops one engine and starts another.
                if old is not None:
                    await asyncio.get_running_loop().run_in_executor(None, old.shutdown)
                llm = await self._start_llm(model)
            self._llm = llm
        except Exception:
            log.exception("instance %d: swap to %s failed", self.instance_id, model)
            ok = False
        self.last_swap_s = self._now() - t0
        log.info("instance %d: swap %s -> %s took %.1f s", self.instance_id, old_model, model,
                 self.last_swap_s)
        self._swap_finished(ok)


def _sleep_supported() -> bool:
    try:
        from vllm.platforms import current_platform

        return not current_platform.is_cpu()
    except Exception:
        return False
