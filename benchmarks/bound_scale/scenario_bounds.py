"""U for rows of the scenario suite, with a longer LP time limit than ``run.py --bound``.

    .venv/bin/python benchmarks/bound_scale/scenario_bounds.py OUT.json azure-conv:12 swap:0.5 ...

Writes ``{"bounds": {scenario: {load: {...}}}}`` as it goes, the format that
``benchmarks/scenarios/run.py --from-results results.json --bounds OUT.json`` reads. Each LP
solve gets 120 s (``compute_bound``'s default is 20 s): on a loaded 2-core machine the
largest rows need more than 20 s, and a time-out gives a valid but weaker U.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scenarios"))


def main() -> None:
    import run as scenarios  # benchmarks/scenarios/run.py

    from qlm_opt.whatif.bound import compute_bound
    from qlm_opt.whatif.run import prepare_requests

    out_path = Path(sys.argv[1])
    jobs = [(s, float(x)) for s, x in (a.split(":") for a in sys.argv[2:])]
    out: dict = {}
    for name, load in jobs:
        fleet, wl, trace = scenarios._inputs(name, load)
        reqs = prepare_requests(trace, wl, None)()
        b = compute_bound(reqs, wl, fleet, drain_s=3600.0, time_limit_s=120.0)
        out.setdefault(name, {})[str(load)] = {
            "slo_attainment": b.slo_attainment, "per_class": dict(b.per_class),
            "status": b.status, "wall_s": b.wall_s, "isolation": b.isolation}
        print(f"{name} x{load:g}: U = {100 * b.slo_attainment:.1f}% ({b.status}, "
              f"{b.wall_s:.0f} s)", flush=True)
        out_path.write_text(json.dumps({"bounds": out}, indent=1))


if __name__ == "__main__":
    main()
