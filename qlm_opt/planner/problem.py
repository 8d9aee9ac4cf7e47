"""The planning problem: plain data handed to the planner once per epoch.

Everything here is integer milliseconds relative to "now" = 0, so the planner never reads a
clock and a saved snapshot replays exactly. The caller (queue + RWT estimator) fills it in;
the planner only reads it.

A snapshot can be saved and loaded as JSON (`PlanningProblem.to_json` / `from_json`) for
`qlm-opt plan --snapshot S.json` and for regression tests; pydantic only lives at that edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

from qlm_opt.errors import ConfigError

__all__ = [
    "PlanGroup",
    "PlanInstance",
    "ObjectiveWeights",
    "PlanningProblem",
    "SWAP_SCALE",
    "REQUEST_WEIGHT",
    "edf_key",
]

# The objective's on-time and swap terms are multiplied by this so the completion-time term,
# counted per millisecond, is worth `completion_penalty` per *second* and stays integral.
SWAP_SCALE = 1000
# Group weight of one request of class weight 1 (`group_weight` scales by this to stay integral).
REQUEST_WEIGHT = 10


@dataclass(frozen=True, slots=True)
class PlanGroup:
    """A request group to place: one model, one SLO class, one length bucket.

    Attributes:
        id: group id, unique within the instance.
        model: model name the group needs.
        size: number of requests in the group.
        weight: on-time value of the group (requests x class weight, scaled to an int >= 0).
        deadline_ms: slack until the group's SLO deadline, ms from now; negative = already late.
        service_ms: instance id -> estimated service time (ms) of the whole group on it;
            only instances whose GPU fits the model appear. Do not mutate.
        release_ms: the group cannot start before this, ms from now (a forecast group of
            requests expected to arrive then); 0 for queued requests.
        start_deadline_ms: a time-to-first-token deadline, ms from now: the group is on time
            on instance i when it *starts* by then, i.e. ends by ``start_deadline_ms +
            service_ms[i]``; None leaves ``deadline_ms`` as the end deadline everywhere.
            ``deadline_ms`` then holds the end deadline on the fastest instance (EDF order).
    """

    id: str
    model: str
    size: int
    weight: int
    deadline_ms: int
    service_ms: Mapping[int, int]
    release_ms: int = 0
    start_deadline_ms: int | None = None

    def deadline_on(self, instance_id: int) -> int:
        """End deadline (ms from now) of the group on ``instance_id``."""
        if self.start_deadline_ms is None:
            return self.deadline_ms
        return self.start_deadline_ms + self.service_ms[instance_id]


def edf_key(g: PlanGroup) -> tuple[int, int, str]:
    """The one EDF order used everywhere: deadline, then heavier first, then id."""
    return (g.deadline_ms, -g.weight, g.id)


@dataclass(frozen=True, slots=True)
class PlanInstance:
    """An engine instance (one GPU or GPU group running one model at a time).

    Attributes:
        id: instance id.
        gpu: GPU type name (informative; fit is already folded into `PlanGroup.service_ms`).
        current_model: model loaded now, None if nothing is loaded.
        busy_until_ms: when the work already running/committed on it ends, ms from now (>= 0).
        can_swap: False pins the instance to `current_model` (e.g. a swap is in flight).
        allowed_models: models an operator lets it hold; None = any model that fits.
    """

    id: int
    gpu: str
    current_model: str | None
    busy_until_ms: int = 0
    can_swap: bool = True
    allowed_models: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class ObjectiveWeights:
    """Weights of the planner objective (maximised, integer):

        SWAP_SCALE * (on_time * sum(weight of on-time groups) - swap_penalty * num_swaps)
        - completion_penalty * sum(end_ms of every group)

    i.e. `on_time` per unit of group weight, `swap_penalty` per model swap, and
    `completion_penalty` per second of completion time summed over groups.

    One unit everywhere (objective, executor, README): `swap_penalty` is in the on-time term's
    units, so a swap costs `swap_penalty / request_value` requests of class weight 1 on time;
    the executor swaps only where the plan's on-time gain exceeds that same amount.
    """

    on_time: int = 1000
    swap_penalty: int = 50
    completion_penalty: int = 1

    @property
    def request_value(self) -> int:
        """Objective value (before SWAP_SCALE) of one request of class weight 1 on time."""
        return self.on_time * REQUEST_WEIGHT

    def swap_cost_requests(self) -> float:
        """What one swap costs, in requests of class weight 1 on time."""
        return self.swap_penalty / self.request_value if self.request_value else 0.0


@dataclass(frozen=True, slots=True)
class PlanningProblem:
    """Everything the planner needs for one epoch.

    Attributes:
        groups: groups to place, in any order.
        instances: the fleet.
        swap_ms: (from_model or None, to_model) -> swap time in ms, fleet-wide.
        swap_ms_by_instance: instance id -> the same map, overriding `swap_ms` for that
            instance (e.g. a slower disk). Do not mutate either map.
        default_swap_ms: used when neither map has the pair; None makes a missing pair an
            error, which is the safe default.
        weights: objective weights.
    """

    groups: tuple[PlanGroup, ...]
    instances: tuple[PlanInstance, ...]
    swap_ms: Mapping[tuple[str | None, str], int] = field(default_factory=dict)
    swap_ms_by_instance: Mapping[int, Mapping[tuple[str | None, str], int]] = field(
        default_factory=dict
    )
    default_swap_ms: int | None = None
    weights: ObjectiveWeights = ObjectiveWeights()
    # id -> group / instance, built once by the validation below (the planner looks groups up
    # by id many times per epoch); read through `group_index` / `instance_index`.
    _groups_by_id: dict[str, PlanGroup] = field(init=False, repr=False, compare=False)
    _instances_by_id: dict[int, PlanInstance] = field(init=False, repr=False, compare=False)
    # group id -> rank in EDF order (`edf_key`), built on first use (`edf_rank`)
    _edf_rank: dict[str, int] | None = field(default=None, init=False, repr=False,
                                             compare=False)

    def __post_init__(self) -> None:
        by_id = {g.id: g for g in self.groups}
        if len(by_id) != len(self.groups):
            raise ValueError("duplicate group ids in planning problem")
        insts = {i.id: i for i in self.instances}
        if len(insts) != len(self.instances):
            raise ValueError("duplicate instance ids in planning problem")
        object.__setattr__(self, "_groups_by_id", by_id)
        object.__setattr__(self, "_instances_by_id", insts)
        known = insts
        for g in self.groups:
            if g.weight < 0 or g.size < 0:
                raise ValueError(f"group {g.id}: weight and size must be >= 0")
            if g.release_ms < 0:
                raise ValueError(f"group {g.id}: release_ms must be >= 0")
            for i, s in g.service_ms.items():
                if i not in known:
                    raise ValueError(f"group {g.id}: service_ms names unknown instance {i}")
                if s <= 0:
                    raise ValueError(f"group {g.id}: service_ms[{i}] must be > 0, got {s}")
        for inst in self.instances:
            if inst.busy_until_ms < 0:
                raise ValueError(f"instance {inst.id}: busy_until_ms must be >= 0")

    # ------------------------------------------------------------------ queries
    def swap_time_ms(self, inst: PlanInstance, from_model: str | None, to_model: str) -> int:
        """Time (ms) for `inst` to go from `from_model` to `to_model`; 0 when they are equal."""
        if from_model == to_model:
            return 0
        key = (from_model, to_model)
        per = self.swap_ms_by_instance.get(inst.id)
        if per is not None and key in per:
            return per[key]
        if key in self.swap_ms:
            return self.swap_ms[key]
        if self.default_swap_ms is not None:
            return self.default_swap_ms
        raise KeyError(f"no swap time for instance {inst.id}: {from_model!r} -> {to_model!r}")

    def can_hold(self, inst: PlanInstance, model: str) -> bool:
        """Whether `inst` may hold `model` at some point of this plan."""
        if model == inst.current_model:
            return True
        if not inst.can_swap:
            return False
        return inst.allowed_models is None or model in inst.allowed_models

    def can_serve(self, group: PlanGroup, inst: PlanInstance) -> bool:
        """Whether `group` may run on `inst`: the model fits and the instance may hold it."""
        return inst.id in group.service_ms and self.can_hold(inst, group.model)

    @property
    def models(self) -> tuple[str, ...]:
        """Models needed by some group, sorted."""
        return tuple(sorted({g.model for g in self.groups}))

    def group_by_id(self) -> dict[str, PlanGroup]:
        """A new dict group id -> group (the caller may change it)."""
        return dict(self._groups_by_id)

    def instance_by_id(self) -> dict[int, PlanInstance]:
        """A new dict instance id -> instance (the caller may change it)."""
        return dict(self._instances_by_id)

    @property
    def group_index(self) -> Mapping[str, PlanGroup]:
        """group id -> group, shared and built once per problem: do not mutate."""
        return self._groups_by_id

    @property
    def instance_index(self) -> Mapping[int, PlanInstance]:
        """instance id -> instance, shared and built once per problem: do not mutate."""
        return self._instances_by_id

    def edf_rank(self) -> Mapping[str, int]:
        """group id -> its rank in EDF order (`edf_key`; no ties: ids are unique), sorted
        once per problem; ``sorted(ids, key=pi.edf_rank().__getitem__)`` sorts ids by EDF
        without a Python key call per id. Shared: do not mutate."""
        rank = self._edf_rank
        if rank is None:
            rank = {g.id: k for k, g in enumerate(sorted(self.groups, key=edf_key))}
            object.__setattr__(self, "_edf_rank", rank)
        return rank

    def with_weights(self, weights: ObjectiveWeights) -> PlanningProblem:
        """The same instance with other objective weights (presets carry their own)."""
        if weights == self.weights:
            return self  # frozen: no copy (and no re-validation of every group) needed
        return PlanningProblem(
            self.groups,
            self.instances,
            self.swap_ms,
            self.swap_ms_by_instance,
            self.default_swap_ms,
            weights,
        )

    def subset(self, group_ids: set[str]) -> PlanningProblem:
        """The same fleet with only the named groups."""
        return PlanningProblem(
            tuple(g for g in self.groups if g.id in group_ids),
            self.instances,
            self.swap_ms,
            self.swap_ms_by_instance,
            self.default_swap_ms,
            self.weights,
        )

    # ------------------------------------------------------------------ JSON snapshot
    def to_json(self) -> str:
        """Serialise to the snapshot JSON format (see `_SnapshotModel`)."""
        return _SnapshotModel.from_instance(self).model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<snapshot>") -> PlanningProblem:
        """Parse a snapshot; raises ConfigError naming `source` and the bad field."""
        try:
            snap = _SnapshotModel.model_validate_json(text)
            return snap.to_instance()
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{source}: field '{loc}': {err['msg']}") from None
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None

    @classmethod
    def load(cls, path: str | Path) -> PlanningProblem:
        """Read a snapshot JSON file."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read snapshot: {exc.strerror}") from None
        return cls.from_json(text, source=str(p))


