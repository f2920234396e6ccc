"""Both scoring backends load a checkpoint in one dtype under ``--dtype auto`` (no engine started)."""

from __future__ import annotations

import json

import pytest

from teacher_farm.server.engine import Backend, engine_defaults


def model_config_dtype(args: dict) -> str:
    """The dtype vLLM's own model config resolves for these engine arguments, as the engine would."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    return str(AsyncEngineArgs(**args).create_model_config().dtype)


def test_a_float32_checkpoint_under_auto_gets_the_same_dtype_from_both_backends(tiny_model):
    from teacher_farm.server.scoring_model import register

    register()
    assert json.loads((tiny_model / "config.json").read_text())["dtype"] == "float32"
    pooled = engine_defaults({"model": str(tiny_model)}, 16, Backend("pooled", "LlamaForTeacherScoring"))
    logprobs = engine_defaults({"model": str(tiny_model)}, 16, Backend("prompt-logprobs"))
    assert model_config_dtype(pooled) == model_config_dtype(logprobs) == f"torch.{pooled['dtype']}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_dtype_the_user_names_wins(tiny_model, dtype):
    args = engine_defaults(
        {"model": str(tiny_model), "dtype": dtype}, 16, Backend("pooled", "LlamaForTeacherScoring")
    )
    assert args["dtype"] == dtype
