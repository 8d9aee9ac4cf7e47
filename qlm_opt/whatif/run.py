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
from qlm_opt.core.batch_feed import FeedRule
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
    feed_rule=None,
    seed: int = 0,
) -> PolicyRun:
    """Simulate ``requests`` (fresh objects, sorted by arrival) under one policy.

    ``track_rwt`` records the RWT estimator's predicted against observed waits (about half
    the run time of a simple policy).

    Batch jobs (the workload's ``[[batch_jobs]]``): with ``feed_rule`` (a
    ``qlm_opt.core.batch_feed.FeedRule``) their lines are generated here (``seed``) and fed
    into the queue by that rule, as the server's batch runner feeds them; ``requests`` is then
    the traffic alone. The run's requests are the traffic and every line, and its metrics gain
    ``batch_jobs`` (``job_report`` per job)."""
    t0 = time.perf_counter()
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    policy = make_policy(policy_name, workload=workload, fleet=fleet, **(policy_options or {}))
    policy.make_deterministic()  # the same seed must give the same report
    rt.bind(policy)
    from qlm_opt.whatif.accuracy import RWTTracker

    # predicted vs observed waits, for every policy
    tracker = RWTTracker(rt, workload) if track_rwt else None
    feed = None
    if feed_rule is not None and workload.data.batch_jobs:
        from qlm_opt.whatif.batch_jobs import BatchFeed

        feed = BatchFeed(sim, rt, policy, workload, feed_rule,
                         max((r.id for r in requests), default=-1) + 1, seed)
    last_arrival = requests[-1].arrived_at if requests else 0.0
    if feed is not None:
        last_arrival = max(last_arrival, feed.last_window_end_at)
    until_at = last_arrival + drain_s
    if sample_s is None:
        sample_s = max(1.0, last_arrival / 200.0)
    series: list[tuple[float, int]] = []

    def active() -> bool:
        return (sim.arrivals_left > 0 or rt.num_outstanding > 0
                or (feed is not None and feed.active()))

    def sample() -> None:
        q = policy.num_queued() + sum(i.engine.stats().num_waiting for i in rt.instances)
        series.append((sim.now(), q))
        if active():
            sim.call_at(sim.now() + sample_s, sample)

    sim.call_at(0.0, sample)
    rt.start_epochs(0.0, active)

    def arrive(req: Request) -> None:
        if feed is not None:
            feed.arrived(req)
        rt.accept(req)
        policy.on_arrival(req)

    end_at = sim.run(requests, arrive, until_at=until_at, on_progress=on_progress)
    for r in requests:
        if not r.is_done:
            r.state = RequestState.DROPPED
            r.drop_reason = "unfinished_at_horizon"
    if feed is not None:
        feed.finish()
        requests = requests + feed.lines
    finished = [r.completed_at for r in requests if r.completed_at is not None]
    makespan = (max(finished) if finished else end_at) - (requests[0].arrived_at if requests else 0)
    metrics = summarize(requests, list(workload.classes), makespan)
    busy = sum(i.engine.busy_s for i in rt.instances)
    metrics["gpu_utilization"] = busy / (len(rt.instances) * makespan) if makespan > 0 else 0.0
    metrics["num_swaps"] = rt.lso_counts["swap"]
    metrics["num_evictions"] = rt.lso_counts["evict"]
    metrics["num_preemptions"] = sum(i.engine.num_preemptions for i in rt.instances)
    stats = [i.engine.stats() for i in rt.instances]
    q = sum(st.prefix_query_tokens for st in stats)
    metrics["prefix_cache_hit_rate"] = (
        sum(st.prefix_hit_tokens for st in stats) / q if q else None)
    metrics["lso_counts"] = dict(rt.lso_counts)
    metrics["makespan_s"] = makespan
    metrics["drop_reasons"] = _count(r.drop_reason for r in requests if r.drop_reason)
    metrics["sim_events"] = sim.num_events
    if tracker is not None:
        metrics["rwt"] = tracker.report()
    metrics.update(policy.report())
    if feed is not None:
        metrics["batch_jobs"] = feed.report()
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
    feed_rule=None,
) -> dict:
    """Run every policy on the identical workload; returns the report dict and the runs.

    ``bound``: also compute the upper bound U on attainment (``qlm_opt.whatif.bound``) for the same
    request list; the report gains ``bound`` and each policy ``gap_to_bound`` (U minus its
    attainment, as a fraction).

    The workload's batch jobs (``[[batch_jobs]]``) have their lines fed into the queue by
    ``feed_rule`` (default ``FeedRule()``, the server's defaults), as the server's batch
    runner does; the report gains ``batch_jobs`` per policy (``job_report``)."""
    t0 = time.perf_counter()
    workload.check_models(fleet.catalog)
    make = prepare_requests(trace, workload, seed)
    rule = None
    if workload.data.batch_jobs:

        rule = feed_rule or FeedRule()
        make_traffic = prepare_requests(trace, workload, seed, with_batch_lines=False)
    else:
        make_traffic = make
    sim_seed = workload.data.seed if seed is None else seed
    runs: dict[str, PolicyRun] = {}
    num_requests = 0
    for name in policies:
        reqs = make_traffic()
        total = len(reqs) + sum(j.num_lines for j in workload.data.batch_jobs)
        cb = (lambda i, n=name, tot=total: progress(n, i, tot)) if progress else None
        run = run_policy(name, fleet, workload, reqs, drain_s=drain_s, on_progress=cb,
                         feed_rule=rule, seed=sim_seed)
        num_requests = len(run.requests)
        if progress:
            progress(name, total, total)
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


