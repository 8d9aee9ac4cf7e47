"""The upper bound U on SLO attainment (qlm_opt/whatif/bound.py).

U must be at least what any schedule attains in the simulator: checked against an exhaustive
search over dispatch schedules (which requests to serve, on which instance, in which engine
priority order) and against every policy, on random tiny instances.
"""

from __future__ import annotations

import itertools
import math
import random
import subprocess
import sys

import pytest

from qlm_opt.whatif.bound import BoundError, compute_bound
from qlm_opt.config import Fleet, Workload
from qlm_opt.domain import Request, RequestState
from qlm_opt.engines.perf import iteration_model
from qlm_opt.core.policy import Policy
from qlm_opt.core.runtime import Runtime
from qlm_opt.hosts.simulated import Simulator
from qlm_opt.whatif.workload import build_requests, synthetic_trace
from qlm_opt.whatif.run import run_policy

POLICIES = ["fcfs", "edf", "priority", "shepherd", "qlm-rwt", "qlm"]
DRAIN_S = 120.0


def _workload(classes: dict, models: dict, **more) -> Workload:
    return Workload.from_dict({"name": "tiny", "seed": 0, "duration_s": 60, "classes": classes,
                               "models": models, **more})


def _fleet(instances: list[dict], **engine) -> Fleet:
    return Fleet.from_dict({"name": "tiny", "engine": {"max_num_seqs": 8,
                                                       "max_num_batched_tokens": 2048,
                                                       **engine},
                            "instances": instances})


def _requests(spec: list[tuple], wl: Workload) -> list[Request]:
    """(arrived_at, model, class, prompt, output) rows -> fresh requests sorted by arrival."""
    out = []
    for k, (at, model, cls, p, o) in enumerate(sorted(spec, key=lambda s: s[0])):
        c = wl.classes[cls]
        out.append(Request(id=k, model=model, slo_class=cls, prompt_tokens=p, output_tokens=o,
                           arrived_at=at, deadline_at=at + c.ttft_s, tpot_s=c.tpot_s,
                           priority=c.priority))
    return out


class _Driver(Policy):
    """A fixed schedule: each request is dispatched at its arrival to its instance with its
    engine priority, or dropped."""

    name = "driver"

    def __init__(self, assign: dict[int, int | None], rank: dict[int, int]) -> None:
        self.assign = assign
        self.rank = rank

    def on_arrival(self, req: Request) -> None:
        i = self.assign[req.id]
        if i is None:
            self.rt.drop(req, "not served")
        else:
            self.rt.dispatch(req, self.rt.instances[i], (self.rank[req.id], req.id))


def _simulate(fleet: Fleet, reqs: list[Request], assign, rank) -> tuple[int, dict[str, int]]:
    """On-time count, overall and per class, of one schedule."""
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    rt.bind(_Driver(assign, rank))

    def arrive(req: Request) -> None:
        rt.accept(req)
        rt.policy.on_arrival(req)

    sim.run(reqs, arrive, until_at=reqs[-1].arrived_at + DRAIN_S)
    per: dict[str, int] = {}
    for r in reqs:
        if r.state == RequestState.FINISHED and r.attained():
            per[r.slo_class] = per.get(r.slo_class, 0) + 1
    return sum(per.values()), per


def _fresh(spec, wl):
    return _requests(spec, wl)


def _exhaustive(fleet: Fleet, spec, wl) -> tuple[int, dict[str, int]]:
    """The best on-time count (and best per class) over every assignment (instance or
    dropped) and every engine priority order."""
    n = len(spec)
    reqs0 = _fresh(spec, wl)
    choices = []
    for r in reqs0:
        choices.append([i for i, s in enumerate(fleet.instances) if s.initial_model == r.model]
                       + [None])
    best, best_cls = 0, {}
    for assign in itertools.product(*choices):
        served = [k for k in range(n) if assign[k] is not None]
        for order in itertools.permutations(served):
            rank = {k: pos for pos, k in enumerate(order)}
            reqs = _fresh(spec, wl)
            got, per = _simulate(fleet, reqs, dict(enumerate(assign)), rank)
            best = max(best, got)
            for c, v in per.items():
                best_cls[c] = max(best_cls.get(c, 0), v)
    return best, best_cls


