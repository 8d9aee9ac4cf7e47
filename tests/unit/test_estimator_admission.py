"""Every prediction counts: the admission prediction is scored whatever happens later, and
the dispatch prediction is reported beside it."""

from __future__ import annotations

import pytest

from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import Request
from qlm_opt.whatif.accuracy import RWTAccuracy
from qlm_opt.core.wait_calibration import WaitEstimate
from qlm_opt.whatif.run import run_policy
from qlm_opt.whatif.workload import prepare_requests
from tests.conftest import small_fleet_dict, small_workload_dict


def test_admission_prediction_is_scored_dispatch_beside():
    acc = RWTAccuracy()
    r = Request(1, "m", "interactive", 100, 10, 0.0, 2.0)
    acc.predict(r, 0.0, WaitEstimate(1.0, 0.1))  # admission
    acc.predict(r, 2.0, WaitEstimate(9.0, 0.1))  # a re-placement: not the admission
    acc.predict_dispatch(r, 5.0, WaitEstimate(0.5, 0.1))  # e.g. from the late lane
    r.first_token_at = 6.0
    acc.observe_first_token(r)
    assert acc.pairs == [("interactive", 1.0, 0.1, 6.0)]
    assert acc.dispatch_pairs == [("interactive", 0.5, 0.1, 1.0)]
    s = acc.summary()
    assert s["num"] == 1
    assert s["median_abs_pct_error"] == pytest.approx(100 * 5 / 6)
    assert s["dispatch_median_abs_pct_error"] == pytest.approx(50.0)
    # a request evicted after its first token and dispatched again is not scored again
    acc.predict_dispatch(r, 7.0, WaitEstimate(0.5, 0.1))
    acc.observe_first_token(r)
    assert len(acc.pairs) == 1


@pytest.mark.parametrize("policy", ["qlm-rwt", "fcfs"])
def test_every_request_with_a_first_token_is_scored(policy):
    """Under overload (late lane, evictions), no request drops out of the statistics."""
    fleet = Fleet.from_dict(small_fleet_dict())
    wl = Workload.from_dict(small_workload_dict(duration_s=60, rate_scale=12.0))
    run = run_policy(policy, fleet, wl, prepare_requests(None, wl, 0)())
    got_first = sum(1 for r in run.requests if r.first_token_at is not None)
    rwt = run.metrics["rwt"]
    assert rwt["num"] == got_first
    assert rwt["dispatch_median_abs_pct_error"] is not None
    if policy == "qlm-rwt":
        assert run.metrics["qlm"]["num_late"] > 0  # the case the old definition dropped


def test_calibrator_fed_once_per_prediction():
    from qlm_opt.core.wait_calibration import WaitCalibrator

    class Count(WaitCalibrator):
        n = 0

        def observe(self, *a):
            Count.n += 1

    acc = RWTAccuracy()
    cal = Count()
    r = Request(1, "m", "batch", 100, 10, 0.0, 2.0)
    acc.predict_dispatch(r, 0.0, WaitEstimate(1.0, 0.1), WaitEstimate(1.0, 0.1), cal, "batch")
    r.first_token_at = 1.0
    acc.observe_first_token(r)
    assert Count.n == 1
    r2 = Request(2, "m", "batch", 100, 10, 0.0, 2.0)
    acc.predict(r2, 0.0, WaitEstimate(1.0, 0.1), WaitEstimate(1.0, 0.1), cal, "batch")
    acc.predict_dispatch(r2, 1.0, WaitEstimate(1.0, 0.1), WaitEstimate(1.0, 0.1), cal, "batch")
    r2.first_token_at = 2.0
    acc.observe_first_token(r2)
    assert Count.n == 3  # the admission and the dispatch prediction, once each
