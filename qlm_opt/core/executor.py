"""The executor: the one place that issues LLM Serving Operations on the fleet.

Policies decide; the executor acts, through the ``Runtime``. Both global-queue policies use
it: ``qlm`` feeds it the CP-SAT plan every epoch, ``qlm-rwt`` its RWT heuristics.

- **Apply a plan** (``apply``), once per epoch:
  - *swap* where the plan gives an instance another model and the on-time weight the plan
    puts on that instance under the new model exceeds the swap's cost, both in the
    objective's units (``ObjectiveWeights.swap_penalty`` against ``on_time`` x weight), at
    most once per ``min_swap_interval_s`` per instance. A plan that serves groups of the
    current model first and then swaps ("serve these, then swap") keeps those groups on the
    instance: they drain before the swap starts;
  - *rebalance*: a queued group moves to its planned instance when that gains something;
  - *order*: a group the plan cannot get on time goes behind the on-time ones in its
    instance's virtual queue (``RequestGroup.tier``), so it does not push them late
    (Moore-Hodgson's rule, weighted and across instances, is what the knapsack solves);
  - *admission*: the plan's ``batch_seats`` cap how many batch requests each engine may
    hold until the next plan, and its ``seat_caps`` how many requests of any class (the
    TPOT caps: more would slow every decode past the tightest TPOT target the instance
    serves) (see *Pull*);
  - *planned eviction* (``planned_evict``, off by default): when the plan's first group on a
    full instance is urgent, late as planned and on time if it started now, running batch
    requests are evicted for it if the on-time weight that gains exceeds what their
    recompute costs in the objective's units:
    ``completion_penalty`` x the recompute time (prompt + generated tokens x the engine
    model's prefill time per token) for the victims and every later group of the instance's
    sequence, plus ``on_time`` x weight of each later group the delay makes late.
- **Pull** (``pull``), on every event that frees capacity (a finish, or a first token: the
  request's prefill has left the engine's waiting queue): an instance with a free seat takes
  the head of its virtual queue; at most ``engine_slack`` requests wait inside an engine, so
  the global queue keeps control of order and placement. A request that can no longer make
  its deadline goes to its model's *late lane*, served when nothing on time waits.
  *Admission*: a request due later than ``urgent_window_s`` (batch work) enters only while
  the engine holds fewer such requests than the plan's ``batch_seats`` for the instance;
  urgent work may take every seat. Batch work over the cap waits in the global queue, not in
  an engine, and stops being batch once it comes within the window of its deadline, so the
  cap delays it but never starves it. No cap (``qlm-rwt``, or no urgent demand forecast):
  batch work takes every seat. An instance with a TPOT cap takes no request of any class
  while its engine holds that many; the work waits in the global queue, in plan order.
- **Steal** (``steal``): an idle instance takes the head group of the busiest instance of
  the same model; and (``steal_urgent``) an instance about to seat batch work takes, first,
  the earliest on-time urgent head group waiting on another instance of its model, so urgent
  work never waits on a full instance while a sibling seats batch (groups the plan put behind
  stay where it put them).
- **Evict** (``evict_for``): running lower-priority requests whose first token is out and
  whose recompute is cheap are aborted to seat an urgent group; they keep their tokens and
  resume by recompute. The heuristic (``victims_for`` under a recompute-token cap) is what
  the policies call between epochs; with ``planned_evict`` the plan decides in ``apply``
  (above) and ``qlm`` keeps the heuristic only for when no plan is current.
- **Swap** (``swap``): drain and load another model; the instance's queued groups go back to
  the pool (or stay, to be served first, when the plan says so).

Every LSO is counted in ``Runtime.lso_counts``; ``apply`` returns the epoch's counts for the
policy's one summary line per epoch.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlm_opt.domain import Request
from qlm_opt.planner.problem import REQUEST_WEIGHT, SWAP_SCALE
from qlm_opt.core.queue import UNPLACED, GlobalQueue, RequestGroup
from qlm_opt.core.instance import InstanceState, least_loaded_victim

if TYPE_CHECKING:
    from qlm_opt.planner import Plan, PlanningProblem
    from qlm_opt.core.instance import Instance
    from qlm_opt.core.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ExecutorConfig:
    # An instance keeps a model at least this long, and at least `min_dwell_swaps` times
    # the swap that loaded it: a swap must pay for itself before the next one (no thrashing);
    # the swap penalty in the objective says when it is worth it at all.
    min_swap_interval_s: float = 10.0
    min_dwell_swaps: float = 5.0
    evict_on_swap: bool = False  # evict running requests instead of draining them
    # requests due no later than the next that may wait inside an engine; one keeps every
    # other urgent request in the global queue, free to go to whichever instance seats it
    # first, in deadline order (4 cost 1.5-10 points on the scenario suite, README)
    engine_slack: int = 1
    # ... and beyond that, more while their prompts ride the engine's next iteration
    # (``Executor.free_tokens``, the estimator's ``free_prefill_tokens``): prefill that keeps
    # the iteration's compute within ``free_ride`` x its memory time (1: it delays nobody), so
    # that an engine is not held to one new request per iteration on short prompts; 0: off
    free_ride: float = 1.0
    # ... or while the next iteration stays within this share of the tightest TTFT target
    # (``Executor.tightest_ttft_s``, set by the policy), whichever admits more
    ride_share: float = 0.1
    # ... and at least this many times the prompt tokens that arrive for the engine during
    # its next iteration, so that admission keeps pace with arrivals (0: off)
    pace_headroom: float = 2.0
    # a request is past hope (it goes to the late lane) when it would miss its deadline if
    # dispatched now. On: its first token comes after the iteration in flight (taken as long
    # as the first of its own: a pull mostly follows an engine event, just as an iteration
    # starts) and after its own chunked prefill of the tokens already waiting in the engine
    # and of its prompt, plus a decode iteration's time for each of the two. Off: its own
    # prompt's prefill plus one decode iteration, which let in requests that then missed
    # under overload (and spent the engine's time on them)
    late_in_flight: bool = True
    # the share of an iteration counted as in flight (1: a whole one, as long as the first of
    # the request's own; 0.5 and 0 were measured on the scenario suite: +7.0 and +1.3 points
    # summed against the old test, 1: +14.2)
    in_flight_share: float = 1.0
    # > 0: an engine at its slack of waiting requests, with seats free and more work queued,
    # is pulled again after this many iterations of what waits (when the waiting request has
    # likely entered an iteration) instead of only at that request's first token, an iteration
    # later (one admission per two iterations): only while what waits and the head fit one
    # iteration's token budget, and only while the engine holds fewer than ``refill_fill`` of
    # its seats (``max_num_seqs``, or a lower TPOT or KV cap): an engine starved of admissions,
    # not one already full. Ninth session: with ``refill_fill`` 0.75, suite +3.5 summed,
    # held-out +12.7 (`h-single` +2.8); without the fill condition (eighth session) Mooncake-like
    # held-out shapes lost up to 4.1 points (benchmarks/scenarios/README.md). None: the
    # policy's default (``qlm`` 1.25; ``qlm-rwt``, which has no KV caps to tell a full engine
    # from a starved one, 0: off; lost 8.7 summed on the suite with it)
    refill_after: float | None = None
    refill_fill: float = 0.75
    evict_max_recompute_tokens: int = 256  # only victims this cheap to recompute
    max_victims: int = 8  # evictions per urgent group
    demote_late: bool = True  # plan-late groups go behind on-time ones
    rebalance: bool = True  # move queued groups to their planned instance when it gains
    steal_urgent: bool = True  # an instance about to seat batch takes a sibling's urgent head
    rebalance_horizon_s: float = 60.0  # only groups due within this are moved by the plan
    # work due within this is urgent: it may take any seat; work due later is batch work,
    # admitted up to the plan's ``batch_seats`` cap
    urgent_window_s: float = 30.0
    # an urgent request may go past its engine's KV cap once it has waited this share of its
    # TTFT budget: the engine may then preempt (lower-priority work) as outputs grow
    kv_cap_wait: float = 0.8
    # how an engine with a KV cap (``kv_caps``/``kv_tokens``, set by the policy where the KV
    # cache binds before ``max_num_seqs``) admits work. "peak": a request enters only while
    # its predicted peak footprint (prompt, less expected prefix-cache hits, + mean output)
    # fits in what the cache leaves once the held requests reach theirs (``Executor._kv_left``)
    # and urgent work is held by that test alone (batch work also by the plan's batch cap,
    # which the policy keeps within the count). "count": at most ``kv_caps`` requests, the
    # capacity over a mean peak footprint (a count lets in a few long prompts that then
    # preempt one another, and keeps short ones out behind them). Past either test batch work
    # never enters, and urgent work only once it has waited ``kv_cap_wait`` of its TTFT budget
    kv_admission: str = "peak"
    planned_evict: bool = False  # ``apply`` evicts for the plan's urgent first groups

    def __post_init__(self) -> None:
        if self.urgent_window_s < 0:
            raise ValueError(f"urgent_window_s must be >= 0, got {self.urgent_window_s}")
        if self.refill_after is not None and self.refill_after < 0:
            raise ValueError(f"refill_after must be >= 0, got {self.refill_after}")
        if not 0.0 < self.refill_fill <= 1.0:
            raise ValueError(f"refill_fill must be in (0, 1], got {self.refill_fill}")
        if self.kv_admission not in ("peak", "count"):
            raise ValueError("kv_admission must be 'peak' or 'count', got "
                             f"{self.kv_admission!r}")


def _kv_peak(req: Request, mu: float, keep: float = 1.0) -> float:
    """A request's predicted peak KV footprint in tokens: its prompt (``keep`` of it: the
    rest is expected from the prefix cache) and the mean output ``mu`` of its model, or,
    once it has generated more than half of that, what it has and half the mean more."""
    n = req.num_generated
    return req.prompt_tokens * keep + (n + mu / 2.0 if n + mu / 2.0 > mu else mu)


class Executor:
    """Issues LSOs; see the module docstring.

    ``basics(inst)`` -> (seats, iteration s, prefill s per token) of an instance (from the
    RWT estimator) decides when a request is past hope; ``on_late(req)`` is called when one
    goes to the late lane, ``predicts_miss(group, inst)`` (set by ``qlm``) when a rebalance
    must gain. All three are the policy's: it owns the estimator.
    """

    def __init__(self, rt: Runtime, gq: GlobalQueue, config: ExecutorConfig | None = None,
                 basics: Callable | None = None, on_late: Callable | None = None):
        self.rt = rt
        self.gq = gq
        self.config = config or ExecutorConfig()
        self.basics = basics
        self.on_late = on_late
        self.predicts_miss: Callable | None = None
        # free_tokens(inst, stretch, cap_s, headroom) -> prompt tokens the engine's next
        # iteration may still prefill (the policy's estimator, ``free_prefill_tokens``); None:
        # no ride past ``engine_slack``
        self.free_tokens: Callable | None = None
        self.tightest_ttft_s: float | None = None  # the tightest TTFT target served, s
        self._refill_at: dict[int, float] = {}  # instance id -> when a refill pull is due
        self._last_swap_at: dict[int, float] = {}  # instance id -> clock time of last swap
        # instance id -> model it swaps to once its queued groups of the old model drain
        self.swap_after: dict[int, str] = {}
        self.late: dict[str, deque[Request]] = {}  # model -> requests past hope, FIFO
        self.num_late_queued = 0
        self.num_late = 0  # requests ever sent to a late lane
        self.num_rebalanced = 0
        self.totals: Counter[str] = Counter()
        self.requeued: list[Request] = []
        # instance id -> batch requests its engine may hold (the current plan's admission);
        # an instance not here has no cap
        self.batch_seats: dict[int, int] = {}
        # instance id -> requests (any class) its engine may hold: the plan's TPOT caps
        self.seat_caps: dict[int, int] = {}
        # instance id -> requests its engine holds at their peak KV footprint (set by the
        # policy every epoch): batch work stops there, and urgent work too until it has
        # waited ``kv_cap_wait`` of its TTFT budget
        self.kv_caps: dict[int, int] = {}
        # instance id -> (KV capacity tokens, mean output tokens of its model, share of a
        # prompt not expected from the prefix cache), for ``kv_admission="peak"`` (set by the
        # policy with ``kv_caps``)
        self.kv_tokens: dict[int, tuple[int, float, float]] = {}
        self.evicted_on: set[int] = set()  # instances the last ``apply`` evicted on

    # -- pull --------------------------------------------------------------------------------
    def has_seat(self, inst: Instance) -> bool:
        nr, nw, mx = inst.engine.seat_counts()
        cap = self.seat_caps.get(inst.id)
        if cap is not None and cap < mx:
            mx = cap
        cap = self.kv_caps.get(inst.id)
        if cap is not None and cap < mx:
            mx = cap
        return nw < self.config.engine_slack and nr + nw < mx

    def batch_held(self, inst: Instance, now_at: float) -> int:
        """Requests in ``inst``'s engine (running or waiting) due later than the urgent
        window: the batch work that counts against the admission cap."""
        return inst.engine.held_due_after(now_at + self.config.urgent_window_s)

    def pull(self, inst: Instance) -> None:
        """Feed ``inst`` from its virtual queue (then its model's late lane) while it has
        seats. At most ``engine_slack`` requests due no later than the next one wait inside
        the engine: work due later (batch) waiting there does not hold an urgent request back
        in the global queue (the engine orders its waiting queue by deadline, so it goes
        first), while the urgent backlog an engine holds stays bounded, so the global queue
        still decides what is past hope (EDF's domino effect). Beyond that, more may wait
        while their prompts ride the engine's next iteration (``free_tokens``, see
        ``ExecutorConfig.free_ride``): short prompts are not held to one per iteration. A
        request past hope moves to its model's late lane instead. Batch work (due later than
        ``urgent_window_s``) enters only while the engine holds fewer batch requests than
        ``batch_seats[inst]``, and nothing enters while it holds ``seat_caps[inst]``
        requests. Where the KV cache binds, ``ExecutorConfig.kv_admission`` decides what fits."""
        rt = self.rt
        if not inst.ready:
            return
        now = rt.now()
        slack = self.config.engine_slack
        vq = self.gq.vq(inst.id)
        # (seats, iteration s, prefill s per token): read when first needed (most pulls find
        # no seat); a dispatch does not change them (engine events reach the policy later).
        basics = None
        wait_tok = 0  # tokens waiting in the engine (``late_in_flight``)
        budget = 0  # its token budget per iteration
        waiting_at = None  # sorted deadlines waiting in the engine, once at the slack limit
        ride = None  # prompt tokens that may still ride free in the next iteration
        eng = inst.engine
        cap = self.batch_seats.get(inst.id)
        held_cap = self.seat_caps.get(inst.id)
        kv_cap = self.kv_caps.get(inst.id)
        kv_tok = self.kv_tokens.get(inst.id) if self.config.kv_admission == "peak" else None
        kv_peak = kv_tok is not None
        kv_left = None  # KV tokens the held requests' predicted peaks leave, once needed
        kv_mu, kv_keep = kv_tok[1:] if kv_tok is not None else (0.0, 1.0)
        batch_cut = now + self.config.urgent_window_s
        n_batch = None  # batch requests in the engine, counted when the cap first matters
        # a sibling's urgent work to take before seating batch: once none is found, none is
        # until another group leaves a sibling (dispatching here changes no sibling)
        look_urgent = self.config.steal_urgent
        while True:
            nr, nw, mx = eng.seat_counts()
            if nr + nw >= mx or (held_cap is not None and nr + nw >= held_cap):
                return
            g = vq.head()
            if g is None and nw < slack and self.steal(inst):
                g = vq.head()
                look_urgent = self.config.steal_urgent
            elif look_urgent and g is not None and g.deadline_at > batch_cut and nw < slack:
                if self.steal_urgent(inst, batch_cut):
                    g = vq.head()
                else:
                    look_urgent = False
            if kv_peak and g is not None:
                # the predicted peaks decide, not the count
                if kv_left is None:
                    kv_left = self._kv_left(inst)
                head = g.members[0][2]
                if _kv_peak(head, kv_mu, kv_keep) > kv_left and (
                        g.deadline_at > batch_cut or now < head.arrived_at
                        + self.config.kv_cap_wait * (head.deadline_at - head.arrived_at)):
                    return
            elif kv_cap is not None and nr + nw >= kv_cap:
                if g is None or g.deadline_at > batch_cut:
                    return
                head = g.members[0][2]
                if now < head.arrived_at + self.config.kv_cap_wait * (
                        head.deadline_at - head.arrived_at):
                    return
            if cap is not None and g is not None and g.deadline_at > batch_cut:
                # the head is batch work, and so is everything behind it (EDF order)
                if n_batch is None:
                    n_batch = self.batch_held(inst, now)
                if n_batch >= cap:
                    self.totals["batch_held"] += 1
                    return
            if nw >= slack:
                if g is None:
                    return
                if waiting_at is None:
                    waiting_at = sorted(r.deadline_at for r in inst.engine.waiting_requests())
                head = g.members[0][2]
                due_at = head.deadline_at
                if bisect.bisect_right(waiting_at, due_at) >= slack:
                    if ride is None:
                        ride = self._free_ride(inst)
                    need = head.prompt_tokens + head.num_generated
                    if need > ride:
                        if self.config.refill_after:
                            room = mx
                            for c in (held_cap, kv_cap):
                                if c is not None and c < room:
                                    room = c
                            if nr + nw < self.config.refill_fill * room:
                                self._arm_refill(inst, now, need)
                        return
                    ride -= need
                bisect.insort(waiting_at, due_at)
            if g is None:
                self._maybe_swap_after(inst, now)
                lane = self.late.get(inst.model)
                if not lane:
                    return
                req = lane.popleft()
                self.num_late_queued -= 1
                rt.dispatch(req, inst, (req.deadline_at, req.id))
                continue
            req = self.gq.pop(inst.id)
            if req.first_token_at is None:
                if basics is None and self.basics is not None:
                    basics = self.basics(inst)
                    if self.config.late_in_flight:
                        wait_tok = eng.waiting_tokens()
                        budget = eng.config.max_num_batched_tokens or 1 << 30
                if basics is not None:
                    ttft = self.late_ttft(basics, req.prompt_tokens, wait_tok, budget)
                    if now + ttft > req.deadline_at:
                        self._to_late_lane(req)
                        continue
            wait_tok += req.prompt_tokens + req.num_generated
            if kv_left is not None:
                kv_left -= _kv_peak(req, kv_mu, kv_keep)
            if n_batch is not None and req.deadline_at > batch_cut:
                n_batch += 1
            rt.dispatch(req, inst, (req.deadline_at, req.id))

    def _kv_left(self, inst: Instance) -> float:
        """KV tokens ``inst``'s capacity leaves once every request it holds reaches its
        predicted peak footprint: what its cache holds now, the output the running requests
        are still predicted to write (``_kv_peak``), and the waiting requests' prompts (at
        ``1 - `` the expected prefix-cache hit share) and outputs."""
        cap, mu, keep = self.kv_tokens[inst.id]
        eng = inst.engine
        left = cap - eng.stats().kv_used_tokens
        half = mu / 2.0
        _, gen = eng.running_generated()
        for n in gen:
            left -= mu - n if mu - n > half else half
        for r in eng.waiting_requests():
            left -= r.prompt_tokens * keep + r.num_generated + mu
        return left

    def late_ttft(self, basics: tuple[float, float, float], prompt: float, waiting: float,
                  budget: float) -> float:
        """The late test's time to first token of a request with ``prompt`` tokens dispatched
        now into an engine where ``waiting`` tokens wait (``budget``: its tokens per
        iteration; ``basics`` as ``self.basics``): past its deadline, ``pull`` sends it to
        the late lane. With ``late_in_flight``: the iteration in flight (taken as long as the
        first of its own), then its own: what waits ahead of it and its prompt, chunked;
        without: its prompt's prefill plus one iteration."""
        if self.config.late_in_flight:
            q = prompt + waiting
            f = self.config.in_flight_share
            return (1.0 + f) * basics[1] + basics[2] * (q + f * (q if q < budget else budget))
        return basics[1] + basics[2] * prompt

    def _arm_refill(self, inst: Instance, now_at: float, need: float) -> None:
        """The engine holds its slack of waiting requests and more work is queued for it: pull
        again once the waiting ones have likely entered an iteration (``refill_after`` x one
        iteration of what waits), not only at their first tokens, which come an iteration
        later: otherwise an engine admits one request per two iterations."""
        if self._refill_at.get(inst.id, -1.0) > now_at or self.basics is None:
            return
        _, it, c = self.basics(inst)
        budget = inst.engine.config.max_num_batched_tokens or 1 << 30
        w = inst.engine.waiting_tokens()
        if w + need > budget:
            return  # what waits and the head do not fit one iteration: no early refill
        at = now_at + (self.config.refill_after or 0.0) * (it + c * w)
        self._refill_at[inst.id] = at
        self.rt.host.call_at(at, self._refill, inst)

    def _refill(self, inst: Instance) -> None:
        self._refill_at.pop(inst.id, None)
        if inst.ready:
            self.pull(inst)

    def _free_ride(self, inst: Instance) -> float:
        """Prompt tokens beyond the engine's waiting queue that its next iteration may still
        prefill (0 without ``free_ride`` or an estimator)."""
        if self.config.free_ride <= 0 or self.free_tokens is None:
            return 0.0
        cap_s = self.config.ride_share * (self.tightest_ttft_s or 0.0)
        return (self.free_tokens(inst, self.config.free_ride, cap_s,
                                 self.config.pace_headroom)
                - inst.engine.waiting_tokens())

    def _to_late_lane(self, req: Request) -> None:
        self.late.setdefault(req.model, deque()).append(req)
        self.num_late_queued += 1
        self.num_late += 1
        if self.on_late is not None:
            self.on_late(req)

    def remove_late(self, req: Request) -> bool:
        lane = self.late.get(req.model)
        if lane and req in lane:
            lane.remove(req)
            self.num_late_queued -= 1
            return True
        return False

    # -- rebalance ---------------------------------------------------------------------------
    def steal(self, inst: Instance) -> bool:
        """Move the head group of the busiest same-model instance to idle ``inst``."""
        if inst.id in self.swap_after:
            return False  # it is about to leave its model
        donors = [
            i for i in self.rt.ready_instances(inst.model)
            if i is not inst and self.gq.vq(i.id).num_requests > 0
        ]
        if not donors:
            return False
        donor = max(donors, key=lambda i: self.gq.vq(i.id).num_requests)
        g = self.gq.vq(donor.id).head()
        if g is None:
            return False
        self._move(g, inst.id)
        return True

    def steal_urgent(self, inst: Instance, batch_cut: float) -> bool:
        """About to give a seat to batch work (its own head is due after ``batch_cut``),
        ``inst`` first takes the earliest on-time urgent head group (due by ``batch_cut``, not
        put behind by the plan) waiting on another instance of its model that has no seat for
        it: urgent work never waits on a full instance while a sibling seats batch. Returns
        whether a group moved."""
        if inst.id in self.swap_after or not self.config.steal_urgent:
            return False
        best = None
        for i in self.rt.ready_instances(inst.model):
            if i is inst:
                continue
            h = self.gq.vq(i.id).head()
            if (h is not None and h.tier == 0 and h.deadline_at <= batch_cut
                    and (best is None or h.deadline_at < best.deadline_at)
                    and not self.has_seat(i)):
                best = h
        if best is None:
            return False
        self._move(best, inst.id)
        return True

    def _move(self, g: RequestGroup, instance_id: int) -> None:
        self.gq.place(g, instance_id)
        self.num_rebalanced += g.size
        self.rt.lso_counts["rebalance"] += g.size

    # -- evict -------------------------------------------------------------------------------
    def victims_for(self, inst: Instance, g: RequestGroup,
                    cap: int | None = -1) -> list[Request]:
        """Running requests of lower priority than ``g``'s head whose first token is out and
        whose recompute (prompt + generated tokens) is at most ``cap`` tokens (default:
        ``evict_max_recompute_tokens``; None: any), cheapest first, at most one per member
        of ``g`` (and ``max_victims``)."""
        gen = inst.engine.num_generated
        return sorted(
            self._eligible_victims(inst, g, cap),
            key=lambda r: (-r.priority, r.prompt_tokens + gen(r)),
        )[: min(g.size, self.config.max_victims)]

    def has_victims(self, inst: Instance, g: RequestGroup) -> bool:
        """Whether ``victims_for(inst, g)`` is non-empty, without sorting: the first
        running request that qualifies answers."""
        return any(True for _ in self._eligible_victims(inst, g))

    def _eligible_victims(self, inst: Instance, g: RequestGroup, cap: int | None = -1):
        """The running requests ``victims_for`` chooses from, unsorted (lazily)."""
        pr = g.members[0][2].priority
        # An evicted request recomputes prompt + generated tokens on what is usually a
        # saturated instance: only cheap victims are worth it (measured on the conv trace:
        # a 256-token cap keeps the attainment of evicting and the throughput of not).
        if cap == -1:
            cap = self.config.evict_max_recompute_tokens
        if cap is None:
            cap = 1 << 62
        # a live engine knows only what it streamed back: Request.num_generated
        gen = inst.engine.num_generated
        return (r for r in inst.engine.running_requests()
                if r.priority > pr and r.first_token_at is not None and r.tpot_s is None
                and r.prompt_tokens + gen(r) <= cap)

    def evict_for(self, inst: Instance, g: RequestGroup, now_at: float) -> int:
        """Evict ``victims_for(inst, g)`` to seat ``g``. The victims go back to their groups
        and keep their tokens. Returns how many were evicted."""
        return self._evict(inst, self.victims_for(inst, g), now_at)

    def _evict(self, inst: Instance, victims: Sequence[Request], now_at: float) -> int:
        n = 0
        for v in victims:
            got = self.rt.evict(inst, v.id)
            if got is not None:
                n += 1
                gg, _ = self.gq.requeue(got, now_at)
                if gg.instance_id == UNPLACED:
                    self.gq.place(gg, inst.id)
        return n

    # -- swap --------------------------------------------------------------------------------
    def can_swap(self, inst: Instance, now_at: float) -> bool:
        last = self._last_swap_at.get(inst.id)
        if not inst.ready:
            return False
        if last is None:
            return True
        dwell = max(self.config.min_swap_interval_s,
                    self.config.min_dwell_swaps * self.rt.swap_time_s(inst, inst.model))
        return now_at - last >= dwell

    def swap(self, inst: Instance, model: str, now_at: float) -> list[Request]:
        """Drain ``inst`` and load ``model``. Its queued groups go to the pool (re-placed by
        the caller); requests taken back from the engine are returned for re-queueing."""
        rt = self.rt
        self.swap_after.pop(inst.id, None)
        for g in list(self.gq.vq(inst.id).groups.values()):
            self.gq.place(g, UNPLACED)
        back: list[Request] = []
        if self.config.evict_on_swap:
            for r in list(inst.engine.running_requests()):
                got = rt.evict(inst, r.id)
                if got is not None:
                    back.append(got)
        back.extend(rt.drain_and_swap(inst, model))
        self._last_swap_at[inst.id] = now_at
        log.debug("swap instance %d -> %s", inst.id, model)
        return back

    def _maybe_swap_after(self, inst: Instance, now_at: float) -> None:
        """"Serve these groups, then swap": the instance's queue of its old model is empty."""
        model = self.swap_after.get(inst.id)
        if model is None or self.gq.vq(inst.id).num_requests:
            return
        for r in self.swap(inst, model, now_at):
            self.gq.requeue(r, now_at)  # unplaced: the policy places it on its next pass

    def cover(self, model: str, cost: Callable | None = None) -> list[Request] | None:
        """Coverage: swap some instance to ``model`` when none holds it and none is on the
        way (requests must complete even where no plan finds them worth a swap). The victim
        is the least-loaded instance that is not the last holder of its model, or the one
        with the lowest ``cost(instance)``. Returns the requests taken back from its engine,
        or None when no swap started."""
        rt = self.rt
        if rt.ready_instances(model) or any(i.swap_to == model for i in rt.instances):
            return None
        if any(m == model for m in self.swap_after.values()):
            return None
        cands = [i for i in rt.instances if i.ready and rt.fleet.can_serve(i.spec, model)]
        if not cands:
            return None
        if cost is not None:
            victim = min(cands, key=cost)
        else:  # engine and virtual-queue load
            victim = least_loaded_victim(
                cands, rt.instances, lambda i: i.engine.load() + self.gq.vq(i.id).num_requests)
        self.totals["cover_swap"] += 1
        return self.swap(victim, model, rt.now())

    # -- plans -------------------------------------------------------------------------------
    def apply(self, plan: Plan, pi: PlanningProblem, now_at: float,
              members: Mapping[str, Sequence[RequestGroup]] | None = None) -> Counter[str]:
        """Issue the LSOs that move the fleet towards ``plan``; returns this epoch's counts.
        ``members`` maps a planning group's id to the queue groups it stands for (the
        planner may see several queue groups as one); by default a planning group is the
        queue group of the same id. Requests that come back from an engine (taken back for a
        swap) are left in ``requeued`` for the caller to return to the global queue."""
        rt = self.rt
        counts: Counter[str] = Counter()
        if members is None:
            members = {str(g.id): (g,) for g in self.gq.groups.values()}
        live = self.gq.groups

        def queued(gid: str) -> list[RequestGroup]:
            return [g for g in members.get(gid, ()) if g.id in live and g.size > 0]

        by_id = pi.group_by_id()
        w = pi.weights
        # the executor's swap rule and the objective's swap term in one unit
        swap_cost = w.swap_penalty
        self.requeued = []
        for ip in plan.instances:
            inst = rt.instances[ip.instance_id]
            target = ip.final_model
            if target is None or target == inst.model or inst.swap_to == target:
                continue
            if not self.can_swap(inst, now_at):
                continue
            # Forecast groups (expected arrivals) count too: that is what makes a swap last.
            gain = sum(
                by_id[gid].weight for gid in ip.group_ids
                if gid in by_id and by_id[gid].model == target
                and plan.timings.get(gid) is not None and plan.timings[gid].on_time
            )
            if w.on_time * gain <= swap_cost:
                continue
            # "Serve these groups, then swap": the plan serves groups of the current model
            # first; keep them here and swap when they are done.
            keep = [g for gid in ip.group_ids if plan.timings[gid].on_time
                    for g in queued(gid) if g.model == inst.model]
            if keep:
                self.swap_after[inst.id] = target
                for g in list(self.gq.vq(inst.id).groups.values()):
                    if g not in keep:
                        self.gq.place(g, UNPLACED)
                for g in keep:
                    if g.instance_id != inst.id:
                        self._move(g, inst.id)
                counts["swap_after"] += 1
                continue
            self.requeued.extend(self.swap(inst, target, now_at))
            counts["swap"] += 1
        for ip in plan.instances:
            inst = rt.instances[ip.instance_id]
            holds = inst.swap_to if inst.state != InstanceState.READY else inst.model
            for gid, g in ((gid, g) for gid in ip.group_ids for g in queued(gid)):
                t = plan.timings.get(gid)
                if self.config.demote_late and t is not None:
                    self.gq.set_tier(g, 0 if t.on_time else 1)
                if g.instance_id == ip.instance_id or g.model != holds:
                    continue
                if inst.state == InstanceState.DRAINING or (
                        inst.id in self.swap_after and g.model == inst.model):
                    continue
                moved = g.instance_id != UNPLACED
                if moved and not self._should_move(g, plan, gid, inst):
                    continue
                if moved:
                    self._move(g, ip.instance_id)
                    counts["rebalance"] += g.size
                    log.debug("rebalance group %s (%d requests) -> instance %d", gid, g.size,
                              ip.instance_id)
                else:
                    self.gq.place(g, ip.instance_id)
        self.batch_seats = dict(plan.batch_seats)
        self.seat_caps = dict(plan.seat_caps)
        self.evicted_on = set()
        if self.config.planned_evict:
            for ip in plan.instances:
                n = self._planned_evict(ip, plan, pi, by_id, queued, now_at)
                if n:
                    counts["evict"] += n
                    self.evicted_on.add(ip.instance_id)
        self.totals.update(counts)
        return counts

    def _planned_evict(self, ip, plan: Plan, pi: PlanningProblem, by_id, queued,
                       now_at: float) -> int:
        """Evict for the plan's first group on ``ip``'s instance when that pays in the
        objective (see the module docstring). Returns how many requests were evicted."""
        if not ip.group_ids:
            return 0
        inst = self.rt.instances[ip.instance_id]
        if not inst.ready or inst.id in self.swap_after:
            return 0
        gid = ip.group_ids[0]
        pg, t = by_id.get(gid), plan.timings.get(gid)
        if pg is None or t is None or t.on_time or pg.model != inst.model:
            return 0
        service = pg.service_ms.get(inst.id)
        if service is None:
            return 0
        start_by = pg.deadline_on(inst.id) - service  # latest on-time start, ms from now
        if start_by < 0 or start_by > 1000 * self.config.urgent_window_s:
            return 0  # past hope even now, or not urgent
        gs = sorted((g for g in queued(gid) if g.instance_id == inst.id),
                    key=lambda g: g.deadline_at)
        if not gs or self.has_seat(inst):
            return 0
        victims = self.victims_for(inst, gs[0], cap=None)
        if not victims:
            return 0
        victims = victims[: min(pg.size, self.config.max_victims)]
        w = pi.weights
        gain = SWAP_SCALE * w.on_time * pg.weight * len(victims) / max(pg.size, 1)
        c_tok = self.basics(inst)[2] if self.basics is not None else 0.0
        gen = inst.engine.num_generated
        delay_ms = 1000.0 * c_tok * sum(v.prompt_tokens + gen(v) for v in victims)
        # the victims finish later by their recompute, and so does every later group here
        cost = w.completion_penalty * delay_ms * (len(victims) + len(ip.group_ids) - 1)
        for later in ip.group_ids[1:]:
            lt, lg = plan.timings.get(later), by_id.get(later)
            if (lt is not None and lg is not None and lt.on_time
                    and lt.end_ms + delay_ms > lg.deadline_on(inst.id)):
                cost += SWAP_SCALE * w.on_time * lg.weight
        if gain <= cost:
            self.totals["evict_not_worth"] += 1
            return 0
        n = self._evict(inst, victims, now_at)
        if n:
            for g in gs:  # on time now: back in front of the batch work
                self.gq.set_tier(g, 0)
        return n

    def _should_move(self, g: RequestGroup, plan: Plan, gid: str, to: Instance) -> bool:
        """Rebalance a queued group only when it gains: its instance is leaving its model, or
        the plan has it on time where it goes and the estimator predicts a miss where it is
        but not where it goes. Moving every group the plan happens to put elsewhere churns
        (equal instances are interchangeable to the solver); under overload, where the
        estimator predicts misses everywhere, the plan's snapshot alone moved groups back
        and forth between two instances every epoch."""
        cur = self.rt.instances[g.instance_id]
        if not cur.ready or cur.model != g.model or cur.id in self.swap_after:
            return True
        if not self.config.rebalance:
            return False
        t = plan.timings.get(gid)
        if t is None or not t.on_time:
            return False
        if g.deadline_at - self.rt.now() > self.config.rebalance_horizon_s:
            return False  # far from its deadline: stealing by idle instances balances it
        return (self.predicts_miss is not None and self.predicts_miss(g, cur)
                and not self.predicts_miss(g, to))


def group_weight(g: RequestGroup, class_weight: float) -> int:
    """Planner weight of a group: requests x class weight, in ``REQUEST_WEIGHT`` units."""
    return max(1, int(round(g.size * class_weight * REQUEST_WEIGHT)))
