"""The engine protocol's conformance checks, run on every engine class.

``check_surface(engine)`` checks that an engine offers every member of
``qlm_opt.engines.base.Engine`` (attributes with values of the declared kind, methods that take
the protocol's parameters). ``check_behaviour`` drives it through one request: submit, the
state reads the scheduler relies on, abort. ``tests/unit/test_engine_conformance.py`` runs
them on the simulated engine (and the surface on unstarted vLLM engines); the integration tests
run them on started ``vllm_local`` and ``vllm_remote`` engines.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from qlm_opt.domain import EngineStats, Request, RequestState
from qlm_opt.engines.base import Engine, EngineLimits

# data members of the protocol and the types their values must have
_DATA = {
    "instance_id": int,
    "model": (str, type(None)),
    "max_model_len": int,
    "reports_swap_done": bool,
    "down": bool,
    "num_downs": int,
    "num_restarts": int,
    "last_start_s": (float, int, type(None)),
    "last_swap_s": (float, int, type(None)),
    "swap_until_at": (float, int),
    "busy_s": (float, int),
    "num_preemptions": int,
}


def protocol_methods(proto: type = Engine) -> dict[str, object]:
    """The protocol's methods and properties, by name (own and inherited protocol members)."""
    out: dict[str, object] = {}
    for cls in reversed(proto.__mro__):
        if not getattr(cls, "_is_protocol", False) or cls.__module__ == "typing":
            continue
        for k, v in vars(cls).items():
            if not k.startswith("_") and (inspect.isfunction(v) or isinstance(v, property)):
                out[k] = v
    return out


def protocol_data(proto: type = Engine) -> set[str]:
    out: set[str] = set()
    for cls in reversed(proto.__mro__):
        if getattr(cls, "_is_protocol", False) and cls.__module__ != "typing":
            out |= set(getattr(cls, "__annotations__", {}))
    return out


def check_surface(engine) -> None:
    """Every protocol member is there, of the declared kind; every method takes the
    protocol's parameters by the same names."""
    cls = type(engine)
    assert isinstance(engine, Engine), f"{cls.__name__} does not implement Engine"
    assert protocol_data() == set(_DATA) | {"config"}, "update _DATA with the protocol"
    for name, kind in _DATA.items():
        assert hasattr(engine, name), f"{cls.__name__} lacks {name}"
        v = getattr(engine, name)
        assert isinstance(v, kind), f"{cls.__name__}.{name} = {v!r} is not {kind}"
    for name in EngineLimits.__annotations__:
        assert hasattr(engine.config, name), f"{cls.__name__}.config lacks {name}"
    assert isinstance(engine.config.max_num_seqs, int) and engine.config.max_num_seqs > 0
    for name, member in protocol_methods().items():
        impl = inspect.getattr_static(engine, name, None)
        assert impl is not None, f"{cls.__name__} lacks {name}()"
        if isinstance(member, property):
            assert isinstance(getattr(engine, name), bool), f"{cls.__name__}.{name}"
            continue
        assert callable(getattr(engine, name)), f"{cls.__name__}.{name} is not callable"
        want = list(inspect.signature(member).parameters.values())[1:]  # without self
        got = inspect.signature(getattr(engine, name)).parameters
        var_kw = any(p.kind == p.VAR_KEYWORD for p in got.values())
        for p in want:
            assert p.name in got or var_kw, (
                f"{cls.__name__}.{name}() does not take '{p.name}' (protocol: {want})")
        extra = [q for q in got.values() if q.name not in {p.name for p in want}
                 and q.default is inspect.Parameter.empty
                 and q.kind not in (q.VAR_POSITIONAL, q.VAR_KEYWORD)]
        assert not extra, f"{cls.__name__}.{name}() requires more than the protocol: {extra}"
    assert engine.process_alive() in (True, False, None)


async def check_behaviour(engine, req: Request, settle: Callable[[], Awaitable[None]]) -> None:
    """Drive an idle engine holding ``req.model`` through one request: submit, then the
    reads the scheduler makes, then abort. ``settle()`` lets the engine's own machinery run
    (an event-loop turn for live engines, a clock step for the simulated one)."""
    assert engine.model == req.model
    assert engine.is_idle and engine.load() == 0
    assert engine.running_requests() == [] and engine.waiting_requests() == []
    st = engine.stats()
    assert isinstance(st, EngineStats)
    assert st.num_running == 0 and st.num_waiting == 0 and st.model == engine.model
    engine.submit(req, (req.priority, req.arrived_at, req.id))
    await settle()
    assert engine.load() == 1 and not engine.is_idle
    held = engine.running_requests() + engine.waiting_requests()
    assert [r.id for r in held] == [req.id]
    assert engine.held_due_after(req.deadline_at - 1.0) == 1
    assert engine.held_due_after(req.deadline_at) == 0  # due after, not at
    st = engine.stats()
    assert st.num_running + st.num_waiting == 1
    assert 0 <= engine.num_generated(req) <= req.output_tokens
    got = engine.abort(req.id)
    assert got is req, "abort returns the request it removed"
    assert req.state not in (RequestState.WAITING, RequestState.RUNNING)
    await settle()
    assert engine.load() == 0 and engine.is_idle
    assert engine.held_due_after(float("-inf")) == 0
    assert engine.abort(req.id) is None, "abort of a request it does not hold"
    assert engine.abort(10**9) is None


class RecordingListener:
    """An ``EngineListener`` with a clock, for engines checked outside a ``Runtime``."""

    def __init__(self, now: Callable[[], float]) -> None:
        self.now = now
        self.events: list[tuple[str, int]] = []

    def on_first_token(self, req, at): self.events.append(("first_token", req.id))
    def on_finished(self, req, at): self.events.append(("finished", req.id))
    def on_failed(self, req, at, reason): self.events.append(("failed", req.id))
    def on_swap_done(self, engine, at): self.events.append(("swap_done", engine.instance_id))
    def on_engine_down(self, engine, at): self.events.append(("down", engine.instance_id))


async def check_live_engine(engine, model: str, prompt_ids: list[int]) -> None:
    """Surface and behaviour of a started live engine (``vllm_local`` or ``vllm_remote``)."""
    import asyncio
    import time

    from qlm_opt.engines.vllm_local import attach_payload

    check_surface(engine)
    lis = RecordingListener(time.monotonic)
    engine.bind(lis)
    now = lis.now()
    req = Request(10**8 + engine.instance_id, model, "batch", len(prompt_ids), 400, now,
                  now + 1000.0, priority=1)
    attach_payload(req, prompt_token_ids=prompt_ids, sampling={"ignore_eos": True})

    async def settle():
        await asyncio.sleep(0.05)

    await check_behaviour(engine, req, settle)
    assert ("finished", req.id) not in lis.events
