"""The executor: each LSO from a hand-made plan, and the fleet state after it.

A real runtime over simulated engines, a real global queue, no policy: the tests play the
policy's part (place groups, hand the executor a plan) and check what the fleet does.
"""

from __future__ import annotations

import pytest

from qlm_opt.config import Fleet
from qlm_opt.domain import Request
from qlm_opt.core.executor import Executor, ExecutorConfig
from qlm_opt.planner import PlanGroup, PlanInstance, PlanningProblem
from qlm_opt.planner.problem import ObjectiveWeights
from qlm_opt.planner.plan import PlanStatus, plan_from_sequences
from qlm_opt.core.queue import UNPLACED, GlobalQueue
from qlm_opt.core.instance import InstanceState
from qlm_opt.core.runtime import Runtime
from qlm_opt.hosts.simulated import Simulator

WEIGHTS = ObjectiveWeights(on_time=1000, swap_penalty=50_000, completion_penalty=1)


class _NoPolicy:
    """The runtime needs a policy to forward engine events to; these tests drive by hand."""

    name = "none"

    def bind(self, rt):
        self.rt = rt

    def on_arrival(self, req): ...
    def on_finished(self, req): ...
    def on_requeue(self, req): ...
    def on_instance_ready(self, inst): ...


@pytest.fixture()
def fleet_rt():
    fleet = Fleet.from_dict({
        "name": "exec-test",
        "warm_swaps": True,
        "engine": {"max_num_seqs": 8, "max_num_batched_tokens": 2048},
        "instances": [
            {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 2},
            {"gpu": "A100-80GB", "model": "mistral-7b", "count": 1},
        ],
    })
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    rt.bind(_NoPolicy())
    return rt, sim


def _req(i: int, model: str, deadline_at: float, prompt: int = 100, priority: int = 0,
         arrived_at: float = 0.0, output: int = 50) -> Request:
    return Request(id=i, model=model, slo_class="interactive" if priority == 0 else "batch",
                   prompt_tokens=prompt, output_tokens=output, arrived_at=arrived_at,
                   deadline_at=deadline_at, tpot_s=None, priority=priority)


def _queue(rt, reqs, where: int, gq: GlobalQueue | None = None):
    """Accept ``reqs`` into ``gq`` (a new queue by default), new groups placed on instance
    ``where``: (queue, new groups)."""
    gq = GlobalQueue() if gq is None else gq
    groups = []
    for r in reqs:
        rt.accept(r)
        g, new = gq.add(r, 0.0)
        if new:
            gq.place(g, where)
            groups.append(g)
    return gq, groups


def _pi(groups, service, rt, deadline_ms=10_000, start_deadline=False):
    """A planning problem for queue groups: the same service time on every instance."""
    pgs = tuple(
        PlanGroup(str(g.id), g.model, g.size, 10 * g.size, deadline_ms,
                  {i.id: service for i in rt.instances
                   if rt.fleet.can_serve(i.spec, g.model)},
                  start_deadline_ms=deadline_ms - service if start_deadline else None)
        for g in groups
    )
    insts = tuple(PlanInstance(i.id, i.spec.gpu, i.model, 0, True, None)
                  for i in rt.instances)
    return PlanningProblem(pgs, insts, default_swap_ms=1000, weights=WEIGHTS)


def _plan(pi, seqs):
    return plan_from_sequences(pi, seqs, PlanStatus.OPTIMAL, "test")


def test_swap_when_the_plan_gains_more_than_its_cost(fleet_rt):
    rt, _ = fleet_rt
    # 8 requests of mistral queued on the mistral instance; the plan moves instance 1
    # (llama) to mistral for them: gain 8 requests > 5 requests of swap penalty.
    reqs = [_req(i, "mistral-7b", 60.0) for i in range(8)]
    gq, groups = _queue(rt, reqs, 2)
    ex = Executor(rt, gq, ExecutorConfig())
    pi = _pi(groups, 500, rt)
    plan = _plan(pi, {1: [str(groups[0].id)]})
    counts = ex.apply(plan, pi, 0.0)
    inst = rt.instances[1]
    assert counts["swap"] == 1
    assert inst.state in (InstanceState.DRAINING, InstanceState.SWAPPING)
    assert inst.swap_to == "mistral-7b"
    assert rt.lso_counts["swap"] == 1


