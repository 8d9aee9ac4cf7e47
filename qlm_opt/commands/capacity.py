"""``qlm-opt capacity``: the cheapest fleet that meets per-class SLO attainment targets."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("capacity")
    def capacity(
        workload: Annotated[Path | None, typer.Option(
            help="Workload TOML: classes, model shares (default: built-in example).")] = None,
        trace: Annotated[str, typer.Option(
            help="Trace file (Azure or BurstGPT CSV, Mooncake or generic JSONL), "
                       "or 'synthetic'.")] = "synthetic",
        gpus: Annotated[str, typer.Option(
            help="Comma-separated GPU types to choose from.")] = "H100-80GB,L40S,L4",
        target: Annotated[float, typer.Option(
            help="SLO attainment target of every class (0-1].")] = 0.99,
        class_target: Annotated[str | None, typer.Option(
            help="Per-class targets, e.g. interactive=0.99,batch=0.999.")] = None,
        prices: Annotated[Path | None, typer.Option(
            help="Prices TOML ([gpu_hour] per GPU type; default: built-in, indicative).")]
        = None,
        policy: Annotated[str, typer.Option(help="Policy of the what-if runs.")] = "qlm",
        seed: Annotated[int | None, typer.Option(help="Seed (default: the workload's).")] = None,
        duration: Annotated[float | None, typer.Option(
            help="Override the workload's duration_s.")] = None,
        rate_scale: Annotated[float | None, typer.Option(
            help="Override the workload's rate_scale.")] = None,
        max_gpus_per_type: Annotated[int, typer.Option(
            help="At most this many GPUs of each type.")] = 8,
        max_runs: Annotated[int, typer.Option(help="At most this many what-if runs.")] = 200,
        margin: Annotated[float, typer.Option(
            help="Keep fleets whose fluid capacity is within this fraction of the need.")]
        = 0.1,
        full_runs: Annotated[bool, typer.Option(
            "--full-runs", help="Run every fleet to the end (default: stop a run once it has "
                                "missed a target; its attainments are then upper bounds).")]
        = False,
        no_prune: Annotated[bool, typer.Option(
            "--no-prune", help="Run every candidate in cost order (no fluid pruning).")]
        = False,
        workers: Annotated[int | None, typer.Option(
            help="Local worker processes (default: CPU count).")] = None,
        ray_address: Annotated[str | None, typer.Option(
            help="Run the what-if runs on Ray: 'auto', 'ray://host:10001', or 'local' "
                 "(a Ray started here).")] = None,
        base_fleet: Annotated[Path | None, typer.Option(
            help="Fleet TOML whose [engine] and [perf] the fleets found use.")] = None,
        drain: Annotated[float, typer.Option(
            help="Seconds each run goes on after the last arrival.")] = 3600,
        out: Annotated[Path, typer.Option(
            help="Folder for fleet.toml, report.json and frontier.png.")] = Path("out/capacity"),
        quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
    ) -> None:
        """Search GPU counts per type and the initial model placement for the cheapest fleet
        whose what-if run meets the attainment targets; prune with a fluid capacity estimate,
        confirm with what-if runs in parallel (local processes, or Ray)."""
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn)
        from rich.table import Table

        from qlm_opt.whatif import capacity as cap
        from qlm_opt.catalog import Catalog, parse_toml_as
        from qlm_opt.commands.common import fail, load_workload
        from qlm_opt.config import FleetFile
        from qlm_opt.errors import QLMError
        from qlm_opt.policies import policy_names
        from qlm_opt.whatif.workload import load_trace

        try:
            if policy not in policy_names():
                fail(f"unknown policy {policy!r} (known: {', '.join(policy_names())})")
            if max_gpus_per_type < 1:
                fail("--max-gpus-per-type must be >= 1")
            if max_runs < 1:
                fail("--max-runs must be >= 1")
            if not 0 <= margin < 1:
                fail("--margin must be in [0, 1)")
            if workers is not None and workers < 1:
                fail("--workers must be >= 1")
            if drain < 0:
                fail("--drain must be >= 0")
            gpu_list = [g.strip() for g in gpus.split(",") if g.strip()]
            if not gpu_list:
                fail("--gpus names no GPU type")
            if len(set(gpu_list)) != len(gpu_list):
                fail("--gpus names a GPU type twice")
            catalog = Catalog.default()
            for g in gpu_list:
                catalog.gpu(g)
            wl = load_workload(workload, duration, rate_scale)
            targets = cap.parse_class_targets(class_target, list(wl.classes), target)
            pr = cap.Prices.load(prices or cap.default_prices_path())
            for g in gpu_list:
                pr.micro_per_hour(g)
            base = parse_toml_as(FleetFile, base_fleet) if base_fleet else None
            if base is not None and base.perf.calibration:
                cal = Path(base.perf.calibration)
                if not cal.is_absolute():  # the fleet written goes elsewhere
                    base.perf.calibration = str((base_fleet.parent / cal).resolve())
            tr = None if trace == "synthetic" else load_trace(trace)
            if ray_address:
                if ray_address != "local":
                    cap.check_reachable(ray_address)
                runner = cap.RayRunner(None if ray_address == "local" else ray_address,
                                       num_cpus=workers)
            else:
                runner = cap.LocalRunner(workers)
            console = Console(stderr=True, quiet=quiet)
            with Progress(TextColumn("what-if runs"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TextColumn("{task.description}"),
                          console=console, transient=True) as prog:
                task = prog.add_task("", total=None)

                def progress(done: int, total: int, label: str) -> None:
                    prog.update(task, completed=done, total=total, description=label[:60])

                result = cap.search(catalog, wl, tr, gpu_list, pr, targets, runner,
                                    policy=policy, seed=seed, base=base,
                                    max_gpus_per_type=max_gpus_per_type, margin=margin,
                                    max_runs=max_runs, drain_s=drain, prune=not no_prune,
                                    stop_early=not full_runs, progress=progress)
            command = "qlm-opt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            files = cap.write_outputs(result, out, command=command)
        except QLMError as e:
            fail(str(e))
        rep = result.report
        cur = rep["prices"]["currency"]
        classes = list(targets)
        t = Table("fleet", "GPUs", f"{cur}/h", *[f"{c} ({100 * targets[c]:g}%)" for c in classes],
                  "result", title="qlm-opt capacity")
        for r in rep["cheaper_missed"] + ([rep["answer"]] if rep["answer"] else []):
            t.add_row(r["fleet"], str(r["num_gpus"]), f"{r['cost_per_hour']:.2f}",
                      *[("-" if r["attainment"].get(c) is None
                         else ("<=" if r.get("stopped_at_s") is not None else "")
                         + f"{100 * r['attainment'][c]:.2f}%") for c in classes],
                      "meets" if r["meets"] else "missed " + ",".join(r["missed_classes"]))
        out_console = Console(width=160)
        out_console.print(t)
        s = rep["search"]
        out_console.print(
            f"{s['runs']} what-if runs ({s['executor']}, {s['workers']} workers, "
            f"{s['wall_s']:.1f} s); {rep['num_cheaper_pruned']} cheaper fleets pruned by the "
            f"fluid estimate; an unpruned search needs {s['exhaustive_runs_to_answer'] or '-'} "
            f"runs to reach this answer; space {s['space_size']} fleets")
        out_console.print(f"wrote {', '.join(str(f) for f in files)}")
        if rep["answer"] is None:
            typer.echo(f"qlm-opt: no fleet within {max_gpus_per_type} GPUs per type and "
                       f"{max_runs} runs meets the targets (see {out / 'report.json'})",
                       err=True)
            raise typer.Exit(1)
