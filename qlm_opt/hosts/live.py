"""The live host: the runtime's timers on an asyncio event loop and a wall clock.

The same ``Runtime``, policies and engines run here as in the simulator; only the host
changes. Simulated engines (the embedded fleet) get their wake-ups from ``engine_waker``.

``AsyncioHost(speedup=s)`` runs the clock ``s`` times faster than the wall clock (simulated
seconds per wall second): clock times given to ``call_at`` are converted to wall seconds for
the event loop. Use it only with simulated engines (tests and demos of the embedded fleet);
live vLLM engines run at wall speed, so their host keeps ``speedup=1``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable


log = logging.getLogger(__name__)


class ScaledClock:
    """Monotonic wall time times ``speedup``, zero at construction."""

    __slots__ = ("_t0", "speedup")

    def __init__(self, speedup: float = 1.0) -> None:
        if not speedup > 0:
            raise ValueError(f"speedup must be positive, got {speedup!r}")
        self._t0 = time.monotonic()
        self.speedup = speedup

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speedup


class AsyncioHost:
    """Implements ``runtime.Timers`` on the running event loop.

    ``clock`` defaults to ``ScaledClock(speedup)`` (the wall clock when ``speedup == 1``).
    A given ``clock`` must advance ``speedup`` clock seconds per wall second.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, clock=None,
                 speedup: float = 1.0) -> None:
        if not speedup > 0:
            raise ValueError(f"speedup must be positive, got {speedup!r}")
        self.loop = loop or asyncio.get_running_loop()
        self.speedup = float(speedup)
        if clock is None:
            clock = ScaledClock(speedup)
        self.clock = clock
        self._wall_per_clock = 1.0 / self.speedup

    def now(self) -> float:
        return self.clock.now()

    def call_at(self, at: float, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` at clock time ``at``, never before (FIFO among times already
        past)."""
        delay = (at - self.now()) * self._wall_per_clock
        if delay > 0.0:
            self.loop.call_later(delay, self._run_at, at, fn, args)
        else:
            self.loop.call_later(0.0, self._run, fn, args)

    def _run_at(self, at: float, fn: Callable, args: tuple) -> None:
        # uvloop's timers count whole milliseconds: one due in under 0.5 ms runs on the next
        # loop pass, others up to 1 ms early. Early, it waits again for what is left. (At
        # speedup 1000 a policy's 0.5 s epoch, 0.5 ms of wall time, otherwise ran on every
        # loop pass: some 80,000 epochs per second on an idle loop.)
        delay = (at - self.now()) * self._wall_per_clock
        if delay > 0.0:
            self.loop.call_later(delay, self._run_at, at, fn, args)
            return
        self._run(fn, args)

    @staticmethod
    def _run(fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception:  # a failing callback must not kill the loop
            log.exception("scheduler callback %r failed", fn)

    def offload(self, fn: Callable, args: tuple, on_done: Callable) -> None:
        """Run the pure function ``fn(*args)`` on a worker thread (the CP-SAT solve releases
        the GIL) and ``on_done(result)`` back on the loop, so planning never blocks serving."""
        fut = self.loop.run_in_executor(None, fn, *args)

        def done(f: asyncio.Future) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None:
                log.error("offloaded %r failed: %r", fn, exc)
                return
            self._run(on_done, (f.result(),))

        fut.add_done_callback(done)

    def engine_waker(self, engine, at: float | None) -> None:
        engine.wake_version += 1
        if at is not None:
            self.call_at(at, self._wake, engine, engine.wake_version)

    def _wake(self, engine, version: int) -> None:
        if engine.wake_version == version:
            engine.on_wake(self.now())
