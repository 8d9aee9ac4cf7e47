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
