"""Shared by the policy tests: a simulated fleet fed arrivals without running the engines."""

from __future__ import annotations

from qlm_opt.core.runtime import Runtime
from qlm_opt.hosts.simulated import Simulator
from qlm_opt.whatif.workload import build_requests, synthetic_trace


def fed(fleet, workload, pol, n: int):
    """A simulated fleet bound to ``pol``, fed the first ``n`` synthetic arrivals (the
    clock at each one's arrival), the engines not run past them: (simulator, runtime,
    policy, requests)."""
    sim = Simulator()
    rt = Runtime(fleet, sim)
    for inst in rt.instances:
        inst.engine.set_waker(sim.engine_waker)
    rt.bind(pol)
    reqs = build_requests(synthetic_trace(workload), workload)[:n]
    for r in reqs:
        sim.clock.t = r.arrived_at
        rt.accept(r)
        pol.on_arrival(r)
    return sim, rt, pol, reqs
