"""Capacity planning: the cheapest fleet (GPU types, counts and initial model placement) whose
what-if run meets per-class SLO attainment targets on a workload.

The search space: for every model of the workload, a count of instances on each allowed GPU
type (each instance holding the model at its smallest fitting tensor-parallel degree), at most
``max_gpus_per_type`` GPUs of a type in all. Candidates come in order of cost per hour (then
fewer GPUs, then name), so the first candidate whose what-if run meets every target is the
cheapest fleet of the space that does, given that every cheaper candidate was either run and
missed, or pruned.

Pruning (``FluidEstimate``) drops, before any run:
- an option (model on a GPU type) that alone could not meet a class's target even on an idle
  GPU: prompts whose prefill is longer than the class's TTFT target, or a decode step longer
  than its TPOT target;
- a candidate whose instances of some model cannot, at their best batch and full utilisation,
  do the work of that model's requests due by a class's deadline (the work of every class with
  a TTFT target at or under it, scaled by its attainment target) within the trace's span plus
  that deadline. The estimate is optimistic (best batch, no queueing, no swaps), so what it
  prunes would miss; ``margin`` keeps a candidate whose estimate is within that fraction.

What-if runs go to local processes (``LocalRunner``, concurrent.futures) or a Ray cluster
(``RayRunner``); both return results by candidate, so the answer does not depend on where or
in which order runs finish. Costs are integer micro-dollars per hour, so ties are exact.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from qlm_opt.catalog import Catalog, parse_toml_as
from qlm_opt.config import EngineSection, FleetFile, Workload
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.errors import ConfigError
from qlm_opt.whatif.workload import Trace, build_requests, synthetic_trace

log = logging.getLogger(__name__)

MICRO = 1_000_000  # micro-dollars per dollar


# -- prices -------------------------------------------------------------------------------------
class _PricesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    currency: str = "USD"
    source: str | None = None
    gpu_hour: dict[str, float] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class Prices:
    """Price of one GPU-hour per GPU type."""

    gpu_hour: dict[str, float]
    currency: str = "USD"
    source: str = ""

    @classmethod
    def load(cls, path: Path | str) -> Prices:
        data = parse_toml_as(_PricesFile, Path(path))
        for g, p in data.gpu_hour.items():
            if not (p > 0 and math.isfinite(p)):
                raise ConfigError(f"{path}: field 'gpu_hour.{g}': price must be > 0, got {p}")
        return cls(dict(data.gpu_hour), data.currency, data.source or str(path))

    def micro_per_hour(self, gpu: str) -> int:
        try:
            return int(round(self.gpu_hour[gpu] * MICRO))
        except KeyError:
            raise ConfigError(
                f"no price for GPU type '{gpu}' in {self.source} "
                f"(has: {', '.join(sorted(self.gpu_hour))})"
            ) from None


def default_prices_path() -> Path:
    from qlm_opt.config import example_path

    return example_path("prices.toml")


# -- targets ------------------------------------------------------------------------------------
def parse_class_targets(text: str | None, classes: list[str], default: float) -> dict[str, float]:
    """``interactive=0.99,batch=0.999`` over a default target for every class."""
    if not 0 < default <= 1:
        raise ConfigError(f"--target must be in (0, 1], got {default}")
    out = {c: default for c in classes}
    if not text:
        return out
    for part in text.split(","):
        if not part.strip():
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep:
            raise ConfigError(f"--class-target: expected CLASS=FRACTION, got {part.strip()!r}")
        if name not in out:
            raise ConfigError(
                f"--class-target: unknown class {name!r} (workload has: {', '.join(classes)})"
            )
        try:
            v = float(val)
        except ValueError:
            raise ConfigError(f"--class-target: {name}: not a number: {val.strip()!r}") from None
        if not 0 < v <= 1:
            raise ConfigError(f"--class-target: {name}: target must be in (0, 1], got {v}")
        out[name] = v
    return out


# -- search space -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Option:
    """One way to host a model: an instance of ``tp`` GPUs of type ``gpu``, and what the fluid
    estimate says one such instance can do for this workload."""

    model: str
    gpu: str
    tp: int
    ep: int
    micro_per_hour: int  # price of the instance (tp GPUs), micro-dollars per hour
    batch: int  # best decode batch the estimate assumes
    request_s: float  # instance-seconds one request of the model's mix costs (mean)
    # SLO class -> instance-seconds of the work that must be done by that class's deadline
    # horizon (tighter classes included, each scaled by its target)
    due_work_s: dict[str, float] = field(default_factory=dict)

    @property
    def rate_per_s(self) -> float:
        """Requests per second one instance sustains at full utilisation (fluid)."""
        return 1.0 / self.request_s if self.request_s > 0 else math.inf


@dataclass(frozen=True, slots=True)
class Candidate:
    """A fleet: (model, gpu, tp, count) groups, sorted; its cost and GPU count."""

    groups: tuple[tuple[str, str, int, int], ...]
    micro_per_hour: int
    num_gpus: int

    @property
    def cost_per_hour(self) -> float:
        return self.micro_per_hour / MICRO

    @property
    def key(self) -> tuple:
        return (self.micro_per_hour, self.num_gpus, self.groups)

    @property
    def label(self) -> str:
        return " + ".join(f"{n}x{g}" + (f"(tp{tp})" if tp > 1 else "") + f":{m}"
                          for m, g, tp, n in self.groups)

    def gpus_by_type(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _m, g, tp, n in self.groups:
            out[g] = out.get(g, 0) + tp * n
        return dict(sorted(out.items()))

    def fleet_dict(self, base: FleetFile, name: str = "capacity") -> dict:
        """A fleet file (``qlm-opt whatif --fleet``) with every section of ``base`` (engine,
        perf, ...) but its instances."""
        return {
            "name": name,
            **base.model_dump(exclude_none=True, exclude={"name", "instances"}),
            "instances": [{"gpu": g, "model": m, "count": n, "tp": tp}
                          for m, g, tp, n in self.groups],
        }

    def without_one_instance(self) -> list[Candidate]:
        """Every fleet with one instance fewer (the minimality check)."""
        out = []
        for i, (m, g, tp, n) in enumerate(self.groups):
            rest = list(self.groups)
            if n > 1:
                rest[i] = (m, g, tp, n - 1)
            else:
                del rest[i]
            if rest:
                out.append(Candidate(tuple(rest), 0, 0))
        return out


@dataclass(frozen=True, slots=True)
class _ModelChoice:
    """One model's part of a fleet: instance counts per option."""

    micro_per_hour: int
    num_gpus: int
    groups: tuple[tuple[str, str, int, int], ...]
    fluid_miss: str | None  # the class the fluid estimate misses, None when it passes
    fluid_ratio: float  # capacity / need at that class (min over classes)


