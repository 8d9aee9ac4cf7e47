"""``qlm-opt bound``: an upper bound on SLO attainment that no policy can beat.

Bad input ends with a one-line message on stderr and exit code 2 (``qlm_opt.commands.common.fail``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from qlm_opt.commands.common import (
    DurationOpt,
    FleetOpt,
    RateScaleOpt,
    SeedOpt,
    TraceOpt,
    WorkloadOpt,
)


def register(app: typer.Typer) -> None:
    @app.command("bound")
    def bound(
        trace: TraceOpt = "synthetic",
        workload: WorkloadOpt = None,
        fleet: FleetOpt = None,
        seed: SeedOpt = None,
        duration: DurationOpt = None,
        rate_scale: RateScaleOpt = None,
        drain: Annotated[
            float, typer.Option(help="Seconds a what-if run goes on after the last arrival.")
        ] = 3600,
        slot: Annotated[
            float | None, typer.Option(help="LP time slot, seconds (default: half the "
                                            "tightest TTFT target).")
        ] = None,
        time_limit: Annotated[
            float, typer.Option(help="Seconds per LP solve; after a time-out U comes from "
                                     "the duals reached so far (still a bound, maybe weaker).")
        ] = 20.0,
        json_out: Annotated[
            Path | None, typer.Option("--json", help="Also write the result as JSON here.")
        ] = None,
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None:
        """Bound SLO attainment from above: no policy can attain more on this trace, workload
        and fleet under the simulator's engine model (see qlm_opt/whatif/bound.py for why)."""
        from rich.console import Console
        from rich.table import Table

        from qlm_opt.whatif.bound import bound_for_whatif
        from qlm_opt.commands.common import fail, load_workload, progress_bar
        from qlm_opt.config import example_path
        from qlm_opt.config import Fleet
        from qlm_opt.errors import QLMError
        from qlm_opt.whatif.workload import load_trace

        try:
            if duration is not None and not duration > 0:
                fail("--duration must be > 0")
            if rate_scale is not None and not rate_scale > 0:
                fail("--rate-scale must be > 0")
            if not drain >= 0:
                fail("--drain must be >= 0")
            if slot is not None and not slot > 0:
                fail("--slot must be > 0")
            if not time_limit > 0:
                fail("--time-limit must be > 0")
            wl = load_workload(workload, duration, rate_scale)
            fl = Fleet.load(fleet or example_path("fleet.toml"))
            tr = None if trace == "synthetic" else load_trace(trace)
            with progress_bar(quiet) as progress:
                res = bound_for_whatif(tr, wl, fl, seed=seed, drain_s=drain, slot_s=slot,
                                       time_limit_s=time_limit, progress=progress)
        except QLMError as e:
            fail(str(e))
        out = Console(width=120)
        t = Table(title=f"upper bound on SLO attainment: {res.num_requests} requests, "
                        f"workload {wl.name}, fleet {fl.name} ({len(fl.instances)} instances)")
        t.add_column("")
        t.add_column("U (LP bound)", justify="right")
        t.add_column("on time in isolation", justify="right")
        t.add_column("requests", justify="right")
        t.add_row("all", _pct(res.slo_attainment), _pct(res.isolation), str(res.num_requests))
        for c, v in res.per_class.items():
            t.add_row(c, _pct(v), _pct(res.isolation_per_class.get(c)),
                      str(res.per_class_requests.get(c, 0)))
        out.print(t)
        out.print(
            f"status {res.status}; {res.num_slots} slots of {res.slot_s:.3g} s; LP "
            f"{res.lp.get('variables', 0)} variables, {res.lp.get('rows', 0)} rows; build "
            f"{res.build_s:.1f} s, solve {res.solve_s:.1f} s, total {res.wall_s:.1f} s"
        )
        if json_out is not None:
            try:
                json_out.parent.mkdir(parents=True, exist_ok=True)
                json_out.write_text(json.dumps(res.to_dict(), indent=2, sort_keys=True))
            except OSError as e:
                fail(f"{json_out}: cannot write: {e.strerror or e}")
            out.print(f"wrote {json_out}")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"