def batch_jobs_table(report: dict):
    """A table of the workload's batch jobs per policy (lines done, inside the window,
    expired, p50/p99 completion, last line as a fraction of the window); None without
    batch jobs."""
    rows = [(name, job, r) for name, m in report["policies"].items()
            for job, r in (m.get("batch_jobs") or {}).items()]
    if not rows:
        return None
    from rich.table import Table

    t = Table(title="batch jobs (lines fed by the server's rule; completion from submission)")
    for col in ("policy", "job", "lines", "done", "in window", "expired", "failed",
                "p50 done", "p99 done", "last at", "peak in flight"):
        t.add_column(col, justify="left" if col in ("policy", "job") else "right")

    def s(x: float) -> str:
        return "-" if x is None or x != x else f"{x:.0f} s"

    for name, job, r in rows:
        frac = r["completion_window_fraction"]
        t.add_row(name, job, str(r["num_lines"]), str(r["num_done"]),
                  f"{r['num_in_window']} ({100 * r['in_window']:.1f}%)", str(r["num_expired"]),
                  str(r["num_failed"]), s(r["p50_completion_s"]), s(r["p99_completion_s"]),
                  "-" if frac is None or frac != frac else f"{frac:.2f} w",
                  str(r.get("peak_lines_in_flight", "-")))
    return t


def simulate_batch_jobs(policy_name: str, fleet, workload: Workload, traffic: list[Request],
             rule: FeedRule | None = None, drain_s: float = 3600.0, seed: int = 0,
             policy_options: dict | None = None) -> list[Request]:
    """A what-if run of ``traffic`` (sorted by arrival) plus the workload's batch jobs fed
    into the queue by ``rule``, as the server does (``qlm_opt.whatif.run.run_policy``). At a
    job's window end its lines still in flight are cancelled and unfed lines never run
    (``batch_expired``). Returns every request: the traffic and all lines (``job_report``
    reads the lines)."""
    run = run_policy(policy_name, fleet, workload, traffic, drain_s=drain_s,
                     policy_options=policy_options, track_rwt=False,
                     feed_rule=rule or FeedRule(), seed=seed)
    return run.requests
