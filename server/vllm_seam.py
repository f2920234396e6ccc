"""The one place where teacher-farm reaches into vLLM's internals.

vLLM's public API (``PoolingParams``, ``SamplingParams``, ``AsyncEngineArgs``, ``AsyncLLM``,
``TokensPrompt``) is used where it is needed. What the pooled backend needs beyond it (the pooler
base class, the structures the worker hands a pooler, the compiled rank kernel, the model registry)
moves between vLLM releases, so all of it is named here: a new release is checked in this file, and
on the installed release by the start-up self-test (``server/selftest.py``).

The internals are imported on first use (``__getattr__`` below), so that reading the release and
checking the supported range work even on a vLLM whose internals have moved.
"""

from __future__ import annotations

import importlib
import re
from typing import Any, Final

#: Oldest vLLM release supported, and the first one beyond the range (0.24 up to 0.33 verified).
OLDEST = (0, 24)
BEYOND = (0, 34)
#: The oldest and newest supported releases, whose GPU wheels the test suite checks without a GPU
#: (tests/test_gpu_releases.py).
VERIFIED = ("0.24.0", "0.33.0")

#: vLLM's runner for pooling models, the token-wise pooling task our requests name (one output row
#: per prompt position) and the pooling type that keeps every token.
RUNNER = "pooling"
TASK: Final = "token_classify"
TOKEN_POOLING = "ALL"

#: Where each internal lives in the supported releases.
_INTERNALS = {
    "Pooler": "vllm.model_executor.layers.pooler",
    "PoolingParamsUpdate": "vllm.model_executor.layers.pooler",
    "VllmModelForPooling": "vllm.model_executor.models.interfaces_base",
    "batched_count_greater_than": "vllm.v1.sample.ops.logprobs",
    "PoolingMetadata": "vllm.v1.pool.metadata",
    "PoolingStates": "vllm.v1.pool.metadata",
    # Model Runner V2, the default on a GPU from 0.33 on, pooling models included: only the release
    # tests drive it (tests/gpu_releases.py), since its request state needs CUDA.
    "PoolingRunner": "vllm.v1.worker.gpu.pool.pooling_runner",
    "InputBatch": "vllm.v1.worker.gpu.input_batch",
    "InputBuffers": "vllm.v1.worker.gpu.input_batch",
    "ModelConfig": "vllm.config",
    "PoolerConfig": "vllm.config",
}


def __getattr__(name: str) -> Any:
    if name not in _INTERNALS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _internal(name)


def _internal(name: str) -> Any:
    """One of ``_INTERNALS``, imported once; an ImportError naming the release where it moved."""
    module = _INTERNALS[name]
    try:
        value = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ImportError(
            f"vLLM {version_string()} has no {name} in {module} (teacher-farm supports {supported_range()})"
        ) from exc
    globals()[name] = value
    return value


def version_string() -> str:
    """The installed vLLM's version, as it states it."""
    import vllm

    return str(vllm.__version__)


def release(version: str | None = None) -> tuple[int, ...]:
    """(major, minor, patch) of ``version`` (default: the installed vLLM); ``0.32.0+cpu`` -> (0, 32, 0)."""
    text = version_string() if version is None else version
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        return ()
    return tuple(int(part) for part in match.groups() if part is not None)


def supported_range() -> str:
    """``vLLM 0.24 up to 0.33``."""
    last = (BEYOND[0], BEYOND[1] - 1) if BEYOND[1] else (BEYOND[0] - 1,)
    return f"vLLM {'.'.join(map(str, OLDEST))} up to {'.'.join(map(str, last))}"


def check_release(version: str | None = None) -> str | None:
    """One warning line when ``version`` (default: the installed vLLM) is outside the supported range."""
    text = version_string() if version is None else version
    got = release(text)
    if got and OLDEST <= got[:2] < BEYOND:
        return None
    return (
        f"vLLM {text} is outside the range teacher-farm supports ({supported_range()}); "
        "the pooled backend's start-up self-test decides whether it is used"
    )


