"""How fast is the CP-SAT planner, and how good, as epochs grow?

Prints one Markdown table row per (groups x instances) cell: p50/p95 of model build, solve
and end-to-end `solve()` wall time (ms), the solver's own optimality gap, how often it proved
optimality, and the on-time weight gained over the EDF/greedy fallback. Every plan is checked
with the independent validator.

Run from the repo root:
    .venv/bin/python benchmarks/solver_scaling/run.py                # full grid
    .venv/bin/python benchmarks/solver_scaling/run.py --seeds 3      # quicker
    .venv/bin/python benchmarks/solver_scaling/run.py --preset fast --cells 256x32
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

import numpy as np

from qlm_opt.planner.cpsat import solve
from qlm_opt.planner.fallback import fallback_plan
from qlm_opt.planner.presets import load_preset
from qlm_opt.planner.synthetic import random_instance
from qlm_opt.planner.validator import validate_plan

# (groups, instances, time limit s or None = the preset's). The last two are the goals:
# 256 x 32 within 100 ms, 1000 x 128 within 1 s (end-to-end, p95, 2 workers).
DEFAULT_CELLS = [
    (8, 2, None),
    (64, 8, None),
    (256, 32, None),
    (1000, 128, 0.7),
]


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run_cell(groups: int, instances: int, preset, seeds: int) -> dict:
    build, solve_ms, total, gaps, gains = [], [], [], [], []
    statuses: dict[str, int] = {}
    for seed in range(seeds):
        pi = random_instance(groups, instances, seed=1000 + seed, weights=preset.weights)
        t0 = time.perf_counter()
        plan = solve(pi, preset)
        total.append((time.perf_counter() - t0) * 1000)
        report = validate_plan(pi, plan)
        if not report.ok:
            raise AssertionError(f"invalid plan at {groups}x{instances} seed {seed}: {report.errors[:3]}")
        build.append(plan.build_ms)
        solve_ms.append(plan.solve_ms)
        if plan.gap is not None:
            gaps.append(plan.gap)
        statuses[plan.status] = statuses.get(plan.status, 0) + 1
        fb = fallback_plan(pi)
        gains.append((plan.on_time_weight - fb.on_time_weight) / max(fb.on_time_weight, 1))
    return dict(build=build, solve=solve_ms, total=total, gaps=gaps, gains=gains, statuses=statuses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="balanced")
    ap.add_argument("--seeds", type=int, default=10, help="random instances per cell")
    ap.add_argument("--cells", nargs="*", help="e.g. 256x32 1000x128 (default: the grid)")
    ap.add_argument("--time-limit", type=float, help="override every cell's time limit, s")
    args = ap.parse_args()

    base = load_preset(args.preset)
    cells = DEFAULT_CELLS
    if args.cells:
        cells = [(int(c.split("x")[0]), int(c.split("x")[1]), None) for c in args.cells]
    print(f"preset={base.name} workers={base.num_workers} seeds={args.seeds} "
          f"python={platform.python_version()} cpu={platform.processor() or platform.machine()}")
    print()
    print("| groups x inst | formulation | limit s | build p50/p95 ms | solve p50/p95 ms "
          "| total p50/p95 ms | gap p50/max | status | on-time weight vs EDF |")
    print("|---|---|---|---|---|---|---|---|---|")
    for groups, instances, limit in cells:
        pre = dataclasses.replace(base, max_groups=max(base.max_groups, groups))
        if args.time_limit is not None:
            pre = dataclasses.replace(pre, time_limit_s=args.time_limit)
        elif limit is not None:
            pre = dataclasses.replace(pre, time_limit_s=limit)
        form = "exact" if (pre.formulation == "exact" or (
            pre.formulation == "auto" and groups <= pre.exact_max_groups)) else "knapsack"
        r = run_cell(groups, instances, pre, args.seeds)
        gaps = r["gaps"]
        status = " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items()))
        print(
            f"| {groups} x {instances} | {form} | {pre.time_limit_s:g} "
            f"| {_pct(r['build'], 50):.0f} / {_pct(r['build'], 95):.0f} "
            f"| {_pct(r['solve'], 50):.0f} / {_pct(r['solve'], 95):.0f} "
            f"| {_pct(r['total'], 50):.0f} / {_pct(r['total'], 95):.0f} "
            f"| {(_pct(gaps, 50) * 100 if gaps else float('nan')):.2f}% / "
            f"{(max(gaps) * 100 if gaps else float('nan')):.2f}% "
            f"| {status} | {statistics.mean(r['gains']) * 100:+.1f}% |",
            flush=True,
        )


if __name__ == "__main__":
    main()
