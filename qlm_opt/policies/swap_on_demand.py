"""Swap on demand: how the baselines get a model that no instance holds."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from qlm_opt.core.instance import least_loaded_victim
from qlm_opt.domain import Request

if TYPE_CHECKING:
    from qlm_opt.core.runtime import Runtime


class SwapOnDemand:
    """Requests for a model no instance holds wait here; the least-loaded instance that can
    serve the model is drained and swapped to it (QLM reference behaviour for baselines)."""

    def __init__(self) -> None:
        self.pending: dict[str, deque[Request]] = {}  # model -> requests waiting for it
        self._num_pending = 0

    def park(self, rt: Runtime, req: Request) -> None:
        q = self.pending.get(req.model)
        if q is None:
            q = self.pending[req.model] = deque()
        q.append(req)
        self._num_pending += 1
        if any(i.swap_to == req.model for i in rt.instances):
            return
        cands = [
            i for i in rt.instances if i.ready and rt.fleet.can_serve(i.spec, req.model)
        ]
        if not cands:
            return  # every candidate is busy swapping; retried when one becomes ready
        # not the last instance of a model with work, then the least loaded
        victim = least_loaded_victim(cands, rt.instances, lambda i: i.engine.load())
        for r in rt.drain_and_swap(victim, req.model):
            self.requeue(rt, r)

    def requeue(self, rt: Runtime, req: Request) -> None:
        raise NotImplementedError

    def remove(self, req: Request) -> bool:
        """Cancel: take a parked request out. False when it is not parked here."""
        q = self.pending.get(req.model)
        if not q:
            return False
        try:
            q.remove(req)
        except ValueError:
            return False
        self._num_pending -= 1
        if not q:
            del self.pending[req.model]
        return True

    def take_pending(self, model: str | None) -> list[Request]:
        q = self.pending.pop(model, None)
        if not q:
            return []
        self._num_pending -= len(q)
        return list(q)

    def retry_parked(self, rt: Runtime) -> None:
        """Re-trigger swaps for models still waiting with no instance on the way."""
        for model, q in list(self.pending.items()):
            if q and not rt.ready_instances(model) and not any(
                i.swap_to == model for i in rt.instances
            ):
                req = q.pop()
                self._num_pending -= 1
                self.park(rt, req)
