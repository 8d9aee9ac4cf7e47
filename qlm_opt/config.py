"""Fleet and workload configuration files (TOML), validated with pydantic.

Errors name the file and the field. See README "Configuration reference" for the formats.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qlm_opt.catalog import Catalog, parse_toml_as
from qlm_opt.domain import InstanceSpec, SLOClass
from qlm_opt.engines.perf import PerfParams
from qlm_opt.engines.simulated import EngineConfig
from qlm_opt.errors import ConfigError


def example_path(name: str) -> Path:
    """A file of the built-in example (fleet.toml, workload.toml)."""
    return Path(str(resources.files("qlm_opt") / "examples" / name))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- fleet --------------------------------------------------------------------------------------
class EngineSection(_Strict):
    max_num_seqs: int = Field(256, gt=0)
    max_num_batched_tokens: int = Field(8192, gt=0)
    block_size: int = Field(16, gt=0)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, gt=0)
    enable_prefix_caching: bool = True  # vLLM's automatic prefix caching (its default)


class PerfSection(_Strict):
    mfu: float = Field(0.5, gt=0, le=1)
    mbu: float = Field(0.8, gt=0, le=1)
    overhead_ms: float = Field(4.0, ge=0)
    tp_efficiency: float = Field(0.85, gt=0, le=1)
    engine_start_s: float = Field(20.0, ge=0)
    warm_wake_s: float = Field(0.5, ge=0)
    calibration: str | None = None  # a file written by `qlm-opt profile`
    noise_seed: int = Field(0, ge=0)  # which sample of the calibration's measured noise


class EstimatorSection(_Strict):
    """What the scheduler's RWT estimator (and planner) assumes about engine speed before it
    has calibrated online from engine stats. ``prior = "engine"``: the fleet's own engine
    model (``[perf]``, with its calibration); in what-if runs that hands the estimator the
    simulator's truth. ``"datasheet"``: the roofline with default efficiencies (mfu 0.5, mbu
    0.8, 4 ms overhead), overridden by any of ``mfu``/``mbu``/``overhead_ms`` given here."""

    prior: Literal["engine", "datasheet"] = "engine"
    mfu: float | None = Field(None, gt=0, le=1)
    mbu: float | None = Field(None, gt=0, le=1)
    overhead_ms: float | None = Field(None, ge=0)


class InstanceGroup(_Strict):
    gpu: str
    model: str | None = None
    count: int = Field(1, gt=0)
    tp: int | None = Field(None, gt=0)
    models: list[str] | None = None  # models this instance may swap to (default: any that fits)
    name: str | None = None


class FleetFile(_Strict):
    name: str = "fleet"
    warm_swaps: bool = True  # sleep-mode swaps: weights kept in host memory
    engine: EngineSection = EngineSection()
    perf: PerfSection = PerfSection()
    estimator: EstimatorSection = EstimatorSection()
    instances: list[InstanceGroup] = Field(min_length=1)


class Fleet:
    """A validated fleet: instance specs plus engine and performance settings."""

    def __init__(self, data: FleetFile, catalog: Catalog, source: str = "<fleet>") -> None:
        self.name = data.name
        self.source = source
        self.warm_swaps = data.warm_swaps
        e = data.engine
        self.engine = EngineConfig(
            max_num_seqs=e.max_num_seqs,
            max_num_batched_tokens=e.max_num_batched_tokens,
            block_size=e.block_size,
            max_model_len=e.max_model_len,
            enable_prefix_caching=e.enable_prefix_caching,
        )
        p = data.perf
        self.perf = PerfParams(
            mfu=p.mfu,
            mbu=p.mbu,
            overhead_s=p.overhead_ms / 1000.0,
            tp_efficiency=p.tp_efficiency,
            engine_start_s=p.engine_start_s,
            warm_wake_s=p.warm_wake_s,
            noise_seed=p.noise_seed,
        )
        self.calibration = p.calibration
        if p.calibration:
            from dataclasses import replace

            from qlm_opt.engines.calibration import Calibration

            cal_path = Path(p.calibration)
            if not cal_path.is_absolute() and source not in ("<fleet>", ""):
                cal_path = Path(source).parent / cal_path
            self.perf = replace(self.perf, calibration=Calibration.load(cal_path))
        # the scheduler's prior on engine speed (None: the engines' own model)
        es = data.estimator
        self.prior = es.prior
        self.prior_perf: PerfParams | None = None
        if es.prior == "datasheet":
            d = PerfParams()
            self.prior_perf = PerfParams(
                mfu=es.mfu if es.mfu is not None else d.mfu,
                mbu=es.mbu if es.mbu is not None else d.mbu,
                overhead_s=es.overhead_ms / 1000.0 if es.overhead_ms is not None
                else d.overhead_s,
                tp_efficiency=self.perf.tp_efficiency,
                engine_start_s=self.perf.engine_start_s,
                warm_wake_s=self.perf.warm_wake_s,
            )
        self.catalog = Catalog(
            catalog.models,
            catalog.gpus,
            gpu_memory_utilization=e.gpu_memory_utilization,
            activation_reserve_bytes=catalog.activation_reserve_bytes,
            min_kv_tokens=catalog.min_kv_tokens,
        )
        self.instances: list[InstanceSpec] = []
        for gi, g in enumerate(data.instances):
            where = f"{source}: field 'instances.{gi}"
            if g.gpu not in catalog.gpus:
                raise ConfigError(
                    f"{where}.gpu': unknown GPU type '{g.gpu}' "
                    f"(known: {', '.join(sorted(catalog.gpus))})"
                )
            for m in ([g.model] if g.model else []) + (g.models or []):
                if m not in catalog.models:
                    raise ConfigError(
                        f"{where}.model': unknown model '{m}' "
                        f"(known: {', '.join(sorted(catalog.models))})"
                    )
            tp = g.tp
            if tp is None:
                probe = g.model or (g.models[0] if g.models else None)
                pl = self.catalog.placement(probe, g.gpu) if probe else None
                tp = pl.tp if pl else 1
            if g.model and not self.catalog.fits(g.model, g.gpu, tp):
                raise ConfigError(
                    f"{where}.model': '{g.model}' does not fit on {tp}x {g.gpu}"
                )
            for _ in range(g.count):
                iid = len(self.instances)
                self.instances.append(
                    InstanceSpec(
                        id=iid,
                        gpu=g.gpu,
                        tp=tp,
                        initial_model=g.model,
                        name=f"{g.name or g.gpu.lower()}-{iid}",
                        allowed_models=tuple(g.models) if g.models else None,
                    )
                )

    def can_serve(self, inst: InstanceSpec, model: str) -> bool:
        if inst.allowed_models is not None and model not in inst.allowed_models:
            if model != inst.initial_model:
                return False
        return self.catalog.fits(model, inst.gpu, inst.tp)

    @classmethod
    def load(cls, path: Path | str, catalog: Catalog | None = None) -> Fleet:
        path = Path(path)
        data = parse_toml_as(FleetFile, path)
        return cls(data, catalog or Catalog.default(), source=str(path))

    @classmethod
    def from_dict(cls, d: dict, catalog: Catalog | None = None) -> Fleet:
        return cls(FleetFile.model_validate(d), catalog or Catalog.default())


# -- workload -----------------------------------------------------------------------------------
class ArrivalsSection(_Strict):
    process: Literal["poisson", "gamma"] = "gamma"
    rate_per_s: float = Field(5.53, gt=0)
    cv: float = Field(1.09, gt=0)  # coefficient of variation of inter-arrival times (gamma)
    # Time-varying rate: ``[[t_s, multiplier], ...]``, a piecewise-linear multiplier of
    # ``rate_per_s`` (times in seconds from the start, strictly increasing, >= 0; held at the
    # first value before the first point and at the last value after the last). None: constant.
    rate_profile: list[tuple[float, float]] | None = None

    @model_validator(mode="after")
    def _profile(self) -> ArrivalsSection:
        p = self.rate_profile
        if p is None:
            return self
        if not p:
            raise ValueError("rate_profile: empty list (give [[t_s, multiplier], ...] or leave "
                             "it out for a constant rate)")
        for i, (t, m) in enumerate(p):
            if not (math.isfinite(t) and math.isfinite(m)):
                raise ValueError(f"rate_profile[{i}]: [{t}, {m}] is not finite")
            if t < 0:
                raise ValueError(f"rate_profile[{i}]: time {t} s is negative")
            if m < 0:
                raise ValueError(f"rate_profile[{i}]: multiplier {m} is negative")
            if i and t <= p[i - 1][0]:
                raise ValueError(f"rate_profile[{i}]: time {t} s is not after the previous "
                                 f"point's {p[i - 1][0]} s (times must increase)")
        if all(m == 0 for _, m in p):
            raise ValueError("rate_profile: every multiplier is 0 (no traffic)")
        return self


_LENGTH_FIELDS = ("prompt_log_mu", "prompt_log_sigma", "prompt_min", "prompt_max",
                  "output_log_mu", "output_log_sigma", "output_min", "output_max")


class LengthComponent(_Strict):
    """One lognormal of a length mixture; a field left out is the enclosing ``lengths``'s."""

    weight: float = Field(gt=0)  # relative; the mixture's weights are normalised
    prompt_log_mu: float | None = None
    prompt_log_sigma: float | None = Field(None, ge=0)
    prompt_min: int | None = Field(None, gt=0)
    prompt_max: int | None = Field(None, gt=0)
    output_log_mu: float | None = None
    output_log_sigma: float | None = Field(None, ge=0)
    output_min: int | None = Field(None, gt=0)
    output_max: int | None = Field(None, gt=0)


