"""Admission: whether a new request may enter, and when to come back if not.

``check_limits`` turns away what no engine could serve (unknown model: 404; prompt over the
context or the server's limit: 413; prompt + ``max_tokens`` over the context: 400). A request
that passes joins its SLO class's bounded queue (``Gateway.admit``); when that queue is full
the answer is a 429 whose ``Retry-After`` comes from the RWT estimator: the predicted wait of a
request at the back of its class's queue, for its model, as follows.

When the queue of SLO class ``c`` is full, a request for model ``m`` with ``P`` prompt tokens
would wait behind

    A = sum of Q(c', m) over the classes c' at least as urgent as c (priority <= c's),

where ``Q(c', m)`` counts the admitted requests of class ``c'`` for model ``m`` that have no
first token yet (in the global queue or an engine's own queue). Then, in clock seconds:

- some READY instances hold ``m`` (``H`` of them): the queue spreads over them, so the request
  is at position ``p = A / H`` on each, and

      wait = min over those instances i of  est.wait(i, now, p, p * prompt_mean, P).mean_s

  (``RWTEstimator.wait``: the engine's running batch, its own queue and the ``p`` requests
  ahead, with the online calibration of class ``c`` when the policy's estimator has one);
- none holds ``m``: one of the instances that may hold it swaps first, so

      wait = min over those instances i of  busy_i + swap_s(i, m) + start_i(A)

  where ``busy_i`` is the estimator's wait for the work already in i's engine queue (it
  drains before the swap), ``swap_s`` the runtime's swap time, and ``start_i(A)`` the time for
  a request behind ``A`` others to start on a fresh engine of ``m`` with ``S`` seats:
  ``A * prompt_mean * c_tok`` while ``A < S``, else ``(A - S + 1) * mean_out * iter_s(S) / S``
  more (one seat frees per ``mean_out * iter_s / S`` seconds), from the roofline iteration
  model of ``m`` on that instance.

``Retry-After`` is that wait in wall seconds (clock seconds / the host's ``speedup``), rounded
up, and kept within 1..3600. The estimator is the policy's own (``policy.est``) when it has
one (``qlm``, ``qlm-rwt``), else one the server builds from the same workload prior.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from qlm_opt.core.queue import length_bucket
from qlm_opt.server.errors import APIError

if TYPE_CHECKING:
    from qlm_opt.core.estimator import RWTEstimator
    from qlm_opt.server.backends import Backend
    from qlm_opt.server.settings import ServerSettings

MAX_RETRY_AFTER_S = 3600


class ClassQueues(Protocol):
    """What admission reads of the gateway: its backend and settings, the admitted requests
    without a first token per (class, model), and a slot for the estimator it builds."""

    backend: Backend
    settings: ServerSettings
    queued_by_class_model: dict[tuple[str, str], int]
    retry_estimator: RWTEstimator | None


def check_limits(settings: ServerSettings, backend: Backend, model: str, prompt_tokens: int,
                 max_tokens: int | None) -> int:
    """The model's context length, once the request fits it and the server's limits. Raises
    APIError: 404 unknown model, 413 prompt too long, 400 ``max_tokens`` over the limit or
    prompt + ``max_tokens`` over the context."""
    try:
        ctx = backend.max_context(model)
    except KeyError:
        raise APIError(404, f"The model '{model}' does not exist",
                       code="model_not_found", param="model") from None
    lim = settings.limits
    max_prompt = ctx - 1
    if lim.max_prompt_tokens is not None:
        max_prompt = min(max_prompt, lim.max_prompt_tokens)
    if prompt_tokens > max_prompt:
        raise APIError(
            413, f"prompt is about {prompt_tokens} tokens; this server accepts at most "
            f"{max_prompt} for '{model}'", code="prompt_too_long", param="prompt",
        )
    if max_tokens is not None:
        if lim.max_tokens is not None and max_tokens > lim.max_tokens:
            raise APIError(400, f"max_tokens must be at most {lim.max_tokens}",
                           code="invalid_value", param="max_tokens")
        if prompt_tokens + max_tokens > ctx:
            raise APIError(
                400, f"This model's maximum context length is {ctx} tokens. However, you "
                f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the "
                f"prompt, {max_tokens} for the completion).",
                code="context_length_exceeded", param="max_tokens",
            )
    return ctx


def estimator_of(gw: ClassQueues) -> RWTEstimator:
    """The policy's RWT estimator, else one built (once) from the server's workload prior."""
    backend = gw.backend
    est = backend.policy.est
    if est is not None:
        return est
    if gw.retry_estimator is None:
        from qlm_opt.core.estimator import RWTEstimator
        from qlm_opt.server.backends import server_workload

        wl = server_workload(gw.settings, backend.models())
        gw.retry_estimator = RWTEstimator.from_workload(
            wl, iter_model_of=backend.runtime.iteration_model)
    return gw.retry_estimator


def _bucket_of(req) -> int:
    return length_bucket(req.prompt_tokens)


def queue_wait_s(gw: ClassQueues, model: str, slo_class: str, prompt_tokens: int) -> float:
    """The predicted wait (clock seconds) of a request for ``model`` at the back of
    ``slo_class``'s queue (see the module docstring)."""
    rt = gw.backend.runtime
    est = estimator_of(gw)
    classes = gw.settings.classes
    prio = classes[slo_class].priority
    ahead = float(sum(n for (c, m), n in gw.queued_by_class_model.items()
                      if m == model and classes[c].priority <= prio))
    now = rt.now()
    own_key = slo_class if gw.backend.policy.est is est else None
    held = rt.ready_instances(model)
    if held:
        p = ahead / len(held)
        return min(est.wait(i, now, p, p * est.prompt_mean, prompt_tokens, _bucket_of,
                            key=own_key).mean_s for i in held)
    best = math.inf
    mean_out = max(est.model_stats(model).mean, 1.0)
    for inst in rt.instances:
        if not rt.fleet.can_serve(inst.spec, model):
            continue
        st = inst.engine.stats()
        busy = max(0.0, st.busy_until_at - now)
        if inst.ready:
            busy = est.wait(inst, now, float(st.num_waiting), 0.0, 0, _bucket_of).mean_s
        im = rt.iteration_model(inst, model)
        fp = est.prompt_mean + mean_out / 2.0
        cap = rt.catalog.kv_capacity_tokens(model, inst.spec.gpu, inst.spec.tp)
        seats = max(1.0, min(float(inst.engine.config.max_num_seqs), cap / max(fp, 1.0)))
        iter_s = im.iteration_s(int(seats), int(seats * fp))
        start = ahead * est.prompt_mean * im.c_tok
        if ahead >= seats:
            start += (ahead - seats + 1.0) * mean_out * iter_s / seats
        best = min(best, busy + rt.swap_time_s(inst, model) + start)
    return best if best < math.inf else 0.0


def retry_after_s(gw: ClassQueues, model: str, slo_class: str, prompt_tokens: int) -> int:
    """The ``Retry-After`` header of a 429 (whole wall seconds, 1..3600)."""
    wait = queue_wait_s(gw, model, slo_class, prompt_tokens)
    speedup = gw.backend.host.speedup
    wall = wait / speedup
    if not math.isfinite(wall):
        return MAX_RETRY_AFTER_S
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(wall)))
