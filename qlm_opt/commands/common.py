"""What the commands share: the one-line error exit and the workload of ``--workload`` with
its overrides."""

from __future__ import annotations

from pathlib import Path

import typer

from qlm_opt.config import example_path


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
