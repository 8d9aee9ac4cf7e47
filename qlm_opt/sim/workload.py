"""Workloads: traces (Azure LLM CSV 2023/2024, JSONL), a synthetic generator, and the mapping
of trace rows to models and SLO classes.

Synthetic defaults are fitted on the Azure LLM inference trace 2023, conversation service
(19,366 requests over 3,502 s, 2023-11-16; Patel et al., "Splitwise", ISCA 2024, CC-BY 4.0):
  - arrivals: 5.53 req/s, inter-arrival coefficient of variation 1.09 (gamma process);
  - prompt tokens: lognormal, log-mean 6.633, log-std 0.985 (median 1,020);
  - output tokens: lognormal, log-mean 5.019, log-std 0.859 (median 129, max 1,000).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from qlm_opt.config import Workload
from qlm_opt.domain import Request
from qlm_opt.errors import WorkloadError


@dataclass(frozen=True, slots=True)
class Trace:
    """Columns of a trace; ``arrived_at`` in seconds from the first request, sorted."""

    arrived_at: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    models: list[str] | None = None  # per-row model, when the trace names it
    classes: list[str] | None = None  # per-row SLO class, when the trace names it
    source: str = "<trace>"

    def __len__(self) -> int:
        return len(self.arrived_at)


def _parse_timestamp(s: str) -> float:
    s = s.strip()
    try:
        return float(s)
    except ValueError:
        pass
    # Azure traces carry 7 fractional digits; datetime takes at most 6.
    if "." in s:
        head, frac = s.split(".", 1)
        frac = "".join(ch for ch in frac if ch.isdigit())[:6]
        s = f"{head}.{frac}"
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def _positive_int(v: str, what: str, where: str) -> int:
    try:
        n = int(float(v))
    except (TypeError, ValueError):
        raise WorkloadError(f"{where}: {what} is not a number: {v!r}") from None
    if n < 0:
        raise WorkloadError(f"{where}: {what} must be >= 0, got {n}")
    return n


def load_azure_csv(path: Path | str) -> Trace:
    """Azure LLM inference trace (2023 or 2024): ``TIMESTAMP,ContextTokens,GeneratedTokens``."""
    path = Path(path)
    try:
        f = path.open(newline="")
    except FileNotFoundError:
        raise WorkloadError(f"{path}: file not found") from None
    ts: list[float] = []
    pr: list[int] = []
    out: list[int] = []
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise WorkloadError(f"{path}: empty file")
        cols = {h.strip(): i for i, h in enumerate(header)}
        need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
        missing = [c for c in need if c not in cols]
        if missing:
            raise WorkloadError(
                f"{path}:1: missing column(s) {', '.join(missing)}; expected header "
                "TIMESTAMP,ContextTokens,GeneratedTokens"
            )
        it, ip, io = (cols[c] for c in need)
        width = max(it, ip, io) + 1
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{lineno}"
            if len(row) < width:
                raise WorkloadError(f"{where}: expected {len(header)} columns, got {len(row)}")
            try:
                ts.append(_parse_timestamp(row[it]))
            except ValueError:
                raise WorkloadError(f"{where}: bad TIMESTAMP {row[it]!r}") from None
            pr.append(_positive_int(row[ip], "ContextTokens", where))
            out.append(_positive_int(row[io], "GeneratedTokens", where))
    if not ts:
        raise WorkloadError(f"{path}: no requests")
    return _make_trace(ts, pr, out, None, None, str(path))


def load_jsonl(path: Path | str) -> Trace:
    """One JSON object per line: ``arrived_at`` (s) or ``timestamp``, ``prompt_tokens``,
    ``output_tokens``; optional ``model`` and ``slo_class``."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise WorkloadError(f"{path}: file not found") from None
    ts: list[float] = []
    pr: list[int] = []
    out: list[int] = []
    models: list[str | None] = []
    classes: list[str | None] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected a JSON object")
        t = obj.get("arrived_at", obj.get("timestamp"))
        if t is None:
            raise WorkloadError(f"{where}: missing 'arrived_at'")
        try:
            ts.append(_parse_timestamp(str(t)))
        except ValueError:
            raise WorkloadError(f"{where}: bad arrived_at {t!r}") from None
        for key, dst in (("prompt_tokens", pr), ("output_tokens", out)):
            if key not in obj:
                raise WorkloadError(f"{where}: missing '{key}'")
            dst.append(_positive_int(obj[key], key, where))
        models.append(obj.get("model"))
        classes.append(obj.get("slo_class"))
    if not ts:
        raise WorkloadError(f"{path}: no requests")
    return _make_trace(
        ts,
        pr,
        out,
        models if any(m is not None for m in models) else None,
        classes if any(c is not None for c in classes) else None,
        str(path),
    )


