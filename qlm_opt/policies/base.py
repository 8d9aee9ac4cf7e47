"""The policy interface, shared by the baselines and the QLM policies.

A policy decides; the ``Runtime`` applies (LSOs). Every hook runs at a definite clock time
from the host's timer, never inside an engine call.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from qlm_opt.domain import Request

if TYPE_CHECKING:
    from qlm_opt.runtime import Instance, Runtime


class Policy:
    """Base class. Subclasses override the hooks they need."""

    name = "base"
    #: seconds between ``on_epoch`` calls; None for purely event-driven policies
    epoch_s: float | None = None

    def bind(self, rt: Runtime) -> None:
        """Called once, before the first request, with the runtime to act through."""
        self.rt = rt

    def on_arrival(self, req: Request) -> None:
        """A new request was accepted."""
        raise NotImplementedError

    def on_finished(self, req: Request) -> None:
        """A request finished; its instance has freed capacity."""

    def on_requeue(self, req: Request) -> None:
        """A request came back without finishing (evicted, engine failure, drained for a
        swap). It keeps its generated tokens; the default treats it as a new arrival."""
        self.on_arrival(req)

    def on_instance_ready(self, inst: Instance) -> None:
        """An instance finished a model swap."""

    def on_epoch(self) -> None:
        """Periodic hook when ``epoch_s`` is set."""

    def num_queued(self) -> int:
        """Requests held by the policy, in no engine."""
        return 0

    def remove(self, req: Request) -> bool:
        """Cancel: forget a request the policy holds (in no engine); the runtime ends it.
        Returns False when the policy does not hold it."""
        return False


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
        held: dict[str | None, int] = {}
        for i in rt.instances:
            if i.ready:
                held[i.model] = held.get(i.model, 0) + 1

        def cost(i: Instance) -> tuple:
            # Prefer not to take away the last instance of a model, then the least loaded.
            return (held.get(i.model, 0) <= 1 and i.engine.load() > 0, i.engine.load(), i.id)

        victim = min(cands, key=cost)
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
