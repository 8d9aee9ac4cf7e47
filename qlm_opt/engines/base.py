"""The engine protocol: everything the scheduler may use of a serving instance, and nothing else.

The same scheduler code drives three engine classes: the simulated engine
(``engines.simulated.SimEngine``: what-if runs and the embedded fleet), an in-process vLLM
``AsyncLLM`` (``engines.vllm_local``) and remote vLLM servers (``engines.vllm_remote``).
A new engine implements ``Engine`` below, whole; ``tests/engine_conformance.py`` checks every
engine class against it. The scheduler never probes an engine for optional members: what
differs between engines is declared here as a capability (``reports_swap_done``,
``can_swap``, ``process_alive``).

Units: times ending in ``_at`` are seconds on the host's clock (``Runtime.now()``: virtual
in what-if runs, wall since start when serving); durations end in ``_s``; token counts are
tokens. Engines report events to an ``EngineListener`` (the ``Runtime``); they never call a
policy. Who calls what, and when:

- the **executor** (``core/executor.py``) issues the LSOs: ``submit`` (pull), ``abort``
  (evict, rebalance), ``start_swap`` (through ``Runtime.drain_and_swap``);
- the **runtime** ends a swap (``end_swap``) and reads ``is_idle`` to start one;
- the **RWT estimator** and the policies read ``stats()``, ``running_requests()``,
  ``waiting_requests()``, ``num_generated()``, ``load()`` and ``config`` at every arrival,
  completion and epoch: these must be cheap (no I/O);
- the **server** reads the health counters (``down``, ``num_downs``, ``num_restarts``) and
  ``process_alive()`` in its health loop and on ``/metrics``.

Engines whose iterations the host clocks (the simulated engine) also implement
``SteppedEngine``: the host wakes them at the times they ask for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from qlm_opt.domain import EngineStats, Request


class EngineListener(Protocol):
    """Receives engine events (the ``Runtime``). ``at`` is the clock time at which the event
    happened, which a simulated engine may report up to one iteration after the call that
    produced it."""

    def on_first_token(self, req: Request, at: float) -> None:
        """The request's first output token (or, after a resume, nothing: called once)."""

    def on_finished(self, req: Request, at: float) -> None:
        """The request ended normally (EOS, length cap). ``req.state`` is FINISHED."""

    def on_failed(self, req: Request, at: float, reason: str) -> None:
        """The engine could not serve the request (prompt too long, engine crash). The
        request keeps its generated tokens; the scheduler re-queues or drops it."""

    def on_swap_done(self, engine: Engine, at: float) -> None:
        """Engines with ``reports_swap_done``: the new model is servable from ``at`` (after a
        swap, or after a restart that brought a dead engine back)."""

    def on_engine_down(self, engine: Engine, at: float) -> None:
        """A live engine died; its requests fail next (``on_failed``)."""


class EngineLimits(Protocol):
    """``Engine.config``: the engine's scheduler limits, as vLLM names them."""

    max_num_seqs: int  # sequences in one batch (seats)
    max_num_batched_tokens: int | None  # tokens in one iteration (None: the engine's default)
    max_model_len: int | None  # context limit, tokens (None: the model's own)