def _make_trace(ts, pr, out, models, classes, source) -> Trace:
    t = np.asarray(ts, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    pick = (lambda xs: [xs[i] for i in order]) if models or classes else None
    return Trace(
        arrived_at=t,
        prompt_tokens=np.asarray(pr, dtype=np.int64)[order],
        output_tokens=np.maximum(np.asarray(out, dtype=np.int64)[order], 1),
        models=pick(models) if models else None,
        classes=pick(classes) if classes else None,
        source=source,
    )


def load_trace(path: Path | str) -> Trace:
    """By extension: ``.jsonl`` or ``.json`` lines, otherwise Azure CSV."""
    p = Path(path)
    if p.suffix in (".jsonl", ".json"):
        return load_jsonl(p)
    return load_azure_csv(p)


def synthetic_trace(workload: Workload, seed: int | None = None) -> Trace:
    """Arrivals (Poisson or gamma) and lognormal lengths from the workload spec."""
    d = workload.data
    rng = np.random.default_rng(d.seed if seed is None else seed)
    rate = d.arrivals.rate_per_s * d.rate_scale
    if d.max_requests is not None:
        n = d.max_requests
    else:
        n = int(d.duration_s * rate * 1.2) + 16
    if d.arrivals.process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    else:
        shape = 1.0 / (d.arrivals.cv**2)
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    t = np.cumsum(gaps) - gaps[0]
    if d.duration_s is not None:
        t = t[t < d.duration_s]
        n = len(t)
    L = d.lengths
    pr = np.clip(
        np.rint(rng.lognormal(L.prompt_log_mu, L.prompt_log_sigma, n)), L.prompt_min, L.prompt_max
    ).astype(np.int64)
    out = np.clip(
        np.rint(rng.lognormal(L.output_log_mu, L.output_log_sigma, n)), L.output_min, L.output_max
    ).astype(np.int64)
    return Trace(t, pr, out, source="synthetic")


def build_requests(trace: Trace, workload: Workload, seed: int | None = None) -> list[Request]:
    """Map trace rows to requests: model and SLO class drawn from the spec's shares (unless the
    trace names them), arrival times divided by ``rate_scale`` for a trace replay, and cut at
    ``duration_s`` / ``max_requests``."""
    d = workload.data
    rng = np.random.default_rng((d.seed if seed is None else seed) + 7919)
    t = trace.arrived_at
    if trace.source != "synthetic":
        t = t / d.rate_scale
    n = len(t)
    if d.duration_s is not None:
        n = int(np.searchsorted(t, d.duration_s, side="left"))
    if d.max_requests is not None:
        n = min(n, d.max_requests)
    model_names = list(d.models)
    mp = np.array([d.models[m] for m in model_names], dtype=float)
    mi = rng.choice(len(model_names), size=n, p=mp / mp.sum())
    class_names = list(d.classes)
    cp = np.array([d.classes[c].share for c in class_names], dtype=float)
    ci = rng.choice(len(class_names), size=n, p=cp / cp.sum())
    reqs: list[Request] = []
    classes = workload.classes
    for k in range(n):
        model = trace.models[k] if trace.models and trace.models[k] else model_names[mi[k]]
        cname = trace.classes[k] if trace.classes and trace.classes[k] else class_names[ci[k]]
        cls = classes.get(cname)
        if cls is None:
            raise WorkloadError(
                f"{trace.source}: row {k + 1}: unknown slo_class {cname!r} "
                f"(workload has: {', '.join(classes)})"
            )
        at = float(t[k])
        reqs.append(
            Request(
                id=k,
                model=model,
                slo_class=cname,
                prompt_tokens=int(trace.prompt_tokens[k]),
                output_tokens=int(trace.output_tokens[k]),
                arrived_at=at,
                deadline_at=at + cls.ttft_s,
                tpot_s=cls.tpot_s,
                priority=cls.priority,
            )
        )
    return reqs
