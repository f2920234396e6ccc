"""Checks made before an engine starts, so that a user's first mistakes end in one line, not a traceback.

No vLLM import here: these run in a second, before the minute an engine takes to start.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from teacher_farm.schemas.errors import InputError

#: Files of which one marks a directory as a model checkpoint vLLM can load.
MODEL_FILES = ("config.json", "params.json")


def _looks_like_a_path(model: str) -> bool:
    # A hub name is "name" or "org/name"; anything else is meant as a local path.
    return model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model


def check_model(model: str) -> None:
    """Refuse a ``--model`` that is a missing local path or not a model directory."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not any((path / name).is_file() for name in MODEL_FILES):
            raise InputError(
                f"--model {model}: this directory is not a model (no {' or '.join(MODEL_FILES)}); "
                "give a checkpoint directory as saved by save_pretrained, or a model hub name"
            )
        return
    if path.exists():
        raise InputError(f"--model {model}: this is a file, not a model; give the checkpoint's directory")
    if _looks_like_a_path(model):
        raise InputError(f"--model {model}: no such directory")


def exposure_warning(host: str, has_key: bool) -> str | None:
    """The one line ``serve`` prints when anyone on the network can use the teacher, else None."""
    if has_key:
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        if host == "localhost":
            return None
    return (
        f"serving on {host} without an API key: anyone on the network can use this teacher; "
        "set one with --api-key KEY or TEACHER_FARM_API_KEY"
    )
