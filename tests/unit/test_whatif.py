import json
import subprocess
import sys

import pytest

from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import RequestState
from qlm_opt.whatif.workload import build_requests, synthetic_trace
from qlm_opt.whatif.run import run_policy, run_whatif, write_report
from tests.conftest import small_fleet_dict, small_workload_dict

BASELINES = ["fcfs", "edf", "priority", "shepherd"]


@pytest.fixture(scope="module")
def fleet():
    return Fleet.from_dict(small_fleet_dict())


@pytest.fixture(scope="module")
def workload():
    return Workload.from_dict(small_workload_dict())


@pytest.mark.parametrize("policy", BASELINES)
def test_every_request_completed_or_dropped(policy, fleet, workload):
    reqs = build_requests(synthetic_trace(workload), workload)
    run = run_policy(policy, fleet, workload, reqs)
    m = run.metrics
    assert m["num_requests"] == len(reqs) > 300
    assert m["num_completed"] == sum(r.state == RequestState.FINISHED for r in reqs)
    for r in reqs:
        assert r.state in (RequestState.FINISHED, RequestState.DROPPED)
        if r.state == RequestState.FINISHED:
            assert r.num_generated == min(r.output_tokens, 131072 - r.prompt_tokens)
            assert r.arrived_at <= r.first_token_at <= r.completed_at
    # mistral-7b is on no instance: it must have been swapped in
    assert m["num_swaps"] >= 1
    assert 0 < m["gpu_utilization"] <= 1
    assert 0 <= m["slo_attainment"] <= 1


def test_policies_differ_in_expected_direction(fleet, workload):
    rep = run_whatif(BASELINES, fleet, workload)
    p = rep["policies"]
    # interactive-first policies serve interactive traffic at least as well as FCFS
    assert p["priority"]["per_class"]["interactive"]["slo_attainment"] >= \
        p["fcfs"]["per_class"]["interactive"]["slo_attainment"]
    for name in BASELINES:
        assert p[name]["throughput_tokens_per_s"] > 0


def _strip_wall(d):
    if isinstance(d, dict):
        return {k: _strip_wall(v) for k, v in d.items() if k != "wall_s"}
    if isinstance(d, list):
        return [_strip_wall(v) for v in d]
    return d


def test_same_seed_same_report(fleet, workload):
    a = run_whatif(["fcfs", "shepherd"], fleet, workload, seed=11)
    b = run_whatif(["fcfs", "shepherd"], fleet, workload, seed=11)
    c = run_whatif(["fcfs"], fleet, workload, seed=12)
    assert _strip_wall(a) == _strip_wall(b)
    assert a["policies"]["fcfs"]["slo_attainment"] != c["policies"]["fcfs"]["slo_attainment"] or \
        a["sim"]["num_requests"] != c["sim"]["num_requests"]


def test_report_files(tmp_path, fleet, workload):
    rep = run_whatif(["fcfs"], fleet, workload)
    files = write_report(rep, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    pol = data["policies"]["fcfs"]
    for key in ("slo_attainment", "throughput_tokens_per_s", "num_completed", "num_dropped"):
        assert key in pol
    assert 0 <= pol["per_class"]["interactive"]["slo_attainment"] <= 1
    assert data["sim"]["num_requests"] > 0 and data["sim"]["wall_s"] > 0
    assert {f.name for f in files} >= {"report.json", "attainment.png", "queue.png"}
    assert (tmp_path / "attainment.png").stat().st_size > 1000


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qlm_opt.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_cli_whatif_default_example(tmp_path):
    r = _cli("whatif", "--out", str(tmp_path), "--duration", "60", "-q")
    assert r.returncode == 0, r.stderr
    assert "fcfs" in r.stdout and "shepherd" in r.stdout
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["policies"]) == set(BASELINES)


def test_cli_whatif_on_conv_trace(tmp_path, conv_trace_path):
    r = _cli("whatif", "--trace", str(conv_trace_path), "--policy", "fcfs,edf", "--duration",
             "60", "--out", str(tmp_path), "-q")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["sim"]["trace"].endswith("azure_llm_2023_conv.csv")


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--trace", "/nonexistent/t.csv"], "file not found"),
        (["--fleet", "/nonexistent/f.toml"], "file not found"),
        (["--duration", "-5"], "--duration must be > 0"),
    ],
)
def test_cli_bad_input_one_line_exit_2(tmp_path, args, msg):
    r = _cli("whatif", "--out", str(tmp_path), "-q", *args)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("qlm-opt: error:")


def test_cli_bad_trace_row(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,5,x\n")
    r = _cli("whatif", "--trace", str(p), "--out", str(tmp_path), "-q")
    assert r.returncode == 2 and "t.csv:2: GeneratedTokens" in r.stderr


@pytest.mark.parametrize(
    "options, msg",
    [
        ('{ executor = { kv_admission = "bogus" } }', "kv_admission must be 'peak' or 'count'"),
        ("{ no_such_option = 1 }", "no_such_option"),
    ],
)
def test_cli_serve_bad_policy_options_one_line_exit_2(tmp_path, options, msg):
    """A bad option of the configured policy stops `qlm-opt serve` before it starts, with
    one line naming the option (not a traceback at the app's startup)."""
    from importlib.resources import files

    base = (files("qlm_opt") / "examples" / "server.toml").read_text()
    assert '\npolicy = "qlm"' in base
    cfg = tmp_path / "server.toml"
    line = f'\npolicy = "qlm"\npolicy_options = {options}'
    cfg.write_text(base.replace('\npolicy = "qlm"', line, 1))
    r = _cli("serve", "--config", str(cfg), "--port", "1")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0] and lines[0].startswith("qlm-opt: error:")
