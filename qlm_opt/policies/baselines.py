"""Baseline policies: what a fleet does without QLM.

- ``fcfs``: vLLM as deployed: route each request on arrival to the least-loaded instance that
  holds its model; each engine serves first-come first-served.
- ``edf``: the same routing; engines order by deadline (earliest TTFT deadline first).
- ``priority``: the same routing; engines order by class priority (interactive first), then
  arrival.
- ``shepherd``: in the spirit of SHEPHERD (NSDI'23): a central queue per (model, class);
  instances are fed in per-class batches only when they have free seats, so work never piles
  up in an engine; batch-class requests are preempted to admit waiting interactive ones.

All of them swap models on demand through ``SwapOnDemand``.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from qlm_opt.domain import Request, RequestState
from qlm_opt.core.policy import Policy
from qlm_opt.policies.swap_on_demand import SwapOnDemand

if TYPE_CHECKING:
    from qlm_opt.core.instance import Instance
    from qlm_opt.core.runtime import Runtime


class EngineQueuePolicy(Policy, SwapOnDemand):
    """Route on arrival to the least-loaded instance holding the model; the engine's own
    waiting queue orders requests by ``key(req)``."""

    name = "fcfs"

    def __init__(self) -> None:
        SwapOnDemand.__init__(self)

    def key(self, req: Request) -> tuple:
        return (req.arrived_at, req.id)

    def bind(self, rt: Runtime) -> None:
        super().bind(rt)

    def on_arrival(self, req: Request) -> None:
        rt = self.rt
        insts = rt.ready_instances(req.model)
        if insts:
            best = insts[0]
            if len(insts) > 1:
                best_load = best.engine.load()
                for i in insts:
                    ld = i.engine.load()
                    if ld < best_load:
                        best, best_load = i, ld
            rt.dispatch(req, best, self.key(req))
        elif rt.can_serve_anywhere(req.model):
            self.park(rt, req)
        else:
            rt.drop(req, "no_instance_can_serve_model")

    def requeue(self, rt: Runtime, req: Request) -> None:
        self.on_arrival(req)

    def remove(self, req: Request) -> bool:
        """Cancel: only parked requests are held here (the others are in engines)."""
        return SwapOnDemand.remove(self, req)

    def on_instance_ready(self, inst: Instance) -> None:
        for r in self.take_pending(inst.model):
            self.on_arrival(r)
        self.retry_parked(self.rt)

    def num_queued(self) -> int:
        return self._num_pending


class FCFSPolicy(EngineQueuePolicy):
    name = "fcfs"


class EDFPolicy(EngineQueuePolicy):
    name = "edf"

    def key(self, req: Request) -> tuple:
        return (req.deadline_at, req.id)


class PriorityPolicy(EngineQueuePolicy):
    name = "priority"

    def key(self, req: Request) -> tuple:
        return (req.priority, req.arrived_at, req.id)


class ShepherdPolicy(Policy, SwapOnDemand):
    """Central per-(model, class) queues, per-class batches, preemption of batch work."""

    name = "shepherd"

    def __init__(self, batch_size: int = 32) -> None:
        SwapOnDemand.__init__(self)
        self.batch_size = batch_size
        # model -> priority -> queue (FIFO inside a class)
        self.queues: dict[str, dict[int, deque[Request]]] = {}
        self._num_queued = 0
        # instance id -> priority -> requests dispatched there (a stack of eviction candidates;
        # entries that finished or moved are skipped lazily)
        self._dispatched: dict[int, dict[int, list[Request]]] = {}

    def _queue(self, req: Request) -> deque[Request]:
        per_model = self.queues.setdefault(req.model, {})
        q = per_model.get(req.priority)
        if q is None:
            q = per_model[req.priority] = deque()
        return q

    def on_arrival(self, req: Request, front: bool = False) -> None:
        rt = self.rt
        if not rt.ready_instances(req.model):
            if rt.can_serve_anywhere(req.model):
                self.park(rt, req)
            else:
                rt.drop(req, "no_instance_can_serve_model")
            return
        q = self._queue(req)
        q.appendleft(req) if front else q.append(req)
        self._num_queued += 1
        self._feed(req.model)

    def requeue(self, rt: Runtime, req: Request) -> None:
        self.on_arrival(req, front=True)

    def on_requeue(self, req: Request) -> None:
        self.on_arrival(req, front=True)

    def on_finished(self, req: Request) -> None:
        self._feed(req.model)

    def on_instance_ready(self, inst: Instance) -> None:
        for r in self.take_pending(inst.model):
            self.on_arrival(r)
        if inst.model in self.queues:
            self._feed(inst.model)
        self.retry_parked(self.rt)

    def num_queued(self) -> int:
        return self._num_queued + self._num_pending

    def remove(self, req: Request) -> bool:
        """Cancel: take ``req`` out of its class queue (or out of the parked requests)."""
        q = self.queues.get(req.model, {}).get(req.priority)
        if q:
            try:
                q.remove(req)
            except ValueError:
                pass
            else:
                self._num_queued -= 1
                return True
        return SwapOnDemand.remove(self, req)

    def _feed(self, model: str) -> None:
        """Give instances of ``model`` work up to their seat count, most urgent class first,
        in batches; preempt batch work when urgent requests still wait."""
        rt = self.rt
        per_model = self.queues.get(model)
        if not per_model:
            return
        insts = rt.ready_instances(model)
        if not insts:
            return
        for prio in sorted(per_model):
            q = per_model[prio]
            while q:
                inst = min(insts, key=lambda i: (i.engine.load(), i.id))
                free = inst.engine.config.max_num_seqs - inst.engine.load()
                if free <= 0:
                    break
                for _ in range(min(free, self.batch_size, len(q))):
                    self._dispatch(q.popleft(), inst)
        # Preemption: urgent requests still queued while instances run lower-priority work.
        prios = sorted(p for p, q in per_model.items() if q)
        if not prios:
            return
        top = prios[0]
        need = len(per_model[top])
        for inst in insts:
            if need <= 0:
                break
            evicted = 0
            stacks = self._dispatched.get(inst.id, {})
            for prio in sorted((p for p in stacks if p > top), reverse=True):
                stack = stacks[prio]
                while stack and need > 0:
                    v = stack.pop()  # most recently dispatched: least work lost
                    if v.is_done or v.instance_id != inst.id or v.state not in (
                        RequestState.RUNNING, RequestState.WAITING
                    ):
                        continue
                    got = rt.evict(inst, v.id)
                    if got is not None:
                        need -= 1
                        evicted += 1
                        self._queue(got).appendleft(got)
                        self._num_queued += 1
            if evicted:
                q = per_model[top]
                free = inst.engine.config.max_num_seqs - inst.engine.load()
                for _ in range(min(free, len(q))):
                    self._dispatch(q.popleft(), inst)

    def _dispatch(self, r: Request, inst: Instance) -> None:
        self._num_queued -= 1
        self.rt.dispatch(r, inst, (r.priority, r.arrived_at, r.id))
        self._dispatched.setdefault(inst.id, {}).setdefault(r.priority, []).append(r)
