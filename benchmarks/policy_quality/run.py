"""Which policy attains the most SLOs, at which throughput, as load grows?

The shared Azure 2023 conversation trace (real arrivals and lengths) replayed at three rates
against a two-GPU-type fleet serving three models, 60% interactive (2 s TTFT) and 40% batch
(10 min TTFT). Every policy sees the identical request list.

    .venv/bin/python benchmarks/policy_quality/run.py [--loads 4,6,8] [--duration 600]
        [--policies fcfs,edf,priority,shepherd,qlm-rwt,qlm,qlm-true-lengths] [--out out/policy_quality]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from qlm_opt.config import Fleet, Workload
from qlm_opt.whatif.workload import load_azure_csv
from qlm_opt.whatif.run import run_whatif

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TRACE = REPO.parent / "shared" / "data" / "azure_llm_2023_conv.csv"

FLEET = {
    "name": "a100x4-l4x2",
    "instances": [
        {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 2},
        {"gpu": "A100-80GB", "model": "mistral-7b", "count": 1},
        {"gpu": "A100-80GB", "model": "vicuna-13b", "count": 1},
        {"gpu": "L4", "model": "llama-3.2-1b", "count": 2},
    ],
}


def workload(rate_scale: float, duration_s: float) -> Workload:
    return Workload.from_dict({
        "name": f"conv-x{rate_scale:g}",
        "seed": 0,
        "duration_s": duration_s,
        "rate_scale": rate_scale,
        "classes": {
            "interactive": {"ttft_s": 2.0, "share": 0.6, "priority": 0},
            "batch": {"ttft_s": 600.0, "share": 0.4, "priority": 1},
        },
        "models": {"llama-3.1-8b": 0.45, "mistral-7b": 0.25, "vicuna-13b": 0.15,
                   "llama-3.2-1b": 0.15},
    })


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--loads", default="3,5,7")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--policies", default="fcfs,edf,priority,shepherd,qlm-rwt,qlm,qlm-true-lengths")
    ap.add_argument("--out", default=str(REPO / "out" / "policy_quality"))
    args = ap.parse_args()
    trace = load_azure_csv(args.trace)
    # vicuna-13b serves 4,096 tokens of context; longer prompts are rejected for every policy.
    fleet = Fleet.from_dict(FLEET)
    policies = args.policies.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for load in (float(x) for x in args.loads.split(",")):
        rep = run_whatif(policies, fleet, workload(load, args.duration), trace)
        results[f"{load:g}"] = rep
    wall = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(
        {k: {"sim": v["sim"], "policies": v["policies"]} for k, v in results.items()},
        indent=1, default=str))

    hdr = (f"{'load':>5} {'policy':>12} {'SLO att.':>8} {'inter.':>7} {'batch':>7} "
           f"{'vs fcfs':>8} {'vs edf':>7} {'tok/s':>7} {'tput vs best base':>17} "
           f"{'TTFT p50':>9} {'swaps':>6} {'evict':>6} {'solve p95 ms':>12}")
    print(f"fleet {FLEET['name']}, {len(policies)} policies, wall {wall:.0f} s")
    print(hdr)
    for load, rep in results.items():
        p = rep["policies"]
        base_tput = max(p[b]["throughput_tokens_per_s"]
                        for b in ("fcfs", "edf", "priority", "shepherd") if b in p)
        for name, m in p.items():
            pc = m["per_class"]
            solver = m.get("solver", {})
            ratio = lambda ref: (m["slo_attainment"] / p[ref]["slo_attainment"]  # noqa: E731
                                 if ref in p and p[ref]["slo_attainment"] else float("nan"))
            print(f"{load:>5} {name:>12} {100 * m['slo_attainment']:>7.1f}% "
                  f"{100 * pc['interactive']['slo_attainment']:>6.1f}% "
                  f"{100 * pc['batch']['slo_attainment']:>6.1f}% "
                  f"{ratio('fcfs'):>7.2f}x {ratio('edf'):>6.2f}x "
                  f"{m['throughput_tokens_per_s']:>7.0f} "
                  f"{m['throughput_tokens_per_s'] / base_tput:>16.2f}x "
                  f"{m['ttft_s']['p50'] or 0:>8.2f}s {m['num_swaps']:>6} {m['num_evictions']:>6} "
                  f"{solver.get('solve_ms_p95', float('nan')):>12.0f}")
    _plot(results, policies, out)


def _plot(results: dict, policies: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loads = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in policies:
        att = [100 * results[ld]["policies"][name]["slo_attainment"] for ld in loads]
        tput = [results[ld]["policies"][name]["throughput_tokens_per_s"] for ld in loads]
        axes[0].plot([float(x) for x in loads], att, marker="o", label=name)
        axes[1].plot([float(x) for x in loads], tput, marker="o", label=name)
    axes[0].set_xlabel("trace rate multiplier")
    axes[0].set_ylabel("SLO attainment (%)")
    axes[1].set_xlabel("trace rate multiplier")
    axes[1].set_ylabel("throughput (output tokens/s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Policy quality on the Azure 2023 conversation trace")
    fig.tight_layout()
    fig.savefig(out / "policy_quality.png", dpi=110)
    print(f"wrote {out / 'policy_quality.png'} and {out / 'results.json'}")


if __name__ == "__main__":
    main()
