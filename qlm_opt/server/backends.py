"""Backends: the fleet behind the HTTP server.

A backend owns a ``Runtime`` (instances, LSOs, the policy) on an ``AsyncioHost`` and tells the
gateway how far each request has got and what text it produced:

- ``sim`` (default): the embedded simulated fleet. SimEngines run at simulated speed on the
  wall clock (optionally sped up, ``backend.sim.speedup``); the text is synthetic (a fixed word
  list) and responses say so (``system_fingerprint: "qlm-opt-sim"``, ``x-qlm-backend:
  simulated``).
- ``vllm_local`` / ``vllm_remote``: real vLLM engines from ``qlm_opt.engines.vllm_local`` and
  ``qlm_opt.engines.vllm_remote``, adapted in ``qlm_opt.server.vllm_backend`` and imported only
  when configured (see ``make_backend``). Responses say ``x-qlm-backend: vllm_local`` (or
  ``vllm_remote``) and carry the engines' real text.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING, Protocol

from qlm_opt.domain import Request
from qlm_opt.hosts.live import AsyncioHost

if TYPE_CHECKING:
    from qlm_opt.core.policy import Policy
    from qlm_opt.core.runtime import Runtime
    from qlm_opt.server.settings import ServerSettings

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the gateway needs from a fleet. All methods run on the event loop."""

    kind: str  # "simulated" | "vllm_local" | "vllm_remote" (the x-qlm-backend header)
    fingerprint: str  # system_fingerprint of responses
    runtime: Runtime
    host: AsyncioHost
    policy: Policy
    #: True when the backend reports new tokens itself by calling ``on_progress(req)`` (set
    #: by the gateway); else streams poll every ``stream_interval_ms``.
    pushes_progress: bool
    #: True when the backend has the models' tokenizers: the gateway then calls
    #: ``prepare_prompt`` before admission and admits on the exact token count.
    tokenizes: bool

    async def start(self) -> None:
        """Build the runtime on the running loop and bind the policy. Called once."""

    async def stop(self) -> None:
        """Stop timers and engines. Called once at shutdown."""

    def models(self) -> list[str]:
        """Model names the fleet can serve (now or after a swap)."""

    def max_context(self, model: str) -> int:
        """Prompt + output tokens one request of ``model`` may use."""

    def output_tokens(self, requested: int | None, cap: int) -> int:
        """Output length to ask the engine for, given the client's max_tokens (or None)."""

    def attach(self, req: Request, prompt: object, params: dict) -> None:
        """Remember the prompt (text, token ids or chat messages) and sampling parameters of
        ``req`` for engines that generate real text; the simulated backend ignores them."""

    def progress(self, req: Request) -> int:
        """Output tokens generated so far (cheap; called by streams)."""

    def poll(self, reqs) -> None:
        """Bring engines holding ``reqs`` up to date before ``progress`` is read."""

    def text(self, req: Request, start: int, end: int) -> str:
        """The text of output tokens ``start..end`` of ``req``."""

    def detach(self, req: Request) -> None:
        """Forget what ``attach`` stored; the request has ended."""

    async def prepare_prompt(self, model: str, prompt: object, chat: bool) -> list[int]:
        """Backends that ``tokenizes``: the exact prompt token ids, computed before
        admission; ``attach`` then receives them as the prompt. Raises ValueError for a
        prompt the model cannot take."""


# Synthetic output text: one word per token, a fixed list, offset by the request id.
_WORDS = tuple(
    " " + w
    for w in (
        "the queue serves every request before its deadline while batch work fills the gaps "
        "left by interactive traffic and the planner moves groups between instances so that "
        "no GPU idles when another one is late the estimator predicts waiting time from the "
        "tokens ahead and the decode throughput of each instance at its current batch size"
    ).split()
)
_NW = len(_WORDS)


def synthetic_text(seed: int, start: int, end: int) -> str:
    w = _WORDS
    return "".join([w[(seed + i) % _NW] for i in range(start, end)])


