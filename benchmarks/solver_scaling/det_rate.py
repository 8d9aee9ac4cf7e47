"""What a live planner's wall budget buys in CP-SAT deterministic time, and what the live
planner's latency is with 2 workers, on epochs captured from the scenario suite.

    PYTHONPATH=. .venv/bin/python benchmarks/solver_scaling/det_rate.py \
        [--rows prompt-heavy:15.94,batch-heavy:16,mooncake:8.61] [--every 3] [--min-groups 60]

What-if runs must be reproducible, so their CP-SAT search is limited in deterministic time:
``time_limit_s * deterministic_rate`` (``SolverPreset``). This script measures the rate that
makes a what-if plan get the search a live epoch gets. Per row it runs ``qlm`` (what-if) and
keeps every ``--every``-th epoch with at least ``--min-groups`` planning groups; then it solves
each kept epoch again, live (wall budget ``time_limit_s`` for build + search, the preset's
workers) and what-if (deterministic, at the preset's rate), with the epoch's own previous plan
as the hint. It prints, per row:

* live solve + build wall ms, p50 / p95 / max (the live planner's latency with its workers);
* the deterministic time the live search reached, p50 over epochs stopped by the limit, and
  the rate that implies (that p50 / ``time_limit_s``);
* the summed primary objective (on-time weight less swaps) of the live plans and of the
  what-if plans at the preset's rate: if the rate is right, they are close.

The rate depends on the machine and its load; measure on the machine the plans are for.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "scenarios"))


def capture(name: str, load: float, every: int, min_groups: int) -> list[tuple]:
    import qlm_opt.policies.qlm as qlm_mod
    from run import run_one

    kept: list[tuple] = []
    seen = [0]
    real = qlm_mod.solve

    def solve(pi, preset=None, hint=None):
        plan = real(pi, preset, hint=hint)
        if len(pi.groups) >= min_groups:
            seen[0] += 1
            if seen[0] % every == 0:
                kept.append((pi, preset, hint))
        return plan

    qlm_mod.solve = solve
    try:
        run_one((name, load, "qlm"))
    finally:
        qlm_mod.solve = real
    return kept


def _q(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def main() -> int:
    from qlm_opt.planner.cpsat import primary_objective, solve
    from qlm_opt.planner.plan import PlanStatus

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="prompt-heavy:15.94,batch-heavy:16,mooncake:8.61")
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--min-groups", type=int, default=60)
    args = ap.parse_args()
    print(f"{'row':22s} {'epochs':>6s} {'live ms p50/p95/max':>22s} {'limit-bound':>11s} "
          f"{'det p50':>8s} {'rate':>6s} {'obj live':>14s} {'obj what-if':>14s} {'ratio':>6s}")
    for spec in args.rows.split(","):
        name, load = spec.split(":")
        kept = capture(name, float(load), args.every, args.min_groups)
        if not kept:
            print(f"{spec:22s} no epoch with >= {args.min_groups} groups")
            continue
        wall, dets, obj_live, obj_det = [], [], 0, 0
        for pi, preset, hint in kept:
            live = dataclasses.replace(preset, deterministic=False)
            t0 = time.perf_counter()
            plan = solve(pi, live, hint=hint)
            wall.append((time.perf_counter() - t0) * 1000)
            if plan.status == PlanStatus.FEASIBLE:  # stopped by the limit, not by a proof
                dets.append(plan.search_det_s)
            w = pi.with_weights(live.weights)
            obj_live += primary_objective(w, plan)
            whatif = dataclasses.replace(preset, deterministic=True)
            obj_det += primary_objective(w, solve(pi, whatif, hint=hint))
        limit = kept[0][1].time_limit_s
        det50 = statistics.median(dets) if dets else float("nan")
        print(f"{spec:22s} {len(kept):6d} {_q(wall, .5):7.0f}/{_q(wall, .95):.0f}/{max(wall):.0f}"
              f"{'':>6s} {len(dets):11d} {det50:8.3f} {det50 / limit:6.2f} {obj_live:14d} "
              f"{obj_det:14d} {obj_det / max(obj_live, 1):6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
