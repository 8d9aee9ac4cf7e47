"""qlm-rwt on a small what-if run: completes every request and beats fcfs."""

import math
from pathlib import Path

from qlm_opt.config import Fleet, Workload
from qlm_opt.whatif.run import run_whatif
from tests.unit.feeding import fed

EX = Path(__file__).resolve().parents[2] / "qlm_opt" / "examples"


def test_qlm_rwt_completes_and_beats_fcfs():
    fl = Fleet.load(EX / "fleet.toml")
    wl = Workload.load(EX / "workload.toml")
    wl.data.duration_s = 60.0
    rep = run_whatif(["fcfs", "qlm-rwt"], fl, wl)
    q, f = rep["policies"]["qlm-rwt"], rep["policies"]["fcfs"]
    # every request completed: the completed count equals the requests that arrived
    assert q["num_completed"] == q["num_requests"] > 0
    assert q["slo_attainment"] > f["slo_attainment"]
    assert "coverage_90" in q["rwt"] and "interactive" in q["rwt"]["per_class"]


def test_shared_estimates_change_no_decision(monkeypatch):
    """The per-group shared estimate context (``_wait_ctx``, ``EngineView``) and the newest-
    member shortcut of ``_predict`` give exactly what one full estimate per request gives
    (the scored estimates too: ``_reported`` on a fresh context)."""
    from qlm_opt.core.estimator import RWTEstimator
    from qlm_opt.policies.qlm_rwt import QLMRWTPolicy

    fl = Fleet.load(EX / "fleet.toml")
    wl = Workload.load(EX / "workload.toml")
    wl.data.duration_s = 30.0
    fast = run_whatif(["qlm-rwt"], fl, wl)["policies"]["qlm-rwt"]

    def predict(self, req, g, inst, now):
        ahead = [r for at, rid, r in g.members
                 if rid != req.id and (at, rid) < (req.arrived_at, req.id)]
        raw = self._wait(inst, g, len(ahead), req.prompt_tokens, now,
                         float(sum(r.prompt_tokens for r in ahead)), scored=True)
        self._record(req, now, raw, self._reported(inst, g, len(ahead), req.prompt_tokens, now,
                                                   self._wait_ctx(inst, g, now), raw))

    def predict_group(self, g, inst, now):
        ahead = self.gq.vq(inst.id).requests_ahead(g.deadline_at, g.seq)
        k = cum = 0
        for _, _, r in g.members:
            if r.first_token_at is None:
                raw = self._wait(inst, g, k, r.prompt_tokens, now, float(cum), ahead=ahead,
                                 scored=True)
                self._record(r, now, raw, self._reported(
                    inst, g, k, r.prompt_tokens, now, self._wait_ctx(inst, g, now, ahead), raw))
            k += 1
            cum += r.prompt_tokens

    plain_raw = RWTEstimator.wait_raw
    calls = {"plain": 0}

    def wait_raw(self, inst, now_at, position, ahead_tokens, own, bucket_of, cut=0.0,
                 horizon=math.inf, view=None, cut_in_until_start=False):
        # a fresh view (stats(), basics, engine summary) every call
        calls["plain"] += 1
        return plain_raw(self, inst, now_at, position, ahead_tokens, own, bucket_of, cut,
                         horizon, cut_in_until_start=cut_in_until_start)

    monkeypatch.setattr(QLMRWTPolicy, "_predict", predict)
    monkeypatch.setattr(QLMRWTPolicy, "_predict_group", predict_group)
    monkeypatch.setattr(RWTEstimator, "wait_raw", wait_raw)
    plain = run_whatif(["qlm-rwt"], Fleet.load(EX / "fleet.toml"), wl)["policies"]["qlm-rwt"]
    assert fast["num_completed"] > 0 and fast["rwt"]["num"] > 0
    for k in ("slo_attainment", "num_completed", "rwt"):
        assert repr(fast[k]) == repr(plain[k]), k
    assert calls["plain"] > 0


def _fed_rwt(n: int):
    """qlm-rwt on the example fleet, fed its first ``n`` synthetic arrivals without running
    the engines past them: (simulator, runtime, policy, requests)."""
    from qlm_opt.policies.qlm_rwt import QLMRWTPolicy

    wl = Workload.load(EX / "workload.toml")
    return fed(Fleet.load(EX / "fleet.toml"), wl, QLMRWTPolicy.from_context(workload=wl), n)


def _new_request(reqs, i: int, slo_class: str, ttft_s: float, at: float, prompt: int):
    from qlm_opt.domain import Request

    return Request(id=10_000 + i, model="llama-3.1-8b", slo_class=slo_class,
                   prompt_tokens=prompt, output_tokens=100, arrived_at=at,
                   deadline_at=at + ttft_s, tpot_s=None, priority=0 if ttft_s < 10 else 1)