class LengthsSection(_Strict):
    # Lognormal fits on ../shared/data/azure_llm_2023_conv.csv (see sim/workload.py).
    prompt_log_mu: float = 6.633
    prompt_log_sigma: float = Field(0.985, ge=0)
    prompt_min: int = Field(2, gt=0)
    prompt_max: int = Field(8192, gt=0)
    output_log_mu: float = 5.019
    output_log_sigma: float = Field(0.859, ge=0)
    output_min: int = Field(1, gt=0)
    output_max: int = Field(2048, gt=0)
    # A mixture of lognormals (e.g. RAG's long prompts with chat's short ones): each request
    # draws one component by weight, then its prompt and output from that component. None:
    # the one lognormal above. The fields above are the components' defaults.
    mixture: list[LengthComponent] | None = None

    @model_validator(mode="after")
    def _mixture(self) -> LengthsSection:
        if self.mixture is None:
            return self
        if not self.mixture:
            raise ValueError("mixture: empty list (give at least one component or leave it "
                             "out for a single lognormal)")
        for i, c in enumerate(self.components()):
            for k in ("prompt", "output"):
                lo, hi = getattr(c, f"{k}_min"), getattr(c, f"{k}_max")
                if lo > hi:
                    raise ValueError(f"mixture[{i}]: {k}_min {lo} is above {k}_max {hi}")
        return self

    def components(self) -> list[LengthsSection]:
        """The mixture's components as single lognormals (fields filled in from this
        section), or ``[self]`` when there is no mixture."""
        if self.mixture is None:
            return [self]
        base = {f: getattr(self, f) for f in _LENGTH_FIELDS}
        return [LengthsSection.model_construct(**{
            **base, **{f: getattr(c, f) for f in _LENGTH_FIELDS if getattr(c, f) is not None}})
            for c in self.mixture]

    def weights(self) -> list[float]:
        """The components' normalised weights (``[1.0]`` without a mixture)."""
        if self.mixture is None:
            return [1.0]
        tot = sum(c.weight for c in self.mixture)
        return [c.weight / tot for c in self.mixture]


