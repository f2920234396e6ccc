"""How a cache stores logprobs: the formats ``teacher-farm cache --logprob-dtype`` names, with their errors.

The server sends float32 or float16 logprobs (the wire does not change with the format); the client
turns them into the cache's format when it writes a shard, and every reader turns them back into
float32. Per top-k position, most likely first:

============  ==========================================  ===============================================
format        top-k logprobs stored as                    worst error of a read-back value (nat)
============  ==========================================  ===============================================
``float32``   ``topk_logprobs``, float32                  none beyond the teacher's float32
``float16``   ``topk_logprobs``, float16                  half a float16 step: 2^-11 relative
                                                          (0.002 at -4, 0.004 at -10)
``uint8-gap`` ``topk_top1`` (float16, the top-1 logprob)  top-1: as float16; every other entry: 1/32 (half
              and ``topk_gaps`` (k - 1 uint8 per          a step) while it lies within 15.9 nat of the
              position: steps of 1/16 nat from each       top-1; further below it reads as top-1 - 15.875
              entry down to the next)                     (its probability overstated, to at most 1.3e-7
                                                          times the top-1's); -inf stays -inf
============  ==========================================  ===============================================

``uint8-gap`` is the compact format: it also keeps ``target_logprobs`` and ``sample_logprobs`` in
float16, stores the sampled ids of a position (ascending) as their differences, ``sample_id_gaps``
(the first id, then each id minus the one before; exact), and asks the server for float32, so that
the top-k are rounded once. Each entry's distance below the float16 top-1 is rounded to a whole
number of 1/16-nat steps (clipped at 254; 255 marks -inf, a token the teacher rules out), and the
gaps are the differences of those distances, so their sums are exact. Reading it back::

    steps = cumsum(topk_gaps, axis=1)                                # steps below the top-1
    topk_logprobs[:, 0] = topk_top1
    topk_logprobs[:, 1:] = topk_top1[:, None] - steps / 16           # -inf where steps reach 255
    sample_ids = cumsum(sample_id_gaps) within each position

Everything here is numpy on whole arrays; ``schemas.arrow`` puts it into Arrow columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

#: Nats per gap step of ``uint8-gap``.
GAP_STEP = 1 / 16
#: The furthest below the top-1 a finite entry is stored, in steps: 15.875 nat (one further below reads as
#: this).
GAP_CLIP = 254
#: Steps below the top-1 that mark -inf (the gaps of an entry sum to this).
GAP_NEG_INF = 255


@dataclass(frozen=True)
class LogprobFormat:
    """One stored format of the logprobs (``--logprob-dtype``)."""

    name: str
    #: Stored dtype of ``target_logprobs``, ``sample_logprobs`` and (float formats) ``topk_logprobs``.
    value_dtype: str
    #: What the client asks the server for.
    wire_dtype: str
    #: Top-k logprobs as ``topk_top1`` + ``topk_gaps`` instead of ``topk_logprobs``.
    gaps: bool = False

    def round_trip(self, topk: np.ndarray) -> np.ndarray:
        """(P, k) top-k logprobs as a cache of this format reads them back, float32."""
        topk = np.asarray(topk, np.float32)
        if self.gaps:
            return decode_gaps(*encode_gaps(topk))
        return topk.astype(self.value_dtype).astype(np.float32)

    def ulp(self, topk: np.ndarray) -> np.ndarray:
        """One unit in the last place of each stored top-k value (read back as ``topk``), float32.

        Two values that lie within ``atol`` of each other read back within ``atol`` plus one unit.
        """
        topk = np.asarray(topk, np.float32)
        if not self.gaps:
            return value_ulp(topk, self.value_dtype)
        out = np.full(topk.shape, GAP_STEP, np.float32)
        if topk.size:
            top1_ulp = value_ulp(topk[:, :1], "float16")
            out[:, :1] = top1_ulp
            out[:, 1:] += top1_ulp  # the gaps hang from the rounded top-1
        return out

    def value_ulp(self, values: np.ndarray) -> np.ndarray:
        """One unit in the last place of ``target_logprobs`` (and ``sample_logprobs``) values, float32."""
        return value_ulp(values, self.value_dtype)


FORMATS = {
    "float32": LogprobFormat("float32", "float32", "float32"),
    "float16": LogprobFormat("float16", "float16", "float16"),
    "uint8-gap": LogprobFormat("uint8-gap", "float16", "float32", gaps=True),
}
#: The format a cache stores when none is named (``--logprob-dtype``, ``CacheOptions.logprob_dtype``).
DEFAULT_FORMAT = "float16"


def logprob_format(name: str) -> LogprobFormat:
    """The format ``name`` (a ``--logprob-dtype`` choice); ``ValueError`` names the choices."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"logprob format must be one of {', '.join(FORMATS)}, not {name!r}") from None


