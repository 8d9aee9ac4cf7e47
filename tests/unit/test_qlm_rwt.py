"""qlm-rwt on a small what-if run: completes every request and beats fcfs."""

from pathlib import Path

from qlm_opt.config import Fleet, Workload
from qlm_opt.whatif import run_whatif

EX = Path(__file__).resolve().parents[2] / "qlm_opt" / "examples"


def test_qlm_rwt_completes_and_beats_fcfs():
    fl = Fleet.load(EX / "fleet.toml")
    wl = Workload.load(EX / "workload.toml")
    wl.data.duration_s = 60.0
    rep = run_whatif(["fcfs", "qlm-rwt"], fl, wl)
    q, f = rep["policies"]["qlm-rwt"], rep["policies"]["fcfs"]
    assert q["num_completed"] + q["num_dropped"] == q["num_requests"]
    assert q["num_dropped"] == 0
    assert q["slo_attainment"] > f["slo_attainment"]
    assert "coverage_90" in q["rwt"] and "interactive" in q["rwt"]["per_class"]
