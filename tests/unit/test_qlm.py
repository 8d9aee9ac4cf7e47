"""The ``qlm`` policy (CP-SAT planner + executor) and its qlm-true-lengths reference."""

import pytest

from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import RequestState
from qlm_opt.policies.qlm import QLMPolicy
from qlm_opt.whatif.workload import build_requests, synthetic_trace
from qlm_opt.whatif.run import run_policy
from tests.conftest import small_fleet_dict, small_workload_dict
from tests.unit.feeding import fed as _fed


@pytest.fixture(scope="module")
def fleet():
    return Fleet.from_dict(small_fleet_dict())


@pytest.fixture(scope="module")
def workload():
    return Workload.from_dict(small_workload_dict(duration_s=90))


@pytest.fixture(scope="module")
def runs(fleet, workload):
    out = {}
    for name in ("fcfs", "qlm", "qlm-true-lengths"):
        reqs = build_requests(synthetic_trace(workload), workload)
        out[name] = run_policy(name, fleet, workload, reqs, track_rwt=False,
                               policy_options={"preset": "fast"} if name != "fcfs" else None)
    return out


@pytest.mark.parametrize("name", ["qlm", "qlm-true-lengths"])
def test_every_request_ends_and_no_token_lost(runs, name):
    run = runs[name]
    m = run.metrics
    assert m["num_requests"] == len(run.requests) > 200
    # counted from the requests' own states, not from the report's arithmetic
    finished = sum(r.state == RequestState.FINISHED for r in run.requests)
    assert m["num_completed"] == finished
    for r in run.requests:
        assert r.state in (RequestState.FINISHED, RequestState.DROPPED)
        if r.state == RequestState.FINISHED:
            # evicted or preempted requests resume by recompute: exactly their length, once
            assert r.num_generated == r.output_tokens


def test_qlm_plans_and_swaps_in_the_missing_model(runs):
    m = runs["qlm"].metrics
    solver = m["solver"]
    assert solver["num_epochs"] > 5
    assert sum(solver["status_counts"].values()) == solver["num_epochs"]
    # mistral-7b is on no instance at the start: the fleet must swap one in
    assert m["num_swaps"] >= 1
    assert any(r.model == "mistral-7b" and r.state == RequestState.FINISHED
               for r in runs["qlm"].requests)


def test_qlm_beats_fcfs(runs):
    assert runs["qlm"].metrics["slo_attainment"] > runs["fcfs"].metrics["slo_attainment"]
    assert runs["qlm-true-lengths"].metrics["slo_attainment"] >= \
        runs["fcfs"].metrics["slo_attainment"]


def test_zero_time_limit_still_plans(fleet, workload):
    """A solver that never finishes (time limit 0) falls back to EDF: epochs never block."""
    import dataclasses

    from qlm_opt.planner import load_preset

    pre = dataclasses.replace(load_preset("fast"), time_limit_s=0.0)
    reqs = build_requests(synthetic_trace(workload), workload)[:300]
    run = run_policy("qlm", fleet, workload, reqs, track_rwt=False,
                     policy_options={"preset": pre})
    st = run.metrics["solver"]["status_counts"]
    assert set(st) == {"FALLBACK"} and sum(st.values()) > 0
    assert run.metrics["solver"]["fallback_causes"] == {"time_limit_zero": sum(st.values())}
    assert all(r.state in (RequestState.FINISHED, RequestState.DROPPED) for r in reqs)
    assert run.metrics["num_completed"] == sum(r.state == RequestState.FINISHED for r in reqs)


def test_snapshot_is_plain_data_and_round_trips(fleet, workload):
    from qlm_opt.planner import PlanningProblem

    sim, rt, pol, reqs = _fed(fleet, workload, QLMPolicy(workload=workload, preset="fast"), 50)
    pi = pol.snapshot(sim.now())
    assert pi is not None and len(pi.groups) > 0
    again = PlanningProblem.from_json(pi.to_json())
    assert [g.id for g in again.groups] == [g.id for g in pi.groups]
    # every group can run somewhere, and only where its model fits
    for g in pi.groups:
        assert g.service_ms and all(v > 0 for v in g.service_ms.values())


