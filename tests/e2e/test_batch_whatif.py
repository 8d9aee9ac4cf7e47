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
from qlm_opt.core.batch_feed import FeedRule
from qlm_opt.whatif.batch_jobs import job_report, traffic_workload
from qlm_opt.whatif.run import simulate_batch_jobs
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


def _traffic(wl: Workload) -> list[Request]:
    return build_requests(synthetic_trace(wl), traffic_workload(wl))


def _in_flight_peaks(lines: list[Request]) -> tuple[int, int]:
    """Peak lines in flight (fed, not ended) and peak lines fed without a first token."""
    def peak(events):
        level = top = 0
        for _, d in sorted(events):  # at equal times ends (-1) come before feeds (+1)
            level += d
            top = max(top, level)
        return top

    fed = [r for r in lines if r.arrived_at is not None and (r.completed_at is not None
                                                           or r.first_token_at is not None)]
    ends = [(r.completed_at, -1) for r in fed if r.completed_at is not None]
    firsts = [(r.first_token_at, -1) for r in fed if r.first_token_at is not None]
    starts = [(r.arrived_at, 1) for r in fed]
    return peak(starts + ends), peak(starts + firsts)


def test_whatif_cli_runs_batch_jobs(tmp_path):
    import tomli_w

    wl = tmp_path / "wl.toml"
    wl.write_bytes(tomli_w.dumps(_workload(num_lines=200)).encode())
    fleet = tmp_path / "fleet.toml"
    fleet.write_bytes(tomli_w.dumps(FLEET).encode())
    out = tmp_path / "out"
    r = CliRunner().invoke(cli_app, ["whatif", "--workload", str(wl), "--fleet", str(fleet),
                                     "--policy", "priority,fcfs", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "report.json").read_text())
    traffic = len(_traffic(Workload.from_dict(_workload(num_lines=1))))
    assert rep["sim"]["num_requests"] == traffic + 200
    for policy in ("priority", "fcfs"):
        job = rep["policies"][policy]["batch_jobs"]["batch-job-0"]
        assert job["num_lines"] == 200
        assert job["num_done"] + job["num_expired"] + job["num_failed"] == 200
        assert job["num_in_window"] == 200 and job["in_window"] == 1.0
        assert 0 < job["p50_completion_s"] <= job["p99_completion_s"] <= 600
        assert 0 < job["completion_window_fraction"] < 1
    # the printed table has the job's row per policy
    assert "batch jobs" in r.output and r.output.count("batch-job-0") == 2


