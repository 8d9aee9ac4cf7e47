"""The data-path HTTP/1.1 client of ``vllm_remote`` (``qlm_opt.engines.http1``) against a real
asyncio server on a local socket: framing (chunked, Content-Length), keep-alive reuse, the
pool's rules for what goes back, and an idle connection the server closed."""

from __future__ import annotations

import asyncio

import pytest

from qlm_opt.engines import http1


class Server:
    """Answers each request on a connection with ``respond(body) -> bytes`` (raw response
    bytes; None: close the connection instead); records what it received."""

    def __init__(self, respond) -> None:
        self.respond = respond
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.srv = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.srv.sockets[0].getsockname()[1]}"

    async def _conn(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(w)
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                n = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await r.readexactly(n)
                self.requests.append((head, body))
                out = self.respond(body)
                if out is None:
                    break
                w.write(out)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def stop(self) -> None:
        self.srv.close()
        for w in self.writers:
            w.close()


def chunked(*parts: bytes, extra: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n" + extra +
            b"transfer-encoding: chunked\r\n\r\n" + body)


def plain(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s"
            % (status, len(body), extra, body))


async def _post(pool: http1.Pool, body: bytes) -> tuple[http1.Response, list[bytes]]:
    conn = pool.idle() or await pool.connect()
    conn.send(pool.request(body))
    resp = await http1.read_head(conn)
    lines = [line async for line in resp.lines()]
    pool.release(resp)
    return resp, lines


def test_request_bytes_and_sse_lines_across_chunk_boundaries():
    # an SSE event split over chunks, and two events in one chunk
    srv = Server(lambda b: chunked(b'data: {"a":', b'1}\n\ndata: {"b":2}\n\n', b"data: [DONE]\n\n"))

    async def main():
        url = await srv.start()
        pool = http1.Pool(url + "/", "/v1/completions", {"Authorization": "Bearer k"})
        resp, lines = await _post(pool, b'{"x":1}')
        await srv.stop()
        return url, resp, lines

    url, resp, lines = asyncio.run(main())
    assert resp.status == 200 and resp.done
    assert lines == [b'data: {"a":1}\n', b"\n", b'data: {"b":2}\n', b"\n",
                     b"data: [DONE]\n", b"\n"]
    head, body = srv.requests[0]
    host = url.split("//")[1]
    assert head == (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
                    "Bearer k\r\nContent-Type: application/json\r\nContent-Length: 7"
                    "\r\n\r\n").encode()
    assert body == b'{"x":1}'


def test_keep_alive_reuses_one_connection():
    srv = Server(lambda b: chunked(b"data: " + b + b"\n\n"))

    async def main():
        pool = http1.Pool(await srv.start(), "/p")
        got = [(await _post(pool, b"%d" % i))[1] for i in range(3)]
        await srv.stop()
        return pool, got

    pool, got = asyncio.run(main())
    assert got == [[b"data: %d\n" % i, b"\n"] for i in range(3)]
    assert srv.connections == 1 and pool.num_opened == 1


def test_what_goes_back_to_the_pool():
    answers = iter([
        plain(400, b'{"error":"bad"}'),  # read to its end: reusable
        plain(200, b"{}", b"connection: close\r\n"),  # the server closes it: not reused
        chunked(b"data: 1\n\n", b"data: 2\n\n"),  # abandoned half-read: closed
        chunked(b"data: 3\n\n"),
    ])
    srv = Server(lambda b: next(answers))

    async def main():
        pool = http1.Pool(await srv.start(), "/p")
        conn = await pool.connect()
        conn.send(pool.request(b"a"))
        resp = await http1.read_head(conn)
        assert resp.status == 400 and await resp.read() == b'{"error":"bad"}'
        pool.release(resp)
        assert pool.idle() is conn  # taken again for the next one
        conn.send(pool.request(b"b"))
        resp = await http1.read_head(conn)
        assert await resp.read() == b"{}" and not resp.keep_alive
        pool.release(resp)
        assert pool.idle() is None and pool.num_opened == 1
        conn = await pool.connect()
        conn.send(pool.request(b"c"))
        resp = await http1.read_head(conn)
        async for line in resp.lines():
            break  # the caller stops reading (an abort)
        pool.release(resp)
        assert pool.idle() is None and conn.writer.is_closing()
        _, lines = await _post(pool, b"d")
        await srv.stop()
        return pool, lines

    pool, lines = asyncio.run(main())
    assert lines == [b"data: 3\n", b"\n"]
    assert pool.num_opened == 3 and srv.connections == 3


def test_an_idle_connection_the_server_closed():
    """The server closes a kept-alive connection (its keep-alive timeout) while the request
    is on its way: ``ReusedConnectionClosed``, the request was not processed; a fresh
    connection then serves it. A fresh connection closed the same way is a plain error."""
    calls = []

    def respond(body):
        calls.append(body)
        return None if body == b"close-me" else chunked(b"data: ok\n\n")

    srv = Server(respond)

    async def main():
        pool = http1.Pool(await srv.start(), "/p")
        await _post(pool, b"first")
        conn = pool.idle()
        assert conn is not None and conn.reused
        conn.send(pool.request(b"close-me"))
        with pytest.raises(http1.ReusedConnectionClosed):
            await http1.read_head(conn)
        conn.close()
        fresh = await pool.connect()
        fresh.send(pool.request(b"close-me"))
        with pytest.raises(asyncio.IncompleteReadError):
            await http1.read_head(fresh)
        fresh.close()
        await srv.stop()

    asyncio.run(main())
    assert calls == [b"first", b"close-me", b"close-me"]


def test_stale_idle_connections_are_not_handed_out():
    srv = Server(lambda b: chunked(b"data: x\n\n"))

    async def main():
        pool = http1.Pool(await srv.start(), "/p", idle_s=0.05)
        await _post(pool, b"1")
        await asyncio.sleep(0.1)
        assert pool.idle() is None  # older than idle_s: closed, not reused
        await _post(pool, b"2")
        # the server closed its side: seen as EOF before the next request is written
        conn = pool.idle()
        srv.writers[-1].close()
        await asyncio.sleep(0.05)
        if conn is not None:
            pool._idle.append(conn)
        got = pool.idle()
        await srv.stop()
        return pool, got

    pool, got = asyncio.run(main())
    assert got is None and pool.num_opened == 2


def test_bad_input():
    with pytest.raises(ValueError, match="not an http"):
        http1.Pool("ftp://x", "/p")
    with pytest.raises(ValueError, match="not an http"):
        http1.Pool("127.0.0.1:8000", "/p")
    srv = Server(lambda b: b"SPDY/3 200 OK\r\n\r\n")

    async def main():
        pool = http1.Pool(await srv.start(), "/p")
        conn = await pool.connect()
        conn.send(pool.request(b"x"))
        try:
            with pytest.raises(http1.ProtocolError, match="not an HTTP/1.x response"):
                await http1.read_head(conn)
        finally:
            conn.close()
            await srv.stop()

    asyncio.run(main())
