"""The live host runs a timer callback at its clock time, never before, on both event loops
(uvloop's timers count whole milliseconds and run one due in under 0.5 ms at once)."""

from __future__ import annotations

import asyncio

import pytest

from qlm_opt.hosts.live import AsyncioHost

LOOPS = ["asyncio"]
try:
    import uvloop

    LOOPS.append("uvloop")
except ImportError:  # pragma: no cover
    uvloop = None


def _run(kind: str, coro_fn):
    if kind == "uvloop":
        return uvloop.run(coro_fn())
    return asyncio.run(coro_fn())


@pytest.mark.parametrize("loop", LOOPS)
def test_periodic_timer_never_runs_early(loop):
    """A 0.5 s period at speedup 1000 (0.5 ms of wall time): every run at or after its time,
    and no more runs than periods."""

    async def main():
        host = AsyncioHost(speedup=1000.0)
        runs: list[tuple[float, float]] = []

        def tick(at: float) -> None:
            runs.append((at, host.now()))
            host.call_at(at + 0.5, tick, at + 0.5)

        host.call_at(0.5, tick, 0.5)
        await asyncio.sleep(0.2)  # 200 clock seconds: at most 400 periods
        return list(runs), host.now()  # (the loop runs on while it shuts down)

    runs, end = _run(loop, main)
    assert runs, "the timer never ran"
    assert all(now >= at for at, now in runs)
    assert len(runs) <= end / 0.5 + 1


@pytest.mark.parametrize("loop", LOOPS)
def test_order_and_past_times(loop):
    async def main():
        # speedup 10: "late" is 200 ms of real time away, so a busy machine that pauses this
        # coroutine between two call_at()s (it did at 1000x: 2 ms) cannot make it due first
        host = AsyncioHost(speedup=10.0)
        out: list[str] = []
        now = host.now()
        host.call_at(now + 2.0, out.append, "late")
        host.call_at(now - 1.0, out.append, "past-1")
        host.call_at(now, out.append, "past-2")
        host.call_at(now + 0.2, out.append, "soon")
        await asyncio.sleep(0.3)  # 3 clock seconds
        return out

    assert _run(loop, main) == ["past-1", "past-2", "soon", "late"]
