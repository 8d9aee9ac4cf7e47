"""``qlm-opt whatif``: replay a workload against a fleet under several policies."""

from __future__ import annotations

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
    check_policies,
    fail,
    load_workload,
    progress_bar,
)
from qlm_opt.config import example_path
from qlm_opt.errors import QLMError


def register(app: typer.Typer) -> None:
    app.command()(whatif)


def whatif(
    trace: TraceOpt = "synthetic",
    workload: WorkloadOpt = None,
    fleet: FleetOpt = None,
    policy: Annotated[
        str, typer.Option(help="Comma-separated policies to compare.")
    ] = "fcfs,edf,priority,shepherd",
    out: Annotated[Path, typer.Option(help="Folder for report.json and plots.")] = Path(
        "out/whatif"
    ),
    seed: SeedOpt = None,
    duration: DurationOpt = None,
    rate_scale: RateScaleOpt = None,
    drain: Annotated[float, typer.Option(help="Seconds to run after the last arrival.")] = 3600,
    bound: Annotated[bool, typer.Option(
        "--bound", help="Also compute the upper bound U on attainment and each policy's gap "
                        "to it (see `qlm-opt bound`).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Replay a workload against a fleet under several policies and compare them."""
    from rich.console import Console

    from qlm_opt.config import Fleet
    from qlm_opt.whatif.table import render_table
    from qlm_opt.whatif.workload import load_trace
    from qlm_opt.whatif.run import batch_jobs_table, run_whatif, write_report

    try:
        wl = load_workload(workload, duration, rate_scale)
        fl = Fleet.load(fleet or example_path("fleet.toml"))
        tr = None if trace == "synthetic" else load_trace(trace)
        names = check_policies(policy)
        with progress_bar(quiet, counts="requests") as progress:
            report = run_whatif(names, fl, wl, tr, seed=seed, drain_s=drain, progress=progress,
                                bound=bound)
        files = write_report(report, out)
    except QLMError as e:
        fail(str(e))
    out_console = Console(width=200)
    out_console.print(render_table(report))
    if (bt := batch_jobs_table(report)) is not None:
        out_console.print(bt)
    out_console.print(f"wrote {', '.join(str(f) for f in files)}")
