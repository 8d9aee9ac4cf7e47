"""Plain data shared by every component: SLO classes, requests, instances.

Times ending in ``_at`` are seconds on the run's ``Clock`` (virtual in what-if runs, monotonic
wall time live); durations end in ``_s``. Nothing here reads the system time.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SLOClass:
    """A service-level class. A request attains its SLO when TTFT <= ttft_s and, if set,
    mean TPOT <= tpot_s. ``priority`` follows vLLM: lower is more urgent."""

    name: str
    ttft_s: float
    tpot_s: float | None = None
    weight: float = 1.0
    priority: int = 0


class RequestState(enum.IntEnum):
    QUEUED = 0  # in the global queue (or a policy's queue), on no engine
    WAITING = 1  # submitted to an engine, not yet scheduled by it
    RUNNING = 2  # prefilling or decoding on an engine
    SWAPPED_OUT = 3  # evicted or preempted; back in a queue with its generated tokens kept
    FINISHED = 4
    DROPPED = 5  # rejected or dropped; counts as an SLO miss


class Request:
    """One LLM request and its progress.

    ``output_tokens`` is the request's length cap (``max_tokens``). In a what-if run it is the
    trace's true output length, which the engine uses to decide when the request ends; policies
    must not read it (only the qlm-true-lengths policy does), and use the estimator's statistics.
    Generated tokens survive eviction: a resumed request recomputes prompt + generated.
    """

    __slots__ = (
        "id",
        "model",
        "slo_class",
        "prompt_tokens",
        "output_tokens",
        "arrived_at",
        "deadline_at",
        "tpot_s",
        "priority",
        "tenant",
        # prefix identity: one hash per ``hash_block_tokens`` tokens of the prompt (e.g. the
        # Mooncake trace's ``hash_ids``); two requests sharing a leading run of hashes share
        # that prefix. None: no prefix information (the engine never caches it)
        "prefix_hashes",
        "hash_block_tokens",
        # progress
        "state",
        "num_generated",
        "first_token_at",
        "completed_at",
        "instance_id",
        "num_preemptions",
        "num_evictions",
        "num_failures",
        "drop_reason",
        "finish_reason",
        # engine-private bookkeeping (the simulated engine keeps its per-request state here
        # to stay allocation-free on the hot path)
        "_eng",
        # scheduler-private (queue position, group id, predictions)
        "_sched",
    )

    def __init__(
        self,
        id: int,
        model: str,
        slo_class: str,
        prompt_tokens: int,
        output_tokens: int,
        arrived_at: float,
        deadline_at: float,
        tpot_s: float | None = None,
        priority: int = 0,
        tenant: str | None = None,
        prefix_hashes: tuple[int, ...] | None = None,
        hash_block_tokens: int = 0,
    ) -> None:
        self.id = id
        self.model = model
        self.slo_class = slo_class
        self.prompt_tokens = prompt_tokens
        self.output_tokens = output_tokens
        self.arrived_at = arrived_at
        self.deadline_at = deadline_at
        self.tpot_s = tpot_s
        self.priority = priority
        self.tenant = tenant
        self.prefix_hashes = prefix_hashes
        self.hash_block_tokens = hash_block_tokens
        self.state = RequestState.QUEUED
        self.num_generated = 0
        self.first_token_at: float | None = None
        self.completed_at: float | None = None
        self.instance_id: int | None = None
        self.num_preemptions = 0
        self.num_evictions = 0
        self.num_failures = 0  # engine failures (crash, rejection); the runtime re-queues
        self.drop_reason: str | None = None
        self.finish_reason: str | None = None
        self._eng = None
        self._sched = None

    # -- derived -----------------------------------------------------------------------------
    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrived_at

    @property
    def e2e_s(self) -> float | None:
        return None if self.completed_at is None else self.completed_at - self.arrived_at

    @property
    def mean_tpot_s(self) -> float | None:
        if self.completed_at is None or self.first_token_at is None or self.num_generated < 2:
            return None
        return (self.completed_at - self.first_token_at) / (self.num_generated - 1)

    @property
    def is_done(self) -> bool:
        return self.state >= RequestState.FINISHED

    def attained(self) -> bool:
        """True when the request finished within its TTFT (and TPOT, if set) targets."""
        if self.state != RequestState.FINISHED or self.first_token_at is None:
            return False
        if self.first_token_at > self.deadline_at + 1e-9:
            return False
        if self.tpot_s is not None:
            tpot = self.mean_tpot_s
            if tpot is not None and tpot > self.tpot_s + 1e-9:
                return False
        return True

    def __repr__(self) -> str:
        return (
            f"Request(id={self.id}, model={self.model!r}, class={self.slo_class!r}, "
            f"prompt={self.prompt_tokens}, out={self.output_tokens}, gen={self.num_generated}, "
            f"state={self.state.name})"
        )


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """One serving instance of the fleet: ``tp`` GPUs of one type, holding one model."""

    id: int
    gpu: str
    tp: int
    initial_model: str | None
    name: str = ""
    allowed_models: tuple[str, ...] | None = None  # None: any model that fits


@dataclass(slots=True)
class EngineStats:
    """What an engine reports; the RWT estimator reads only this.

    ``decode_tokens_per_s`` is the engine's current decode throughput at its batch size
    (modelled in simulation, measured live); ``busy_until_at`` is when the current swap ends.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    max_num_seqs: int = 0
    decode_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    waiting_prompt_tokens: int = 0
    busy_until_at: float = 0.0
    model: str | None = None
    # prefix cache: KV tokens held by cached blocks no running request uses (evictable,
    # LRU), and cumulative prompt tokens looked up / found in the cache at admission
    kv_cached_tokens: int = 0
    # requests decoding (past their prefill), the batch ``decode_tokens_per_s`` is for;
    # -1: not reported (num_running is used)
    num_decoding: int = -1
    prefix_query_tokens: int = 0
    prefix_hit_tokens: int = 0
    extra: dict = field(default_factory=dict)