def test_no_swap_when_the_gain_is_below_the_penalty(fleet_rt):
    rt, _ = fleet_rt
    reqs = [_req(i, "mistral-7b", 60.0) for i in range(4)]  # 4 requests < 5 of penalty
    gq, groups = _queue(rt, reqs, 2)
    ex = Executor(rt, gq, ExecutorConfig())
    pi = _pi(groups, 500, rt)
    plan = _plan(pi, {1: [str(groups[0].id)]})
    counts = ex.apply(plan, pi, 0.0)
    assert counts["swap"] == 0
    assert rt.instances[1].state == InstanceState.READY
    assert rt.instances[1].model == "llama-3.1-8b"
    # the group is not moved onto an instance that does not hold its model
    assert groups[0].instance_id == 2


def test_serve_these_then_swap(fleet_rt):
    rt, sim = fleet_rt
    llama = [_req(i, "llama-3.1-8b", 60.0) for i in range(2)]
    mistral = [_req(10 + i, "mistral-7b", 60.0, arrived_at=0.0) for i in range(8)]
    gq, groups = _queue(rt, llama + mistral, 1)
    g_llama = next(g for g in groups if g.model == "llama-3.1-8b")
    g_mistral = next(g for g in groups if g.model == "mistral-7b")
    gq.place(g_mistral, UNPLACED)
    # both llama requests may wait in the engine at once, so that one pull serves the group
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=len(llama)))
    pi = _pi(groups, 500, rt)
    # instance 1: its llama group first, then swap to mistral for the mistral group
    plan = _plan(pi, {1: [str(g_llama.id), str(g_mistral.id)]})
    assert plan.instances[1].final_model == "mistral-7b"
    counts = ex.apply(plan, pi, 0.0)
    inst = rt.instances[1]
    assert counts["swap_after"] == 1 and counts["swap"] == 0
    assert inst.state == InstanceState.READY and inst.model == "llama-3.1-8b"
    assert g_llama.instance_id == 1  # kept, to be served before the swap
    ex.pull(inst)  # serves the llama group; its queue is then empty: the swap starts
    assert all(r.instance_id == 1 for r in llama)
    ex.pull(inst)
    assert inst.swap_to == "mistral-7b"
    assert inst.state in (InstanceState.DRAINING, InstanceState.SWAPPING)


def test_rebalance_only_when_the_estimator_predicts_a_miss(fleet_rt):
    rt, _ = fleet_rt
    reqs = [_req(i, "llama-3.1-8b", 5.0) for i in range(3)]
    gq, groups = _queue(rt, reqs, 0)
    g = groups[0]
    ex = Executor(rt, gq, ExecutorConfig())
    pi = _pi(groups, 500, rt)
    plan = _plan(pi, {1: [str(g.id)]})
    ex.predicts_miss = lambda grp, inst: False  # on time where it is: stays
    assert ex.apply(plan, pi, 0.0)["rebalance"] == 0
    assert g.instance_id == 0
    ex.predicts_miss = lambda grp, inst: True  # late everywhere: moving gains nothing
    assert ex.apply(plan, pi, 0.0)["rebalance"] == 0
    assert g.instance_id == 0
    ex.predicts_miss = lambda grp, inst: inst.id == 0  # late here, on time there: moves
    assert ex.apply(plan, pi, 0.0)["rebalance"] == 3
    assert g.instance_id == 1
    assert rt.lso_counts["rebalance"] == 3


def test_plan_late_groups_go_behind_on_time_ones(fleet_rt):
    rt, _ = fleet_rt
    urgent = [_req(i, "llama-3.1-8b", 1.0) for i in range(2)]  # earliest deadline
    later = [_req(10 + i, "llama-3.1-8b", 4.0, priority=0, arrived_at=0.5)
             for i in range(2)]
    gq = GlobalQueue()
    for r in urgent:
        rt.accept(r)
        g1, _ = gq.add(r, 0.0)
    for r in later:
        rt.accept(r)
        g2, _ = gq.add(r, 2.0)  # a new group (older than max_group_age_s)
    gq.place(g1, 0)
    gq.place(g2, 0)
    assert gq.vq(0).head() is g1  # EDF
    ex = Executor(rt, gq, ExecutorConfig())
    pi = _pi([g1, g2], 2000, rt, deadline_ms=3000)
    # g1 cannot make it behind g2 and g2 can: the plan serves g2 first, g1 late
    plan = _plan(pi, {0: [str(g2.id), str(g1.id)]})
    assert not plan.timings[str(g1.id)].on_time and plan.timings[str(g2.id)].on_time
    ex.apply(plan, pi, 0.0)
    assert (g1.tier, g2.tier) == (1, 0)
    assert gq.vq(0).head() is g2
    assert [g.id for g in gq.vq(0).ordered()] == [g2.id, g1.id]