def _random_instance(rng: random.Random):
    two = rng.random() < 0.5
    if two:
        fleet = _fleet([{"gpu": "A10", "model": "llama-3.2-1b", "count": 1},
                        {"gpu": "A10", "model": "llama-3.2-1b", "count": 1}])
        n = 3
    else:
        fleet = _fleet([{"gpu": "A10", "model": "llama-3.2-1b", "count": 1}])
        n = 4
    wl = _workload({"fast": {"ttft_s": rng.choice([0.08, 0.12, 0.2]), "share": 1},
                    "slow": {"ttft_s": rng.choice([0.3, 0.5]), "share": 1, "priority": 1}},
                   {"llama-3.2-1b": 1.0})
    spec = [(round(rng.uniform(0, 0.15), 3), "llama-3.2-1b", rng.choice(["fast", "slow"]),
             rng.choice([100, 900, 2000, 3500, 6000]), rng.randint(1, 30)) for _ in range(n)]
    return fleet, wl, spec


@pytest.mark.parametrize("seed", range(8))
def test_bound_is_at_least_the_best_schedule_and_every_policy(seed):
    rng = random.Random(seed)
    fleet, wl, spec = _random_instance(rng)
    res = compute_bound(_fresh(spec, wl), wl, fleet, drain_s=DRAIN_S)
    assert res.status == "optimal"
    n = len(spec)
    best, best_cls = _exhaustive(fleet, spec, wl)
    assert res.num_on_time_max >= best
    assert res.slo_attainment >= best / n
    for c, v in best_cls.items():
        assert res.per_class[c] * res.per_class_requests[c] >= v - 1e-9
    for name in POLICIES:
        run = run_policy(name, fleet, wl, _fresh(spec, wl), drain_s=DRAIN_S, track_rwt=False)
        m = run.metrics
        assert res.slo_attainment >= m["slo_attainment"] - 1e-12, name
        for c, pc in m["per_class"].items():
            if pc["slo_attainment"] is not None:
                assert res.per_class[c] >= pc["slo_attainment"] - 1e-12, (name, c)
    assert 0.0 <= res.slo_attainment <= res.isolation <= 1.0


def test_random_instances_are_not_trivial():
    """The instances above must be hard enough that some schedule misses: otherwise the
    comparison with U says nothing."""
    missed = 0
    for seed in range(8):
        fleet, wl, spec = _random_instance(random.Random(seed))
        best, _ = _exhaustive(fleet, spec, wl)
        missed += best < len(spec)
    assert missed >= 3


def test_bound_with_swaps_is_at_least_every_policy():
    """A model nobody holds: policies must swap it in (warm swap, ~1 s); U charges the swap."""
    fleet = _fleet([{"gpu": "A100-80GB", "model": "llama-3.1-8b", "count": 1},
                    {"gpu": "A10", "model": "llama-3.2-1b", "count": 1}])
    wl = _workload({"interactive": {"ttft_s": 0.6, "share": 1},
                    "batch": {"ttft_s": 30.0, "share": 1, "priority": 1}},
                   {"llama-3.1-8b": 1.0, "mistral-7b": 1.0, "llama-3.2-1b": 1.0})
    rng = random.Random(5)
    spec = [(round(rng.uniform(0, 20), 2), rng.choice(["llama-3.1-8b", "mistral-7b",
                                                        "llama-3.2-1b"]),
             rng.choice(["interactive", "batch"]), rng.randint(50, 3000), rng.randint(1, 200))
            for _ in range(40)]
    # a mistral request at time 0 with a 0.6-s target: the swap alone takes longer
    spec.append((0.0, "mistral-7b", "interactive", 100, 5))
    res = compute_bound(_fresh(spec, wl), wl, fleet, drain_s=DRAIN_S)
    assert res.isolation < 1.0  # the request at time 0 cannot be on time
    swaps = 0
    for name in POLICIES:
        m = run_policy(name, fleet, wl, _fresh(spec, wl), drain_s=DRAIN_S,
                       track_rwt=False).metrics
        swaps += m["num_swaps"]
        assert res.slo_attainment >= m["slo_attainment"] - 1e-12, name
        for c, pc in m["per_class"].items():
            assert res.per_class[c] >= pc["slo_attainment"] - 1e-12, (name, c)
    assert swaps >= 1  # the instance really needed swaps


