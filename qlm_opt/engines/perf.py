"""Roofline performance model of one vLLM iteration, and model-swap times.

An iteration that processes ``num_tokens`` new tokens (decode tokens + prefill chunk tokens)
while reading ``kv_tokens`` tokens of KV cache takes

    max(compute_s, memory_s) + overhead_s
    compute_s = 2 · params · num_tokens / (tp · peak_flops · mfu)
    memory_s  = (weight_bytes + kv_tokens · kv_bytes_per_token) / (tp · hbm_bps · mbu)

For a mixture-of-experts model, compute follows the active parameters (a token runs only its
routed experts) and memory follows the total (every expert's weights are read once a batch
routes tokens to all of them). KV bytes per token count vLLM's replicas of KV heads (and of
an MLA latent) across the tp ranks.

Prefill is compute-bound, decode is bandwidth-bound. The numbers come from the catalog
(public specs), or from a calibration file written by ``qlm-opt profile`` against a live
engine, which overrides the efficiencies and overhead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qlm_opt.catalog import Catalog


@dataclass(frozen=True, slots=True)
class PerfParams:
    """Efficiencies and overheads that turn datasheet numbers into iteration times."""

    mfu: float = 0.5  # fraction of peak FLOP/s reached by prefill GEMMs
    mbu: float = 0.8  # fraction of peak HBM bandwidth reached by decode
    overhead_s: float = 0.004  # per-iteration CPU/scheduling/launch overhead
    tp_efficiency: float = 0.85  # per-GPU efficiency at tp > 1 (all-reduce cost)
    engine_start_s: float = 20.0  # cold start: process, CUDA context, graph capture
    warm_wake_s: float = 0.5  # fixed part of a sleep/wake swap
    # qlm_opt.engines.calibration.Calibration from `qlm-opt profile`: measured constants per
    # (model, device) that replace the roofline where present
    calibration: object | None = None
    # Which sample of a calibration's measured noise (per-request overhead, the machine's
    # speed per window) a run draws: runs with different seeds sample it independently.
    noise_seed: int = 0


_MASK64 = (1 << 64) - 1
_TWO64 = float(1 << 64)
# A seed rotates every draw's uniform by a golden-ratio step: seeds 0, 1, 2, .. spread evenly.
_SEED_STEP = 0x9E3779B97F4A7C15


def _draw(q: tuple[float, ...], key: int, mult: int, add: int) -> float:
    """A deterministic draw from the distribution given by values ``q`` at evenly spaced
    quantiles: ``key`` hashed (multiplicative, 64-bit) to a uniform, then interpolated."""
    u = ((key * mult + add) & _MASK64) / _TWO64
    x = u * (len(q) - 1)
    i = int(x)
    return q[i] if i >= len(q) - 1 else q[i] + (q[i + 1] - q[i]) * (x - i)


@dataclass(frozen=True, slots=True)
class IterationModel:
    """Per-(model, GPU, tp) constants of the roofline, precomputed for the hot path.

    Iteration time = overhead + s_seq · num_seqs
                     + max(c_tok · num_tokens, m0 + m_kv · kv_tokens).

    ``s_seq`` (seconds per sequence in the batch: sampling, detokenization, output handling)
    and ``request_overhead_s`` (a request's fixed trip into and out of the engine: submit to
    first schedule plus last token to client, which adds to its TTFT and E2E but does not
    occupy the engine) come only from a calibration; the roofline leaves both at 0.
    """

    c_tok: float  # compute seconds per token
    m0: float  # seconds to stream the weights once
    m_kv: float  # seconds per KV token read
    overhead_s: float
    s_seq: float = 0.0  # seconds per sequence scheduled in an iteration
    request_overhead_s: float = 0.0  # per-request admission + egress latency (median)
    # Spread of the per-request overhead around its median: offsets at evenly spaced
    # quantiles (0 .. 1) of a measured distribution; () means a constant overhead.
    request_overhead_q: tuple[float, ...] = ()
    # The machine's speed over time: step-time factors at evenly spaced quantiles (median
    # about 1) of windows of ``slowdown_window_s``; each window of simulated time draws one
    # (``slowdown_at``). () means a steady machine.
    slowdown_q: tuple[float, ...] = ()
    slowdown_window_s: float = 1.0
    noise_seed: int = 0  # PerfParams.noise_seed: shifts every draw below

    def slowdown_at(self, t: float) -> float:
        """The step-time factor of the window holding time ``t``: a deterministic draw (a
        hash of the window's index) from ``slowdown_q``."""
        q = self.slowdown_q
        if not q:
            return 1.0
        return _draw(q, int(t // self.slowdown_window_s), 0xD1B54A32D192ED03,
                     0x8CB92BA72F3D8DD7 + self.noise_seed * _SEED_STEP)

    def request_overhead_for(self, request_id: int) -> float:
        """The overhead of one request: a deterministic draw (a hash of its id) from the
        measured distribution, so that a replay gives the same numbers every time."""
        q = self.request_overhead_q
        if not q:
            return self.request_overhead_s
        v = self.request_overhead_s + _draw(q, request_id, 0x9E3779B97F4A7C15,
                                            0x632BE59BD9B4E019 + self.noise_seed * _SEED_STEP)
        return v if v > 0.0 else 0.0

    def iteration_s(self, num_tokens: int, kv_tokens: int, num_seqs: int = 0) -> float:
        c = self.c_tok * num_tokens
        m = self.m0 + self.m_kv * kv_tokens
        return self.overhead_s + self.s_seq * num_seqs + (c if c > m else m)

    def decode_run_s(self, batch: int, kv0: int, n: int) -> float:
        """Total time of ``n`` decode iterations of a fixed ``batch`` whose KV starts at
        ``kv0`` tokens and grows by ``batch`` tokens per iteration (closed form)."""
        if n <= 0:
            return 0.0
        c = self.c_tok * batch
        a = self.m0 + self.m_kv * kv0  # memory time of iteration 0
        b = self.m_kv * batch  # growth per iteration
        # Iterations k < k_star are compute-bound (c >= a + b k), the rest memory-bound.
        if a >= c:
            k_star = 0
        elif b <= 0:
            k_star = n
        else:
            k_star = min(n, int(math.ceil((c - a) / b)))
        mem_n = n - k_star
        mem = mem_n * a + b * (k_star * mem_n + mem_n * (mem_n - 1) / 2.0)
        return n * (self.overhead_s + self.s_seq * batch) + k_star * c + mem

    def decode_iters_before(self, batch: int, kv0: int, n: int, horizon_s: float) -> int:
        """Largest m <= n such that the first m iterations all *start* at or before
        ``horizon_s`` (measured from the start of the run): decode_run_s(m-1) <= horizon_s."""
        if horizon_s < 0.0 or n <= 0:
            return 0
        lo, hi = 0, n  # invariant: iteration lo-1 starts at or before the horizon (or lo == 0)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.decode_run_s(batch, kv0, mid - 1) <= horizon_s:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def decode_tokens_per_s(self, batch: int, kv_tokens: int) -> float:
        if batch <= 0:
            return 0.0
        return batch / self.iteration_s(batch, kv_tokens, batch)


def iteration_model(
    catalog: Catalog, model: str, gpu: str, tp: int, perf: PerfParams = PerfParams()
) -> IterationModel:
    cal = perf.calibration.get(model, gpu) if perf.calibration is not None else None
    if cal is not None:
        return IterationModel(c_tok=cal.c_tok / tp, m0=cal.m0 / tp, m_kv=cal.m_kv / tp,
                              overhead_s=cal.overhead_s, s_seq=cal.s_seq or 0.0,
                              request_overhead_s=cal.request_overhead_s or 0.0,
                              request_overhead_q=tuple(cal.request_overhead_q or ()),
                              slowdown_q=tuple(cal.slowdown_q or ()),
                              slowdown_window_s=cal.slowdown_window_s or 1.0,
                              noise_seed=perf.noise_seed)
    m, g = catalog.model(model), catalog.gpu(gpu)
    eff = 1.0 if tp == 1 else perf.tp_efficiency
    flops = tp * g.flops * perf.mfu * eff
    bw = tp * g.hbm_bps * perf.mbu * eff
    return IterationModel(
        c_tok=2.0 * m.compute_params / flops,
        m0=m.weight_bytes / bw,
        m_kv=m.kv_bytes_per_token_at(tp) / bw,
        overhead_s=perf.overhead_s,
    )


def swap_s(
    catalog: Catalog, model: str, gpu: str, tp: int, warm: bool, perf: PerfParams = PerfParams()
) -> float:
    """Time to make ``model`` servable on an instance.

    Warm: weights held in host memory (vLLM sleep mode) cross the host link, per GPU in
    parallel. Cold: weights are read from disk and the engine starts.
    """
    cal = perf.calibration.get(model, gpu) if perf.calibration is not None else None
    if cal is not None and cal.swap_s is not None:
        return cal.swap_s
    m, g = catalog.model(model), catalog.gpu(gpu)
    per_gpu = m.weight_bytes / tp
    if warm:
        return perf.warm_wake_s + per_gpu / g.host_link_bps
    return perf.engine_start_s + per_gpu / g.disk_bps
