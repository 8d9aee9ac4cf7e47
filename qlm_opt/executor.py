"""The executor: turns a ``Plan`` into LLM Serving Operations on the fleet.

It compares the plan with the current state and issues, through the ``Runtime``:
- **Swap** where the plan gives an instance another model *and* the on-time weight the plan
  puts on that instance under the new model exceeds the swap's cost (in the objective's own
  units), and the instance has not swapped within ``min_swap_interval_s`` (no thrashing).
  Running requests are evicted (they keep their tokens and resume elsewhere by recompute), so
  the swap starts at once instead of waiting for long batch requests to drain.
- **Rebalance**: a queued group whose planned instance differs from its virtual queue moves
  there (queued work only; running requests never move).
Pull and Evict happen continuously in the policy (``QLMRWTPolicy._pump``/``_maybe_evict``),
because they react to capacity freeing between epochs.

Every LSO is counted in ``Runtime.lso_counts`` and logged at DEBUG; ``apply`` returns the
epoch's counts for the one summary line per epoch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qlm_opt.planner import Plan, PlanningInstance
from qlm_opt.queue import UNPLACED, GlobalQueue, RequestGroup
from qlm_opt.runtime import InstanceState

if TYPE_CHECKING:
    from qlm_opt.runtime import Instance, Runtime

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ExecutorConfig:
    min_swap_interval_s: float = 60.0  # an instance swaps at most this often
    evict_on_swap: bool = False  # evict running requests instead of draining them


class Executor:
    """Applies plans to the fleet; see the module docstring."""

    def __init__(self, rt: Runtime, gq: GlobalQueue, config: ExecutorConfig | None = None):
        self.rt = rt
        self.gq = gq
        self.config = config or ExecutorConfig()
        self._last_swap_at: dict[int, float] = {}  # instance id -> clock time of last swap
        # (group, instance) -> whether the group is predicted to miss its deadline there;
        # set by the policy (it owns the estimator)
        self.predicts_miss = None
        self.totals: Counter[str] = Counter()

    def can_swap(self, inst: Instance, now_at: float) -> bool:
        last = self._last_swap_at.get(inst.id)
        return inst.ready and (last is None or now_at - last >= self.config.min_swap_interval_s)

    def apply(self, plan: Plan, pi: PlanningInstance, now_at: float) -> Counter[str]:
        """Issue the LSOs that move the fleet towards ``plan``. Returns this epoch's counts.
        Requests that come back from an engine (evicted for a swap) are returned to the
        global queue by the caller through ``requeued``."""
        rt = self.rt
        counts: Counter[str] = Counter()
        groups = {str(g.id): g for g in self.gq.groups.values()}
        weights = {g.id: g.weight for g in pi.groups}
        models = {g.id: g.model for g in pi.groups}
        swap_cost = pi.weights.swap_penalty
        self.requeued: list = []
        for ip in plan.instances:
            inst = rt.instances[ip.instance_id]
            target = ip.final_model
            if target is None or target == inst.model or inst.swap_to == target:
                continue
            if not self.can_swap(inst, now_at):
                continue
            # Forecast groups (expected arrivals) count too: that is what makes a swap last.
            gain = sum(
                weights.get(gid, 0)
                for gid in ip.group_ids
                if plan.timings.get(gid) is not None and plan.timings[gid].on_time
                and models.get(gid) == target
            )
            if gain <= swap_cost:
                continue
            self._swap(inst, target, now_at)
            counts["swap"] += 1
        for ip in plan.instances:
            inst = rt.instances[ip.instance_id]
            holds = inst.swap_to if inst.state != InstanceState.READY else inst.model
            for gid in ip.group_ids:
                g = groups.get(gid)
                if g is None or g.instance_id == ip.instance_id or g.model != holds:
                    continue
                if inst.state == InstanceState.DRAINING:
                    continue
                moved = g.instance_id != UNPLACED
                if moved and not self._should_move(g, plan, gid):
                    continue
                self.gq.place(g, ip.instance_id)
                if moved:
                    counts["rebalance"] += g.size
                    rt.lso_counts["rebalance"] += g.size
                    log.debug("rebalance group %s (%d requests) -> instance %d", gid, g.size,
                              ip.instance_id)
        self.totals.update(counts)
        return counts

    def _should_move(self, g: RequestGroup, plan: Plan, gid: str) -> bool:
        """Rebalance a queued group only when it gains: its instance is leaving its model, or
        the plan has it on time where it goes while the estimator predicts a miss where it
        is. Moving every group the plan happens to put elsewhere churns (equal instances are
        interchangeable to the solver) and costs KV preemptions."""
        cur = self.rt.instances[g.instance_id]
        if not cur.ready or cur.model != g.model:
            return True
        t = plan.timings.get(gid)
        if t is None or not t.on_time:
            return False
        return self.predicts_miss is not None and self.predicts_miss(g, cur)

    def _swap(self, inst: Instance, model: str, now_at: float) -> None:
        rt = self.rt
        for g in list(self.gq.vq(inst.id).groups.values()):
            self.gq.place(g, UNPLACED)  # its queued groups are re-placed by the plan
        if self.config.evict_on_swap:
            for r in list(inst.engine.running_requests()):
                got = rt.evict(inst, r.id)
                if got is not None:
                    self.requeued.append(got)
        self.requeued.extend(rt.drain_and_swap(inst, model))
        self._last_swap_at[inst.id] = now_at
        log.debug("swap instance %d -> %s", inst.id, model)


def group_weight(g: RequestGroup, class_weight: float, scale: int = 10) -> int:
    """Planner weight of a group: requests x class weight, scaled to an integer."""
    return max(1, int(round(g.size * class_weight * scale)))
