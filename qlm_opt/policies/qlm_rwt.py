"""``qlm-rwt``: QLM-style global queue with RWT-based placement (no solver).

The policy decides with the RWT estimator; the ``Executor`` issues every LSO (pull, evict,
rebalance, swap), the same executor that carries out ``qlm``'s plans.
- Every request joins a request group in the global queue (``queue.py``); a new group is
  placed on the instance holding its model where the RWT estimator predicts the lowest
  probability of missing the group's deadline (ties: lower mean wait).
- Pull: engines get work only when they have a seat (``Executor.pull``); requests past hope
  go to their model's late lane, served when an instance has nothing on time to do: under
  overload this keeps the queue from making every request late (EDF's domino effect).
- Evict: when the head of an instance's queue is an urgent request predicted to miss and no
  seat is free, ``Executor.evict_for`` frees seats.
- Rebalance: an instance with free seats and an empty virtual queue takes the head group of
  the most loaded instance of the same model (``Executor.steal``).
- Swap: groups for a model no instance holds stay unplaced; ``Executor.cover`` drains and
  swaps the least-loaded instance that is not the last holder of its model.

Every placement leaves its prediction on ``Request._sched`` (placed_at, pred_mean_s,
pred_std_s) for the accuracy report (``estimator.RWTAccuracy``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING

from qlm_opt.domain import Request
from qlm_opt.core.estimator import RWTEstimator
from qlm_opt.core.wait_calibration import WaitEstimate
from qlm_opt.core.executor import Executor, ExecutorConfig
from qlm_opt.core.policy import Policy
from qlm_opt.core.queue import UNPLACED, GlobalQueue, QueueConfig, RequestGroup, length_bucket

if TYPE_CHECKING:
    from qlm_opt.core.instance import Instance
    from qlm_opt.core.runtime import Runtime

log = logging.getLogger(__name__)


class QLMRWTPolicy(Policy):
    """See the module docstring."""

    name = "qlm-rwt"
    # ``ExecutorConfig.refill_after`` when the executor options leave it unset (None)
    default_refill_after = 0.0
    epoch_s = 0.5

    def __init__(
        self,
        workload=None,
        queue_config: QueueConfig | None = None,
        engine_slack: int | None = None,
        evict_max_recompute_tokens: int | None = None,
        rate_window_s: float = 30.0,
        clairvoyant: bool = False,
        executor: ExecutorConfig | dict | None = None,
    ) -> None:
        self.workload = workload
        self.gq = GlobalQueue(queue_config)
        if isinstance(executor, dict):
            executor = ExecutorConfig(**executor)
        self.executor_config = executor or ExecutorConfig()
        if self.executor_config.refill_after is None:
            self.executor_config.refill_after = self.default_refill_after
        if engine_slack is not None:
            self.executor_config.engine_slack = engine_slack
        if evict_max_recompute_tokens is not None:
            self.executor_config.evict_max_recompute_tokens = evict_max_recompute_tokens
        self.rate_window_s = rate_window_s
        self.clairvoyant = clairvoyant
        self._arrivals: dict[tuple[str, str], deque[float]] = {}  # (model, class) -> times
        # model -> mean prompt tokens of its arrivals (moving average), and the pace cache
        self._prompt_mean: dict[str, float] = {}
        self._pace_cache: dict[str, tuple[float, float]] = {}
        self._ttft: dict[str, float] = {}  # class -> TTFT target, s
        self._tighter_ttft: dict[str, float] = {}  # class -> longest tighter TTFT target, s
        # (model, class) -> times requests of that class went to the late lane: they do not
        # cut in ahead of anyone, so the cut-in rate leaves them out
        self._late_at: dict[tuple[str, str], deque[float]] = {}
        # The same for requests a plan put behind on-time work (``qlm``: ``_note_demoted``): the
        # scored prediction's cut-in rate leaves them out too (``_cut_in_per_s(scored=True)``).
        # One that goes late after leaves ``_demoted_at`` (``_late_at`` counts it then).
        self._demoted_at: dict[tuple[str, str], deque[float]] = {}
        self._demoted: dict[int, float] = {}  # req id -> its time in ``_demoted_at``
        # req id -> model estimate (before calibration): fed to the estimator's online calibration when
        # the first token comes
        self._raw_pred: dict[int, WaitEstimate] = {}
        self._servable: dict[str, bool] = {}  # model -> can some instance ever serve it
        # the cut-in rate's inputs change only with arrivals, late-lane moves and the clock:
        # (model, class) -> (now, arrivals seen, late moves seen, rate per second)
        self._num_arrived = 0
        self._num_went_late = 0
        self._cut_cache: dict[tuple[str, str], tuple] = {}
        # (group, instance id, clock time, wait context, own prompt tokens, estimate) of the
        # instance ``_choose`` picked: ``_on_place`` of that group there, right after,
        # predicts with the context, and reuses the estimate for a first member of that prompt
        self._chosen: tuple | None = None
        # the clock time of the arrival being settled while ``_settle`` places its group: the
        # members are predicted at that time (a live host's clock moves between two reads;
        # the simulator's does not, so there this is ``rt.now()``)
        self._settle_now: float | None = None

    @classmethod
    def from_context(cls, workload=None, fleet=None, **kw) -> QLMRWTPolicy:
        return cls(workload=workload, **kw)

    # -- set-up ------------------------------------------------------------------------------
    def bind(self, rt: Runtime) -> None:
        super().bind(rt)
        im_of = rt.iteration_model

        if self.workload is not None:
            self.est = RWTEstimator.from_workload(
                self.workload, iter_model_of=im_of, clairvoyant=self.clairvoyant
            )
            self._ttft = {c.name: c.ttft_s for c in self.workload.classes.values()}
            self._tighter_ttft = {}
        else:
            self.est = RWTEstimator(150.0, 150.0**2, 1000.0, iter_model_of=im_of,
                                    clairvoyant=self.clairvoyant)
        rt.finish_hooks.append(self._calibrate)
        rt.first_token_hooks.append(self._observe_wait)
        # a first token means the request left its engine's waiting queue: with at most
        # `engine_slack` requests waiting there, the engine may take the next one now
        rt.first_token_hooks.append(self._pump_after_first_token)
        self.gq.on_place = self._on_place
        self.executor = Executor(
            rt, self.gq, self.executor_config,
            basics=lambda inst: self.est.basics(inst, inst.engine.stats()),
            on_late=self._went_late,
        )
        self.executor.free_tokens = self._free_tokens
        if self.workload is not None and self.workload.classes:
            self.executor.tightest_ttft_s = min(
                c.ttft_s for c in self.workload.classes.values())

    def _free_tokens(self, inst: Instance, stretch: float, cap_s: float,
                     headroom: float) -> float:
        """The executor's ``free_tokens``: the estimator's, with the pace of the requests
        arriving for ``inst`` (its model's, over its ready instances) and their mean prompt."""
        now = self.rt.now()
        pace = self._pace(inst.model, now) if headroom > 0 else 0.0
        return self.est.free_prefill_tokens(inst, inst.engine.stats(), now, stretch, cap_s,
                                            pace, self._prompt_mean.get(inst.model, 0.0),
                                            headroom)

    def _pace(self, model: str, now: float) -> float:
        """Requests per second arriving for one ready instance of ``model`` over the last
        ``rate_window_s`` (refreshed at most once a second)."""
        got = self._pace_cache.get(model)
        if got is not None and now - got[0] < 1.0:
            return got[1]
        ready = sum(1 for _ in self.rt.ready_instances(model)) or 1
        pace = self._rates(now).get(model, 0.0) / ready
        self._pace_cache[model] = (now, pace)
        return pace

    def _rates(self, now: float) -> dict[str, float]:
        """Arrival rate per model (req/s) over the last ``rate_window_s``."""
        span = min(self.rate_window_s, max(now, 1e-9))
        rates: dict[str, float] = {}
        for (model, _cls), q in self._arrivals.items():
            rates[model] = rates.get(model, 0.0) + self._recent(q, now) / span
        return rates

    def _went_late(self, req: Request) -> None:
        """A request went to the late lane: its wait is measured from its dispatch, and it
        no longer cuts in ahead of anyone."""
        req._sched.pred_mean_s = None
        self._raw_pred.pop(req.id, None)
        now = self.rt.now()
        key = (req.model, req.slo_class)
        self._late_at.setdefault(key, deque()).append(now)
        self._undemote(req)  # counted once, in ``_late_at``
        self._num_went_late += 1

    def _demote(self, req: Request) -> None:
        """A plan put ``req`` behind on-time work: it will not overtake work of looser
        classes; the scored prediction's cut-in rate leaves it out (once)."""
        if req.id in self._demoted:
            return
        now = self.rt.now()
        self._demoted[req.id] = now
        self._demoted_at.setdefault((req.model, req.slo_class), deque()).append(now)
        self._num_went_late += 1

    def _undemote(self, req: Request) -> None:
        """``req`` is no longer behind on-time work (a later plan put it back on time, or it
        went to the late lane): its demotion leaves the window's count, if still there
        (entries leave ``_demoted_at`` by time, so one at its time is there iff its own is)."""
        at = self._demoted.pop(req.id, None)
        if at is None:
            return
        q = self._demoted_at.get((req.model, req.slo_class))
        if q and at in q:
            q.remove(at)
        self._num_went_late += 1

    def _bucket(self, req: Request) -> int:
        return length_bucket(req.prompt_tokens, self.gq.config.prompt_bucket_edges)

    def _calibrate(self, req: Request) -> None:
        self.est.observe_completion(req, self._bucket(req))

    def _observe_wait(self, req: Request) -> None:
        """First token: the observed wait of the latest placement calibrates the estimator."""
        raw = self._raw_pred.pop(req.id, None)
        self._demoted.pop(req.id, None)
        info = req._sched
        if raw is None or info is None or info.placed_at is None or req.first_token_at is None:
            return
        self.est.calib.observe(req.slo_class, raw.mean_s, raw.std_s,
                               req.first_token_at - info.placed_at)

    def _pump_after_first_token(self, req: Request) -> None:
        if req.instance_id is not None:
            self._pump(self.rt.instances[req.instance_id])

    def _on_place(self, g: RequestGroup) -> None:
        """A group entered an instance's virtual queue: (re-)predict its members' waits."""
        inst = self.rt.instances[g.instance_id]
        if inst.ready:
            now = self._settle_now
            self._predict_group(g, inst, self.rt.now() if now is None else now)
        self._chosen = None

    # -- estimates ---------------------------------------------------------------------------
    def _cut_in_per_s(self, model: str, slo_class: str, now: float,
                      scored: bool = False) -> float:
        """Arrivals per second of tighter classes for ``model``, per instance holding it:
        under EDF they will overtake a request of ``slo_class`` while it waits. Those that
        went to the late lane do not; with ``scored`` (the prediction that is reported, not
        the one decisions read) neither do those a plan put behind on-time work."""
        hit = self._cut_cache.get((model, slo_class, scored))
        if hit is not None and hit[0] == now and hit[1] == self._num_arrived \
                and hit[2] == self._num_went_late:
            rate = hit[3]
            n = max(1, len(self.rt.ready_instances(model)))
            return rate / n
        own = self._ttft.get(slo_class, 0.0)
        rate = 0.0
        for (m, c), q in self._arrivals.items():
            if m != model or self._ttft.get(c, 0.0) >= own:
                continue
            n = self._recent(q, now)
            late = self._late_at.get((m, c))
            if late:
                n = max(0, n - self._recent(late, now))
            demoted = self._demoted_at.get((m, c)) if scored else None
            if demoted:
                n = max(0, n - self._recent(demoted, now))
            rate += n / self.rate_window_s
        self._cut_cache[(model, slo_class, scored)] = (now, self._num_arrived,
                                                       self._num_went_late, rate)
        n = max(1, len(self.rt.ready_instances(model)))
        return rate / n

    def _recent(self, times: deque, now: float) -> int:
        """How many of ``times`` (oldest first) fall in the last ``rate_window_s``; older
        ones are dropped for good."""
        cut = now - self.rate_window_s
        while times and times[0] < cut:
            times.popleft()
        return len(times)

    def _engine_waiting_prompt(self, inst: Instance, st) -> int:
        """Prompt tokens (plus tokens to recompute) waiting inside the engine."""
        if st.num_waiting == 0:
            return 0
        if st.waiting_prompt_tokens:
            return st.waiting_prompt_tokens
        return inst.engine.waiting_tokens()

    def _wait_ctx(self, inst: Instance, g: RequestGroup, now: float,
                  ahead: tuple[int, int] | None = None) -> tuple:
        """What every wait estimate of a member of ``g`` on ``inst`` now shares: the engine's
        view, the requests and prompt tokens ahead (engine-waiting included), the cut-in rate
        and its horizon (the plain one, and the scored prediction's). Valid until the engine,
        the queue or the estimator changes."""
        view = self.est.view(inst, now)
        st = view.st
        n, p = ahead if ahead is not None else self.gq.vq(inst.id).requests_ahead(
            g.deadline_at, g.seq, g.tier)
        cut = self._cut_in_per_s(g.model, g.slo_class, now)
        cut_scored = self._cut_in_per_s(g.model, g.slo_class, now, True) if cut > 0 else 0.0
        horizon = math.inf
        if cut > 0:
            # later arrivals of a tighter class cut in only while their deadline comes first
            tight = self._tighter_ttft.get(g.slo_class)
            if tight is None:
                own = self._ttft.get(g.slo_class, 0.0)
                tight = self._tighter_ttft[g.slo_class] = min(
                    (t for t in self._ttft.values() if t < own), default=0.0)
            horizon = max(0.0, g.deadline_at - now - tight)
        return (view, st.num_waiting + n, p, self._engine_waiting_prompt(inst, st), cut,
                horizon, cut_scored)

    def _wait(self, inst: Instance, g: RequestGroup, extra_ahead: int, prompt: int,
              now: float, extra_prompt: float | None = None, raw: bool = True,
              ahead: tuple[int, int] | None = None, ctx: tuple | None = None,
              scored: bool = False) -> WaitEstimate:
        """Wait of a request of ``g`` behind ``extra_ahead`` members of its own group (with
        ``extra_prompt`` prompt tokens; default ``extra_ahead * prompt``) on ``inst``;
        ``raw=False`` applies the estimator's online calibration for the group's class.
        ``ctx`` (``_wait_ctx``) shares the per-group part between the members of a group.
        ``scored``: the prediction that is recorded and reported (``_record``), whose cut-in
        rate also leaves out the work a plan put behind on-time work."""
        view, n, p, waiting_prompt, cut, horizon, cut_scored = (
            ctx if ctx is not None else self._wait_ctx(inst, g, now, ahead))
        if scored:
            cut = cut_scored
        if extra_prompt is None:
            extra_prompt = extra_ahead * prompt
        # the reported (scored) prediction: later urgent arrivals overtake it only until its
        # prefill starts (``RWTEstimator.wait_raw``); decisions keep the whole wait
        return self.est.wait(
            inst, now, float(n + extra_ahead), p + extra_prompt + waiting_prompt,
            prompt, self._bucket, cut, key=None if raw else g.slo_class,
            cut_in_horizon_s=horizon, view=view, cut_in_until_start=scored,
        )

    def _record(self, req: Request, now: float, raw: WaitEstimate,
                reported: WaitEstimate | None = None) -> None:
        """``raw``: the request's estimate, calibrated into ``_sched`` (which ``qlm``'s
        urgent-miss trigger reads); ``reported`` (default ``raw``): the model estimate the
        predict hooks receive, the scored one (``_reported``)."""
        est = self.est.calib.adjust(req.slo_class, raw)
        info = req._sched
        info.placed_at = now
        info.pred_mean_s = est.mean_s
        info.pred_std_s = est.std_s
        self._raw_pred[req.id] = raw
        for fn in self.rt.predict_hooks:  # the accuracy tracker scores the first one
            fn(req, now, est, raw if reported is None else reported)

    def _reported(self, inst: Instance, g: RequestGroup, k: int, prompt: int, now: float,
                  ctx: tuple, raw: WaitEstimate) -> WaitEstimate:
        """The scored estimate of a request of ``g`` behind its first ``k`` members:
        ``raw`` (``_wait(scored=True)``) with the requests ahead in the virtual queue that the
        executor's late test will move to the late lane at their turn left out
        (``RWTEstimator.late_kept``): they take no service. Only for a class that nothing cuts
        in ahead of (the tightest): for batch work, whose waits the trace's end sets under
        overload, it moved conv 9's MdAPE by 0.04 points and cost 4x the run's CPU time
        (hundreds of requests ahead tested one by one; ``benchmarks/rwt_accuracy``, rwt6).
        Reported only (to the predict hooks; none: not computed): no decision reads it."""
        ex = self.executor
        if ex.basics is None or ctx[4] > 0 or not self.rt.predict_hooks:
            return raw
        view, n, p = ctx[0], ctx[1], ctx[2]
        nw = view.st.num_waiting
        basics = ex.basics(inst)
        eng = inst.engine
        budget = eng.config.max_num_batched_tokens or 1 << 30
        kept, kept_p, dropped = self.est.late_kept(
            inst, now, float(nw), float(ctx[3]),
            self.gq.vq(inst.id).groups_ahead(g.deadline_at, g.seq, g.tier),
            [r for _, _, r in g.members[:k]],
            raw.mean_s, lambda q, w: ex.late_ttft(basics, q, w, budget),
            eng.waiting_tokens(), self._bucket, view)
        if not dropped:
            return raw
        return self._wait(inst, g, nw + kept - n, prompt, now, float(kept_p - p), ctx=ctx,
                          scored=True)

    def _predict(self, req: Request, g: RequestGroup, inst: Instance, now: float) -> None:
        members = g.members
        if members and members[-1][2] is req:
            # the newest member (the usual case): everyone else is ahead
            k = len(members) - 1
            ahead_prompt = g.prompt_tokens - req.prompt_tokens
        else:
            # the members before it in arrival order: ``members[:k]``
            ahead = [r for at, rid, r in members
                     if rid != req.id and (at, rid) < (req.arrived_at, req.id)]
            k = len(ahead)
            ahead_prompt = sum(r.prompt_tokens for r in ahead)
        ctx = self._wait_ctx(inst, g, now)
        raw = self._wait(inst, g, k, req.prompt_tokens, now, float(ahead_prompt), ctx=ctx,
                         scored=True)
        self._record(req, now, raw, self._reported(inst, g, k, req.prompt_tokens, now, ctx, raw))

    def _predict_group(self, g: RequestGroup, inst: Instance, now: float) -> None:
        """Predict every member of ``g`` (placed on ``inst``) in one pass."""
        ctx = None
        first = None  # (prompt tokens, estimate) of the first position, from ``_choose``
        chosen = self._chosen
        if chosen is not None:
            self._chosen = None
            if chosen[0] is g and chosen[1] == inst.id and chosen[2] == now:
                # ``_choose`` just estimated this group here, and nothing changed since but
                # the group's entry into this queue (it is not ahead of itself)
                ctx = chosen[3]
                first = chosen[4], chosen[5]
        k = 0
        cum = 0
        for _, _, r in g.members:
            if r.first_token_at is None:
                if (k == 0 and first is not None and first[0] == r.prompt_tokens
                        and ctx[4] <= 0):
                    # the estimate ``_choose`` made: position 0, nothing of the group ahead,
                    # this prompt, the same context and no cut-ins (with cut-ins the scored
                    # prediction counts them differently: ``_wait(scored=True)``), so the
                    # same floats
                    raw = first[1]
                else:
                    if ctx is None:
                        ctx = self._wait_ctx(inst, g, now)
                    raw = self._wait(inst, g, k, r.prompt_tokens, now, float(cum), ctx=ctx,
                                     scored=True)
                # ctx is set on both paths: ``first`` comes with ``_choose``'s context
                self._record(r, now, raw,
                             self._reported(inst, g, k, r.prompt_tokens, now, ctx, raw))
            k += 1
            cum += r.prompt_tokens

    def _choose(self, g: RequestGroup, now: float) -> Instance | None:
        self._chosen = None
        insts = self.rt.ready_instances(g.model)
        if not insts:
            return None
        if len(insts) == 1:
            return insts[0]
        prompt = g.prompt_tokens // max(g.size, 1)
        best, best_key, best_ctx, best_est = None, None, None, None
        for inst in insts:
            ctx = self._wait_ctx(inst, g, now)
            est = self._wait(inst, g, 0, prompt, now, ctx=ctx)
            key = (round(est.p_miss(g.deadline_at - now), 3), est.mean_s)
            if best_key is None or key < best_key:
                best, best_key, best_ctx, best_est = inst, key, ctx, est
        if g.instance_id == UNPLACED:
            self._chosen = (g, best.id, now, best_ctx, prompt, best_est)
        return best

    # -- events ------------------------------------------------------------------------------
    def on_arrival(self, req: Request) -> None:
        rt = self.rt
        ok = self._servable.get(req.model)
        if ok is None:
            # the fleet's instances and what their GPUs can hold do not change
            ok = self._servable[req.model] = rt.can_serve_anywhere(req.model)
        if not ok:
            rt.drop(req, "no_instance_can_serve_model")
            return
        now = rt.now()
        q = self._arrivals.get((req.model, req.slo_class))
        if q is None:
            q = self._arrivals[(req.model, req.slo_class)] = deque()
        q.append(now)
        self._num_arrived += 1
        pm = self._prompt_mean.get(req.model)
        self._prompt_mean[req.model] = (float(req.prompt_tokens) if pm is None
                                        else pm + 0.01 * (req.prompt_tokens - pm))
        g, new = self.gq.add(req, now)
        self._settle(g, new, req, now)

    def _settle(self, g: RequestGroup, new: bool, req: Request, now: float) -> None:
        placed = False
        if new or g.instance_id == UNPLACED:
            inst = self._choose(g, now)
            if inst is None:
                self._ensure_swap(g.model)
                return
            placed = g.instance_id != inst.id
            self._settle_now = now
            try:
                self.gq.place(g, inst.id)  # on_place predicts the members
            finally:
                self._settle_now = None
        inst = self.rt.instances[g.instance_id]
        if req.first_token_at is None and not placed:
            self._predict(req, g, inst, now)
        self._pump(inst)

    def on_requeue(self, req: Request) -> None:
        now = self.rt.now()
        g, new = self.gq.requeue(req, now)
        self._settle(g, new, req, now)

    def on_finished(self, req: Request) -> None:
        inst = self.rt.instances[req.instance_id]
        if inst.ready:
            self._pump(inst)

    def on_instance_ready(self, inst: Instance) -> None:
        for g in list(self.gq.vq(UNPLACED).groups.values()):
            if g.model == inst.model:
                self.gq.place(g, inst.id)  # on_place predicts the members
        self._pump(inst)
        for g in list(self.gq.vq(UNPLACED).groups.values()):
            self._ensure_swap(g.model)

    def on_epoch(self) -> None:
        for inst in self.rt.instances:
            if inst.ready:
                self.est.observe_engine(inst)
                self._maybe_evict(inst)
                self._pump(inst)
        for g in list(self.gq.vq(UNPLACED).groups.values()):
            if self.rt.ready_instances(g.model):
                self._settle(g, True, g.members[0][2], self.rt.now())
            else:
                self._ensure_swap(g.model)

    def num_queued(self) -> int:
        return len(self.gq) + self.executor.num_late_queued

    def remove(self, req: Request) -> bool:
        """Cancel: take ``req`` out of the global queue or its model's late lane."""
        self._raw_pred.pop(req.id, None)
        self._demoted.pop(req.id, None)
        if self.gq.remove(req):
            return True
        return self.executor.remove_late(req)

    @property
    def late(self) -> dict[str, deque[Request]]:
        """model -> requests past hope (the executor's late lanes)."""
        return self.executor.late

    def report(self) -> dict:
        return {"qlm": {"num_rebalanced": self.executor.num_rebalanced,
                        "num_late": self.executor.num_late,
                        "num_profiles": self.est.num_profiles}}

    # -- LSOs (decided here, issued by the executor) -----------------------------------------
    def _has_seat(self, inst: Instance) -> bool:
        return self.executor.has_seat(inst)

    def _pump(self, inst: Instance) -> None:
        """Pull: feed ``inst`` from its virtual queue while it has seats."""
        self.executor.pull(inst)

    def _maybe_evict(self, inst: Instance) -> None:
        """Evict running requests whose TTFT is met to seat an urgent head that would miss."""
        g = self.gq.vq(inst.id).head()
        if g is None or self._has_seat(inst):
            return
        now = self.rt.now()
        slack = g.deadline_at - now
        # the estimate (a profile of the instance) costs more than finding out that no
        # running request may be evicted, which is the usual case on long prompts
        if slack <= 0 or not self.executor.has_victims(inst, g):
            return
        head = g.members[0][2]
        est = self._wait(inst, g, 0, head.prompt_tokens, now)
        if est.mean_s <= slack:
            return
        if self.executor.evict_for(inst, g, now):
            self.est.invalidate(inst.id)
            self._pump(inst)

    def _cover_cost(self):
        """How the coverage swap picks its victim (None: the least-loaded instance)."""
        return None

    def _ensure_swap(self, model: str) -> None:
        """Swap some instance to ``model`` when none holds it and none is on the way."""
        rt = self.rt
        back = self.executor.cover(model, self._cover_cost())
        if back is None:
            return
        now = rt.now()
        for r in back:
            self.gq.requeue(r, now)
        for g in list(self.gq.vq(UNPLACED).groups.values()):
            if g.model != model and rt.ready_instances(g.model):
                inst = self._choose(g, now)
                self.gq.place(g, inst.id)
