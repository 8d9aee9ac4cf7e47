"""Save planning problems from real epochs of scenario-suite runs, with a reference value.

    .venv/bin/python tests/planner/epochs/make.py

For each (scenario, load) below it runs ``qlm`` for ``DURATION_S`` of trace time, keeps the
epoch with the most groups (and one from the middle of the run), and writes
``<scenario>-<k>.json``: the planning problem (``PlanningProblem.to_json``) plus
``reference``: the best primary objective (weight on time less swaps, ``primary_objective``)
found by the ``thorough`` preset given 20 s, and the knapsack bound it proved. The tests
check the default preset's plans against ``reference.best_primary``, never against an exact
assignment.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
sys.path.insert(0, str(REPO / "benchmarks" / "scenarios"))

CASES = [("azure-conv", 12.0), ("swap", 0.5), ("prompt-heavy", 15.94)]
DURATION_S = 60.0


def main() -> None:
    import run as suite  # benchmarks/scenarios/run.py

    import qlm_opt.policies.qlm as qlm_mod
    from qlm_opt.planner import load_preset
    from qlm_opt.planner.cpsat import primary_objective, solve
    from qlm_opt.whatif.run import run_policy
    from qlm_opt.whatif.workload import prepare_requests

    thorough = dataclasses.replace(load_preset("thorough"), time_limit_s=20.0, num_workers=2)
    for name, load in CASES:
        seen = []
        orig = qlm_mod.solve

        def spy(pi, preset, hint=None, _seen=seen, _orig=orig):
            _seen.append(pi)
            return _orig(pi, preset, hint=hint)

        qlm_mod.solve = spy
        try:
            suite.SCENARIOS[name].workload["duration_s"] = DURATION_S
            fleet, wl, trace = suite._inputs(name, load)
            run_policy("qlm", fleet, wl, prepare_requests(trace, wl, None)(), track_rwt=False)
        finally:
            qlm_mod.solve = orig
        picks = [max(seen, key=lambda p: len(p.groups)), seen[len(seen) // 2]]
        for k, pi in enumerate(picks):
            best = solve(pi, thorough)
            inst = pi.with_weights(thorough.weights)
            doc = json.loads(pi.to_json())
            doc["reference"] = {
                "best_primary": primary_objective(inst, best),
                "knapsack_bound": best.best_bound,
                "preset": "thorough, 20 s",
                "source": f"{name} x{load:g}, epoch {seen.index(pi)} of {len(seen)}",
            }
            out = HERE / f"{name}-{k}.json"
            out.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"{out.name}: {len(pi.groups)} groups, {len(pi.instances)} instances, "
                  f"best primary {doc['reference']['best_primary']}")


if __name__ == "__main__":
    main()
