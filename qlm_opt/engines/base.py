"""The Engine interface: the only way the scheduler touches a serving instance.

The same scheduler code drives the simulated engine (what-if runs and the embedded fleet),
an in-process vLLM ``AsyncLLM`` and remote vLLM servers. Engines report progress to an
``EngineListener``; they never call back into policies directly.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from qlm_opt.domain import EngineStats, Request


class EngineListener(Protocol):
    """Receives engine events. ``at`` is the clock time at which the event happened, which a
    simulated engine may report up to one iteration after the call that produced it."""

    def on_first_token(self, req: Request, at: float) -> None:
        """The request's first output token (or, after a resume, nothing: called once)."""

    def on_finished(self, req: Request, at: float) -> None:
        """The request ended normally (EOS, length cap). ``req.state`` is FINISHED."""

    def on_failed(self, req: Request, at: float, reason: str) -> None:
        """The engine could not serve the request (prompt too long, engine crash). The
        request keeps its generated tokens; the scheduler re-queues or drops it."""


@runtime_checkable
class Engine(Protocol):
    """One serving instance (one model on ``tp`` GPUs)."""

    instance_id: int
    model: str | None

    def submit(self, req: Request, priority: tuple) -> None:
        """Hand a request to the engine's own waiting queue (Pull LSO). Smaller ``priority``
        tuples are scheduled first, as in vLLM's priority policy. A request that was evicted
        earlier resumes by recomputing prompt + generated tokens."""

    def abort(self, req_id: int) -> Request | None:
        """Remove a waiting or running request (Evict LSO, client disconnect). Returns it with
        its generated tokens kept, or None when the engine does not hold it."""

    def stats(self) -> EngineStats:
        """A cheap snapshot of load, KV use and throughput for the RWT estimator."""

    def requests(self) -> list[Request]:
        """Requests the engine holds (waiting and running), for rebalancing and estimates."""

    def running_requests(self) -> list[Request]:
        """Requests being prefilled or decoded."""

    def waiting_requests(self) -> list[Request]:
        """Requests in the engine's own waiting queue, in its scheduling order."""

    def load(self) -> int:
        """Requests held (running + waiting); the routing signal of vLLM-style routers."""

    @property
    def is_idle(self) -> bool:
        """True when the engine holds no request (a swap may start)."""

    def start_swap(
        self, model: str, duration_s: float, iter_model, kv_capacity_tokens: int,
        max_model_len: int | None = None,
    ) -> float:
        """Begin loading ``model`` (Swap LSO). The engine must hold no requests. The simulated
        engine charges ``duration_s``; live engines do the real swap. Returns the expected
        duration in seconds. Engines also expose ``config.max_num_seqs``, ``busy_s`` (time
        spent computing) and ``num_preemptions``."""