def test_snapshot_shortcut_for_groups_without_generated_tokens(fleet, workload):
    """A group none of whose members has generated a token is planned from its size alone
    (``snapshot``); the planning problem is the one the member-by-member sums give."""
    pol = QLMPolicy(workload=workload, preset="fast", aggregate_min_slack_s=5.0)
    sim, rt, pol, reqs = _fed(fleet, workload, pol, 200)
    # completions move the learned mean output lengths off the prior
    for r in reqs[:40]:
        r.num_generated = 37 + r.id % 50
        pol.est.observe_completion(r, pol._bucket(r))
        r.num_generated = 0
    # a member that ran and came back keeps its tokens (the member-by-member path)
    queued = [r for g in pol.gq.groups.values() for r in g.requests()]
    assert len(queued) > 20
    back = queued[len(queued) // 2]
    group = pol.gq.group_of(back)
    pol.gq.remove(back)
    back.num_generated = 123
    pol.gq.requeue(back, sim.now())
    assert group.has_generated()
    now = sim.now()
    fast = pol.snapshot(now)
    for g in pol.gq.groups.values():
        g._gen = g._gen or {-1}  # every group through the member-by-member sums
    slow = pol.snapshot(now)
    assert fast is not None and len(fast.groups) > 3
    assert any(gid.startswith("a") for gid in pol._members)  # aggregates are covered
    assert fast.groups == slow.groups


def test_admission_reserve_uses_the_observed_time_per_token(fleet, workload):
    """A seat is held one iteration per output token, and the iterations also carry other
    requests' prefill chunks: where finished requests show a longer time per token than the
    decode-only iteration, the reserve for the forecast urgent arrivals grows with it."""
    from qlm_opt.domain import Request

    sim, rt, pol, reqs = _fed(fleet, workload, QLMPolicy(workload=workload, preset="fast"), 60)
    now = sim.now()
    caps = pol._batch_seats(now)
    assert caps
    model = rt.instances[next(iter(caps))].model
    iter_s = pol.est.basics(rt.instances[next(iter(caps))],
                            rt.instances[next(iter(caps))].engine.stats())[1]
    # a finished request of that model that decoded 5x slower than the decode-only iteration
    done = Request(id=10_000, model=model, slo_class="batch", prompt_tokens=100,
                   output_tokens=101, arrived_at=0.0, deadline_at=600.0, tpot_s=None,
                   priority=1)
    done.first_token_at, done.completed_at, done.num_generated = 1.0, 1.0 + 100 * 5 * iter_s, 101
    done.instance_id = next(iter(caps))
    pol.on_finished(done)
    assert pol._tpot_seen[model] == pytest.approx(5 * iter_s)
    # an evicted or preempted request's gap holds its wait to resume, not seat time: unread
    for i, field in enumerate(("num_evictions", "num_preemptions")):
        gap = Request(id=10_001 + i, model=model, slo_class="batch", prompt_tokens=100,
                      output_tokens=101, arrived_at=0.0, deadline_at=600.0, tpot_s=None,
                      priority=1)
        gap.first_token_at, gap.completed_at, gap.num_generated = 1.0, 500.0, 101
        gap.instance_id = done.instance_id
        setattr(gap, field, 1)
        pol.on_finished(gap)
        assert pol._tpot_seen[model] == pytest.approx(5 * iter_s)
    slower = pol._batch_seats(now)
    same_model = [i for i in caps if rt.instances[i].model == model]
    assert all(slower[i] < caps[i] for i in same_model)
    assert all(slower[i] == caps[i] for i in caps if i not in same_model)
    # faster than the decode-only iteration (a small batch): the model's iteration stays
    pol._tpot_seen[model] = iter_s / 10
    assert pol._batch_seats(now) == caps


def test_admission_caps_follow_the_interactive_forecast(fleet, workload):
    """The plan keeps seats for the interactive arrivals the forecast expects: more of them,
    fewer seats for batch; every epoch's plan carries its caps to the executor."""
    from collections import deque

    sim, rt, pol, reqs = _fed(fleet, workload, QLMPolicy(workload=workload, preset="fast"), 60)
    now = sim.now()
    caps = pol._batch_seats(now)
    assert caps, "interactive arrivals were forecast: some instance keeps seats"
    for iid, cap in caps.items():
        seats = pol.est.basics(rt.instances[iid], rt.instances[iid].engine.stats())[0]
        assert cap < seats  # some seats are kept for the forecast urgent arrivals
    # twice the interactive arrivals over the same window: a larger reserve
    for key, times in pol._arrivals.items():
        if key[1] == "interactive":
            pol._arrivals[key] = deque(sorted(list(times) * 2))
    caps2 = pol._batch_seats(now)
    assert set(caps2) == set(caps)
    assert all(caps2[i] <= caps[i] for i in caps) and any(caps2[i] < caps[i] for i in caps)
    # the epoch's plan carries the caps; the executor applies them until the next plan
    pol._replan("period")
    plan = pol.current_plan()
    assert plan is not None
    by_inst = {e["instance"]: e["batch_seats"] for e in plan["instances"]}
    assert {i: c for i, c in by_inst.items() if c is not None} == pol.executor.batch_seats
    assert pol.executor.batch_seats == dict(pol.last_plan.batch_seats) != {}
    # without admission: no caps, batch takes every seat (as in qlm-rwt)
    off = _fed(fleet, workload, QLMPolicy(workload=workload, preset="fast", admission=False), 60)[2]
    off._replan("period")
    assert off.last_plan is not None and dict(off.last_plan.batch_seats) == {}
    assert off.executor.batch_seats == {}
    with pytest.raises(ValueError, match="admission_margin"):
        QLMPolicy(workload=workload, admission_margin=-1.0)


def _tpot_workload(tpot_s: float, **over) -> Workload:
    return Workload.from_dict(small_workload_dict(duration_s=60, classes={
        "interactive": {"ttft_s": 2.0, "tpot_s": tpot_s, "share": 0.6, "priority": 0},
        "batch": {"ttft_s": 300.0, "share": 0.4, "priority": 1}}, **over))


def test_tpot_caps_follow_the_target(fleet):
    """An instance whose model gets arrivals of a class with a TPOT target holds no more
    requests than keep the engine model's time per output token within it: a tighter target,
    a smaller cap; one the engine cannot meet even for one request, no cap; a loose one, every
    seat. The epoch's plan carries the caps to the executor, and the estimator and planner
    count no more seats than the cap."""
    wl = _tpot_workload(0.03)
    sim, rt, pol, reqs = _fed(fleet, wl, QLMPolicy(workload=wl, preset="fast"), 60)
    now = sim.now()
    caps = pol._tpot_caps(now)
    served = {r.model for r in reqs if r.slo_class == "interactive"}
    assert caps and {rt.instances[i].model for i in caps} <= served
    raw = {i: pol.est.basics(rt.instances[i], rt.instances[i].engine.stats())[0] for i in caps}
    assert all(1 <= caps[i] <= raw[i] for i in caps)
    assert any(caps[i] < raw[i] for i in caps)  # 30 ms binds on the 8B's A100s

    def with_target(t):
        pol._tpot_cache = {"interactive": t}
        return pol._tpot_caps(now)

    tighter = with_target(0.015)
    assert all(tighter.get(i, 0) <= caps[i] for i in caps)
    assert any(tighter.get(i, 0) < caps[i] for i in caps)
    assert with_target(1e-4) == {}  # a single decode step is slower: capping gains nothing
    loose = with_target(10.0)
    assert {i: float(c) for i, c in loose.items() if i in raw} == {
        i: float(int(s)) for i, s in raw.items()}
    pol._tpot_cache = None
    pol._replan("period")
    plan = pol.last_plan
    assert plan is not None and dict(plan.seat_caps) == pol.executor.seat_caps \
        == pol.est.seat_caps != {}
    for iid, cap in plan.seat_caps.items():
        inst = rt.instances[iid]
        assert pol.est.basics(inst, inst.engine.stats())[0] <= cap
    assert {e["instance"]: e["seat_cap"] for e in pol.current_plan()["instances"]
            if e["seat_cap"] is not None} == dict(plan.seat_caps)
    # no class with a TPOT target, or the caps turned off: none
    plain = _fed(fleet, Workload.from_dict(small_workload_dict(duration_s=60)),
                 QLMPolicy(workload=Workload.from_dict(small_workload_dict(duration_s=60)),
                           preset="fast"), 60)
    assert plain[2]._tpot_caps(plain[0].now()) == {}
    off = _fed(fleet, wl, QLMPolicy(workload=wl, preset="fast", tpot_caps=False), 60)
    assert off[2]._tpot_caps(off[0].now()) == {}
    with pytest.raises(ValueError, match="tpot_headroom"):
        QLMPolicy(workload=wl, tpot_headroom=0.0)


def test_tpot_caps_meet_more_tpot_targets(fleet):
    """On a load where batch decodes share the engines, the TPOT caps keep interactive
    requests' time per token within their target: far more of them meet their SLO."""
    wl = _tpot_workload(0.04)
    att = {}
    for on in (False, True):
        reqs = build_requests(synthetic_trace(wl), wl)
        run = run_policy("qlm", fleet, wl, reqs, track_rwt=False,
                         policy_options={"preset": "fast", "tpot_caps": on})
        att[on] = run.metrics["per_class"]["interactive"]["slo_attainment"]
        assert all(r.state in (RequestState.FINISHED, RequestState.DROPPED)
                   for r in run.requests)
        assert sum(r.state == RequestState.FINISHED for r in run.requests) == len(reqs)
    assert att[True] >= att[False] + 0.2, att


def test_scored_cut_in_rate_leaves_out_the_plan_late_work(fleet, workload):
    """Interactive work a plan puts behind on-time work (tier 1) stops counting in the batch
    class's cut-in rate of ``qlm``'s scored prediction: its members, once, over the 30-s
    window and the instances holding the model. The rate decisions read keeps them; a
    demoted request put back on time counts again, and one that goes to the late lane is
    taken off once."""
    from collections import deque

    from qlm_opt.domain import Request

    sim, rt, pol, reqs = _fed(fleet, workload, QLMPolicy(workload=workload, preset="fast"), 60)
    now = sim.now()
    model = "llama-3.1-8b"
    iid = rt.ready_instances(model)[0].id
    # queued by hand (no pull): an interactive group of two on ``iid``, alone in its group
    # (the run's own queued interactive requests of the model leave the queue first)
    for g in list(pol.gq.groups.values()):
        if g.model == model and g.slo_class == "interactive":
            for r in g.requests():
                pol.gq.remove(r)
    groups = []
    for k in range(2):
        r = Request(10**6 + k, model, "interactive", 100, 50, now, now + 2.0)
        rt.accept(r)
        g, _ = pol.gq.add(r, now)
        pol.gq.place(g, iid)
        groups.append(g)
    urgent = groups[0]
    assert groups[1] is urgent and urgent.size == 2
    n_inst = len(rt.ready_instances(model))
    step = 1.0 / pol.rate_window_s / n_inst
    before = pol._cut_in_per_s(model, "batch", now, scored=True)
    plain = pol._cut_in_per_s(model, "batch", now)
    assert before == plain > 0
    pol.gq.set_tier(urgent, 1)
    pol._note_demoted()
    pol._note_demoted()  # counted once
    after = pol._cut_in_per_s(model, "batch", now, scored=True)
    assert before - after == pytest.approx(urgent.size * step)
    # decisions keep the rate without it
    assert pol._cut_in_per_s(model, "batch", now) == plain
    # a later plan puts it back on time: it cuts in again
    pol.gq.set_tier(urgent, 0)
    pol._note_demoted()
    assert pol._cut_in_per_s(model, "batch", now, scored=True) == pytest.approx(before)
    # put late again, then one of them goes to the late lane: both rates drop by it once
    pol.gq.set_tier(urgent, 1)
    pol._note_demoted()
    late, other = (r for _, _, r in urgent.members)
    pol._went_late(late)
    assert pol._cut_in_per_s(model, "batch", now, scored=True) == pytest.approx(after)
    assert pol._cut_in_per_s(model, "batch", now) == pytest.approx(plain - step)
    # a demotion older than the window no longer counts; the request going late then counts
    # once, in the late lane's count, and never lifts the scored rate above the plain one
    key = (model, "interactive")
    pol._demoted[other.id] = now - 2 * pol.rate_window_s
    pol._demoted_at[key] = deque([now - 2 * pol.rate_window_s])
    pol._went_late(other)
    assert pol._cut_in_per_s(model, "batch", now) == pytest.approx(plain - 2 * step)
    assert pol._cut_in_per_s(model, "batch", now, scored=True) == pytest.approx(
        plain - 2 * step)


def test_kv_caps_keep_long_prompts_from_preempting_each_other():
    """An 8B model on a 24-GB A10 holds about a dozen 4k-token requests at their peak; without
    the KV caps the engine admits more, preempts as their outputs grow and recomputes their
    prompts. With them, the engines preempt a third as often or less, and more requests meet their SLO."""
    from qlm_opt.core.estimator import RWTEstimator

    fl = Fleet.from_dict({"name": "a10", "instances": [
        {"gpu": "A10", "model": "llama-3.1-8b", "count": 2}]})
    wl = Workload.from_dict({
        "name": "long-prompts", "seed": 3, "duration_s": 120.0,
        "classes": {"interactive": {"ttft_s": 10.0, "share": 0.5, "priority": 0},
                    "batch": {"ttft_s": 600.0, "share": 0.5, "priority": 1}},
        "models": {"llama-3.1-8b": 1.0},
        "lengths": {"prompt_log_mu": 8.2, "prompt_log_sigma": 0.2, "prompt_max": 6000,
                    "output_log_mu": 6.0, "output_log_sigma": 0.4, "output_max": 1500},
        "arrivals": {"process": "poisson", "rate_per_s": 2.5}})
    out = {}
    for on in (False, True):
        reqs = build_requests(synthetic_trace(wl), wl)
        run = run_policy("qlm", fl, wl, reqs, track_rwt=False,
                         policy_options={"preset": "fast", "kv_caps": on})
        assert sum(r.state == RequestState.FINISHED for r in run.requests) == len(reqs)
        out[on] = (run.metrics["num_preemptions"], run.metrics["slo_attainment"])
    assert out[False][0] >= 20 and 3 * out[True][0] <= out[False][0], out
    assert out[True][1] > out[False][1], out
    # the cap itself: capacity over (mean running footprint + half the mean output)
    est = RWTEstimator(200.0, 100.0**2, 4000.0)
    st = type("S", (), {"kv_capacity_tokens": 60_000, "max_num_seqs": 256,
                        "model": None})()
    cap = est.kv_peak_seats(type("I", (), {"id": 0, "model": None})(), st)
    assert cap == int(60_000 / (4000.0 + 200.0 / 2 + 200.0 / 2))
    st.kv_capacity_tokens = 10**9  # max_num_seqs binds first: no cap
    assert est.kv_peak_seats(type("I", (), {"id": 0, "model": None})(), st) is None


def test_refill_default_is_the_policys():
    """``ExecutorConfig.refill_after`` left unset takes the policy's default: on for `qlm`
    (1.25 iterations), off for `qlm-rwt` (no KV caps to tell a starved engine from a full
    one); an explicit value wins."""
    from qlm_opt.policies import make_policy

    assert make_policy("qlm").executor_config.refill_after == 1.25
    assert make_policy("qlm-rwt").executor_config.refill_after == 0.0
    assert make_policy("qlm", executor={"refill_after": 0.0}).executor_config.refill_after == 0.0
    assert make_policy("qlm-rwt", executor={"refill_after": 2.0}).executor_config.refill_after == 2.0
