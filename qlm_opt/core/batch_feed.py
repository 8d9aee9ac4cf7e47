"""The Batch API's pacing rule, one implementation for the server's batch runner
(``qlm_opt.server.batch.runner``) and what-if runs (``qlm_opt.whatif.batch_jobs``): how many
lines of a job may be in flight, from its window, its lines' latency and the fleet's free
prefill capacity and seats (``FeedRule``); the seats of a fleet (``fleet_seats``); a job's
mean line footprint (``Footprint``) and latency (``LineLatency``)."""

from __future__ import annotations

import math
from dataclasses import dataclass


# -- feeding lines as the server's batch runner does ------------------------------------------
@dataclass(frozen=True, slots=True)
class FeedRule:
    """How a job's lines enter the global queue. One implementation, applied by the server's
    runner (``qlm_opt.server.batch.runner``) and by what-if runs (``simulate``,
    ``qlm_opt.whatif.run``). A line is fed when all of these allow it:

    - **Pace** (``target_in_flight``): enough lines in flight to finish the lines left by
      ``pace_fraction`` of the window (the rest is margin), by Little's law: the rate they
      need (lines left over time left) times the job's mean line latency so far
      (``LineLatency``, over every finished line). That mean moves slowly, so the job feeds
      at an even rate over its window, and when a burst of interactive work slows lines
      down the lines in flight finish more slowly: the job yields during the burst, and
      makes it up later as the rate the lines left need grows. At least
      ``min_lines_in_flight``, so a small job on an idle fleet runs at once.
    - **Backpressure** (``fleet_ok``): the fleet has absorbed a request once it has its
      first token (its prefill, the costly part for prompts sharing the iteration, is
      done). A line is fed only while the requests of its model without a first token
      (every job's lines and interactive requests alike: queued in the global queue,
      waiting on an engine or prefilling) are fewer than ``prefills_per_instance`` times
      the instances serving the model: a line goes in when the model's instances have
      prefill capacity nothing else waits for. The rate the fleet sustains grows with its
      instances and with the capacity interactive traffic leaves, with nothing tuned to
      one fleet.
    - **Seats** (``cap``): lines in flight per job stay within the seats of the instances
      serving the model (``max_num_seqs``, or fewer when the KV cache holds fewer lines of
      the job's mean size), or ``max_lines_in_flight`` when set (the config override).
    - **Gate** (``urgent_ok``): new lines only while no more urgent request has waited for
      its first token longer than ``urgent_wait_fraction`` of its class's TTFT target.
    """

    pace_fraction: float = 0.8
    min_lines_in_flight: int = 4
    prefills_per_instance: int = 1
    max_lines_in_flight: int | None = None  # None: the seats of the model's instances
    urgent_wait_fraction: float = 0.5
    poll_s: float = 0.05  # how often a blocked feeder looks again

    def target_in_flight(self, lines_left: int, now: float, submitted_at: float,
                         window_s: float, line_s: float | None, seats: int) -> int:
        """Lines to keep in flight at ``now``: the rate the pace needs (lines left over the
        time left until ``pace_fraction`` of the window) times ``line_s``, the job's mean
        line latency (None: no line finished yet), within ``min_lines_in_flight`` and
        ``cap(seats)``. All times on one clock (s)."""
        hi = self.cap(seats)
        lo = min(self.min_lines_in_flight, hi)
        if line_s is None or lines_left <= 0:
            return lo
        left_s = submitted_at + self.pace_fraction * window_s - now
        if left_s <= line_s:
            return hi
        return max(lo, min(hi, math.ceil(lines_left / left_s * line_s)))

    def fleet_ok(self, unstarted: int, instances: int) -> bool:
        """Backpressure: ``unstarted`` requests of the model without a first token (every
        job's lines and other requests alike), ``instances`` serving the model."""
        return unstarted < self.prefills_per_instance * max(instances, 1)

    def cap(self, seats: int) -> int:
        """Lines in flight per job: ``max_lines_in_flight`` when set, else ``seats``."""
        if self.max_lines_in_flight is not None:
            return self.max_lines_in_flight
        return max(self.min_lines_in_flight, seats)

    def urgent_ok(self, now: float, waiting, limit_s_by_class: dict[str, float]) -> bool:
        """``waiting``: requests without a first token (of any class); True when none of the
        more urgent classes (the keys of ``limit_s_by_class``, TTFT targets in s) has waited
        past its share of the target."""
        f = self.urgent_wait_fraction
        for r in waiting:
            lim = limit_s_by_class.get(r.slo_class)
            if lim is not None and r.first_token_at is None and now - r.arrived_at > f * lim:
                return False
        return True


def fleet_seats(instances, footprint_tokens: float | None) -> int:
    """Seats of ``instances`` (runtime instances serving one model) for lines of
    ``footprint_tokens`` KV tokens each (prompt + output; None: unknown): per instance
    ``max_num_seqs``, or fewer when its KV cache holds fewer such lines."""
    total = 0
    for inst in instances:
        s = inst.engine.stats()
        seats = s.max_num_seqs or 0
        if footprint_tokens and s.kv_capacity_tokens:
            kv_seats = int(s.kv_capacity_tokens // max(footprint_tokens, 1.0))
            seats = min(seats, kv_seats) if seats else kv_seats
        total += max(seats, 1)
    return total


class Footprint:
    """Mean prompt and output tokens of a job's finished lines."""

    __slots__ = ("n", "prompt", "output")

    def __init__(self) -> None:
        self.n = 0
        self.prompt = 0.0
        self.output = 0.0

    def add(self, prompt_tokens: int, output_tokens: int) -> None:
        self.n += 1
        self.prompt += prompt_tokens
        self.output += output_tokens

    @property
    def mean(self) -> float | None:
        """Mean KV footprint (prompt + output tokens); None before the first line."""
        return (self.prompt + self.output) / self.n if self.n else None


class LineLatency:
    """Mean admission-to-end time of a job's finished lines, over all of them so far: it
    moves slowly, so a burst of interactive work that slows lines down lowers the rate at
    which lines finish (the pace does not chase it), while over the job the pace still
    follows the latency lines really have."""

    __slots__ = ("n", "total")

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0

    def add(self, s: float) -> None:
        self.n += 1
        self.total += s

    @property
    def mean_s(self) -> float | None:
        return self.total / self.n if self.n else None