def _hand_instance(target_in_prefills: float):
    """Three 1,500-token prompts at time 0 on one A10 (roofline, 2,048-token budget).

    Each prefill is compute work ``w = P·(c_tok + overhead/B)``; the TTFT target is
    ``target_in_prefills · w``, and the LP slot is just wider than the target, so the window
    [0, target] holds ``slot / w`` prefills of engine time."""
    fleet = _fleet([{"gpu": "A10", "model": "llama-3.2-1b", "count": 1}])
    im = iteration_model(fleet.catalog, "llama-3.2-1b", "A10", 1, fleet.perf)
    p = 1500
    w = p * (im.c_tok + im.overhead_s / fleet.engine.max_num_batched_tokens)
    target = target_in_prefills * w
    wl = _workload({"interactive": {"ttft_s": target, "share": 1}}, {"llama-3.2-1b": 1.0})
    spec = [(0.0, "llama-3.2-1b", "interactive", p, 1) for _ in range(3)]
    return fleet, wl, spec, target


def test_hand_worked_instance_two_of_three():
    """Window of 2.5 prefills: the fluid bound fits 2.5 requests; a run's count is an integer,
    so U = 2/3. The simulator reaches it (two prompts share the first iteration)."""
    fleet, wl, spec, target = _hand_instance(2.5)
    res = compute_bound(_fresh(spec, wl), wl, fleet, slot_s=target * 1.0001, drain_s=DRAIN_S)
    assert res.isolation == 1.0  # each alone is on time
    assert res.num_on_time_max == 2
    assert res.slo_attainment == pytest.approx(2 / 3)
    best, _ = _exhaustive(fleet, spec, wl)
    assert best == 2


def test_hand_worked_instance_all_three():
    """Window of 3.2 prefills: all three fit, U = 1."""
    fleet, wl, spec, target = _hand_instance(3.2)
    res = compute_bound(_fresh(spec, wl), wl, fleet, slot_s=target * 1.0001, drain_s=DRAIN_S)
    assert res.num_on_time_max == 3
    assert res.slo_attainment == 1.0


def test_prompt_over_the_context_is_never_on_time():
    """vicuna-13b serves 4,096 tokens: a longer prompt is dropped by the engine."""
    fleet = _fleet([{"gpu": "A100-80GB", "model": "vicuna-13b", "count": 1}])
    wl = _workload({"batch": {"ttft_s": 600.0, "share": 1}}, {"vicuna-13b": 1.0})
    spec = [(0.0, "vicuna-13b", "batch", 5000, 10), (1.0, "vicuna-13b", "batch", 100, 10)]
    res = compute_bound(_fresh(spec, wl), wl, fleet, drain_s=DRAIN_S)
    assert res.num_on_time_max == 1
    assert res.isolation == 0.5


