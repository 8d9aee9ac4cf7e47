"""Capacity planning: the cheapest fleet meeting attainment targets (qlm_opt/whatif/capacity.py and
``qlm-opt capacity``). What-if runs use EDF on short synthetic workloads (a few seconds each);
one CLI test runs the default policy, qlm, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qlm_opt.whatif import capacity as cap
from qlm_opt.catalog import Catalog
from qlm_opt.config import Fleet, Workload
from qlm_opt.errors import ConfigError
from qlm_opt.whatif.workload import build_requests, synthetic_trace

GPUS = ["L4", "L40S"]
TARGETS = {"interactive": 0.95, "batch": 0.95}


def _workload(**over) -> Workload:
    d = {
        "name": "cap-small",
        "seed": 5,
        "duration_s": 30,
        "rate_scale": 2.0,
        "lengths": {"prompt_max": 4000, "output_max": 1024},
        "classes": {
            "interactive": {"ttft_s": 2.0, "share": 0.7, "priority": 0},
            "batch": {"ttft_s": 300.0, "share": 0.3, "priority": 1},
        },
        "models": {"qwen3-8b": 0.7, "gpt-oss-20b": 0.3},
    }
    d.update(over)
    return Workload.from_dict(d)


def _search(runner, prune: bool = True, wl: Workload | None = None) -> cap.CapacityResult:
    return cap.search(Catalog.default(), wl or _workload(), None, GPUS,
                      cap.Prices.load(cap.default_prices_path()), TARGETS, runner,
                      policy="edf", max_gpus_per_type=4, prune=prune)


ONE_MODEL = {"models": {"qwen3-8b": 1.0}, "rate_scale": 2.5}


@pytest.fixture(scope="module")
def found() -> cap.CapacityResult:
    return _search(cap.LocalRunner(2))


@pytest.fixture(scope="module")
def found_one_model() -> cap.CapacityResult:
    return _search(cap.LocalRunner(2), wl=_workload(**ONE_MODEL))


def _ctx(**over) -> cap.RunContext:
    wl = _workload(**over)
    return cap.RunContext(Catalog.default(), wl, synthetic_trace(wl, None), None, "edf",
                          3600.0, TARGETS)


def test_search_finds_a_fleet_that_meets_every_target(found):
    a = found.report["answer"]
    assert a is not None and a["meets"]
    for c, t in TARGETS.items():
        assert a["attainment"][c] >= t
    assert a["num_gpus"] >= 2  # the minimality check below has something to remove
    # the fleet file loads as a what-if fleet and costs what the report says
    fl = Fleet.from_dict(found.fleet)
    prices = cap.Prices.load(cap.default_prices_path()).gpu_hour
    assert sum(prices[i.gpu] * i.tp for i in fl.instances) == pytest.approx(a["cost_per_hour"])


@pytest.mark.parametrize("case", ["two_models", "one_model"])
def test_found_fleet_is_minimal(case, request):
    """Removing any one instance (here one GPU each) from the fleet found misses a target.
    With one model, the fleet found holds several instances of it, so every smaller fleet
    is in the search space (pruned or run)."""
    if case == "two_models":
        found, ctx = request.getfixturevalue("found"), _ctx()
    else:
        found, ctx = request.getfixturevalue("found_one_model"), _ctx(**ONE_MODEL)
        assert found.answer.num_gpus >= 2
    smaller = found.answer.without_one_instance()
    assert smaller
    base = cap.FleetFile(instances=[{"gpu": "L4"}])
    for c in smaller:
        res = cap.evaluate_fleet(ctx, c.fleet_dict(base))
        assert not res["meets"], f"{c.label} meets the targets with one GPU fewer"


def test_every_cheaper_fleet_run_missed_and_runs_came_in_cost_order(found):
    rep = found.report
    a = rep["answer"]
    costs = [r["cost_per_hour"] for r in rep["evaluated"]]
    assert costs == sorted(costs)
    for r in rep["cheaper_missed"]:
        assert r["cost_per_hour"] <= a["cost_per_hour"]
        assert r["missed_classes"] and not r["meets"]
        for c in r["missed_classes"]:
            assert r["attainment"][c] < TARGETS[c]


def test_pruning_gives_the_exhaustive_answer_with_fewer_runs(found):
    full = _search(cap.LocalRunner(2), prune=False)
    assert full.answer.key == found.answer.key
    s, fs = found.report["search"], full.report["search"]
    assert fs["runs_to_answer"] == s["exhaustive_runs_to_answer"]
    assert s["runs_to_answer"] < fs["runs_to_answer"]


def test_ray_local_mode_gives_the_same_answer_as_local_processes(found_one_model):
    found = found_one_model
    ray = pytest.importorskip("ray", reason="Ray is the 'cluster' extra (make test installs it)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = _search(cap.RayRunner(), wl=_workload(**ONE_MODEL))
    finally:
        ray.shutdown()
    assert res.report["search"]["executor"] == "ray"
    assert res.answer.key == found.answer.key
    assert res.report["answer"]["attainment"] == found.report["answer"]["attainment"]

    def rows(rep: dict) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rep["cheaper_missed"]]

    assert rows(res.report) and rows(res.report) == rows(found.report)
    assert res.report["num_cheaper_pruned"] == found.report["num_cheaper_pruned"]


def test_candidates_come_in_cost_order_and_pruning_only_removes():
    wl = _workload()
    reqs = build_requests(synthetic_trace(wl, None), wl, None)
    space, excluded = cap.build_space(Catalog.default(), wl, reqs, ["L4", "A10", "L40S"],
                                      cap.Prices.load(cap.default_prices_path()), TARGETS,
                                      cap.FleetFile(instances=[{"gpu": "L4"}]), 3, 0.1)
    assert excluded == []
    full = [c.key for c, _ in space.candidates(pruned=False)]
    kept = [c.key for c, miss in space.candidates(pruned=True)]
    assert full == sorted(full) and len(set(full)) == len(full)
    assert len(full) == space.size(pruned=False)
    it = iter(full)
    assert all(k in it for k in kept)  # a subsequence, same order
    assert 0 < len(kept) < len(full)


def test_option_that_cannot_prefill_within_ttft_is_excluded():
    wl = _workload(classes={"interactive": {"ttft_s": 0.05, "share": 1.0}},
                   models={"qwen3-8b": 1.0})
    reqs = build_requests(synthetic_trace(wl, None), wl, None)
    with pytest.raises(ConfigError, match="no usable GPU type.*prefill within 0.05 s"):
        cap.build_space(Catalog.default(), wl, reqs, ["L4"],
                        cap.Prices.load(cap.default_prices_path()), {"interactive": 0.99},
                        cap.FleetFile(instances=[{"gpu": "L4"}]), 2, 0.1)


def test_class_targets_parse_and_refuse_bad_input():
    assert cap.parse_class_targets("batch=0.999", ["interactive", "batch"], 0.99) == {
        "interactive": 0.99, "batch": 0.999}
    for text, msg in (("gold=0.9", "unknown class 'gold'"), ("batch", "CLASS=FRACTION"),
                      ("batch=x", "not a number"), ("batch=1.5", r"\(0, 1\]")):
        with pytest.raises(ConfigError, match=msg):
            cap.parse_class_targets(text, ["interactive", "batch"], 0.99)


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlm_opt.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def wl_file(tmp_path):
    p = tmp_path / "wl.toml"
    p.write_text('name = "cli-small"\nseed = 2\nduration_s = 20\nrate_scale = 2.0\n'
                 '[classes.interactive]\nttft_s = 2.0\nshare = 0.7\n'
                 '[classes.batch]\nttft_s = 300.0\nshare = 0.3\n'
                 '[models]\n"qwen3-8b" = 1.0\n')
    return p


def test_cli_fleet_found_with_qlm_meets_its_target_when_rerun_with_whatif(tmp_path, wl_file):
    out = tmp_path / "cap"
    r = _cli("capacity", "--workload", str(wl_file), "--gpus", "L4,L40S", "--target", "0.95",
             "--max-gpus-per-type", "3", "--workers", "2", "--out", str(out), "-q")
    assert r.returncode == 0, r.stderr
    assert "meets" in r.stdout
    for f in ("fleet.toml", "report.json", "frontier.png"):
        assert (out / f).stat().st_size > 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["policy"] == "qlm" and rep["answer"]["meets"]
    w = _cli("whatif", "--fleet", str(out / "fleet.toml"), "--workload", str(wl_file),
             "--policy", "qlm", "--out", str(tmp_path / "wi"), "-q")
    assert w.returncode == 0, w.stderr
    wi = json.loads((tmp_path / "wi" / "report.json").read_text())["policies"]["qlm"]
    for c in ("interactive", "batch"):
        assert wi["per_class"][c]["slo_attainment"] >= 0.95
        assert wi["per_class"][c]["slo_attainment"] == rep["answer"]["attainment"][c]


@pytest.mark.parametrize("args,msg", [
    (["--gpus", "TPU"], "unknown GPU type 'TPU'"),
    (["--gpus", "L4,L4"], "names a GPU type twice"),
    (["--class-target", "gold=0.9"], "unknown class 'gold'"),
    (["--target", "1.5"], "--target must be in (0, 1]"),
    (["--policy", "magic"], "unknown policy 'magic'"),
    (["--max-gpus-per-type", "0"], "--max-gpus-per-type must be >= 1"),
    (["--workload", "/nonexistent/wl.toml"], "file not found"),
    (["--trace", "/nonexistent/t.csv"], "file not found"),
    (["--gpus", "H20"], "no price for GPU type 'H20'"),
    (["--ray-address", "127.0.0.1:1"], "cannot reach Ray at '127.0.0.1:1'"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, msg):
    prices = tmp_path / "p.toml"
    prices.write_text('[gpu_hour]\nL4 = 0.7\nL40S = 1.3\nH100-80GB = 3.0\n')
    r = _cli("capacity", "--prices", str(prices), "--out", str(tmp_path / "o"), *args,
             timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlm-opt: error:"), r.stderr
    assert msg in lines[0]


def test_bad_prices_file(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[gpu_hour]\nL4 = -1\n')
    with pytest.raises(ConfigError, match="gpu_hour.L4.*must be > 0"):
        cap.Prices.load(p)
    p.write_text('[gpu_hour]\nL4 = "cheap"\n')
    with pytest.raises(ConfigError, match="p.toml: field 'gpu_hour.L4'"):
        cap.Prices.load(p)


def test_default_prices_cover_every_gpu_type_and_say_they_are_indicative():
    pr = cap.Prices.load(cap.default_prices_path())
    assert set(pr.gpu_hour) == set(Catalog.default().gpus)
    assert all(p > 0 for p in pr.gpu_hour.values())
    assert "indicative" in pr.source and pr.currency == "USD"
