"""How accurate is the RWT estimator? Predicted vs observed waits on the Azure conv trace.

Runs the shared trace at three loads under a few policies and prints, per (load, policy,
class), the median absolute percentage error and the coverage of the predicted 90% interval,
then saves a predicted-vs-observed scatter per load into ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qlm_opt import estimator
from qlm_opt.config import Fleet, Workload
from qlm_opt.sim.workload import load_trace
from qlm_opt.whatif import prepare_requests, run_policy

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT.parent / "shared" / "data" / "azure_llm_2023_conv.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--loads", default="3,6,9", help="rate scales (trace time compression)")
    ap.add_argument("--policies", default="fcfs,qlm-rwt")
    ap.add_argument("--duration", type=float, default=600.0, help="trace seconds after scaling")
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "rwt_accuracy")
    a = ap.parse_args()
    fleet = Fleet.load(ROOT / "qlm_opt/examples/fleet.toml")
    trace = load_trace(a.trace)
    trackers: list = []
    orig = estimator.RWTTracker.__init__

    def spy(self, *args, **kw):
        orig(self, *args, **kw)
        trackers.append(self)

    estimator.RWTTracker.__init__ = spy
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"{'load':>5} {'policy':<9} {'class':<12} {'n':>6} {'MdAPE':>7} {'cov90':>6} "
          f"{'obs p50':>8} {'pred p50':>8} {'SLO att':>7}")
    for load in [float(x) for x in a.loads.split(",")]:
        wl = Workload.load(ROOT / "qlm_opt/examples/workload.toml")
        wl.data.rate_scale = load
        wl.data.duration_s = a.duration
        make = prepare_requests(trace, wl, None)
        scatter = {}
        for pol in a.policies.split(","):
            run = run_policy(pol, fleet, wl, make())
            r = run.metrics["rwt"]
            scatter[pol] = trackers[-1].acc.pairs
            for c, v in [("all", r), *r["per_class"].items()]:
                if not v["num"]:
                    continue
                print(f"{load:>5.1f} {pol:<9} {c:<12} {v['num']:>6} "
                      f"{v['median_abs_pct_error']:>6.1f}% {100 * v['coverage_90']:>5.1f}% "
                      f"{v.get('observed_p50_s', 0):>7.2f}s {v.get('predicted_p50_s', 0):>7.2f}s "
                      f"{100 * run.metrics['slo_attainment']:>6.1f}%")
        _plot(scatter, load, a.out / f"scatter_load{load:g}.png")
    print(f"scatter plots in {a.out}")


def _plot(scatter: dict, load: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scatter), figsize=(5 * len(scatter), 4.5), squeeze=False)
    for ax, (pol, pairs) in zip(axes[0], scatter.items()):
        for cls in sorted({p[0] for p in pairs}):
            arr = np.array([(m, o) for c, m, _, o in pairs if c == cls])
            if len(arr):
                ax.scatter(arr[:, 1], arr[:, 0], s=2, alpha=0.3, label=cls)
        ax.set_xscale("log")
        ax.set_yscale("log")
        lim = [1e-2, 1e4]
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("observed wait (s)")
        ax.set_ylabel("predicted wait (s)")
        ax.set_title(f"{pol}, load x{load:g}")
        ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
