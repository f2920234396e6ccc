"""vLLM's GPU releases, checked on a machine without a GPU: their Python sources, and the V2 runner's path.

``release_sources`` downloads a release's wheel from the package registry once and keeps only its
``vllm/`` Python sources, in ``$TEACHER_FARM_WHEEL_CACHE/<version>`` (default
``~/.cache/teacher-farm/vllm-wheels/<version>``). Put first on ``PYTHONPATH`` of the CPU build's
environment, they are the release as far as the pooled backend uses it: the compiled kernels are absent,
and nothing here needs them.

``python -m tests.gpu_releases VERSION`` (run so) checks the pooled backend on that release: the
scoring model registers, and the self-test's cases pass bit for bit through the V1 runner's pooling
metadata and, where the release has one, through Model Runner V2's ``PoolingRunner``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

DEFAULT_CACHE = Path.home() / ".cache" / "teacher-farm" / "vllm-wheels"

#: What pip prints when it cannot reach the registry (as opposed to a release or wheel that is wrong).
UNREACHABLE = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Max retries exceeded",
    "No route to host",
    "Connection refused",
)


class RegistryUnreachable(RuntimeError):
    """The package registry could not be reached: the release cannot be checked here."""


def cache_dir() -> Path:
    return Path(os.environ.get("TEACHER_FARM_WHEEL_CACHE") or DEFAULT_CACHE)


def release_sources(version: str) -> Path:
    """The directory holding ``vllm/`` (Python sources only) of vLLM ``version``'s GPU wheel."""
    target = cache_dir() / version
    if (target / "vllm" / "__init__.py").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a run that stops half-way leaves no cache entry.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{version}-") as tmp:
        wheel = _download(version, Path(tmp) / "wheel")
        sources = Path(tmp) / "sources"
        with zipfile.ZipFile(wheel) as zf:
            names = [n for n in zf.namelist() if n.startswith("vllm/") and n.endswith(".py")]
            if "vllm/__init__.py" not in names or any(".." in Path(n).parts for n in names):
                raise RuntimeError(f"{wheel.name} holds no vllm package to check")
            zf.extractall(sources, members=names)
        try:
            os.rename(sources, target)
        except OSError:
            # Another run got there first; its copy is as good as this one.
            if not (target / "vllm" / "__init__.py").is_file():
                raise
    return target


def _download(version: str, into: Path) -> Path:
    """The wheel PyPI serves a Linux x86-64 GPU node (Python 3.12), without its dependencies."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        f"vllm=={version}",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--platform",
        "manylinux_2_28_x86_64",
        "--dest",
        str(into),
        # Offline, fail in a minute rather than after pip's default retries.
        "--retries",
        "2",
        "--timeout",
        "20",
        "--quiet",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        lines = [line.strip() for line in output.splitlines() if line.strip()]
        reason = next((line for line in lines if any(mark in line for mark in UNREACHABLE)), None)
        if reason is not None:
            raise RegistryUnreachable(f"pip download vllm=={version}: {reason}")
        raise RuntimeError(
            f"pip download vllm=={version} failed ({proc.returncode}): {' | '.join(lines[-3:])}"
        )
    [wheel] = into.glob("vllm-*.whl")
    return wheel


def check_release(version: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tests.gpu_releases VERSION`` on that release's sources, in a process of its own."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(release_sources(version))}
    return subprocess.run(
        [sys.executable, "-m", "tests.gpu_releases", version],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


class _PoolingModel(torch.nn.Module):
    """What vLLM's V2 runner asks of a pooling model (``is_pooling_model``): the interface, and a pooler."""

    is_pooling_model = True

    def __init__(self, *, vllm_config: Any = None, pooler: Any = None) -> None:
        super().__init__()
        self.pooler = pooler

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


#: Padding rows the V2 runner's hidden states carry past a step's tokens (CUDA-graph padding).
PADDING = 3


