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

from pydantic import BaseModel, ConfigDict, Field, ValidationError

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

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        # K and V, for every layer and KV head.
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


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
    """How a model sits on a GPU type: tensor-parallel degree and KV capacity."""

    model: str
    gpu: str
    tp: int
    kv_capacity_tokens: int  # across the tp GPUs


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
    def kv_capacity_tokens(self, model: str, gpu: str, tp: int) -> int:
        """KV-cache tokens that fit on ``tp`` GPUs of this type after weights (0 if none)."""
        m, g = self.model(model), self.gpu(gpu)
        usable = tp * (g.memory_bytes * self.gpu_memory_utilization - self.activation_reserve_bytes)
        free = usable - m.weight_bytes
        return max(0, int(free // m.kv_bytes_per_token))

    def placement(self, model: str, gpu: str, tp: int | None = None) -> Placement | None:
        """The smallest TP degree (or the given one) at which ``model`` fits on ``gpu``.

        Fits means: the weights fit and at least ``min(min_kv_tokens, max_context)`` KV tokens
        remain. Returns None when no degree in 1, 2, 4, 8 fits.
        """
        need = min(self.min_kv_tokens, self.model(model).max_context)
        for d in (tp,) if tp is not None else TP_DEGREES:
            cap = self.kv_capacity_tokens(model, gpu, d)
            if cap >= need:
                return Placement(model, gpu, d, cap)
        return None

    def fits(self, model: str, gpu: str, tp: int) -> bool:
        return self.placement(model, gpu, tp) is not None
