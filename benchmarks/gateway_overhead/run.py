"""Gateway overhead: latency added by qlm-opt's HTTP path, and non-streamed requests/s.

Two servers, each a uvicorn subprocess (httptools + uvloop, one worker, access log off):
- ``bare``: a minimal raw ASGI app that returns the same JSON body as qlm-opt (no framework, no
  scheduling): the floor of any Python HTTP endpoint on this machine;
- ``qlm``: ``qlm-opt serve``'s app over the embedded simulated fleet, priority policy.

The load generator is a raw asyncio HTTP/1.1 client on keep-alive connections (pre-built
request bytes), so that it costs the shared CPU as little as possible.

- Latency: one connection, sequential requests; p50/p99 of each server and the difference.
  The simulated fleet runs at ``--speedup`` x (default 1000) so the engine time of a 1-token
  request (about 5 ms simulated on llama-3.2-1b / A10) shrinks to microseconds and what is
  left is the gateway: auth, validation, admission, policy, engine submit, timers, response.
- Throughput: ``--concurrency`` connections for ``--seconds``; once with the fleet at real
  simulated speed (speedup 1) and once sped up.

Usage: python benchmarks/gateway_overhead/run.py [--requests 2000] [--seconds 10]
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
import time

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
    else:
        from qlm_opt.server.app import create_app
        from qlm_opt.server.settings import ServerSettings

        settings = ServerSettings.model_validate({
            "backend": {"kind": "sim", "policy": "priority", "sim": {"speedup": speedup}},
            "auth": {"keys": [{"key": KEY, "tenant": "bench"}]},
            "classes": {"interactive": {"ttft_s": 2.0, "max_queue": 100000}},
        })
        app = create_app(settings, env={})
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, kind: str, speedup: float = 1000.0) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", kind, "--port", str(self.port),
             "--speedup", str(speedup)],
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


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--serve", choices=["bare", "qlm"])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--speedup", type=float, default=1000.0)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=32)
    args = ap.parse_args()
    if args.serve:
        _serve(args.serve, args.port, args.speedup)
        return
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    rows = []
    lat = {}
    for kind, speedup in (("bare", 1.0), ("qlm", args.speedup)):
        srv = Server(kind, speedup)
        try:
            xs = asyncio.run(_latency(srv.port, args.requests))
            lat[kind] = xs
            rps, errs = asyncio.run(_throughput(srv.port, args.concurrency, args.seconds))
            label = "bare ASGI" if kind == "bare" else f"qlm-opt (sim x{speedup:g})"
            rows.append((label, _pct(xs, 0.5), _pct(xs, 0.99), rps, errs))
        finally:
            srv.stop()
    srv = Server("qlm", 1.0)
    try:
        # At real simulated speed a request spends ~10-40 ms in the engine, so more
        # connections are needed to keep the gateway busy.
        conns = args.concurrency * 4
        rps, errs = asyncio.run(_throughput(srv.port, conns, args.seconds))
        rows.append((f"qlm-opt (sim x1, {conns} connections)", None, None, rps, errs))
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
    b, q = lat["bare"], lat["qlm"]
    print()
    print(f"added latency: p50 {_pct(q, 0.5) - _pct(b, 0.5):.2f} ms, "
          f"p99 {_pct(q, 0.99) - _pct(b, 0.99):.2f} ms "
          f"(mean {1000 * (statistics.mean(q) - statistics.mean(b)):.2f} ms)")


if __name__ == "__main__":
    main()
