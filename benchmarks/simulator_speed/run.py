"""How many simulated requests per wall-second does a what-if run reach?

Replays the shared Azure 2023 conversation trace (tiled end to end for more rows) at a higher
rate against a 16-instance fleet and times the simulation of each policy. Request objects are
built before the clock starts; the time covers the event loop, engines, policy and metrics.

    .venv/bin/python benchmarks/simulator_speed/run.py [--trace PATH] [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--policies", default="fcfs,priority,shepherd,qlm-rwt")
    ap.add_argument("--rate-scale", type=float, default=24.0)
    args = ap.parse_args()
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
