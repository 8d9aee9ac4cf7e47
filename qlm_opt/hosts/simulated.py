"""Discrete-event simulator: a virtual clock and one event heap.

Events are ``(at, seq, kind, a, b)``. ``seq`` is a per-simulator counter, so events at the same
time run in the order they were scheduled: ties are broken deterministically, never by
comparing payloads. Arrivals are merged from the sorted request list rather than pushed, and
an arrival at the same time as a heap event runs after it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable

from qlm_opt.domain import Request



class VirtualClock:
    """Simulated time, moved only by the discrete-event simulator."""

    __slots__ = ("t",)

    def __init__(self, start_at: float = 0.0) -> None:
        self.t = start_at

    def now(self) -> float:
        return self.t


_WAKE = 0
_CALL = 1


class Simulator:
    """Host for a ``Runtime`` in what-if runs (implements ``runtime.Timers``)."""

    def __init__(self, start_at: float = 0.0) -> None:
        self.clock = VirtualClock(start_at)
        self._heap: list[tuple] = []
        self._seq = 0
        self.num_events = 0
        self.arrivals_left = 0

    def now(self) -> float:
        return self.clock.t

    def offload(self, fn: Callable, args: tuple, on_done: Callable) -> None:
        """``runtime.Timers.offload``: in simulated time a solve takes no time."""
        on_done(fn(*args))

    def call_at(self, at: float, fn: Callable, *args) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, _CALL, fn, args))

    def engine_waker(self, engine, at: float | None) -> None:
        """Passed to ``SimEngine.set_waker``: schedule (or cancel) the engine's next wake."""
        engine.wake_version += 1
        if at is not None:
            self._seq += 1
            heapq.heappush(self._heap, (at, self._seq, _WAKE, engine, engine.wake_version))

    def run(
        self,
        requests: list[Request],
        on_arrival: Callable[[Request], None],
        until_at: float = math.inf,
        on_progress: Callable[[int], None] | None = None,
    ) -> float:
        """Replay ``requests`` (sorted by ``arrived_at``) until no event is left or the clock
        passes ``until_at``. Returns the final clock time."""
        heap = self._heap
        pop = heapq.heappop
        clock = self.clock
        n = len(requests)
        i = 0
        self.arrivals_left = n
        next_arr = requests[0].arrived_at if n else math.inf
        progress_every = max(1, n // 100)
        events = 0
        while True:
            if heap and heap[0][0] <= next_arr:
                at, _, kind, a, b = pop(heap)
                if at > until_at:
                    clock.t = until_at
                    break
                clock.t = at
                events += 1
                if kind == _WAKE:
                    if a.wake_version == b:
                        a.on_wake(at)
                else:
                    a(*b)
            elif i < n:
                if next_arr > until_at:
                    clock.t = until_at
                    break
                req = requests[i]
                clock.t = next_arr
                i += 1
                self.arrivals_left = n - i
                next_arr = requests[i].arrived_at if i < n else math.inf
                events += 1
                on_arrival(req)
                if on_progress is not None and i % progress_every == 0:
                    on_progress(i)
            else:
                break
        self.num_events += events
        return clock.t