def server_workload(settings: ServerSettings, models: list[str]):
    """A ``Workload`` describing the server's classes, for policies built ``from_context``."""
    from qlm_opt.config import Workload

    sim = settings.backend.sim
    return Workload.from_dict({
        "name": "server",
        "classes": {
            n: {"ttft_s": c.ttft_s, "tpot_s": c.tpot_s, "share": 1.0, "weight": c.weight,
                "priority": c.priority}
            for n, c in settings.classes.items()
        },
        "models": {m: 1.0 for m in models} or {"none": 1.0},
        "lengths": {"output_log_mu": sim.output_log_mu, "output_log_sigma": sim.output_log_sigma},
    })


class RuntimeBackend:
    """Shared set-up: policy binding, the policy's epoch timer, shutdown."""

    kind = "runtime"
    fingerprint = "qlm-opt"

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.runtime: Runtime | None = None
        self.host: AsyncioHost | None = None
        self.policy = None
        self._stopped = False

    def _bind_policy(self, workload) -> None:
        from qlm_opt.policies import make_policy

        b = self.settings.backend
        self.policy = make_policy(
            b.policy, workload=workload, fleet=self.runtime.fleet, **b.policy_options
        )
        self.runtime.bind(self.policy)
        if self.policy.epoch_s:
            self.runtime.start_epochs(self.host.now() + self.policy.epoch_s)

    async def stop(self) -> None:
        self._stopped = True
        if self.runtime is not None:
            self.runtime.stop_epochs()


class SimBackend(RuntimeBackend):
    """The embedded simulated fleet (see the module docstring)."""

    kind = "simulated"
    pushes_progress = False  # streams poll the simulated engines
    tokenizes = False  # prompts are counted approximately
    fingerprint = "qlm-opt-sim"

    def __init__(self, settings: ServerSettings) -> None:
        super().__init__(settings)
        from qlm_opt.config import Fleet

        self.fleet = Fleet.load(settings.fleet_path())
        sim = settings.backend.sim
        self._rng = random.Random(sim.seed)
        fl = self.fleet
        held = list(dict.fromkeys(i.initial_model for i in fl.instances if i.initial_model))
        others = sorted(
            m for m in fl.catalog.models
            if m not in held and any(fl.can_serve(i, m) for i in fl.instances)
        )
        self._models: list[str] = held + others  # models held now first
        self._max_ctx: dict[str, int] = {}

    async def start(self) -> None:
        from qlm_opt.core.runtime import Runtime

        sim = self.settings.backend.sim
        loop = asyncio.get_running_loop()
        self.host = AsyncioHost(loop, speedup=sim.speedup)
        self.runtime = rt = Runtime(self.fleet, self.host)
        for inst in rt.instances:
            inst.engine.set_waker(self.host.engine_waker)
        cat = self.fleet.catalog
        for m in self._models:
            ctx = cat.model(m).max_context
            lens = [i.engine.max_model_len for i in rt.instances if i.model == m]
            self._max_ctx[m] = min([ctx, *lens])
        self._bind_policy(server_workload(self.settings, self._models))

    def models(self) -> list[str]:
        return self._models

    def max_context(self, model: str) -> int:
        return self._max_ctx[model]

    def output_tokens(self, requested: int | None, cap: int) -> int:
        if requested is not None:
            return min(requested, cap)
        sim = self.settings.backend.sim
        if sim.output_lengths == "max_tokens":
            return cap
        n = int(round(self._rng.lognormvariate(sim.output_log_mu, sim.output_log_sigma)))
        return max(1, min(n, cap))

    def attach(self, req: Request, prompt: object, params: dict) -> None:
        pass

    def detach(self, req: Request) -> None:
        pass

    def progress(self, req: Request) -> int:
        iid = req.instance_id
        if iid is None:
            return req.num_generated
        return self.runtime.instances[iid].engine.num_generated(req)

    def poll(self, reqs) -> None:
        now = self.host.now()
        seen = set()
        insts = self.runtime.instances
        for r in reqs:
            iid = r.instance_id
            if iid is not None and iid not in seen:
                seen.add(iid)
                insts[iid].engine.advance_to(now)

    def text(self, req: Request, start: int, end: int) -> str:
        return synthetic_text(req.id, start, end)
