"""A simulated vLLM instance: continuous batching, chunked prefill, KV blocks, preemption.

It follows vLLM v1's scheduler step by step:
  1. every running decode request gets one token of the per-iteration token budget;
  2. running requests still prefilling get chunks of the remaining budget (chunked prefill);
  3. waiting requests are admitted in priority order while seats (``max_num_seqs``), budget
     and KV blocks allow;
  4. when the KV cache cannot hold the next token of every decode, the lowest-priority running
     request is preempted: its blocks are freed and it goes back to waiting, to resume by
     recomputing prompt + generated tokens.
Iteration times come from the roofline in ``perf.py``.

Speed: between two events the decode batch is fixed, so a run of pure-decode iterations is
advanced in closed form (``IterationModel.decode_run_s``); only iterations that carry prefill
chunks, admissions or preemptions are stepped one by one. ``advance_to(t)`` executes every
iteration that *starts* at or before ``t``; its events carry the iteration's end time.

KV blocks: a request holds ceil(tokens / block_size) blocks. Under a decode jump the engine
uses the bound  sum ceil(x_r / bs) <= floor(sum x_r / bs) + num_requests, which is exact to
within one block per request and never over-commits.

Prefix cache (vLLM's automatic prefix caching, on by default like vLLM's): a request that
carries ``prefix_hashes`` (one hash per ``hash_block_tokens`` tokens of its prompt, e.g. the
Mooncake trace's ``hash_ids``) names its full prompt units by chained hashes, so a unit matches
only when every unit before it does too. At admission the leading run of units found in the
cache is a hit: those tokens are neither prefilled nor charged against the token budget (at
least one prompt token is always computed, as in vLLM). When its prefill ends the request's
full prompt units enter the cache. Units are reference-counted: a unit in use by running
requests counts once in the KV cache (``_kv_shared``); when no running request uses it, it
stays cached on a free list and is evicted least-recently-freed first (tail units of a prompt
first, as vLLM frees blocks in reverse) whenever the blocks are needed. Requests without
hashes never touch the cache, so an engine serving only them behaves exactly as without one.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable
from dataclasses import dataclass

from qlm_opt.domain import EngineStats, Request, RequestState
from qlm_opt.engines.base import EngineListener, prefill_pass
from qlm_opt.engines.perf import IterationModel


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """vLLM engine arguments that matter to scheduling."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    max_model_len: int | None = None  # None: min(model max context, KV capacity)
    enable_prefix_caching: bool = True  # vLLM's default


class _EngState:
    """Per-request engine bookkeeping, stored on ``Request._eng``."""

    __slots__ = ("key", "seq", "prefill_left", "computed", "out_cap", "g0", "s_iter", "token",
                 "units", "unit_tokens", "held", "peek")

    def __init__(self, key: tuple, seq: int, out_cap: int) -> None:
        self.key = key
        self.seq = seq
        self.prefill_left = 0  # tokens still to prefill (prompt + generated on a resume)
        self.computed = 0  # tokens in KV while prefilling
        self.out_cap = out_cap  # output tokens at which the request ends
        self.g0 = 0  # generated tokens when it became a decoder
        self.s_iter = -1  # engine iteration count when it became a decoder (-1: not decoding)
        self.token = 0  # bumped on every state change; invalidates stale heap entries
        self.units: list[int] | None = None  # chained cache keys of its full prompt units
        self.unit_tokens = 0  # tokens per unit
        self.held = 0  # leading units it holds a reference to (hits, then its own)
        self.peek = (-1, -1, 0)  # (cache version, prefill_left, hits) of the last lookup