def test_pull_keeps_at_most_engine_slack_waiting_and_lanes_past_hope(fleet_rt):
    rt, _ = fleet_rt
    hopeless = _req(0, "llama-3.1-8b", 0.0001, prompt=4000)
    fine = [_req(i, "llama-3.1-8b", 100.0) for i in range(1, 30)]
    gq, _ = _queue(rt, [hopeless] + fine, 0)
    late = []
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=2),
                  basics=lambda inst: (8.0, 0.02, 1e-4), on_late=late.append)
    inst = rt.instances[0]
    ex.pull(inst)
    st = inst.engine.stats()
    assert late == [hopeless] and ex.num_late_queued == 1
    # it stopped at a limit (seats full, or the slack full), and work is left outside
    assert st.num_waiting <= 2
    assert st.num_running + st.num_waiting == st.max_num_seqs or st.num_waiting == 2
    assert sum(1 for r in fine if r in gq) == len(fine) - st.num_running - st.num_waiting
    assert hopeless.instance_id is None
    # the late lane is served once nothing on time waits
    assert ex.remove_late(hopeless) and ex.num_late_queued == 0


def test_evict_takes_only_cheap_lower_priority_victims(fleet_rt):
    rt, sim = fleet_rt
    inst = rt.instances[0]
    batch_cheap = [_req(i, "llama-3.1-8b", 600.0, prompt=50, priority=1, output=5000)
                   for i in range(3)]
    batch_dear = [_req(10 + i, "llama-3.1-8b", 600.0, prompt=3000, priority=1, output=5000)
                  for i in range(3)]
    for r in batch_cheap + batch_dear:
        rt.accept(r)
        rt.dispatch(r, inst, (r.deadline_at, r.id))
    sim.run([], lambda r: None, until_at=2.0)  # everyone has a first token
    assert all(r.first_token_at is not None for r in batch_cheap + batch_dear)
    urgent = [_req(100 + i, "llama-3.1-8b", 1.0) for i in range(2)]
    gq, groups = _queue(rt, urgent, 0)
    ex = Executor(rt, gq, ExecutorConfig(evict_max_recompute_tokens=256))
    # has_victims (the heuristic's cheap check) answers what victims_for finds
    assert ex.has_victims(inst, groups[0]) and len(ex.victims_for(inst, groups[0])) == 2
    dear = Executor(rt, gq, ExecutorConfig(evict_max_recompute_tokens=40))
    assert not dear.has_victims(inst, groups[0]) and dear.victims_for(inst, groups[0]) == []
    n = ex.evict_for(inst, groups[0], sim.now())
    assert n == 2  # one per urgent request, and only the cheap ones
    # one cheap victim is left: still a victim; then a cap that only the dear ones pass
    # but the urgent group's priority is no higher than theirs: no victim either way
    assert ex.has_victims(inst, groups[0]) and len(ex.victims_for(inst, groups[0])) == 1
    same = _queue(rt, [_req(200, "llama-3.1-8b", 900.0, priority=1)], 0)[1][0]
    assert not ex.has_victims(inst, same) and ex.victims_for(inst, same) == []
    running = {r.id for r in inst.engine.running_requests()}
    assert {r.id for r in batch_dear} <= running
    evicted = [r for r in batch_cheap if r.id not in running]
    assert len(evicted) == 2 and all(r in gq for r in evicted)
    assert all(r.num_generated > 0 for r in evicted)  # they keep their tokens


def test_batch_waiting_in_an_engine_does_not_hold_urgent_work_back(fleet_rt):
    rt, _ = fleet_rt
    inst = rt.instances[0]
    batch = [_req(i, "llama-3.1-8b", 600.0, prompt=4000, priority=1) for i in range(6)]
    urgent = [_req(10 + i, "llama-3.1-8b", 2.0 + i * 0.01, arrived_at=0.0) for i in range(5)]
    gq, _ = _queue(rt, batch, 0)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=2))
    ex.pull(inst)
    assert inst.engine.stats().num_waiting == 2  # the slack is full of batch work
    assert sum(1 for r in batch if r in gq) >= 1  # and more batch work waits outside
    _queue(rt, urgent, 0, gq)
    ex.pull(inst)
    waiting = inst.engine.waiting_requests()
    # urgent work enters ahead of the batch requests, but at most `engine_slack` of it:
    # the rest stays in the global queue, where the executor still decides its fate
    assert sum(1 for r in waiting if r.priority == 0) == 2
    assert sum(1 for r in urgent if r in gq) == 3


