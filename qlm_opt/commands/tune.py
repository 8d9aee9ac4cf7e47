"""``qlm-opt tune``: sweep solver presets and parameters on a what-if run; save the best."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Annotated

import typer


def _floats(text: str | None, what: str) -> list[float]:
    if not text:
        return []
    try:
        vals = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what}: expected comma-separated numbers, got {text!r}")
    if any(v < 0 for v in vals):
        raise typer.BadParameter(f"{what}: values must be >= 0")
    return vals


def register(app: typer.Typer) -> None:
    @app.command("tune")
    def tune(
        workload: Annotated[Path | None, typer.Option(help="Workload TOML (default: example).")]
        = None,
        fleet: Annotated[Path | None, typer.Option(help="Fleet TOML (default: example).")] = None,
        trace: Annotated[str, typer.Option(help="Trace file or 'synthetic'.")] = "synthetic",
        presets: Annotated[str, typer.Option(help="Presets to start from.")] =
        "fast,balanced,thorough",
        time_limit: Annotated[str | None, typer.Option(
            help="Comma-separated CP-SAT time limits (s) to try on every preset.")] = None,
        swap_penalty: Annotated[str | None, typer.Option(
            help="Comma-separated swap penalties to try, in objective units (on_time x 10 "
            "per request of weight 1: 50000 = 5 requests).")] = None,
        policy: Annotated[str, typer.Option(help="qlm or qlm-true-lengths.")] = "qlm",
        duration: Annotated[float | None, typer.Option(help="Override duration_s.")] = None,
        rate_scale: Annotated[float | None, typer.Option(help="Override rate_scale.")] = None,
        out: Annotated[Path, typer.Option(help="Where to write the best preset.")] = Path(
            "solver/tuned.toml"
        ),
        seed: Annotated[int | None, typer.Option()] = None,
    ) -> None:
        """Run the qlm policy once per candidate setting on the identical workload and write
        the setting with the highest SLO attainment (then throughput, then lower solve p95)
        as a solver preset."""
        from rich.console import Console
        from rich.progress import Progress
        from rich.table import Table

        from qlm_opt.config import example_path
        from qlm_opt.config import Fleet, Workload
        from qlm_opt.planner.presets import load_preset, preset_to_toml
        from qlm_opt.whatif.workload import load_trace
        from qlm_opt.whatif.run import run_policy
        from qlm_opt.whatif.workload import prepare_requests

        if policy not in ("qlm", "qlm-true-lengths"):
            raise typer.BadParameter("--policy must be qlm or qlm-true-lengths")
        wl = Workload.load(workload or example_path("workload.toml"))
        if duration is not None:
            wl.data.duration_s = duration
        if rate_scale is not None:
            wl.data.rate_scale = rate_scale
        fl = Fleet.load(fleet or example_path("fleet.toml"))
        wl.check_models(fl.catalog)
        tr = None if trace == "synthetic" else load_trace(trace)
        bases = [load_preset(p.strip()) for p in presets.split(",") if p.strip()]
        if not bases:
            raise typer.BadParameter("--presets names no preset")
        limits = _floats(time_limit, "--time-limit") or [None]
        penalties = _floats(swap_penalty, "--swap-penalty") or [None]
        cands = []
        for base, tl, sp in itertools.product(bases, limits, penalties):
            p = base
            if tl is not None:
                p = dataclasses.replace(p, time_limit_s=tl)
            if sp is not None:
                p = dataclasses.replace(p, weights=dataclasses.replace(
                    p.weights, swap_penalty=int(sp)))
            label = base.name + (f" tl={tl:g}" if tl is not None else "") + (
                f" swap={sp:g}" if sp is not None else "")
            cands.append((label, p))
        make = prepare_requests(tr, wl, seed)
        results = []
        with Progress(console=Console(stderr=True)) as prog:
            task = prog.add_task("tuning", total=len(cands))
            for label, p in cands:
                run = run_policy(policy, fl, wl, make(), track_rwt=False,
                                 policy_options={"preset": p})
                m = run.metrics
                results.append((m["slo_attainment"], m["throughput_tokens_per_s"],
                                -m["solver"]["solve_ms_p95"], label, p, m))
                prog.advance(task)
        results.sort(key=lambda r: r[:3], reverse=True)
        t = Table("setting", "SLO att.", "tok/s", "solve p95 ms", "swaps", title="qlm-opt tune")
        for att, tput, neg_p95, label, _p, m in results:
            t.add_row(label, f"{100 * att:.1f}%", f"{tput:.0f}", f"{-neg_p95:.0f}",
                      str(m["num_swaps"]))
        Console(width=120).print(t)
        att, tput, neg_p95, label, best, _m = results[0]
        out.parent.mkdir(parents=True, exist_ok=True)
        header = (f"Written by `qlm-opt tune`: best of {len(results)} settings ({label}).\n"
                  f"Workload {wl.name}, fleet {fl.name}: SLO attainment {100 * att:.1f}%, "
                  f"{tput:.0f} tok/s, solve p95 {-neg_p95:.0f} ms.")
        out.write_text(preset_to_toml(best, header))
        typer.echo(f"wrote {out} ({label})")
