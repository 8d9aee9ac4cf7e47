"""How many simulated requests per wall-second does a what-if run reach?

Replays the shared Azure 2023 conversation trace (tiled end to end for more rows) at a higher
rate against a 16-instance fleet and times the simulation of each policy. Request objects are
built before the clock starts; the time covers the event loop, engines, policy and metrics.

    .venv/bin/python benchmarks/simulator_speed/run.py [--trace PATH] [--sizes 10000,100000]

Scenario-suite mode: rows of ``benchmarks/scenarios`` (scenario:rate-scale), each policy
timed ``--reps`` times, interleaved (rep 1 of every policy, then rep 2, ...), so that a change
in the machine's load hits every policy alike; the medians and each policy's speed relative
to edf's in the same run:

    .venv/bin/python benchmarks/simulator_speed/run.py \
        --scenarios azure-conv:12,prompt-heavy:23.63 --policies qlm,qlm-rwt,edf --reps 3

``--parts`` adds, per policy, the median CPU seconds spent inside four parts of the planned
policies (inclusive; the estimator's profile is also counted inside arrivals and snapshots):
arrivals (``on_arrival``), the RWT estimator's profile (``RWTEstimator._compute``), the
planning snapshot (``QLMPolicy.snapshot``) and the planner (``solve``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from qlm_opt.config import Fleet, Workload
from qlm_opt.whatif.workload import Trace, build_requests, load_azure_csv
from qlm_opt.whatif.run import run_policy

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "azure_llm_2023_conv.csv"

FLEET = {
    "name": "speed-16",
    "instances": [
        {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 8},
        {"gpu": "H100-80GB", "model": "mistral-7b", "count": 4},
        {"gpu": "A10", "model": "llama-3.2-1b", "count": 4},
    ],
}


def tiled(trace: Trace, n: int) -> Trace:
    reps = -(-n // len(trace))
    span = float(trace.arrived_at[-1]) + 1.0
    t = np.concatenate([trace.arrived_at + k * span for k in range(reps)])[:n]
    p = np.tile(trace.prompt_tokens, reps)[:n]
    o = np.tile(trace.output_tokens, reps)[:n]
    return Trace(t, p, o, source=trace.source)


PARTS = ("arrivals", "profile", "snapshot", "solve")


def _time_parts() -> dict[str, float]:
    """Wrap the parts ``--parts`` reports with CPU-second counters; returns the counters
    (zero them before each run)."""
    import qlm_opt.policies.qlm as qlm_mod
    from qlm_opt.core.estimator import RWTEstimator
    from qlm_opt.policies.qlm_rwt import QLMRWTPolicy

    acc = dict.fromkeys(PARTS, 0.0)

    def wrap(owner, attr: str, part: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            c0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                acc[part] += time.process_time() - c0

        setattr(owner, attr, timed)

    wrap(QLMRWTPolicy, "on_arrival", "arrivals")
    wrap(RWTEstimator, "_compute", "profile")
    wrap(qlm_mod.QLMPolicy, "snapshot", "snapshot")
    wrap(qlm_mod, "solve", "solve")
    return acc


def scenario_rows(specs: str, policies: list[str], reps: int,
                  max_requests: int | None, parts: bool = False) -> None:
    """Time each policy on each scenario-suite row; print medians and the ratio to edf."""
    sys.path.insert(0, str(REPO / "benchmarks" / "scenarios"))
    from run import _inputs  # the suite's own fleet, workload and trace per row

    from qlm_opt.whatif.run import prepare_requests

    print(f"{'scenario':>13} {'load':>6} {'policy':>8} {'requests':>8} {'wall s':>7} "
          f"{'req/s':>7} {'req/CPU-s':>9} {'vs edf':>7} {'SLO att.':>9} {'swaps':>5} "
          f"{'evict.':>6}", flush=True)
    for spec in specs.split(","):
        name, load = spec.split(":")
        fleet, wl, trace = _inputs(name, float(load))
        make = prepare_requests(trace, wl, None)
        walls: dict[str, list[float]] = {p: [] for p in policies}
        cpus: dict[str, list[float]] = {p: [] for p in policies}
        last: dict[str, dict] = {}
        part_s: dict[str, list[dict]] = {p: [] for p in policies}
        acc = _time_parts() if parts else None
        n = 0
        for _ in range(reps):
            for pol in policies:
                reqs = make()
                if max_requests:
                    reqs = reqs[:max_requests]
                n = len(reqs)
                if acc is not None:
                    acc.update(dict.fromkeys(acc, 0.0))
                t0, c0 = time.perf_counter(), time.process_time()
                run = run_policy(pol, fleet, wl, reqs, drain_s=3600.0, track_rwt=False)
                walls[pol].append(time.perf_counter() - t0)
                cpus[pol].append(time.process_time() - c0)
                if acc is not None:
                    part_s[pol].append(dict(acc))
                m = run.metrics
                if pol in last and last[pol]["slo_attainment"] != m["slo_attainment"]:
                    raise SystemExit(f"{name} {pol}: attainment differs between reps")
                last[pol] = m
        ref = statistics.median(walls["edf"]) if "edf" in walls else None
        for pol in policies:
            w = statistics.median(walls[pol])
            c = statistics.median(cpus[pol])
            m = last[pol]
            vs = f"{ref / w:>6.2f}x" if ref else f"{'-':>7}"
            print(f"{name:>13} {float(load):>6g} {pol:>8} {n:>8} {w:>7.2f} {n / w:>7.0f} "
                  f"{n / c:>9.0f} {vs} {100 * m['slo_attainment']:>8.2f}% "
                  f"{m['num_swaps']:>5} {m['num_evictions']:>6}", flush=True)
        if parts:
            for pol in policies:
                med = {k: statistics.median(d[k] for d in part_s[pol]) for k in PARTS}
                print(f"{'':>13} {'':>6} {pol:>8} CPU s of {statistics.median(cpus[pol]):.2f}: "
                      + ", ".join(f"{k} {v:.2f}" for k, v in med.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--policies", default=None,
                    help="default: fcfs,priority,shepherd,qlm-rwt (tiled trace), "
                         "qlm,qlm-rwt,edf (--scenarios)")
    ap.add_argument("--rate-scale", type=float, default=24.0)
    ap.add_argument("--scenarios", default=None,
                    help="scenario-suite rows name:rate-scale[,...] instead of the tiled trace")
    ap.add_argument("--reps", type=int, default=3, help="timed runs per policy (--scenarios)")
    ap.add_argument("--max-requests", type=int, default=None,
                    help="only the first N arrivals of each row (--scenarios)")
    ap.add_argument("--parts", action="store_true",
                    help="CPU seconds in arrivals, the estimator's profile, the snapshot and "
                         "the planner, per policy (--scenarios)")
    args = ap.parse_args()
    if args.scenarios:
        pols = (args.policies or "qlm,qlm-rwt,edf").split(",")
        scenario_rows(args.scenarios, pols, args.reps, args.max_requests, args.parts)
        return
    args.policies = args.policies or "fcfs,priority,shepherd,qlm-rwt"
    base = load_azure_csv(args.trace)
    fleet = Fleet.from_dict(FLEET)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        wl = Workload.from_dict({
            "name": f"conv-x{args.rate_scale:g}",
            "seed": 0,
            "max_requests": n,
            "rate_scale": args.rate_scale,
            "classes": {
                "interactive": {"ttft_s": 2.0, "share": 0.6, "priority": 0},
                "batch": {"ttft_s": 600.0, "share": 0.4, "priority": 1},
            },
            "models": {"llama-3.1-8b": 0.5, "mistral-7b": 0.3, "llama-3.2-1b": 0.2},
        })
        tr = tiled(base, n)
        for pol in args.policies.split(","):
            for track in (False, True):
                reqs = build_requests(tr, wl)
                t0 = time.perf_counter()
                run = run_policy(pol, fleet, wl, reqs, track_rwt=track)
                wall = time.perf_counter() - t0
                m = run.metrics
                rows.append((n, pol, "yes" if track else "no", wall, n / wall,
                             m["sim_events"], m["slo_attainment"], reqs[-1].arrived_at))
    print(f"{'requests':>9} {'policy':>9} {'RWT track':>9} {'wall s':>7} {'req/s':>8} "
          f"{'vs goal':>8} {'events':>8} {'sim span s':>10} {'SLO att.':>8}")
    for n, pol, track, wall, rps, ev, att, span in rows:
        print(f"{n:>9} {pol:>9} {track:>9} {wall:>7.2f} {rps:>8.0f} {rps / 20000:>7.2f}x "
              f"{ev:>8} {span:>10.0f} {100 * att:>7.1f}%")


if __name__ == "__main__":
    main()