@pytest.mark.parametrize("tier", [0, 1])
def test_an_instance_about_to_seat_batch_takes_urgent_work_from_a_sibling(fleet_rt, tier):
    """Instance 1 has batch queued and free seats while urgent work of the same model waits
    on instance 0 (full): it takes the urgent group first, then its own batch. A group the
    plan put behind (tier 1) stays where the plan left it."""
    rt, _ = fleet_rt
    full, idle = rt.instances[0], rt.instances[1]
    ex = Executor(rt, GlobalQueue(), ExecutorConfig(engine_slack=8))
    gq = ex.gq
    _queue(rt, [_req(i, "llama-3.1-8b", 600.0, priority=1) for i in range(8)], 0, gq)
    ex.pull(full)
    assert sum(full.engine.seat_counts()[:2]) == 8  # full of batch
    urgent = [_req(100 + i, "llama-3.1-8b", 2.0) for i in range(3)]
    _, (ug,) = _queue(rt, urgent, 0, gq)
    if tier:
        gq.set_tier(ug, 1)
    batch = [_req(300 + i, "llama-3.1-8b", 600.0, priority=1, arrived_at=1.0)
             for i in range(10)]
    _queue(rt, batch, 1, gq)
    ex.pull(idle)
    held = {r.id for r in idle.engine.waiting_requests()} | {
        r.id for r in idle.engine.running_generated()[0]}
    assert len(held) == 8
    if tier == 0:
        assert {r.id for r in urgent} <= held  # stolen from instance 0, seated first
        assert ug.instance_id == idle.id and ex.num_rebalanced == 3
        assert sum(1 for r in batch if r.id in held) == 5
    else:
        assert ug.instance_id == full.id and ex.num_rebalanced == 0
        assert all(r in gq for r in urgent)


# -- admission: the plan's batch seats ------------------------------------------------------

def test_batch_seat_caps_reserve_follows_the_forecast():
    from qlm_opt.planner.plan import batch_seat_caps
    # no urgent demand forecast: no cap at all (batch takes every seat)
    assert batch_seat_caps({0: 256.0, 1: 256.0}, {}) == {}
    assert batch_seat_caps({0: 256.0}, {0: 0.0}) == {}
    # 16 seats held on average, plus 2 Poisson standard deviations (2 x 4): 24 reserved
    assert batch_seat_caps({0: 256.0, 1: 256.0}, {0: 16.0}, margin=2.0) == {0: 232}
    assert batch_seat_caps({0: 256.0}, {0: 16.0}) == {0: 236}  # default: one deviation
    assert batch_seat_caps({0: 256.0}, {0: 16.0}, margin=0.0) == {0: 240}
    # demand above the instance: batch is slowed to the minimum, not stopped
    assert batch_seat_caps({0: 50.0}, {0: 80.0}) == {0: 1}
    with pytest.raises(ValueError, match="margin"):
        batch_seat_caps({0: 50.0}, {0: 1.0}, margin=-1.0)


def _capped_plan(rt, groups, caps):
    pi = _pi(groups, 500, rt, deadline_ms=600_000)
    return pi, _plan(pi, {0: [str(g.id) for g in groups]}).replace(batch_seats=caps)


def test_pull_admits_batch_only_up_to_the_plans_cap(fleet_rt):
    rt, _ = fleet_rt
    inst = rt.instances[0]  # 8 seats
    batch = [_req(i, "llama-3.1-8b", 600.0, priority=1) for i in range(12)]
    gq, groups = _queue(rt, batch, 0)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=8))
    pi, plan = _capped_plan(rt, groups, {0: 3})
    ex.apply(plan, pi, 0.0)
    assert ex.batch_seats == {0: 3}
    ex.pull(inst)
    nr, nw, _ = inst.engine.seat_counts()
    assert nr + nw == 3  # the cap, not the 8 seats
    assert sum(1 for r in batch if r in gq) == 9  # the rest waits in the global queue
    assert ex.totals["batch_held"] >= 1
    # urgent work may take every seat that is left
    urgent = [_req(100 + i, "llama-3.1-8b", 2.0) for i in range(7)]
    _queue(rt, urgent, 0, gq)
    ex.pull(inst)
    nr, nw, mx = inst.engine.seat_counts()
    assert nr + nw == mx == 8
    assert sum(1 for r in urgent if r in gq) == 2  # 5 seats were free, not 8 - 3 batch...
    assert ex.batch_held(inst, 0.0) == 3


def test_the_next_plan_resets_the_cap_and_no_cap_fills_every_seat(fleet_rt):
    rt, _ = fleet_rt
    inst = rt.instances[0]
    batch = [_req(i, "llama-3.1-8b", 600.0, priority=1) for i in range(12)]
    gq, groups = _queue(rt, batch, 0)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=8))
    pi, plan = _capped_plan(rt, groups, {0: 2})
    ex.apply(plan, pi, 0.0)
    ex.pull(inst)
    assert sum(inst.engine.seat_counts()[:2]) == 2
    # the next epoch forecasts no urgent arrivals: no cap, batch takes every seat
    ex.apply(plan.replace(batch_seats={}), pi, 0.0)
    assert ex.batch_seats == {}
    ex.pull(inst)
    assert sum(inst.engine.seat_counts()[:2]) == 8


