"""A serving instance as the scheduler sees it: its spec, its engine and its swap state."""

from __future__ import annotations

import enum

from qlm_opt.domain import InstanceSpec


class InstanceState(enum.IntEnum):
    READY = 0
    DRAINING = 1  # finishing running requests before a swap; takes no new work
    SWAPPING = 2
    DOWN = 3  # a live engine died (or fails its health checks); takes no work until it is back


class Instance:
    """An instance as the policies see it: spec, engine and swap state."""

    __slots__ = ("spec", "engine", "state", "swap_to", "num_swaps", "num_evictions")

    def __init__(self, spec: InstanceSpec, engine) -> None:
        self.spec = spec
        self.engine = engine
        self.state = InstanceState.READY
        self.swap_to: str | None = None
        self.num_swaps = 0
        self.num_evictions = 0

    @property
    def id(self) -> int:
        return self.spec.id

    @property
    def model(self) -> str | None:
        return self.engine.model

    @property
    def ready(self) -> bool:
        return self.state == InstanceState.READY and self.engine.model is not None

    def __repr__(self) -> str:
        return f"Instance({self.spec.name}, {self.model}, {self.state.name})"


def holders(instances) -> dict[str | None, int]:
    """Ready instances per model they hold."""
    held: dict[str | None, int] = {}
    for i in instances:
        if i.ready:
            held[i.model] = held.get(i.model, 0) + 1
    return held


def least_loaded_victim(cands, instances, load) -> Instance:
    """The instance to swap away among ``cands``: not the last ready holder of a model that
    has work on it, then the least ``load(instance)``, then the lowest id."""
    held = holders(instances)

    def cost(i: Instance) -> tuple:
        n = load(i)
        return (held.get(i.model, 0) <= 1 and n > 0, n, i.id)

    return min(cands, key=cost)
