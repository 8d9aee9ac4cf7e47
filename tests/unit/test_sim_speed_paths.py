"""Shortcuts the what-if hot path takes must give what the plain computation gives: the
simulated engine's ``prefill_summary`` against a pass over its running requests, checked on
every call of a short ``qlm-rwt`` run."""


from qlm_opt.config import Fleet, Workload
from qlm_opt.engines.base import prefill_pass
from qlm_opt.engines.simulated import SimEngine
from qlm_opt.whatif.workload import build_requests, synthetic_trace
from qlm_opt.whatif.run import run_policy
from tests.conftest import small_fleet_dict, small_workload_dict


def _brute(eng: SimEngine, now_at: float) -> tuple[int, int]:
    return prefill_pass(eng.running_requests(), now_at)  # the pass over the whole batch


def test_prefill_summary_matches_a_pass_over_the_batch(monkeypatch):
    fleet = Fleet.from_dict(small_fleet_dict())
    wl = Workload.from_dict(small_workload_dict())
    orig = SimEngine.prefill_summary
    calls = {"n": 0, "late": 0}

    def checked(self, now_at):
        got = orig(self, now_at)
        if got is not None:
            assert got == _brute(self, now_at)
            calls["n"] += 1
            calls["late"] += got[1] > 0
        return got

    monkeypatch.setattr(SimEngine, "prefill_summary", checked)
    reqs = build_requests(synthetic_trace(wl), wl)
    run_policy("qlm-rwt", fleet, wl, reqs, track_rwt=False)
    assert calls["n"] > 100 and calls["late"] > 0


def test_predict_many_is_predict_of_each():
    import random

    from qlm_opt.domain import Request
    from qlm_opt.core.output_lengths import OutputLengthModel

    rnd = random.Random(3)
    om = OutputLengthModel(5.0, 1.0, min_n=5)

    def req(i):
        return Request(i, rnd.choice("ab"), rnd.choice(["i", "b"]), rnd.randrange(1, 5000),
                       10, 0.0, 1.0, tenant=rnd.choice([None, "t1", "t2"]))

    for i in range(400):
        reqs = [req(1000 + k) for k in range(rnd.randrange(0, 30))]
        ms, ss = om.predict_many(reqs)
        assert list(zip(ms, ss)) == [om.predict(r) for r in reqs]
        om.observe(req(i), float(rnd.randrange(1, 2000)))