def on_cpu() -> bool:
    """Whether vLLM runs on its CPU platform."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def generation_dtype(model: str, trust_remote_code: bool = False, revision: str | None = None) -> str:
    """What ``--dtype auto`` gives ``model`` on vLLM's generate runner, as a dtype's name.

    For a float32 checkpoint vLLM prefers float16 on its pooling runner and bfloat16 (the platform's
    first choice) to generate; the pooled backend asks for the latter, so both backends score alike.
    """
    from transformers import AutoConfig
    from vllm.config.model import _get_and_verify_dtype

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, revision=revision)
    dtype = _get_and_verify_dtype(model, config, "auto", is_pooling_model=False, revision=revision)
    return str(dtype).removeprefix("torch.")


def tensor_parallel_rank() -> int:
    """This worker's rank in its tensor-parallel group (0 without tensor parallelism)."""
    from vllm.distributed import get_tensor_model_parallel_rank

    return int(get_tensor_model_parallel_rank())


def supported_archs() -> set[str]:
    """Every architecture vLLM's model registry knows, ours included once registered."""
    from vllm import ModelRegistry

    return set(ModelRegistry.get_supported_archs())


def register_model(arch: str, target: str) -> None:
    """Register ``arch`` as the class at ``target`` (``"module:Class"``), imported when first used."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(arch, target)


def load_model_class(arch: str) -> type:
    """The model class vLLM has registered for ``arch``."""
    from vllm import ModelRegistry

    return ModelRegistry.models[arch].load_model_cls()


def keep_rows(state: Any, rows: Any) -> None:
    """Keep a request's packed rows of this chunk until its prompt ends.

    vLLM gives every pooling request a state whose list ``hidden_states_cache`` is meant for hidden
    states; our pooler keeps its reduced rows there instead (a few int32 columns per position).
    """
    state.hidden_states_cache.append(rows)


def take_rows(state: Any) -> Any:
    """The request's packed rows of every chunk, in order, and its state cleared."""
    import torch

    parts = state.hidden_states_cache
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    state.clean()
    return rows


def pooling_metadata(
    prompt_token_ids: list[list[int]],
    params: list[Any],
    states: list[Any],
    scheduled: list[int],
    computed: list[int],
    pad_id: int,
) -> Any:
    """A step's ``PoolingMetadata`` with its cursor, built as vLLM's model runner builds it on a CPU.

    One entry per scheduled request: its whole prompt, its ``PoolingParams``, its ``PoolingStates``
    (kept across steps), the tokens scheduled in this step and those computed before it. Prompts are
    padded with ``pad_id`` (the runner pads with the vocabulary size: an id no token has).
    """
    import numpy as np
    import torch

    width = max(len(ids) for ids in prompt_token_ids)
    token_ids = torch.full((len(prompt_token_ids), width), pad_id, dtype=torch.int64)
    for row, ids in zip(token_ids, prompt_token_ids):
        row[: len(ids)] = torch.tensor(ids, dtype=torch.int64)
    prompt_lens = torch.tensor([len(ids) for ids in prompt_token_ids], dtype=torch.int32)
    metadata = _internal("PoolingMetadata")(
        prompt_lens=prompt_lens,
        prompt_token_ids=None,
        prompt_token_ids_cpu=token_ids,
        pooling_params=params,
        pooling_states=states,
    )
    seq_lens = torch.tensor([c + s for c, s in zip(computed, scheduled)], dtype=torch.int32)
    # The runner passes its query start offsets; without them vLLM allocates pinned memory, which on a
    # GPU node would start CUDA in this process before the engine does.
    starts = torch.zeros(len(scheduled) + 1, dtype=torch.int64)
    torch.cumsum(torch.tensor(scheduled, dtype=torch.int64), 0, out=starts[1:])
    metadata.build_pooling_cursor(
        np.array(scheduled, dtype=np.int32),
        seq_lens,
        device=torch.device("cpu"),
        query_start_loc_gpu=starts,
    )
    return metadata
