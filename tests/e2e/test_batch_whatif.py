"""What-if runs with Batch API jobs (the workload's ``[[batch_jobs]]``), and the rule that feeds
a job's lines into the queue (shared by the server's runner and ``simulate``)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from qlm_opt.cli import app as cli_app
from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import Request, RequestState
from qlm_opt.errors import ConfigError
from qlm_opt.whatif.batch_jobs import FeedRule, job_report, simulate
from qlm_opt.whatif.workload import build_requests, synthetic_trace

FLEET = {"name": "two-llama", "instances": [{"gpu": "A100-80GB", "model": "llama-3.1-8b",
                                             "count": 2}]}


def _workload(**job) -> dict:
    return {
        "name": "wl", "seed": 1, "duration_s": 60, "rate_scale": 0.5,
        "classes": {"interactive": {"ttft_s": 2.0, "share": 1.0, "priority": 0},
                    "batch": {"ttft_s": 600.0, "share": 0.0, "priority": 1}},
        "models": {"llama-3.1-8b": 1.0},
        "batch_jobs": [{"submit_at_s": 5.0, "num_lines": 300, "window": "10m",
                        "model": "llama-3.1-8b", **job}],
    }


def test_workload_batch_jobs_become_lines_due_at_window_end():
    wl = Workload.from_dict(_workload())
    reqs = build_requests(synthetic_trace(wl), wl)
    lines = [r for r in reqs if r.tenant == "batch-job-0"]
    assert len(lines) == 300
    assert all(r.slo_class == "batch" and r.arrived_at == 5.0 for r in lines)
    assert all(r.deadline_at == 5.0 + 600.0 for r in lines)
    assert [r.arrived_at for r in reqs] == sorted(r.arrived_at for r in reqs)
    assert len({r.id for r in reqs}) == len(reqs)


@pytest.mark.parametrize("job, msg", [
    ({"slo_class": "nope"}, "unknown class"),
    ({"window": "soon"}, "not a duration"),
    ({"num_lines": 0}, "num_lines"),
])
def test_bad_batch_jobs_are_refused(job, msg):
    with pytest.raises(Exception, match=msg):
        Workload.from_dict(_workload(**job))


def test_unknown_batch_job_model_is_a_config_error():
    wl = Workload.from_dict(_workload(model="no-such-model"))
    with pytest.raises(ConfigError, match="batch_jobs.0.model"):
        wl.check_models(Fleet.from_dict(FLEET).catalog)


def test_whatif_cli_runs_batch_jobs(tmp_path):
    import tomli_w

    wl = tmp_path / "wl.toml"
    wl.write_bytes(tomli_w.dumps(_workload(num_lines=200)).encode())
    fleet = tmp_path / "fleet.toml"
    fleet.write_bytes(tomli_w.dumps(FLEET).encode())
    out = tmp_path / "out"
    r = CliRunner().invoke(cli_app, ["whatif", "--workload", str(wl), "--fleet", str(fleet),
                                     "--policy", "priority", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    traffic = len(build_requests(synthetic_trace(Workload.from_dict(_workload(num_lines=1))),
                                 Workload.from_dict({**_workload(), "batch_jobs": []})))
    assert rep["sim"]["num_requests"] == traffic + 200


def test_feed_rule_paces_by_the_window():
    rule = FeedRule(max_lines_in_flight=100, min_lines_in_flight=4, pace_fraction=0.5)
    # before any line finished: the minimum
    assert rule.target_in_flight(1000, 0.0, 0.0, 3600.0, None) == 4
    # 1000 lines by 1800 s at 10 s a line: 1000 / 1800 * 10 = 5.6 -> 6
    assert rule.target_in_flight(1000, 0.0, 0.0, 3600.0, 10.0) == 6
    # less time left or slower lines: more in flight, up to the maximum
    assert rule.target_in_flight(1000, 1500.0, 0.0, 3600.0, 10.0) == 34
    assert rule.target_in_flight(1000, 0.0, 0.0, 3600.0, 60.0) == 34
    assert rule.target_in_flight(1000, 1795.0, 0.0, 3600.0, 10.0) == 100
    assert rule.target_in_flight(0, 0.0, 0.0, 3600.0, 10.0) == 4


def test_feed_rule_gate_waits_for_urgent_requests():
    rule = FeedRule(urgent_wait_fraction=0.5)
    r = Request(1, "m", "interactive", 10, 10, arrived_at=10.0, deadline_at=12.0)
    limits = {"interactive": 2.0}
    assert rule.urgent_ok(10.9, [r], limits)
    assert not rule.urgent_ok(11.1, [r], limits)  # waited 1.1 s > 0.5 * 2 s
    r.first_token_at = 10.5
    assert rule.urgent_ok(11.1, [r], limits)
    other = Request(2, "m", "batch", 10, 10, arrived_at=0.0, deadline_at=600.0)
    assert rule.urgent_ok(100.0, [other], limits)  # only more urgent classes count


def test_simulate_feeds_lines_within_bounds_and_meets_the_window():
    wl = Workload.from_dict(_workload(num_lines=400))
    fleet = Fleet.from_dict(FLEET)
    traffic = build_requests(synthetic_trace(wl), Workload.from_dict(
        {**_workload(), "batch_jobs": []}))
    rule = FeedRule(max_lines_in_flight=16, min_lines_in_flight=16)
    reqs = simulate("priority", fleet, wl, traffic, rule=rule, drain_s=900)
    lines = [r for r in reqs if r.tenant == "batch-job-0"]
    # admission times: never more than 16 lines admitted and not ended at once
    events = sorted([(r.arrived_at, 1) for r in lines] + [(r.completed_at, -1) for r in lines])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak <= 16
    rep = job_report(reqs, wl)["batch-job-0"]
    assert rep["num_lines"] == 400 and rep["in_window"] == 1.0
    assert 0 < rep["completion_window_fraction"] < 1
    assert all(r.state == RequestState.FINISHED for r in traffic)


def test_simulate_expires_lines_at_window_end():
    wl = Workload.from_dict(_workload(num_lines=3000, window="20s"))
    fleet = Fleet.from_dict(FLEET)
    traffic = build_requests(synthetic_trace(wl), Workload.from_dict(
        {**_workload(), "batch_jobs": []}))
    reqs = simulate("priority", fleet, wl, traffic, rule=FeedRule(max_lines_in_flight=8,
                                                                   min_lines_in_flight=8))
    lines = [r for r in reqs if r.tenant == "batch-job-0"]
    rep = job_report(reqs, wl)["batch-job-0"]
    assert 0 < rep["num_in_window"] < 3000
    late = [r for r in lines if r.state != RequestState.FINISHED]
    assert late and all(r.drop_reason == "batch_expired" for r in late)
    # nothing of the job ran past the window's end
    assert all(r.completed_at <= 25.0 + 1e-6 for r in lines if r.completed_at is not None)
