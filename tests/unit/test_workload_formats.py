"""Trace formats with prefix identity: Mooncake JSONL, BurstGPT CSV, the shared-prefix
synthetic generator; every loader names the line of a bad row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from qlm_opt.config import Workload
from qlm_opt.errors import WorkloadError
from qlm_opt.whatif.workload import (
    build_requests,
    load_burstgpt_csv,
    load_mooncake_jsonl,
    load_trace,
    synthetic_trace,
)
from tests.conftest import small_workload_dict

MOONCAKE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mooncake_conversation.jsonl"


def _write(p: Path, rows: list) -> Path:
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return p


def test_mooncake_rows_and_hashes(tmp_path):
    p = _write(tmp_path / "m.jsonl", [
        {"timestamp": 3000, "input_length": 1100, "output_length": 7, "hash_ids": [0, 1, 5]},
        "",
        {"timestamp": 1000, "input_length": 512, "output_length": 0, "hash_ids": [0]},
    ])
    tr = load_trace(p)  # dispatched on content
    assert list(tr.arrived_at) == [0.0, 2.0]  # ms -> s, sorted, from the first request
    assert list(tr.prompt_tokens) == [512, 1100]
    assert list(tr.output_tokens) == [1, 7]
    assert tr.hash_ids == [(0,), (0, 1, 5)] and tr.hash_block_tokens == 512
    wl = Workload.from_dict(small_workload_dict(duration_s=100, rate_scale=1.0))
    reqs = build_requests(tr, wl)
    assert reqs[1].prefix_hashes == (0, 1, 5) and reqs[1].hash_block_tokens == 512


@pytest.mark.parametrize("row, msg", [
    ('{"timestamp": 5, "input_length": 10', r"m\.jsonl:2: invalid JSON"),
    ({"timestamp": 5, "input_length": 10, "output_length": 1}, r"m\.jsonl:2: missing 'hash_ids'"),
    ({"timestamp": -5, "input_length": 10, "output_length": 1, "hash_ids": [1]},
     r"m\.jsonl:2: timestamp must be milliseconds >= 0"),
    ({"timestamp": 5, "input_length": "ten", "output_length": 1, "hash_ids": [1]},
     r"m\.jsonl:2: input_length is not a number"),
    ({"timestamp": 5, "input_length": 10, "output_length": -1, "hash_ids": [1]},
     r"m\.jsonl:2: output_length must be >= 0"),
    ({"timestamp": 5, "input_length": 10, "output_length": 1, "hash_ids": ["a"]},
     r"m\.jsonl:2: hash_ids must be a list of integers"),
    ({"timestamp": 5, "input_length": 1025, "output_length": 1, "hash_ids": [1, 2]},
     r"m\.jsonl:2: 2 hash_ids for input_length 1025; expected 3"),
    ([1, 2], r"m\.jsonl:2: expected a JSON object"),
])
def test_mooncake_bad_row_names_line(tmp_path, row, msg):
    good = {"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}
    p = _write(tmp_path / "m.jsonl", [good, row])
    with pytest.raises(WorkloadError, match=msg):
        load_mooncake_jsonl(p)


def test_mooncake_shared_trace():
    if not MOONCAKE.exists():
        pytest.skip("shared Mooncake trace not present")
    tr = load_trace(MOONCAKE)
    assert len(tr) == 12_031 and tr.hash_block_tokens == 512
    assert 11_000 < tr.prompt_tokens.mean() < 13_000
    # heavy prefix reuse: most requests share their first block with an earlier one
    firsts = [h[0] for h in tr.hash_ids]
    assert len(set(firsts)) < len(firsts) / 2


def test_burstgpt(tmp_path):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "5,ChatGPT,472,18,490,Conversation log\n"
                 "\n"
                 "2.5,GPT-4,1000,0,1000,API log\n")
    tr = load_trace(p)
    assert list(tr.arrived_at) == [0.0, 2.5]
    assert list(tr.prompt_tokens) == [1000, 472]
    assert list(tr.output_tokens) == [1, 18]  # a failed request keeps one output token
    assert tr.hash_ids is None


@pytest.mark.parametrize("row, msg", [
    ("x,ChatGPT,1,2,3,Conversation log", r"b\.csv:3: bad Timestamp 'x'"),
    ("-1,ChatGPT,1,2,3,Conversation log", r"b\.csv:3: Timestamp must be seconds >= 0"),
    ("1,ChatGPT,many,2,3,Conversation log", r"b\.csv:3: Request tokens is not a number"),
    ("1,ChatGPT,4,-2,3,Conversation log", r"b\.csv:3: Response tokens must be >= 0"),
    ("1,ChatGPT", r"b\.csv:3: expected 6 columns, got 2"),
])
def test_burstgpt_bad_row_names_line(tmp_path, row, msg):
    p = tmp_path / "b.csv"
    p.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                 "0,ChatGPT,10,2,12,Conversation log\n" + row + "\n")
    with pytest.raises(WorkloadError, match=msg):
        load_burstgpt_csv(p)
    p.write_text("Time,Model,Prompt\n1,a,2\n")
    with pytest.raises(WorkloadError, match=r"b\.csv:1: missing column"):
        load_burstgpt_csv(p)


def _prefix_workload(**prefixes) -> Workload:
    d = small_workload_dict(duration_s=600, rate_scale=1.0)
    d["prefixes"] = {"num_system_prompts": 4, "system_prompt_tokens": 1500, "turns_mean": 3,
                     "think_time_s": 10, **prefixes}
    d["lengths"] = {"prompt_max": 16000}
    return Workload.from_dict(d)


def test_synthetic_prefix_trace_shares_prefixes():
    wl = _prefix_workload()
    tr = synthetic_trace(wl, seed=2)
    n = len(tr)
    # about the workload's request rate (5.53/s) over 600 s
    assert 0.7 * 5.53 * 600 < n < 1.3 * 5.53 * 600
    assert np.all(np.diff(tr.arrived_at) >= 0) and tr.arrived_at[-1] < 600
    B = tr.hash_block_tokens
    assert B == 512
    for p, h in zip(tr.prompt_tokens, tr.hash_ids):
        assert len(h) == -(-int(p) // B)  # Mooncake's convention: one id per block
    # every request starts with one of the 4 system prompts' blocks
    heads = {h[0] for h in tr.hash_ids}
    assert len(heads) == 4
    # later turns repeat their session's earlier full blocks: hash ids recur far beyond the
    # system prompts' 12 blocks
    seen: set[int] = set()
    reused = 0
    for h in tr.hash_ids:
        reused += sum(1 for x in h if x in seen)
        seen.update(h)
    total = sum(len(h) for h in tr.hash_ids)
    assert reused / total > 0.5
    # deterministic per seed
    assert synthetic_trace(wl, seed=2).hash_ids == tr.hash_ids
    # single-turn traffic shares only system prompts
    tr1 = synthetic_trace(_prefix_workload(turns_mean=1), seed=2)
    sys_blocks = {x for h in tr1.hash_ids for x in h[:2]}
    assert len(sys_blocks) <= 8


def test_shared_prefixes_hit_the_engine_cache():
    """End to end: a what-if run of shared-prefix traffic reports cache hits, and the cache
    shortens time to first token against the same run with caching off."""
    from qlm_opt.config import Fleet
    from qlm_opt.whatif.run import run_policy
    from qlm_opt.whatif.workload import prepare_requests
    from tests.conftest import small_fleet_dict

    wl = _prefix_workload()
    wl.data.duration_s = 120
    wl.data.rate_scale = 3.0
    make = prepare_requests(None, wl, 1)
    ttft = {}
    for on in (True, False):
        fd = small_fleet_dict()
        fd.setdefault("engine", {})["enable_prefix_caching"] = on
        fleet = Fleet.from_dict(fd)
        run = run_policy("fcfs", fleet, wl, make(), track_rwt=False)
        ttft[on] = float(np.median([r.ttft_s for r in run.requests if r.ttft_s is not None]))
    assert ttft[True] < 0.8 * ttft[False]
