"""Same tokenizer: a student distils on the teacher's token ids only if it tokenizes exactly as the teacher.

The cache stores the teacher's token ids: ``input_ids`` as the teacher tokenized each line, and the
top-k as ids of the teacher's vocabulary. Distilling on them is only meaningful when the student uses
the very same tokenizer (same vocabulary, same ids), so the student must consume the cached
``input_ids`` as they are. :func:`assert_same_tokenizer` compares the tokenizer fingerprint the
teacher wrote into every manifest and shard with the student's tokenizer; :func:`check_alignment`
compares one row's ids with the student's own tokenization of the same text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from teacher_farm.schemas.cache_dir import CacheDir
from teacher_farm.schemas.errors import CacheMismatch, InputError
from teacher_farm.schemas.fingerprints import tokenizer_fingerprint


def assert_same_tokenizer(cache_dir: str | Path, tokenizer: Any) -> str:
    """Raise ``CacheMismatch`` unless ``tokenizer`` is the one the teacher used; returns its fingerprint.

    The fingerprint is ``schemas.fingerprints.tokenizer_fingerprint``, compared with the one in
    every shard's metadata and in the manifests' identity.
    """
    cache = CacheDir(cache_dir)
    found: dict[str, str] = {}
    for _, manifest in cache.manifests.items():
        found.setdefault(manifest.identity.cache.tokenizer_fingerprint, "manifest")
    for path in cache.shard_paths():
        found.setdefault(cache.shard_identity(path).cache.tokenizer_fingerprint, path.name)
    if not found:
        raise InputError(f"{cache_dir} records no tokenizer fingerprint")
    mine = tokenizer_fingerprint(tokenizer)
    others = sorted(set(found) - {mine})
    if others:
        raise CacheMismatch(
            f"the student's tokenizer (fingerprint {mine}) is not the teacher's "
            f"(fingerprint {others[0]} in {found[others[0]]} of {cache_dir}): "
            "distillation on top-k token ids "
            "needs the very same tokenizer and vocabulary"
        )
    return mine


def _as_numpy(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor, on any device
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).reshape(-1)


def check_alignment(student_input_ids: Any, row_input_ids: Any, *, allow_truncation: bool = False) -> None:
    """Raise ``InputError`` unless the student's tokenization of a line equals the cached one.

    ``student_input_ids`` come from the student's tokenizer on the line's text, ``row_input_ids``
    from the cache row. With ``allow_truncation`` the cached ids may be a prefix of the student's
    (the teacher truncates lines to ``--max-length``). Lists, numpy arrays and tensors are accepted.
    """
    student, teacher = _as_numpy(student_input_ids), _as_numpy(row_input_ids)
    n = min(len(student), len(teacher))
    diff = np.flatnonzero(student[:n] != teacher[:n])
    if diff.size:
        i = int(diff[0])
        raise InputError(
            f"token {i} differs: the student has {int(student[i])}, the teacher {int(teacher[i])}; "
            "the student must use the teacher's tokenizer (and the same special tokens)"
        )
    if len(student) != len(teacher) and not (allow_truncation and len(teacher) < len(student)):
        raise InputError(f"the student has {len(student)} tokens, the teacher {len(teacher)}")