class FluidEstimate:
    """Per-option throughput and TTFT/TPOT feasibility from the roofline, on the actual
    request list (prompt and output lengths per model and class)."""

    def __init__(self, catalog: Catalog, perf: PerfParams, engine: EngineSection,
                 workload: Workload, requests: list, targets: dict[str, float]) -> None:
        self.catalog = catalog
        self.perf = perf
        self.engine = engine
        self.workload = workload
        self.targets = targets
        arr = np.array([r.arrived_at for r in requests]) if requests else np.zeros(1)
        self.span_s = max(float(arr.max() - arr.min()), 1.0)
        self.by_model: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
        for r in requests:
            self.by_model.setdefault(r.model, {}).setdefault(r.slo_class, ([], []))
            p, o = self.by_model[r.model][r.slo_class]
            p.append(r.prompt_tokens)
            o.append(r.output_tokens)
        for m, per in self.by_model.items():
            for c, (p, o) in per.items():
                per[c] = (np.asarray(p, dtype=float), np.asarray(o, dtype=float))
        # classes by TTFT target, tightest first
        self.class_order = sorted(workload.classes, key=lambda c: workload.classes[c].ttft_s)

    def option(self, model: str, gpu: str, micro_per_gpu_hour: int) -> tuple[Option | None, str]:
        """The option of ``model`` on ``gpu``, or None and why it is excluded."""
        pl = self.catalog.placement(model, gpu)
        if pl is None:
            return None, "does not fit (weights + minimum KV on up to 8 GPUs)"
        im = iteration_model(self.catalog, model, gpu, pl.tp, self.perf)
        per = self.by_model.get(model, {})
        p_all = np.concatenate([p for p, _ in per.values()])
        o_all = np.concatenate([o for _, o in per.values()])
        mean_p, mean_o = float(p_all.mean()), float(o_all.mean())
        # best decode batch: KV of the mean request, vLLM's seat limit, the tightest TPOT
        batch = max(1, min(self.engine.max_num_seqs,
                           int(pl.kv_capacity_tokens // max(mean_p + mean_o, 1.0))))
        tpots = [self.workload.classes[c].tpot_s for c in per
                 if self.workload.classes[c].tpot_s is not None]

        def step_s(b: int) -> float:
            return im.iteration_s(b, int(b * (mean_p + mean_o / 2)), b)

        if tpots:
            tpot = min(tpots)
            if step_s(1) > tpot:
                return None, f"a decode step ({1000 * step_s(1):.1f} ms) exceeds TPOT {tpot} s"
            lo, hi = 1, batch
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if step_s(mid) <= tpot else (lo, mid - 1)
            batch = lo
        # Optimistic work per request: its compute, or its share of decode steps, whichever
        # is larger (prefill rides along decode steps in chunked prefill).
        decode_per_tok_s = step_s(batch) / batch

        def work_s(p: np.ndarray, o: np.ndarray) -> np.ndarray:
            return np.maximum(im.c_tok * (p + o), o * decode_per_tok_s)

        chunk = self.engine.max_num_batched_tokens
        due: dict[str, float] = {}
        for c in self.class_order:
            if c not in per:
                continue
            cls = self.workload.classes[c]
            p, o = per[c]
            # unloaded TTFT: chunked prefill, each chunk an iteration
            n_chunks = np.ceil(np.maximum(p, 1) / chunk)
            ttft = (n_chunks * im.overhead_s + np.maximum(im.c_tok * p, n_chunks * im.m0)
                    + im.request_overhead_s)
            ok = float(np.mean(ttft <= cls.ttft_s))
            if ok < self.targets[c]:
                return None, (f"class {c}: only {100 * ok:.1f}% of prompts can prefill within "
                              f"{cls.ttft_s} s on an idle instance (target "
                              f"{100 * self.targets[c]:.1f}%)")
        for c in self.class_order:
            if c not in per:
                continue
            t_c = self.workload.classes[c].ttft_s
            due[c] = sum(self.targets[c2] * float(work_s(*per[c2]).sum())
                         for c2 in per if self.workload.classes[c2].ttft_s <= t_c)
        request_s = float(work_s(p_all, o_all).mean())
        return Option(model, gpu, pl.tp, pl.ep, micro_per_gpu_hour * pl.tp, batch, request_s,
                      due), ""

    def ratio(self, model: str, counts: list[tuple[Option, int]]) -> tuple[float, str | None]:
        """min over classes of (fluid capacity / due work) for these instances of ``model``,
        and the class where it is smallest."""
        worst, worst_c = math.inf, None
        for c in self.class_order:
            t_c = self.workload.classes[c].ttft_s
            cap = sum(n * (self.span_s + t_c) / o.due_work_s[c]
                      for o, n in counts if n and o.due_work_s.get(c, 0) > 0)
            if any(o.due_work_s.get(c, 0) > 0 for o, _ in counts) and cap < worst:
                worst, worst_c = cap, c
        return worst, worst_c


class SearchSpace:
    """Candidates in cost order, with or without fluid pruning."""

    def __init__(self, options: dict[str, list[Option]], fluid: FluidEstimate,
                 max_gpus_per_type: dict[str, int], margin: float) -> None:
        self.options = options
        self.fluid = fluid
        self.max_gpus_per_type = max_gpus_per_type
        self.margin = margin
        self.models = sorted(options)
        self.choices: dict[str, list[_ModelChoice]] = {}
        for m in self.models:
            opts = options[m]
            ranges = [range(max_gpus_per_type[o.gpu] // o.tp + 1) for o in opts]
            cs = []
            for vec in itertools.product(*ranges):
                if not any(vec):
                    continue
                if any(sum(n * o.tp for n, o in zip(vec, opts) if o.gpu == g)
                       > max_gpus_per_type[g] for g in {o.gpu for o in opts}):
                    continue
                pairs = list(zip(opts, vec))
                ratio, worst = fluid.ratio(m, pairs)
                cs.append(_ModelChoice(
                    sum(n * o.micro_per_hour for o, n in pairs),
                    sum(n * o.tp for o, n in pairs),
                    tuple((m, o.gpu, o.tp, n) for o, n in pairs if n),
                    None if ratio >= 1.0 - margin else worst, ratio,
                ))
            cs.sort(key=lambda c: (c.micro_per_hour, c.num_gpus, c.groups))
            self.choices[m] = cs

    def size(self, pruned: bool) -> int:
        """Candidates in the space: a count over GPUs used per type (exact, the cap on GPUs
        per type across models included), or the product of the models' choices (an upper
        bound) when that count would take too long."""
        gpus = sorted(self.max_gpus_per_type)
        lists = [[c for c in self.choices[m] if not pruned or c.fluid_miss is None]
                 for m in self.models]
        if math.prod(self.max_gpus_per_type[g] + 1 for g in gpus) > 4096:
            return math.prod(len(li) for li in lists)
        states: dict[tuple[int, ...], int] = {(0,) * len(gpus): 1}
        for li in lists:
            uses: dict[tuple[int, ...], int] = {}
            for c in li:
                u = [0] * len(gpus)
                for _m, g, tp, n in c.groups:
                    u[gpus.index(g)] += tp * n
                uses[tuple(u)] = uses.get(tuple(u), 0) + 1
            nxt: dict[tuple[int, ...], int] = {}
            for st, k in states.items():
                for u, j in uses.items():
                    v = tuple(a + b for a, b in zip(st, u))
                    if all(x <= self.max_gpus_per_type[g] for x, g in zip(v, gpus)):
                        nxt[v] = nxt.get(v, 0) + k * j
            states = nxt
        return sum(states.values())

    def candidates(self, pruned: bool) -> Iterator[tuple[Candidate, str | None]]:
        """Every fleet in (cost, GPUs, groups) order, with the fluid miss (``model/class``) of
        the first model that fails the estimate, or None. ``pruned`` skips those that fail."""
        lists = [[c for c in self.choices[m] if not pruned or c.fluid_miss is None]
                 for m in self.models]
        if any(not li for li in lists):
            return
        k = len(lists)

        def cost(ix: tuple[int, ...]) -> int:
            return sum(lists[j][i].micro_per_hour for j, i in enumerate(ix))

        start = (0,) * k
        heap = [(cost(start), start)]
        seen = {start}
        while heap:
            c0 = heap[0][0]
            level: list[tuple[int, ...]] = []
            # Pop the whole cost level (successors may tie), then emit it in key order.
            while heap and heap[0][0] == c0:
                _c, ix = heapq.heappop(heap)
                level.append(ix)
                for j in range(k):
                    if ix[j] + 1 < len(lists[j]):
                        nx = ix[:j] + (ix[j] + 1,) + ix[j + 1:]
                        if nx not in seen:
                            seen.add(nx)
                            heapq.heappush(heap, (cost(nx), nx))
            out = []
            for ix in level:
                parts = [lists[j][i] for j, i in enumerate(ix)]
                groups = tuple(sorted(g for p in parts for g in p.groups))
                cand = Candidate(groups, c0, sum(p.num_gpus for p in parts))
                if any(n > self.max_gpus_per_type[g] for g, n in cand.gpus_by_type().items()):
                    continue
                miss = next((f"{m}/{p.fluid_miss}" for m, p in zip(self.models, parts)
                             if p.fluid_miss is not None), None)
                out.append((cand, miss))
            out.sort(key=lambda t: t[0].key)
            yield from out


# -- what-if runs -------------------------------------------------------------------------------
@dataclass(slots=True)
class RunContext:
    """What every what-if run of a search shares (shipped once per worker)."""

    catalog: Catalog
    workload: Workload
    trace: Trace
    seed: int | None
    policy: str
    drain_s: float
    targets: dict[str, float]
    stop_early: bool = True  # see evaluate_fleet


class _Hopeless(Exception):
    """A run's misses already exceed what some class's target allows."""

    def __init__(self, at: float, missed: dict[str, int]) -> None:
        super().__init__(at)
        self.at = at
        self.missed = missed


class _MissWatch:
    """Counts TTFT misses as simulated time passes each deadline, during the arrivals of a
    run, and stops the run (``_Hopeless``) once a class has missed more requests than its
    target allows: a fleet that has already missed cannot meet it any more, and overloaded
    fleets, the slowest to simulate, are the ones a search rejects."""

    def __init__(self, requests: list, targets: dict[str, float]) -> None:
        self.requests = requests
        self.by_class: dict[str, list] = {}
        for r in requests:
            self.by_class.setdefault(r.slo_class, []).append(r)
        self.allowed = {c: math.floor((1.0 - targets[c]) * len(rs) + 1e-9)
                        for c, rs in self.by_class.items()}
        self.next = {c: 0 for c in self.by_class}
        self.missed = {c: 0 for c in self.by_class}

    def __call__(self, i: int) -> None:
        now = self.requests[i - 1].arrived_at
        for c, rs in self.by_class.items():
            k = self.next[c]
            while k < len(rs) and rs[k].deadline_at < now:
                r = rs[k]
                if r.first_token_at is None or r.first_token_at > r.deadline_at + 1e-9:
                    self.missed[c] += 1
                k += 1
            self.next[c] = k
            if self.missed[c] > self.allowed[c]:
                raise _Hopeless(now, dict(self.missed))


def evaluate_fleet(ctx: RunContext, fleet: dict, stop_early: bool | None = None) -> dict:
    """One what-if run: attainment per class of ``fleet`` (a fleet-file dict).

    ``stop_early``: end the run once a class has missed more TTFT deadlines than its target
    allows; the attainments reported are then upper bounds (``stopped_at_s`` says when).
    None: ``ctx.stop_early``."""
    from qlm_opt.config import Fleet
    from qlm_opt.whatif.run import run_policy

    fl = Fleet(FleetFile.model_validate(fleet), ctx.catalog, source="<capacity>")
    reqs = build_requests(ctx.trace, ctx.workload, ctx.seed)
    if stop_early is None:
        stop_early = ctx.stop_early
    watch = _MissWatch(reqs, ctx.targets) if stop_early else None
    t0 = time.perf_counter()
    try:
        run = run_policy(ctx.policy, fl, ctx.workload, reqs, drain_s=ctx.drain_s,
                         track_rwt=False, on_progress=watch)
    except _Hopeless as h:
        n = {c: len(rs) for c, rs in watch.by_class.items()}
        per_class = {c: (n[c] - h.missed.get(c, 0)) / n[c] if n.get(c) else None
                     for c in ctx.workload.classes}
        return {
            "attainment": per_class,
            "overall": 1.0 - sum(h.missed.values()) / max(1, len(reqs)),
            "missed_classes": [c for c, k in h.missed.items() if k > watch.allowed[c]],
            "meets": False,
            "stopped_at_s": h.at,
            "num_requests": len(reqs),
            "throughput_tokens_per_s": None,
            "num_swaps": None,
            "wall_s": time.perf_counter() - t0,
        }
    m = run.metrics
    per_class = {c: v["slo_attainment"] for c, v in m["per_class"].items()}
    missed = [c for c, a in per_class.items() if a is not None and a < ctx.targets[c]]
    return {
        "attainment": per_class,
        "overall": m["slo_attainment"],
        "missed_classes": missed,
        "meets": not missed,
        "stopped_at_s": None,
        "num_requests": m["num_requests"],
        "throughput_tokens_per_s": m["throughput_tokens_per_s"],
        "num_swaps": m["num_swaps"],
        "wall_s": run.wall_s,
    }


_WORKER_CTX: RunContext | None = None


def _init_worker(ctx: RunContext) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ctx
    logging.getLogger("qlm_opt").setLevel(logging.WARNING)


def _run_in_worker(fleet: dict) -> dict:
    assert _WORKER_CTX is not None
    return evaluate_fleet(_WORKER_CTX, fleet)


class LocalRunner:
    """What-if runs in local processes (concurrent.futures, spawned workers)."""

    name = "local"

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)
        self._pool = None

    def start(self, ctx: RunContext) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(
            "spawn"), initializer=_init_worker, initargs=(ctx,))

    def run(self, fleets: list[dict]) -> Iterator[tuple[int, dict]]:
        from concurrent.futures import as_completed

        futs = {self._pool.submit(_run_in_worker, f): i for i, f in enumerate(fleets)}
        for fut in as_completed(futs):
            yield futs[fut], fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a host:port nobody listens at (Ray itself waits minutes)."""
    import socket

    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and other forms Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ConfigError(f"cannot reach Ray at {address!r}: {e.strerror or e}") from None


def _ray_evaluate(ctx: RunContext, fleet: dict) -> dict:
    return evaluate_fleet(ctx, fleet)


class RayRunner:
    """What-if runs as Ray tasks (one CPU each). ``address``: a cluster (``auto``,
    ``ray://host:10001``, ``host:6379``) or None for a local Ray started here (or the one this
    process already started). Cluster nodes need qlm-opt installed (``pip install
    qlm-opt[cluster]``)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus
        self._started = False
        self._ctx_ref = None
        self._remote = None

    @property
    def workers(self) -> int:
        import ray

        return int(ray.cluster_resources().get("CPU", 1))

    def start(self, ctx: RunContext) -> None:
        try:
            import ray
        except ImportError:
            raise ConfigError("--ray-address needs Ray: pip install 'qlm-opt[cluster]'") from None
        if not ray.is_initialized():
            if self.address:
                check_reachable(self.address)
            kw = {"include_dashboard": False, "log_to_driver": False}
            try:
                if self.address:
                    ray.init(address=self.address, **kw)
                else:
                    ray.init(num_cpus=self.num_cpus, **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                msg = " ".join(str(e).split())[:200]
                raise ConfigError(f"cannot reach Ray at {self.address!r}: {msg}") from None
            self._started = True
        self._ctx_ref = ray.put(ctx)
        self._remote = ray.remote(num_cpus=1)(_ray_evaluate)

    def run(self, fleets: list[dict]) -> Iterator[tuple[int, dict]]:
        import ray

        refs = {self._remote.remote(self._ctx_ref, f): i for i, f in enumerate(fleets)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for r in done:
                yield refs[r], ray.get(r)

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


# -- the search ---------------------------------------------------------------------------------
@dataclass(slots=True)
class CapacityResult:
    """What ``search`` found; ``report`` is the JSON-ready summary."""

    answer: Candidate | None
    answer_result: dict | None
    report: dict
    fleet: dict | None  # the fleet file of the answer


def build_space(catalog: Catalog, workload: Workload, requests: list, gpus: list[str],
                prices: Prices, targets: dict[str, float], base: FleetFile,
                max_gpus_per_type: int, margin: float) -> tuple[SearchSpace, list[dict]]:
    """Options per model (excluded ones with reasons) and the search space."""
    for g in gpus:
        catalog.gpu(g)
        prices.micro_per_hour(g)
    calibration = None
    if base.perf.calibration:
        from qlm_opt.engines.calibration import Calibration

        calibration = Calibration.load(Path(base.perf.calibration))
    perf = PerfParams(mfu=base.perf.mfu, mbu=base.perf.mbu,
                      overhead_s=base.perf.overhead_ms / 1000.0,
                      tp_efficiency=base.perf.tp_efficiency, calibration=calibration)
    fluid = FluidEstimate(catalog, perf, base.engine, workload, requests, targets)
    models = sorted({r.model for r in requests})
    options: dict[str, list[Option]] = {}
    excluded: list[dict] = []
    for m in models:
        catalog.model(m)
        opts = []
        for g in gpus:
            o, why = fluid.option(m, g, prices.micro_per_hour(g))
            if o is None:
                excluded.append({"model": m, "gpu": g, "reason": why})
            else:
                opts.append(o)
        if not opts:
            reasons = "; ".join(f"{e['gpu']}: {e['reason']}" for e in excluded
                                if e["model"] == m)
            raise ConfigError(f"model '{m}' has no usable GPU type among {', '.join(gpus)} "
                              f"({reasons})")
        options[m] = opts
    caps = {g: max_gpus_per_type for g in gpus}
    return SearchSpace(options, fluid, caps, margin), excluded


def search(
    catalog: Catalog,
    workload: Workload,
    trace: Trace | None,
    gpus: list[str],
    prices: Prices,
    targets: dict[str, float],
    runner,
    policy: str = "qlm",
    seed: int | None = None,
    base: FleetFile | None = None,
    max_gpus_per_type: int = 8,
    margin: float = 0.1,
    max_runs: int = 200,
    drain_s: float = 3600.0,
    prune: bool = True,
    stop_early: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> CapacityResult:
    """Find the cheapest fleet meeting ``targets``; see the module docstring.

    Candidates are run in batches of the runner's worker count, in cost order; the answer is
    the first candidate in that order that meets every target, so it is the same whatever
    the batch size, runner or completion order. ``max_runs`` caps the what-if runs;
    ``stop_early`` ends a run once it has missed a target (see ``evaluate_fleet``).
    """
    t0 = time.perf_counter()
    base = base or FleetFile(instances=[{"gpu": gpus[0]}])
    # fit and KV capacity as the fleets' engines will see them
    catalog = Catalog(catalog.models, catalog.gpus,
                      gpu_memory_utilization=base.engine.gpu_memory_utilization,
                      activation_reserve_bytes=catalog.activation_reserve_bytes,
                      min_kv_tokens=catalog.min_kv_tokens)
    workload.check_models(catalog)
    if trace is None:
        trace = synthetic_trace(workload, seed)
    requests = build_requests(trace, workload, seed)
    if not requests:
        raise ConfigError("the workload has no requests (check duration_s and the trace)")
    space, excluded = build_space(catalog, workload, requests, gpus, prices, targets, base,
                                  max_gpus_per_type, margin)
    ctx = RunContext(catalog, workload, trace, seed, policy, drain_s, targets, stop_early)
    runner.start(ctx)
    num_workers = runner.workers
    evaluated: list[tuple[Candidate, dict]] = []
    pruned_before: list[tuple[Candidate, str]] = []
    answer: tuple[Candidate, dict] | None = None
    total = min(max_runs, space.size(pruned=prune))
    try:
        gen = space.candidates(pruned=False)
        batch_size = max(1, num_workers)
        exhausted = False
        while answer is None and not exhausted and len(evaluated) < max_runs:
            batch: list[Candidate] = []
            while len(batch) < min(batch_size, max_runs - len(evaluated)):
                nxt = next(gen, None)
                if nxt is None:
                    exhausted = True
                    break
                cand, miss = nxt
                if prune and miss is not None:
                    pruned_before.append((cand, miss))
                    continue
                batch.append(cand)
            if not batch:
                break
            fleets = [c.fleet_dict(base, name=f"capacity-{i}") for i, c in enumerate(batch)]
            results: dict[int, dict] = {}
            for i, res in runner.run(fleets):
                results[i] = res
                if progress:
                    progress(len(evaluated) + len(results), total, batch[i].label)
            for i, cand in enumerate(batch):
                evaluated.append((cand, results[i]))
                if answer is None and results[i]["meets"]:
                    answer = (cand, results[i])
    finally:
        runner.close()
    wall = time.perf_counter() - t0
    return _result(space, excluded, evaluated, pruned_before, answer, targets, workload, trace,
                   requests, policy, seed, runner.name, num_workers, prune, margin, max_runs,
                   wall, base, prices)


def exhaustive_position(space: SearchSpace, answer: Candidate) -> int:
    """Runs an unpruned search of the same space makes to reach ``answer`` (its 1-based
    position in cost order): what pruning saved, if every cheaper fleet misses."""
    for i, (cand, _miss) in enumerate(space.candidates(pruned=False), start=1):
        if cand.key == answer.key:
            return i
    return 0


def _result(space, excluded, evaluated, pruned_before, answer, targets, workload, trace,
            requests, policy, seed, executor, num_workers, prune, margin, max_runs, wall,
            base, prices) -> CapacityResult:
    def row(c: Candidate, r: dict) -> dict:
        return {"fleet": c.label, "cost_per_hour": c.cost_per_hour, "num_gpus": c.num_gpus,
                "gpus": c.gpus_by_type(), "attainment": r["attainment"],
                "overall": r["overall"], "missed_classes": r["missed_classes"],
                "meets": r["meets"], "stopped_at_s": r["stopped_at_s"],
                "wall_s": r["wall_s"]}

    ans_key = answer[0].key if answer else None
    cheaper_missed = [row(c, r) for c, r in evaluated
                      if not r["meets"] and (ans_key is None or c.key < ans_key)]
    pruned_cheaper = [{"fleet": c.label, "cost_per_hour": c.cost_per_hour,
                       "fluid_miss": miss}
                      for c, miss in pruned_before if ans_key is None or c.key < ans_key]
    opts = {m: [{"gpu": o.gpu, "tp": o.tp, "ep": o.ep,
                 "cost_per_hour": o.micro_per_hour / MICRO, "batch": o.batch,
                 "requests_per_s": o.rate_per_s} for o in os_]
            for m, os_ in space.options.items()}
    runs_to_answer = (sum(1 for c, _ in evaluated if c.key <= ans_key) if ans_key
                      else len(evaluated))
    report = {
        "answer": ({**row(*answer), "instances": [
            {"model": m, "gpu": g, "tp": tp, "count": n} for m, g, tp, n in answer[0].groups]}
            if answer else None),
        "targets": targets,
        "policy": policy,
        "seed": workload.data.seed if seed is None else seed,
        "workload": workload.name,
        "trace": trace.source,
        "num_requests": len(requests),
        "span_s": space.fluid.span_s,
        "prices": {"currency": prices.currency, "source": prices.source,
                   "gpu_hour": prices.gpu_hour},
        "cheaper_missed": cheaper_missed,
        "cheaper_pruned": pruned_cheaper[:200],
        "num_cheaper_pruned": len(pruned_cheaper),
        "evaluated": [row(c, r) for c, r in evaluated],
        "options": opts,
        "excluded_options": excluded,
        "search": {
            "executor": executor,
            "workers": num_workers,
            "pruning": "fluid" if prune else "none",
            "margin": margin,
            "max_runs": max_runs,
            "runs": len(evaluated),
            "runs_to_answer": runs_to_answer,
            "space_size": space.size(pruned=False),
            "space_size_after_pruning": space.size(pruned=True),
            "exhaustive_runs_to_answer": (exhaustive_position(space, answer[0])
                                          if answer else None),
            "wall_s": wall,
        },
    }
    fleet = answer[0].fleet_dict(base, name="capacity") if answer else None
    return CapacityResult(answer[0] if answer else None, answer[1] if answer else None,
                          report, fleet)


# -- output -------------------------------------------------------------------------------------
def fleet_toml(fleet: dict, header: str) -> str:
    import tomli_w

    body = tomli_w.dumps(fleet)
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + body


def plot_frontier(report: dict, path: Path) -> Path:
    """Cost per hour against attainment of every fleet run: one marker per class, the targets,
    the cheapest fleet that meets them, and the frontier (best worst-class margin so far)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(report["evaluated"], key=lambda r: r["cost_per_hour"])
    targets = report["targets"]
    fig, ax = plt.subplots(figsize=(11, 4.8))
    markers = "os^Dv<>"
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, c in enumerate(targets):
        color = colors[k % len(colors)]
        for stopped in (False, True):
            sel = [r for r in rows if r["attainment"].get(c) is not None
                   and (r.get("stopped_at_s") is not None) == stopped]
            if not sel:
                continue
            ax.scatter([r["cost_per_hour"] for r in sel],
                       [100 * r["attainment"][c] for r in sel],
                       marker=markers[k % len(markers)], s=28, alpha=0.8,
                       facecolors="none" if stopped else color, edgecolors=color,
                       label=f"{c}" + (" (run stopped once missed: at most)" if stopped
                                       else " attainment"))
        ax.axhline(100 * targets[c], linestyle="--", linewidth=0.9, color=color,
                   label=f"{c} target")
    # frontier: the best worst-class attainment/target ratio reached at or under each cost
    best = -math.inf
    fx, fy = [], []
    for r in rows:
        if r.get("stopped_at_s") is not None:
            continue  # its attainments are only upper bounds
        vals = [(r["attainment"][c] / targets[c], r["attainment"][c]) for c in targets
                if r["attainment"].get(c) is not None]
        if not vals:
            continue
        v, att = min(vals)
        if v > best:  # plotted at the attainment of the class furthest below its target
            best = v
            fx.append(r["cost_per_hour"])
            fy.append(100 * att)
    if fx:
        fx.append(rows[-1]["cost_per_hour"])
        fy.append(fy[-1])
        ax.step(fx, fy, where="post", color="gray", linewidth=1.2,
                label="frontier: best worst class (vs its target) so far")
    ans = report.get("answer")
    if ans:
        ax.axvline(ans["cost_per_hour"], color="green", linewidth=1.2,
                   label=f"cheapest meeting: ${ans['cost_per_hour']:.2f}/h")
    ax.set_xlabel(f"fleet cost ({report['prices']['currency']} per hour)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_title("Capacity search: cost against attainment")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(result: CapacityResult, out_dir: Path, command: str = "") -> list[Path]:
    """``fleet.toml`` (when found), ``report.json`` and ``frontier.png`` in ``out_dir``."""
    import json

    from qlm_opt.whatif.run import _clean

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    rep = result.report
    if result.fleet is not None:
        a = rep["answer"]
        att = ", ".join(f"{c} {100 * v:.2f}%" for c, v in a["attainment"].items()
                        if v is not None)
        header = (f"Written by `qlm-opt capacity`: the cheapest fleet of the space searched that "
                  f"met the targets.\n{a['fleet']}: {a['num_gpus']} GPUs, "
                  f"{a['cost_per_hour']:.2f} {rep['prices']['currency']}/hour "
                  f"(prices: {rep['prices']['source']}).\n"
                  f"Policy {rep['policy']}, seed {rep['seed']}, workload {rep['workload']}, "
                  f"trace {rep['trace']}: {att}.")
        if command:
            header += f"\n{command}"
        p = out_dir / "fleet.toml"
        p.write_text(fleet_toml(result.fleet, header))
        files.append(p)
    p = out_dir / "report.json"
    p.write_text(json.dumps(_clean(rep), indent=2, sort_keys=True))
    files.append(p)
    if rep["evaluated"]:
        files.append(plot_frontier(rep, out_dir / "frontier.png"))
    return files
