import json

import numpy as np
import pytest

from qlm_opt.config import Fleet, Workload
from qlm_opt.errors import ConfigError, WorkloadError
from qlm_opt.whatif.workload import build_requests, load_azure_csv, load_jsonl, load_trace, synthetic_trace
from tests.conftest import small_fleet_dict, small_workload_dict


def test_load_shared_conv_trace(conv_trace_path):
    tr = load_azure_csv(conv_trace_path)
    assert len(tr) > 19_000
    assert tr.arrived_at[0] == 0.0 and np.all(np.diff(tr.arrived_at) >= 0)
    assert 3400 < tr.arrived_at[-1] < 3600
    assert 1000 < np.median(tr.prompt_tokens) < 1050
    assert np.median(tr.output_tokens) == 129


def test_csv_bad_row_names_line(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                 "2023-11-16 18:15:46.6805900,374,44\n"
                 "2023-11-16 18:15:47.0,abc,44\n")
    with pytest.raises(WorkloadError, match=r"t\.csv:3: ContextTokens is not a number"):
        load_azure_csv(p)


def test_csv_bad_header_and_timestamp(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("time,prompt\n1,2\n")
    with pytest.raises(WorkloadError, match="missing column"):
        load_azure_csv(p)
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(WorkloadError, match=r"h\.csv:2: bad TIMESTAMP"):
        load_azure_csv(p)
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1.0,-5,2\n")
    with pytest.raises(WorkloadError, match=r"h\.csv:2: ContextTokens must be >= 0"):
        load_azure_csv(p)
    with pytest.raises(WorkloadError, match="file not found"):
        load_azure_csv(tmp_path / "nope.csv")


def test_jsonl(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = [{"arrived_at": 1.5, "prompt_tokens": 10, "output_tokens": 3, "model": "mistral-7b"},
            {"arrived_at": 0.5, "prompt_tokens": 20, "output_tokens": 4, "slo_class": "batch"}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tr = load_trace(p)
    assert list(tr.arrived_at) == [0.0, 1.0]
    assert list(tr.prompt_tokens) == [20, 10]
    wl = Workload.from_dict(small_workload_dict(duration_s=100, rate_scale=1.0))
    reqs = build_requests(tr, wl)
    assert reqs[0].slo_class == "batch" and reqs[1].model == "mistral-7b"
    p.write_text('{"arrived_at": 1, "prompt_tokens": 3}\n{oops\n')
    with pytest.raises(WorkloadError, match=r"t\.jsonl:1: missing 'output_tokens'"):
        load_jsonl(p)


def test_synthetic_matches_fitted_parameters():
    wl = Workload.from_dict(small_workload_dict(duration_s=None, max_requests=20_000,
                                                rate_scale=1.0))
    tr = synthetic_trace(wl, seed=1)
    assert len(tr) == 20_000
    gaps = np.diff(tr.arrived_at)
    assert gaps.mean() == pytest.approx(1 / 5.53, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.09, rel=0.08)
    # clipping at the bounds shifts the log-mean slightly
    assert np.log(tr.output_tokens).mean() == pytest.approx(5.019, abs=0.05)
    assert np.log(tr.prompt_tokens).mean() == pytest.approx(6.633, abs=0.08)


def test_rate_scale_compresses_trace(conv_trace_path):
    tr = load_azure_csv(conv_trace_path)
    wl = Workload.from_dict(small_workload_dict(duration_s=60, rate_scale=10.0))
    reqs = build_requests(tr, wl)
    # 60 s at 10x the trace's ~5.5 req/s
    assert 2500 < len(reqs) < 4000
    assert reqs[-1].arrived_at < 60


def test_workload_toml_errors(tmp_path):
    p = tmp_path / "w.toml"
    p.write_text('[classes.a]\nttft_s = -1\nshare = 1\n[models]\n"llama-3.1-8b" = 1\n')
    with pytest.raises(ConfigError, match=r"w\.toml: field 'classes\.a\.ttft_s'"):
        Workload.load(p)
    p.write_text('[classes.a]\nttft_s = 1\nshare = 1\nbogus = 2\n[models]\n"x" = 1\n')
    with pytest.raises(ConfigError, match="classes.a.bogus"):
        Workload.load(p)
    p.write_text('[classes.a]\nttft_s = 1\nshare = 1\n[models]\n"not-a-model" = 1\n')
    wl = Workload.load(p)
    with pytest.raises(ConfigError, match="unknown model"):
        wl.check_models(Fleet.from_dict(small_fleet_dict()).catalog)


def test_fleet_toml_errors(tmp_path):
    p = tmp_path / "f.toml"
    p.write_text('[[instances]]\ngpu = "TPUv9"\nmodel = "llama-3.1-8b"\n')
    with pytest.raises(ConfigError, match=r"f\.toml: field 'instances\.0\.gpu'.*TPUv9"):
        Fleet.load(p)
    p.write_text('[[instances]]\ngpu = "A10"\nmodel = "llama-3.1-70b"\ntp = 1\n')
    with pytest.raises(ConfigError, match="does not fit"):
        Fleet.load(p)
    p.write_text('[engine]\nmax_num_seqs = 0\n[[instances]]\ngpu = "A10"\n')
    with pytest.raises(ConfigError, match="engine.max_num_seqs"):
        Fleet.load(p)
    p.write_text('instances = []\n')
    with pytest.raises(ConfigError, match="instances"):
        Fleet.load(p)


def test_fleet_auto_tp():
    f = Fleet.from_dict({"instances": [{"gpu": "A100-80GB", "model": "llama-3.1-70b", "count": 2}]})
    assert [i.tp for i in f.instances] == [2, 2]


# -- time-varying rate (arrivals.rate_profile) and length mixtures (lengths.mixture) -----------
SURGE = [[0, 1], [100, 1], [110, 4], [170, 4], [180, 1]]  # x4 for a minute, 10-s ramps


def _profile_wl(process="poisson", cv=1.0, profile=SURGE, **over):
    return Workload.from_dict(small_workload_dict(
        duration_s=300, rate_scale=1.0,
        arrivals={"process": process, "rate_per_s": 20.0, "cv": cv, "rate_profile": profile},
        **over))


def _expected(profile, a, b, rate):
    """Expected arrivals in [a, b): rate times the integral of the piecewise-linear profile
    (trapezoids on a fine grid; the profile is linear between points, so this is exact up
    to the grid)."""
    ts = np.linspace(a, b, 20_001)
    m = np.interp(ts, [p[0] for p in profile], [p[1] for p in profile])
    return rate * float(np.sum((m[1:] + m[:-1]) / 2 * np.diff(ts)))


@pytest.mark.parametrize("process, cv", [("poisson", 1.0), ("gamma", 2.0)])
def test_rate_profile_windows_follow_the_profile(process, cv):
    tr = synthetic_trace(_profile_wl(process, cv), seed=5)
    t = tr.arrived_at
    # starts at 0 and never goes back (the profile's inverse is monotone)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    for a, b in ((0, 100), (100, 110), (110, 170), (170, 180), (180, 300), (125, 155)):
        want = _expected(SURGE, a, b, 20.0)
        got = int(np.sum((t >= a) & (t < b)))
        # count sd of a renewal process over many gaps: sqrt(mean) * CV of the gaps; 4 sd
        assert abs(got - want) < 4 * cv * np.sqrt(want), (a, b, got, want)
    # the surge is there: the mid-surge minute has ~4x the arrivals of the first minute
    first = np.sum(t < 60)
    surge = np.sum((t >= 110) & (t < 170))
    assert 3.0 < surge / first < 5.3


def test_gamma_keeps_its_burstiness_under_a_profile():
    tr = synthetic_trace(_profile_wl("gamma", 2.0), seed=11)
    t = tr.arrived_at
    g = np.diff(t[(t >= 112) & (t < 168)])  # inside the x4 plateau: gaps of rate 80/s
    n = len(g)
    assert g.mean() == pytest.approx(1 / 80.0, rel=4 * 2.0 / np.sqrt(n))
    # the sample CV's standard error for a gamma of shape k = 1/cv^2 (excess kurtosis 6/k):
    # sd(s^2)/sigma^2 ~ sqrt((2 + 6/k) / n), halved for s; 4 of them
    tol = 4 * 0.5 * np.sqrt((2 + 6 * 4.0) / n)
    assert g.std() / g.mean() == pytest.approx(2.0, rel=tol)


def test_rate_profile_zero_window_and_constant_profile():
    tr = synthetic_trace(_profile_wl(profile=[[0, 1], [100, 1], [101, 0], [150, 0], [151, 1]]),
                         seed=2)
    t = tr.arrived_at
    assert np.sum((t > 101) & (t < 150)) == 0
    assert np.sum((t > 151) & (t < 200)) > 500  # traffic comes back
    # a constant multiplier c is the rate times c, draw for draw
    base = Workload.from_dict(small_workload_dict(
        duration_s=200, rate_scale=1.0, arrivals={"process": "gamma", "rate_per_s": 6.0, "cv": 1.5}))
    twice = Workload.from_dict(small_workload_dict(
        duration_s=200, rate_scale=1.0,
        arrivals={"process": "gamma", "rate_per_s": 3.0, "cv": 1.5, "rate_profile": [[0, 2.0]]}))
    a, b = synthetic_trace(base, seed=4), synthetic_trace(twice, seed=4)
    assert len(a) == len(b)
    np.testing.assert_allclose(a.arrived_at, b.arrived_at, rtol=1e-9, atol=1e-9)
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens)


def test_rate_profile_with_max_requests_and_prefix_sessions():
    wl = Workload.from_dict(small_workload_dict(
        duration_s=None, max_requests=3000, rate_scale=1.0,
        arrivals={"process": "poisson", "rate_per_s": 10.0, "rate_profile": [[0, 0], [50, 0], [60, 2]]}))
    tr = synthetic_trace(wl, seed=0)
    assert len(tr) == 3000
    # nothing before the rate rises above 0 at 50 s (the first arrival is where it starts)
    assert tr.arrived_at[0] == pytest.approx(50.0) and np.all(np.diff(tr.arrived_at) >= 0)
    # the ramp 50-60 s carries half of what the next 10 s at x2 do (100 and 200 expected)
    assert np.sum(tr.arrived_at < 60) < np.sum((tr.arrived_at >= 60) & (tr.arrived_at < 70))
    # single-turn sessions: requests are session starts, so they follow the profile exactly
    zero = [[0, 1], [100, 1], [100.5, 0], [200, 0], [200.5, 1]]
    wl = Workload.from_dict(small_workload_dict(
        duration_s=300, rate_scale=1.0, arrivals={"process": "poisson", "rate_per_s": 8.0,
                                                  "rate_profile": zero},
        prefixes={"turns_mean": 1.0, "num_system_prompts": 2}))
    t = synthetic_trace(wl, seed=1).arrived_at
    assert np.sum((t > 100.5) & (t < 200)) == 0
    want = _expected(zero, 0, 100, 8.0)
    assert abs(np.sum(t < 100) - want) < 4 * np.sqrt(want)


RAG = {"prompt_max": 10000, "output_log_mu": 4.0, "output_log_sigma": 0.5,
       "mixture": [{"weight": 1.0, "prompt_log_mu": 8.854, "prompt_log_sigma": 0.05,
                    "output_log_mu": 5.5, "output_log_sigma": 0.3},
                   {"weight": 3.0, "prompt_log_mu": 5.7, "prompt_log_sigma": 0.5}]}


def test_length_mixture_shares_and_medians():
    wl = Workload.from_dict(small_workload_dict(duration_s=None, max_requests=20_000,
                                                rate_scale=1.0, lengths=RAG))
    tr = synthetic_trace(wl, seed=9)
    n = len(tr)
    long = tr.prompt_tokens > 3000  # the components are > 8 log-sds apart at 3,000
    share = long.mean()
    assert abs(share - 0.25) < 4 * np.sqrt(0.25 * 0.75 / n)  # weights 1:3, normalised
    # per component: the median of log length is its log_mu within 4 standard errors of a
    # sample median (sqrt(pi/2) * sigma / sqrt(n)); outputs follow the row's component (the
    # long one its own, the short one the section's 4.0 / 0.5)
    for rows, p_mu, p_sd, o_mu, o_sd in ((long, 8.854, 0.05, 5.5, 0.3),
                                         (~long, 5.7, 0.5, 4.0, 0.5)):
        k = int(rows.sum())
        for x, mu, sd in ((tr.prompt_tokens[rows], p_mu, p_sd), (tr.output_tokens[rows], o_mu, o_sd)):
            assert abs(np.log(np.median(x)) - mu) < 4 * np.sqrt(np.pi / 2) * sd / np.sqrt(k) + 0.5 / np.exp(mu)
    # a single-component mixture with no overrides is the section's own lognormal, draw for draw
    # of the lengths (the component draw comes first, so compare distributions, not rows)
    one = Workload.from_dict(small_workload_dict(
        duration_s=None, max_requests=20_000, rate_scale=1.0,
        lengths={"prompt_log_mu": 6.0, "prompt_log_sigma": 0.4, "mixture": [{"weight": 2.0}]}))
    x = synthetic_trace(one, seed=9).prompt_tokens
    assert abs(np.log(np.median(x)) - 6.0) < 4 * np.sqrt(np.pi / 2) * 0.4 / np.sqrt(len(x))


def test_mixture_in_batch_jobs_and_prefix_sessions():
    wl = Workload.from_dict(small_workload_dict(
        duration_s=60, rate_scale=1.0, lengths=RAG,
        batch_jobs=[{"num_lines": 4000, "model": "llama-3.1-8b", "slo_class": "batch",
                     "lengths": RAG}]))
    reqs = build_requests(synthetic_trace(wl, seed=0), wl, seed=0)
    lines = np.array([r.prompt_tokens for r in reqs if r.tenant == "batch-job-0"])
    assert abs((lines > 3000).mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / 4000)
    wl = Workload.from_dict(small_workload_dict(
        duration_s=300, rate_scale=1.0, lengths={**RAG, "prompt_max": 30000},
        prefixes={"turns_mean": 1.0, "num_system_prompts": 1, "system_prompt_tokens": 100}))
    tr = synthetic_trace(wl, seed=3)
    # single turns: prompt = ~100-token system prompt + the user's message from the mixture
    assert abs((tr.prompt_tokens > 3000).mean() - 0.25) < 4 * np.sqrt(0.25 * 0.75 / len(tr))


def test_profile_and_mixture_deterministic_per_seed():
    wl = _profile_wl("gamma", 1.5, lengths=RAG)
    a, b, c = (synthetic_trace(wl, seed=s) for s in (7, 7, 8))
    assert np.array_equal(a.arrived_at, b.arrived_at)
    assert np.array_equal(a.prompt_tokens, b.prompt_tokens)
    assert np.array_equal(a.output_tokens, b.output_tokens)
    assert len(a) != len(c) or not np.array_equal(a.arrived_at, c.arrived_at)


@pytest.mark.parametrize("section, body, msg", [
    ("arrivals", "rate_profile = []", r"field 'arrivals': .*rate_profile: empty list"),
    ("arrivals", "rate_profile = [[0, 1], [60, 2], [60, 3]]",
     r"rate_profile\[2\]: time 60.0 s is not after the previous point's 60.0 s"),
    ("arrivals", "rate_profile = [[0, 1], [30, 2], [20, 3]]", r"rate_profile\[2\]: time 20.0 s"),
    ("arrivals", "rate_profile = [[0, 1], [60, -0.5]]", r"rate_profile\[1\]: multiplier -0.5 is negative"),
    ("arrivals", "rate_profile = [[-5, 1]]", r"rate_profile\[0\]: time -5.0 s is negative"),
    ("arrivals", "rate_profile = [[0, 0], [10, 0]]", "every multiplier is 0"),
    ("arrivals", "rate_profile = [[0, 1, 2]]", "arrivals.rate_profile.0"),
    ("lengths", "mixture = []", r"field 'lengths': .*mixture: empty list"),
    ("lengths", "mixture = [{weight = 0}]", r"field 'lengths\.mixture\.0\.weight'"),
    ("lengths", "mixture = [{weight = 1, prompt_log_sigma = -1}]",
     r"field 'lengths\.mixture\.0\.prompt_log_sigma'"),
    ("lengths", "mixture = [{weight = 1}, {weight = 1, output_min = 4000}]",
     r"mixture\[1\]: output_min 4000 is above output_max 2048"),
    ("lengths", "mixture = [{weight = 1, bogus = 2}]", r"lengths\.mixture\.0\.bogus"),
])
def test_profile_and_mixture_errors_name_file_and_field(tmp_path, section, body, msg):
    p = tmp_path / "w.toml"
    p.write_text(f'duration_s = 60\n[{section}]\n{body}\n'
                 '[classes.a]\nttft_s = 1\nshare = 1\n[models]\n"llama-3.1-8b" = 1\n')
    with pytest.raises(ConfigError, match=r"w\.toml: " + ("" if msg.startswith("field") else ".*") + msg):
        Workload.load(p)


def test_profile_ending_at_zero_needs_a_duration(tmp_path):
    p = tmp_path / "w.toml"
    p.write_text('max_requests = 100\n[arrivals]\nrate_profile = [[0, 1], [60, 0]]\n'
                 '[classes.a]\nttft_s = 1\nshare = 1\n[models]\n"llama-3.1-8b" = 1\n')
    with pytest.raises(ConfigError, match="ends at multiplier 0 and the workload has no duration_s"):
        Workload.load(p)
    p.write_text(p.read_text().replace("max_requests = 100", "max_requests = 100\nduration_s = 90"))
    assert len(synthetic_trace(Workload.load(p), seed=0)) == 100