@pytest.mark.parametrize("job, msg", [
    ({"window": "soon"}, "batch_jobs.0"),
    ({"slo_class": "nope"}, "batch_jobs.0.slo_class"),
    ({"model": "no-such-model"}, "batch_jobs.0.model"),
    ({"num_lines": -3}, "batch_jobs.0.num_lines"),
    ({"lines": 3}, "batch_jobs.0.lines"),
])
def test_whatif_cli_bad_batch_jobs_is_one_line_error(tmp_path, job, msg):
    import subprocess
    import sys

    import tomli_w

    wl = tmp_path / "wl.toml"
    wl.write_bytes(tomli_w.dumps(_workload(**job)).encode())
    fleet = tmp_path / "fleet.toml"
    fleet.write_bytes(tomli_w.dumps(FLEET).encode())
    p = subprocess.run([sys.executable, "-m", "qlm_opt.cli", "whatif", "--workload", str(wl),
                        "--fleet", str(fleet), "--policy", "fcfs", "--out",
                        str(tmp_path / "out"), "--quiet"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qlm-opt: error:") and msg in err[0], p.stderr
    assert not (tmp_path / "out" / "report.json").exists()


def test_feed_rule_paces_by_the_window():
    rule = FeedRule(max_lines_in_flight=100, min_lines_in_flight=4, pace_fraction=0.5)
    # before any line finished: the minimum
    assert rule.target_in_flight(1000, 0.0, 0.0, 3600.0, None, 500) == 4
    # 1000 lines by 1800 s at 10 s a line: 1000 / 1800 * 10 = 5.6 -> 6
    assert rule.target_in_flight(1000, 0.0, 0.0, 3600.0, 10.0, 500) == 6
    # less time left or slower lines: more in flight, up to the cap
    assert rule.target_in_flight(1000, 1500.0, 0.0, 3600.0, 10.0, 500) == 34
    assert rule.target_in_flight(1000, 0.0, 0.0, 3600.0, 60.0, 500) == 34
    assert rule.target_in_flight(1000, 1795.0, 0.0, 3600.0, 10.0, 500) == 100
    assert rule.target_in_flight(0, 0.0, 0.0, 3600.0, 10.0, 500) == 4


def test_feed_rule_follows_the_fleet():
    rule = FeedRule(pace_fraction=0.5)  # no max_lines_in_flight: the fleet's seats
    assert rule.target_in_flight(10**6, 1795.0, 0.0, 3600.0, 10.0, 300) == 300
    assert rule.target_in_flight(10**6, 1795.0, 0.0, 3600.0, 10.0, 600) == 600
    assert FeedRule(max_lines_in_flight=48).target_in_flight(
        10**6, 1795.0, 0.0, 3600.0, 10.0, 600) == 48  # the override
    # min above the cap: the cap wins
    assert FeedRule(max_lines_in_flight=2, min_lines_in_flight=8).target_in_flight(
        10, 0.0, 0.0, 3600.0, None, 600) == 2
    # backpressure: lines without a first token below prefills_per_instance per instance
    assert rule.fleet_ok(1, 2) and not rule.fleet_ok(2, 2)
    assert FeedRule(prefills_per_instance=3).fleet_ok(5, 2)
    assert not rule.fleet_ok(1, 0)  # no instance ready (swapping): one line at most


def test_fleet_seats_from_max_num_seqs_and_kv():
    from qlm_opt.core.runtime import Runtime
    from qlm_opt.core.batch_feed import fleet_seats
    from qlm_opt.hosts.simulated import Simulator

    rt = Runtime(Fleet.from_dict(FLEET), Simulator())
    insts = rt.ready_instances("llama-3.1-8b")
    st = insts[0].engine.stats()
    assert fleet_seats(insts, None) == 2 * st.max_num_seqs
    big = st.kv_capacity_tokens // 10  # ten lines of this size fill the KV cache
    assert fleet_seats(insts, big) == 2 * 10
    assert fleet_seats(insts[:1], big) == 10


def test_server_and_whatif_share_the_rule():
    from qlm_opt.server.batch.runner import feed_rule
    from qlm_opt.server.settings import BatchSection

    assert feed_rule(BatchSection()) == FeedRule()
    assert feed_rule(BatchSection(max_lines_in_flight=48)).max_lines_in_flight == 48


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
    traffic = _traffic(wl)
    rule = FeedRule(max_lines_in_flight=16, min_lines_in_flight=16)
    reqs = simulate_batch_jobs("priority", fleet, wl, traffic, rule=rule, drain_s=900)
    lines = [r for r in reqs if r.tenant == "batch-job-0"]
    assert len(lines) == 400 and len({r.id for r in reqs}) == len(reqs)
    peak, unstarted = _in_flight_peaks(lines)
    assert peak <= 16
    assert unstarted <= rule.prefills_per_instance * 2  # two instances serve the model
    rep = job_report(reqs, wl)["batch-job-0"]
    assert rep["num_lines"] == 400 and rep["in_window"] == 1.0 and rep["num_done"] == 400
    assert 0 < rep["completion_window_fraction"] < 1
    assert all(r.state == RequestState.FINISHED for r in traffic)


def test_whatif_paces_lines_over_the_window():
    """With slack, lines are not all queued at submission: fed a few at a time, spread over
    the window (the pace), every one done once and inside the window."""
    from qlm_opt.whatif.run import run_whatif

    wl = Workload.from_dict(_workload(num_lines=600, window="10m"))
    rep = run_whatif(["priority"], Fleet.from_dict(FLEET), wl, drain_s=900)
    job = rep["policies"]["priority"]["batch_jobs"]["batch-job-0"]
    assert job["num_lines"] == job["num_done"] == job["num_in_window"] == 600
    # paced to finish by 0.8 of the window: not at once, not late
    assert 0.3 < job["completion_window_fraction"] < 0.95
    assert job["peak_lines_in_flight"] < 600 / 4


def test_simulate_expires_lines_at_window_end():
    wl = Workload.from_dict(_workload(num_lines=3000, window="20s"))
    fleet = Fleet.from_dict(FLEET)
    traffic = _traffic(wl)
    reqs = simulate_batch_jobs("priority", fleet, wl, traffic, rule=FeedRule(max_lines_in_flight=8,
                                                                   min_lines_in_flight=8))
    lines = [r for r in reqs if r.tenant == "batch-job-0"]
    assert len(lines) == 3000 and len({r.id for r in lines}) == 3000
    rep = job_report(reqs, wl)["batch-job-0"]
    # every line accounted once: done inside the window, or reported late (expired)
    assert 0 < rep["num_in_window"] < 3000
    assert rep["num_done"] + rep["num_expired"] + rep["num_failed"] == 3000
    assert rep["num_expired"] == 3000 - rep["num_done"] and rep["num_failed"] == 0
    assert rep["completion_window_fraction"] != rep["completion_window_fraction"]  # NaN
    late = [r for r in lines if r.state != RequestState.FINISHED]
    assert late and all(r.drop_reason == "batch_expired" for r in late)
    # nothing of the job ran past the window's end
    assert all(r.completed_at <= 25.0 + 1e-6 for r in lines if r.completed_at is not None)
