"""What the commands share: the one-line error exit and the workload of ``--workload`` with
its overrides."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from qlm_opt.config import example_path


# The input options every replaying command takes (whatif, bound), one definition each.
TraceOpt = Annotated[str, typer.Option(
    help="Trace file (Azure or BurstGPT CSV, Mooncake or generic JSONL), or 'synthetic'.")]
WorkloadOpt = Annotated[Path | None, typer.Option(
    help="Workload spec TOML (default: built-in example).")]
FleetOpt = Annotated[Path | None, typer.Option(help="Fleet TOML (default: built-in example).")]
SeedOpt = Annotated[int | None, typer.Option(help="Seed (default: the workload's).")]
DurationOpt = Annotated[float | None, typer.Option(help="Override the workload's duration_s.")]
RateScaleOpt = Annotated[float | None, typer.Option(
    help="Override the workload's rate_scale.")]


def fail(msg: str, code: int = 2) -> None:
    typer.echo(f"qlm-opt: error: {msg}", err=True)
    raise typer.Exit(code)


def load_workload(path: Path | None, duration: float | None, rate_scale: float | None):
    """The workload of ``--workload`` (default: the built-in example) with the
    ``--duration`` and ``--rate-scale`` overrides; a bad override ends the command."""
    from qlm_opt.config import Workload

    if duration is not None and not duration > 0:
        fail("--duration must be > 0")
    if rate_scale is not None and not rate_scale > 0:
        fail("--rate-scale must be > 0")
    wl = Workload.load(path or example_path("workload.toml"))
    if duration is not None:
        wl.data.duration_s = duration
    if rate_scale is not None:
        wl.data.rate_scale = rate_scale
    return wl


def check_policies(policy: str) -> list[str]:
    """The policy names of a comma-separated ``--policy``; an unknown one ends the command."""
    from qlm_opt.policies import policy_names

    names = [p.strip() for p in policy.split(",") if p.strip()]
    if not names:
        fail("--policy names no policy")
    unknown = [n for n in names if n not in policy_names()]
    if unknown:
        fail(f"unknown policy {unknown[0]!r} (known: {', '.join(policy_names())})")
    return names


@contextmanager
def progress_bar(quiet: bool = False, counts: str | None = None):
    """A progress bar on stderr with one line per stage; yields ``progress(stage, done,
    total)``. ``counts`` (a unit, e.g. "requests") shows done/total instead of a percentage."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    amount = (TextColumn("{task.completed}/{task.total} " + counts) if counts
              else TextColumn("{task.percentage:>3.0f}%"))
    with Progress(TextColumn("{task.description:>12}"), BarColumn(), amount,
                  TimeElapsedColumn(), console=Console(stderr=True, quiet=quiet),
                  transient=False) as prog:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=max(1, total))
            prog.update(tasks[stage], completed=done, total=max(1, total))

        yield progress