def test_a_tpot_cap_holds_every_class_in_the_global_queue(fleet_rt):
    """A plan's TPOT cap bounds what the engine holds, urgent work included; the rest waits
    in the global queue, and the next plan without a cap lets it in."""
    rt, _ = fleet_rt
    inst = rt.instances[0]  # 8 seats
    urgent = [_req(i, "llama-3.1-8b", 2.0) for i in range(6)]
    gq, groups = _queue(rt, urgent, 0)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=8))
    pi = _pi(groups, 500, rt)
    plan = _plan(pi, {0: [str(g.id) for g in groups]}).replace(seat_caps={0: 4})
    ex.apply(plan, pi, 0.0)
    assert ex.seat_caps == {0: 4}
    ex.pull(inst)
    assert sum(inst.engine.seat_counts()[:2]) == 4
    assert sum(1 for r in urgent if r in gq) == 2
    assert not ex.has_seat(inst)
    ex.apply(plan.replace(seat_caps={}), pi, 0.0)
    assert ex.has_seat(inst)
    ex.pull(inst)
    assert sum(inst.engine.seat_counts()[:2]) == 6 and not any(r in gq for r in urgent)


def test_batch_near_its_deadline_is_urgent_and_passes_the_cap(fleet_rt):
    rt, _ = fleet_rt
    inst = rt.instances[0]
    # due in 20 s: within the 30 s urgent window, whatever its class
    due_soon = [_req(i, "llama-3.1-8b", 20.0, priority=1) for i in range(4)]
    gq, groups = _queue(rt, due_soon, 0)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=8, urgent_window_s=30.0))
    pi, plan = _capped_plan(rt, groups, {0: 1})
    ex.apply(plan, pi, 0.0)
    ex.pull(inst)
    assert sum(inst.engine.seat_counts()[:2]) == 4
    assert ex.batch_held(inst, 0.0) == 0


# -- planned eviction --------------------------------------------------------------------------

def _full_of_batch(rt, sim, inst, prompt):
    batch = [_req(i, "llama-3.1-8b", 600.0, prompt=prompt, priority=1, output=5000)
             for i in range(8)]  # every seat
    for r in batch:
        rt.accept(r)
        rt.dispatch(r, inst, (r.deadline_at, r.id))
    sim.run([], lambda r: None, until_at=4.0)  # everyone has a first token
    assert all(r.first_token_at is not None for r in batch)
    return batch


def _urgent_first(rt, sim, n, later=None, busy_ms=5000, first_id=100):
    """The plan: instance 0 is busy for ``busy_ms``; its first group (``n`` urgent
    requests, due to start within 2 s) is late as planned when that is over 2 s, and on
    time if started now."""
    now = sim.now()
    urgent = [_req(first_id + i, "llama-3.1-8b", now + 2.0, arrived_at=now)
              for i in range(n)]
    gq, groups = _queue(rt, urgent, 0)
    pgs = [PlanGroup(str(groups[0].id), "llama-3.1-8b", n, 10 * n, 2500, {0: 500, 1: 500},
                     start_deadline_ms=2000)]
    seq = [str(groups[0].id)]
    if later is not None:
        pgs.append(later)
        seq.append(later.id)
    insts = tuple(PlanInstance(i.id, i.spec.gpu, i.model, busy_ms if i.id == 0 else 0, True,
                               None) for i in rt.instances)
    pi = PlanningProblem(tuple(pgs), insts, default_swap_ms=1000, weights=WEIGHTS)
    plan = _plan(pi, {0: seq})
    assert plan.timings[seq[0]].on_time == (busy_ms <= 2000)
    return gq, groups, pi, plan, urgent


