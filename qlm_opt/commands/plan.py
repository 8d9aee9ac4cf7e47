"""``qlm-opt plan``: solve one saved planning snapshot and print the plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("plan")
    def plan(
        snapshot: Annotated[Path, typer.Option(help="Planning snapshot JSON (see README).")],
        preset: Annotated[
            str, typer.Option(help="Solver preset name (solver/*.toml) or a TOML path.")
        ] = "balanced",
        time_limit: Annotated[
            float | None, typer.Option(help="Override the preset's time limit, seconds.")
        ] = None,
        json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    ) -> None:
        """Solve one saved snapshot: status, objective, bound, solve ms and the plan."""
        import dataclasses
        import json

        from rich.console import Console
        from rich.table import Table

        from qlm_opt.planner import PlanningProblem, load_preset, solve, validate_plan

        inst = PlanningProblem.load(snapshot)
        pre = load_preset(preset)
        if time_limit is not None:
            if time_limit < 0:
                raise typer.BadParameter("--time-limit must be >= 0")
            pre = dataclasses.replace(pre, time_limit_s=time_limit)
        p = solve(inst, pre)
        check = validate_plan(inst.with_weights(pre.weights), p)
        if json_out:
            typer.echo(json.dumps({
                "status": str(p.status), "objective": p.objective, "best_bound": p.best_bound,
                "solve_ms": p.solve_ms, "build_ms": p.build_ms, "formulation": p.formulation,
                "num_on_time": p.num_on_time, "valid": check.ok,
                "instances": [
                    {"instance": ip.instance_id, "model": ip.final_model,
                     "swaps": ip.num_swaps, "groups": list(ip.group_ids)}
                    for ip in p.instances
                ],
            }, indent=2))
            return
        con = Console(width=160)
        con.print(
            f"status {p.status}  formulation {p.formulation}  objective {p.objective}  "
            f"bound {p.best_bound}  solve {p.solve_ms:.1f} ms  build {p.build_ms:.1f} ms  "
            f"on time {p.num_on_time}/{len(inst.groups)} groups  valid {check.ok}"
        )
        t = Table("instance", "model", "swaps", "groups (in order)")
        for ip in p.instances:
            t.add_row(str(ip.instance_id), str(ip.final_model), str(ip.num_swaps),
                      " ".join(ip.group_ids) or "-")
        con.print(t)
