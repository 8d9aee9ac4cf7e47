"""Run metrics: SLO attainment, latency percentiles, throughput, utilisation.

Attainment (design notes, "SLOs and attainment"): a request attains its SLO when its TTFT is at
or under its class target and, where the class sets one, its mean TPOT too. Dropped, rejected
and unfinished requests count as misses.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from qlm_opt.domain import Request, RequestState


def _pcts(xs: np.ndarray) -> dict[str, float | None]:
    if len(xs) == 0:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    p50, p90, p99 = np.percentile(xs, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(xs.mean())}


def summarize(
    requests: Sequence[Request], classes: Sequence[str], makespan_s: float
) -> dict:
    """Attainment overall and per class, TTFT/E2E percentiles, throughput."""
    n = len(requests)
    ok = np.fromiter((r.attained() for r in requests), dtype=bool, count=n)
    done = [r for r in requests if r.state == RequestState.FINISHED]
    ttft = np.array([r.first_token_at - r.arrived_at for r in done], dtype=float)
    e2e = np.array([r.completed_at - r.arrived_at for r in done], dtype=float)
    out_tokens = int(sum(r.num_generated for r in done))
    per_class = {}
    cls_arr = np.array([r.slo_class for r in requests], dtype=object)
    for c in classes:
        m = cls_arr == c
        cdone = [r for r in requests if r.slo_class == c and r.state == RequestState.FINISHED]
        per_class[c] = {
            "num_requests": int(m.sum()),
            "num_completed": len(cdone),
            "slo_attainment": float(ok[m].mean()) if m.any() else None,
            "ttft_s": _pcts(np.array([r.first_token_at - r.arrived_at for r in cdone])),
            "e2e_s": _pcts(np.array([r.completed_at - r.arrived_at for r in cdone])),
        }
    return {
        "num_requests": n,
        "num_completed": len(done),
        "num_dropped": n - len(done),
        "slo_attainment": float(ok.mean()) if n else None,
        "per_class": per_class,
        "ttft_s": _pcts(ttft),
        "e2e_s": _pcts(e2e),
        "output_tokens": out_tokens,
        "throughput_tokens_per_s": out_tokens / makespan_s if makespan_s > 0 else 0.0,
        "throughput_requests_per_s": len(done) / makespan_s if makespan_s > 0 else 0.0,
    }


def attainment_over_time(
    requests: Sequence[Request], classes: Sequence[str], num_bins: int = 60
) -> dict:
    """SLO attainment of requests binned by arrival time, overall and per class."""
    if not requests:
        return {"bin_start_s": [], "overall": [], "per_class": {}}
    t = np.array([r.arrived_at for r in requests])
    ok = np.array([r.attained() for r in requests], dtype=float)
    cls = np.array([r.slo_class for r in requests], dtype=object)
    edges = np.linspace(t.min(), t.max() + 1e-9, num_bins + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, num_bins - 1)

    def binned(mask: np.ndarray) -> list[float | None]:
        cnt = np.bincount(idx[mask], minlength=num_bins)
        hit = np.bincount(idx[mask], weights=ok[mask], minlength=num_bins)
        return [float(h / c) if c else None for h, c in zip(hit, cnt)]

    return {
        "bin_start_s": edges[:-1].tolist(),
        "overall": binned(np.ones(len(t), dtype=bool)),
        "per_class": {c: binned(cls == c) for c in classes},
    }