def value_ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """One unit in the last place of ``values`` in ``dtype``, as float32 (infinite values: 0)."""
    values = np.asarray(values)
    with np.errstate(invalid="ignore"):
        ulp = np.spacing(np.abs(values.astype(dtype))).astype(np.float32)
    return np.where(np.isfinite(ulp), ulp, np.float32(0))


def encode_gaps(topk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(P, k) logprobs, most likely first, as ``uint8-gap``: the top-1 (P,) float16 and the gaps (P, k-1)
    uint8.

    Each entry's distance below the float16 top-1 is rounded to the nearest whole step of ``GAP_STEP``
    (half a step is the error) and clipped at ``GAP_CLIP``; a -inf (or NaN) entry is ``GAP_NEG_INF``
    steps below. An entry above the top-1 (a tie the float16 rounding put above it) is 0 steps
    below, and one above the entry before it (a list not sorted most likely first) is read at that
    entry's value. The gaps are the differences of those distances.
    """
    topk = np.asarray(topk, np.float32)
    if topk.ndim != 2 or topk.shape[1] < 1:
        raise ValueError(f"top-k logprobs must be (positions, k >= 1), not {topk.shape}")
    top1 = topk[:, 0].astype(np.float16)
    with np.errstate(invalid="ignore", over="ignore"):
        below = (top1.astype(np.float64)[:, None] - topk[:, 1:]) / GAP_STEP
        steps = np.rint(np.clip(below, 0, GAP_CLIP))
    steps = np.where(np.isfinite(topk[:, 1:]) & np.isfinite(below), steps, GAP_NEG_INF).astype(np.int16)
    steps = np.maximum.accumulate(steps, axis=1)
    return top1, np.diff(steps, axis=1, prepend=0).astype(np.uint8)


def decode_gaps(top1: np.ndarray, gaps: np.ndarray) -> np.ndarray:
    """The (P, k) float32 logprobs of a ``uint8-gap`` top-1 (P,) and gaps (P, k-1)."""
    top1 = np.asarray(top1).astype(np.float32)
    steps = np.cumsum(np.asarray(gaps), axis=1, dtype=np.int32)
    out = np.empty((len(top1), steps.shape[1] + 1), np.float32)
    out[:, 0] = top1
    out[:, 1:] = top1[:, None] - steps.astype(np.float32) * np.float32(GAP_STEP)
    out[:, 1:][steps >= GAP_NEG_INF] = -np.inf
    return out


def id_gaps(ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat ids, ``lengths[i]`` of them at position i, as their differences within each position (the first as
    it is)."""
    ids = np.asarray(ids, np.int64)
    gaps = np.diff(ids, prepend=0)
    starts = _starts(lengths)
    gaps[starts] = ids[starts]
    return gaps


def ids_from_gaps(gaps: np.ndarray, lengths: np.ndarray) -> npt.NDArray[np.int64]:
    """The flat ids back from ``id_gaps``, int64."""
    total = np.cumsum(np.asarray(gaps, np.int64))
    starts = _starts(lengths)
    before = total[starts] - np.asarray(gaps, np.int64)[starts]
    ids: npt.NDArray[np.int64] = total - np.repeat(
        before, np.asarray(lengths, np.int64)[np.asarray(lengths) > 0]
    )
    return ids


def _starts(lengths: np.ndarray) -> npt.NDArray[np.int64]:
    """Index of each non-empty position's first value in the flat array."""
    n = np.asarray(lengths, np.int64)
    first = np.cumsum(n) - n
    return first[n > 0]


def count_dtype(samples: int) -> str:
    """The smallest integer type that holds a count of ``samples`` draws: uint8 up to 255, else int16."""
    return "uint8" if samples <= np.iinfo(np.uint8).max else "int16"
