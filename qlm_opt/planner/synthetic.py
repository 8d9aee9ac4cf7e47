"""Random planning problems for tests, benchmarks and `qlm-opt plan` demos.

The numbers are shaped like a real epoch: 4 models of different sizes (the largest fits only
on the big GPU type), two GPU types (the small one ~1.6x slower), group service times of
0.5-30 s, interactive groups with ~2 s of slack (some already late) and batch groups with up
to ~10 min, warm swaps of 2-12 s by model size and cold loads of ~20 s.
"""

from __future__ import annotations

import numpy as np

from qlm_opt.planner.problem import ObjectiveWeights, PlanGroup, PlanInstance, PlanningProblem

__all__ = ["random_instance"]

_MODELS = ("llama-8b", "mistral-7b", "qwen-14b", "llama-70b")
_SWAP_MS = {"llama-8b": 2500, "mistral-7b": 2200, "qwen-14b": 4500, "llama-70b": 12000}
_COLD_MS = 20_000
_CLASS_WEIGHT = {"interactive": 10, "batch": 1}


def random_instance(
    num_groups: int,
    num_instances: int,
    seed: int = 0,
    num_models: int = 4,
    interactive_share: float = 0.4,
    weights: ObjectiveWeights | None = None,
) -> PlanningProblem:
    """A reproducible random instance.

    Args:
        num_groups: request groups.
        num_instances: engine instances (a third of them on the big GPU type).
        seed: numpy seed.
        num_models: how many of the 4 models appear (1-4).
        interactive_share: fraction of interactive groups.
        weights: objective weights (default ObjectiveWeights()).
    """
    rng = np.random.default_rng(seed)
    models = _MODELS[: max(1, min(num_models, len(_MODELS)))]
    big = rng.random(num_instances) < 1 / 3
    if num_instances and not big.any():
        big[0] = True  # the largest model must fit somewhere
    instances = []
    for i in range(num_instances):
        fitting = models if big[i] else tuple(m for m in models if m != "llama-70b")
        cur = None if rng.random() < 0.1 else str(rng.choice(fitting))
        instances.append(
            PlanInstance(
                id=i,
                gpu="H100-80G" if big[i] else "L40S-48G",
                current_model=cur,
                busy_until_ms=int(rng.integers(0, 5000)),
                can_swap=bool(rng.random() > 0.05),
            )
        )
    groups = []
    for k in range(num_groups):
        m = str(rng.choice(models))
        interactive = rng.random() < interactive_share
        size = int(rng.integers(1, 33))
        if interactive:
            base_ms = float(np.exp(rng.uniform(np.log(500), np.log(4000))))
            deadline = int(rng.integers(-300, 2000))
        else:
            base_ms = float(np.exp(rng.uniform(np.log(2000), np.log(30000))))
            deadline = int(rng.integers(5_000, 600_000))
        size_factor = {"llama-70b": 1.5, "qwen-14b": 1.2}.get(m, 1.0)
        service = {}
        for inst in instances:
            if m == "llama-70b" and not big[inst.id]:
                continue
            speed = 1.0 if big[inst.id] else 1.6
            service[inst.id] = max(1, int(base_ms * size_factor * speed))
        groups.append(
            PlanGroup(
                id=f"g{k}",
                model=m,
                size=size,
                weight=size * _CLASS_WEIGHT["interactive" if interactive else "batch"],
                deadline_ms=deadline,
                service_ms=service,
            )
        )
    swap = {}
    for a in (None, *models):
        for b in models:
            if a != b:
                swap[(a, b)] = _COLD_MS if a is None else _SWAP_MS[b]
    return PlanningProblem(
        groups=tuple(groups),
        instances=tuple(instances),
        swap_ms=swap,
        weights=weights or ObjectiveWeights(),
    )
