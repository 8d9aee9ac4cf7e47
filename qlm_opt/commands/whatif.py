"""``qlm-opt whatif``: replay a workload against a fleet under several policies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from qlm_opt.commands.common import fail, load_workload
from qlm_opt.config import example_path
from qlm_opt.errors import QLMError


def register(app: typer.Typer) -> None:
    app.command()(whatif)


def whatif(
    trace: Annotated[
        str, typer.Option(help="Trace file (Azure or BurstGPT CSV, Mooncake or generic JSONL), "
                       "or 'synthetic'.")
    ] = "synthetic",
    workload: Annotated[
        Path | None, typer.Option(help="Workload spec TOML (default: built-in example).")
    ] = None,
    fleet: Annotated[
        Path | None, typer.Option(help="Fleet TOML (default: built-in example).")
    ] = None,
    policy: Annotated[
        str, typer.Option(help="Comma-separated policies to compare.")
    ] = "fcfs,edf,priority,shepherd",
    out: Annotated[Path, typer.Option(help="Folder for report.json and plots.")] = Path(
        "out/whatif"
    ),
    seed: Annotated[int | None, typer.Option(help="Seed (default: the workload's).")] = None,
    duration: Annotated[
        float | None, typer.Option(help="Override the workload's duration_s.")
    ] = None,
    rate_scale: Annotated[
        float | None, typer.Option(help="Override the workload's rate_scale.")
    ] = None,
    drain: Annotated[float, typer.Option(help="Seconds to run after the last arrival.")] = 3600,
    bound: Annotated[bool, typer.Option(
        "--bound", help="Also compute the upper bound U on attainment and each policy's gap "
                        "to it (see `qlm-opt bound`).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Replay a workload against a fleet under several policies and compare them."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from qlm_opt.config import Fleet
    from qlm_opt.whatif.table import render_table
    from qlm_opt.whatif.workload import load_trace
    from qlm_opt.whatif.run import run_whatif, write_report

    try:
        wl = load_workload(workload, duration, rate_scale)
        fl = Fleet.load(fleet or example_path("fleet.toml"))
        tr = None if trace == "synthetic" else load_trace(trace)
        names = [p.strip() for p in policy.split(",") if p.strip()]
        if not names:
            fail("--policy names no policy")
        from qlm_opt.policies import policy_names

        unknown = [n for n in names if n not in policy_names()]
        if unknown:
            fail(f"unknown policy {unknown[0]!r} (known: {', '.join(policy_names())})")
        console = Console(stderr=True, quiet=quiet)
        with Progress(
            TextColumn("{task.description:>12}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} requests"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as prog:
            tasks: dict[str, int] = {}

            def progress(name: str, i: int, total: int) -> None:
                if name not in tasks:
                    tasks[name] = prog.add_task(name, total=total)
                prog.update(tasks[name], completed=i)

            report = run_whatif(names, fl, wl, tr, seed=seed, drain_s=drain, progress=progress,
                                bound=bound)
        files = write_report(report, out)
    except QLMError as e:
        fail(str(e))
    out_console = Console(width=200)
    out_console.print(render_table(report))
    out_console.print(f"wrote {', '.join(str(f) for f in files)}")
