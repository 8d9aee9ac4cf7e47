"""``qlm``: the global queue, the RWT estimator, the CP-SAT planner and the executor.

Every epoch:
  1. snapshot the global queue's groups and the fleet into a ``PlanningProblem`` (integer
     ms): each group's service time on each candidate instance (from the RWT estimator's
     engine model), its time-to-first-token deadline (a *start* deadline, so its end deadline
     differs per instance), each instance's busy-until (the estimated wait at the back of its
     engine; a draining instance is busy until its running work ends plus its swap, a
     swapping one until its swap ends), swap times from the catalog, and *forecast groups*
     for the arrivals expected over the next ``forecast_horizon_s``, with release times;
  2. solve it with CP-SAT (``planner.solve``, preset from ``solver/``), warm-started from the
     previous plan; the EDF plan is the fallback behind the same ``solve()`` (a time-out, or
     a greedy plan with more weight on time), and the cause is counted per epoch;
  3. with ``admission`` (on by default; measured in ``benchmarks/scenarios/README.md``) the
     plan gets its admission caps (``Plan.batch_seats``, ``planner.plan.batch_seat_caps``):
     per instance, the seats the urgent arrivals forecast for it hold on average (arrival
     rate of the classes whose TTFT is within ``ExecutorConfig.urgent_window_s``, split over
     the ready instances holding the model, times the time one holds a seat: mean prompt x
     prefill s per token + mean output x iteration s, the iteration being the decode-only one
     or, if longer, the time per output token observed on finished uninterrupted requests)
     plus ``admission_margin`` Poisson standard deviations are kept from batch work until
     the next epoch, out of the instance's seats (the estimator's, or what its engine holds
     now if more); no urgent forecast, no cap. Classes with a TPOT target add *TPOT caps*
     (``Plan.seat_caps``): an instance whose model had arrivals of such a class within
     ``rate_window_s`` holds at most as many requests (of any class) as keep the engine
     model's time per output token (the decode iteration plus the prefill each admitted
     request brings, spread over its mean output) within ``tpot_headroom`` x the tightest
     target (refreshed every epoch, also when nothing is queued to plan); the estimator and
     the planner count no more seats than that. *KV caps* (``kv_caps``, on by default; the
     executor's ``kv_caps`` and ``kv_tokens``), on every instance whose KV cache, not
     ``max_num_seqs``, binds. The KV cap counts the requests the cache holds at a mean peak
     (``RWTEstimator.kv_peak_seats``), and the batch cap is at most that count. By default
     (``ExecutorConfig.kv_admission = "peak"``) any request also enters only while its
     predicted peak footprint fits in what the cache leaves once the held requests reach
     theirs, and urgent work is held by that test, not by the count; with ``"count"`` the
     count holds all work. Past the test no batch work enters, and urgent work only once it
     has waited ``ExecutorConfig.kv_cap_wait`` of its TTFT budget, so that growing outputs do
     not make the engine preempt running requests and recompute their prompts;
  4. the ``Executor`` applies it: swaps worth their cost in the objective's own units,
     "serve these groups, then swap" sequences, rebalancing that gains, the plan's order
     (groups the plan cannot get on time go behind the others; the scored wait prediction's
     cut-in rate leaves their members out, ``_note_demoted``), the admission caps, and, with
     ``planned_eviction=True`` (off by default: it lost up to 1.33 points on a row of the
     scenario suite), evictions for urgent first groups that pay for their recompute in the
     objective.
Between epochs the executor pulls (under the plan's caps) and steals. The RWT eviction
heuristic (``_maybe_evict``) evicts between epochs; with ``planned_eviction=True`` only
while no plan is current (none yet, or older than two plan periods). The same executor
serves ``qlm-rwt`` (no caps, heuristic eviction). A model no instance holds waits for the
plan to swap it in (the plan weighs its waiting requests against the forecast demand of the
model it displaces); only requests ``cover_late_s`` past their deadline force a swap, so
nothing starves.
Epochs run every ``plan_period_s`` and on events: an urgent arrival predicted to miss its
deadline, a model nobody holds, or capacity freed while groups wait unplaced; at most one per
``min_spacing_s``.

``qlm-true-lengths`` (what-if only) gives the estimator and the planner the true output
lengths: the same planner with perfect length information. It is a reference policy, not a
bound: it can score below ``qlm`` (better length estimates do not make a myopic plan optimal).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from qlm_opt.core.executor import ExecutorConfig, group_weight
from qlm_opt.planner import PlanGroup, PlanInstance, PlanningProblem, load_preset, solve
from qlm_opt.planner.plan import batch_seat_caps
from qlm_opt.planner.problem import REQUEST_WEIGHT
from qlm_opt.policies.qlm_rwt import QLMRWTPolicy
from qlm_opt.core.queue import UNPLACED
from qlm_opt.core.instance import InstanceState, holders

if TYPE_CHECKING:
    from qlm_opt.planner import Plan
    from qlm_opt.core.instance import Instance
    from qlm_opt.core.runtime import Runtime

log = logging.getLogger(__name__)


class QLMPolicy(QLMRWTPolicy):
    """See the module docstring."""

    name = "qlm"
    default_refill_after = 1.25

    def __init__(
        self,
        workload=None,
        fleet=None,
        preset: str = "balanced",
        plan_period_s: float = 5.0,
        min_spacing_s: float = 2.0,
        forecast_horizon_s: float = 30.0,
        forecast_chunks: int = 3,
        forecast_weight: float = 0.5,
        swap_util_high: float = 0.85,
        swap_util_low: float = 0.6,
        swap_gating: bool = True,
        aggregate_min_slack_s: float = 30.0,
        aggregate_level_ratio: float = 0.1,
        aggregate_max_size: int = 256,
        cover_late_s: float = 30.0,
        admission: bool = True,
        admission_margin: float = 1.0,
        tpot_caps: bool = True,
        tpot_headroom: float = 1.0,
        kv_caps: bool = True,
        planned_eviction: bool = False,
        clairvoyant: bool = False,
        executor: ExecutorConfig | None = None,
        **kw,
    ) -> None:
        super().__init__(workload=workload, clairvoyant=clairvoyant, executor=executor, **kw)
        if admission_margin < 0:
            raise ValueError(f"admission_margin must be >= 0, got {admission_margin}")
        # plan-set admission caps (module docstring, step 3); off: batch takes every seat
        self.admission = admission
        self.admission_margin = admission_margin
        if not 0 < tpot_headroom <= 1:
            raise ValueError(f"tpot_headroom must be in (0, 1], got {tpot_headroom}")
        # TPOT caps (``_tpot_caps``): a cap keeps the predicted time per output token within
        # this share of the tightest TPOT target
        self.tpot_caps = tpot_caps
        # KV caps (``RWTEstimator.kv_peak_seats``): no more requests than the KV cache holds
        # at their peak, so that growing outputs do not make the engine preempt
        self.kv_caps = kv_caps
        self.tpot_headroom = tpot_headroom
        # evictions from the plan (Executor.apply); the RWT heuristic only without a plan
        self.planned_eviction = planned_eviction
        self.executor_config.planned_evict = planned_eviction
        self.preset = load_preset(preset) if isinstance(preset, str) else preset
        self.plan_period_s = plan_period_s
        self.min_spacing_s = min_spacing_s
        self.forecast_horizon_s = forecast_horizon_s
        self.forecast_chunks = forecast_chunks
        self.forecast_weight = forecast_weight
        self.swap_util_high = swap_util_high
        self.swap_util_low = swap_util_low
        self.swap_gating = swap_gating
        # queue groups due later than this are planned in aggregates whose deadlines lie
        # within `aggregate_level_ratio` of each other, up to `aggregate_max_size` requests
        self.aggregate_min_slack_s = aggregate_min_slack_s
        self.aggregate_level_ratio = aggregate_level_ratio
        self.aggregate_max_size = aggregate_max_size
        self._members: dict[str, list] = {}  # planning group id -> queue groups
        self.cover_late_s = cover_late_s
        self._cover_check: set[str] = set()  # models with a coverage re-check scheduled
        self.last_plan: Plan | None = None
        self._last_plan_at = -math.inf
        self._plan_pending = False
        self._solving = False  # a live solve is running on a worker thread
        self.solve_ms: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.fallback_causes: Counter[str] = Counter()  # cause -> epochs (Plan.fallback_cause)
        self.num_epochs = 0  # epochs planned (each gives one plan)
        self.epochs_skipped = 0  # live: triggers that found a solve still running
        self.epoch_triggers: Counter[str] = Counter()
        self._class_weight: dict[str, float] = {}
        # model -> observed seconds per output token of finished requests (EWMA): how long
        # a request holds its seat once decoding, prefill chunks of others included
        self._tpot_seen: dict[str, float] = {}
        self._tighter_cache: frozenset[str] | None = None  # ``_tighter_classes``
        self._tpot_cache: dict[str, float] | None = None  # ``_tpot_of``

    def make_deterministic(self) -> None:
        """What-if runs: reproducible solver search (see ``SolverPreset.deterministic``)."""
        self.preset = dataclasses.replace(self.preset, deterministic=True)

    @classmethod
    def from_context(cls, workload=None, fleet=None, **kw) -> QLMPolicy:
        return cls(workload=workload, fleet=fleet, **kw)

    def bind(self, rt: Runtime) -> None:
        super().bind(rt)
        self.executor.predicts_miss = self._predicts_miss
        if self.workload is not None:
            self._class_weight = {c.name: c.weight for c in self.workload.classes.values()}

    # -- events ------------------------------------------------------------------------------
    def on_epoch(self) -> None:
        super().on_epoch()
        if self.rt.now() - self._last_plan_at >= self.plan_period_s:
            self._replan("period")

    def on_arrival(self, req) -> None:
        super().on_arrival(req)
        info = req._sched
        if (
            info is not None
            and info.pred_mean_s is not None
            and info.placed_at is not None
            and info.placed_at + info.pred_mean_s > req.deadline_at
            and self._ttft_of(req) < self.plan_period_s * 4
        ):
            self._request_plan("urgent_miss")

    def on_finished(self, req) -> None:
        super().on_finished(req)
        if (req.first_token_at is not None and req.completed_at is not None
                and req.num_generated > 1 and not req.num_preemptions
                and not req.num_evictions and not req.num_failures):
            # only uninterrupted decodes: a preempted or evicted request's gap would count
            # its wait to resume as seat time
            tpot = (req.completed_at - req.first_token_at) / (req.num_generated - 1)
            old = self._tpot_seen.get(req.model)
            self._tpot_seen[req.model] = tpot if old is None else old + 0.02 * (tpot - old)
        if self.gq.vq(UNPLACED).num_requests:
            self._request_plan("freed_capacity")

    def _ttft_of(self, req) -> float:
        return req.deadline_at - req.arrived_at

    def _request_plan(self, reason: str) -> None:
        if self._plan_pending:
            return
        now = self.rt.now()
        at = max(now, self._last_plan_at + self.min_spacing_s)
        self._plan_pending = True
        self.rt.host.call_at(at, self._replan, reason)

    # -- the planning epoch ------------------------------------------------------------------
    def _add_plan_group(self, pgroups: list, members: dict, gs: list, out_tokens: float,
                        prompt: int, slack_ms: int, service_of, size: int | None = None,
                        weight: int | None = None) -> None:
        """One planning group for the queue groups ``gs`` (same model and class); ``size``
        and ``weight`` are their summed size and ``group_weight`` when the caller has them."""
        g = gs[0]
        model = g.model
        service = service_of(model, out_tokens, float(prompt))
        if not service:
            return
        gid = str(g.id) if len(gs) == 1 else f"a{g.id}+{len(gs) - 1}"
        if weight is None:
            cw = self._class_weight.get(g.slo_class, 1.0)
            weight = sum(group_weight(x, cw) for x in gs)
        if size is None:
            size = sum(x.size for x in gs)
        # A TTFT deadline: the group must *start* by then, so it may end one service later,
        # on whichever instance serves it.
        pgroups.append(PlanGroup(gid, model, size, weight,
                                 slack_ms + min(service.values()), service,
                                 start_deadline_ms=slack_ms))
        members[gid] = gs

    def _planned_state(self, inst: Instance, now: float) -> tuple[str | None, int, bool]:
        """(model it will hold, ms until it can take new work, whether it may swap) of an
        instance that is not ready: a draining instance first finishes its running requests
        and then swaps, a swapping one finishes its swap. Neither is free capacity."""
        st = inst.engine.stats()
        held = inst.swap_to or inst.model
        left_s = max(0.0, st.busy_until_at - now)
        if inst.state == InstanceState.DRAINING:
            running = inst.engine.running_requests()
            if running:
                _, iter_s, _ = self.est.basics(inst, st)
                rest = max(max(self.est.stats_for(inst.model, self._bucket(r)).mean
                               - r.num_generated, 1.0) for r in running)
                left_s = rest * iter_s
            left_s += self.rt.swap_time_s(inst, held) if held else 0.0
        return held, int(left_s * 1000), False

    def snapshot(self, now: float) -> PlanningProblem | None:
        """The planning problem for the current queue and fleet (plain data, integer ms)."""
        rt = self.rt
        groups = [g for g in self.gq.groups.values() if g.size > 0]
        if not groups:
            return None
        insts: dict[int, PlanInstance] = {}
        per_inst: dict[int, tuple] = {}  # id -> (seats, iteration s at S, c_tok, instance)
        models = {g.key[0] for g in groups}
        needy, donors = self._swap_candidates(now, models)
        swap_ms: dict[int, dict] = {}
        for inst in rt.instances:
            if inst.state == InstanceState.DOWN:
                continue  # a dead engine is no capacity until its health check passes
            st = inst.engine.stats()
            if inst.ready:
                held = inst.model
                seats, iter_s, c_tok = self.est.basics(inst, st)
                back = self.est.wait(inst, now, float(st.num_waiting), 0, 0, self._bucket)
                busy_ms = int(back.mean_s * 1000)
                can_swap = (self.executor.can_swap(inst, now) and inst.id in donors
                            and inst.id not in self.executor.swap_after)
            else:
                held, busy_ms, can_swap = self._planned_state(inst, now)
                seats, iter_s, c_tok = float(st.max_num_seqs or 256), None, None
            allowed = frozenset(m for m in (needy & models) | ({held} if held else set())
                                if rt.fleet.can_serve(inst.spec, m))
            insts[inst.id] = PlanInstance(inst.id, inst.spec.gpu, held, busy_ms, can_swap,
                                          allowed)
            per_inst[inst.id] = (seats, iter_s, c_tok, inst)
            # Loading a model costs the same whatever was there before.
            to_ms = {m: int(rt.swap_time_s(inst, m) * 1000) for m in allowed}
            swap_ms[inst.id] = {
                (a, b): ms for b, ms in to_ms.items() for a in (allowed | {held}) if a != b
            }

        # (seats, iteration s, prefill s per token) per (instance, model), fixed for the
        # epoch: computed once, not once per group (hundreds of groups at overload)
        rates: dict[str, list[tuple[int, float, float, float]]] = {}

        def rates_of(model: str) -> list[tuple[int, float, float, float]]:
            out = []
            for iid, (seats, iter_s, c_tok, inst) in per_inst.items():
                pinst = insts[iid]
                if model != pinst.current_model and not (
                    pinst.can_swap and model in pinst.allowed_models
                ):
                    continue
                if iter_s is None or inst.model != model:
                    s, it, ct = self._nominal(inst, model)
                else:
                    s, it, ct = seats, iter_s, c_tok
                out.append((iid, s, it, ct))
            return out

        def service_of(model: str, out_tokens: float, prompt: float) -> dict[int, int]:
            r = rates.get(model)
            if r is None:
                r = rates[model] = rates_of(model)
            return {iid: max(1, int(1000 * (out_tokens * it / s + prompt * ct)))
                    for iid, s, it, ct in r}

        # Queue groups far from their deadline are planned in aggregates of equal (model,
        # class, instance, deadline level): the planner's size follows the number of
        # distinct decisions, not the backlog (an overloaded batch class has hundreds of
        # groups). The aggregate's deadline is its earliest member's (conservative), its size,
        # weight and service the sums. Urgent groups stay apart, for fine placement.
        pgroups: list[PlanGroup] = []
        members: dict[str, list] = {}
        agg: dict[tuple, list] = {}
        min_ms = int(1000 * self.aggregate_min_slack_s)
        aggregate = self.aggregate_min_slack_s > 0
        log_step = math.log(1.0 + self.aggregate_level_ratio)
        max_size = self.aggregate_max_size
        ln = math.log
        # Hundreds to thousands of queue groups at overload, every epoch: what they share is
        # worked out once per epoch. A group none of whose members has generated a token has
        # out_tokens = size copies of max(mu, 1) summed in order, the same float as the sum
        # over its members; its weight follows from its size and class.
        stats_for = self.est.stats_for
        mu_of: dict[tuple[str, int], float] = {}  # (model, bucket) -> mean output tokens
        tokens_of: dict[tuple[float, int], float] = {}  # (mean, size) -> out tokens
        class_weight = self._class_weight
        weight_of: dict[tuple[str, int], int] = {}  # (class, size) -> group_weight
        clairvoyant = self.clairvoyant
        for g in groups:
            model, cls, lb = g.key
            deadline_at = g.deadline_at
            size = g.size
            if clairvoyant:
                out_tokens = float(sum(r.output_tokens - r.num_generated for r in g.requests()))
            else:
                mu = mu_of.get((model, lb))
                if mu is None:
                    mu = mu_of[(model, lb)] = stats_for(model, lb).mean
                if g.has_generated():
                    out_tokens = float(sum(max(mu - r.num_generated, 1.0)
                                           for r in g.requests()))
                else:
                    out_tokens = tokens_of.get((mu, size))
                    if out_tokens is None:
                        out_tokens = tokens_of[(mu, size)] = float(sum([max(mu, 1.0)] * size))
            weight = weight_of.get((cls, size))
            if weight is None:
                weight = weight_of[(cls, size)] = group_weight(g, class_weight.get(cls, 1.0))
            slack_ms = int((deadline_at - now) * 1000)
            if slack_ms >= min_ms and aggregate:
                key = (model, cls, g.instance_id, int(ln(slack_ms) / log_step))
                bucket = agg.get(key)
                if bucket is None:
                    bucket = agg[key] = []
                if not bucket or bucket[-1][1] >= max_size:
                    # groups, size, out tokens, prompt tokens, earliest deadline, weight
                    bucket.append([[], 0, 0.0, 0, math.inf, 0])
                b = bucket[-1]
                b[0].append(g)
                b[1] += size
                b[2] += out_tokens
                b[3] += g.prompt_tokens
                if deadline_at < b[4]:
                    b[4] = deadline_at
                b[5] += weight
                continue
            self._add_plan_group(pgroups, members, [g], out_tokens, g.prompt_tokens,
                                 slack_ms, service_of, size, weight)
        for bucket in agg.values():
            for gs, size, out_tokens, prompt, first_due, weight in bucket:
                slack_ms = int((first_due - now) * 1000)
                self._add_plan_group(pgroups, members, gs, out_tokens, prompt, slack_ms,
                                     service_of, size, weight)
        self._members = members
        pgroups.extend(self._forecast_groups(now, service_of))
        if not pgroups:
            return None
        return PlanningProblem(tuple(pgroups), tuple(insts.values()),
                                swap_ms_by_instance=swap_ms, weights=self.preset.weights)

    def _ensure_swap(self, model: str) -> None:
        """A model no instance holds: the plan decides whether, where and when it is swapped
        in, weighing the waiting requests against the forecast demand of the model it would
        displace (a swap for one urgent request can cost several others). Coverage, an
        immediate swap outside the plan, only keeps requests from starving: the model's
        earliest waiting deadline is ``cover_late_s`` past, so they still complete."""
        rt = self.rt
        now = rt.now()
        if rt.ready_instances(model) or any(i.swap_to == model for i in rt.instances):
            return
        waiting = [g for g in self.gq.vq(UNPLACED).groups.values() if g.model == model]
        due = min((g.deadline_at for g in waiting), default=math.inf)
        cover_at = due + self.cover_late_s
        if now >= cover_at - 1e-6:  # (a re-check at cover_at must cover: no float slack)
            super()._ensure_swap(model)
            return
        self._request_plan("uncovered_model")
        if model not in self._cover_check and due < math.inf:
            self._cover_check.add(model)
            rt.host.call_at(cover_at, self._recheck_cover, model)

    def _recheck_cover(self, model: str) -> None:
        self._cover_check.discard(model)
        if any(g.model == model for g in self.gq.vq(UNPLACED).groups.values()):
            self._ensure_swap(model)

    def _cover_cost(self):
        """Coverage swaps take the instance whose model loses least: the lowest arrival rate
        per instance holding it (the demand forecast the plan uses), then the least load. The
        least-loaded instance alone is often the only holder of a busy model, which then
        needs a swap back at its next arrival (ping-pong)."""
        rt = self.rt
        rates = self._rates(rt.now())
        held = holders(rt.instances)

        def cost(i: Instance) -> tuple:
            load = i.engine.load() + self.gq.vq(i.id).num_requests
            return (rates.get(i.model, 0.0) / held.get(i.model, 1), load, i.id)

        return cost

    def _predicts_miss(self, g, inst: Instance) -> bool:
        """RWT: is the group's head more likely than not to miss its deadline on ``inst``?"""
        now = self.rt.now()
        head = g.members[0][2]
        est = self._wait(inst, g, 0, head.prompt_tokens, now)
        return est.p_miss(g.deadline_at - now) > 0.5

    def _nominal(self, inst: Instance, model: str) -> tuple[float, float, float]:
        """(seats, iteration s at full batch, prefill s per token) of ``model`` on ``inst``
        from the roofline, for instances that do not hold it now."""
        im = self.rt.iteration_model(inst, model)
        fp = self.est.prompt_mean + self.est.model_stats(model).mean / 2
        cap = self.rt.catalog.kv_capacity_tokens(model, inst.spec.gpu, inst.spec.tp)
        s = max(1.0, min(float(inst.engine.config.max_num_seqs), cap / max(fp, 1.0)))
        return s, im.iteration_s(int(s), int(s * fp)), im.c_tok

    def _swap_candidates(self, now: float, queued_models: set[str]) -> tuple[set[str], set[int]]:
        """Which models may gain an instance and which instances may give theirs up.

        A swap is only worth planning where demand says so: a model is *needy* when its
        utilisation (arrival rate over the service rate of the instances holding it) is above
        ``swap_util_high`` or no instance holds it; an instance is a *donor* when its model
        would stay under ``swap_util_low`` without it. This keeps the planner from trading
        instances back and forth as momentary backlogs move."""
        rt = self.rt
        rates = self._rates(now)
        if not self.swap_gating:
            return set(queued_models) | set(rates), {i.id for i in rt.instances}
        mu_cache: dict[str, float] = {}
        cap: dict[str, list[tuple[int, float]]] = {}
        for inst in rt.instances:
            m = inst.model if inst.ready else (inst.swap_to or inst.model)
            if m is None:
                continue
            if m not in mu_cache:
                mu_cache[m] = self.est.model_stats(m).mean
            s, it, ct = self._nominal(inst, m)
            per_req_s = mu_cache[m] * it / s + self.est.prompt_mean * ct
            cap.setdefault(m, []).append((inst.id, 1.0 / max(per_req_s, 1e-9)))
        needy = {m for m in queued_models | set(rates) if m not in cap}
        donors: set[int] = set()
        for m, lst in cap.items():
            total = sum(c for _, c in lst)
            lam = rates.get(m, 0.0)
            if lam / total > self.swap_util_high:
                needy.add(m)
            # At most one donor per model per epoch: two instances that could each leave
            # alone must not both leave at once.
            for iid, c in sorted(lst, key=lambda e: (rt.instances[e[0]].engine.load(), e[0])):
                rest = total - c
                if (lam == 0.0 and m not in queued_models) or (
                    rest > 0 and lam / rest < self.swap_util_low
                ):
                    donors.add(iid)
                    break
        return needy, donors

    def _forecast_groups(self, now: float, service_of) -> list[PlanGroup]:
        """Expected arrivals over the next ``forecast_horizon_s``, per (model, class), in
        ``forecast_chunks`` groups: without them a plan sees only the backlog of the moment
        and swaps models back and forth as backlogs move (rolling-horizon planning)."""
        H = self.forecast_horizon_s
        if H <= 0 or self.forecast_chunks <= 0:
            return []
        out: list[PlanGroup] = []
        span = min(self.rate_window_s, max(now, 1e-9))
        for (model, cls), q in self._arrivals.items():
            rate = self._recent(q, now) / span
            n = rate * H / self.forecast_chunks
            if n < 0.5:
                continue
            size = int(round(n))
            mu = self.est.model_stats(model).mean
            service = service_of(model, size * mu, size * self.est.prompt_mean)
            if not service:
                continue
            ttft_ms = int(1000 * self._ttft.get(cls, 1.0))
            cw = self._class_weight.get(cls, 1.0) * self.forecast_weight
            chunk_ms = int(1000 * H / self.forecast_chunks)
            for k in range(self.forecast_chunks):
                # expected to arrive over [k, k+1) chunks: released at the chunk's start,
                # due to start by its middle arrival's TTFT deadline
                start_by = k * chunk_ms + chunk_ms // 2 + ttft_ms
                out.append(PlanGroup(f"f:{model}:{cls}:{k}", model, size,
                                     max(1, int(round(size * cw * REQUEST_WEIGHT))),
                                     start_by + min(service.values()), service,
                                     release_ms=k * chunk_ms, start_deadline_ms=start_by))
        return out

    def _replan(self, reason: str) -> None:
        self._plan_pending = False
        rt = self.rt
        if self._solving:
            # Live: the previous epoch's solve is still on its worker thread. This one is
            # skipped (and not counted): the next trigger plans from the state then.
            self.epochs_skipped += 1
            return
        now = rt.now()
        self._last_plan_at = now
        for inst in rt.instances:
            if inst.ready:
                self.est.observe_engine(inst)
        pi = self.snapshot(now)
        if pi is None:
            # nothing queued to plan: the TPOT caps still follow the arrivals, so that the
            # first requests of a TPOT class find their engines capped
            if self.admission:
                self.executor.seat_caps, _ = self._refresh_caps(now)
            return
        members = self._members
        self.num_epochs += 1
        self.epoch_triggers[reason] += 1
        # What-if: solved and applied at once, at the epoch's clock time. Live: solved on a
        # worker thread and applied when it arrives, to a state that has moved on meanwhile
        # (the executor skips groups that are gone).
        self._solving = True
        rt.host.offload(solve, (pi, self.preset, self.last_plan),
                        lambda plan: self._apply(plan, pi, reason, members))

    def _apply(self, plan: Plan, pi: PlanningProblem, reason: str,
               members: dict | None = None) -> None:
        """Execute a plan: LSOs through the executor, then place and pull. ``members`` maps
        planning groups to the queue groups they stand for (see ``snapshot``)."""
        self._solving = False
        rt = self.rt
        now = rt.now()
        if self.admission:
            # TPOT and KV caps first: the batch caps come out of the seats they leave
            caps, kv = self._refresh_caps(now)
            plan = plan.replace(batch_seats=self._batch_seats(now, caps, kv), seat_caps=caps)
        self.last_plan = plan
        self.solve_ms.append(plan.solve_ms + plan.build_ms)
        self.statuses[str(plan.status)] += 1
        if plan.fallback_cause is not None:
            self.fallback_causes[plan.fallback_cause] += 1
        counts = self.executor.apply(plan, pi, now, members)
        self._note_demoted()
        for iid in self.executor.evicted_on:
            self.est.invalidate(iid)
        for r in self.executor.requeued:
            g, new = self.gq.requeue(r, now)
        # Groups still unplaced (their instance swaps away) go where the RWT says.
        for g in list(self.gq.vq(UNPLACED).groups.values()):
            if rt.ready_instances(g.model):
                inst = self._choose(g, now)
                self.gq.place(g, inst.id)
        for inst in rt.instances:
            if inst.ready:
                self._pump(inst)
        log.info(
            "epoch %d (%s): %d groups, %s in %.1f ms (build %.1f), objective %d, on time %d, "
            "LSOs %s", self.num_epochs, reason, len(pi.groups), plan.status, plan.solve_ms,
            plan.build_ms, plan.objective, plan.num_on_time, dict(counts) or "{}",
        )

    def _note_demoted(self) -> None:
        """Urgent work the plan cannot get on time goes behind the on-time work in its
        virtual queue (``RequestGroup.tier``, ``Executor.apply``): it no longer cuts in ahead
        of the batch work there, so the scored prediction's cut-in rate leaves it out
        (``_cut_in_per_s(scored=True)``) until a plan puts it back on time. Decisions keep the plain rate: leaving it out of
        them too cost 1.6 points of attainment on a row of the scenario suite (mooncake
        x4.23)."""
        tighter = self._tighter_classes
        if not tighter:
            return
        for g in self.gq.groups.values():
            if g.slo_class not in tighter:
                continue
            if g.tier:
                for _, _, r in g.members:
                    self._demote(r)
            elif self._demoted:  # a later plan put it back on time: it cuts in again
                for _, _, r in g.members:
                    self._undemote(r)

    @property
    def _tighter_classes(self) -> frozenset[str]:
        """Classes some other class's TTFT target is looser than (they cut in under EDF)."""
        got = self._tighter_cache
        if got is None:
            top = max(self._ttft.values(), default=0.0)
            got = self._tighter_cache = frozenset(c for c, t in self._ttft.items() if t < top)
        return got

    def _batch_seats(self, now: float, seat_caps: dict[int, int] | None = None,
                     kv_caps: dict[int, int] | None = None) -> dict[int, int]:
        """Admission caps for this epoch (module docstring, step 3): instance id -> batch
        requests its engine may hold, out of its seats (no more than ``seat_caps``, the
        epoch's TPOT caps, nor ``kv_caps``, its KV caps: an instance with a KV cap and no
        urgent forecast gets the KV cap itself)."""
        window = self.executor.config.urgent_window_s
        span = min(self.rate_window_s, max(now, 1e-9))
        rate: dict[str, float] = {}  # model -> urgent arrivals per second
        for (model, cls), q in self._arrivals.items():
            if self._ttft.get(cls, math.inf) <= window:
                n = self._recent(q, now)
                if n:
                    rate[model] = rate.get(model, 0.0) + n / span
        seats: dict[int, float] = {}
        demand: dict[int, float] = {}  # instance id -> seats urgent arrivals hold there
        for model, lam in rate.items():
            held = [i for i in self.rt.ready_instances(model)
                    if i.id not in self.executor.swap_after]
            if not held:
                continue
            mu = self.est.model_stats(model).mean
            seen = self._tpot_seen.get(model, 0.0)
            for inst in held:
                s, iter_s, c_tok = self.est.basics(inst, inst.engine.stats())
                # a seat is held for the prefill, then one iteration per output token; the
                # iterations also carry other requests' prefill chunks, so the observed time
                # per token is used where it is longer than the decode-only iteration
                iter_s = max(iter_s, seen)
                # the estimator's seats (KV capacity over a mean footprint) undercount an
                # engine whose prompts share cached prefixes: it may hold more right now
                nr, nw, _ = inst.engine.seat_counts()
                seats[inst.id] = max(s, float(nr + nw))
                for caps in (seat_caps, kv_caps):
                    cap = caps.get(inst.id) if caps else None
                    if cap is not None:
                        seats[inst.id] = min(seats[inst.id], float(cap))
                demand[inst.id] = lam / len(held) * (self.est.prompt_mean * c_tok + mu * iter_s)
        out = batch_seat_caps(seats, demand, self.admission_margin)
        for iid, cap in (kv_caps or {}).items():
            if cap < out.get(iid, cap + 1):
                out[iid] = cap
        return out

    def _refresh_caps(self, now: float) -> tuple[dict[int, int], dict[int, int]]:
        """This epoch's (TPOT caps, KV caps). The TPOT caps go to the estimator (whose
        profiles of the instances whose cap changed are dropped), and the plan carries them
        to the executor; the KV caps go to the executor here."""
        caps = self._tpot_caps(now)
        old = self.est.seat_caps
        if caps != old:
            for iid in set(caps) | set(old):
                if caps.get(iid) != old.get(iid):
                    self.est.invalidate(iid)
            self.est.seat_caps = caps
        kv = self.executor.kv_caps = self._kv_caps()
        return caps, kv

    def _tpot_caps(self, now: float) -> dict[int, int]:
        """TPOT caps for this epoch (module docstring, step 3): instance id -> requests its
        engine may hold, for each ready instance whose model had arrivals of a class with a
        TPOT target within the last ``rate_window_s``; the tightest such target, with
        ``tpot_headroom``, sets the cap (``RWTEstimator.tpot_seats``)."""
        tpot = self._tpot_of
        if not tpot or not self.tpot_caps:
            return {}
        target: dict[str, float] = {}  # model -> tightest TPOT of its recent arrivals
        for (model, cls), q in self._arrivals.items():
            t = tpot.get(cls)
            if t is not None and self._recent(q, now) and t < target.get(model, math.inf):
                target[model] = t
        caps: dict[int, int] = {}
        for model, t in target.items():
            for inst in self.rt.ready_instances(model):
                cap = self.est.tpot_seats(inst, inst.engine.stats(), t, self.tpot_headroom)
                if cap is not None:
                    caps[inst.id] = cap
        return caps

    def _kv_caps(self) -> dict[int, int]:
        """KV caps for this epoch (module docstring, step 3): instance id -> requests its
        engine holds at their peak where the KV cache binds before ``max_num_seqs``."""
        caps: dict[int, int] = {}
        tokens: dict[int, tuple[int, float, float]] = {}
        if self.kv_caps:
            for inst in self.rt.instances:
                if inst.ready:
                    st = inst.engine.stats()
                    cap = self.est.kv_peak_seats(inst, st)
                    if cap is not None:
                        caps[inst.id] = cap
                        tokens[inst.id] = (st.kv_capacity_tokens,
                                           self.est.model_stats(inst.model).mean,
                                           self.est.prefill_fraction(inst))
        self.executor.kv_tokens = tokens
        return caps

    @property
    def _tpot_of(self) -> dict[str, float]:
        """Class -> TPOT target, for the classes that have one."""
        got = self._tpot_cache
        if got is None:
            classes = self.workload.classes.values() if self.workload is not None else ()
            got = self._tpot_cache = {c.name: c.tpot_s for c in classes if c.tpot_s}
        return got

    def _maybe_evict(self, inst: Instance) -> None:
        """The RWT eviction heuristic; with ``planned_eviction``, only while no plan is
        current (with one, evictions are the plan's: ``Executor.apply``)."""
        if (self.planned_eviction and self.last_plan is not None
                and self.rt.now() - self._last_plan_at <= 2 * self.plan_period_s):
            return
        super()._maybe_evict(inst)

    def current_plan(self) -> dict | None:
        """The last plan as plain data (for ``GET /admin/plan``)."""
        p = self.last_plan
        if p is None:
            return None
        return {
            "status": str(p.status), "objective": p.objective, "best_bound": p.best_bound,
            "solve_ms": p.solve_ms, "build_ms": p.build_ms, "formulation": p.formulation,
            "instances": [{"instance": ip.instance_id, "model": ip.final_model,
                           "groups": list(ip.group_ids),
                           "batch_seats": p.batch_seats.get(ip.instance_id),
                           "seat_cap": p.seat_caps.get(ip.instance_id)}
                          for ip in p.instances],
        }

    def report(self) -> dict:
        base = super().report()
        ms = np.array(self.solve_ms) if self.solve_ms else np.zeros(1)
        base["solver"] = {
            "preset": self.preset.name,
            "num_epochs": self.num_epochs,
            "epochs_skipped": self.epochs_skipped,
            "solve_ms_p50": float(np.percentile(ms, 50)),
            "solve_ms_p95": float(np.percentile(ms, 95)),
            "status_counts": dict(self.statuses),
            "fallback_causes": dict(self.fallback_causes),
            "epoch_triggers": dict(self.epoch_triggers),
            "lso_counts": dict(self.executor.totals),
            "admission": self.admission,
            "planned_eviction": self.planned_eviction,
        }
        return base


class TrueLengthsPolicy(QLMPolicy):
    """The ``qlm`` planner given true output lengths (what-if runs only): a reference policy,
    not a bound (it can score below ``qlm``)."""

    name = "qlm-true-lengths"

    def __init__(self, **kw) -> None:
        kw["clairvoyant"] = True
        super().__init__(**kw)
