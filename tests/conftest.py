"""Shared fixtures: one tiny teacher model, one real server and an fp32 transformers reference.

Starting vLLM takes a minute on a CPU, so the engine-backed fixtures live for the whole session.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.jsonl"
API_KEY = "test-secret-key"
MAX_MODEL_LEN = 1024
#: Tokens the engine schedules per step: prompts longer than this are scored in chunks.
MAX_BATCHED_TOKENS = 256
SERVER_START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher_farm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "teacher_farm.client.cli", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=kwargs.pop("timeout", 900), **kwargs,
    )


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random Llama (head_dim 64) with a BPE tokenizer trained on the sample corpus."""
    from teacher_farm.server.tinymodel import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny", [SAMPLE], vocab_size=2048, hidden_size=128, num_layers=2, num_heads=2)


class Server:
    """A real ``teacher-farm serve`` child process on loopback."""

    def __init__(self, model: Path, log_path: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [
            sys.executable, "-m", "teacher_farm.client.cli", "serve", "--model", str(model), "--dtype", "float32",
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", str(MAX_MODEL_LEN),
            "--enforce-eager", "--gpu-memory-utilization", "0.2", *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)

    def wait_ready(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def tail(self, n: int = 4000) -> str:
        return self.log_path.read_bytes()[-n:].decode(errors="replace")


def running(srv: Server):
    """Start ``srv``, yield it once healthy, stop it afterwards (for session fixtures)."""
    srv.start()
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def server(tiny_model, tmp_path_factory) -> Server:
    """The shared server: API key required, small body limit so 413 is testable."""
    yield from running(Server(
        tiny_model, tmp_path_factory.mktemp("logs") / "server.log", "--api-key", API_KEY,
        "--max-num-batched-tokens", str(MAX_BATCHED_TOKENS),
        env={"TEACHER_FARM_MAX_BODY_BYTES": str(2 << 20), "TEACHER_FARM_MAX_INPUTS_PER_REQUEST": "256"},
    ))


@pytest.fixture(scope="session")
def logprobs_server(tiny_model, tmp_path_factory) -> Server:
    """A server on vLLM's prompt-logprobs backend (the fallback): it must make the same caches."""
    yield from running(Server(
        tiny_model, tmp_path_factory.mktemp("logs") / "logprobs-server.log", "--api-key", API_KEY,
        "--scoring", "prompt-logprobs", "--k-max", "64",
    ))


@pytest.fixture(params=["pooled", "prompt-logprobs"])
def any_server(request) -> Server:
    """Each scoring backend in turn."""
    return request.getfixturevalue("server" if request.param == "pooled" else "logprobs_server")


@pytest.fixture(scope="session")
def http(server) -> httpx.Client:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300) as c:
        yield c


class Reference:
    """Top-k from transformers in fp32 on the same weights: the seed script's computation."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def tokenize(self, text: str, max_length: int | None = None) -> list[int]:
        return self.tokenizer(text, add_special_tokens=True, truncation=max_length is not None, max_length=max_length)["input_ids"]

    def topk(self, input_ids: list[int], k: int, temperature: float = 1.0):
        """(topk_ids, topk_logprobs, full logprobs) as numpy, positions × k, at ``temperature``."""
        torch = self.torch
        with torch.no_grad():
            logits = self.model(torch.tensor([input_ids])).logits[0].float()
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        values, ids = torch.topk(logprobs, k, dim=-1)
        return ids.numpy(), values.numpy(), logprobs.numpy()


@pytest.fixture(scope="session")
def reference(tiny_model) -> Reference:
    return Reference(tiny_model)


def read_lines(path: Path, n: int | None = None) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return lines if n is None else lines[:n]
