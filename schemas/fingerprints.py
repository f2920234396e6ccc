"""Short stable ids of a teacher's weights and of its tokenizer: what a cache is checked against.

The server computes both when it loads a model; the student's side recomputes the tokenizer's to
check that a student tokenizes as the teacher did. Neither needs vLLM or torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path
from typing import Any


def _sha256_file_sample(path: Path, h: hashlib._Hash, chunk: int = 1 << 20) -> None:
    """Hash a weights file's size, head and tail: cheap, and catches a different checkpoint."""
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))


def model_fingerprint(model: str, hf_config_json: str) -> str:
    """A short stable id of the teacher's weights and config."""
    h = hashlib.sha256(hf_config_json.encode())
    root = Path(model)
    if root.is_dir():
        for p in sorted(itertools.chain(root.glob("*.safetensors"), root.glob("*.bin"))):
            _sha256_file_sample(p, h)
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short stable id of what the tokenizer maps text to."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        payload = backend.to_str()
        if backend.truncation is not None or backend.padding is not None:
            # A call with truncation or padding leaves them set on the tokenizer; they change no token id.
            from tokenizers import Tokenizer

            plain = Tokenizer.from_str(payload)
            plain.no_truncation()
            plain.no_padding()
            payload = plain.to_str()
    else:
        payload = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = json.dumps([getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)])
    return hashlib.sha256((payload + special).encode()).hexdigest()[:16]
