"""``qlm-opt serve`` as a subprocess for integration tests: the real CLI, config file and
uvicorn, reached over loopback HTTP. The server's output goes to a log file that a failing
test prints."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from qlm_opt.engines.vllm_remote import free_port

ADMIN_KEY = "sk-serve-admin-0001"
USER_KEY = "sk-serve-user-0002"


def auth_toml() -> str:
    """The ``[auth]`` tables of the test configs: one user key and the admin key."""
    return f'[auth]\nadmin_key = "{ADMIN_KEY}"\n\n[[auth.keys]]\nkey = "{USER_KEY}"\n'


class ServeProcess:
    """``qlm-opt serve --config PATH --port P`` in its own process group."""

    def __init__(self, config: Path, log_path: Path, start_timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = dict(os.environ)
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        exe = Path(sys.executable).parent / "qlm-opt"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "qlm_opt.cli"]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [*cmd, "serve", "--config", str(config), "--port", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + start_timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qlm-opt serve exited with {self.proc.returncode}:\n"
                                   + self.log_tail())
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError("qlm-opt serve did not start:\n" + self.log_tail())
            time.sleep(0.5)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def admin(self, path: str) -> dict:
        r = httpx.get(self.url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                      timeout=10)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts the engines down), SIGKILL the group after 60 s."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


@functools.lru_cache(maxsize=4)
def _hf(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    return AutoTokenizer.from_pretrained(model_dir), model


def greedy_reference(model_dir: str, prompt: str, num_tokens: int) -> str:
    """The model's own greedy continuation of ``prompt`` (``num_tokens`` tokens, EOS
    ignored), computed with ``transformers`` in float32, decoded as vLLM does (special
    tokens skipped)."""
    import torch

    tok, model = _hf(model_dir)
    ids = tok.encode(prompt, add_special_tokens=True)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1]
            out.append(int(torch.argmax(logits)))
    return tok.decode(out, skip_special_tokens=True)
