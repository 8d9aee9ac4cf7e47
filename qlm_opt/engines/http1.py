"""A minimal HTTP/1.1 client for the data path of ``vllm_remote`` engines: POST one JSON body
on a keep-alive connection and read the response (chunked or with a Content-Length) as it
comes.

Why not aiohttp (which this replaced on the data path): a request through aiohttp's session
builds its request object, headers and connection handle anew each time, and its bytes leave
only when the engine's task first runs, after the rest of the gateway's work for the request.
Here the request head is encoded once per pool (only the Content-Length changes), and a
request on an idle keep-alive connection is written synchronously (``Pool.idle`` then
``Conn.send``), so the engine can start on it while the gateway finishes its own work
(``benchmarks/gateway_overhead``).

Scope: ``http`` and ``https`` URLs, no proxies, no redirects, no compression (the server's
bytes are passed on as they are), one request at a time per connection (no pipelining).
A connection goes back to the pool only after its response was read to the end and the
server did not ask to close it; every other case closes it (which is also how a stream is
aborted: vLLM's server aborts a request whose client went away). An idle connection is kept
for at most ``idle_s`` (below the server's own keep-alive timeout: uvicorn's default is
5 s); one the server closed anyway shows as an error before any byte of the response, and
the caller may send the request again on a fresh connection (``ReusedConnectionClosed``).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

_LIMIT = 1 << 20  # the longest header block or chunk-size line accepted


class ReusedConnectionClosed(ConnectionError):
    """A keep-alive connection taken from the pool was closed by the server before it
    answered: nothing of the request was processed; send it again on a fresh connection."""


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as this client reads it."""


class Conn:
    """One connection. ``reused``: it came from the pool (it served a request before)."""

    __slots__ = ("reader", "writer", "idle_since", "reused")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reused = False

    def send(self, data: bytes) -> None:
        """Write the request now (the transport sends at once what the socket takes)."""
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof()


class Response:
    """The status and framing of one response on ``conn``; ``chunks()`` reads its body."""

    __slots__ = ("conn", "status", "chunked", "length", "keep_alive", "done")

    def __init__(self, conn: Conn, status: int, chunked: bool, length: int | None,
                 keep_alive: bool) -> None:
        self.conn = conn
        self.status = status
        self.chunked = chunked
        self.length = length
        self.keep_alive = keep_alive
        self.done = False  # the body was read to its end

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they come (chunk by chunk when chunked)."""
        reader = self.conn.reader
        if self.chunked:
            while True:
                line = await reader.readuntil(b"\r\n")
                try:
                    size = int(line.split(b";", 1)[0], 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size line {line[:40]!r}") from None
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    self.done = True
                    return
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif self.length is not None:
            left = self.length
            while left > 0:
                data = await reader.read(min(left, 1 << 16))
                if not data:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(data)
                yield data
            self.done = True
        else:  # no framing: the body ends when the server closes the connection
            self.keep_alive = False
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    self.done = True
                    return
                yield data

    async def read(self) -> bytes:
        return b"".join([c async for c in self.chunks()])

    async def lines(self) -> AsyncIterator[bytes]:
        """The body split after each ``\\n`` (the newline kept); a last line without one
        comes at the end."""
        rest = b""
        async for data in self.chunks():
            if rest:
                data = rest + data
            start = 0
            while True:
                i = data.find(b"\n", start)
                if i < 0:
                    break
                yield data[start:i + 1]
                start = i + 1
            rest = data[start:]
        if rest:
            yield rest


class Pool:
    """Keep-alive connections to the server at ``url`` for POSTs of JSON bodies to ``path``
    with the given extra ``headers``."""

    def __init__(self, url: str, path: str, headers: dict[str, str] | None = None,
                 idle_s: float = 4.0, connect_timeout_s: float = 30.0) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = u.hostname
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = ssl.create_default_context() if u.scheme == "https" else None
        self.idle_s = idle_s
        self.connect_timeout_s = connect_timeout_s
        base = u.path.rstrip("/")
        host = u.netloc.rsplit("@", 1)[-1]
        lines = [f"POST {base}{path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        lines += ["Content-Type: application/json", "Content-Length: "]
        self._head = "\r\n".join(lines).encode("latin-1")
        self._idle: list[Conn] = []
        self.num_opened = 0  # connections opened (tests: reuse)

    def request(self, body: bytes) -> bytes:
        """The whole request: the head encoded once, this body's length, the body."""
        return b"%s%d\r\n\r\n%s" % (self._head, len(body), body)

    def idle(self) -> Conn | None:
        """The most recently used idle connection that is still open and young enough, or
        None; older or closed ones are closed and forgotten."""
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since < self.idle_s and conn.usable():
                return conn
            conn.close()
        return None

    async def connect(self) -> Conn:
        r, w = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.ssl, limit=_LIMIT,
                                    server_hostname=self.host if self.ssl else None),
            self.connect_timeout_s)
        self.num_opened += 1
        return Conn(r, w)

    def release(self, resp: Response) -> None:
        """Back to the pool if its response was read to the end and may be reused; else
        closed."""
        conn = resp.conn
        if resp.done and resp.keep_alive and conn.usable():
            conn.idle_since = time.monotonic()
            conn.reused = True
            self._idle.append(conn)
        else:
            conn.close()

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()


async def read_head(conn: Conn) -> Response:
    """Read the status line and headers of the response to the request sent on ``conn``.
    Raises ``ReusedConnectionClosed`` when a reused connection ends before any byte."""
    try:
        head = await conn.reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if conn.reused and not e.partial:
            raise ReusedConnectionClosed("the server closed the idle connection") from None
        raise
    except ConnectionResetError:
        if conn.reused:
            raise ReusedConnectionClosed("the server reset the idle connection") from None
        raise
    if head[:7] != b"HTTP/1.":
        raise ProtocolError(f"not an HTTP/1.x response: {head[:40]!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise ProtocolError(f"bad status line: {head[:40]!r}") from None
    chunked = False
    length = None
    keep = head[5:8] == b"1.1"
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name = name.strip().lower()
        if name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise ProtocolError(f"bad content-length: {value[:40]!r}") from None
        elif name == b"connection":
            v = value.strip().lower()
            if v == b"close":
                keep = False
            elif v == b"keep-alive":
                keep = True
    if status in (204, 304) or 100 <= status < 200:
        length = 0
    return Response(conn, status, chunked, None if chunked else length, keep)
