"""The live host: the runtime's timers on an asyncio event loop and a wall clock.

The same ``Runtime``, policies and engines run here as in the simulator; only the host
changes. Simulated engines (the embedded fleet) get their wake-ups from ``engine_waker``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from qlm_opt.sim.clock import WallClock

log = logging.getLogger(__name__)


class AsyncioHost:
    """Implements ``runtime.Timers`` on the running event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, clock=None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.clock = clock or WallClock()

    def now(self) -> float:
        return self.clock.now()

    def call_at(self, at: float, fn: Callable, *args) -> None:
        delay = at - self.now()
        self.loop.call_later(delay if delay > 0 else 0.0, self._run, fn, args)

    @staticmethod
    def _run(fn: Callable, args: tuple) -> None:
        try:
            fn(*args)
        except Exception:  # a failing callback must not kill the loop
            log.exception("scheduler callback %r failed", fn)

    def engine_waker(self, engine, at: float | None) -> None:
        engine.wake_version = getattr(engine, "wake_version", 0) + 1
        if at is not None:
            self.call_at(at, self._wake, engine, engine.wake_version)

    def _wake(self, engine, version: int) -> None:
        if engine.wake_version == version:
            engine.on_wake(self.now())
