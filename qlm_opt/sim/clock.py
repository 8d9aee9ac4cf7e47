"""Clocks. Everything in the scheduler reads time only through a ``Clock``."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the run started."""


class VirtualClock:
    """Simulated time, moved only by the discrete-event simulator."""

    __slots__ = ("t",)

    def __init__(self, start_at: float = 0.0) -> None:
        self.t = start_at

    def now(self) -> float:
        return self.t


class WallClock:
    """Monotonic wall time, zero at construction (live serving)."""

    __slots__ = ("_t0",)

    def __init__(self) -> None:
        self._t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self._t0
