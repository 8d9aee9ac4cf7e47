"""Profiling a live engine (``qlm-opt profile``): a step recorder on vLLM's scheduler stats,
an ``EngineProfiler`` that measures an engine in phases (probes, batches, workload, swap) and
fits the calibration (``qlm_opt.engines.calibration``) to what it recorded, and ``replay``,
which runs a trace through one simulated engine for comparison."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from qlm_opt.engines.calibration import (
    ModelCalibration,
    fit_iteration_model,
    fit_step_model,
    predict_step_s,
)

log = logging.getLogger(__name__)


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    return float(np.percentile(np.asarray(xs, float), q))


# -- profiling a live engine --------------------------------------------------------------------------
class _ProbeListener:
    """Engine listener for profiling without a Runtime: records event times."""

    def __init__(self) -> None:
        self.first_token_at: dict[int, float] = {}
        self.finished_at: dict[int, float] = {}
        self.failed: dict[int, str] = {}
        self.swap_done_at: float | None = None
        self.down_at: float | None = None

    def on_first_token(self, req, at: float) -> None:
        self.first_token_at[req.id] = at

    def on_finished(self, req, at: float) -> None:
        self.finished_at[req.id] = at

    def on_failed(self, req, at: float, reason: str) -> None:
        self.failed[req.id] = reason

    def on_swap_done(self, engine, at: float) -> None:
        self.swap_done_at = at

    def on_engine_down(self, engine, at: float) -> None:
        self.down_at = at


async def _wait(pred, timeout_s: float = 300.0, poll_s: float = 0.01) -> None:
    """Wait until ``pred()``. The poll is coarse on purpose: this loop shares the CPU with
    vLLM's output handler, and a fine poll would slow down the very steps being measured
    (event times come from the engine's callbacks, not from this loop)."""
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not pred():
        if loop.time() > end:
            raise TimeoutError("profiling step did not finish")
        await asyncio.sleep(poll_s)


class _StepRecorder:
    """Wraps a live engine's per-step stats hook (``VllmLocalEngine._record``, called by
    vLLM's output handler once per engine step) and keeps one row per step: wall time,
    sequences and tokens scheduled, KV tokens held and whether work was left after the step.
    With ``enable_logging_iteration_details`` the counts are vLLM's own scheduler details;
    otherwise they are derived from the iteration stats."""

    def __init__(self, engine) -> None:
        self.engine = engine
        # (wall time, seqs, tokens, KV tokens, work left, step index, engine-side step s)
        self.rows: list[tuple[float, int, int, int, bool, int, float]] = []
        self._cap: int | None = None  # KV capacity in tokens, read once
        self._orig = None

    def attach(self) -> None:
        """Record from now on (until ``close``)."""
        if self.engine.records_steps:
            self._orig = self.engine._record
            self.engine._record = self._record

    def _record(self, ss, it) -> None:
        now = self.engine._now()
        try:
            cap = self._cap
            if cap is None:
                cap = self._cap = self.engine.stats().kv_capacity_tokens
            d = getattr(ss, "iteration_details", None) if ss is not None else None
            if d is not None and not d.is_dummy:
                seqs = d.num_ctx_requests + d.num_generation_requests
                toks = d.num_ctx_tokens + d.num_generation_tokens
                idx = d.iteration_index
            elif it is not None and (it.num_generation_tokens or it.num_prompt_tokens):
                toks = it.num_generation_tokens + it.num_prompt_tokens
                seqs = max(getattr(ss, "num_running_reqs", 0) or 0, it.num_generation_tokens, 1)
                idx = -1
            else:
                seqs = toks = 0
                idx = -1
            kv = int((getattr(ss, "kv_cache_usage", 0.0) or 0.0) * cap)
            left = bool(ss is not None and (ss.num_running_reqs or ss.num_waiting_reqs))
            # The engine's own clock: a request decoding in this step and the one before
            # has an inter-token latency of exactly this step's duration, measured in the
            # engine process (free of the front end's delays in delivering outputs).
            itls = getattr(it, "inter_token_latencies_iter", None) if it is not None else None
            eng_dt = min(itls) if itls else -1.0
            if toks:
                self.rows.append((now, seqs, toks, kv, left, idx, eng_dt))
        finally:
            self._orig(ss, it)

    def close(self) -> None:
        """Stop recording: the engine's own hook is back."""
        if self._orig is not None:
            self._orig = None
            try:
                del self.engine._record
            except AttributeError:
                pass

    def speed_windows(self, p, window_s: float, start: int = 0, stop: int | None = None,
                      min_steps: int = 20) -> np.ndarray:
        """Measured over predicted busy time (step model ``p``) per window of ``window_s``
        of wall time, over rows ``start`` .. ``stop``: how the machine's speed varied. Only
        windows with at least ``min_steps`` timed steps count."""
        sums: dict[int, list[float]] = {}
        rows = self.rows[max(start - 1, 0):stop]
        for prev, cur in zip(rows, rows[1:]):
            dt = self._dt(prev, cur)
            if dt is None:
                continue
            pred = float(predict_step_s(p, cur[1], cur[2], prev[3]))
            acc = sums.setdefault(int(cur[0] // window_s), [0.0, 0.0, 0])
            acc[0] += dt
            acc[1] += pred
            acc[2] += 1
        return np.array([m / q for m, q, n in sums.values() if n >= min_steps and q > 0])

    @staticmethod
    def _dt(prev, cur) -> float | None:
        if not prev[4]:
            return None
        if prev[5] >= 0 and cur[5] >= 0 and cur[5] != prev[5] + 1:
            return None
        dt = cur[6] if cur[6] > 0 else cur[0] - prev[0]
        return dt if 0 < dt <= 1.0 else None

    def steps(self) -> tuple[list[int], list[int], list[int], list[float]]:
        """(seqs, tokens, kv, seconds) of steps that followed a busy step directly (a step
        after an idle engine also counts the idle time, so it is left out)."""
        seqs, toks, kvs, secs = [], [], [], []
        rows = self.rows
        for prev, cur in zip(rows, rows[1:]):
            dt = self._dt(prev, cur)
            if dt is None:
                continue
            seqs.append(cur[1])
            toks.append(cur[2])
            kvs.append(prev[3])
            secs.append(dt)
        return seqs, toks, kvs, secs


def replay(im, trace, max_num_seqs: int, kv_capacity_tokens: int, block_size: int = 16,
           max_num_batched_tokens: int = 2048, max_model_len: int | None = None):
    """Run ``trace`` [(arrival s, prompt tokens, output tokens)] through one ``SimEngine``
    with iteration model ``im`` (fcfs); returns [(ttft s, e2e s)] in trace order."""
    from qlm_opt.domain import Request
    from qlm_opt.engines.simulated import EngineConfig, SimEngine

    clock = [0.0]
    wake: list = [None]
    lis = _ProbeListener()
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                       block_size=block_size, max_model_len=max_model_len)
    eng = SimEngine(0, "m", im, kv_capacity_tokens, cfg, lis, lambda: clock[0])
    eng.set_waker(lambda e, at: wake.__setitem__(0, at))
    reqs = [Request(i, "m", "profile", pl, out, at, at + 1e9)
            for i, (at, pl, out) in enumerate(trace)]
    i = 0
    while i < len(reqs) or wake[0] is not None:
        w = wake[0]
        if i < len(reqs) and (w is None or reqs[i].arrived_at <= w):
            clock[0] = max(clock[0], reqs[i].arrived_at)
            eng.submit(reqs[i], (0, i))
            i += 1
        else:
            clock[0] = max(clock[0], w)
            wake[0] = None  # the engine asks again if it has more to do
            eng.on_wake(w)
    out = []
    for r in reqs:
        f, c = lis.first_token_at.get(r.id), lis.finished_at.get(r.id)
        out.append((math.nan if f is None else f - r.arrived_at,
                    math.nan if c is None else c - r.arrived_at))
    return out


SPEED_WINDOW_S = 1.0  # the profile's windows of the machine's speed
# Request ids of profiles, never reused in a process: a live engine draws synthetic prompt
# tokens from the id, and a reused id would find its prompt in vLLM's prefix cache.
_PROFILE_IDS = itertools.count(1_000_001)


@dataclass(slots=True)
class _WorkloadPhase:
    """One measured workload phase: its trace (arrival offsets from the phase's first
    request), the live TTFT and E2E of each request, and its rows in the step recorder."""

    trace: list[tuple[float, int, int]]
    ttft: np.ndarray
    e2e: np.ndarray
    rows: tuple[int, int]


class EngineProfiler:
    """Measures a started live engine (holding ``model``, with ``ignore_eos``) in phases, then
    fits the engine model once over everything measured (``fit``).

    Phases: ``probes`` (one request at a time: per-request overhead at idle), ``batches``
    (fixed batches shrinking through every size), ``workload`` (Poisson arrivals, as a live
    planner sees them; may run several times, with other work on the engine in between, so a
    calibration can sample the same stretch of time as the runs it predicts) and
    ``measure_swap``. Every engine step of a phase is recorded (``_StepRecorder``); between
    phases the engine is left alone (its listener and stats hook are restored), so work that
    is not the profile's never enters the fit."""

    def __init__(self, engine, model: str, seed: int = 0, progress=None) -> None:
        import random

        self.engine, self.model = engine, model
        self.rng = random.Random(seed)
        self.say = progress or (lambda msg: None)
        self.lis = _ProbeListener()
        self.rec = _StepRecorder(engine)  # one recorder, attached during phases only
        self.rows = self.rec.rows
        self.probes: list[tuple[int, float]] = []  # (prompt tokens, time to first token)
        self.dec_pts: list[tuple[int, float]] = []  # (batch, seconds per decode iteration)
        self.phases: list[_WorkloadPhase] = []
        self.swap_s: float | None = None
        self.max_len = int(engine.max_model_len or 512)
        self._warm = False
        self.seats = 1  # most sequences seen at once (when the engine does not say)
        self.decode_prompt_len, self.decode_tokens = 32, 64

    # -- measuring ---------------------------------------------------------------------------
    def _new_req(self, plen: int, out: int):
        from qlm_opt.domain import Request

        plen = max(1, min(plen, self.max_len - out - 1))
        now = self.engine._now()
        return Request(next(_PROFILE_IDS), self.model, "profile", plen, out, now, now + 1e9)

    async def _submit_wait(self, reqs) -> None:
        for q in reqs:
            self.engine.submit(q, (0, q.id))
        await _wait(lambda: all(q.is_done for q in reqs))

    @contextlib.asynccontextmanager
    async def _phase(self):
        """Within: this profiler's listener and step recorder are on the engine."""
        saved = self.engine.listener
        self.engine.listener = self.lis
        try:
            if not self._warm:  # the first iterations allocate
                self._warm = True
                for _ in range(2):
                    await self._submit_wait([self._new_req(32, 8)])
            self.rec.attach()
            try:
                yield
            finally:
                self.rec.close()
        finally:
            self.engine.listener = saved

    async def probes_phase(self, prompt_lens, repeats: int = 3) -> None:
        """One request of L prompt tokens at a time, for each L in ``prompt_lens``; their
        time to first token, less the fitted time of their prefill step, is the per-request
        overhead at idle (the fallback when there is no workload phase)."""
        import asyncio

        async with self._phase():
            for plen in prompt_lens:
                for _ in range(repeats):
                    await asyncio.sleep(0.01)
                    r = self._new_req(plen, 1)
                    t0 = self.engine._now()
                    await self._submit_wait([r])
                    self.probes.append((r.prompt_tokens, self.lis.first_token_at[r.id] - t0))
                self.say(f"prefill {plen} tokens: time to first token "
                         f"{self.probes[-1][1] * 1e3:.1f} ms")

    async def batches_phase(self, prompt_lens, batch_sizes, decode_tokens: int = 64,
                            decode_prompt_len: int = 32, repeats: int = 3) -> None:
        """B requests at each size B (prompts cycling through ``prompt_lens``, outputs
        staggered up to ``decode_tokens`` so the batch shrinks through every size below B),
        submitted together and, on alternate repeats, one by one a few milliseconds apart so
        that prefill chunks mix with decodes."""
        import asyncio

        self.decode_prompt_len, self.decode_tokens = decode_prompt_len, decode_tokens
        self.seats = max(self.seats, *batch_sizes)
        lis, rng = self.lis, self.rng
        async with self._phase():
            for b in batch_sizes:
                for rep in range(max(1, repeats - 1)):
                    outs = [max(2, decode_tokens * (i + 1) // b) for i in range(b)]
                    rng.shuffle(outs)
                    reqs = [self._new_req(prompt_lens[(i + rep) % len(prompt_lens)] if rep % 2
                                          else decode_prompt_len, outs[i]) for i in range(b)]
                    for q in reqs:
                        self.engine.submit(q, (0, q.id))
                        if rep % 2:
                            await asyncio.sleep(0.003 * rng.random())
                    await _wait(lambda: all(q.is_done for q in reqs))
                    if rep % 2 == 0:
                        # request-level decode point (fallback fit): the full-size span
                        t_first = max(lis.first_token_at[q.id] for q in reqs)
                        t_end = min(lis.finished_at[q.id] for q in reqs)
                        iters = min(outs) - 1
                        if t_end > t_first and iters > 0:
                            self.dec_pts.append((b, (t_end - t_first) / iters))
                self.say(f"batch {b}: {len(self.rows)} engine steps recorded")

    async def workload_phase(self, requests: int, rate: float, prompt_range: tuple[int, int],
                             output_range: tuple[int, int]) -> None:
        """``requests`` Poisson arrivals at ``rate``/s, prompts and outputs uniform over the
        ranges. Its TTFT and E2E percentiles are what ``fit`` matches the replay to."""
        import asyncio

        (lo_p, hi_p), (lo_o, hi_o) = prompt_range, output_range
        trace, t, live = [], 0.0, []
        for _ in range(requests):
            t += self.rng.expovariate(rate)
            out = self.rng.randint(lo_o, hi_o)
            trace.append((t, self.rng.randint(lo_p, max(lo_p, min(hi_p, self.max_len - out - 1))),
                          out))
        async with self._phase():
            row0 = len(self.rows)
            now = self.engine._now
            t0 = now()
            for at, pl, out in trace:
                delay = t0 + at - now()
                if delay > 0:
                    await asyncio.sleep(delay)
                q = self._new_req(pl, out)
                q.arrived_at = now()
                self.engine.submit(q, (0, q.id))
                live.append(q)
            await _wait(lambda: all(q.is_done for q in live))
            rows = (row0, len(self.rows))
        if not live:
            return
        lis, base = self.lis, live[0].arrived_at
        self.phases.append(_WorkloadPhase(
            [(q.arrived_at - base, q.prompt_tokens, q.output_tokens) for q in live],
            np.array([lis.first_token_at[q.id] - q.arrived_at for q in live]),
            np.array([lis.finished_at[q.id] - q.arrived_at for q in live]), rows))
        self.say(f"workload: {len(live)} requests, {len(self.rows)} engine steps recorded")

    async def measure_swap(self) -> None:
        """The time to swap the model (for an in-process engine: restart it)."""
        import time

        saved = self.engine.listener
        self.engine.listener = self.lis
        try:
            t0 = time.monotonic()
            self.engine.start_swap(self.model, 0.0, None, 0)
            await _wait(lambda: self.lis.swap_done_at is not None, 600)
        finally:
            self.engine.listener = saved
        self.swap_s = self.engine.last_swap_s or (time.monotonic() - t0)
        self.say(f"swap (engine restart): {self.swap_s:.1f} s")

    # -- fitting -----------------------------------------------------------------------------
    def fit(self) -> tuple[ModelCalibration, dict]:
        """Fit the engine model to everything measured so far; returns the calibration and
        the raw points."""
        rec = self.rec
        seqs, toks, kvs, secs = rec.steps()
        probes, dec_pts = self.probes, self.dec_pts
        if len(secs) >= 20:
            p, err = fit_step_model(seqs, toks, kvs, secs)
            overhead, s_seq, c_tok, m0, m_kv = (float(x) for x in p)
            self.say(f"fitted {len(secs)} engine steps")
        elif probes or dec_pts:  # no per-step hook: request-level points, the older fit
            dpl, dtok = self.decode_prompt_len, self.decode_tokens
            pt = [float(pl) for pl, _ in probes] + [float(b) for b, _ in dec_pts]
            pk = [float(pl) for pl, _ in probes] + [b * (dpl + dtok / 2) for b, _ in dec_pts]
            ps = [x for _, x in probes] + [x for _, x in dec_pts]
            p4, err = fit_iteration_model(pt, pk, ps)
            overhead, c_tok, m0, m_kv = (float(x) for x in p4)
            s_seq = 0.0
        else:
            raise ValueError("nothing measured to fit: run a probes, batches or workload phase")
        probe_ro = max(0.0, float(np.median(
            [x - (overhead + s_seq + max(c_tok * pl, m0)) for pl, x in probes]))) if probes \
            else 0.0
        # How the machine's speed varied over the workload phases, in windows of a second:
        # the quantiles of measured over predicted busy time, around their median (the load
        # factor below sets the level). A steady machine gives () and the simulator runs at
        # one speed.
        slow_q: tuple[float, ...] = ()
        if self.phases and len(secs) >= 20:
            ratios = np.concatenate([rec.speed_windows(
                (overhead, s_seq, c_tok, m0, m_kv), SPEED_WINDOW_S, *ph.rows)
                for ph in self.phases])
            if len(ratios) >= 10:
                sq = np.quantile(ratios, np.linspace(0.0, 1.0, 21)) / float(np.median(ratios))
                slow_q = tuple(float(x) for x in sq)
        factor, req_over, ro_q = self._fit_overhead(
            (overhead, s_seq, c_tok, m0, m_kv), slow_q, probe_ro)
        self.say(f"load factor {factor:.2f}, request overhead {req_over * 1e3:.1f} ms "
                 f"(idle probes: {probe_ro * 1e3:.1f} ms)")
        overhead, s_seq, c_tok, m0, m_kv = (x * factor for x in (overhead, s_seq, c_tok, m0, m_kv))
        eng = self.engine
        cap = eng.stats().kv_capacity_tokens or None
        cal = ModelCalibration(
            c_tok=c_tok, m0=m0, m_kv=m_kv, overhead_s=overhead, s_seq=s_seq,
            request_overhead_s=req_over, request_overhead_q=ro_q,
            slowdown_q=slow_q or None, slowdown_window_s=SPEED_WINDOW_S if slow_q else None,
            swap_s=self.swap_s, kv_capacity_tokens=cap,
            block_size=eng.block_size,
            max_num_batched_tokens=eng.max_num_batched_tokens,
            fit_rel_err=err,
        )
        phases = self.phases
        raw = {"step_seqs": [int(x) for x in seqs], "step_tokens": [int(x) for x in toks],
               "step_kv_tokens": [int(x) for x in kvs], "step_seconds": [float(x) for x in secs],
               "probe_prompt_tokens": [int(pl) for pl, _ in probes],
               "probe_ttft_s": [float(x) for _, x in probes],
               "decode_batch": [int(b) for b, _ in dec_pts],
               "decode_iter_s": [float(x) for _, x in dec_pts],
               "workload_phase": [k for k, ph in enumerate(phases) for _ in ph.trace],
               "workload_prompt_tokens": [int(x[1]) for ph in phases for x in ph.trace],
               "workload_output_tokens": [int(x[2]) for ph in phases for x in ph.trace],
               "workload_arrival_s": [float(x[0]) for ph in phases for x in ph.trace],
               "workload_ttft_s": [float(x) for ph in phases for x in ph.ttft],
               "workload_e2e_s": [float(x) for ph in phases for x in ph.e2e],
               "load_factor": float(factor), "probe_request_overhead_s": float(probe_ro)}
        return cal, raw

    def _fit_overhead(self, p, slow_q, probe_ro) -> tuple[float, float, tuple | None]:
        """Per-request overhead and load factor, from the workload phases: replay each
        phase's actual arrivals in the simulator and choose the factor (on every step term)
        and the overhead (a shift of each request's reported times, so no re-simulation is
        needed for it) that best match the workloads' pooled TTFT and E2E p50/p90 (squared
        log errors). The factor folds in what the isolated steps miss: the client side's work
        competing for the CPU, a busier machine while requests arrive.
        Returns (factor, median overhead, overhead offsets at 21 quantiles or None)."""
        from qlm_opt.engines.perf import IterationModel

        if not self.phases:
            return 1.0, probe_ro, None
        overhead, s_seq, c_tok, m0, m_kv = p
        eng = self.engine
        kv_cap = eng.stats().kv_capacity_tokens or 65536
        bsz = eng.block_size or 16
        mnbt = eng.max_num_batched_tokens or 2048
        seats = eng.config.max_num_seqs or self.seats
        live_ttft = np.concatenate([ph.ttft for ph in self.phases])
        live_e2e = np.concatenate([ph.e2e for ph in self.phases])
        target = np.log(np.percentile(live_ttft, [50, 90]).tolist()
                        + np.percentile(live_e2e, [50, 90]).tolist())
        qs = np.linspace(0.0, 1.0, 21)
        best = (math.inf, 1.0, probe_ro, None)

        def candidates():  # coarse (10% steps), then 1% steps around the best so far
            yield from np.geomspace(0.05, 20.0, 61)
            yield from best[1] * np.geomspace(0.9, 1.1, 21)

        for f in candidates():
            im = IterationModel(c_tok=c_tok * f, m0=m0 * f, m_kv=m_kv * f,
                                overhead_s=overhead * f, s_seq=s_seq * f,
                                slowdown_q=slow_q, slowdown_window_s=SPEED_WINDOW_S)
            # each phase met its own stretch of the machine: its replay draws its own
            res = np.concatenate([np.array(replay(replace(im, noise_seed=k), ph.trace, seats,
                                                  kv_cap, bsz, mnbt, self.max_len))
                                  for k, ph in enumerate(self.phases)])
            # What the deterministic replay misses, request by request, is the overhead:
            # its median, and its spread as quantile offsets (each request of a later run
            # draws one, IterationModel.request_overhead_for).
            # The residuals also hold the replay's own errors, which vary by request too, so
            # their spread is an upper bound: a scale on it (and a shift of the median) is
            # fitted with the load factor, on the workload's TTFT and E2E p50/p90.
            resid = live_ttft - res[:, 0]
            med = float(np.median(resid))
            offs0 = np.quantile(resid, qs) - med
            for scale in (0.0, 0.25, 0.5, 0.75, 1.0):
                for shift in (-1e-3, -5e-4, 0.0, 5e-4, 1e-3):
                    center = max(0.0, med + shift)
                    ro = np.maximum(center + scale * offs0, 0.0)  # overheads at the quantiles
                    q = np.concatenate([
                        np.percentile((res[:, 0, None] + ro[None, :]).ravel(), [50, 90]),
                        np.percentile((res[:, 1, None] + ro[None, :]).ravel(), [50, 90])])
                    loss = float(np.sum((np.log(np.maximum(q, 1e-9)) - target) ** 2))
                    if loss < best[0]:
                        best = (loss, float(f), center,
                                tuple(float(x) for x in scale * offs0) if scale else None)
        return best[1], best[2], best[3]


async def profile_engine(engine, model: str, prompt_lens=(16, 64, 128, 256, 448),
                         batch_sizes=(1, 2, 4, 8, 16), decode_tokens: int = 64,
                         decode_prompt_len: int = 32, repeats: int = 3,
                         measure_swap: bool = True, progress=None,
                         seed: int = 0, workload_requests: int = 40,
                         workload_rate: float = 4.0) -> tuple[ModelCalibration, dict]:
    """What ``qlm-opt profile`` runs: every phase of an ``EngineProfiler`` once (idle probes
    over ``prompt_lens``, batches of each size in ``batch_sizes``, a workload of
    ``workload_requests`` Poisson arrivals at ``workload_rate``/s with prompts over the
    probed range and outputs of ``decode_tokens``/4 .. 2·``decode_tokens``, then the swap
    time), and one fit. Engines without a per-step hook fall back to request-level points
    (prefill: time to first token; decode: mean time per token of a batch).
    Returns the calibration and the raw points."""
    prof = EngineProfiler(engine, model, seed, progress)
    await prof.probes_phase(prompt_lens, repeats)
    await prof.batches_phase(prompt_lens, batch_sizes, decode_tokens, decode_prompt_len, repeats)
    if workload_requests:
        await prof.workload_phase(workload_requests, workload_rate,
                                  (min(prompt_lens), max(prompt_lens)),
                                  (max(2, decode_tokens // 4), 2 * decode_tokens))
    cal, raw = prof.fit()
    if measure_swap:
        await prof.measure_swap()
        cal = replace(cal, swap_s=prof.swap_s)
    return cal, raw
