"""The default ``qlm`` policy over HTTP (the embedded simulated fleet): its planning epochs
run on a worker thread while requests are served, and ``/metrics`` carries exactly what the
policy reports (``GET /admin/plan``'s ``report``), nested sections included."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import ADMIN_KEY, MODEL, LiveServer, auth, settings_for


@pytest.fixture(scope="module")
def qsrv():
    srv = LiveServer(settings_for(20.0, backend={"policy": "qlm"}))
    yield srv
    srv.stop()


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _flatten(prefix: str, d: dict, top: bool, out: dict) -> None:
    """The report's numbers as the exporter names them (see ``server.metrics``)."""
    for k, v in d.items():
        name = f"{prefix}_{k}"
        if isinstance(v, bool | int | float):
            out[(name, ())] = float(v)
        elif isinstance(v, str):
            out[(name + "_info", (("value", v),))] = 1.0
        elif isinstance(v, dict):
            if not top and all(isinstance(x, bool | int | float) for x in v.values()):
                for kk, x in v.items():
                    out[(name, (("key", str(kk)),))] = float(x)
            else:
                _flatten(name, v, False, out)


def _idle(srv: LiveServer):
    gw = srv.gateway
    rt = gw.backend.runtime
    return lambda: not gw.jobs and rt.num_outstanding == 0


def test_metrics_equal_the_policy_report(qsrv):
    gw = qsrv.gateway
    # Half of the requests are for a model no instance holds: they wait in the global queue
    # while an instance swaps, and the planning epochs see them.
    bodies = [{"model": m, "prompt": "plan this", "max_tokens": 40}
              for m in (MODEL, "qwen3-8b")]

    def send(c: httpx.Client, i: int) -> httpx.Response:
        return c.post("/v1/completions", json=bodies[i % 2],
                      headers={"x-slo-class": ("interactive", "batch")[(i // 2) % 2]})

    with httpx.Client(base_url=qsrv.url, headers=auth(), timeout=60) as c, \
            concurrent.futures.ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: send(c, i), range(48)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    assert all(r.json()["usage"]["completion_tokens"] == 40 for r in rs)
    qsrv.wait_until(_idle(qsrv), timeout_s=30)
    # no queued group is left, so no epoch runs between the two reads below
    plan = httpx.get(qsrv.url + "/admin/plan", headers=auth(ADMIN_KEY)).json()
    text = httpx.get(qsrv.url + "/metrics").text
    rep = plan["report"]
    assert plan["policy"] == "qlm" and plan["plan"] is not None
    solver = rep["solver"]
    assert solver["num_epochs"] >= 1 and sum(solver["status_counts"].values()) >= 1
    assert solver["solve_ms_p50"] > 0

    got = _samples(text)
    want: dict = {}
    _flatten("qlm_policy", rep, True, want)
    assert ("qlm_policy_solver_num_epochs", ()) in want
    for key, v in want.items():
        assert key in got, key
        assert got[key] == pytest.approx(v), key
    # the last epoch, from the plan the policy applied
    last = plan["plan"]
    assert got[("qlm_solver_ms", ())] == pytest.approx(last["solve_ms"] + last["build_ms"])
    assert got[("qlm_solver_status", (("status", last["status"]),))] == 1.0
    assert got[("qlm_plan_groups", ())] == sum(len(i["groups"]) for i in last["instances"])
    # every epoch went into the histogram, and the LSO counters match the runtime's
    assert got[("qlm_solver_seconds_count", ())] == solver["num_epochs"] == sum(
        solver["status_counts"].values())
    lso = qsrv.on_loop(lambda: dict(gw.backend.runtime.lso_counts))
    assert got[("qlm_lso_total", (("lso", "pull"),))] == lso["pull"] >= 48
    # predicted against observed wait: one observation per request with a prediction
    n_pred = sum(v for (name, _), v in got.items() if name == "qlm_wait_predicted_seconds_count")
    n_obs = sum(v for (name, _), v in got.items() if name == "qlm_wait_observed_seconds_count")
    assert n_pred == n_obs >= 1
    # each instance's model and state
    fleet = httpx.get(qsrv.url + "/admin/fleet", headers=auth(ADMIN_KEY)).json()
    for inst in fleet["instances"]:
        key = ("qlm_instance_info", tuple(sorted({
            "instance": inst["name"], "model": str(inst["model"]), "state": inst["state"],
            "swap_to": inst["swap_to"] or ""}.items())))
        assert got[key] == 1.0
        assert got[("qlm_instance_up", (("instance", inst["name"]),))] == (
            1.0 if inst["state"] == "READY" and inst["model"] else 0.0)


def test_grafana_dashboard_reads_exported_metrics(qsrv):
    """Every metric the dashboard (dashboards/qlm-opt.json) queries is one the server exports
    (after the traffic of the test above)."""
    import json
    import re
    from pathlib import Path

    dash = json.loads((Path(__file__).resolve().parents[2] / "dashboards" / "qlm-opt.json")
                      .read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    names = {n for e in exprs for n in re.findall(r"\bqlm_[a-z0-9_]+", e)}
    assert len(names) >= 20
    text = httpx.get(qsrv.url + "/metrics").text
    exported = set(re.findall(r"^(qlm_[a-z0-9_]+)", text, re.M)) | set(
        re.findall(r"^# TYPE (qlm_[a-z0-9_]+)", text, re.M))
    missing = sorted(n for n in names if n not in exported)
    assert not missing, missing


def test_tpot_caps_reach_the_live_executor():
    """A class with a TPOT target, served live under ``qlm``: once its requests have arrived,
    each engine holding their model is capped (the executor's ``seat_caps``, set every epoch
    even when nothing is queued), within the engine's seats; no other engine is. (The KV caps,
    which join the same ``seat_caps`` on KV-bound engines of any model, are off here.)"""
    s = settings_for(20.0, backend={"policy": "qlm", "policy_options": {"kv_caps": False}})
    s.classes["interactive"].tpot_s = 0.02
    srv = LiveServer(s)
    try:
        with httpx.Client(base_url=srv.url, headers=auth(), timeout=60) as c, \
                concurrent.futures.ThreadPoolExecutor(8) as pool:
            rs = list(pool.map(lambda i: c.post(
                "/v1/completions", json={"model": MODEL, "prompt": "cap this", "max_tokens": 20},
                headers={"x-slo-class": "interactive"}), range(16)))
        assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
        srv.wait_until(lambda: bool(srv.gateway.backend.policy.executor.seat_caps), timeout_s=30)

        def state():
            rt = srv.gateway.backend.runtime
            return (dict(srv.gateway.backend.policy.executor.seat_caps),
                    {i.id: (i.model, i.engine.seat_counts()[2]) for i in rt.instances})

        caps, insts = srv.on_loop(state)
        assert caps and all(insts[iid][0] == MODEL for iid in caps)
        assert all(1 <= cap <= insts[iid][1] for iid, cap in caps.items())
        assert {i for i, (m, _) in insts.items() if m == MODEL} == set(caps)
    finally:
        srv.stop()
