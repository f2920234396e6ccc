"""The draw contract of sampled targets, and the numpy side of it (no torch).

Draw j at position p of a sequence is ``searchsorted(cdf, u * cdf[-1], right=True)``, where ``cdf``
is the cumulative sum of ``softmax(logits / T)`` in vocabulary order and ``u`` a hash of (seed,
p, j) (``uniforms``); the seed is the request's seed mixed with the sequence's own tokens
(``draw_seed``). So the same seed and input give the same draws, whatever shares the engine step
or how the prompt is chunked — **except where u lies within float32 rounding of a CDF boundary**:
logits computed in a batch of another shape can differ in their last bits, and such a draw then
lands on the neighbouring token. On the test model about 2 in 100,000 draws move that way. Two
scorings of the same input are therefore compared with ``moved_draws``: a draw may move to an
adjacent token id, and only a few may; anything else is a defect.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_MASK32 = 0xFFFFFFFF

#: Moved draws tolerated per comparison: this share of all draws, and never fewer than ``MIN_MOVED``.
MOVED_SHARE = 1e-3
MIN_MOVED = 2


def draw_seed(seed: int, input_ids: Sequence[int]) -> int:
    """The seed of one sequence's draws: the request's seed and the sequence's own tokens.

    Same seed and input, same draws; two different sequences in one request draw independently.
    """
    return (seed * 0x9E3779B1 ^ zlib.crc32(np.asarray(input_ids, dtype=np.int32).tobytes())) & _MASK32


def _fmix32(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    h = h ^ (h >> np.uint64(16))
    h = (h * np.uint64(0x85EBCA6B)) & np.uint64(_MASK32)
    h = h ^ (h >> np.uint64(13))
    h = (h * np.uint64(0xC2B2AE35)) & np.uint64(_MASK32)
    out: npt.NDArray[np.uint64] = h ^ (h >> np.uint64(16))
    return out


def uniforms(seeds: np.ndarray, positions: np.ndarray, samples: int) -> npt.NDArray[np.float32]:
    """(rows, samples) float32 in (0, 1): bit for bit what the worker draws (``server/reduce.py``)."""
    m = np.uint64(_MASK32)
    seeds = np.asarray(seeds, dtype=np.int64).astype(np.uint64) & m
    positions = np.asarray(positions, dtype=np.int64).astype(np.uint64) & m
    draw = np.arange(samples, dtype=np.uint64)
    h = _fmix32(seeds ^ np.uint64(0x9E3779B9))
    h = _fmix32(h[:, None] ^ positions[:, None])
    h = _fmix32(h ^ ((draw[None, :] * np.uint64(0x27D4EB2F)) & m))
    u = ((h >> np.uint64(8)).astype(np.float32) + np.float32(0.5)) * np.float32(1.0 / (1 << 24))
    out: npt.NDArray[np.float32] = u.astype(np.float32)
    return out


def expand(
    sample_lengths: np.ndarray, sample_ids: np.ndarray, sample_counts: np.ndarray, samples: int
) -> np.ndarray:
    """A sequence's compacted draws (distinct ids with counts) as (positions, samples) sorted ids."""
    drawn = np.repeat(np.asarray(sample_ids, dtype=np.int64), np.asarray(sample_counts, dtype=np.int64))
    if len(drawn) != len(sample_lengths) * samples:
        raise ValueError(f"{len(drawn)} draws for {len(sample_lengths)} positions of {samples} draws each")
    return drawn.reshape(len(sample_lengths), samples)


@dataclass(frozen=True)
class DrawComparison:
    """How two scorings' draws of the same inputs differ."""

    draws: int
    moved: int
    #: Moved draws that did not land on an adjacent token id: never allowed.
    jumped: int

    @property
    def allowed(self) -> int:
        return max(MIN_MOVED, int(MOVED_SHARE * self.draws))

    @property
    def holds(self) -> bool:
        """Within the contract: only neighbours, and no more than a boundary's share of the draws."""
        return self.jumped == 0 and self.moved <= self.allowed

    def __str__(self) -> str:
        return f"{self.moved} of {self.draws} draws moved ({self.jumped} beyond a neighbouring token)"


def moved_draws(a: np.ndarray, b: np.ndarray) -> DrawComparison:
    """Compare two (positions, samples) arrays of sorted draws (``expand``) of the same input."""
    if a.shape != b.shape:
        raise ValueError(f"draws of shape {a.shape} and {b.shape} are not of the same input")
    diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return DrawComparison(draws=int(a.size), moved=int((diff != 0).sum()), jumped=int((diff > 1).sum()))
