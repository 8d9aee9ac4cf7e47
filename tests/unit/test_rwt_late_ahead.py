"""The scored prediction leaves out the requests ahead that the executor's late test will move
to the late lane at their turn (``RWTEstimator.late_kept``, ``QLMRWTPolicy._reported``): they
take no service. Decisions keep the plain count."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlm_opt.config import Fleet, Workload
from qlm_opt.core.executor import Executor, ExecutorConfig
from qlm_opt.core.queue import GlobalQueue
from qlm_opt.domain import Request
from tests.unit.feeding import fed
from tests.unit.test_estimator import _est, _inst

EX = Path(__file__).resolve().parents[2] / "qlm_opt" / "examples"
B = lambda r: 0  # noqa: E731


def _req(i: int, deadline_at: float, prompt: int = 500, slo_class: str = "interactive",
         arrived_at: float = 0.0) -> Request:
    return Request(i, "m", slo_class, prompt, 100, arrived_at, deadline_at)


def _late_ttft(est, inst, cfg: ExecutorConfig | None = None):
    ex = Executor(None, None, cfg or ExecutorConfig())
    basics = est.basics(inst, inst.engine.stats())
    return lambda q, w: ex.late_ttft(basics, q, w, 8192)


def test_the_late_tests_time_to_first_token():
    """``Executor.late_ttft``, which ``pull`` tests against the deadline (20 ms decode
    iterations, 0.1 ms per prompt token, 2,048 tokens per iteration): on, the iteration in
    flight, then what waits and the prompt, chunked, plus a decode iteration's share of
    each; off, its prompt plus one iteration."""
    basics = (8.0, 0.02, 1e-4)
    on = Executor(None, None, ExecutorConfig())
    off = Executor(None, None, ExecutorConfig(late_in_flight=False))
    assert on.late_ttft(basics, 100, 0, 2048) == pytest.approx(0.06)
    assert on.late_ttft(basics, 100, 300, 2048) == pytest.approx(0.12)
    assert on.late_ttft(basics, 3000, 0, 2048) == pytest.approx(0.04 + 1e-4 * 5048)
    assert off.late_ttft(basics, 100, 300, 2048) == pytest.approx(0.03)


def test_requests_ahead_past_hope_make_room_for_those_behind():
    """Ten requests ahead are due before the late test's first token could come: the executor
    will move them to the late lane, so the next one (due at 0.5 s) is served at once, on
    time. With the ten on time ahead of it instead (another tier), it would be dispatched
    0.7 s from now and miss: then it is the one moved."""
    est = _est()
    inst = _inst(60, 64)  # 4 seats free
    ttft = _late_ttft(est, inst)
    x = _req(10, 0.5)
    doomed = [_req(i, 0.1) for i in range(10)]
    kept, kept_p, dropped = est.late_kept(inst, 0.0, 0.0, 0.0, [], doomed + [x], 10.0,
                                          ttft, 0.0, B)
    assert (kept, kept_p, dropped) == (1, 500, 10)
    fine = [_req(i, 100.0) for i in range(10)]
    kept, kept_p, dropped = est.late_kept(inst, 0.0, 0.0, 0.0, [], fine + [x], 10.0,
                                          ttft, 0.0, B)
    assert (kept, kept_p, dropped) == (10, 5000, 1)


def test_what_waits_in_the_engine_counts_for_the_first_let_in():
    """The engine's waiting tokens lengthen the late test's first token for the first request
    let in (it prefills behind them), not for the ones after it."""
    est = _est()
    inst = _inst(60, 64)
    ttft = _late_ttft(est, inst)
    r = _req(0, 0.5)
    assert est.late_kept(inst, 0.0, 0.0, 0.0, [], [r], 10.0, ttft, 0.0, B)[2] == 0
    assert est.late_kept(inst, 0.0, 1.0, 6000.0, [], [r], 10.0, ttft, 6000.0, B)[2] == 1
    seen = []
    est.late_kept(inst, 0.0, 1.0, 6000.0, [], [_req(1, 100.0), _req(2, 100.0)], 10.0,
                  lambda q, w: seen.append(w) or ttft(q, w), 6000.0, B)
    assert seen[-2:] == [6000.0, 0]


def test_whole_groups_without_an_estimate(monkeypatch):
    """A group due (to its last member) before the first token could come goes whole, and one
    due after the bound goes in whole, without a wait estimate; a member with its first
    token already (evicted, re-queued) is never moved."""
    est = _est()
    inst = _inst(60, 64)
    ttft = _late_ttft(est, inst)
    gq = GlobalQueue()
    past = [_req(i, 0.01, arrived_at=-2.0) for i in range(3)]
    later = [_req(10 + i, 600.0, prompt=300, slo_class="batch") for i in range(2)]
    for r in past + later:
        g, new = gq.add(r, 0.0)
        if new:
            gq.place(g, 0)
    groups = gq.vq(0).ordered()
    assert [g.size for g in groups] == [3, 2]
    calls = []
    real = type(est).wait_raw
    monkeypatch.setattr(type(est), "wait_raw",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    assert est.late_kept(inst, 0.0, 0.0, 0.0, groups, [], 5.0, ttft, 0.0, B) == (2, 600, 3)
    assert not calls
    # re-queued after its first token, due long ago: it stays (and its group is tested)
    back = _req(20, 0.01, arrived_at=-2.0)
    back.num_generated, back.first_token_at = 5, -1.5
    g, _ = gq.requeue(back, 0.0)
    gq.place(g, 0)
    groups = gq.vq(0).ordered()
    kept, _, dropped = est.late_kept(inst, 0.0, 0.0, 0.0, groups, [], 5.0, ttft, 0.0, B)
    assert (kept, dropped) == (3, 3)


def test_scored_estimate_leaves_them_out_and_decisions_keep_them():
    """qlm-rwt: eight interactive requests already past due wait in a virtual queue (no pull
    has run since); a new one placed behind them is reported (to the accuracy tracker) as if
    they were gone, while the estimate the policy keeps (``_sched``, read by ``qlm``'s
    urgent-miss trigger) counts them as the decisions do."""
    from qlm_opt.policies.qlm_rwt import QLMRWTPolicy

    wl = Workload.load(EX / "workload.toml")
    sim, rt, pol, _ = fed(Fleet.load(EX / "fleet.toml"), wl,
                          QLMRWTPolicy.from_context(workload=wl), 60)
    now = sim.now() + 5.0
    sim.clock.t = now
    inst = rt.ready_instances("llama-3.1-8b")[0]
    seen = {}
    rt.predict_hooks.append(lambda req, at, est, raw: seen.setdefault(req.id, raw))

    def make(i, at, ttft, prompt):
        r = Request(20_000 + i, "llama-3.1-8b", "interactive", prompt, 100, at, at + ttft)
        rt.accept(r)
        g, new = pol.gq.add(r, now)
        if new:
            pol.gq.place(g, inst.id)
        return r

    for i in range(8):
        make(i, now - 3.0, 2.0, 3000)  # due 1 s ago
    r = make(99, now, 2.0, 300)  # another prompt bucket: a group of its own, behind them
    assert pol.gq.group_of(r).members[0][2] is r
    plain = pol._raw_pred[r.id]
    assert seen[r.id].mean_s < 0.8 * plain.mean_s
    assert r._sched.pred_mean_s == pol.est.calib.adjust("interactive", plain).mean_s
