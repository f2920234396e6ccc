"""The packed rows the worker's reduction hands back, read with numpy (no torch needed).

One int32 row per position of a sequence, laid out as ``schemas.scoring.PackedLayout`` says (float
columns hold float32 bits, so nothing is rounded). ``server/reduce.py`` writes them inside the vLLM
worker; the server turns them into a ``ScoredSequence`` here, with whole-array operations only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from teacher_farm.schemas.scoring import PackedLayout


@dataclass(frozen=True)
class Unpacked:
    """One request's packed rows as numpy arrays (n positions)."""

    topk_ids: np.ndarray  # (n, k) int32
    topk_logprobs: np.ndarray  # (n, k) float32
    target_logprobs: np.ndarray  # (n - 1,) float32
    target_ranks: np.ndarray  # (n - 1,) int32
    sample_ids: np.ndarray | None = None  # (n, N) int32, ascending per row
    sample_logprobs: np.ndarray | None = None  # (n, N) float32
    entropy: np.ndarray | None = None  # (n,) float32, nats


def unpack(packed: np.ndarray, layout: PackedLayout) -> Unpacked:
    """Split packed int32 rows back into arrays (views, no copy per position)."""
    n = packed.shape[0]
    if packed.shape[1] != layout.width:
        raise ValueError(f"packed rows have {packed.shape[1]} columns; {layout} makes {layout.width}")
    floats = packed.view(np.float32)
    sampled = {}
    if layout.samples:
        sampled = {
            "sample_ids": packed[:, layout.sample_ids],
            "sample_logprobs": floats[:, layout.sample_logprobs],
        }
    if layout.entropy:
        sampled["entropy"] = floats[:, layout.entropy_column]
    return Unpacked(
        topk_ids=packed[:, layout.topk_ids],
        topk_logprobs=floats[:, layout.topk_logprobs],
        target_logprobs=floats[: n - 1, layout.target_logprob],
        target_ranks=packed[: n - 1, layout.target_rank],
        **sampled,
    )


def compact_samples(
    ids: np.ndarray, logprobs: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Distinct drawn tokens per row, vectorized: (per-row distinct counts, ids, counts, logprobs).

    ``ids`` (rows × N) must be ascending within each row (as ``reduce_rows`` returns them); the flat
    outputs hold every row's distinct tokens in order, ``counts`` summing to N per row.
    """
    rows, n = ids.shape
    if rows == 0:
        empty = np.empty(0, np.int32)
        return empty, empty, empty.astype(np.int16), empty.astype(np.float32)
    first = np.ones_like(ids, dtype=bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    flat_first = first.reshape(-1)
    starts = np.flatnonzero(flat_first)
    counts = np.diff(np.append(starts, rows * n)).astype(np.int16)
    per_row = first.sum(axis=1, dtype=np.int32)
    return per_row, ids.reshape(-1)[starts], counts, logprobs.reshape(-1)[starts]


def top_entropy(entropy: np.ndarray, share: float) -> np.ndarray:
    """(n,) bool: the ``ceil(share * n)`` positions of highest entropy (earlier first among equals)."""
    n = len(entropy)
    keep = min(n, int(np.ceil(share * n - 1e-9)))
    selected = np.zeros(n, dtype=bool)
    selected[np.argsort(-entropy, kind="stable")[:keep]] = True
    return selected
