"""Capacity planning benchmark: time to answer on 2 cores, what-if runs saved by pruning
against an exhaustive search of the same space, and a run on the shared conversation trace
whose fleet is re-run with ``qlm-opt whatif``.

    .venv/bin/python benchmarks/capacity/run.py [--policy qlm] [--trace-policy qlm]
        [--workers 2] [--skip-trace] [--skip-ray] [--out out/bench-capacity]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from qlm_opt.whatif import capacity as cap
from qlm_opt.catalog import Catalog
from qlm_opt.config import Workload

REPO = Path(__file__).resolve().parents[2]
CONV = REPO.parent / "shared" / "data" / "azure_llm_2023_conv.csv"

# A small synthetic case where the whole space can be run: two models, four GPU types.
SMALL = {
    "name": "small-2models",
    "seed": 11,
    "duration_s": 40,
    "rate_scale": 5.0,
    "lengths": {"prompt_max": 4000, "output_max": 1024},
    "classes": {
        "interactive": {"ttft_s": 2.0, "share": 0.7, "priority": 0},
        "batch": {"ttft_s": 300.0, "share": 0.3, "priority": 1},
    },
    "models": {"qwen3-8b": 0.7, "gpt-oss-20b": 0.3},
}
SMALL_GPUS = ["L4", "A10", "L40S", "H100-80GB"]
SMALL_TARGETS = {"interactive": 0.95, "batch": 0.95}

# The shared Azure 2023 conversation trace, 600 s of it replayed 4x faster (150 s, about
# 3,300 requests), two current models, the GPU types.
CONV_WL = """name = "conv-2models"
seed = 0
duration_s = 150
rate_scale = 4.0
[lengths]
prompt_max = 8192
[classes.interactive]
ttft_s = 2.0
share = 0.6
priority = 0
[classes.batch]
ttft_s = 600.0
share = 0.4
priority = 1
[models]
"qwen3-8b" = 0.6
"gpt-oss-20b" = 0.4
"""
CONV_GPUS = "H100-80GB,L40S,L4"
CONV_TARGETS = "interactive=0.99,batch=0.99"


def small_search(runner, policy: str, prune: bool, stop_early: bool) -> tuple[dict, float]:
    t0 = time.perf_counter()
    res = cap.search(Catalog.default(), Workload.from_dict(SMALL), None, SMALL_GPUS,
                     cap.Prices.load(cap.default_prices_path()), SMALL_TARGETS, runner,
                     policy=policy, max_gpus_per_type=3, prune=prune, stop_early=stop_early,
                     max_runs=100_000)
    return res.report, time.perf_counter() - t0


def part_pruning(policy: str, workers: int, with_ray: bool) -> None:
    rows = []
    for label, prune, stop in (("exhaustive, full runs", False, False),
                               ("exhaustive, runs stop once missed", False, True),
                               ("fluid pruning, runs stop once missed (default)", True, True)):
        rep, wall = small_search(cap.LocalRunner(workers), policy, prune, stop)
        rows.append((label, "local", rep, wall))
    if with_ray:
        import ray

        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        try:
            rep, wall = small_search(cap.RayRunner(), policy, True, True)
        finally:
            ray.shutdown()
        rows.append(("fluid pruning, runs stop once missed (default)", "ray", rep, wall))
    base_runs, base_wall = rows[0][2]["search"]["runs"], rows[0][3]
    s0 = rows[0][2]["search"]
    print(f"\nA. Pruning, small synthetic case: {SMALL_GPUS}, <=3 GPUs per type, 2 models, "
          f"policy {policy}, {workers} workers; space {s0['space_size']} fleets, "
          f"{s0['space_size_after_pruning']} after pruning")
    print(f"{'search':<48} {'runner':>6} {'runs':>5} {'vs exh.':>8} {'wall s':>7} "
          f"{'vs exh.':>8}  answer")
    for label, runner, rep, wall in rows:
        a = rep["answer"]
        s = rep["search"]
        found = f"{a['fleet']} (${a['cost_per_hour']:.2f}/h)" if a else "none"
        print(f"{label:<48} {runner:>6} {s['runs']:>5} {s['runs'] / base_runs:>7.2f}x "
              f"{wall:>7.1f} {wall / base_wall:>7.2f}x  {found}")
    answers = {r[2]["answer"]["fleet"] if r[2]["answer"] else None for r in rows}
    print("same answer in every row: " + ("yes" if len(answers) == 1 else f"NO: {answers}"))
    d = rows[2][2]
    print(f"pruned search: {d['search']['runs']} runs ({d['search']['runs_to_answer']} up to "
          f"the answer, the rest in its batch), {d['num_cheaper_pruned']} cheaper fleets "
          f"pruned; the exhaustive search ran {base_runs}")


def part_trace(policy: str, workers: int, out: Path, exhaustive: bool) -> None:
    if not CONV.exists():
        print(f"\nB. skipped: {CONV} not found")
        return
    out.mkdir(parents=True, exist_ok=True)
    wl = out / "conv-workload.toml"
    wl.write_text(CONV_WL)
    capdir = out / "capacity"
    cmd = [sys.executable, "-m", "qlm_opt.cli", "capacity", "--workload", str(wl), "--trace",
           str(CONV), "--gpus", CONV_GPUS, "--class-target", CONV_TARGETS, "--policy", policy,
           "--workers", str(workers), "--max-gpus-per-type", "4", "--out", str(capdir), "-q"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        print(f"\nB. capacity failed ({r.returncode}): {r.stderr.strip()[-400:]}")
        return
    rep = json.loads((capdir / "report.json").read_text())
    a = rep["answer"]
    wdir = out / "whatif"
    cmd2 = [sys.executable, "-m", "qlm_opt.cli", "whatif", "--workload", str(wl), "--trace",
            str(CONV), "--fleet", str(capdir / "fleet.toml"), "--policy", policy, "--out",
            str(wdir), "-q"]
    t1 = time.perf_counter()
    r2 = subprocess.run(cmd2, capture_output=True, text=True)
    wall2 = time.perf_counter() - t1
    if r2.returncode != 0:
        print(f"\nB. whatif failed ({r2.returncode}): {r2.stderr.strip()[-400:]}")
        return
    wi = json.loads((wdir / "report.json").read_text())["policies"][policy]["per_class"]
    s = rep["search"]
    print(f"\nB. Shared conversation trace ({rep['num_requests']} requests over "
          f"{rep['span_s']:.0f} s), GPUs {CONV_GPUS}, <=4 per type, policy {policy}, "
          f"{workers} workers")
    print(f"time to answer: {wall:.1f} s ({s['runs']} what-if runs; space {s['space_size']} "
          f"fleets, {s['space_size_after_pruning']} after pruning; {rep['num_cheaper_pruned']} "
          f"cheaper fleets pruned; an unpruned search reaches this answer after "
          f"{s['exhaustive_runs_to_answer']} runs)")
    print(f"fleet found: {a['fleet']}, {a['num_gpus']} GPUs, ${a['cost_per_hour']:.2f}/h")
    print(f"{'class':<12} {'target':>7} {'search':>8} {'whatif re-run':>14} {'met':>4}")
    tg = rep["targets"]
    ok = True
    for c in tg:
        v = wi[c]["slo_attainment"]
        met = v is None or v >= tg[c]
        ok &= met
        print(f"{c:<12} {100 * tg[c]:>6.1f}% {100 * a['attainment'][c]:>7.2f}% "
              f"{100 * v:>13.2f}% {'yes' if met else 'NO':>4}")
    print(f"`qlm-opt whatif` re-run ({wall2:.1f} s) meets every target: {'yes' if ok else 'NO'}")
    if exhaustive:
        t2 = time.perf_counter()
        r3 = subprocess.run(cmd[:-3] + ["--out", str(out / "capacity-exhaustive"), "-q",
                                        "--no-prune"], capture_output=True, text=True)
        wall3 = time.perf_counter() - t2
        if r3.returncode != 0:
            print(f"exhaustive search failed ({r3.returncode}): {r3.stderr.strip()[-400:]}")
        else:
            ex = json.loads((out / "capacity-exhaustive" / "report.json").read_text())
            same = ex["answer"] and ex["answer"]["fleet"] == a["fleet"]
            print(f"exhaustive search of the same space (--no-prune): {ex['search']['runs']} "
                  f"runs, {wall3:.1f} s (with pruning: {s['runs']} "
                  f"runs, {wall:.1f} s = {wall / wall3:.2f}x), same answer: "
                  f"{'yes' if same else 'NO'}")
    for m in rep["cheaper_missed"]:
        att = ", ".join(f"{c} {'<=' if m['stopped_at_s'] is not None else ''}"
                        f"{100 * v:.1f}%" for c, v in m["attainment"].items() if v is not None)
        print(f"  cheaper, missed {','.join(m['missed_classes'])}: {m['fleet']} "
              f"(${m['cost_per_hour']:.2f}/h): {att}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="edf",
                    help="policy of part A's what-if runs (the exhaustive rows run every fleet)")
    ap.add_argument("--trace-policy", default="qlm", help="policy of part B")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-trace", action="store_true")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--trace-exhaustive", action="store_true",
                    help="also run part B without pruning, to check the pruned fleets miss")
    ap.add_argument("--out", type=Path, default=Path("out/bench-capacity"))
    args = ap.parse_args()
    try:
        import ray  # noqa: F401
        with_ray = not args.skip_ray
    except ImportError:
        with_ray = False
    part_pruning(args.policy, args.workers, with_ray)
    if not args.skip_trace:
        part_trace(args.trace_policy, args.workers, args.out, args.trace_exhaustive)
    return 0


if __name__ == "__main__":
    sys.exit(main())
