"""Workloads: traces (Azure LLM CSV 2023/2024, BurstGPT CSV, Mooncake JSONL, generic JSONL),
synthetic generators (independent requests; shared prefixes: system prompts and multi-turn
sessions), and the mapping of trace rows to models and SLO classes.

Every loader names the file and line of a bad row (``path:line: what is wrong``).

Prefix identity: a trace may carry, per request, one hash id per ``hash_block_tokens`` tokens
of its prompt (the Mooncake convention: 512-token blocks; two requests sharing a leading run
of ids share that prefix). Requests carry them to the engine's prefix cache.

Synthetic defaults are fitted on the Azure LLM inference trace 2023, conversation service
(19,366 requests over 3,502 s, 2023-11-16; Patel et al., "Splitwise", ISCA 2024, CC-BY 4.0):
  - arrivals: 5.53 req/s, inter-arrival coefficient of variation 1.09 (gamma process);
  - prompt tokens: lognormal, log-mean 6.633, log-std 0.985 (median 1,020);
  - output tokens: lognormal, log-mean 5.019, log-std 0.859 (median 129, max 1,000).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from qlm_opt.config import Workload
from qlm_opt.domain import Request
from qlm_opt.errors import WorkloadError
from qlm_opt.whatif.lengths import sample_lengths


@dataclass(frozen=True, slots=True)
class Trace:
    """Columns of a trace; ``arrived_at`` in seconds from the first request, sorted."""

    arrived_at: np.ndarray  # float64
    prompt_tokens: np.ndarray  # int64
    output_tokens: np.ndarray  # int64
    models: list[str] | None = None  # per-row model, when the trace names it
    classes: list[str] | None = None  # per-row SLO class, when the trace names it
    source: str = "<trace>"
    # per-row prefix hash ids, one per ``hash_block_tokens`` tokens of the prompt (None: the
    # trace has no prefix information)
    hash_ids: list[tuple[int, ...]] | None = None
    hash_block_tokens: int = 0

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
    return _load_csv_trace(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
                           "header TIMESTAMP,ContextTokens,GeneratedTokens", _azure_time)


def _azure_time(raw: str, where: str) -> float:
    try:
        return _parse_timestamp(raw)
    except ValueError:
        raise WorkloadError(f"{where}: bad TIMESTAMP {raw!r}") from None


def _load_csv_trace(path: Path | str, columns: tuple[str, str, str], header_hint: str,
                    time_of) -> Trace:
    """A CSV trace with a header naming its (arrival time, prompt tokens, output tokens)
    ``columns``; ``time_of(raw, where)`` parses a time or raises ``WorkloadError``. Every
    bad row is reported with its line number."""
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
        missing = [c for c in columns if c not in cols]
        if missing:
            raise WorkloadError(
                f"{path}:1: missing column(s) {', '.join(missing)}; expected {header_hint}")
        it, ip, io = (cols[c] for c in columns)
        width = max(it, ip, io) + 1
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{lineno}"
            if len(row) < width:
                raise WorkloadError(f"{where}: expected {len(header)} columns, got {len(row)}")
            ts.append(time_of(row[it], where))
            pr.append(_positive_int(row[ip], columns[1], where))
            out.append(_positive_int(row[io], columns[2], where))
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


def _make_trace(ts, pr, out, models, classes, source, hash_ids=None,
                hash_block_tokens: int = 0) -> Trace:
    t = np.asarray(ts, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]

    def pick(xs):
        return [xs[i] for i in order]

    return Trace(
        arrived_at=t,
        prompt_tokens=np.asarray(pr, dtype=np.int64)[order],
        output_tokens=np.maximum(np.asarray(out, dtype=np.int64)[order], 1),
        models=pick(models) if models else None,
        classes=pick(classes) if classes else None,
        source=source,
        hash_ids=pick(hash_ids) if hash_ids is not None else None,
        hash_block_tokens=hash_block_tokens if hash_ids is not None else 0,
    )


MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces


def load_mooncake_jsonl(path: Path | str, block_tokens: int = MOONCAKE_BLOCK_TOKENS) -> Trace:
    """Mooncake (FAST'25) trace: one JSON object per line with ``timestamp`` (milliseconds
    from the start), ``input_length``, ``output_length`` and ``hash_ids`` (one id per
    ``block_tokens`` tokens of the prompt, the last block possibly partial)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise WorkloadError(f"{path}: file not found") from None
    ts: list[float] = []
    pr: list[int] = []
    out: list[int] = []
    hs: list[tuple[int, ...]] = []
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
        for key in ("timestamp", "input_length", "output_length", "hash_ids"):
            if key not in obj:
                raise WorkloadError(f"{where}: missing '{key}'")
        t = obj["timestamp"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) \
                or t < 0:
            raise WorkloadError(f"{where}: timestamp must be milliseconds >= 0, got {t!r}")
        n_in = _positive_int(obj["input_length"], "input_length", where)
        n_out = _positive_int(obj["output_length"], "output_length", where)
        ids = obj["hash_ids"]
        if not isinstance(ids, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in ids):
            raise WorkloadError(f"{where}: hash_ids must be a list of integers")
        need = -(-n_in // block_tokens)
        if len(ids) != need:
            raise WorkloadError(
                f"{where}: {len(ids)} hash_ids for input_length {n_in}; expected {need} "
                f"(one per {block_tokens} tokens)")
        ts.append(t / 1000.0)
        pr.append(n_in)
        out.append(n_out)
        hs.append(tuple(ids))
    if not ts:
        raise WorkloadError(f"{path}: no requests")
    return _make_trace(ts, pr, out, None, None, str(path), hs, block_tokens)


BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")


def load_burstgpt_csv(path: Path | str) -> Trace:
    """BurstGPT trace (Wang et al., 2024): ``Timestamp`` (seconds), ``Model``, ``Request
    tokens``, ``Response tokens``, ``Total tokens``, ``Log Type``. Only the timestamp and the
    two token counts are used: the ``Model`` column names the service (ChatGPT, GPT-4), not a
    catalog model, so the workload's model shares apply. Rows with 0 response tokens (failed
    requests in the original service) are kept with one output token."""
    return _load_csv_trace(
        path, BURSTGPT_COLUMNS,
        "BurstGPT's header Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type",
        _burstgpt_time)


def _burstgpt_time(raw: str, where: str) -> float:
    try:
        t = float(raw)
    except ValueError:
        raise WorkloadError(f"{where}: bad Timestamp {raw!r}") from None
    if not math.isfinite(t) or t < 0:
        raise WorkloadError(f"{where}: Timestamp must be seconds >= 0, got {raw!r}")
    return t


def _first_record(path: Path) -> str | None:
    """The first non-empty line of a text file (None when there is none)."""
    try:
        with path.open() as f:
            for line in f:
                if line.strip():
                    return line
    except FileNotFoundError:
        raise WorkloadError(f"{path}: file not found") from None
    return None


def load_trace(path: Path | str) -> Trace:
    """By extension and content: ``.jsonl``/``.json`` lines are Mooncake when the first
    record has ``input_length``, else the generic JSONL; a CSV whose header has ``Request
    tokens`` is BurstGPT, else Azure."""
    p = Path(path)
    first = _first_record(p)
    if p.suffix in (".jsonl", ".json"):
        if first is not None and '"input_length"' in first:
            return load_mooncake_jsonl(p)
        return load_jsonl(p)
    if first is not None and "Request tokens" in first:
        return load_burstgpt_csv(p)
    return load_azure_csv(p)


def synthetic_trace(workload: Workload, seed: int | None = None) -> Trace:
    """Arrivals (Poisson or gamma, optionally at a time-varying rate) and lognormal lengths
    (optionally a mixture) from the workload spec."""
    d = workload.data
    rng = np.random.default_rng(d.seed if seed is None else seed)
    if d.prefixes is not None:
        return synthetic_prefix_trace(workload, seed)
    rate = d.arrivals.rate_per_s * d.rate_scale
    if d.max_requests is not None:
        n = d.max_requests
    else:
        n = int(_RateProfile.of(d).cumulative(d.duration_s) * rate * 1.2) + 16
    t = _arrivals(d, rng, rate, n)
    if d.duration_s is not None:
        t = t[t < d.duration_s]
    if d.max_requests is not None:
        t = t[: d.max_requests]  # a profile's arrivals may run past n to cover duration_s
    n = len(t)
    if n == 0:
        raise WorkloadError("synthetic workload produced no requests")
    pr, out = sample_lengths(d.lengths, rng, n)
    return Trace(t, pr, out, source="synthetic")


class _RateProfile:
    """The piecewise-linear rate multiplier ``m(t)`` of ``arrivals.rate_profile`` and its
    cumulative ``M(t) = integral of m over [0, t]`` (seconds of base-rate traffic by time t).
    A process at the base rate in "operational time" tau, mapped through ``M^-1``, is the
    process at rate ``base * m(t)``: Poisson stays Poisson, and a gamma renewal process keeps
    its burstiness in operational time."""

    def __init__(self, points) -> None:
        t = np.array([p[0] for p in points], dtype=np.float64)
        m = np.array([p[1] for p in points], dtype=np.float64)
        if t[0] > 0:  # held at the first value before the first point
            t, m = np.concatenate(([0.0], t)), np.concatenate(([m[0]], m))
        self.t, self.m = t, m
        self.M = np.concatenate(([0.0], np.cumsum(np.diff(t) * (m[:-1] + m[1:]) / 2.0)))

    @staticmethod
    def of(d) -> _RateProfile:
        return _RateProfile(d.arrivals.rate_profile or [(0.0, 1.0)])

    def cumulative(self, x: float) -> float:
        """``M(x)``."""
        t, m, M = self.t, self.m, self.M
        if x >= t[-1]:
            return float(M[-1] + m[-1] * (x - t[-1]))
        i = int(np.searchsorted(t, x, side="right")) - 1
        u = x - t[i]
        s = (m[i + 1] - m[i]) / (t[i + 1] - t[i])
        return float(M[i] + m[i] * u + s * u * u / 2.0)

    def inverse(self, tau: np.ndarray) -> np.ndarray:
        """``M^-1(tau)``: the time M reaches tau (for a tau on a flat part of M, a zero
        rate, the end of that part); ``inf`` for a tau M never reaches (a final zero rate)."""
        t, m, M = self.t, self.m, self.M
        out = np.empty(len(tau))
        if m[-1] > 0:
            tail = tau >= M[-1]
            out[tail] = t[-1] + (tau[tail] - M[-1]) / m[-1]
        else:
            tail = tau > M[-1]
            out[tail] = np.inf
        x = tau[~tail]
        i = np.searchsorted(M, x, side="right") - 1
        i = np.minimum(i, len(t) - 2)
        a = m[i]
        s = (m[i + 1] - a) / (t[i + 1] - t[i])
        dv = x - M[i]
        # solve a*u + s*u^2/2 = dv for u >= 0 in the form that is stable for s -> 0
        den = a + np.sqrt(np.maximum(a * a + 2.0 * s * dv, 0.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(den > 0, 2.0 * dv / den, 0.0)
        out[~tail] = t[i] + u
        return out


def _arrivals(d, rng, rate: float, n: int) -> np.ndarray:
    """``n`` arrival times (from 0) of the workload's process at ``rate`` per second, or at
    ``rate`` times ``arrivals.rate_profile``: then the base process is drawn in operational
    time (extended until it covers ``duration_s``) and mapped through the profile's
    cumulative intensity, and arrivals past a final zero rate are dropped."""

    def gaps(k: int) -> np.ndarray:
        if d.arrivals.process == "poisson":
            return rng.exponential(1.0 / rate, size=k)
        shape = 1.0 / (d.arrivals.cv**2)
        return rng.gamma(shape, 1.0 / (rate * shape), size=k)

    g = gaps(n)
    if d.arrivals.rate_profile is None:
        return np.cumsum(g) - g[0]
    prof = _RateProfile(d.arrivals.rate_profile)
    tau = np.cumsum(g) - g[0]
    if d.duration_s is not None:
        need = prof.cumulative(d.duration_s)
        while tau[-1] < need:  # the margin fell short (a very bursty process)
            more = np.cumsum(gaps(max(16, len(tau) // 4))) + tau[-1]
            tau = np.concatenate((tau, more))
    t = prof.inverse(tau)
    return t[np.isfinite(t)]


def synthetic_prefix_trace(workload: Workload, seed: int | None = None) -> Trace:
    """Conversation traffic with shared prefixes, and its hash ids (``[prefixes]`` section).

    Sessions start by the workload's arrival process at ``rate / turns_mean``, so requests
    arrive at about the workload's rate. A session opens with one of ``num_system_prompts``
    system prompts (Zipf popularity ``system_prompt_zipf``) of about
    ``system_prompt_tokens`` tokens, then has a geometric number of turns (mean
    ``turns_mean``; 1 means single-turn) separated by exponential think times (mean
    ``think_time_s``). A turn's prompt is the whole conversation so far (previous prompt,
    previous answer) plus a new user message drawn from ``[lengths]``'s prompt distribution;
    its output from ``[lengths]``'s output distribution. Hash ids follow Mooncake: one per
    ``block_tokens`` tokens, equal between two prompts exactly on their common full blocks
    (a system prompt's, an earlier turn's); answers are not hashed (the engine caches
    prompt blocks only)."""
    d = workload.data
    P = d.prefixes
    rng = np.random.default_rng(d.seed if seed is None else seed)
    rate = d.arrivals.rate_per_s * d.rate_scale
    L = d.lengths
    B = P.block_tokens
    if d.max_requests is not None:
        n_sessions = d.max_requests
    else:
        n_sessions = int(_RateProfile.of(d).cumulative(d.duration_s) * rate / P.turns_mean
                         * 1.2) + 16
    starts = _arrivals(d, rng, rate / P.turns_mean, n_sessions)
    comps = L.components() if L.mixture is not None else None
    cw = np.asarray(L.weights()) if comps is not None else None
    next_id = 0

    def fresh(k: int) -> list[int]:
        nonlocal next_id
        ids = list(range(next_id, next_id + k))
        next_id += k
        return ids

    sys_len = np.clip(np.rint(rng.normal(P.system_prompt_tokens,
                                         0.1 * P.system_prompt_tokens, P.num_system_prompts)),
                      1, None).astype(np.int64)
    sys_ids = [fresh(-(-int(n) // B)) for n in sys_len]
    pop = 1.0 / np.arange(1, P.num_system_prompts + 1) ** P.system_prompt_zipf
    pop /= pop.sum()
    rows: list[tuple[float, int, int, tuple[int, ...]]] = []
    max_prompt = L.prompt_max
    for s_at in starts:
        if d.duration_s is not None and s_at >= d.duration_s:
            break
        k = int(rng.choice(P.num_system_prompts, p=pop))
        turns = int(rng.geometric(1.0 / P.turns_mean))
        at = float(s_at)
        ctx_len = int(sys_len[k])
        ctx_ids = sys_ids[k]
        for _ in range(turns):
            C = L if comps is None else comps[int(rng.choice(len(comps), p=cw))]
            user = int(np.clip(np.rint(rng.lognormal(C.prompt_log_mu, C.prompt_log_sigma)),
                               C.prompt_min, C.prompt_max))
            out = int(np.clip(np.rint(rng.lognormal(C.output_log_mu, C.output_log_sigma)),
                              C.output_min, C.output_max))
            prompt = ctx_len + user
            if prompt > max_prompt:
                break  # the conversation outgrew the context: the session ends
            keep = min(ctx_len // B, len(ctx_ids))  # the context's known full blocks
            ids = ctx_ids[:keep] + fresh(-(-prompt // B) - keep)
            rows.append((at, prompt, out, tuple(ids)))
            # the next turn's context: this prompt and its answer (the answer's blocks and
            # this prompt's partial last block are new content there)
            ctx_len = prompt + out
            ctx_ids = ids[: prompt // B]
            at += float(rng.exponential(P.think_time_s))
    rows.sort(key=lambda r: r[0])
    if d.duration_s is not None:
        rows = [r for r in rows if r[0] < d.duration_s]
    if d.max_requests is not None:
        rows = rows[: d.max_requests]
    if not rows:
        raise WorkloadError("synthetic prefix workload produced no requests")
    return Trace(
        arrived_at=np.array([r[0] for r in rows], dtype=np.float64),
        prompt_tokens=np.array([r[1] for r in rows], dtype=np.int64),
        output_tokens=np.array([r[2] for r in rows], dtype=np.int64),
        source="synthetic",
        hash_ids=[r[3] for r in rows],
        hash_block_tokens=B,
    )


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
                prefix_hashes=trace.hash_ids[k] if trace.hash_ids is not None else None,
                hash_block_tokens=trace.hash_block_tokens,
            )
        )
    if d.batch_jobs:  # Batch API jobs ([[batch_jobs]]) on top of the traffic
        from qlm_opt.whatif.batch_jobs import add_batch_jobs

        reqs = add_batch_jobs(reqs, workload, d.seed if seed is None else seed)
    return reqs


def prepare_requests(trace: Trace | None, workload: Workload, seed: int | None,
                     with_batch_lines: bool = True) -> Callable[[], list[Request]]:
    """A factory of identical fresh request lists (every policy mutates its own copy).
    ``with_batch_lines=False``: the traffic alone, without the lines of the workload's batch
    jobs (``run_policy`` feeds those)."""
    if trace is None:
        trace = synthetic_trace(workload, seed)
    if not with_batch_lines:
        from qlm_opt.whatif.batch_jobs import traffic_workload

        workload = traffic_workload(workload)
    return lambda: build_requests(trace, workload, seed)