def test_bound_is_at_most_one_and_does_not_rise_with_load():
    """The same requests replayed faster (rate_scale compresses the same arrivals)."""
    fleet = _fleet([{"gpu": "A10", "model": "llama-3.2-1b", "count": 1},
                    {"gpu": "A10", "model": "llama-3.1-8b", "count": 1}],
                   max_num_seqs=64, max_num_batched_tokens=4096)
    base = {"name": "mono", "seed": 1, "max_requests": 300,
            "classes": {"interactive": {"ttft_s": 1.0, "share": 0.6},
                        "batch": {"ttft_s": 60.0, "share": 0.4, "priority": 1}},
            "models": {"llama-3.2-1b": 0.5, "llama-3.1-8b": 0.5}}
    us = []
    first = None
    for scale in (0.5, 2.0, 8.0, 32.0):
        wl = Workload.from_dict({**base, "rate_scale": scale})
        reqs = build_requests(synthetic_trace(wl), wl)
        key = [(r.prompt_tokens, r.output_tokens, r.model, r.slo_class) for r in reqs]
        first = first or key
        assert key == first  # the same requests, only closer together
        res = compute_bound(reqs, wl, fleet, drain_s=600.0)
        assert res.status == "optimal"
        assert 0.0 <= res.slo_attainment <= 1.0
        for v in res.per_class.values():
            assert 0.0 <= v <= 1.0
        us.append(res.slo_attainment)
    assert all(b <= a + 1e-12 for a, b in zip(us, us[1:])), us
    assert us[-1] < us[0]  # the highest load is capacity-bound: U says so


def test_bad_input_raises_one_clear_error():
    fleet = _fleet([{"gpu": "A10", "model": "llama-3.2-1b", "count": 1}])
    wl = _workload({"interactive": {"ttft_s": 1.0, "share": 1}}, {"llama-3.2-1b": 1.0})
    reqs = _requests([(1.0, "llama-3.2-1b", "interactive", 10, 1),
                      (2.0, "llama-3.2-1b", "interactive", 10, 1)], wl)
    with pytest.raises(BoundError, match="sorted"):
        compute_bound(list(reversed(reqs)), wl, fleet)
    with pytest.raises(BoundError, match="slot_s"):
        compute_bound(reqs, wl, fleet, slot_s=0.0)
    reqs[0].slo_class = "gold"
    with pytest.raises(BoundError, match="unknown SLO class 'gold'"):
        compute_bound(reqs, wl, fleet)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlm_opt.cli", *args], capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, words", [
    (["bound", "--rate-scale", "-1"], "--rate-scale must be > 0"),
    (["bound", "--trace", "/nonexistent/trace.csv"], "file not found"),
    (["bound", "--slot", "0"], "--slot must be > 0"),
    (["bound", "--fleet", "/nonexistent/fleet.toml"], "file not found"),
])
def test_cli_bad_input_is_one_line_exit_2(args, words):
    p = _cli(*args)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qlm-opt: error:"), p.stderr
    assert words in lines[0]


def test_cli_bound_and_whatif_bound(tmp_path):
    out = tmp_path / "b.json"
    p = _cli("bound", "--duration", "20", "--rate-scale", "2", "--json", str(out), "-q")
    assert p.returncode == 0, p.stderr
    import json

    b = json.loads(out.read_text())
    assert 0 <= b["slo_attainment"] <= b["isolation"]["slo_attainment"] <= 1
    assert set(b["per_class"]) == {"interactive", "batch"}
    p = _cli("whatif", "--policy", "fcfs,edf", "--duration", "20", "--rate-scale", "2",
             "--bound", "--out", str(tmp_path / "w"), "-q")
    assert p.returncode == 0, p.stderr
    assert "bound U" in p.stdout and "gap to U" in p.stdout
    rep = json.loads((tmp_path / "w" / "report.json").read_text())
    u = rep["bound"]["slo_attainment"]
    assert u == b["slo_attainment"]  # the same requests
    for name, m in rep["policies"].items():
        assert m["gap_to_bound"] == pytest.approx(u - m["slo_attainment"])
        assert m["gap_to_bound"] >= 0, name
        for c in ("interactive", "batch"):
            assert rep["bound"]["per_class"][c]["slo_attainment"] >= \
                m["per_class"][c]["slo_attainment"]


