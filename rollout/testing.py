"""Helpers for tests and benchmarks: a tiny random model with a real tokenizer, and a server subprocess.

    path = make_tiny_model_dir(tmp_dir)                 # random Llama, vocab 49152, SmolLM2's tokenizer
    with ServerProcess(["--model-path", path]) as server:
        requests.post(server.url + "/generate", json={...})
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import requests

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt")


def make_tiny_model_dir(path: str | os.PathLike, *, hidden_size: int = 32, num_layers: int = 2,
                        context_length: int = 4096, init_std: float = 0.15, seed: int = 0) -> str:
    """A seeded random Llama with SmolLM2's vocabulary (49152) and tokenizer files, saved to `path`.

    Weights are N(0, init_std) (norms 1 + N(0, init_std)) so logits are far from flat and greedy
    decoding does not hinge on rounding."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from runtime.default_model import default_model_path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=49152, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=context_length, rms_norm_eps=1e-6, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen) * init_std
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(str(path), safe_serialization=True)
    source = Path(default_model_path())
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m rollout.launch_server ...` in a subprocess, on a free port, with its log in a file."""

    def __init__(self, server_args: list[str], port: int | None = None, log_path: str | None = None,
                 env: dict[str, str] | None = None, api_key: str | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "rollout.launch_server", "--port", str(self.port), *server_args]
        self.api_key = api_key
        if api_key:
            self.args += ["--api-key", api_key]
        self._own_log = log_path is None  # a temporary log is removed after a clean exit
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="rollout-server-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.env = env
        self.proc: subprocess.Popen | None = None
        self._log: IO[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 300.0) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        env = dict(os.environ if self.env is None else self.env)
        self.proc = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"The server exited with {self.proc.returncode} while starting:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"The server was not ready within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def post(self, path: str, timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        return requests.post(self.url + path, headers=self.headers, timeout=timeout, **kwargs)

    def get(self, path: str, timeout: float = 120.0, **kwargs: Any) -> requests.Response:
        return requests.get(self.url + path, headers=self.headers, timeout=timeout, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int | None:
        """Signal the server and wait; returns its exit code (SIGKILL after `timeout`)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
            if self._own_log and self.proc.returncode == 0:
                Path(self.log_path).unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
