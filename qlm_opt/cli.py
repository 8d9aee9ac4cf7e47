"""Command line: ``qlm-opt whatif | serve | plan | tune | profile | bound | capacity | top |
make-tiny-model``.

Bad input ends with a one-line message on stderr and exit code 2.
"""

from __future__ import annotations

import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from qlm_opt.errors import QLMError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="qlm-opt: SLO-oriented queue manager and global scheduler for LLM serving.",
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """qlm-opt: SLO-oriented queue manager and global scheduler for LLM serving."""


def example_path(name: str) -> Path:
    """A file of the built-in example (fleet.toml, workload.toml)."""
    return Path(str(resources.files("qlm_opt") / "examples" / name))


def _fail(msg: str, code: int = 2) -> None:
    typer.echo(f"qlm-opt: error: {msg}", err=True)
    raise typer.Exit(code)


def load_workload(path: Path | None, duration: float | None, rate_scale: float | None):
    """The workload of ``--workload`` (default: the built-in example) with the
    ``--duration`` and ``--rate-scale`` overrides; a bad override ends the command."""
    from qlm_opt.config import Workload

    if duration is not None and not duration > 0:
        _fail("--duration must be > 0")
    if rate_scale is not None and not rate_scale > 0:
        _fail("--rate-scale must be > 0")
    wl = Workload.load(path or example_path("workload.toml"))
    if duration is not None:
        wl.data.duration_s = duration
    if rate_scale is not None:
        wl.data.rate_scale = rate_scale
    return wl


@app.command()
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
    from qlm_opt.report_table import render_table
    from qlm_opt.sim.workload import load_trace
    from qlm_opt.whatif import batch_jobs_table, run_whatif, write_report

    try:
        wl = load_workload(workload, duration, rate_scale)
        fl = Fleet.load(fleet or example_path("fleet.toml"))
        tr = None if trace == "synthetic" else load_trace(trace)
        names = [p.strip() for p in policy.split(",") if p.strip()]
        if not names:
            _fail("--policy names no policy")
        from qlm_opt.policies import policy_names

        unknown = [n for n in names if n not in policy_names()]
        if unknown:
            _fail(f"unknown policy {unknown[0]!r} (known: {', '.join(policy_names())})")
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
        _fail(str(e))
    out_console = Console(width=200)
    out_console.print(render_table(report))
    if (bt := batch_jobs_table(report)) is not None:
        out_console.print(bt)
    out_console.print(f"wrote {', '.join(str(f) for f in files)}")


def _register_subcommands() -> None:
    """Commands that live in ``qlm_opt/commands/<name>.py`` expose ``register(app)``."""
    import importlib
    import pkgutil

    import qlm_opt.commands as pkg

    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        importlib.import_module(f"qlm_opt.commands.{mod}").register(app)


_register_subcommands()


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from typer._click import exceptions as click_exc

    try:
        rv = app(standalone_mode=False)
    except QLMError as e:
        typer.echo(f"qlm-opt: error: {e}", err=True)
        sys.exit(2)
    except click_exc.NoArgsIsHelpError:
        sys.exit(2)  # the help was printed
    except click_exc.ClickException as e:
        # One line, like every other bad input (typer would draw a box around it).
        msg = " ".join(e.format_message().split())
        hint = f" (see 'qlm-opt {_command_name()} --help')" if _command_name() else ""
        typer.echo(f"qlm-opt: error: {msg}{hint}", err=True)
        sys.exit(e.exit_code or 2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("qlm-opt: aborted", err=True)
        sys.exit(130)
    if isinstance(rv, int):
        sys.exit(rv)


def _command_name() -> str:
    known = {c.name or c.callback.__name__ for c in app.registered_commands}
    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    return args[0] if args and args[0] in known else ""


if __name__ == "__main__":
    main()
