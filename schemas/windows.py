"""Long lines as overlapping windows (``--long-lines window``), and joining them back for training.

A line of n tokens longer than L (the max length) becomes windows over its token sequence starting
at 0, S, 2S, ... (S the stride, 1 <= S < L), each of at most L tokens, until one reaches token n-1.
Every token after the first L is then read with at least L - S tokens of context. Each window is
scored on its own tokens alone and stored as one row with ``offset`` = its start.

To train on one stream per line, each position is taken from the earliest window that holds it
(where it has the most context): window 0 gives positions [0, L), window i > 0 the positions after
the end of window i-1, i.e. its last S tokens (fewer for the last window). The target logprob of
position p (of token p+1) comes from the earliest window holding both p and p+1: the same window,
except at the last position of a window that is not the line's last, whose next token lies in the
next window only.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def window_starts(n: int, max_length: int, stride: int) -> np.ndarray:
    """Starts of the windows covering ``n`` tokens: ``[0]`` when the line fits."""
    if not 1 <= stride < max_length:
        raise ValueError(f"stride {stride} must be in 1..{max_length - 1}")
    if n <= max_length:
        return np.zeros(1, np.int64)
    count = 1 + -(-(n - max_length) // stride)
    return np.arange(count, dtype=np.int64) * stride


def default_stride(max_length: int) -> int:
    """Half the max length: every scored token keeps at least L/2 tokens of context."""
    return max(1, max_length // 2)


def ranges(lo: np.ndarray, hi: np.ndarray) -> npt.NDArray[np.int64]:
    """``concatenate([arange(l, h) for l, h in zip(lo, hi)])`` without a Python loop."""
    lengths = np.maximum(hi - lo, 0)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.zeros(len(lengths), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    out: npt.NDArray[np.int64] = np.arange(total, dtype=np.int64) - np.repeat(starts - lo, lengths)
    return out


def owned_positions(offset: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row (window), the first position it contributes to its line's stream and to its targets.

    Rows of one line are consecutive, in order of ``offset``, the first at offset 0. Returns the
    window-local start of the positions it owns (its own end is its length) and of the targets it
    owns (its own end is length - 1).
    """
    prev_end = np.zeros(len(offset), np.int64)
    prev_end[1:] = offset[:-1] + length[:-1]
    first = offset == 0
    pos_lo = np.where(first, 0, prev_end - offset)
    target_lo = np.where(first, 0, prev_end - 1 - offset)
    if ((~first) & ((pos_lo < 0) | (pos_lo > length) | (target_lo < 0))).any():
        raise ValueError(
            "windows of a line are not consecutive overlapping rows (was the cache written in window mode?)"
        )
    return pos_lo, target_lo