def v2_steps(pooler: Any, params: list[Any], prompts: list[list[int]]) -> Any:
    """Steps as Model Runner V2 runs them (``vllm/v1/worker/gpu/pool/pooling_runner.py``).

    The release's own ``PoolingRunner`` takes each request as it first appears (``add_request``: the
    pooler's updates, its ``PoolingStates``, its prompt ids), and each step calls ``pool`` with a real
    ``InputBatch`` (scheduled tokens, query start offsets, sequence lengths, requests in runner slots
    handed out as the runner does) and hidden states padded past the step's tokens. ``pool`` builds the
    metadata and cursor, calls the pooler and post-processes its output, all of it as on a GPU. One part
    stands in: the runner's ``RequestState`` keeps its arrays in CUDA unified memory, and ``pool`` reads
    only the prompt lengths (``prompt_len.np``) of it, so a namespace holding that array takes its place.
    """
    from teacher_farm.server import vllm_seam

    slots = len(params) + 2
    model_config = SimpleNamespace(
        pooler_config=vllm_seam.PoolerConfig(), architectures=["LlamaForTeacherScoring"]
    )
    # The task the engine's model config selects for this model, by vLLM's own rule.
    model_config.get_pooling_task = lambda tasks: vllm_seam.ModelConfig.get_pooling_task(model_config, tasks)
    vllm_config = SimpleNamespace(
        model_config=model_config, scheduler_config=SimpleNamespace(max_num_seqs=slots)
    )
    runner = vllm_seam.PoolingRunner(_PoolingModel(pooler=pooler), vllm_config)
    req_states = SimpleNamespace(prompt_len=SimpleNamespace(np=np.zeros(slots, dtype=np.int32)))
    free = list(range(slots))
    slot_of: dict[int, int] = {}

    def step(scheduled: list[tuple[int, int]], computed: list[int], chunk: torch.Tensor) -> list[Any]:
        for i, _ in scheduled:
            if i not in slot_of:
                slot_of[i] = free.pop()  # as RequestState.add_request hands out slots
                req_states.prompt_len.np[slot_of[i]] = len(prompts[i])
                runner.add_request(f"req-{i}", slot_of[i], params[i], prompts[i])
        sizes = np.array([n for _, n in scheduled], dtype=np.int32)
        tokens = int(sizes.sum())
        batch = vllm_seam.InputBatch.make_dummy(
            len(scheduled),
            tokens,
            vllm_seam.InputBuffers(slots, tokens + PADDING, torch.device("cpu")),
        )
        starts = np.zeros(len(scheduled) + 1, dtype=np.int32)
        np.cumsum(sizes, out=starts[1:])
        batch.req_ids = [f"req-{i}" for i, _ in scheduled]
        batch.idx_mapping_np = np.array([slot_of[i] for i, _ in scheduled], dtype=np.intp)
        batch.idx_mapping = torch.from_numpy(batch.idx_mapping_np.astype(np.int64))
        batch.num_scheduled_tokens = sizes
        batch.query_start_loc_np = starts
        batch.query_start_loc = torch.from_numpy(starts)
        batch.seq_lens_cpu_upper_bound = torch.tensor(
            [c + n for c, (_, n) in zip(computed, scheduled)], dtype=torch.int32
        )
        batch.num_computed_tokens_np = np.array(computed, dtype=np.int32)
        batch.num_tokens_after_padding = tokens + PADDING
        padded = torch.cat([chunk, torch.full((PADDING, chunk.shape[1]), 1e4)])
        output, finished = runner.pool(padded, batch, req_states)
        for (i, _), done in zip(scheduled, finished):
            if done:
                runner.remove_request(slot_of[i])
                free.append(slot_of.pop(i))
        return output

    return step


def has_v2_pooling_runner() -> bool:
    """Whether the release's Model Runner V2 calls a model's pooler (0.24's only normalizes hidden states)."""
    from teacher_farm.server import vllm_seam

    return hasattr(vllm_seam.PoolingRunner, "add_request")


def main(version: str) -> None:
    """Check the pooled backend on the vLLM release first on ``sys.path``; print what was checked."""
    import vllm

    from teacher_farm.server import scoring_model, selftest, vllm_seam

    assert vllm_seam.version_string() == version, f"vLLM {vllm_seam.version_string()} from {vllm.__file__}"
    scoring_model.register()
    arch = scoring_model.scoring_arch("LlamaForCausalLM")
    assert arch in vllm_seam.supported_archs(), f"{arch} is not registered"
    assert vllm_seam.load_model_class(arch).__name__ == arch
    selftest.check_pooler()
    print(f"vLLM {version} from {Path(vllm.__file__).parent}: {arch} registered; V1 runner path passed")
    if has_v2_pooling_runner():
        selftest.check_pooler(v2_steps)
        print(f"vLLM {version}: V2 PoolingRunner path passed")
    else:
        print(f"vLLM {version}: no V2 PoolingRunner that calls a pooler")


if __name__ == "__main__":
    main(sys.argv[1])
