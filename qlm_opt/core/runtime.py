"""The scheduler runtime: instances, LSOs and engine events, independent of the clock.

A ``Runtime`` owns the fleet's engines and offers policies the LLM Serving Operations:
``dispatch`` (pull a request into an engine), ``evict``, ``drain_and_swap`` and ``drop``;
hosts use ``cancel`` when a request's client goes away.
It receives engine events and forwards them to the policy *through the host's timer*, so a
policy never runs inside an engine call. The host is the discrete-event simulator in what-if
runs and the asyncio loop when serving live; the runtime cannot tell which.
"""

from __future__ import annotations


import logging
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from qlm_opt.core.instance import Instance, InstanceState
from qlm_opt.domain import InstanceSpec, Request, RequestState
from qlm_opt.engines.perf import iteration_model, swap_s
from qlm_opt.engines.simulated import SimEngine

if TYPE_CHECKING:
    from qlm_opt.config import Fleet
    from qlm_opt.core.policy import Policy

log = logging.getLogger(__name__)


class Timers(Protocol):
    """What the runtime needs from its host."""

    def now(self) -> float: ...

    def call_at(self, at: float, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` at clock time ``at`` (FIFO among equal times)."""

    def offload(self, fn: Callable, args: tuple, on_done: Callable) -> None:
        """Run the pure function ``fn(*args)`` (a planning solve), then ``on_done(result)``.
        The simulator does both at once, at the current clock time; the live host runs
        ``fn`` on a worker thread and ``on_done`` back on its loop when it is done."""


class Runtime:
    """Fleet control shared by every policy; see the module docstring."""

    def __init__(self, fleet: Fleet, host: Timers, engines: list | None = None) -> None:
        self.fleet = fleet
        self.catalog = fleet.catalog
        self.host = host
        self.policy: Policy | None = None
        self._epochs_on = False  # the policy's epoch timer runs (start_epochs)
        self.lso_counts: Counter[str] = Counter()
        self.num_outstanding = 0  # accepted, neither finished nor dropped
        self.max_failures = 3  # engine failures of one request before it is dropped
        self.dropped: list[Request] = []
        # Observers (metrics, estimator calibration, HTTP streams). Each gets the request.
        self.finish_hooks: list[Callable[[Request], None]] = []
        self.first_token_hooks: list[Callable[[Request], None]] = []
        self.dispatch_hooks: list[Callable[[Request, Instance], None]] = []
        # After the engine took the request: (request, instance, engine priority tuple).
        self.submit_hooks: list[Callable[[Request, Instance, tuple], None]] = []
        # A policy predicted a request's wait: (request, clock time, WaitEstimate, the
        # model's WaitEstimate before the policy's calibration).
        self.predict_hooks: list[Callable] = []
        self.drop_hooks: list[Callable[[Request], None]] = []
        self._iter_models: dict[tuple[str, str, int], object] = {}  # (model, gpu, tp) ->
        if engines is None:
            engines = [self._make_sim_engine(spec) for spec in fleet.instances]
        self.instances = [Instance(spec, eng) for spec, eng in zip(fleet.instances, engines)]
        self._by_model: dict[str, list[Instance]] = {}
        self._reindex()

    # -- set-up ------------------------------------------------------------------------------
    def _make_sim_engine(self, spec: InstanceSpec) -> SimEngine:
        model = spec.initial_model
        im, cap, mml = self._engine_params(spec, model) if model else (None, 0, None)
        return SimEngine(spec.id, model, im, cap, self.fleet.engine, self, self.host.now, mml)

    def iteration_model(self, inst: Instance | InstanceSpec, model: str | None = None,
                        engine: bool = False):
        """The roofline (or calibrated) iteration model of ``model`` (default: the model the
        instance holds) on the instance's GPUs; None when it holds none. Cached. It is the
        scheduler's prior (the fleet's ``[estimator]``, default the engines' own model);
        ``engine=True`` gives the model the simulated engines run."""
        spec = inst.spec if isinstance(inst, Instance) else inst
        if model is None:
            model = inst.model if isinstance(inst, Instance) else spec.initial_model
            if model is None:
                return None
        perf = self.fleet.perf
        prior = self.fleet.prior_perf
        if prior is not None and not engine:
            perf = prior
        k = (model, spec.gpu, spec.tp, perf is not self.fleet.perf)
        im = self._iter_models.get(k)
        if im is None:
            im = self._iter_models[k] = iteration_model(
                self.catalog, model, spec.gpu, spec.tp, perf
            )
        return im

    def _engine_params(self, spec: InstanceSpec, model: str):
        cat = self.catalog
        im = self.iteration_model(spec, model, engine=True)
        cap = cat.kv_capacity_tokens(model, spec.gpu, spec.tp)
        return im, cap, cat.model(model).max_context

    def bind(self, policy: Policy) -> None:
        self.policy = policy
        policy.bind(self)

    # -- the policy's epochs -----------------------------------------------------------------
    def start_epochs(self, first_at: float, active: Callable[[], bool] = lambda: True) -> None:
        """Call ``policy.on_epoch`` at ``first_at``, then every ``policy.epoch_s`` for as long
        as ``active()`` holds after an epoch and ``stop_epochs`` has not been called. Both
        hosts drive a policy's epochs through this: the what-if run (``active``: work is left)
        and the server's backend (until it stops). An epoch that raises still schedules the
        next one; the host reports the error. Policies without ``epoch_s`` get no timer."""
        period = self.policy.epoch_s
        if not period:
            return
        self._epochs_on = True

        def epoch() -> None:
            if not self._epochs_on:
                return
            try:
                self.policy.on_epoch()
            finally:
                if active():
                    self.host.call_at(self.host.now() + period, epoch)

        self.host.call_at(first_at, epoch)

    def stop_epochs(self) -> None:
        """No epoch runs after this (the server's shutdown)."""
        self._epochs_on = False

    def _reindex(self) -> None:
        by: dict[str, list[Instance]] = {}
        for inst in self.instances:
            if inst.ready:
                by.setdefault(inst.model, []).append(inst)
        self._by_model = by

    # -- queries -----------------------------------------------------------------------------
    def now(self) -> float:
        return self.host.now()

    def ready_instances(self, model: str) -> list[Instance]:
        """READY instances that hold ``model`` now."""
        return self._by_model.get(model, [])

    def can_serve_anywhere(self, model: str) -> bool:
        return any(self.fleet.can_serve(i.spec, model) for i in self.instances)

    def swap_time_s(self, inst: Instance, model: str) -> float:
        return swap_s(self.catalog, model, inst.spec.gpu, inst.spec.tp,
                      self.fleet.warm_swaps, self.fleet.perf)

    # -- LSOs --------------------------------------------------------------------------------
    def accept(self, req: Request) -> None:
        """Count a request in (called by the host when it arrives)."""
        self.num_outstanding += 1

    def dispatch(self, req: Request, inst: Instance, priority: tuple) -> None:
        """Pull: hand ``req`` to ``inst``'s engine with a vLLM-style priority tuple."""
        if req.is_done:
            # Cancelled while the policy still held it (a policy without ``remove``, or a
            # request in transit between engine and policy): nothing to run.
            log.debug("dispatch of ended request %d ignored", req.id)
            return
        self.lso_counts["pull"] += 1
        for fn in self.dispatch_hooks:
            fn(req, inst)
        inst.engine.submit(req, priority)
        for fn in self.submit_hooks:
            fn(req, inst, priority)

    def evict(self, inst: Instance, req_id: int) -> Request | None:
        """Evict: abort a request on ``inst``; it keeps its generated tokens and goes back to
        the caller, which re-queues it (resume by recompute)."""
        req = inst.engine.abort(req_id)
        if req is not None:
            req.num_evictions += 1
            inst.num_evictions += 1
            self.lso_counts["evict"] += 1
        return req

    def drain_and_swap(self, inst: Instance, model: str) -> list[Request]:
        """Swap: stop giving ``inst`` work, take back its waiting requests (returned to the
        caller for re-queueing), let running ones finish, then load ``model``."""
        if inst.state != InstanceState.READY:
            return []
        inst.state = InstanceState.DRAINING
        inst.swap_to = model
        self._reindex()
        back = []
        for r in inst.engine.waiting_requests():
            got = inst.engine.abort(r.id)
            if got is not None:
                got.state = RequestState.QUEUED
                back.append(got)
        self.lso_counts["rebalance"] += len(back)
        self._maybe_start_swap(inst)
        return back

    def _maybe_start_swap(self, inst: Instance) -> None:
        if inst.state != InstanceState.DRAINING or not inst.engine.is_idle:
            return
        model = inst.swap_to
        dur = self.swap_time_s(inst, model)
        im, cap, mml = self._engine_params(inst.spec, model)
        inst.engine.start_swap(model, dur, im, cap, mml)
        inst.state = InstanceState.SWAPPING
        inst.num_swaps += 1
        self.lso_counts["swap"] += 1
        log.debug("swap %s -> %s (%.1f s)", inst.spec.name, model, dur)
        if inst.engine.reports_swap_done:
            return  # a live engine calls on_swap_done when the model is servable
        # A simulated engine finishes its in-flight iteration first: use its own end time.
        done_at = inst.engine.swap_until_at or self.now() + dur
        self.host.call_at(max(done_at, self.now() + dur), self._swap_done, inst)

    def on_swap_done(self, engine, at: float) -> None:
        """Engine listener: a live engine finished loading its new model at ``at``."""
        inst = self.instances[engine.instance_id]
        if inst.state in (InstanceState.SWAPPING, InstanceState.DOWN):
            self.host.call_at(at, self._swap_done, inst)

    def on_engine_down(self, engine, at: float) -> None:
        """Engine listener: a live engine died (its requests fail next, with on_failed). The
        instance is DOWN and takes no work until the engine reports ``on_swap_done`` after a
        restart (or when its health checks pass again)."""
        inst = self.instances[engine.instance_id]
        inst.state = InstanceState.DOWN
        inst.swap_to = engine.model
        self._reindex()

    def _swap_done(self, inst: Instance) -> None:
        inst.engine.end_swap(self.now())
        inst.state = InstanceState.READY
        inst.swap_to = None
        self._reindex()
        self.policy.on_instance_ready(inst)

    def drop(self, req: Request, reason: str) -> None:
        if req.is_done:
            return
        self.lso_counts["drop"] += 1
        self._end_dropped(req, reason)

    def cancel(self, req: Request, reason: str = "cancelled") -> bool:
        """Cancel (the client went away): end ``req`` wherever it is and free its capacity.

        A request in an engine is aborted there; one the policy holds is taken out with
        ``policy.remove(req)``. When neither holds it (in transit between them, or a policy
        without ``remove``) it is still ended now, and ``dispatch`` and the re-queue after an
        engine failure skip it later. The request is marked DROPPED with ``reason``, counted
        in ``lso_counts["cancel"]`` and reported to ``drop_hooks``; finish hooks and
        ``policy.on_finished`` are not called (it did not complete). Capacity freed on an
        engine is offered back to the policy through ``on_instance_ready`` at the current
        time (the hook that feeds an instance), and a draining instance starts its swap.
        Returns False when the request had already ended.
        """
        if req.is_done:
            return False
        inst = None
        if req.instance_id is not None and req.state in (RequestState.WAITING,
                                                          RequestState.RUNNING):
            cand = self.instances[req.instance_id]
            if cand.engine.abort(req.id) is not None:
                inst = cand
        if inst is None and self.policy is not None:
            self.policy.remove(req)
        self.lso_counts["cancel"] += 1
        self._end_dropped(req, reason)
        if inst is not None:
            self.host.call_at(self.now(), self._capacity_freed, inst)
        return True

    def _capacity_freed(self, inst: Instance) -> None:
        if inst.state == InstanceState.DRAINING:
            self._maybe_start_swap(inst)
        elif inst.state == InstanceState.READY and self.policy is not None:
            self.policy.on_instance_ready(inst)

    def _end_dropped(self, req: Request, reason: str) -> None:
        req.state = RequestState.DROPPED
        req.drop_reason = reason
        self.dropped.append(req)
        self.num_outstanding -= 1
        for fn in self.drop_hooks:
            fn(req)

    # -- engine listener ---------------------------------------------------------------------
    def on_first_token(self, req: Request, at: float) -> None:
        if self.first_token_hooks:
            self.host.call_at(at, self._first_token, req)

    def _first_token(self, req: Request) -> None:
        for fn in self.first_token_hooks:
            fn(req)

    def on_finished(self, req: Request, at: float) -> None:
        self.host.call_at(at, self._finished, req)

    def _finished(self, req: Request) -> None:
        self.num_outstanding -= 1
        for fn in self.finish_hooks:
            fn(req)
        inst = self.instances[req.instance_id]
        if inst.state == InstanceState.DRAINING:
            self._maybe_start_swap(inst)
        self.policy.on_finished(req)

    def on_failed(self, req: Request, at: float, reason: str) -> None:
        req.num_failures += 1
        if reason == "prompt_too_long":
            self.host.call_at(at, self.drop, req, reason)
        elif req.num_failures > self.max_failures:
            # A request that fails on every engine (the engine rejects it) must not loop.
            self.host.call_at(at, self.drop, req, f"engine_failed: {reason}")
        else:
            req.state = RequestState.QUEUED
            self.host.call_at(at, self._requeue, req)

    def _requeue(self, req: Request) -> None:
        if not req.is_done:  # not cancelled meanwhile
            self.policy.on_requeue(req)
