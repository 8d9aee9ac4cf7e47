"""Why U cannot charge decode inside TTFT windows: a 'prefill now, decode in the drain' policy.

It evicts every request right after its first token (the request keeps its first-token
time) and re-dispatches all of them one second after the last arrival, when they recompute
their prompts and decode. It knows nothing about the future. Under the simulator's rules
its on-time requests count, so U must be at least its attainment:

    .venv/bin/python benchmarks/bound_scale/evict_defer.py mooncake 4.23

(2026-11-30: mooncake x4.23 99.9% against qlm's 83.9%; mooncake x8.61 69.3% against the
best policy's 61.3%; azure-conv x12 86.5%; prompt-heavy x23.63 32.8%, bursty x19.41 27.7%,
batch-heavy x16 71.7%.)
"""
import sys, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1] / 'scenarios'))

import run as S
from qlm_opt.whatif.workload import prepare_requests
from qlm_opt.core.policy import Policy
from qlm_opt.core.runtime import Runtime
from qlm_opt.hosts.simulated import Simulator
from qlm_opt.domain import RequestState

class EvictDefer(Policy):
    name = 'evict-defer'
    def __init__(self, release_at):
        self.release_at = release_at; self.deferred = []; self.released = False
    def bind(self, rt):
        super().bind(rt); rt.first_token_hooks.append(self._ft)
        rt.host.call_at(self.release_at, self._release)
    def _pick(self, req):
        insts = self.rt.ready_instances(req.model)
        return min(insts, key=lambda i: i.engine.load()) if insts else None
    def on_arrival(self, req):
        i = self._pick(req)
        if i is None: self.rt.drop(req, 'no instance'); return
        self.rt.dispatch(req, i, (0, req.deadline_at))
    def _ft(self, req):
        if self.released or req.state == RequestState.FINISHED or req.instance_id is None: return
        got = self.rt.evict(self.rt.instances[req.instance_id], req.id)
        if got is not None: self.deferred.append(got)
    def on_requeue(self, req):
        if self.released: self._send(req)
        else: self.deferred.append(req)
    def _send(self, req):
        i = self._pick(req)
        self.rt.dispatch(req, i, (1, req.arrived_at))
    def _release(self):
        self.released = True
        for r in self.deferred: self._send(r)
        self.deferred = []

name, load = sys.argv[1], float(sys.argv[2])
fleet, wl, trace = S._inputs(name, load)
reqs = prepare_requests(trace, wl, None)()
sim = Simulator(); rt = Runtime(fleet, sim)
for inst in rt.instances: inst.engine.set_waker(sim.engine_waker)
last = reqs[-1].arrived_at
pol = EvictDefer(last + 1.0); rt.bind(pol)
def arrive(req):
    rt.accept(req); rt.policy.on_arrival(req)
t0 = time.perf_counter()
sim.run(reqs, arrive, until_at=last + 3600.0)
per = {}
for r in reqs:
    c = per.setdefault(r.slo_class, [0, 0]); c[1] += 1
    if r.state == RequestState.FINISHED and r.attained(): c[0] += 1
tot = sum(v[0] for v in per.values())
print(name, load, 'evict-defer attainment', round(tot / len(reqs), 4), {k: round(v[0]/v[1], 3) for k, v in per.items()}, 'wall', round(time.perf_counter() - t0, 1))