@runtime_checkable
class Engine(Protocol):
    """One serving instance: one model on ``tp`` GPUs (see the module docstring)."""

    # -- identity and limits -------------------------------------------------------------
    instance_id: int  # the fleet's instance id (``InstanceSpec.id``)
    model: str | None  # model held, or being loaded during a swap; None: empty
    config: EngineLimits
    max_model_len: int  # longest prompt + output it takes now, tokens

    # -- declared capabilities -----------------------------------------------------------
    #: True: the engine calls ``listener.on_swap_done`` when a swap ends (live engines, whose
    #: load time is measured, not modelled). False: the runtime ends the swap itself by a timer
    #: at ``swap_until_at`` and calls ``end_swap``.
    reports_swap_done: bool

    @property
    def can_swap(self) -> bool:
        """Whether ``start_swap`` may be called at all (an external server that qlm-opt does
        not manage cannot load another model)."""

    def process_alive(self) -> bool | None:
        """Liveness of a server process the engine manages: True/False, or None when there is
        no process to watch (simulated and in-process engines). Cheap; no I/O."""

    # -- health (the server's health loop and /metrics) ---------------------------------
    down: bool  # the engine died and is not back yet (always False for simulated engines)
    num_downs: int  # times the engine was found dead
    num_restarts: int  # restarts after failures that brought it back
    last_start_s: float | None  # measured duration of the last model load (None: not measured)
    last_swap_s: float | None  # measured duration of the last swap (None: not measured)

    # -- LSOs ----------------------------------------------------------------------------
    def submit(self, req: Request, priority: tuple) -> None:
        """Pull: hand a request to the engine's own waiting queue. Smaller ``priority``
        tuples are scheduled first, as in vLLM's priority policy. A request evicted earlier
        resumes by recomputing prompt + generated tokens. The engine must hold
        ``req.model`` and not be swapping."""

    def abort(self, req_id: int) -> Request | None:
        """Evict (or cancel): remove a waiting or running request. Returns it with its
        generated tokens kept, or None when the engine does not hold it."""

    def start_swap(self, model: str, duration_s: float, iter_model, kv_capacity_tokens: int,
                   max_model_len: int | None = None) -> float:
        """Swap: begin loading ``model``. The engine must be idle. The simulated engine
        charges ``duration_s`` (with ``iter_model``, its ``engines.perf.IterationModel``,
        and ``kv_capacity_tokens`` for the new model); live engines do the real swap.
        Returns the expected duration in seconds."""

    def end_swap(self, now: float) -> None:
        """The runtime's swap timer fired at ``now`` (engines without
        ``reports_swap_done``): serve from ``now``. Live engines ignore it."""

    # -- state (cheap reads for the estimator and the policies) --------------------------
    swap_until_at: float  # expected end of the swap in progress (0 or past: none)
    busy_s: float  # seconds spent computing so far (utilisation)
    num_preemptions: int  # engine-internal preemptions (KV pressure)

    def stats(self) -> EngineStats:
        """A snapshot of load, KV use and throughput (see ``domain.EngineStats``)."""

    def running_requests(self) -> list[Request]:
        """Requests being prefilled or decoded."""

    def waiting_requests(self) -> list[Request]:
        """Requests in the engine's own waiting queue, in its scheduling order."""

    def num_generated(self, req: Request) -> int:
        """Output tokens ``req`` has now (a simulated engine counts decode iterations lazily,
        so ``req.num_generated`` may lag behind; live engines return it)."""

    def load(self) -> int:
        """Requests held (running + waiting): the routing signal of vLLM-style routers."""

    @property
    def is_idle(self) -> bool:
        """True when the engine holds no request (a swap may start)."""

    # -- the estimator's and the executor's hot reads (one pass, no sorting) -------------
    def running_generated(self) -> tuple[list[Request], list[int]]:
        """``running_requests()`` and ``num_generated`` of each, together."""

    def prefill_summary(self, now_at: float) -> tuple[int, int] | None:
        """``prefill_pass(running_requests(), now_at)``, possibly without visiting the whole
        batch; None when the engine cannot answer for this ``now_at`` (the caller then runs
        ``prefill_pass`` itself)."""

    def waiting_tokens(self) -> int:
        """Prompt plus generated tokens (to recompute) of the waiting requests."""

    def seat_counts(self) -> tuple[int, int, int]:
        """(running, waiting, max_num_seqs): the part of ``stats()`` a pull reads."""

    def held_due_after(self, at: float) -> int:
        """Requests held (running or waiting) whose ``deadline_at`` is after ``at``: the
        batch work that counts against a plan's admission cap."""


def prefill_pass(running: list[Request], now_at: float) -> tuple[int, int]:
    """(decoders: requests whose first token is out by ``now_at``; prefill tokens: prompts
    still prefilling or whose first token lies after ``now_at`` (at the end of the iteration
    in flight), plus the tokens to recompute of those not prefilled yet after an eviction)."""
    b = pend = 0
    for r in running:
        ft = r.first_token_at
        if ft is None:
            pend += r.prompt_tokens + r.num_generated
        elif ft > now_at:
            pend += r.prompt_tokens
        else:
            b += 1
    return b, pend


@runtime_checkable
class SteppedEngine(Engine, Protocol):
    """An engine whose iterations the host clocks (the simulated engine): it asks to be woken
    at a clock time through the waker the host sets, and the host calls ``on_wake`` then."""

    wake_version: int  # the host's bookkeeping of stale wake-ups

    def set_waker(self, waker: Callable[[SteppedEngine, float | None], None]) -> None:
        """The host's callback: ``waker(engine, at)`` schedules the next wake-up at ``at``
        (None: cancel it)."""

    def on_wake(self, at: float) -> None:
        """Run the iterations that end by ``at`` and report their events."""

    def advance_to(self, t: float) -> None:
        """Run the iterations that end by ``t`` without waiting for a wake-up (read before a
        decision, so that the state is current)."""