def test_the_choice_estimate_is_the_first_members_prediction_until_anything_moves():
    """A new group's first member is predicted with the estimate ``_choose`` made on the
    instance it picked (the same call: the same floats as a fresh estimate); after another
    placement in between, the prediction is made afresh, and differs."""
    sim, rt, pol, reqs = _fed_rwt(120)
    now = sim.now() + 5.0  # later than every open group's age: new groups
    sim.clock.t = now
    assert len(rt.ready_instances("llama-3.1-8b")) == 2  # _choose estimates on both

    seen = {}

    def fresh(req, at, est, raw):  # a fresh estimate at the moment of the prediction
        g = pol.gq.group_of(req)
        inst = rt.instances[g.instance_id]
        seen[req.id] = (pol._raw_pred[req.id], pol._wait(inst, g, 0, req.prompt_tokens, at,
                                                          0.0, scored=True))

    rt.predict_hooks.append(fresh)
    # the usual path: _choose, then place, with nothing in between
    urgent = _new_request(reqs, 1, "interactive", 2.0, now, 700)
    g_u, new = pol.gq.add(urgent, now)
    assert new
    best = pol._choose(g_u, now)
    reused = pol._chosen[5]
    pol.gq.place(g_u, best.id)
    raw, want = seen[urgent.id]
    assert raw is reused and raw == want

    # _choose for a batch group, then an urgent group placed ahead of it on the same
    # instance before it is placed: its prediction must see the group ahead
    batch = _new_request(reqs, 2, "batch", 600.0, now, 700)
    g_b, _ = pol.gq.add(batch, now)
    best_b = pol._choose(g_b, now)
    stale = pol._chosen[5]
    ahead = _new_request(reqs, 3, "interactive", 2.0, now, 3000)  # another prompt bucket
    g_a, new = pol.gq.add(ahead, now)
    assert new and g_a is not g_u
    pol.gq.place(g_a, best_b.id)
    pol.gq.place(g_b, best_b.id)
    raw, want = seen[batch.id]
    assert raw == want and raw is not stale
    assert raw.mean_s > stale.mean_s  # 3,000 more prompt tokens ahead of it now


def test_an_arrival_on_a_moving_clock_is_predicted_with_the_choice_estimate():
    """On a live host the clock moves between two reads. An arrival's group is chosen and
    its members predicted at the one clock time ``on_arrival`` read: the prediction is the
    estimate ``_choose`` made (not a second estimate a few microseconds later), as in the
    simulator, where the clock stands still during an event."""
    sim, rt, pol, reqs = _fed_rwt(120)
    t0 = sim.now() + 5.0  # later than every open group's age: a new group
    ticks = iter(range(1, 10**6))
    sim.now = lambda: t0 + 1e-4 * next(ticks)  # every read of the clock is later
    assert len(rt.ready_instances("llama-3.1-8b")) == 2
    picked = []
    choose = pol._choose

    def spy(g, now):
        inst = choose(g, now)
        picked.append(pol._chosen)
        return inst

    pol._choose = spy
    req = _new_request(reqs, 4, "interactive", 2.0, t0, 700)
    rt.accept(req)
    pol.on_arrival(req)
    (chosen,) = picked
    assert chosen is not None and chosen[0] is pol.gq.group_of(req)
    assert pol._raw_pred[req.id] is chosen[5]
    assert req._sched.placed_at == chosen[2] < sim.now()


def test_a_first_token_pulls_the_next_request_into_its_engine():
    """With one request at most waiting inside an engine (`engine_slack` 1), the engine takes
    the next one when a request's prefill is done (its first token), not at the next finish
    or epoch: a burst at t=0 on one idle instance is seated within a few prefills."""
    from qlm_opt.domain import Request
    from qlm_opt.policies.qlm_rwt import QLMRWTPolicy
    from qlm_opt.whatif.run import run_policy

    fl = Fleet.from_dict({"name": "one", "engine": {"max_num_seqs": 8},
                          "instances": [{"gpu": "A100-80GB", "model": "llama-3.1-8b"}]})
    wl = Workload.from_dict({"name": "burst", "duration_s": 1.0,
                             "classes": {"interactive": {"ttft_s": 10.0, "share": 1.0}},
                             "models": {"llama-3.1-8b": 1.0}})
    reqs = [Request(id=i, model="llama-3.1-8b", slo_class="interactive", prompt_tokens=50,
                    output_tokens=400, arrived_at=0.0, deadline_at=10.0, tpot_s=None,
                    priority=0) for i in range(8)]
    assert QLMRWTPolicy.epoch_s > 0.3  # the first epoch comes after the burst is seated
    run = run_policy("qlm-rwt", fl, wl, reqs, track_rwt=False)
    firsts = sorted(r.first_token_at for r in run.requests)
    finishes = min(r.completed_at for r in run.requests)
    # all eight prefilled one after another before any finish and before the first epoch
    assert firsts[-1] < min(0.3, finishes), firsts