def test_kv_capacity_charge_hand_worked():
    """Three 10,000-token prompts of llama-3.1-8b on one A10 (46,208 KV tokens), a TTFT
    target far away and a short drain, so that only the work before the run's end matters.

    Decoding 399 tokens reads ``kv = 399·10,000 + 399·398/2`` KV tokens; an iteration lasts
    at least ``overhead + m0 + m_kv·KV`` and holds at most 46,208 KV tokens, so each decode
    costs at least ``((overhead + m0)/46,208 + m_kv)·kv`` ≈ 4.4 s. The drain makes the run
    1.5 such decodes long: U = 1/3, where the compute and per-seat charges (2.7 s and 3.0 s)
    would allow 2/3."""
    fleet = _fleet([{"gpu": "A10", "model": "llama-3.1-8b", "count": 1}])
    im = iteration_model(fleet.catalog, "llama-3.1-8b", "A10", 1, fleet.perf)
    eng = fleet.engine
    cap = fleet.catalog.kv_capacity_tokens("llama-3.1-8b", "A10", 1)
    k_tok = (cap // eng.block_size) * eng.block_size
    p, o = 10_000, 400
    n_dec = o - 1
    kv = n_dec * p + n_dec * (n_dec - 1) / 2
    kv_charge = ((im.overhead_s + im.m0) / k_tok + im.m_kv) * kv
    per_tok = im.c_tok + im.overhead_s / eng.max_num_batched_tokens
    compute = per_tok * (p + n_dec)
    longest = im.iteration_s(eng.max_num_batched_tokens, cap, eng.max_num_seqs) + im.overhead_s
    drain = 1.5 * kv_charge - longest  # the run: last arrival + drain + one last iteration
    assert 2 * compute < drain + longest < 2 * kv_charge  # only the KV charge bites
    wl = _workload({"batch": {"ttft_s": 100.0, "share": 1}}, {"llama-3.1-8b": 1.0})
    spec = [(0.0, "llama-3.1-8b", "batch", p, o) for _ in range(3)]
    res = compute_bound(_fresh(spec, wl), wl, fleet, drain_s=drain)
    assert res.isolation == 1.0
    assert res.num_on_time_max == 1
    for name in ("fcfs", "edf"):
        m = run_policy(name, fleet, wl, _fresh(spec, wl), drain_s=drain,
                       track_rwt=False).metrics
        assert res.slo_attainment >= m["slo_attainment"], name


def test_windows_do_not_reach_into_the_drain():
    """100 prompts of 6,000 tokens in 5 s, each due within 10 s, on one A10, with an hour of
    drain: only about 60 prefills fit before the last deadline. (Widening a window into the
    tail slot, the drain, used to let all of them fit: U was 100%.)"""
    fleet = _fleet([{"gpu": "A10", "model": "llama-3.2-1b", "count": 1}])
    wl = _workload({"batch": {"ttft_s": 10.0, "share": 1}}, {"llama-3.2-1b": 1.0})
    spec = [(round(0.05 * k, 3), "llama-3.2-1b", "batch", 6000, 5) for k in range(100)]
    res = compute_bound(_fresh(spec, wl), wl, fleet, drain_s=3600.0)
    im = iteration_model(fleet.catalog, "llama-3.2-1b", "A10", 1, fleet.perf)
    per = 6000 * (im.c_tok + im.overhead_s / fleet.engine.max_num_batched_tokens)
    assert res.isolation == 1.0
    assert res.num_on_time_max <= math.ceil(15.0 / per) + 2
    assert res.slo_attainment < 0.8
    for name in POLICIES:
        m = run_policy(name, fleet, wl, _fresh(spec, wl), drain_s=3600.0,
                       track_rwt=False).metrics
        assert res.slo_attainment >= m["slo_attainment"], name


def test_cli_time_limit_default_is_20_s():
    p = _cli("bound", "--help")
    assert p.returncode == 0
    assert "--time-limit" in p.stdout and "20.0" in p.stdout
