"""Shared fixtures and factories."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACE = REPO.parent / "shared" / "data" / "azure_llm_2023_conv.csv"


@pytest.fixture(scope="session")
def conv_trace_path() -> Path:
    if not SHARED_TRACE.exists():
        pytest.fail(f"shared conv trace missing at {SHARED_TRACE}")
    return SHARED_TRACE


def small_fleet_dict(**engine) -> dict:
    return {
        "name": "test-fleet",
        "engine": {"max_num_seqs": 64, "max_num_batched_tokens": 4096, **engine},
        "instances": [
            {"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 2},
            {"gpu": "A10", "model": "llama-3.2-1b", "count": 1},
        ],
    }


def small_workload_dict(**over) -> dict:
    d = {
        "name": "test-wl",
        "seed": 3,
        "duration_s": 120,
        "rate_scale": 4.0,
        "classes": {
            "interactive": {"ttft_s": 2.0, "share": 0.6, "priority": 0},
            "batch": {"ttft_s": 300.0, "share": 0.4, "priority": 1},
        },
        "models": {"llama-3.1-8b": 0.7, "llama-3.2-1b": 0.2, "mistral-7b": 0.1},
    }
    d.update(over)
    return d
