"""Solver latency on the scenario suite: every (scenario, load) row of
benchmarks/scenarios/loads.toml with the ``qlm`` policy, with per-epoch detail.

    PYTHONPATH=. .venv/bin/python benchmarks/solver_scaling/suite.py [--rows azure-conv:12,...]
        [--jobs 2] [--out out/solver-suite.json] [--epochs]

Per row: attainment, fallback % and causes, solve+build p50/p95 (what ``QLMPolicy`` records; wall), the CPU time of the same calls
(all threads; on a loaded machine closer to the quiet-machine wall time than the wall is),
and, from the epochs: build and CP-SAT p50/p95 separately, snapshot p50/p95 (not counted in
solve_ms), planning groups / instances p50/max, formulation counts, and CPU seconds summed
over the run: the planner's own Python (each solve call less its CP-SAT search), CP-SAT,
the snapshot, and the whole run. ``--epochs`` keeps every
epoch's record in the output (for finding the slow ones). The machine's load average is
stored with each row: wall-clock figures on a shared machine are noisy; attainment is not
(CP-SAT runs in deterministic time in what-if runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "scenarios"))


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else None


def run_row(job: tuple[str, float, bool]) -> dict:
    name, load, keep_epochs = job
    import qlm_opt.planner.cpsat as cpsat_mod
    import qlm_opt.policies.qlm as qlm_mod
    from run import run_one

    epochs: list[dict] = []
    real_solve = qlm_mod.solve
    real_snapshot = qlm_mod.QLMPolicy.snapshot
    real_run_cpsat = cpsat_mod._run_cpsat
    last_snap = [0.0, 0.0]  # wall ms, CPU ms
    cpsat_cpu = [0.0]

    def snapshot(self, now):
        t0, c0 = time.perf_counter(), time.process_time()
        out = real_snapshot(self, now)
        last_snap[0] = (time.perf_counter() - t0) * 1000
        last_snap[1] = (time.process_time() - c0) * 1000
        return out

    def run_cpsat(model, preset, build_s=0.0):
        c0 = time.process_time()
        try:
            return real_run_cpsat(model, preset, build_s)
        finally:
            cpsat_cpu[0] += (time.process_time() - c0) * 1000

    def solve(pi, preset=None, hint=None):
        cpsat_cpu[0] = 0.0
        c0 = time.process_time()  # CPU of all threads: less sensitive to the machine's load
        plan = real_solve(pi, preset, hint=hint)
        cpu_ms = (time.process_time() - c0) * 1000
        epochs.append({
            "groups": len(pi.groups), "instances": len(pi.instances),
            "formulation": plan.formulation, "status": str(plan.status),
            "cause": plan.fallback_cause, "build_ms": plan.build_ms,
            "solve_ms": plan.solve_ms, "snapshot_ms": last_snap[0], "cpu_ms": cpu_ms,
            # the planner's own Python: the solve call's CPU less CP-SAT's
            "python_cpu_ms": cpu_ms - cpsat_cpu[0], "snapshot_cpu_ms": last_snap[1],
            "stats": getattr(plan, "model_stats", None),
        })
        return plan

    qlm_mod.solve = solve
    qlm_mod.QLMPolicy.snapshot = snapshot
    cpsat_mod._run_cpsat = run_cpsat
    run_c0 = time.process_time()
    try:
        r = run_one((name, load, "qlm"))
    finally:
        qlm_mod.solve = real_solve
        qlm_mod.QLMPolicy.snapshot = real_snapshot
        cpsat_mod._run_cpsat = real_run_cpsat
    run_cpu_s = time.process_time() - run_c0
    b = [e["build_ms"] for e in epochs]
    s = [e["solve_ms"] for e in epochs]
    sn = [e["snapshot_ms"] for e in epochs]
    cpu = [e["cpu_ms"] for e in epochs]
    g = [e["groups"] for e in epochs]
    forms: dict[str, int] = {}
    for e in epochs:
        forms[e["formulation"]] = forms.get(e["formulation"], 0) + 1
    row = {k: r[k] for k in ("scenario", "load", "attainment", "num_requests", "num_epochs",
                             "fallback_pct", "fallback_causes", "solve_ms_p50",
                             "solve_ms_p95", "wall_s")}
    row.update({
        "build_ms_p50": _pct(b, 50), "build_ms_p95": _pct(b, 95),
        "cpsat_ms_p50": _pct(s, 50), "cpsat_ms_p95": _pct(s, 95),
        "snapshot_ms_p50": _pct(sn, 50), "snapshot_ms_p95": _pct(sn, 95),
        "snapshot_ms_total": float(sum(sn)),
        "cpu_ms_p50": _pct(cpu, 50), "cpu_ms_p95": _pct(cpu, 95),
        "planner_python_cpu_s": sum(e["python_cpu_ms"] for e in epochs) / 1000,
        "snapshot_cpu_s": sum(e["snapshot_cpu_ms"] for e in epochs) / 1000,
        "cpsat_cpu_s": sum(e["cpu_ms"] - e["python_cpu_ms"] for e in epochs) / 1000,
        "run_cpu_s": run_cpu_s,
        "groups_p50": _pct(g, 50), "groups_max": max(g) if g else None,
        "formulations": forms, "loadavg": os.getloadavg()[0],
    })
    if keep_epochs:
        row["epochs"] = epochs
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="", help="scenario:load,... (default: all 18)")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("out/solver-suite.json"))
    ap.add_argument("--epochs", action="store_true", help="keep per-epoch records")
    a = ap.parse_args()
    from run import read_loads

    if a.rows:
        jobs = [(p.split(":")[0], float(p.split(":")[1]), a.epochs)
                for p in a.rows.split(",")]
    else:
        jobs = [(s, x, a.epochs) for s, xs in read_loads().items() for x in xs]
    rows = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for r in pool.map(run_row, jobs):
            rows.append(r)
            print(f"{r['scenario']:<12} x{r['load']:<6g} att {100 * r['attainment']:.2f}% "
                  f"fb {r['fallback_pct'] or 0:.1f}% p50 {r['solve_ms_p50']:.1f} "
                  f"p95 {r['solve_ms_p95']:.1f} cpu p50/p95 {r['cpu_ms_p50'] or 0:.1f}/"
                  f"{r['cpu_ms_p95'] or 0:.1f} (build {r['build_ms_p95'] or 0:.1f} "
                  f"cpsat {r['cpsat_ms_p95'] or 0:.1f} snap {r['snapshot_ms_p95'] or 0:.1f}) "
                  f"groups p50 {r['groups_p50']} max {r['groups_max']} "
                  f"load {r['loadavg']:.1f} wall {r['wall_s']:.0f}s; build p50 "
                  f"{r['build_ms_p50'] or 0:.1f}; CPU s: planner Python "
                  f"{r['planner_python_cpu_s']:.2f} CP-SAT {r['cpsat_cpu_s']:.2f} snapshot "
                  f"{r['snapshot_cpu_s']:.2f} run {r['run_cpu_s']:.1f}", flush=True)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps({"rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
