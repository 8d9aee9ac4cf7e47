"""How accurate is the RWT estimator on traces it was not built on, with a prior that is not
the engine it predicts?

For each trace (the shared Azure conversation trace; the shared Mooncake conversation trace,
whose prompts carry prefix hash ids) at three loads, the fleet's engines run a *perturbed*
engine model (``--truth``: lower efficiencies and a higher overhead than the datasheet) while
the scheduler's estimator starts from the datasheet roofline (``--prior datasheet``, the
fleet's ``[estimator] prior``) and calibrates online from engine stats. Prints, per (trace,
load, policy, class), the error of the *admission* prediction (the one scored: MdAPE and
90%-interval coverage), the same for the dispatch prediction beside it, and the goal verdict
(MdAPE <= 15% and coverage >= 85%). Scatter plots go to ``--out``.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path

import numpy as np

from qlm_opt.whatif import accuracy
from qlm_opt.catalog import Catalog
from qlm_opt.config import Fleet, FleetFile, Workload
from qlm_opt.whatif.workload import load_trace
from qlm_opt.whatif.run import run_policy
from qlm_opt.whatif.workload import prepare_requests

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data"

# Mooncake: long prompts (mean 12k tokens, up to 126k) need long-context models.
MOONCAKE_FLEET = {
    "name": "mooncake-a100",
    "instances": [
        {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 6},
        {"gpu": "A100-80GB", "model": "llama-3.2-1b", "count": 1},
    ],
}
MOONCAKE_WORKLOAD = {
    "name": "mooncake-mixed",
    "seed": 0,
    "lengths": {"prompt_max": 131072, "output_max": 4096},
    "classes": {
        "interactive": {"ttft_s": 5.0, "share": 0.6, "priority": 0},
        "batch": {"ttft_s": 600.0, "share": 0.4, "priority": 1},
    },
    "models": {"llama-3.1-8b": 0.8, "llama-3.2-1b": 0.2},
}

TRACES = {
    "conv": (DATA / "azure_llm_2023_conv.csv", None, None, "3,6,9"),
    "mooncake": (DATA / "mooncake_conversation.jsonl", MOONCAKE_FLEET, MOONCAKE_WORKLOAD,
                 "0.25,0.5,1"),
}


def _fleet(base: dict | None, truth: dict, prior: str) -> Fleet:
    if base is None:
        base = tomllib.loads((ROOT / "qlm_opt/examples/fleet.toml").read_text())
    d = dict(base)
    d["perf"] = {**d.get("perf", {}), **truth}
    d["estimator"] = {"prior": prior}
    return Fleet(FleetFile.model_validate(d), Catalog.default(), source="<benchmark>")


def _workload(base: dict | None) -> Workload:
    if base is None:
        return Workload.load(ROOT / "qlm_opt/examples/workload.toml")
    return Workload.from_dict(base)


def _parse_truth(s: str) -> dict:
    out = {}
    for kv in filter(None, s.split(",")):
        k, v = kv.split("=")
        out[k.strip()] = float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traces", default="conv,mooncake", help="conv, mooncake (comma list)")
    ap.add_argument("--trace-path", type=Path, action="append", default=[],
                    help="NAME=PATH: replace a trace's file (any file in its format)")
    ap.add_argument("--loads", action="append", default=[],
                    help="NAME=L1,L2,L3 rate scales (default conv=3,6,9 mooncake=0.25,0.5,1)")
    ap.add_argument("--policies", default="qlm-rwt,qlm")
    ap.add_argument("--duration", type=float, default=600.0, help="trace seconds after scaling")
    ap.add_argument("--prior", choices=("datasheet", "engine"), default="datasheet",
                    help="the estimator's prior: the datasheet roofline (mismatched), or the "
                         "engines' own model (what the simulator runs)")
    ap.add_argument("--truth", default="mfu=0.35,mbu=0.6,overhead_ms=6",
                    help="the engines' [perf] (their real speed), comma list")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "rwt_accuracy")
    a = ap.parse_args()
    paths = {k: Path(v) for k, v in (str(x).split("=", 1) for x in a.trace_path)}
    loads_over = dict(x.split("=", 1) for x in a.loads)
    truth = _parse_truth(a.truth)
    trackers: list = []
    orig = accuracy.RWTTracker.__init__

    def spy(self, *args, **kw):
        orig(self, *args, **kw)
        trackers.append(self)

    accuracy.RWTTracker.__init__ = spy
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"prior: {a.prior}; engines run [perf] {a.truth}; scored: admission prediction")
    print(f"{'trace':<9} {'load':>4} {'policy':<8} {'class':<12} {'n':>6} {'MdAPE':>6} "
          f"{'cov90':>6} {'dMdAPE':>6} {'dcov90':>6} {'obs p50':>8} {'pred p50':>8} "
          f"{'SLO att':>7} {'hit%':>5} {'goal':>4}")
    verdict = []
    for name in a.traces.split(","):
        path, fleet_d, wl_d, loads = TRACES[name]
        path = paths.get(name, path)
        loads = loads_over.get(name, loads)
        trace = load_trace(path)
        fleet = _fleet(fleet_d, truth, a.prior)
        for load in [float(x) for x in loads.split(",")]:
            wl = _workload(wl_d)
            wl.data.rate_scale = load
            wl.data.duration_s = a.duration
            make = prepare_requests(trace, wl, None)
            scatter = {}
            for pol in a.policies.split(","):
                t0 = time.perf_counter()
                run = run_policy(pol, fleet, wl, make())
                r = run.metrics["rwt"]
                scatter[pol] = trackers[-1].acc.pairs
                hit = run.metrics.get("prefix_cache_hit_rate")
                for c, v in [("all", r), *r["per_class"].items()]:
                    if not v["num"]:
                        continue
                    ok = (v["median_abs_pct_error"] <= 15.0 and v["coverage_90"] >= 0.85)
                    if c != "all":
                        verdict.append(ok)
                    dm = v.get("dispatch_median_abs_pct_error")
                    dc = v.get("dispatch_coverage_90")
                    print(f"{name:<9} {load:>4g} {pol:<8} {c:<12} {v['num']:>6} "
                          f"{v['median_abs_pct_error']:>5.1f}% {100 * v['coverage_90']:>5.1f}% "
                          f"{dm:>5.1f}% {100 * dc:>5.1f}% "
                          f"{v.get('observed_p50_s', 0):>7.2f}s "
                          f"{v.get('predicted_p50_s', 0):>7.2f}s "
                          f"{100 * run.metrics['slo_attainment']:>6.1f}% "
                          f"{'-' if hit is None else f'{100 * hit:4.0f}%':>5} "
                          f"{'yes' if ok else 'NO':>4}", flush=True)
                print(f"{'':<9} {'':>4} {pol:<8} (run {time.perf_counter() - t0:.0f} s wall, "
                      f"{len(run.requests)} requests)", flush=True)
            _plot(scatter, f"{name}, load x{load:g}", a.out / f"scatter_{name}_load{load:g}.png")
    print(f"goal met in {sum(verdict)} of {len(verdict)} (trace, load, policy, class) cells; "
          f"scatter plots in {a.out}")


def _plot(scatter: dict, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scatter), figsize=(5 * len(scatter), 4.5), squeeze=False)
    for ax, (pol, pairs) in zip(axes[0], scatter.items()):
        for cls in sorted({p[0] for p in pairs}):
            arr = np.array([(m, o) for c, m, _, o in pairs if c == cls])
            if len(arr):
                ax.scatter(np.maximum(arr[:, 1], 1e-3), np.maximum(arr[:, 0], 1e-3), s=2,
                           alpha=0.3, label=cls)
        ax.set_xscale("log")
        ax.set_yscale("log")
        lim = [1e-2, 1e4]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("observed wait (s)")
        ax.set_ylabel("predicted wait at admission (s)")
        ax.set_title(f"{pol}, {title}")
        ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
