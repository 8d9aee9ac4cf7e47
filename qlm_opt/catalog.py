"""Model and GPU catalog: public architecture numbers and the quantities derived from them.

Models live in ``models/<name>.toml`` (one file per model), GPU types in ``models/gpus.toml``.
Everything here is loaded with pydantic, so a bad file fails with an error naming the file and
the field. Inside the package the catalog is plain frozen values.

Units: memory sizes in bytes (``*_bytes``), bandwidths in bytes/s (``*_bps``), compute in
FLOP/s. Datasheet memory sizes are GiB (2**30), bandwidths GB/s (1e9).
"""

from __future__ import annotations

import functools
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qlm_opt.errors import ConfigError

GIB = 1 << 30
GB = 1e9
TP_DEGREES = (1, 2, 4, 8)


class _ModelFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    hf_id: str | None = None
    params: int = Field(gt=0)
    layers: int = Field(gt=0)
    hidden: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    dtype_bytes: int = Field(gt=0, le=8)
    max_context: int = Field(gt=0)
    source: str | None = None  # where the numbers come from (config.json, model card)
    # Mixture of experts: compute follows active_params, memory follows params (the total).
    active_params: int | None = Field(None, gt=0)
    num_experts: int | None = Field(None, gt=0)  # routed experts per MoE layer
    experts_per_token: int | None = Field(None, gt=0)
    expert_params: int | None = Field(None, ge=0)  # parameters inside the routed experts
    moe_intermediate: int | None = Field(None, gt=0)  # one expert's FFN width (TP splits it)
    # Bytes per stored weight where the checkpoint differs from dtype_bytes (which stays the
    # KV-cache dtype): FP8 is 1, MXFP4 with its scales 0.53125.
    weight_dtype_bytes: float | None = Field(None, gt=0, le=8)
    expert_dtype_bytes: float | None = Field(None, gt=0, le=8)
    # Multi-head latent attention (DeepSeek-V2/V3): the cached latent per layer and token
    # (kv_lora_rank + qk_rope_head_dim), which replaces K and V heads.
    kv_latent_dim: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _moe(self) -> _ModelFile:
        moe = (self.active_params, self.num_experts, self.experts_per_token, self.expert_params)
        if any(v is not None for v in moe) and any(v is None for v in moe):
            raise ValueError("a mixture-of-experts model sets all of active_params, "
                             "num_experts, experts_per_token and expert_params")
        if self.active_params is not None and self.active_params > self.params:
            raise ValueError("active_params must be <= params")
        if self.expert_params is not None and self.expert_params >= self.params:
            raise ValueError("expert_params must be < params")
        if self.num_experts is not None and self.experts_per_token > self.num_experts:
            raise ValueError("experts_per_token must be <= num_experts")
        return self


class _GPUEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    memory_gb: float = Field(gt=0)
    hbm_gbps: float = Field(gt=0)
    bf16_tflops: float = Field(gt=0)
    host_link_gbps: float = Field(gt=0)
    disk_gbps: float = Field(gt=0, default=3.0)


