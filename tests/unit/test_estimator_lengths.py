"""Output-length prediction learned online per model and class (and tenant) against the
prompt-length buckets, on a stream with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlm_opt.domain import Request
from qlm_opt.core.output_lengths import OutputLengthModel
from qlm_opt.core.estimator import RWTEstimator
from qlm_opt.core.queue import length_bucket


def _stream(n, seed=0, tenant=False):
    """Outputs lognormal with log-mean 3 + 0.3 log(prompt) (+1.5 for batch, +0.7 for
    tenant "b"), log-std 0.4."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = "batch" if rng.random() < 0.4 else "interactive"
        ten = ("a" if rng.random() < 0.5 else "b") if tenant else None
        p = int(rng.lognormal(6.6, 1.0)) + 1
        mu = 3.0 + 0.3 * math.log(p) + (1.5 if cls == "batch" else 0.0) + (
            0.7 if ten == "b" else 0.0)
        out = max(1, int(rng.lognormal(mu, 0.4)))
        r = Request(i, "m", cls, p, out, 0.0, 1.0, tenant=ten)
        r.num_generated = out
        yield r


def test_learned_lengths_beat_prompt_buckets_and_report_their_error():
    est = RWTEstimator(150.0, 150.0 ** 2, 1000.0)
    for r in _stream(4000):
        est.observe_completion(r, length_bucket(r.prompt_tokens))
    rep = est.out_model.report()
    assert rep["num"] == 4000
    assert rep["median_abs_pct_error"] < 0.7 * rep["bucket_median_abs_pct_error"]
    assert rep["log_score"] > rep["bucket_log_score"] + 0.3
    assert 0.85 <= rep["coverage_90"] <= 0.95
    # the fit recovers the known structure
    m_i, s_i = est.out_model.predict(Request(0, "m", "interactive", 1000, 1, 0, 1))
    m_b, _ = est.out_model.predict(Request(0, "m", "batch", 1000, 1, 0, 1))
    assert m_i == pytest.approx(3.0 + 0.3 * math.log(1000), abs=0.08)
    assert m_b - m_i == pytest.approx(1.5, abs=0.1)
    assert s_i == pytest.approx(0.4, abs=0.05)


def test_tenant_cells_used_once_they_have_data():
    om = OutputLengthModel(5.0, 1.0, min_n=30)
    for r in _stream(3000, seed=1, tenant=True):
        om.observe(r, r.num_generated)
    ma, _ = om.predict(Request(0, "m", "interactive", 1000, 1, 0, 1, tenant="a"))
    mb, _ = om.predict(Request(0, "m", "interactive", 1000, 1, 0, 1, tenant="b"))
    assert mb - ma == pytest.approx(0.7, abs=0.12)
    # an unseen tenant falls back to its (model, class) cell, an unseen model to the prior
    mc, _ = om.predict(Request(0, "m", "interactive", 1000, 1, 0, 1, tenant="new"))
    assert ma < mc < mb
    assert om.predict(Request(0, "other", "interactive", 1000, 1, 0, 1)) == (5.0, 1.0)
