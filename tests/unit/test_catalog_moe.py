"""The current catalog: new GPU types and models (mixture of experts, MLA), the roofline of a
MoE worked out by hand, and fit checks with tensor and expert parallelism."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qlm_opt.catalog import GB, GIB, Catalog, _ModelFile, default_catalog_dir
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.errors import ConfigError

NEW_MODELS = ("llama-3.3-70b", "qwen3-8b", "qwen3-30b-a3b", "gpt-oss-20b", "gpt-oss-120b",
              "deepseek-v3")
NEW_GPUS = ("H200", "B200", "L40S", "H20", "MI300X")


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return Catalog.load()


@pytest.mark.parametrize("name", NEW_MODELS)
def test_every_new_model_file_validates_and_states_its_source(name):
    path = default_catalog_dir() / f"{name}.toml"
    with path.open("rb") as f:
        data = tomllib.load(f)
    m = _ModelFile.model_validate(data)
    assert m.name == name
    assert m.source and "config.json" in m.source


def test_catalog_loads_every_file_and_new_gpus_carry_datasheet_numbers(cat):
    files = sorted(p.stem for p in default_catalog_dir().glob("*.toml") if p.stem != "gpus")
    assert sorted(cat.models) == files
    for g in NEW_GPUS:
        assert g in cat.gpus
    h200, mi = cat.gpu("H200"), cat.gpu("MI300X")
    assert h200.memory_bytes == 141 * GIB and h200.hbm_bps == 4800 * GB
    assert h200.flops == 989e12
    assert mi.memory_bytes == 192 * GIB and mi.hbm_bps == 5300 * GB
    assert mi.flops == pytest.approx(1307.4e12)
    assert cat.gpu("B200").hbm_bps == 8000 * GB and cat.gpu("L40S").memory_bytes == 48 * GIB
    assert cat.gpu("H20").flops == 148e12
    gtext = (default_catalog_dir() / "gpus.toml").read_text()
    for g in NEW_GPUS:
        assert "datasheet" in gtext.split(f"[gpus.{g}]")[0].rsplit("\n\n", 1)[-1] or \
            "product brief" in gtext.split(f"[gpus.{g}]")[0].rsplit("\n\n", 1)[-1]


def test_moe_roofline_by_hand_qwen3_30b_a3b_on_h100(cat):
    """Qwen3-30B-A3B on one H100-80GB, default efficiencies (mfu 0.5, mbu 0.8).

    compute per token = 2 x 3,353,032,704 active / (989e12 x 0.5) = 1.35613e-5 s
    weights once      = 30,532,122,624 x 2 B / (3350e9 x 0.8)     = 22.7852 ms
    KV per token      = 2 x 48 layers x 4 KV heads x 128 x 2 B   = 98,304 B
    KV read per token = 98,304 / 2.68e12                          = 3.66806e-8 s
    KV capacity       = (80 GiB x 0.9 - 1 GiB - 61,064,245,248 B) / 98,304 = 154,331 tokens
    """
    im = iteration_model(cat, "qwen3-30b-a3b", "H100-80GB", 1, PerfParams())
    assert im.c_tok == pytest.approx(1.35613e-5, rel=1e-4)
    assert im.m0 == pytest.approx(22.7852e-3, rel=1e-4)
    assert im.m_kv == pytest.approx(3.66806e-8, rel=1e-4)
    assert cat.kv_capacity_tokens("qwen3-30b-a3b", "H100-80GB", 1) == 154_331
    # compute follows active parameters, memory the total: a dense model of the same total
    # size would compute 30.5/3.35 = 9.1x slower per token
    m = cat.model("qwen3-30b-a3b")
    assert m.compute_params == 3_353_032_704 and m.weight_bytes == 61_064_245_248
    # With 3.35B active of 30.5B, a step turns compute-bound only past 22.79 / 0.01356 = 1,680
    # tokens: 1,000 prompt tokens take the weight-streaming time, 4,000 take 54.2 ms of compute
    # (+4 ms overhead); a 64-seq decode step with 64k KV tokens is memory-bound:
    # 22.79 + 65,536 x 3.668e-5 ms = 25.19 ms
    assert im.iteration_s(1000, 0) == pytest.approx(0.004 + 22.7852e-3, rel=1e-4)
    assert im.iteration_s(4000, 0) == pytest.approx(0.004 + 4000 * 1.35613e-5, rel=1e-4)
    assert im.iteration_s(64, 65_536) == pytest.approx(0.004 + 22.7852e-3 + 65_536 * 3.66806e-8,
                                                       rel=1e-4)


def test_mixed_precision_weights_gpt_oss_fit_one_80gb_gpu(cat):
    # MXFP4 experts (0.53125 B) + bf16 rest: 65.19 GB for 120b, 13.75 GB for 20b (card: 120b
    # runs on one 80 GB GPU, 20b within 16 GB)
    assert cat.model("gpt-oss-120b").weight_bytes == 65_190_340_224
    assert cat.model("gpt-oss-20b").weight_bytes == 13_751_518_848
    assert cat.placement("gpt-oss-120b", "H100-80GB").tp == 1
    assert cat.placement("gpt-oss-20b", "L4").tp == 1
    # gpt-oss-120b on 48 GB L40S needs two, with its 128 experts spread whole (ep = tp = 2)
    pl = cat.placement("gpt-oss-120b", "L40S")
    assert (pl.tp, pl.ep) == (2, 2)


def test_deepseek_v3_fit_with_expert_parallelism_and_mla_kv(cat):
    m = cat.model("deepseek-v3")
    # MLA: 61 layers x 576 latent x 2 B per token, every tp rank holding its copy
    assert m.kv_bytes_per_token == 61 * 576 * 2
    assert m.kv_bytes_per_token_at(8) == 8 * 61 * 576 * 2
    # 671 GB of FP8 weights: not on 8x H100 (8 x 71 GiB usable), yes on 8x H200, 4x MI300X
    assert cat.placement("deepseek-v3", "H100-80GB") is None
    pl = cat.placement("deepseek-v3", "H200")
    assert (pl.tp, pl.ep) == (8, 8)
    usable = 8 * (141 * GIB * 0.9 - GIB)
    assert pl.kv_capacity_tokens == int((usable - m.weight_bytes) // (8 * 61 * 576 * 2))
    assert cat.placement("deepseek-v3", "MI300X").tp == 4


def test_layout_rules_for_tensor_and_expert_parallelism(cat):
    assert cat.layout_error("qwen3-30b-a3b", 4, 4) is None
    assert "ep=2 must equal tp=4" in cat.layout_error("qwen3-30b-a3b", 4, 2)
    assert "mixture-of-experts" in cat.layout_error("qwen3-8b", 2, 2)
    assert cat.kv_capacity_tokens("qwen3-8b", "H100-80GB", 2, ep=2) == 0
    assert not cat.fits("qwen3-8b", "H100-80GB", 2, ep=2)
    # 4 KV heads over 8 ranks: vLLM replicates them, so a token costs 8 heads of KV
    m = cat.model("qwen3-30b-a3b")
    assert m.kv_bytes_per_token_at(8) == 2 * 48 * 8 * 128 * 2 == 2 * m.kv_bytes_per_token
    assert m.kv_bytes_per_token_at(2) == m.kv_bytes_per_token


def _write_model(d: Path, **over) -> Path:
    (d / "gpus.toml").write_text('[gpus.X]\nmemory_gb = 80\nhbm_gbps = 2000\n'
                                 'bf16_tflops = 300\nhost_link_gbps = 32\n')
    fields = {"name": '"m"', "params": 1_000_000_000, "layers": 4, "hidden": 256,
              "heads": 12, "kv_heads": 4, "head_dim": 64, "dtype_bytes": 2,
              "max_context": 4096, **over}
    p = d / "m.toml"
    p.write_text("".join(f"{k} = {v}\n" for k, v in fields.items()))
    return p


def test_heads_that_do_not_split_refuse_that_tp(tmp_path):
    _write_model(tmp_path)
    c = Catalog.load(tmp_path)
    assert "12 attention heads" in c.layout_error("m", 8)
    assert not c.fits("m", "X", 8) and c.fits("m", "X", 4)


def test_experts_that_do_not_split_fall_back_to_split_experts(tmp_path):
    _write_model(tmp_path, active_params=200_000_000, num_experts=6, experts_per_token=2,
                 expert_params=800_000_000, moe_intermediate=512)
    c = Catalog.load(tmp_path)
    assert "6 experts do not split over ep=4" in c.layout_error("m", 4, 4)
    assert c.placement("m", "X", tp=4).ep == 1  # each expert's FFN split 4 ways instead
    assert c.placement("m", "X", tp=2).ep == 2


def test_incomplete_moe_file_names_file_and_field(tmp_path):
    _write_model(tmp_path, active_params=200_000_000)
    with pytest.raises(ConfigError) as e:
        Catalog.load(tmp_path)
    assert "m.toml" in str(e.value) and "num_experts" in str(e.value)


def test_active_params_above_total_is_refused(tmp_path):
    _write_model(tmp_path, active_params=2_000_000_000, num_experts=8, experts_per_token=2,
                 expert_params=800_000_000)
    with pytest.raises(ConfigError, match="active_params must be <= params"):
        Catalog.load(tmp_path)