class _GPUFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    gpus: dict[str, _GPUEntry]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's public architecture numbers and what follows from them."""

    name: str
    params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_context: int
    hf_id: str | None = None
    source: str | None = None
    active_params: int | None = None  # MoE: parameters a token passes through
    num_experts: int | None = None
    experts_per_token: int | None = None
    expert_params: int | None = None
    moe_intermediate: int | None = None
    weight_dtype_bytes: float | None = None  # default: dtype_bytes
    expert_dtype_bytes: float | None = None  # default: weight_dtype_bytes
    kv_latent_dim: int | None = None  # MLA

    @property
    def is_moe(self) -> bool:
        return self.num_experts is not None

    @property
    def compute_params(self) -> int:
        """Parameters whose matmuls every token runs: the active ones for MoE."""
        return self.active_params if self.active_params is not None else self.params

    @property
    def weight_bytes(self) -> int:
        """All weights held in GPU memory (every expert, whichever a token routes to)."""
        wb = self.weight_dtype_bytes if self.weight_dtype_bytes is not None else self.dtype_bytes
        eb = self.expert_dtype_bytes if self.expert_dtype_bytes is not None else wb
        experts = self.expert_params or 0
        return int(round((self.params - experts) * wb + experts * eb))

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes per token on one GPU holding all of it (tensor-parallel degree 1)."""
        return self.kv_bytes_per_token_at(1)

    def kv_bytes_per_token_at(self, tp: int) -> int:
        """KV bytes per token summed over the ``tp`` GPUs of an instance.

        K and V for every layer and KV head; vLLM replicates KV heads when ``tp`` exceeds
        them, and every rank caches the whole MLA latent, so those copies count too."""
        if self.kv_latent_dim is not None:
            return tp * self.layers * self.kv_latent_dim * self.dtype_bytes
        return 2 * self.layers * max(self.kv_heads, tp) * self.head_dim * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class GPUSpec:
    """One GPU type, from its datasheet."""

    name: str
    memory_bytes: int
    hbm_bps: float
    flops: float  # dense bf16 FLOP/s
    host_link_bps: float
    disk_bps: float


@dataclass(frozen=True, slots=True)
class Placement:
    """How a model sits on a GPU type: tensor-parallel degree, expert-parallel degree (1, or
    ``tp`` when a MoE's experts are spread whole over the same GPUs) and KV capacity."""

    model: str
    gpu: str
    tp: int
    kv_capacity_tokens: int  # across the tp GPUs
    ep: int = 1


def _load_toml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def format_validation_error(path: Path | str, err: ValidationError) -> str:
    """One line per bad field: ``file: field.path: message``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"{path}: field '{loc}': {e['msg']}")
    return "; ".join(lines)


def parse_toml_as(model: type[BaseModel], path: Path) -> BaseModel:
    """Load a TOML file into a pydantic model, raising ConfigError that names file and field."""
    data = _load_toml(path)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(path, e)) from None


def default_catalog_dir() -> Path:
    """``$QLM_CATALOG_DIR``, else the packaged copy, else the repository's ``models/``."""
    env = os.environ.get("QLM_CATALOG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for cand in (here / "_data" / "models", here.parent / "models"):
        if cand.is_dir():
            return cand
    raise ConfigError("model catalog not found: set QLM_CATALOG_DIR to a folder of model TOMLs")


class Catalog:
    """Models and GPU types, with memory fit and KV capacity.

    ``gpu_memory_utilization`` is vLLM's fraction of GPU memory the engine may use;
    ``activation_reserve_bytes`` is held back per GPU for activations and CUDA graphs.
    """

    def __init__(
        self,
        models: dict[str, ModelSpec],
        gpus: dict[str, GPUSpec],
        gpu_memory_utilization: float = 0.9,
        activation_reserve_bytes: int = 1 * GIB,
        min_kv_tokens: int = 4096,
    ) -> None:
        self.models = models
        self.gpus = gpus
        self.gpu_memory_utilization = gpu_memory_utilization
        self.activation_reserve_bytes = activation_reserve_bytes
        self.min_kv_tokens = min_kv_tokens

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: Path | str | None = None, **kwargs) -> Catalog:
        d = Path(directory) if directory is not None else default_catalog_dir()
        if not d.is_dir():
            raise ConfigError(f"{d}: catalog folder not found")
        models: dict[str, ModelSpec] = {}
        for path in sorted(d.glob("*.toml")):
            if path.name == "gpus.toml":
                continue
            m = parse_toml_as(_ModelFile, path)
            if m.name in models:
                raise ConfigError(f"{path}: field 'name': duplicate model name '{m.name}'")
            models[m.name] = ModelSpec(**m.model_dump())
        gpath = d / "gpus.toml"
        gfile = parse_toml_as(_GPUFile, gpath)
        gpus = {
            name: GPUSpec(
                name=name,
                memory_bytes=int(g.memory_gb * GIB),
                hbm_bps=g.hbm_gbps * GB,
                flops=g.bf16_tflops * 1e12,
                host_link_bps=g.host_link_gbps * GB,
                disk_bps=g.disk_gbps * GB,
            )
            for name, g in gfile.gpus.items()
        }
        return cls(models, gpus, **kwargs)

    @classmethod
    @functools.cache
    def default(cls) -> Catalog:
        return cls.load()

    # -- lookups -----------------------------------------------------------------------------
    def model(self, name: str) -> ModelSpec:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(
                f"unknown model '{name}' (catalog has: {', '.join(sorted(self.models))})"
            ) from None

    def gpu(self, name: str) -> GPUSpec:
        try:
            return self.gpus[name]
        except KeyError:
            raise ConfigError(
                f"unknown GPU type '{name}' (catalog has: {', '.join(sorted(self.gpus))})"
            ) from None

    # -- derived -----------------------------------------------------------------------------
    def layout_error(self, model: str, tp: int, ep: int = 1) -> str | None:
        """Why ``model`` cannot be split over ``tp`` GPUs with expert-parallel degree ``ep``
        (None when it can), by vLLM's rules: attention heads divide evenly over the ranks,
        KV heads divide or are replicated, experts are spread whole (``ep`` = ``tp``, the
        count divisible by it) or each expert's FFN is split ``tp`` ways."""
        m = self.model(model)
        if tp < 1 or m.heads % tp:
            return f"{m.heads} attention heads do not split over tp={tp}"
        if m.kv_latent_dim is None and m.kv_heads % tp and tp % m.kv_heads:
            return f"{m.kv_heads} KV heads neither divide nor are divided by tp={tp}"
        if ep != 1:
            if not m.is_moe:
                return "expert parallelism needs a mixture-of-experts model"
            if ep != tp:
                return f"ep={ep} must equal tp={tp} (experts spread over the same GPUs)"
            if m.num_experts % ep:
                return f"{m.num_experts} experts do not split over ep={ep}"
        elif m.is_moe and tp > 1 and m.moe_intermediate and m.moe_intermediate % tp:
            return f"expert FFN width {m.moe_intermediate} does not split over tp={tp}"
        return None

    def kv_capacity_tokens(self, model: str, gpu: str, tp: int, ep: int | None = None) -> int:
        """KV-cache tokens that fit on ``tp`` GPUs of this type after weights (0 if none, or
        if the layout is not allowed). Each GPU holds 1/tp of the weights, under expert
        parallelism too (whole experts instead of slices of every expert). ``ep`` None: the
        first allowed of ep=tp and ep=1."""
        m, g = self.model(model), self.gpu(gpu)
        if ep is None:
            ep = tp if m.is_moe and tp > 1 and self.layout_error(model, tp, tp) is None else 1
        if self.layout_error(model, tp, ep) is not None:
            return 0
        usable = tp * (g.memory_bytes * self.gpu_memory_utilization - self.activation_reserve_bytes)
        free = usable - m.weight_bytes
        return max(0, int(free // m.kv_bytes_per_token_at(tp)))

    def placement(
        self, model: str, gpu: str, tp: int | None = None, ep: int | None = None
    ) -> Placement | None:
        """The smallest TP degree (or the given one) at which ``model`` fits on ``gpu``.

        Fits means: the layout is allowed (``layout_error``), the weights fit and at least
        ``min(min_kv_tokens, max_context)`` KV tokens remain. A MoE on several GPUs takes
        expert parallelism where its experts split evenly, else splits every expert.
        Returns None when no degree in 1, 2, 4, 8 fits.
        """
        m = self.model(model)
        need = min(self.min_kv_tokens, m.max_context)
        for d in (tp,) if tp is not None else TP_DEGREES:
            eps = (ep,) if ep is not None else ((d, 1) if m.is_moe and d > 1 else (1,))
            for e in eps:
                cap = self.kv_capacity_tokens(model, gpu, d, e)
                if cap >= need:
                    return Placement(model, gpu, d, cap, e)
        return None

    def fits(self, model: str, gpu: str, tp: int, ep: int | None = None) -> bool:
        return self.placement(model, gpu, tp, ep) is not None
