"""The scenario suite: every policy on six workload/fleet shapes at three loads.

Which policy attains the most SLOs, and what does each pay for it (throughput, swaps,
evictions, solver time)? Each scenario runs at three loads, chosen so that ``fcfs`` sits near
80%, 60% and 40% attainment (``--calibrate`` finds them and writes ``loads.toml``). Every
policy sees the identical request list of a (scenario, load).

    .venv/bin/python benchmarks/scenarios/run.py [--scenarios azure-conv,swap]
        [--policies fcfs,edf,priority,shepherd,qlm-rwt,qlm,qlm-true-lengths]
        [--jobs 2] [--out out/scenarios] [--calibrate]

It prints one table per scenario and writes ``results.json`` and one attainment-vs-load plot
per scenario into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import tomllib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data"
LOADS_FILE = HERE / "loads.toml"

BASELINES = ("fcfs", "edf", "priority", "shepherd")
POLICIES = (*BASELINES, "qlm-rwt", "qlm", "qlm-true-lengths")

CONV_CLASSES = {
    "interactive": {"ttft_s": 2.0, "share": 0.6, "priority": 0},
    "batch": {"ttft_s": 600.0, "share": 0.4, "priority": 1},
}
A100x4_L4x2 = [
    {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 2},
    {"gpu": "A100-80GB", "model": "mistral-7b", "count": 1},
    {"gpu": "A100-80GB", "model": "vicuna-13b", "count": 1},
    {"gpu": "L4", "model": "llama-3.2-1b", "count": 2},
]
FOUR_MODELS = {"llama-3.1-8b": 0.45, "mistral-7b": 0.25, "vicuna-13b": 0.15,
               "llama-3.2-1b": 0.15}


@dataclass(frozen=True)
class Scenario:
    """One workload shape on one fleet; ``trace`` None means the workload's synthetic
    generator, else a file under the shared data folder."""

    name: str
    what: str
    fleet: dict
    workload: dict
    trace: str | None = None
    # rate-scale bracket for --calibrate
    search: tuple[float, float] = (0.5, 40.0)
    prompt_cap: int | None = None  # drop longer prompts from the trace (context limits)
    extra: dict = field(default_factory=dict)


def _wl(name: str, classes: dict, models: dict, duration_s: float, **more) -> dict:
    return {"name": name, "seed": 0, "duration_s": duration_s, "classes": classes,
            "models": models, **more}


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "azure-conv", "shared Azure 2023 conversation trace; 4 models on 4xA100 + 2xL4",
        {"name": "a100x4-l4x2", "instances": A100x4_L4x2},
        _wl("azure-conv", CONV_CLASSES, FOUR_MODELS, 300.0),
        trace="azure_llm_2023_conv.csv", prompt_cap=4000,
    ),
    Scenario(
        "mooncake", "shared Mooncake conversation trace (12k-token prompts); 2 models on "
        "4xH100 + 2xA100",
        {"name": "h100x4-a100x2", "instances": [
            {"gpu": "H100-80GB", "model": "llama-3.1-8b", "count": 4},
            {"gpu": "A100-80GB", "model": "llama-3.2-1b", "count": 2}]},
        _wl("mooncake", {"interactive": {"ttft_s": 5.0, "share": 0.5, "priority": 0},
                         "batch": {"ttft_s": 600.0, "share": 0.5, "priority": 1}},
            {"llama-3.1-8b": 0.7, "llama-3.2-1b": 0.3}, 300.0),
        trace="mooncake_conversation.jsonl", prompt_cap=100_000,
    ),
    Scenario(
        "prompt-heavy", "synthetic ~2,000-token prompts, ~30-token outputs; 3 models on "
        "3xA100 + 3xL4; 30% interactive",
        {"name": "a100x3-l4x3", "instances": [
            {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 2},
            {"gpu": "A100-80GB", "model": "mistral-7b", "count": 1},
            {"gpu": "L4", "model": "llama-3.2-1b", "count": 3}]},
        _wl("prompt-heavy", {"interactive": {"ttft_s": 2.0, "share": 0.3, "priority": 0},
                             "batch": {"ttft_s": 600.0, "share": 0.7, "priority": 1}},
            {"llama-3.1-8b": 0.5, "mistral-7b": 0.2, "llama-3.2-1b": 0.3}, 300.0,
            lengths={"prompt_log_mu": 7.6, "prompt_log_sigma": 0.5, "prompt_max": 8000,
                     "output_log_mu": 3.4, "output_log_sigma": 0.6, "output_max": 512},
            arrivals={"process": "gamma", "rate_per_s": 5.0, "cv": 1.0}),
    ),
    Scenario(
        "bursty", "synthetic conversation lengths, gamma arrivals with CV 3.5; the example "
        "fleet",
        {"name": "a100x4-l4x2", "instances": A100x4_L4x2},
        _wl("bursty", CONV_CLASSES, FOUR_MODELS, 300.0,
            lengths={"prompt_max": 4000},
            arrivals={"process": "gamma", "rate_per_s": 5.53, "cv": 3.5}),
    ),
    Scenario(
        "swap", "4 models on 3 instances of two GPU types (2xA100 + 1xL4): swaps unavoidable",
        {"name": "a100x2-l4x1", "warm_swaps": True, "instances": [
            {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 1},
            {"gpu": "A100-80GB", "model": "vicuna-13b", "count": 1},
            {"gpu": "L4", "model": "llama-3.2-1b", "count": 1}]},
        _wl("swap", CONV_CLASSES, FOUR_MODELS, 300.0, lengths={"prompt_max": 4000}),
        search=(0.2, 20.0),
    ),
    Scenario(
        "batch-heavy", "shared Azure conversation trace, 80% batch / 20% interactive; the "
        "batch SLO is 2 min so that a 5-min replay can overload it",
        {"name": "a100x4-l4x2", "instances": A100x4_L4x2},
        _wl("batch-heavy", {"interactive": {"ttft_s": 2.0, "share": 0.2, "priority": 0},
                            "batch": {"ttft_s": 120.0, "share": 0.8, "priority": 1}},
            FOUR_MODELS, 300.0),
        trace="azure_llm_2023_conv.csv", prompt_cap=4000,
    ),
)}


# ------------------------------------------------------------------------------------ inputs
def _load_trace(sc: Scenario):
    from qlm_opt.whatif.workload import Trace, load_trace

    if sc.trace is None:
        return None
    path = DATA / sc.trace
    if sc.trace.endswith(".jsonl"):
        tr = _load_mooncake(path)
    else:
        tr = load_trace(path)
    if sc.prompt_cap is not None:
        keep = tr.prompt_tokens <= sc.prompt_cap
        tr = Trace(tr.arrived_at[keep], tr.prompt_tokens[keep], tr.output_tokens[keep],
                   source=tr.source)
    return tr


def _load_mooncake(path: Path):
    """Mooncake JSONL (``timestamp`` ms, ``input_length``, ``output_length``)."""
    from qlm_opt.whatif.workload import Trace, load_trace

    try:
        return load_trace(path)  # the project's loader, when it knows the format
    except Exception:  # noqa: BLE001 - older loaders: read the three columns here
        pass
    ts, pr, out = [], [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                o = json.loads(line)
                ts.append(o["timestamp"] / 1000.0)
                pr.append(o["input_length"])
                out.append(max(1, o["output_length"]))
    t = np.asarray(ts)
    order = np.argsort(t, kind="stable")
    return Trace(t[order] - t[order[0]], np.asarray(pr)[order], np.asarray(out)[order],
                 source=str(path))


def _inputs(name: str, load: float):
    from qlm_opt.config import Fleet, Workload

    sc = SCENARIOS[name]
    wl = Workload.from_dict({**sc.workload, "rate_scale": load})
    if sc.trace is None:
        # a synthetic workload's rate is its arrival rate times the load
        wl.data.rate_scale = load
    fleet = Fleet.from_dict(sc.fleet)
    return fleet, wl, _load_trace(sc)


def run_one(job: tuple[str, float, str]) -> dict:
    """One (scenario, load, policy) what-if run; returns the row of the table."""
    from qlm_opt.whatif.run import run_policy
    from qlm_opt.whatif.workload import prepare_requests

    name, load, policy = job
    fleet, wl, trace = _inputs(name, load)
    reqs = prepare_requests(trace, wl, None)()
    t0 = time.perf_counter()
    run = run_policy(policy, fleet, wl, reqs, drain_s=3600.0, track_rwt=False)
    wall = time.perf_counter() - t0
    m = run.metrics
    solver = m.get("solver") or {}
    epochs = solver.get("num_epochs", 0)
    fallback = solver.get("status_counts", {}).get("FALLBACK", 0)
    return {
        "scenario": name, "load": load, "policy": policy,
        "attainment": m["slo_attainment"],
        "per_class": {c: v["slo_attainment"] for c, v in m["per_class"].items()},
        "throughput_tok_s": m["throughput_tokens_per_s"],
        "num_requests": m["num_requests"],
        "num_swaps": m["num_swaps"], "num_evictions": m["num_evictions"],
        "num_epochs": epochs,
        "fallback_pct": 100.0 * fallback / epochs if epochs else None,
        "fallback_causes": solver.get("fallback_causes", {}),
        "solve_ms_p50": solver.get("solve_ms_p50"), "solve_ms_p95": solver.get("solve_ms_p95"),
        "wall_s": wall, "sim_req_per_s": m["num_requests"] / wall if wall > 0 else None,
    }


# ----------------------------------------------------------------------------- calibration
def _fcfs_attainment(name: str, load: float) -> float:
    return run_one((name, load, "fcfs"))["attainment"]


def calibrate(name: str, targets=(0.8, 0.6, 0.4)) -> list[float]:
    """Rate scales at which fcfs attains each target (bisection on log load)."""
    lo0, hi0 = SCENARIOS[name].search
    cache: dict[float, float] = {}

    def att(x: float) -> float:
        x = round(x, 3)
        if x not in cache:
            cache[x] = _fcfs_attainment(name, x)
        return cache[x]

    loads = []
    for tgt in targets:
        lo, hi = lo0, hi0
        for _ in range(9):
            mid = math.sqrt(lo * hi)
            if att(mid) > tgt:
                lo = mid
            else:
                hi = mid
        loads.append(round(math.sqrt(lo * hi), 2))
        print(f"  {name}: fcfs {att(loads[-1]):.1%} at x{loads[-1]} (target {tgt:.0%})",
              flush=True)
    return loads


def read_loads() -> dict[str, list[float]]:
    if not LOADS_FILE.exists():
        return {}
    return {k: list(v) for k, v in tomllib.loads(LOADS_FILE.read_text()).items()}


def write_loads(loads: dict[str, list[float]]) -> None:
    lines = ["# Rate scales per scenario where fcfs attains about 80%, 60% and 40%",
             "# (written by `benchmarks/scenarios/run.py --calibrate`)."]
    lines += [f'"{k}" = [{", ".join(f"{x:g}" for x in v)}]' for k, v in sorted(loads.items())]
    LOADS_FILE.write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------- reporting
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt="{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_table(name: str, rows: list[dict], bounds: dict | None = None) -> None:
    sc = SCENARIOS[name]
    print(f"\n### {name}: {sc.what}\n")
    classes = sorted({c for r in rows for c in r["per_class"]})
    head = ["load", "policy", "SLO att.", *classes, "vs best base", "tok/s", "swaps",
            "evict", "fallback", "solve p50", "solve p95", "sim req/s"]
    if bounds:
        head.insert(3, "gap to U")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for load in sorted({r["load"] for r in rows}):
        at_load = [r for r in rows if r["load"] == load]
        base = max((r["attainment"] for r in at_load if r["policy"] in BASELINES),
                   default=None)
        if bounds and load in bounds:
            u = bounds[load]
            print(f"| x{load:g} | **bound U** | {_pct(u['slo_attainment'])} | - | "
                  + " | ".join(_pct(u["per_class"].get(c)) for c in classes)
                  + " |" + " - |" * (len(head) - 4 - len(classes)))
        for r in at_load:
            ratio = r["attainment"] / base if base else None
            cells = [f"x{load:g}", r["policy"], _pct(r["attainment"])]
            if bounds:
                u = bounds.get(load, {}).get("slo_attainment")
                cells.append("-" if u is None else f"{100 * (u - r['attainment']):.1f} pt")
            cells += [_pct(r["per_class"].get(c)) for c in classes]
            cells += [_num(ratio, "{:.3f}"), _num(r["throughput_tok_s"]),
                      str(r["num_swaps"]), str(r["num_evictions"]),
                      "-" if r["fallback_pct"] is None else f"{r['fallback_pct']:.0f}%",
                      _num(r["solve_ms_p50"], "{:.1f}"), _num(r["solve_ms_p95"], "{:.1f}"),
                      _num(r["sim_req_per_s"])]
            print("| " + " | ".join(cells) + " |")


def plot(name: str, rows: list[dict], out: Path, bounds: dict | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    loads = sorted({r["load"] for r in rows})
    for pol in dict.fromkeys(r["policy"] for r in rows):
        ys = [next((r["attainment"] for r in rows if r["load"] == x and r["policy"] == pol),
                   np.nan) for x in loads]
        ax.plot(loads, [100 * y for y in ys], marker="o", label=pol)
    if bounds:
        ub = [bounds.get(x, {}).get("slo_attainment", np.nan) for x in loads]
        ax.plot(loads, [100 * y for y in ub], "k--", lw=2, label="upper bound U")
    ax.set_xlabel("load (rate scale)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compute_bounds(name: str, loads: list[float]) -> dict:
    """The attainment upper bound per load, where ``qlm_opt.whatif.bound`` exists."""
    try:
        from qlm_opt.whatif.bound import compute_bound
    except ImportError:
        return {}
    from qlm_opt.whatif.workload import prepare_requests

    out = {}
    for load in loads:
        fleet, wl, trace = _inputs(name, load)
        reqs = prepare_requests(trace, wl, None)()
        b = compute_bound(reqs, wl, fleet, drain_s=3600.0)
        out[load] = {"slo_attainment": b.slo_attainment,
                     "per_class": dict(b.per_class), "status": b.status,
                     "wall_s": b.wall_s}
        print(f"  bound {name} x{load:g}: U = {_pct(b.slo_attainment)} ({b.status}, "
              f"{b.wall_s:.0f} s)", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--out", type=Path, default=REPO / "out" / "scenarios")
    ap.add_argument("--calibrate", action="store_true",
                    help="find the fcfs 80/60/40%% loads and write loads.toml")
    ap.add_argument("--bound", action="store_true", help="also compute the upper bound U")
    ap.add_argument("--bounds", type=Path, default=None,
                    help="take U from the results.json of an earlier --bound run")
    ap.add_argument("--from-results", type=Path, default=None,
                    help="reprint (and --bound) the rows of an earlier results.json "
                         "instead of running the policies")
    a = ap.parse_args()
    names = [s for s in a.scenarios.split(",") if s]
    bad = [s for s in names if s not in SCENARIOS]
    if bad:
        print(f"run.py: error: unknown scenario {bad[0]!r} (known: {', '.join(SCENARIOS)})",
              file=sys.stderr)
        return 2
    loads = read_loads()
    if a.calibrate:
        with ProcessPoolExecutor(a.jobs) as pool:
            found = dict(zip(names, pool.map(calibrate, names)))
        loads.update(found)
        write_loads(loads)
        print(f"wrote {LOADS_FILE}")
        return 0
    missing = [s for s in names if s not in loads]
    if missing:
        print(f"run.py: error: no loads for {', '.join(missing)}; run with --calibrate",
              file=sys.stderr)
        return 2
    policies = [p for p in a.policies.split(",") if p]
    from qlm_opt.policies import policy_names

    unknown = [p for p in policies if p not in policy_names()]
    if unknown:
        print(f"run.py: error: unknown policy {unknown[0]!r} "
              f"(known: {', '.join(policy_names())})", file=sys.stderr)
        return 2
    jobs = [(s, x, p) for s in names for x in loads[s] for p in policies]
    t0 = time.perf_counter()
    rows: list[dict] = []
    if a.from_results is not None:
        rows = [r for r in json.loads(a.from_results.read_text())["rows"]
                if r["scenario"] in names and r["policy"] in policies]
        jobs = []
    with ProcessPoolExecutor(a.jobs) as pool:
        for r in pool.map(run_one, jobs):
            rows.append(r)
            print(f"  {r['scenario']:<12} x{r['load']:<5g} {r['policy']:<17} "
                  f"{_pct(r['attainment']):>6}  {r['wall_s']:.1f}s", file=sys.stderr,
                  flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    all_bounds = {}
    saved = json.loads(a.bounds.read_text())["bounds"] if a.bounds else {}
    for s in names:
        srows = [r for r in rows if r["scenario"] == s]
        if s in saved:
            bounds = {float(k): v for k, v in saved[s].items()}
        elif a.bound:
            bounds = compute_bounds(s, sorted({r["load"] for r in srows}) or loads[s])
        else:
            bounds = {}
        all_bounds[s] = bounds
        print_table(s, srows, bounds)
        plot(s, srows, a.out, bounds)
    (a.out / "results.json").write_text(json.dumps(
        {"rows": rows, "bounds": {s: {str(k): v for k, v in b.items()}
                                  for s, b in all_bounds.items()}}, indent=1))
    print(f"\n{len(rows)} rows ({len(jobs)} runs) in {time.perf_counter() - t0:.0f} s; "
          f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
