"""Shared test helpers: a Runtime on live engines, waiting for requests."""

from __future__ import annotations

import asyncio

from qlm_opt.domain import Request
from qlm_opt.engines.vllm_local import attach_payload
from qlm_opt.hosts.live import AsyncioHost
from qlm_opt.policies.baselines import PriorityPolicy
from qlm_opt.core.runtime import Runtime


class Recorder:
    """Collects runtime events in order."""

    def __init__(self, rt: Runtime) -> None:
        self.first_tokens: list[int] = []
        self.finished: list[int] = []
        self.requeued: list[int] = []
        self.dispatched: list[tuple[int, int]] = []
        rt.first_token_hooks.append(lambda r: self.first_tokens.append(r.id))
        rt.finish_hooks.append(lambda r: self.finished.append(r.id))
        rt.dispatch_hooks.append(lambda r, i: self.dispatched.append((r.id, i.id)))


class RecordingPriorityPolicy(PriorityPolicy):
    def __init__(self, rec_requeues: list[int]) -> None:
        super().__init__()
        self._rq = rec_requeues

    def on_requeue(self, req: Request) -> None:
        self._rq.append(req.id)
        super().on_requeue(req)


def make_runtime(fleet, engines) -> tuple[Runtime, Recorder, RecordingPriorityPolicy]:
    host = AsyncioHost(loop=asyncio.get_event_loop())
    rt = Runtime(fleet, host, engines=engines)
    for e in engines:
        e.bind(rt)
    rec = Recorder(rt)
    pol = RecordingPriorityPolicy(rec.requeued)
    rt.bind(pol)
    return rt, rec, pol


def make_request(rt: Runtime, rid: int, model: str, prompt_ids: list[int], max_tokens: int,
                 priority: int = 0, streamed: list | None = None) -> Request:
    now = rt.now()
    req = Request(rid, model, "batch" if priority else "interactive", len(prompt_ids),
                  max_tokens, now, now + 1000.0, priority=priority)

    def sink(r, ids, text, finished):
        if streamed is not None:
            streamed.extend(ids)

    attach_payload(req, prompt_token_ids=prompt_ids, sampling={"ignore_eos": True},
                   on_output=sink)
    return req


def arrive(rt: Runtime, req: Request) -> None:
    rt.accept(req)
    rt.policy.on_arrival(req)


async def wait_until(pred, timeout_s: float = 120.0, poll_s: float = 0.002) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not pred():
        if loop.time() > end:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(poll_s)


def prompt(seed: int, n: int = 24) -> list[int]:
    import random

    rng = random.Random(seed)
    return [rng.randrange(16, 1000) for _ in range(n)]


async def settle(rt: Runtime, timeout_s: float = 120.0) -> None:
    """Wait until every accepted request finished and the runtime ran its callbacks."""
    await wait_until(lambda: rt.num_outstanding == 0, timeout_s)
    await asyncio.sleep(0.01)