def test_apply_evicts_for_the_plans_late_urgent_first_group(fleet_rt):
    rt, sim = fleet_rt
    inst = rt.instances[0]
    batch = _full_of_batch(rt, sim, inst, prompt=1000)  # dearer than the 256-token heuristic
    gq, groups, pi, plan, urgent = _urgent_first(rt, sim, 2)
    # both urgent requests may wait in the engine at once: one pull seats the group
    ex = Executor(rt, gq, ExecutorConfig(planned_evict=True, engine_slack=2),
                  basics=lambda i: (8.0, 0.02, 1e-4))
    assert ex.victims_for(inst, groups[0]) == []  # the heuristic would evict nobody
    counts = ex.apply(plan, pi, sim.now())
    assert counts["evict"] == 2 and ex.evicted_on == {0}
    running = {r.id for r in inst.engine.running_requests()}
    evicted = [r for r in batch if r.id not in running]
    assert len(evicted) == 2 and all(r in gq for r in evicted)
    assert all(r.num_generated > 0 for r in evicted)  # they keep their tokens
    ex.pull(inst)  # the freed seats take the urgent group
    assert all(r.instance_id == 0 and r not in gq for r in urgent)


def test_no_planned_eviction_when_the_recompute_makes_a_later_group_late(fleet_rt):
    rt, sim = fleet_rt
    inst = rt.instances[0]
    batch = _full_of_batch(rt, sim, inst, prompt=1000)
    # a later group worth more, on time with 0.5 s to spare: 2 victims x ~1000 tokens x 1 ms
    # of recompute push it late
    later = PlanGroup("later", "llama-3.1-8b", 5, 50, 6500, {0: 500, 1: 500})
    gq, groups, pi, plan, urgent = _urgent_first(rt, sim, 2, later=later)
    assert plan.timings["later"].on_time
    ex = Executor(rt, gq, ExecutorConfig(planned_evict=True), basics=lambda i: (8.0, 0.02, 1e-3))
    counts = ex.apply(plan, pi, sim.now())
    assert counts["evict"] == 0 and ex.totals["evict_not_worth"] == 1
    assert len(inst.engine.running_requests()) == len(batch)
    # the same recompute at a tenth of the prefill cost leaves it on time: evicted
    ex.basics = lambda i: (8.0, 0.02, 1e-4)
    assert ex.apply(plan, pi, sim.now())["evict"] == 2


def test_no_planned_eviction_when_off_or_the_group_is_on_time(fleet_rt):
    rt, sim = fleet_rt
    inst = rt.instances[0]
    batch = _full_of_batch(rt, sim, inst, prompt=1000)
    gq, groups, pi, plan, urgent = _urgent_first(rt, sim, 2)
    ex = Executor(rt, gq, ExecutorConfig(planned_evict=False), basics=lambda i: (8.0, 0.02, 1e-4))
    assert ex.apply(plan, pi, sim.now())["evict"] == 0
    ex.config.planned_evict = True
    _, _, pi2, on_time_plan, _ = _urgent_first(rt, sim, 1, busy_ms=0, first_id=200)
    assert ex.apply(on_time_plan, pi2, sim.now())["evict"] == 0
    assert len(inst.engine.running_requests()) == len(batch)


def test_kv_cap_stops_batch_and_holds_urgent_until_it_has_waited(fleet_rt):
    """At its KV cap an engine takes no batch work, and urgent work only once the head
    request has waited ``kv_cap_wait`` of its TTFT budget; below the cap both enter."""
    rt, sim = fleet_rt
    inst = rt.instances[0]
    running = [_req(i, "llama-3.1-8b", 600.0, priority=1, output=5000) for i in range(2)]
    for r in running:
        rt.accept(r)
        rt.dispatch(r, inst, (r.deadline_at, r.id))
    sim.run([], lambda r: None, until_at=1.0)  # both running, nothing waiting
    now = sim.now()
    urgent = _req(10, "llama-3.1-8b", now + 4.0, arrived_at=now)
    batch = _req(11, "llama-3.1-8b", now + 600.0, priority=1, arrived_at=now)
    gq, _ = _queue(rt, [urgent, batch], 0)
    ex = Executor(rt, gq, ExecutorConfig(kv_cap_wait=0.5, engine_slack=2,
                                         kv_admission="count"))
    ex.kv_caps = {0: 2}
    assert not ex.has_seat(inst)
    ex.pull(inst)
    assert urgent in gq and batch in gq  # at the cap: neither enters
    sim.run([], lambda r: None, until_at=now + 2.5)  # urgent has waited 2.5 of its 4 s
    ex.pull(inst)
    assert urgent not in gq and urgent.instance_id == 0  # past half its budget: it goes over
    assert batch in gq  # batch never goes over
    ex.kv_caps = {0: 4}  # room under the cap: batch enters too
    ex.pull(inst)
    assert batch not in gq and batch.instance_id == 0