class ClassSection(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float | None = Field(None, gt=0)
    share: float = Field(ge=0)
    weight: float = Field(1.0, gt=0)
    priority: int = 0


class PrefixSection(_Strict):
    """Shared-prefix traffic for the synthetic generator (see
    ``qlm_opt.whatif.workload.synthetic_prefix_trace``)."""

    num_system_prompts: int = Field(8, gt=0)
    system_prompt_tokens: int = Field(1500, gt=0)
    system_prompt_zipf: float = Field(1.0, ge=0)
    turns_mean: float = Field(3.0, ge=1)
    think_time_s: float = Field(20.0, ge=0)
    block_tokens: int = Field(512, gt=0)


_WINDOW_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_s(window: str) -> float:
    """Seconds of a completion window such as ``24h``, ``1h``, ``30m`` or ``90s``."""
    w = window.strip().lower()
    if len(w) < 2 or w[-1] not in _WINDOW_UNITS_S or not w[:-1].isdigit() or int(w[:-1]) <= 0:
        raise ValueError(f"window '{window}' is not a duration like 24h, 30m or 90s")
    return float(int(w[:-1]) * _WINDOW_UNITS_S[w[-1]])


class BatchJobSection(_Strict):
    """One Batch API job in a what-if run (``qlm_opt.whatif.batch_jobs``): ``num_lines`` requests
    submitted together at ``submit_at_s``, each due by the end of the job's ``window``."""

    name: str | None = None  # default: batch-job-<index>
    submit_at_s: float = Field(0.0, ge=0)
    num_lines: int = Field(gt=0)
    window: str = "24h"
    model: str
    slo_class: str = "batch"  # a class of [classes]; the deadline is the window's end
    lengths: LengthsSection = LengthsSection()

    @model_validator(mode="after")
    def _window(self) -> BatchJobSection:
        window_s(self.window)
        return self


class WorkloadFile(_Strict):
    name: str = "workload"
    seed: int = 0
    duration_s: float | None = Field(None, gt=0)  # synthetic length; cap on traces
    max_requests: int | None = Field(None, gt=0)
    rate_scale: float = Field(1.0, gt=0)  # arrival rate multiplier (trace time compression)
    arrivals: ArrivalsSection = ArrivalsSection()
    lengths: LengthsSection = LengthsSection()
    prefixes: PrefixSection | None = None  # set: synthetic traffic with shared prefixes
    classes: dict[str, ClassSection] = Field(min_length=1)
    models: dict[str, float] = Field(min_length=1)  # model name -> share
    batch_jobs: list[BatchJobSection] = []  # Batch API jobs on top of the traffic

    @model_validator(mode="after")
    def _batch_job_classes(self) -> WorkloadFile:
        for i, j in enumerate(self.batch_jobs):
            if j.slo_class not in self.classes:
                raise ValueError(f"batch_jobs.{i}.slo_class: unknown class '{j.slo_class}' "
                                 f"(known: {', '.join(self.classes)})")
        return self

    @model_validator(mode="after")
    def _shares(self) -> WorkloadFile:
        if sum(c.share for c in self.classes.values()) <= 0:
            raise ValueError("class shares must not all be zero")
        if any(v < 0 for v in self.models.values()) or sum(self.models.values()) <= 0:
            raise ValueError("model shares must be >= 0 and not all zero")
        if self.duration_s is None and self.max_requests is None:
            self.duration_s = 600.0
        p = self.arrivals.rate_profile
        if p is not None and p[-1][1] == 0 and self.duration_s is None:
            raise ValueError("arrivals.rate_profile ends at multiplier 0 and the workload has "
                             "no duration_s: traffic would stop before max_requests; give a "
                             "duration_s or end the profile above 0")
        return self


class Workload:
    """A validated workload spec."""

    def __init__(self, data: WorkloadFile, source: str = "<workload>") -> None:
        self.data = data
        self.source = source
        self.name = data.name
        self.classes: dict[str, SLOClass] = {
            n: SLOClass(n, c.ttft_s, c.tpot_s, c.weight, c.priority)
            for n, c in data.classes.items()
        }

    def check_models(self, catalog: Catalog) -> None:
        for m in self.data.models:
            if m not in catalog.models:
                raise ConfigError(
                    f"{self.source}: field 'models.{m}': unknown model "
                    f"(known: {', '.join(sorted(catalog.models))})"
                )
        for i, j in enumerate(self.data.batch_jobs):
            if j.model not in catalog.models:
                raise ConfigError(
                    f"{self.source}: field 'batch_jobs.{i}.model': unknown model '{j.model}' "
                    f"(known: {', '.join(sorted(catalog.models))})"
                )

    @classmethod
    def load(cls, path: Path | str) -> Workload:
        path = Path(path)
        return cls(parse_toml_as(WorkloadFile, path), source=str(path))

    @classmethod
    def from_dict(cls, d: dict) -> Workload:
        return cls(WorkloadFile.model_validate(d))
