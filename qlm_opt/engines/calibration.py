"""The calibration of the engine model against a live vLLM (``qlm-opt profile``): its data
type and the fits of the iteration model to measured steps.

A calibration file (TOML) stores, per (model, device), the ``IterationModel`` constants fitted
to measured iteration times, plus the measured swap (engine restart) time:

    device = "cpu"
    [models."tiny-llama-s0"]
    c_tok = 1.2e-5        # compute seconds per token in an iteration
    m0 = 0.0              # seconds to stream the weights once
    m_kv = 1.0e-8         # seconds per KV token read
    overhead_s = 0.004    # per-iteration overhead
    s_seq = 1.0e-4        # per-sequence seconds in an iteration
    request_overhead_s = 0.008  # per request: submit -> first schedule + last token -> client
    swap_s = 12.0         # measured: stop the engine, start it with another model
    kv_capacity_tokens = 32768
    block_size = 128
    max_num_batched_tokens = 4096
    [models."tiny-llama-s0".measurements]   # the raw points (for the record)

A fleet TOML points at it with ``[perf] calibration = "file"``; ``iteration_model()`` and
``swap_s()`` in ``engines/perf.py`` then use these constants for that model on that device.
The profiler that measures a live engine is ``qlm_opt.profiling.profiler``; the catalog and
fleet of a device outside the GPU table are in ``qlm_opt.profiling.devices``.
"""

from __future__ import annotations

import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelCalibration:
    """Fitted iteration-time constants of one model on one device (see ``IterationModel``)."""

    c_tok: float
    m0: float
    m_kv: float
    overhead_s: float
    s_seq: float | None = None  # seconds per sequence in an iteration
    request_overhead_s: float | None = None  # trip into and out of the engine (median)
    # per-request overhead minus its median at quantiles 0, 1/(n-1), .., 1 (see IterationModel)
    request_overhead_q: tuple[float, ...] | None = None
    # step-time factors of the machine's speed per window, at quantiles 0 .. 1
    slowdown_q: tuple[float, ...] | None = None
    slowdown_window_s: float | None = None
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
                kw = {k: m[k] for k in keys if k in m}
                for k in ("request_overhead_q", "slowdown_q"):
                    if kw.get(k) is not None:
                        kw[k] = tuple(float(x) for x in kw[k])
                models[name] = ModelCalibration(**kw)
            except TypeError as e:
                raise ConfigError(f"{path}: field 'models.{name}': {e}") from None
        if "device" not in d:
            raise ConfigError(f"{path}: field 'device': missing")
        return cls(d["device"], models, str(path))

    def save(self, path: Path | str, measurements: dict[str, dict] | None = None) -> Path:
        import tomli_w

        out: dict = {"device": self.device, "models": {}}
        for name, m in self.models.items():
            entry = {k: (list(v) if isinstance(v, tuple) else v)
                     for k in ModelCalibration.__slots__ if (v := getattr(m, k)) is not None}
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


def _refine(loss, best: np.ndarray, best_l: float, scale: np.ndarray) -> np.ndarray:
    """Coordinate refinement of non-negative parameters: scale each up and down by a
    shrinking step, and try dropping it to zero, while the loss improves."""
    step = 0.5
    while step > 1e-4:
        improved = False
        for i in range(len(best)):
            for f in (1 + step, 1 / (1 + step), 0.0):
                if f == 0.0 and best[i] == 0:
                    continue  # dropping a term already at zero changes nothing
                cand = best.copy()
                if f == 0.0:
                    cand[i] = 0.0
                else:
                    cand[i] = cand[i] * f if cand[i] > 0 else scale[i] * 1e-3 * f
                cl = loss(cand)
                if cl < best_l:
                    best, best_l, improved = cand, cl, True
        if not improved:
            step /= 2
    return best


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
    best = _refine(loss, best, best_l, scale)
    err = float(np.mean(np.abs(predict_iteration_s(best, t, k) - y) / y))
    return best, err


def predict_step_s(p, seqs, tokens, kv) -> np.ndarray:
    """``overhead + s_seq · seqs + max(c_tok · tokens, m0 + m_kv · kv)`` for
    p = (overhead, s_seq, c_tok, m0, m_kv): ``IterationModel.iteration_s`` on arrays."""
    return p[0] + p[1] * seqs + np.maximum(p[2] * tokens, p[3] + p[4] * kv)


def _nnls(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of columns: the best unconstrained fit over
    every subset of columns whose solution is non-negative."""
    n = a.shape[1]
    best, best_l = np.zeros(n), float(np.sum(y ** 2))
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        x, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
        if np.any(x < 0):
            continue
        full = np.zeros(n)
        full[cols] = x
        loss = float(np.sum((a @ full - y) ** 2))
        if loss < best_l:
            best, best_l = full, loss
    return best


def fit_step_model(seqs, tokens, kv, seconds) -> tuple[np.ndarray, float]:
    """Fit (overhead_s, s_seq, c_tok, m0, m_kv) >= 0 to measured engine steps (one point per
    iteration: sequences scheduled, tokens scheduled, KV tokens held, seconds) by least squares
    on the absolute error, so that the fitted times add up to the measured busy time (single
    step times are noisy on a shared CPU: a late step makes the next one look short, and
    absolute least squares averages that out). Starts from a linear non-negative fit
    (overhead + s_seq·seqs + c_tok·tokens + m_kv·kv) and refines it on the simulator's
    ``max(compute, memory)`` form. Returns the parameters and the relative error of the fit,
    sum |error| / sum seconds."""
    q = np.asarray(seqs, float)
    t = np.asarray(tokens, float)
    k = np.asarray(kv, float)
    y = np.asarray(seconds, float)
    a = np.column_stack([np.ones_like(y), q, t, k])
    lin = _nnls(a, y)
    best = np.array([lin[0], lin[1], lin[2], 0.0, lin[3]])

    def loss(p):
        return float(np.mean((predict_step_s(p, q, t, k) - y) ** 2))

    best_l = loss(best)
    scale = np.array([max(float(np.median(y)), 1e-9),
                      max(float(np.median(y / np.maximum(q, 1))), 1e-12),
                      max(float(np.median(y / np.maximum(t, 1))), 1e-12),
                      max(float(np.median(y)), 1e-9),
                      max(float(np.median(y / np.maximum(k, 1))), 1e-15)])
    best = _refine(loss, best, best_l, scale)
    err = float(np.sum(np.abs(predict_step_s(best, q, t, k) - y)) / max(float(np.sum(y)), 1e-12))
    return best, err
