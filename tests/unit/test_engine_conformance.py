"""Every engine class against the engine protocol (``qlm_opt.engines.base.Engine``).

The simulated engine is checked whole (surface and behaviour); ``vllm_local`` and
``vllm_remote`` engines are checked here for their surface before they start (building one
starts nothing), and for their behaviour on a started engine in the integration tests
(``tests/integration/test_vllm_local.py``, ``test_vllm_remote.py``).
"""

from __future__ import annotations

import asyncio

import pytest

from qlm_opt.domain import Request
from qlm_opt.engines.base import Engine, SteppedEngine
from qlm_opt.engines.perf import PerfParams, iteration_model
from qlm_opt.engines.simulated import EngineConfig, SimEngine
from qlm_opt.engines.vllm_local import VllmEngineConfig, VllmLocalEngine
from qlm_opt.engines.vllm_remote import VllmRemoteEngine
from qlm_opt.hosts.simulated import Simulator
from tests.engine_conformance import check_behaviour, check_surface, protocol_methods

MODEL = "llama-3.1-8b"


class _Listener:
    def on_first_token(self, req, at): ...
    def on_finished(self, req, at): ...
    def on_failed(self, req, at, reason): ...
    def on_swap_done(self, engine, at): ...
    def on_engine_down(self, engine, at): ...


def _sim_engine():
    from qlm_opt.catalog import Catalog

    im = iteration_model(Catalog.load(), MODEL, "A100-80GB", 1, PerfParams())
    sim = Simulator()
    eng = SimEngine(0, MODEL, im, 400_000, EngineConfig(), _Listener(), sim.now, 8192)
    eng.set_waker(sim.engine_waker)
    return sim, eng


def _live_engines():
    cfg = VllmEngineConfig()
    paths = {"tiny-s0": "/nonexistent/tiny-s0"}
    return [
        VllmLocalEngine(0, "tiny-s0", paths, cfg, _Listener()),
        VllmRemoteEngine.managed_server(1, "tiny-s0", paths, cfg),
        VllmRemoteEngine.external(2, "tiny-s0", "http://127.0.0.1:9"),
    ]


def test_simulated_engine_conforms():
    sim, eng = _sim_engine()
    check_surface(eng)
    assert isinstance(eng, SteppedEngine)
    assert eng.reports_swap_done is False and eng.can_swap is True
    req = Request(1, MODEL, "interactive", 500, 50, 0.0, 10.0)

    async def settle():
        eng.advance_to(sim.now() + 1e-3)

    asyncio.run(check_behaviour(eng, req, settle))


@pytest.mark.parametrize("i", range(3), ids=["vllm_local", "vllm_remote-managed",
                                             "vllm_remote-external"])
def test_vllm_engine_classes_offer_the_protocol(i):
    eng = _live_engines()[i]
    check_surface(eng)
    assert eng.reports_swap_done is True
    assert not isinstance(eng, SteppedEngine)  # the host does not clock live engines


def test_capabilities_differ_as_declared():
    local, managed, external = _live_engines()
    assert local.can_swap and managed.can_swap
    assert not external.can_swap  # no server of ours to restart, no sleep URLs
    assert local.process_alive() is None  # in-process: nothing to watch
    assert managed.process_alive() is False  # its server process is not started
    assert external.process_alive() is None


def test_check_surface_rejects_an_engine_missing_a_member():
    """The check can fail: an engine without ``num_generated`` is not an Engine."""
    _, eng = _sim_engine()

    class Partial:
        def __init__(self, e):
            for k in ("instance_id", "model", "config", "max_model_len", "reports_swap_done",
                      "down", "num_downs", "num_restarts", "last_start_s", "last_swap_s",
                      "swap_until_at", "busy_s", "num_preemptions"):
                setattr(self, k, getattr(e, k))
            for k in protocol_methods():
                if k not in ("num_generated", "can_swap", "is_idle"):
                    setattr(self, k, getattr(e, k))

    with pytest.raises(AssertionError):
        check_surface(Partial(eng))
    assert isinstance(eng, Engine)