# ---------------------------------------------------------------------- snapshot schema
class _GroupModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    model: str
    size: int
    weight: int
    deadline_ms: int
    service_ms: dict[int, int]
    release_ms: int = 0
    start_deadline_ms: int | None = None


class _InstanceModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: int
    gpu: str
    current_model: str | None
    busy_until_ms: int = 0
    can_swap: bool = True
    allowed_models: list[str] | None = None


class _SwapModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    from_model: str | None
    to_model: str
    ms: int
    instance: int | None = None  # None = fleet-wide


class _WeightsModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    on_time: int = 1000
    swap_penalty: int = 50
    completion_penalty: int = 1


class _SnapshotModel(BaseModel):
    """JSON layout of a saved planning problem. Swap times are a list because JSON object
    keys cannot be (from, to) pairs."""

    model_config = ConfigDict(extra="forbid")
    version: int = 1
    groups: list[_GroupModel]
    instances: list[_InstanceModel]
    swaps: list[_SwapModel] = []
    default_swap_ms: int | None = None
    weights: _WeightsModel = _WeightsModel()

    @classmethod
    def from_instance(cls, inst: PlanningProblem) -> _SnapshotModel:
        swaps = [
            _SwapModel(from_model=f, to_model=t, ms=ms) for (f, t), ms in inst.swap_ms.items()
        ]
        for iid, table in inst.swap_ms_by_instance.items():
            swaps += [
                _SwapModel(from_model=f, to_model=t, ms=ms, instance=iid)
                for (f, t), ms in table.items()
            ]
        w = inst.weights
        return cls(
            groups=[
                _GroupModel(
                    id=g.id,
                    model=g.model,
                    size=g.size,
                    weight=g.weight,
                    deadline_ms=g.deadline_ms,
                    service_ms=dict(g.service_ms),
                    release_ms=g.release_ms,
                    start_deadline_ms=g.start_deadline_ms,
                )
                for g in inst.groups
            ],
            instances=[
                _InstanceModel(
                    id=i.id,
                    gpu=i.gpu,
                    current_model=i.current_model,
                    busy_until_ms=i.busy_until_ms,
                    can_swap=i.can_swap,
                    allowed_models=None if i.allowed_models is None else sorted(i.allowed_models),
                )
                for i in inst.instances
            ],
            swaps=swaps,
            default_swap_ms=inst.default_swap_ms,
            weights=_WeightsModel(
                on_time=w.on_time, swap_penalty=w.swap_penalty, completion_penalty=w.completion_penalty
            ),
        )

    def to_instance(self) -> PlanningProblem:
        fleet: dict[tuple[str | None, str], int] = {}
        per: dict[int, dict[tuple[str | None, str], int]] = {}
        for s in self.swaps:
            table = fleet if s.instance is None else per.setdefault(s.instance, {})
            table[(s.from_model, s.to_model)] = s.ms
        return PlanningProblem(
            groups=tuple(
                PlanGroup(g.id, g.model, g.size, g.weight, g.deadline_ms, dict(g.service_ms),
                          g.release_ms, g.start_deadline_ms)
                for g in self.groups
            ),
            instances=tuple(
                PlanInstance(
                    i.id,
                    i.gpu,
                    i.current_model,
                    i.busy_until_ms,
                    i.can_swap,
                    None if i.allowed_models is None else frozenset(i.allowed_models),
                )
                for i in self.instances
            ),
            swap_ms=fleet,
            swap_ms_by_instance=per,
            default_swap_ms=self.default_swap_ms,
            weights=ObjectiveWeights(
                self.weights.on_time, self.weights.swap_penalty, self.weights.completion_penalty
            ),
        )