@pytest.mark.parametrize("prompt, extra", [(50, 5), (400, 0)])
def test_short_prompts_ride_free_past_the_slack(fleet_rt, prompt, extra):
    """Beyond `engine_slack`, more requests may wait in the engine while their prompts fit
    the tokens its next iteration prefills for free (``free_tokens``): short prompts are not
    held to one new request per iteration, long ones still are."""
    rt, _ = fleet_rt
    inst = rt.instances[0]
    reqs = [_req(i, "llama-3.1-8b", 5.0 + 0.01 * i, prompt=prompt) for i in range(8)]
    gq, _ = _queue(rt, reqs, 0)
    asked = []

    def free(i, stretch, cap_s, headroom):
        asked.append(stretch)
        return 300.0

    ex = Executor(rt, gq, ExecutorConfig(engine_slack=1, free_ride=2.0))
    ex.free_tokens = free
    ex.pull(inst)
    st = inst.engine.stats()
    # the first enters as the slack; then 300 free tokens less its 50 hold five more
    # 50-token prompts, and no 400-token one (what the engine started since counts alike)
    assert st.num_running + st.num_waiting == 1 + extra
    assert sum(1 for r in reqs if r in gq) == len(reqs) - 1 - extra
    assert asked and set(asked) == {2.0}
    # off: the slack alone
    rt2_reqs = [_req(100 + i, "llama-3.1-8b", 5.0, prompt=prompt) for i in range(4)]
    gq2, _ = _queue(rt, rt2_reqs, 1)
    off = Executor(rt, gq2, ExecutorConfig(engine_slack=1, free_ride=0.0))
    off.free_tokens = free
    off.pull(rt.instances[1])
    st = rt.instances[1].engine.stats()
    assert st.num_running + st.num_waiting == 1


@pytest.mark.parametrize("in_flight", [True, False])
def test_the_late_test_counts_the_iteration_in_flight_and_what_waits(fleet_rt, in_flight):
    """A request is past hope when its first token would come after its deadline. With
    ``late_in_flight`` that time is the iteration in flight (as long as the first of its own)
    plus its own chunked prefill of what already waits in the engine and of its prompt, each
    with a decode iteration; without, its own prompt's prefill plus one decode iteration.
    Basics here: 20 ms per decode iteration, 0.1 ms per prompt token."""
    rt, _ = fleet_rt
    late = []
    cfg = ExecutorConfig(engine_slack=2, late_in_flight=in_flight)
    basics = lambda inst: (8.0, 0.02, 1e-4)  # noqa: E731
    # nothing waits: 100 tokens due in 50 ms; on: 2 x 20 + 0.1 x (100 + 100) = 60 ms, late;
    # off: 20 + 10 = 30 ms, dispatched
    alone = _req(0, "mistral-7b", 0.05, prompt=100)
    gq, _ = _queue(rt, [alone], 2)
    ex = Executor(rt, gq, cfg, basics=basics, on_late=late.append)
    ex.pull(rt.instances[2])
    assert late == ([alone] if in_flight else [])
    # (the late lane is served at once here: nothing on time waits)
    # 300 tokens wait in the engine: 100 tokens due in 100 ms; on: 40 + 0.1 x (400 + 400) =
    # 120 ms, late; off: 30 ms, dispatched
    inst = rt.instances[0]
    ahead = _req(1, "llama-3.1-8b", 10.0, prompt=300)
    gq2, _ = _queue(rt, [ahead], 0)
    late.clear()
    ex2 = Executor(rt, gq2, cfg, basics=basics, on_late=late.append)
    ex2.pull(inst)
    assert ahead.instance_id == 0 and inst.engine.waiting_tokens() == 300
    tight = _req(2, "llama-3.1-8b", 0.1, prompt=100)
    _queue(rt, [tight], 0, gq2)
    ex2.pull(inst)
    assert late == ([tight] if in_flight else [])
    assert ex2.num_late == (1 if in_flight else 0)


@pytest.mark.parametrize("refill, prompt, dispatched", [
    (1.25, 300, "many"), (0.0, 300, 1), (1.25, 3000, 1)])
def test_refill_pulls_again_once_the_waiting_request_has_entered_an_iteration(
        fleet_rt, refill, prompt, dispatched):
    """With its one waiting request at the slack and more queued, an engine would admit one
    request per two iterations if the next pull came only at that request's first token (an
    iteration later). ``refill_after`` arms a pull at about one iteration of what waits, when
    the waiting request has entered an iteration. Not when what waits and the head do not fit
    one iteration's token budget (2048 here). No first-token pulls in this harness: only the
    refill can feed the engine after the first pull."""
    rt, sim = fleet_rt
    inst = rt.instances[2]
    reqs = [_req(i, "mistral-7b", 10.0 + 0.01 * i, prompt=prompt) for i in range(6)]
    gq, _ = _queue(rt, reqs, 2)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=1, free_ride=0.0, refill_after=refill),
                  basics=lambda i: (8.0, 0.02, 1e-4))
    ex.pull(inst)
    assert sum(1 for r in reqs if r.instance_id == 2) == 1
    sim.run([], lambda r: None, until_at=0.5)
    n = sum(1 for r in reqs if r.instance_id == 2)
    if dispatched == "many":
        assert n >= 3
        assert inst.engine.stats().num_waiting <= 1  # never past the slack
    else:
        assert n == dispatched


