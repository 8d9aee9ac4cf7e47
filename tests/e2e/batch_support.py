"""Shared pieces of the Batch API tests: servers over a SQLite file or a real PostgreSQL
server, input files, and reading results back with the ``openai`` client.

``batch_store`` is parametrized: every test that uses it runs once against SQLite and once
against PostgreSQL (started by the suite itself, ``pg_server.py``; skipped with the reason when
the machine has no PostgreSQL binaries).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.e2e.conftest import ADMIN_KEY, BATCH_KEY, MODEL, USER_KEY, LiveServer, settings_for
from tests.e2e.pg_server import PostgresServer

FINAL = ("completed", "failed", "expired", "cancelled")


@pytest.fixture(scope="session")
def postgres():
    pg = PostgresServer()
    why = pg.unavailable()
    if why is not None:
        pytest.skip(why)
    try:
        pg.start()
    except RuntimeError as e:
        pg.stop()
        pytest.skip(f"PostgreSQL could not be started here: {e}")
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def batch_store(request, tmp_path) -> dict:
    """The ``batch`` settings of one store: a SQLite file, or a new PostgreSQL database."""
    # Many lines in flight from the start: tests do not wait for the pace to pick up.
    cfg = {"files_dir": str(tmp_path / "files"),
           "completion_windows": ["24h", "1h", "3s"],
           "min_lines_in_flight": 64, "max_lines_in_flight": 64,
           "prefills_per_instance": 64}
    if request.param == "sqlite":
        cfg["sqlite_path"] = str(tmp_path / "batch.sqlite3")
    else:
        pg = request.getfixturevalue("postgres")
        cfg["store_url"] = pg.new_database()
    return cfg


def batch_settings(batch: dict, speedup: float = 50.0, **over):
    return settings_for(speedup, batch=batch, **over)


def client(srv, key: str = USER_KEY) -> OpenAI:
    return OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=30)


def chat_line(i: int, model: str = MODEL, max_tokens: int = 8, url: str = "/v1/chat/completions",
              custom_id: str | None = None) -> str:
    return json.dumps({
        "custom_id": custom_id or f"req-{i}",
        "method": "POST",
        "url": url,
        "body": {"model": model, "messages": [{"role": "user", "content": f"question {i}"}],
                 "max_tokens": max_tokens},
    })


def jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def upload(c: OpenAI, lines: list[str], name: str = "input.jsonl"):
    return c.files.create(file=(name, jsonl(lines)), purpose="batch")


def wait_batch(c: OpenAI, batch_id: str, until=lambda b: b.status in FINAL,
               timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        b = c.batches.retrieve(batch_id)
        if until(b):
            return b
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} stuck: {b.status} {b.request_counts}")
        time.sleep(0.05)


def read_results(c: OpenAI, b) -> tuple[list[dict], list[dict]]:
    """(output lines, error lines) of a finished batch."""
    out = c.files.content(b.output_file_id).text.splitlines() if b.output_file_id else []
    err = c.files.content(b.error_file_id).text.splitlines() if b.error_file_id else []
    return [json.loads(x) for x in out], [json.loads(x) for x in err]


def assert_each_once(expected_ids: list[str | None], out: list[dict], err: list[dict]) -> None:
    """Every custom_id of the input appears exactly once across the two files."""
    seen = [x["custom_id"] for x in out] + [x["custom_id"] for x in err]
    assert sorted(seen, key=str) == sorted(expected_ids, key=str)


# -- a server in a subprocess (for SIGKILL) ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, batch: dict, speedup: float, max_lines_in_flight: int) -> None:
    """A server.toml for ``qlm-opt serve``: the simulated fleet, two tenants, the store."""
    lines = [
        'default_class = "interactive"',
        "[server]", 'log_level = "warning"',
        "[backend]", 'kind = "sim"', 'policy = "priority"',
        "[backend.sim]", f"speedup = {speedup}", 'output_lengths = "max_tokens"',
        "[classes.interactive]", "ttft_s = 2.0", "priority = 0",
        "[classes.batch]", "ttft_s = 600.0", "priority = 1", "max_queue = 4096",
        "[auth]", f'admin_key = "{ADMIN_KEY}"',
        "[[auth.keys]]", f'key = "{USER_KEY}"', 'tenant = "alice"',
        "[[auth.keys]]", f'key = "{BATCH_KEY}"', 'tenant = "bob"',
        "[batch]",
    ]
    batch = {**batch, "max_lines_in_flight": max_lines_in_flight,
             "min_lines_in_flight": max_lines_in_flight,
             "prefills_per_instance": max_lines_in_flight}
    for k, v in batch.items():
        lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")


class ServerProcess:
    """``qlm-opt serve --config`` as a child process on a free port."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("QLM_API_KEYS", None)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from qlm_opt.cli import main; main()", "serve",
             "--config", str(self.config), "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(self.config.parent),
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("server exited: " + self.log_path.read_text()[-3000:])
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not start: " + self.log_path.read_text()[-3000:])

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


__all__ = ["ADMIN_KEY", "BATCH_KEY", "MODEL", "USER_KEY", "LiveServer", "ServerProcess",
           "assert_each_once", "batch_settings", "batch_store", "chat_line", "client", "jsonl",
           "postgres", "read_results", "upload", "wait_batch", "write_config"]
