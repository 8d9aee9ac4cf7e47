"""How long does the upper bound take on an hour of real traffic, against one what-if run?

Bounds the shared Azure 2023 conversation trace (one hour, 19,366 requests) on the built-in
6-instance example fleet at several rate scales, and times one ``fcfs`` what-if run of the same
request list as the baseline (the cheapest policy a user would run anyway). Prints one table.

    .venv/bin/python benchmarks/bound_scale/run.py [--rate-scales 1,3] [--duration 3600]
        [--no-baseline]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TRACE = REPO.parent / "shared" / "data" / "azure_llm_2023_conv.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate-scales", default="1,3")
    ap.add_argument("--duration", type=float, default=3600.0)
    ap.add_argument("--no-baseline", action="store_true", help="skip the fcfs what-if runs")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from qlm_opt.whatif.bound import compute_bound
    from qlm_opt.config import example_path
    from qlm_opt.config import Fleet, Workload
    from qlm_opt.whatif.workload import load_trace
    from qlm_opt.whatif.run import run_policy
    from qlm_opt.whatif.workload import prepare_requests

    trace = load_trace(TRACE)
    fleet = Fleet.load(example_path("fleet.toml"))
    t = Table(title=f"bound on {TRACE.name}, fleet {fleet.name} ({len(fleet.instances)} "
                    "instances), drain 3600 s")
    for col in ("rate scale", "requests", "U", "isolation", "status", "LP vars",
                "bound s", "fcfs run s", "bound / run", "fcfs att."):
        t.add_column(col, justify="right")
    for rs in (float(x) for x in args.rate_scales.split(",")):
        wl = Workload.load(example_path("workload.toml"))
        wl.data.rate_scale = rs
        wl.data.duration_s = args.duration
        make = prepare_requests(trace, wl, None)
        reqs = make()
        t0 = time.perf_counter()
        b = compute_bound(reqs, wl, fleet, drain_s=3600.0)
        bound_s = time.perf_counter() - t0
        run_s = att = None
        if not args.no_baseline:
            t0 = time.perf_counter()
            m = run_policy("fcfs", fleet, wl, make(), drain_s=3600.0, track_rwt=False).metrics
            run_s = time.perf_counter() - t0
            att = m["slo_attainment"]
        t.add_row(f"x{rs:g}", str(b.num_requests), f"{100 * b.slo_attainment:.1f}%",
                  f"{100 * b.isolation:.1f}%", b.status, str(b.lp.get("variables")),
                  f"{bound_s:.1f}", "-" if run_s is None else f"{run_s:.1f}",
                  "-" if run_s is None else f"{bound_s / run_s:.2f}",
                  "-" if att is None else f"{100 * att:.1f}%")
    Console(width=140).print(t)


if __name__ == "__main__":
    main()