def test_refill_only_while_the_engine_holds_less_than_its_fill_share(fleet_rt):
    """``refill_fill``: a refill pull is armed only while the engine holds fewer than that
    share of its seats (``max_num_seqs`` 8 here, or a lower TPOT or KV cap): at 0.25, two
    requests, after which only first tokens (none in this harness) would pull again."""
    rt, sim = fleet_rt
    inst = rt.instances[2]
    reqs = [_req(i, "mistral-7b", 10.0 + 0.01 * i, prompt=100) for i in range(6)]
    gq, _ = _queue(rt, reqs, 2)
    ex = Executor(rt, gq, ExecutorConfig(engine_slack=1, free_ride=0.0, refill_after=1.0,
                                         refill_fill=0.25),
                  basics=lambda i: (8.0, 0.02, 1e-4))
    ex.pull(inst)
    sim.run([], lambda r: None, until_at=0.5)
    assert sum(1 for r in reqs if r.instance_id == 2) == 2
    ex.config.refill_fill = 1.0  # the whole engine: the refills go on
    ex.pull(inst)
    sim.run([], lambda r: None, until_at=1.0)
    assert sum(1 for r in reqs if r.instance_id == 2) >= 4


def test_kv_peak_admits_what_fits_in_the_predicted_peaks(fleet_rt):
    """``kv_admission="peak"`` (the default): the engine takes a request while its predicted
    peak (prompt + mean output) fits in what the KV cache leaves once the held requests reach
    theirs (the cache now, less the running requests' predicted growth and the waiting
    requests' peaks); the count cap plays no part. A short request enters past a count cap that would stop it;
    a long batch one that does not fit stays in the global queue, and so does a long urgent
    one until it has waited ``kv_cap_wait`` of its TTFT budget."""
    rt, sim = fleet_rt
    inst = rt.instances[0]
    running = [_req(i, "llama-3.1-8b", 600.0, priority=1, prompt=2000, output=5000)
               for i in range(2)]
    for r in running:
        rt.accept(r)
        rt.dispatch(r, inst, (r.deadline_at, r.id))
    sim.run([], lambda r: None, until_at=1.0)  # both running, nothing waiting
    now = sim.now()
    used = inst.engine.stats().kv_used_tokens
    _, gen = inst.engine.running_generated()
    assert used >= 4000 and len(gen) == 2
    mu = 300.0
    growth = sum(max(mu - n, mu / 2) for n in gen)
    cap = int(used + growth + 1500)
    short = _req(10, "llama-3.1-8b", now + 500.0, priority=1, prompt=200, arrived_at=now)
    long_b = _req(11, "llama-3.1-8b", now + 550.0, priority=1, prompt=3000, arrived_at=now)
    gq, _ = _queue(rt, [short, long_b], 0)
    ex = Executor(rt, gq, ExecutorConfig(kv_admission="peak", engine_slack=4,
                                         kv_cap_wait=0.5))
    ex.kv_tokens = {0: (cap, mu, 1.0)}
    ex.kv_caps = {0: 2}  # the count says full: ignored in this mode
    assert ex._kv_left(inst) == pytest.approx(cap - used - growth)
    ex.pull(inst)
    assert short not in gq and short.instance_id == 0  # 200 + 300 fit in 1,500
    assert long_b in gq  # 3,000 + 300 do not fit in the 1,000 left
    # what waits in the engine counts at its peak (prompt at the kept share, output)
    assert ex._kv_left(inst) == pytest.approx(cap - used - growth - (200 + mu), abs=1.0)
    urgent = _req(12, "llama-3.1-8b", now + 4.0, prompt=3000, arrived_at=now)
    _queue(rt, [urgent], 0, gq)
    ex.pull(inst)
    assert urgent in gq  # does not fit, and has not waited half its budget
    sim.run([], lambda r: None, until_at=now + 2.5)
    ex.pull(inst)
    assert urgent not in gq and urgent.instance_id == 0  # waited: it goes over
    assert long_b in gq  # batch never goes over


def test_kv_admission_rejects_an_unknown_mode():
    with pytest.raises(ValueError, match="kv_admission"):
        ExecutorConfig(kv_admission="tokens")