class SimEngine:
    """One simulated instance. See the module docstring for the model. Implements
    ``engines.base.SteppedEngine``: the host clocks its iterations."""

    #: the runtime ends a swap by its own timer (``end_swap``): the swap time is modelled
    reports_swap_done = False
    can_swap = True
    # a simulated engine never dies
    down = False
    num_downs = 0
    num_restarts = 0
    # load and swap times are modelled (``swap_until_at``), not measured
    last_start_s = None
    last_swap_s = None

    def process_alive(self) -> bool | None:
        return None  # no process to watch

    def __init__(
        self,
        instance_id: int,
        model: str | None,
        iter_model: IterationModel | None,
        kv_capacity_tokens: int,
        config: EngineConfig,
        listener: EngineListener,
        now: Callable[[], float],
        max_model_len: int | None = None,
    ) -> None:
        self.instance_id = instance_id
        self.model = model
        self.config = config
        self.listener = listener
        self._now = now
        self._waker: Callable[[SimEngine, float | None], None] | None = None
        self._seq = 0
        self._set_model(model, iter_model, kv_capacity_tokens, max_model_len)
        # queues
        self._waiting: list[tuple[tuple, int, Request]] = []  # heap of (key, seq, req)
        self._num_waiting = 0
        self._running: dict[int, Request] = {}  # req id -> request, prefilling or decoding
        self._prefilling: list[Request] = []  # admission order
        self._done: list[tuple] = []  # (done_iter, seq, state, token, req); stale if token moved
        # deadlines of the requests held (running or waiting), sorted: ``held_due_after``
        self._due: list[float] = []
        # decode state
        self.iters = 0  # iterations executed
        self._num_dec = 0  # decoders B
        self._dec_kv_base = 0  # sum over decoders of (kv tokens at start - s_iter)
        self._kv_static = 0  # KV tokens of prefilling requests
        # time
        self.clock_at = now()  # start of the next iteration
        self.swap_until_at = 0.0
        self.busy_s = 0.0  # time spent running iterations (utilisation)
        self.num_preemptions = 0
        self.generated_tokens = 0
        # prefix cache: key -> [references by running requests, tokens]; the free list holds
        # keys with no reference, oldest first (evicted first)
        self._pc: dict[int, list[int]] = {}
        self._pc_free: dict[int, None] = {}
        self._pc_free_blocks = 0
        self._kv_shared = 0  # KV tokens of cached units in use (counted once)
        self._pc_version = 0  # bumped when a key enters or leaves the cache
        self.prefix_query_tokens = 0  # prompt tokens of requests with hashes, at admission
        self.prefix_hit_tokens = 0  # of those, found in the cache
        self.num_prefix_evictions = 0  # units evicted
        self._wake_at: float | None = None
        self.wake_version = 0  # host bookkeeping for stale wake events
        # ``prefill_summary``: decoders whose first token may still lie ahead of a query,
        # (first_token_at, req, state, token); kept only once someone asked
        self._recent: list[tuple] | None = None
        self._recent_at = float("-inf")  # the latest query's time

    # -- configuration -----------------------------------------------------------------------
    def _set_model(
        self,
        model: str | None,
        iter_model: IterationModel | None,
        kv_capacity_tokens: int,
        max_model_len: int | None,
    ) -> None:
        self.model = model
        self.iter_model = iter_model
        # a request's trip into and out of the engine: added to its reported event times
        self._egress = iter_model.request_overhead_s if iter_model is not None else 0.0
        self._egress_varies = bool(iter_model is not None and iter_model.request_overhead_q)
        self._slow = bool(iter_model is not None and iter_model.slowdown_q)
        bs = self.config.block_size
        self.kv_capacity_tokens = kv_capacity_tokens
        self.num_blocks = kv_capacity_tokens // bs
        mml = max_model_len or kv_capacity_tokens
        if self.config.max_model_len:
            mml = min(mml, self.config.max_model_len)
        self.max_model_len = min(mml, self.num_blocks * bs - bs)

    def set_waker(self, waker: Callable[[SimEngine, float | None], None]) -> None:
        """The host (simulator or live runtime) calls ``advance_to(at)`` when woken."""
        self._waker = waker

    # -- the Engine interface ----------------------------------------------------------------
    def submit(self, req: Request, priority: tuple) -> None:
        now = self._now()
        self.advance_to(now)
        if self.model != req.model or self.swap_until_at > now:
            raise RuntimeError(
                f"instance {self.instance_id} holds {self.model!r} (swap until "
                f"{self.swap_until_at:.3f}), cannot take request for {req.model!r}"
            )
        need = req.prompt_tokens + req.num_generated
        if need + 1 > self.max_model_len:
            req.state = RequestState.QUEUED
            self.listener.on_failed(req, now, "prompt_too_long")
            return
        out_cap = min(req.output_tokens, self.max_model_len - req.prompt_tokens)
        self._seq += 1
        st = _EngState(priority, self._seq, out_cap)
        st.prefill_left = need
        hashes = req.prefix_hashes
        if hashes and req.hash_block_tokens > 0 and self.config.enable_prefix_caching:
            ut = req.hash_block_tokens
            n_full = min(len(hashes), req.prompt_tokens // ut)
            if n_full:
                h = ut  # the unit size seeds the chain: other sizes never match
                keys = []
                for x in hashes[:n_full]:
                    h = hash((h, x))
                    keys.append(h)
                st.units = keys
                st.unit_tokens = ut
        req._eng = st
        req.state = RequestState.WAITING
        req.instance_id = self.instance_id
        heapq.heappush(self._waiting, (priority, self._seq, req))
        self._num_waiting += 1
        bisect.insort(self._due, req.deadline_at)
        if self.clock_at < now:
            self.clock_at = now  # the engine was idle
        self._rewake()

    def abort(self, req_id: int) -> Request | None:
        self.advance_to(self._now())
        req = self._running.get(req_id)
        if req is not None:
            self._remove_running(req)
            self._forget_due(req)
            req.state = RequestState.SWAPPED_OUT
            req._eng = None
            self._rewake()
            return req
        for i, (_, _, r) in enumerate(self._waiting):
            if r.id == req_id and r.state == RequestState.WAITING:
                self._waiting[i] = self._waiting[-1]
                self._waiting.pop()
                heapq.heapify(self._waiting)
                self._num_waiting -= 1
                self._forget_due(r)
                r.state = RequestState.SWAPPED_OUT
                r._eng = None
                self._rewake()
                return r
        return None

    def running_requests(self) -> list[Request]:
        return list(self._running.values())

    def waiting_requests(self) -> list[Request]:
        return [r for _, _, r in sorted(self._waiting, key=lambda e: (e[0], e[1]))]

    def prefill_summary(self, now_at: float) -> tuple[int, int] | None:
        """What a pass over ``running_requests()`` finds at ``now_at``: (requests whose first
        token is out by ``now_at``, prompt tokens still prefilling or whose first token lies
        after ``now_at``, plus tokens to recompute of those not prefilled yet). It visits the
        prefilling requests and the decoders that got their first token lately, not the
        whole batch. None for a ``now_at`` before an earlier call's (the caller then does
        the pass)."""
        if now_at < self._recent_at:
            return None
        self._recent_at = now_at
        rec = self._recent
        if rec is None:
            rec = [(r.first_token_at, r, r._eng, r._eng.token)
                   for r in self._running.values() if r._eng.s_iter >= 0]
        keep = []
        n_late = 0
        pend = 0
        for e in rec:
            ft, r, st, tok = e
            if ft > now_at and r._eng is st and st.token == tok:
                keep.append(e)
                n_late += 1
                pend += r.prompt_tokens
        self._recent = keep
        b, more = prefill_pass(self._prefilling, now_at)
        return self._num_dec - n_late + b, pend + more

    def running_generated(self) -> tuple[list[Request], list[int]]:
        """``running_requests()`` and ``num_generated`` of each, in one pass."""
        running = list(self._running.values())
        it = self.iters
        gens = []
        for r in running:
            st = r._eng
            gens.append(st.g0 + (it - st.s_iter) if st.s_iter >= 0 else r.num_generated)
        return running, gens

    def waiting_tokens(self) -> int:
        """Prompt plus generated tokens (to recompute) of the waiting requests: the sum over
        ``waiting_requests()`` without sorting them."""
        return sum(r.prompt_tokens + r.num_generated for _, _, r in self._waiting)

    def seat_counts(self) -> tuple[int, int, int]:
        """(running, waiting, max_num_seqs): the part of ``stats()`` a pull reads."""
        return len(self._running), self._num_waiting, self.config.max_num_seqs

    def held_due_after(self, at: float) -> int:
        """Requests held (running or waiting) due after ``at``: a bisection of the sorted
        deadlines the engine keeps as requests come and go."""
        due = self._due
        return len(due) - bisect.bisect_right(due, at)

    def _forget_due(self, req: Request) -> None:
        due = self._due
        del due[bisect.bisect_left(due, req.deadline_at)]

    def num_generated(self, req: Request) -> int:
        st = req._eng
        if st is not None and st.s_iter >= 0:
            return st.g0 + (self.iters - st.s_iter)
        return req.num_generated

    def stats(self) -> EngineStats:
        b = self._num_dec
        kv = self._kv_used()
        im = self.iter_model
        dec_tps = im.decode_tokens_per_s(max(b, 1), kv) if im is not None else 0.0
        pre_tps = 1.0 / im.c_tok if im is not None else 0.0
        return EngineStats(
            num_running=len(self._running),
            num_waiting=self._num_waiting,
            kv_used_tokens=kv,
            kv_capacity_tokens=self.kv_capacity_tokens,
            kv_cached_tokens=self._pc_free_blocks * self.config.block_size,
            num_decoding=b,
            prefix_query_tokens=self.prefix_query_tokens,
            prefix_hit_tokens=self.prefix_hit_tokens,
            max_num_seqs=self.config.max_num_seqs,
            decode_tokens_per_s=dec_tps,
            prefill_tokens_per_s=pre_tps,
            busy_until_at=self.swap_until_at,
            model=self.model,
        )

    def start_swap(
        self,
        model: str,
        duration_s: float,
        iter_model: IterationModel,
        kv_capacity_tokens: int,
        max_model_len: int | None = None,
    ) -> float:
        """Begin a model swap that takes ``duration_s``; the engine must be empty."""
        now = self._now()
        self.advance_to(now)
        if self._running or self._num_waiting:
            raise RuntimeError(f"instance {self.instance_id}: swap requested while busy")
        self._set_model(model, iter_model, kv_capacity_tokens, max_model_len)
        self.swap_until_at = max(now, self.clock_at) + duration_s
        self.clock_at = self.swap_until_at
        self._kv_static = 0
        self._dec_kv_base = 0
        self._pc.clear()  # a new model's KV cache starts empty
        self._pc_version += 1
        self._pc_free.clear()
        self._pc_free_blocks = 0
        self._kv_shared = 0
        self._rewake()
        return duration_s

    def end_swap(self, now: float) -> None:
        """The host's swap timer fired: serve from ``now`` even if a live timer fired a hair
        before the modelled end (timers and clocks round differently)."""
        if self.swap_until_at > now:
            self.swap_until_at = now
            if self.is_idle and self.clock_at > now:
                self.clock_at = now

    def load(self) -> int:
        """Requests held (running + waiting): the routing signal of vLLM-style routers."""
        return len(self._running) + self._num_waiting

    @property
    def is_idle(self) -> bool:
        return not self._running and not self._num_waiting

    # -- internals ---------------------------------------------------------------------------
    def _kv_used(self) -> int:
        return self._kv_static + self._dec_kv_base + self._num_dec * self.iters + self._kv_shared

    # -- prefix cache ------------------------------------------------------------------------
    def _pc_hits(self, st: _EngState) -> int:
        """Leading units of ``st`` found in the cache, leaving at least one token of its
        prefill (``prefill_left``) to compute. Memoised until the cache's keys change."""
        v, left, n = st.peek
        if v == self._pc_version and left == st.prefill_left:
            return n
        pc = self._pc
        n = 0
        for k in st.units:
            if k not in pc:
                break
            n += 1
        if n and n * st.unit_tokens >= st.prefill_left:
            n = (st.prefill_left - 1) // st.unit_tokens
        st.peek = (self._pc_version, st.prefill_left, n)
        return n

    def _pc_ref(self, key: int, tokens: int) -> int:
        """Take a reference to ``key`` (inserting it when absent); returns the KV tokens that
        became in use (the unit's tokens when it was free or new, else 0)."""
        e = self._pc.get(key)
        if e is None:
            self._pc[key] = [1, tokens]
            self._kv_shared += tokens
            self._pc_version += 1
            return tokens
        e[0] += 1
        if e[0] == 1:
            del self._pc_free[key]
            self._pc_free_blocks -= -(-e[1] // self.config.block_size)
            self._kv_shared += e[1]
            return e[1]
        return 0

    def _pc_release(self, st: _EngState) -> None:
        """Drop the request's references; units nobody uses go to the free list, its tail
        first so that tails are evicted before heads."""
        pc = self._pc
        bs = self.config.block_size
        for k in reversed(st.units[: st.held]):
            e = pc.get(k)
            if e is None:
                continue
            e[0] -= 1
            if e[0] == 0:
                self._kv_shared -= e[1]
                self._pc_free[k] = None
                self._pc_free_blocks += -(-e[1] // bs)
        st.held = 0

    def _pc_evict(self) -> None:
        """Evict free units, least recently freed first, until cached + used blocks fit."""
        room = self.num_blocks - (self._kv_used() // self.config.block_size + len(self._running))
        if self._pc_free_blocks <= room:
            return
        free = self._pc_free
        pc = self._pc
        bs = self.config.block_size
        while self._pc_free_blocks > room and free:
            k = next(iter(free))
            del free[k]
            self._pc_free_blocks -= -(-pc.pop(k)[1] // bs)
            self.num_prefix_evictions += 1
            self._pc_version += 1

    def _rewake(self) -> None:
        at = self._next_wake()
        if at != self._wake_at:
            self._wake_at = at
            if self._waker is not None:
                self._waker(self, at)

    def _next_wake(self) -> float | None:
        if not self._running and not self._num_waiting:
            return None
        n = self._fast_n()
        if n > 0:
            im = self.iter_model
            dt = im.decode_run_s(self._num_dec, self._kv_used(), n)
            if self._slow:
                dt *= im.slowdown_at(self.clock_at)
            return self.clock_at + dt
        return self.clock_at

    def _fast_n(self) -> int:
        """Decode iterations that can run in closed form from now (0 when an iteration must be
        stepped: prefill chunks, admissions or preemption)."""
        b = self._num_dec
        if b == 0 or self._prefilling:
            return 0
        cfg = self.config
        bs = cfg.block_size
        kv = self._kv_used()
        nrun = len(self._running)
        if self._num_waiting and nrun < cfg.max_num_seqs and b < cfg.max_num_batched_tokens:
            # Admission is possible unless the KV cache cannot take the head's first chunk;
            # that only gets worse as decodes grow, so a jump stays valid.
            head = self._waiting[0][2]
            hst = head._eng
            left = hst.prefill_left
            if hst.units is not None:
                left -= self._pc_hits(hst) * hst.unit_tokens
            chunk = min(left, cfg.max_num_batched_tokens - b)
            if (kv + chunk + b) // bs + nrun + 1 <= self.num_blocks:
                return 0
        cap = (self.num_blocks - nrun) * bs
        n_kv = (cap - kv) // b  # iterations whose growth still fits
        if n_kv <= 0:
            return 0
        n_done = self._done[0][0] - self.iters
        return n_kv if n_kv < n_done else n_done

    def advance_to(self, t: float) -> None:
        """Execute every iteration that starts at or before ``t``."""
        if self.clock_at > t or (not self._running and not self._num_waiting):
            return
        im = self.iter_model
        while self.clock_at <= t and (self._running or self._num_waiting):
            n = self._fast_n()
            if n > 0:
                b, kv = self._num_dec, self._kv_used()
                if self._slow:  # one speed factor for the whole jump: its window's
                    f = im.slowdown_at(self.clock_at)
                    m = im.decode_iters_before(b, kv, n, (t - self.clock_at) / f)
                    dt = im.decode_run_s(b, kv, m) * f
                else:
                    m = im.decode_iters_before(b, kv, n, t - self.clock_at)
                    dt = im.decode_run_s(b, kv, m)
                self.clock_at += dt
                self.busy_s += dt
                self.iters += m
                self.generated_tokens += b * m
                self._pop_done(self.clock_at)
                if self._pc_free_blocks:
                    self._pc_evict()
            else:
                self._step_one()
        self._rewake()

    def on_wake(self, at: float) -> None:
        """Called by the host at the wake time this engine asked for."""
        self._wake_at = None
        self.advance_to(at)
        self._rewake()

    def _pop_done(self, at: float) -> None:
        done = self._done
        iters = self.iters
        while done and done[0][0] <= iters:
            _, _, st, token, req = heapq.heappop(done)
            if req._eng is not st or st.token != token:
                continue
            self._finish(req, at)

    def _finish(self, req: Request, at: float) -> None:
        st = req._eng
        req.num_generated = st.out_cap
        self._remove_running(req)
        self._forget_due(req)
        req._eng = None
        req.state = RequestState.FINISHED
        at += self._egress_of(req)
        req.completed_at = at
        req.finish_reason = "length" if st.out_cap < req.output_tokens else "stop"
        self.listener.on_finished(req, at)

    def _egress_of(self, req: Request) -> float:
        """The request's trip into and out of the engine (calibrated engines only)."""
        if self._egress_varies:
            return self.iter_model.request_overhead_for(req.id)
        return self._egress

    def _remove_running(self, req: Request) -> None:
        st = req._eng
        del self._running[req.id]
        if st.s_iter >= 0:
            gen = st.g0 + (self.iters - st.s_iter)
            req.num_generated = gen
            self._num_dec -= 1
            self._dec_kv_base -= st.computed - st.s_iter
        else:
            self._prefilling.remove(req)
            self._kv_static -= st.computed
        if st.held:
            self._pc_release(st)
        st.token += 1

    def _preempt_one(self) -> Request | None:
        """Preempt the lowest-priority running request (vLLM: recompute)."""
        if not self._running:
            return None
        victim = max(self._running.values(), key=lambda r: (r._eng.key, r._eng.seq))
        self._remove_running(victim)
        st = victim._eng
        st.prefill_left = victim.prompt_tokens + victim.num_generated
        st.computed = 0
        st.s_iter = -1
        victim.state = RequestState.WAITING
        victim.num_preemptions += 1
        self.num_preemptions += 1
        heapq.heappush(self._waiting, (st.key, st.seq, victim))
        self._num_waiting += 1
        return victim

    def _step_one(self) -> None:
        """Schedule and execute one iteration starting at ``clock_at``."""
        cfg = self.config
        bs = cfg.block_size
        nb = self.num_blocks
        b = self._num_dec
        budget = cfg.max_num_batched_tokens - b
        chunks: list[tuple[Request, int]] = []
        new_tokens = 0
        for r in self._prefilling:
            if budget <= 0:
                break
            c = r._eng.prefill_left
            if c > budget:
                c = budget
            chunks.append((r, c))
            budget -= c
            new_tokens += c
        kv = self._kv_used()
        waiting = self._waiting
        while waiting and budget > 0 and len(self._running) < cfg.max_num_seqs:
            head = waiting[0][2]
            st = head._eng
            hit = 0
            react = 0
            if st.units is not None:
                hit = self._pc_hits(st)
                pc = self._pc
                for k in st.units[:hit]:
                    e = pc[k]
                    if e[0] == 0:
                        react += e[1]  # a free unit becomes in use
            left = st.prefill_left - hit * st.unit_tokens
            c = min(left, budget)
            if (kv + react + new_tokens + c + b) // bs + len(self._running) + 1 > nb:
                break
            if st.units is not None:
                self.prefix_query_tokens += st.prefill_left
                self.prefix_hit_tokens += hit * st.unit_tokens
                ut = st.unit_tokens
                for k in st.units[:hit]:
                    self._pc_ref(k, ut)
                st.held = hit
                st.prefill_left = left
                kv += react
            heapq.heappop(waiting)
            self._num_waiting -= 1
            head.state = RequestState.RUNNING
            self._running[head.id] = head
            self._prefilling.append(head)
            chunks.append((head, c))
            budget -= c
            new_tokens += c
        # The decodes need one more KV slot each: preempt until everything fits.
        while (kv + new_tokens + self._num_dec) // bs + len(self._running) > nb:
            victim = self._preempt_one()
            if victim is None:
                break
            for j, (r, c) in enumerate(chunks):
                if r is victim:
                    new_tokens -= c
                    del chunks[j]
                    break
            kv = self._kv_used()
        b = self._num_dec
        if b == 0 and not chunks:
            # Nothing fits at all (a single request larger than the cache was filtered at
            # submit, so this is a transient after preemption): idle one overhead tick.
            self.clock_at += self.iter_model.overhead_s
            return
        dt = self.iter_model.iteration_s(b + new_tokens, kv, b + len(chunks))
        if self._slow:
            dt *= self.iter_model.slowdown_at(self.clock_at)
        end = self.clock_at + dt
        self.busy_s += dt
        self.iters += 1
        self.generated_tokens += b
        iters = self.iters
        for r, c in chunks:
            st = r._eng
            st.prefill_left -= c
            st.computed += c
            self._kv_static += c
            if st.prefill_left == 0:
                # The last prefill chunk samples the next token.
                self._prefilling.remove(r)
                self._kv_static -= st.computed
                if st.units is not None and st.held < len(st.units):
                    # its full prompt units enter the cache (a unit another request cached
                    # meanwhile is shared, and this request's copy freed)
                    ut = st.unit_tokens
                    for k in st.units[st.held:]:
                        self._pc_ref(k, ut)
                        st.computed -= ut
                    st.held = len(st.units)
                r.num_generated += 1
                self.generated_tokens += 1
                if r.first_token_at is None:
                    r.first_token_at = end + self._egress_of(r)
                    self.listener.on_first_token(r, r.first_token_at)
                if r.num_generated >= st.out_cap:
                    self._num_dec += 1  # _finish -> _remove_running undoes this
                    st.s_iter = iters
                    st.g0 = r.num_generated
                    self._dec_kv_base += st.computed - iters
                    self._finish(r, end)
                    continue
                st.s_iter = iters
                st.g0 = r.num_generated
                self._num_dec += 1
                self._dec_kv_base += st.computed - iters
                st.token += 1
                if self._recent is not None:
                    self._recent.append((r.first_token_at, r, st, st.token))
                self._seq += 1
                heapq.heappush(
                    self._done, (iters + st.out_cap - st.g0, self._seq, st, st.token, r)
                )
        self.clock_at = end
        self._pop_done(end)
        if self._pc_free_blocks:
            self._pc_evict()
