"""What-if runs: replay one workload against one fleet under several policies.

Every policy sees the identical request list (same seed, same trace rows, same model and class
draws) and a fresh fleet. The result is a report (``report.json``), a table and plots.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import Request, RequestState
from qlm_opt.whatif.summary import attainment_over_time, summarize
from qlm_opt.policies import make_policy
from qlm_opt.core.runtime import Runtime
from qlm_opt.hosts.simulated import Simulator
from qlm_opt.whatif.workload import Trace, prepare_requests

log = logging.getLogger(__name__)


@dataclass
class PolicyRun:
    """One policy's run: its metrics and the requests it served."""

    name: str
    metrics: dict
    requests: list[Request]
    queue_series: list[tuple[float, int]] = field(default_factory=list)  # (at, queued)
    wall_s: float = 0.0


def run_policy(
    policy_name: str,
    fleet: Fleet,
    workload: Workload,
    requests: list[Request],
    drain_s: float = 3600.0,
    sample_s: float | None = None,
    on_progress: Callable[[int], None] | None = None,
    policy_options: dict | None = None,
    track_rwt: bool = True,
) -> PolicyRun:
    """Simulate ``requests`` (fresh objects, sorted by arrival) under one policy.

    ``track_rwt`` records the RWT estimator's predicted against observed waits (about half
    the run time of a simple policy)."""
    t0 = time.perf_counter()
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    policy = make_policy(policy_name, workload=workload, fleet=fleet, **(policy_options or {}))
    if hasattr(policy, "make_deterministic"):
        policy.make_deterministic()  # the same seed must give the same report
    rt.bind(policy)
    from qlm_opt.core.estimator import RWTTracker

    # predicted vs observed waits, for every policy
    tracker = RWTTracker(rt, workload) if track_rwt else None
    last_arrival = requests[-1].arrived_at if requests else 0.0
    until_at = last_arrival + drain_s
    if sample_s is None:
        sample_s = max(1.0, last_arrival / 200.0)
    series: list[tuple[float, int]] = []

    def active() -> bool:
        return sim.arrivals_left > 0 or rt.num_outstanding > 0

    def sample() -> None:
        q = policy.num_queued() + sum(i.engine.stats().num_waiting for i in rt.instances)
        series.append((sim.now(), q))
        if active():
            sim.call_at(sim.now() + sample_s, sample)

    sim.call_at(0.0, sample)
    if policy.epoch_s:

        def epoch() -> None:
            policy.on_epoch()
            if active():
                sim.call_at(sim.now() + policy.epoch_s, epoch)

        sim.call_at(0.0, epoch)

    def arrive(req: Request) -> None:
        rt.accept(req)
        policy.on_arrival(req)

    end_at = sim.run(requests, arrive, until_at=until_at, on_progress=on_progress)
    for r in requests:
        if not r.is_done:
            r.state = RequestState.DROPPED
            r.drop_reason = "unfinished_at_horizon"
    finished = [r.completed_at for r in requests if r.completed_at is not None]
    makespan = (max(finished) if finished else end_at) - (requests[0].arrived_at if requests else 0)
    metrics = summarize(requests, list(workload.classes), makespan)
    busy = sum(i.engine.busy_s for i in rt.instances)
    metrics["gpu_utilization"] = busy / (len(rt.instances) * makespan) if makespan > 0 else 0.0
    metrics["num_swaps"] = rt.lso_counts["swap"]
    metrics["num_evictions"] = rt.lso_counts["evict"]
    metrics["num_preemptions"] = sum(i.engine.num_preemptions for i in rt.instances)
    q = sum(getattr(i.engine, "prefix_query_tokens", 0) for i in rt.instances)
    metrics["prefix_cache_hit_rate"] = (
        sum(getattr(i.engine, "prefix_hit_tokens", 0) for i in rt.instances) / q if q else None)
    metrics["lso_counts"] = dict(rt.lso_counts)
    metrics["makespan_s"] = makespan
    metrics["drop_reasons"] = _count(r.drop_reason for r in requests if r.drop_reason)
    metrics["sim_events"] = sim.num_events
    if tracker is not None:
        metrics["rwt"] = tracker.report()
    if hasattr(policy, "report"):
        metrics.update(policy.report())
    wall = time.perf_counter() - t0
    metrics["wall_s"] = wall
    return PolicyRun(policy_name, metrics, requests, series, wall)


def _count(xs) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def run_whatif(
    policies: list[str],
    fleet: Fleet,
    workload: Workload,
    trace: Trace | None = None,
    seed: int | None = None,
    drain_s: float = 3600.0,
    progress: Callable[[str, int, int], None] | None = None,
    bound: bool = False,
) -> dict:
    """Run every policy on the identical workload; returns the report dict and the runs.

    ``bound``: also compute the upper bound U on attainment (``qlm_opt.whatif.bound``) for the same
    request list; the report gains ``bound`` and each policy ``gap_to_bound`` (U minus its
    attainment, as a fraction)."""
    t0 = time.perf_counter()
    workload.check_models(fleet.catalog)
    make = prepare_requests(trace, workload, seed)
    runs: dict[str, PolicyRun] = {}
    num_requests = 0
    for name in policies:
        reqs = make()
        num_requests = len(reqs)
        cb = (lambda i, n=name, tot=len(reqs): progress(n, i, tot)) if progress else None
        run = run_policy(name, fleet, workload, reqs, drain_s=drain_s, on_progress=cb)
        if progress:
            progress(name, len(reqs), len(reqs))
        runs[name] = run
    report = {
        "sim": {
            "num_requests": num_requests,
            "wall_s": time.perf_counter() - t0,
            "seed": workload.data.seed if seed is None else seed,
            "trace": trace.source if trace is not None else "synthetic",
            "workload": workload.name,
            "fleet": fleet.name,
            "num_instances": len(fleet.instances),
            "duration_s": max((r.arrived_at for r in runs[policies[0]].requests), default=0.0)
            if policies
            else 0.0,
        },
        "policies": {name: run.metrics for name, run in runs.items()},
        "series": {
            name: {
                "attainment": attainment_over_time(run.requests, list(workload.classes)),
                "queue": {
                    "at_s": [a for a, _ in run.queue_series],
                    "queued": [q for _, q in run.queue_series],
                },
            }
            for name, run in runs.items()
        },
    }
    if bound:
        from qlm_opt.whatif.bound import compute_bound

        bcb = (lambda stage, i, tot: progress(f"bound {stage}", i, tot)) if progress else None
        res = compute_bound(make(), workload, fleet, drain_s=drain_s, progress=bcb)
        report["bound"] = res.to_dict()
        for m in report["policies"].values():
            att = m.get("slo_attainment")
            m["gap_to_bound"] = None if att is None else res.slo_attainment - att
    return report


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_clean(v) for v in o]
    return o


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """``report.json`` plus PNG plots; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(_clean(report), indent=2, sort_keys=True))
    from qlm_opt.whatif.plots import plot_report

    return [path, *plot_report(report, out_dir)]
