"""The policy interface, shared by the baselines and the QLM policies.

A policy decides; the runtime (``qlm_opt.core.runtime``) applies, through the executor's LSOs.
The runtime calls these hooks at definite clock times from the host's timer, never inside an
engine call. ``bind`` hands the policy the runtime it acts through (``self.rt``); this module
does not import the runtime, so that the runtime can depend on this interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qlm_opt.domain import Request

if TYPE_CHECKING:  # types only; no import at run time
    from qlm_opt.core.estimator import RWTEstimator
    from qlm_opt.core.instance import Instance
    from qlm_opt.planner import Plan


class Policy:
    """Base class. Subclasses override the hooks they need."""

    name = "base"
    #: seconds between ``on_epoch`` calls; None for purely event-driven policies
    epoch_s: float | None = None
    #: the policy's RWT estimator (``qlm``, ``qlm-rwt``); None for policies without one. The
    #: server's Retry-After uses it when there is one.
    est: RWTEstimator | None = None
    #: planning policies: the last epoch's plan, and build + solve ms of every epoch
    last_plan: Plan | None = None
    solve_ms: list[float] | tuple = ()

    def bind(self, rt) -> None:
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

    def make_deterministic(self) -> None:
        """What-if runs: make every decision reproducible from the seed (a solver's
        deterministic time limit, say). Nothing to do by default."""

    def report(self) -> dict:
        """Numbers for ``report.json`` and ``/metrics`` (nested sections allowed)."""
        return {}

    def current_plan(self) -> dict | None:
        """Planning policies: the plan in force, as plain data (``/admin/plan``)."""
        return None

    def remove(self, req: Request) -> bool:
        """Cancel: forget a request the policy holds (in no engine); the runtime ends it.
        Returns False when the policy does not hold it."""
        return False
