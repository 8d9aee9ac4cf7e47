import pytest

from qlm_opt.catalog import GIB, Catalog
from qlm_opt.errors import ConfigError


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return Catalog.load()


def test_catalog_has_required_models_and_gpus(cat):
    for m in ("llama-3.2-1b", "llama-3.1-8b", "mistral-7b", "vicuna-13b", "llama-3.1-70b"):
        assert m in cat.models
    for g in ("A10", "L4", "A100-80GB", "H100-80GB"):
        assert g in cat.gpus


def test_derived_values_llama8b(cat):
    m = cat.model("llama-3.1-8b")
    assert m.weight_bytes == 8_030_261_248 * 2
    # 2 (K,V) * 32 layers * 8 kv heads * 128 head_dim * 2 bytes
    assert m.kv_bytes_per_token == 131_072
    # 80 GiB * 0.9 - 1 GiB reserve - weights, over 128 KiB per token
    expected = int((80 * GIB * 0.9 - GIB - m.weight_bytes) // 131_072)
    assert cat.kv_capacity_tokens("llama-3.1-8b", "A100-80GB", 1) == expected == 459_099


def test_tensor_parallel_fit(cat):
    assert cat.placement("llama-3.1-8b", "A10").tp == 1
    assert cat.placement("vicuna-13b", "A10").tp == 2  # 26 GB of weights
    assert cat.placement("llama-3.1-70b", "A100-80GB").tp == 2
    assert cat.placement("llama-3.1-70b", "L4").tp == 8
    assert not cat.fits("llama-3.1-70b", "A100-80GB", 1)
    assert cat.fits("llama-3.2-1b", "L4", 1)


def test_unknown_names(cat):
    with pytest.raises(ConfigError, match="unknown model 'gpt-5'"):
        cat.model("gpt-5")
    with pytest.raises(ConfigError, match="unknown GPU type"):
        cat.gpu("TPU")


def test_bad_model_file_names_file_and_field(tmp_path):
    (tmp_path / "gpus.toml").write_text(
        '[gpus.X]\nmemory_gb = 24\nhbm_gbps = 600\nbf16_tflops = 100\nhost_link_gbps = 32\n'
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "m"\nparams = "lots"\nlayers = 2\nhidden = 8\nheads = 2\n'
                   'kv_heads = 2\nhead_dim = 4\ndtype_bytes = 2\nmax_context = 16\n')
    with pytest.raises(ConfigError) as e:
        Catalog.load(tmp_path)
    assert "bad.toml" in str(e.value) and "params" in str(e.value)


def test_invalid_toml_syntax(tmp_path):
    (tmp_path / "gpus.toml").write_text("[gpus\n")
    with pytest.raises(ConfigError, match="gpus.toml: invalid TOML"):
        Catalog.load(tmp_path)


def test_missing_field(tmp_path):
    (tmp_path / "gpus.toml").write_text('[gpus.X]\nmemory_gb = 24\n')
    with pytest.raises(ConfigError, match=r"gpus\.X\.hbm_gbps"):
        Catalog.load(tmp_path)
