"""``qlm``: the global queue, the RWT estimator, the CP-SAT planner and the executor.

It extends ``qlm-rwt`` (which keeps pulling, evicting and rebalancing between epochs) with a
planning epoch:
  1. snapshot the global queue's groups and the fleet into a ``PlanningInstance`` (integer ms):
     each group's service time on each candidate instance from the RWT estimator's throughput
     model, each instance's busy-until from the estimated wait at the back of its engine, swap
     times from the catalog;
  2. solve it with CP-SAT (``planner.solve``, preset from ``solver/``), warm-started from the
     previous plan; on a time-out the EDF fallback plans, so an epoch never blocks;
  3. the ``Executor`` applies it: model swaps worth their cost, and queued groups moved to
     their planned instances.
Epochs run every ``plan_period_s`` and on events: an urgent arrival predicted to miss its
deadline, or capacity freed while groups wait unplaced; at most one per ``min_spacing_s``.

``clairvoyant`` (what-if only) gives the estimator and the planner the true output lengths:
the same planner with perfect information, an upper reference.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from qlm_opt.executor import Executor, ExecutorConfig, group_weight
from qlm_opt.planner import PlanGroup, PlanInstance, PlanningInstance, load_preset, solve
from qlm_opt.policies.qlm_rwt import QLMRWTPolicy
from qlm_opt.queue import UNPLACED

if TYPE_CHECKING:
    from qlm_opt.planner import Plan
    from qlm_opt.runtime import Instance, Runtime

log = logging.getLogger(__name__)


class QLMPolicy(QLMRWTPolicy):
    """See the module docstring."""

    name = "qlm"

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
        clairvoyant: bool = False,
        executor: ExecutorConfig | None = None,
        **kw,
    ) -> None:
        super().__init__(workload=workload, clairvoyant=clairvoyant, **kw)
        self.preset = load_preset(preset) if isinstance(preset, str) else preset
        self.plan_period_s = plan_period_s
        self.min_spacing_s = min_spacing_s
        self.forecast_horizon_s = forecast_horizon_s
        self.forecast_chunks = forecast_chunks
        self.forecast_weight = forecast_weight
        self.swap_util_high = swap_util_high
        self.swap_util_low = swap_util_low
        self.executor_config = executor or ExecutorConfig()
        self.last_plan: Plan | None = None
        self._last_plan_at = -math.inf
        self._plan_pending = False
        self._solving = False  # a live solve is running on a worker thread
        self.solve_ms: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.num_epochs = 0
        self.epoch_triggers: Counter[str] = Counter()
        self._class_weight: dict[str, float] = {}

    def make_deterministic(self) -> None:
        """What-if runs: reproducible solver search (see ``SolverPreset.deterministic``)."""
        self.preset = dataclasses.replace(self.preset, deterministic=True)

    @classmethod
    def from_context(cls, workload=None, fleet=None, **kw) -> QLMPolicy:
        return cls(workload=workload, fleet=fleet, **kw)

    def bind(self, rt: Runtime) -> None:
        super().bind(rt)
        self.executor = Executor(rt, self.gq, self.executor_config)
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
            and getattr(info, "pred_mean_s", None) is not None
            and info.placed_at is not None
            and info.placed_at + info.pred_mean_s > req.deadline_at
            and self._ttft_of(req) < self.plan_period_s * 4
        ):
            self._request_plan("urgent_miss")

    def on_finished(self, req) -> None:
        super().on_finished(req)
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
    def snapshot(self, now: float) -> PlanningInstance | None:
        """The planning instance for the current queue and fleet (plain data, integer ms)."""
        rt = self.rt
        groups = [g for g in self.gq.groups.values() if g.size > 0]
        if not groups:
            return None
        insts: list[PlanInstance] = []
        per_inst: dict[int, tuple] = {}  # id -> (seats, iteration s at S, c_tok, instance)
        models = {g.model for g in groups}
        needy, donors = self._swap_candidates(now, models)
        swap_ms: dict[int, dict] = {}
        for inst in rt.instances:
            st = inst.engine.stats()
            held = inst.model if inst.state != 2 else (inst.swap_to or inst.model)
            if inst.ready:
                seats, iter_s, c_tok = self.est.basics(inst, st)
                back = self.est.wait(inst, now, float(st.num_waiting), 0, 0, self._bucket)
                busy_ms = int(back.mean_s * 1000)
            else:
                seats, iter_s, c_tok = float(st.max_num_seqs or 256), None, None
                busy_ms = int(max(0.0, st.busy_until_at - now) * 1000)
            can_swap = self.executor.can_swap(inst, now) and inst.id in donors
            allowed = frozenset(m for m in (needy & models) | ({held} if held else set())
                                if rt.fleet.can_serve(inst.spec, m))
            insts.append(PlanInstance(inst.id, inst.spec.gpu, held, busy_ms,
                                      can_swap, allowed))
            per_inst[inst.id] = (seats, iter_s, c_tok, inst)
            # Loading a model costs the same whatever was there before.
            to_ms = {m: int(rt.swap_time_s(inst, m) * 1000) for m in allowed}
            swap_ms[inst.id] = {
                (a, b): ms for b, ms in to_ms.items() for a in (allowed | {held}) if a != b
            }
        def service_of(model: str, out_tokens: float, prompt: float) -> dict[int, int]:
            service: dict[int, int] = {}
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
                service[iid] = max(1, int(1000 * (out_tokens * it / s + prompt * ct)))
            return service

        pgroups: list[PlanGroup] = []
        for g in groups:
            reqs = g.requests()
            if self.clairvoyant:
                out_tokens = float(sum(r.output_tokens - r.num_generated for r in reqs))
            else:
                mu = self.est.stats_for(g.model, g.bucket).mean
                out_tokens = float(sum(max(mu - r.num_generated, 1.0) for r in reqs))
            service = service_of(g.model, out_tokens, float(g.prompt_tokens))
            if not service:
                continue
            slack_ms = int((g.deadline_at - now) * 1000)
            # TTFT deadline: the group must *start* by then; it may end one service later.
            deadline_ms = slack_ms + min(service.values())
            cw = self._class_weight.get(g.slo_class, 1.0)
            prev = g.instance_id if g.instance_id != UNPLACED else None
            pgroups.append(PlanGroup(str(g.id), g.model, g.size, group_weight(g, cw),
                                     deadline_ms, service, prev))
        pgroups.extend(self._forecast_groups(now, service_of))
        if not pgroups:
            return None
        return PlanningInstance(tuple(pgroups), tuple(insts), swap_ms_by_instance=swap_ms,
                                weights=self.preset.weights)

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

    def _rates(self, now: float) -> dict[str, float]:
        """Arrival rate per model (req/s) over the last ``rate_window_s``."""
        span = min(self.rate_window_s, max(now, 1e-9))
        rates: dict[str, float] = {}
        for (model, _cls), q in self._arrivals.items():
            while q and q[0] < now - self.rate_window_s:
                q.popleft()
            rates[model] = rates.get(model, 0.0) + len(q) / span
        return rates

    def _swap_candidates(self, now: float, queued_models: set[str]) -> tuple[set[str], set[int]]:
        """Which models may gain an instance and which instances may give theirs up.

        A swap is only worth planning where demand says so: a model is *needy* when its
        utilisation (arrival rate over the service rate of the instances holding it) is above
        ``swap_util_high`` or no instance holds it; an instance is a *donor* when its model
        would stay under ``swap_util_low`` without it. This keeps the planner from trading
        instances back and forth as momentary backlogs move."""
        rt = self.rt
        rates = self._rates(now)
        mu_cache: dict[str, float] = {}
        cap: dict[str, list[tuple[int, float]]] = {}
        for inst in rt.instances:
            m = inst.model if inst.state != 2 else (inst.swap_to or inst.model)
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
            while q and q[0] < now - self.rate_window_s:
                q.popleft()
            rate = len(q) / span
            n = rate * H / self.forecast_chunks
            if n < 0.5:
                continue
            size = int(round(n))
            mu = self.est.model_stats(model).mean
            service = service_of(model, size * mu, size * self.est.prompt_mean)
            if not service:
                continue
            ttft = self._ttft.get(cls, 1.0)
            cw = self._class_weight.get(cls, 1.0) * self.forecast_weight
            for k in range(self.forecast_chunks):
                mid_ms = int(1000 * (k + 0.5) * H / self.forecast_chunks)
                deadline_ms = mid_ms + int(1000 * ttft) + min(service.values())
                out.append(PlanGroup(f"f:{model}:{cls}:{k}", model, size,
                                     max(1, int(round(size * cw * 10))), deadline_ms, service))
        return out

    def _replan(self, reason: str) -> None:
        self._plan_pending = False
        rt = self.rt
        now = rt.now()
        self._last_plan_at = now
        for inst in rt.instances:
            if inst.ready:
                self.est.observe_engine(inst)
        pi = self.snapshot(now)
        if pi is None:
            return
        self.num_epochs += 1
        self.epoch_triggers[reason] += 1
        offload = getattr(rt.host, "offload", None)
        if offload is not None:
            # Live: solve on a worker thread; the plan is applied when it arrives, to a state
            # that has moved on meanwhile (the executor skips groups that are gone).
            if self._solving:
                return
            self._solving = True
            offload(solve, (pi, self.preset, self.last_plan),
                    lambda plan: self._apply(plan, pi, reason))
            return
        self._apply(solve(pi, self.preset, hint=self.last_plan), pi, reason)

    def _apply(self, plan: Plan, pi: PlanningInstance, reason: str) -> None:
        """Execute a plan: LSOs through the executor, then place and pull."""
        self._solving = False
        rt = self.rt
        now = rt.now()
        self.last_plan = plan
        self.solve_ms.append(plan.solve_ms + plan.build_ms)
        self.statuses[str(plan.status)] += 1
        counts = self.executor.apply(plan, pi, now)
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

    def current_plan(self) -> dict | None:
        """The last plan as plain data (for ``GET /admin/plan``)."""
        p = self.last_plan
        if p is None:
            return None
        return {
            "status": str(p.status), "objective": p.objective, "best_bound": p.best_bound,
            "solve_ms": p.solve_ms, "build_ms": p.build_ms, "formulation": p.formulation,
            "instances": [{"instance": ip.instance_id, "model": ip.final_model,
                           "groups": list(ip.group_ids)} for ip in p.instances],
        }

    def report(self) -> dict:
        base = super().report()
        ms = np.array(self.solve_ms) if self.solve_ms else np.zeros(1)
        base["solver"] = {
            "preset": self.preset.name,
            "num_epochs": self.num_epochs,
            "solve_ms_p50": float(np.percentile(ms, 50)),
            "solve_ms_p95": float(np.percentile(ms, 95)),
            "status_counts": dict(self.statuses),
            "epoch_triggers": dict(self.epoch_triggers),
            "lso_counts": dict(self.executor.totals),
        }
        return base


class ClairvoyantPolicy(QLMPolicy):
    """The ``qlm`` planner given true output lengths (what-if runs only): an upper reference."""

    name = "clairvoyant"

    def __init__(self, **kw) -> None:
        kw["clairvoyant"] = True
        super().__init__(**kw)
