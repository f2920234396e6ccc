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

Schema 4 also codes the compact format's token ids (exact; schema 3's plain ``topk_ids`` and
``sample_id_gaps`` still read). Every shard ranks the ids of its first rows by frequency (``frequency_order``,
ids seen at least twice; packed into the shard's metadata, ``teacher_farm.id_order``, whose checksum every
row holds in ``id_order``), so that frequent ids become small numbers, and:

- ``topk_id_codes`` (in place of ``topk_ids``): per entry 0 when it is the position's next token
  (``input_ids[i + 1]``, which the row holds anyway), 1 + j when the position's anchor (the first position
  of the row that reads the same token) holds it at rank j, else k + 1 + its rank in the order (an id the
  order lacks: k + 1 + len(order) + id);
- ``sample_in_topk`` (a cache with top-k targets): per position an int64 bit mask of the top-k slots (the
  first ``MASK_SLOTS``) whose ids were drawn; those draws are stored first, in slot order;
- ``sample_rank_gaps`` (in place of ``sample_ids``): the other draws, sorted by their rank in the order,
  stored as differences of those ranks (the first as it is). ``sample_counts`` and ``sample_logprobs``
  follow the stored order; read back, the ids are ascending again and their counts and logprobs with them.

Schema 5 keeps those codes and entropy-codes them with the gaps and the draws in one ``coded`` blob a row
(``schemas.coding``); its draws are named in their own order (``draws_to_stored``: by top-k slot, by the
anchor's draws, the next token, then by rank), and a target among the top-k at its rank's slot reads its
rank and logprob there (``schemas.arrow``).

Everything here is numpy on whole arrays; ``schemas.arrow`` puts it into Arrow columns.
"""

from __future__ import annotations

import zlib
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


# ---------------------------------------------------------------------------------------------
# Token ids as codes (``uint8-gap``, schema 4): what the row already knows, named by a small number


def next_tokens(input_ids: np.ndarray, lengths: np.ndarray) -> npt.NDArray[np.int64]:
    """The token after each position, within its row (``input_ids[p + 1]``); -1 at a row's last position."""
    ids = np.asarray(input_ids, np.int64)
    out = np.full(len(ids), -1, np.int64)
    out[:-1] = ids[1:]
    ends = np.cumsum(np.asarray(lengths, np.int64)) - 1
    out[ends[ends >= 0]] = -1
    return out


def anchors(
    input_ids: np.ndarray, lengths: np.ndarray, kept: np.ndarray | None = None
) -> npt.NDArray[np.int64]:
    """For each position, the first position of its row that reads the same token (and keeps its targets).

    A position is its own anchor when it is the first (kept) one with its token in its row, or when its
    targets were dropped (``kept`` False).
    """
    ids = np.asarray(input_ids, np.int64)
    P = len(ids)
    own = np.arange(P, dtype=np.int64)
    if P == 0:
        return own
    row = np.repeat(np.arange(len(lengths), dtype=np.int64), np.asarray(lengths, np.int64))
    keep = np.ones(P, bool) if kept is None else np.asarray(kept, bool)
    # Sorted by row, then token, then kept first, then position: each group's first entry is its anchor.
    order = np.lexsort((own, ~keep, ids, row))
    key_row, key_id = row[order], ids[order]
    start = np.ones(P, bool)
    start[1:] = (key_row[1:] != key_row[:-1]) | (key_id[1:] != key_id[:-1])
    first = order[np.maximum.accumulate(np.where(start, np.arange(P), 0))]
    out = own.copy()
    out[order] = first
    return np.where(keep & keep[out], out, own)


def references(ids: np.ndarray, anchor: np.ndarray) -> npt.NDArray[np.int64]:
    """(P, k) ids' reference lists: the anchor's ids (``anchors``); -1 (none) at an anchor itself."""
    ids = np.asarray(ids, np.int64)
    anchor = np.asarray(anchor, np.int64)
    return np.where((anchor != np.arange(len(anchor)))[:, None], ids[anchor], -1)


def encode_ids(ids: np.ndarray, owner: np.ndarray, nxt: np.ndarray, ref: np.ndarray) -> npt.NDArray[np.int32]:
    """Flat ids, each at position ``owner[i]``, as codes: 0 for its position's next token (``next_tokens``),
    1 + j for the id its position's reference list ``ref`` (P, R; -1 pads) holds at j, else R + 1 + id (a
    literal). Exact: ``decode_ids`` undoes it."""
    ids = np.asarray(ids, np.int64)
    owner = np.asarray(owner, np.int64)
    ref = np.asarray(ref, np.int64)
    R = ref.shape[1]
    codes = ids + (R + 1)
    if R and ids.size:
        match = ids[:, None] == ref[owner]
        hit = match.any(axis=1)
        codes = np.where(hit, 1 + match.argmax(axis=1), codes)
    codes[ids == np.asarray(nxt, np.int64)[owner]] = 0
    out: npt.NDArray[np.int32] = codes.astype(np.int32)
    return out


def decode_ids(
    codes: np.ndarray, owner: np.ndarray, nxt: np.ndarray, ref: np.ndarray
) -> npt.NDArray[np.int64]:
    """The ids of ``encode_ids``' codes, int64; ``ValueError`` for a code that cannot be (a next token after a
    row's last position, a reference to nothing)."""
    codes = np.asarray(codes, np.int64)
    owner = np.asarray(owner, np.int64)
    ref = np.asarray(ref, np.int64)
    R = ref.shape[1]
    nxt_of = np.asarray(nxt, np.int64)[owner]
    marker, literal = codes == 0, codes > R
    if (marker & (nxt_of < 0)).any():
        raise ValueError("an id coded as the next token at a row's last position")
    if (codes < 0).any():
        raise ValueError("a negative id code")
    ids = np.where(literal, codes - (R + 1), np.where(marker, nxt_of, 0))
    refs = np.flatnonzero(~marker & ~literal)
    if refs.size:
        got = ref[owner[refs], codes[refs] - 1]
        if (got < 0).any():
            raise ValueError("an id coded as a reference to nothing")
        ids[refs] = got
    return ids


#: An id seen fewer times than this in a shard's first rows is left out of its order (``len(order) + id``).
#: On the real teacher's cache of the reference manual (k=16, N=64, the order counted on the first 64k tokens;
#: 2026-12-07) 2, 4 and 8 wrote within 0.1 byte a token of each other, and 2 the smallest for draws and both.
ORDER_MIN_COUNT = 2


def frequency_order(ids: np.ndarray) -> bytes:
    """A shard's ``id_order``, packed: the ids seen at least ``ORDER_MIN_COUNT`` times, most frequent first
    (ties by id). Stored as zlib of varints: the number of count groups, their sizes, then each group's
    ascending ids as differences (the first as it is)."""
    distinct, counts = np.unique(np.asarray(ids, np.int64), return_counts=True)
    keep = counts >= ORDER_MIN_COUNT
    distinct, counts = distinct[keep], counts[keep]
    order = np.lexsort((distinct, -counts))
    distinct, counts = distinct[order], counts[order]
    sizes = np.unique(-counts, return_counts=True)[1]
    deltas = np.diff(distinct, prepend=0)
    deltas[np.cumsum(sizes) - sizes] = distinct[np.cumsum(sizes) - sizes]
    return zlib.compress(_varints(np.concatenate([[len(sizes)], sizes, deltas]).astype(np.uint64)), 9)


def unpack_order(packed: bytes) -> npt.NDArray[np.int64]:
    """The ids of a packed ``frequency_order``, most frequent first."""
    values = _from_varints(zlib.decompress(packed))
    groups = int(values[0]) if values.size else 0
    sizes, deltas = values[1 : 1 + groups], values[1 + groups :]
    if int(sizes.sum()) != deltas.size:
        raise ValueError("a packed id order whose groups do not add up")
    group = np.repeat(np.arange(groups), sizes)
    total = np.cumsum(deltas)
    starts = np.cumsum(sizes) - sizes
    base = (total[starts] - deltas[starts])[group] if deltas.size else total
    order: npt.NDArray[np.int64] = total - base
    return order


def _varints(values: np.ndarray) -> bytes:
    """LEB128 of non-negative integers, whole-array: 7 bits a byte, the high bit set on all but the last."""
    values = np.asarray(values, np.uint64)
    nbytes = np.maximum(
        1, (np.floor(np.log2(np.maximum(values, 1).astype(np.float64))).astype(np.int64) // 7) + 1
    )
    nbytes[values == 0] = 1
    index = np.repeat(np.arange(values.size), nbytes)
    shift = (np.arange(int(nbytes.sum())) - np.repeat(np.cumsum(nbytes) - nbytes, nbytes)) * 7
    out = ((values[index] >> shift.astype(np.uint64)) & np.uint64(127)).astype(np.uint8)
    last = np.cumsum(nbytes) - 1
    more = np.ones(out.size, bool)
    more[last] = False
    out[more] |= 128
    packed: bytes = out.tobytes()
    return packed


def _from_varints(data: bytes) -> npt.NDArray[np.int64]:
    raw = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(raw < 128)
    if raw.size and (not ends.size or ends[-1] != raw.size - 1):
        raise ValueError("a truncated varint")
    value_of = np.repeat(np.arange(ends.size), np.diff(ends, prepend=-1))
    shift = (
        np.arange(raw.size) - np.repeat(ends - np.diff(ends, prepend=-1) + 1, np.diff(ends, prepend=-1))
    ) * 7
    parts = (raw & 127).astype(np.int64) << shift
    out: npt.NDArray[np.int64] = np.bincount(value_of, weights=None, minlength=ends.size).astype(np.int64) * 0
    np.add.at(out, value_of, parts)
    return out


def to_ranks(ids: np.ndarray, order: np.ndarray) -> npt.NDArray[np.int64]:
    """Each id's place in ``order`` (``frequency_order``); an id it lacks: ``len(order) + id``."""
    ids = np.asarray(ids, np.int64)
    order = np.asarray(order, np.int64)
    if not order.size:
        same: npt.NDArray[np.int64] = ids.copy()
        return same
    lookup = np.full(max(int(order.max()), int(ids.max(initial=0))) + 1, -1, np.int64)
    lookup[order] = np.arange(order.size)
    ranks = lookup[np.maximum(ids, 0)]
    return np.where(ranks >= 0, ranks, order.size + ids)


def from_ranks(ranks: np.ndarray, order: np.ndarray) -> npt.NDArray[np.int64]:
    """The ids of ``to_ranks``."""
    ranks = np.asarray(ranks, np.int64)
    order = np.asarray(order, np.int64)
    ids: npt.NDArray[np.int64] = np.where(
        ranks < order.size,
        order[np.clip(ranks, 0, max(order.size - 1, 0))] if order.size else 0,
        ranks - order.size,
    )
    return ids


def encode_topk_ids(
    ids: np.ndarray, nxt: np.ndarray, anchor: np.ndarray, order: np.ndarray | None = None
) -> npt.NDArray[np.int32]:
    """(P, k) top-k ids as (P, k) codes (``encode_ids``), each position's reference list its anchor's top-k;
    a literal's id replaced by its place in ``order`` (``to_ranks``): frequent ids become small numbers."""
    ids = np.asarray(ids, np.int64)
    P, k = ids.shape
    owner = np.repeat(np.arange(P), k)
    codes = encode_ids(ids.reshape(-1), owner, nxt, references(ids, anchor)).reshape(P, k)
    if order is not None:
        literal = codes > k
        codes[literal] = k + 1 + to_ranks(codes[literal] - (k + 1), order)
    return codes


def decode_topk_ids(
    codes: np.ndarray, nxt: np.ndarray, anchor: np.ndarray, order: np.ndarray | None = None
) -> npt.NDArray[np.int64]:
    """The (P, k) top-k ids of ``encode_topk_ids``' codes: the anchors first (they hold no references)."""
    codes = np.array(codes, np.int64)
    if order is not None:
        literal = codes > codes.shape[1]
        codes[literal] = codes.shape[1] + 1 + from_ranks(codes[literal] - (codes.shape[1] + 1), order)
    P, k = codes.shape
    owner = np.repeat(np.arange(P), k)
    anchor = np.asarray(anchor, np.int64)
    is_anchor = anchor == np.arange(P)
    if (~is_anchor & ~is_anchor[anchor]).any():
        raise ValueError("an anchor that has an anchor of its own")
    none = np.full((P, k), -1, np.int64)
    if ((codes > 0) & (codes <= k) & is_anchor[:, None]).any():
        raise ValueError("an id coded as a reference at a position with no anchor")
    # Pass 1 reads the literals and next tokens; the references then point into the anchors' ids.
    first = decode_ids(np.where((codes > 0) & (codes <= k), k + 1, codes).reshape(-1), owner, nxt, none)
    return decode_ids(codes.reshape(-1), owner, nxt, references(first.reshape(P, k), anchor)).reshape(P, k)


def rank_sorted(ids: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sampled ids (ascending within each position) by their place in ``order`` (``to_ranks``): the ranks
    sorted ascending within each position, and where each came from (stored value j is ``ids[perm[j]]``)."""
    owner = np.repeat(np.arange(len(lengths)), np.asarray(lengths, np.int64))
    ranks = to_ranks(ids, order)
    perm = np.lexsort((ranks, owner))
    return ranks[perm], perm


def id_sorted(ranks: np.ndarray, lengths: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``rank_sorted``'s ranks, ascending within each position again, and where each came from
    (id j is the stored value ``perm[j]``: counts and logprobs stored beside the ranks read back as
    ``values[perm]``)."""
    owner = np.repeat(np.arange(len(lengths)), np.asarray(lengths, np.int64))
    ids = from_ranks(ranks, order)
    perm = np.lexsort((ids, owner))
    return ids[perm], perm


#: The top-k slots a draw can be named by in ``sample_in_topk`` (bits of an int64).
MASK_SLOTS = 63


def split_by_topk(
    ids: np.ndarray, lengths: np.ndarray, topk: np.ndarray
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Draws (``lengths[p]`` at position p) that are among the position's top-k (its first ``MASK_SLOTS``):
    per position the bit mask of their slots, which draws they are, and each draw's slot (-1: none)."""
    ids = np.asarray(ids, np.int64)
    lengths = np.asarray(lengths, np.int64)
    slots = np.asarray(topk, np.int64)[:, :MASK_SLOTS]
    owner = np.repeat(np.arange(len(lengths)), lengths)
    match = ids[:, None] == slots[owner]
    inside = match.any(axis=1)
    slot = np.where(inside, match.argmax(axis=1), -1)
    mask = np.zeros(len(lengths), np.int64)
    np.bitwise_or.at(mask, owner[inside], np.left_shift(np.int64(1), slot[inside]))
    return mask, inside, slot


def from_mask(mask: np.ndarray, topk: np.ndarray) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The draws a ``split_by_topk`` mask names: per position how many, and the ids (slot order)."""
    slots = np.asarray(topk, np.int64)[:, :MASK_SLOTS]
    bits = (np.asarray(mask, np.int64)[:, None] >> np.arange(slots.shape[1])) & 1 == 1
    if (np.asarray(mask, np.int64) >> slots.shape[1]).any():
        raise ValueError("a draw named by a top-k slot the position does not have")
    return bits.sum(axis=1), slots[bits]


def place_in_position(lengths: np.ndarray) -> npt.NDArray[np.int64]:
    """Each value's index within its position (``lengths[p]`` values a position)."""
    lengths = np.asarray(lengths, np.int64)
    out: npt.NDArray[np.int64] = np.arange(int(lengths.sum())) - np.repeat(
        np.cumsum(lengths) - lengths, lengths
    )
    return out


def last_in_position(lengths: np.ndarray) -> npt.NDArray[np.bool_]:
    """Over values, ``lengths[p]`` a position: whether each is its position's last."""
    lengths = np.asarray(lengths, np.int64)
    out = np.zeros(int(lengths.sum()), bool)
    out[(np.cumsum(lengths) - 1)[lengths > 0]] = True
    return out


#: Schema 5's groups of a position's draws, in their stored order (``draws_to_stored``).
BY_SLOT, BY_ANCHOR, BY_NEXT, BY_RANK = 0, 1, 2, 3


@dataclass(frozen=True)
class StoredDraws:
    """A cache's draws as schema 5 names them (``draws_to_stored``): per position, those named by a top-k
    slot, then those among its anchor's draws (``from_anchor``: a flag per draw of the anchor, its draws by
    rank; ``anchor_slots`` of them a position, 0 at an anchor), then its next token (``next_drawn``), then the
    others by rank (``others``, ascending within each position)."""

    anchor_slots: npt.NDArray[np.int64]
    from_anchor: npt.NDArray[np.bool_]
    next_drawn: npt.NDArray[np.bool_]
    others: npt.NDArray[np.int64]


def _anchor_lists(
    owner: np.ndarray, ranks: np.ndarray, anchor: np.ndarray
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The draws of the positions that are their own anchor, by rank: (position * big + rank) sorted, where
    each position's list starts, and ``big``."""
    P = len(anchor)
    is_anchor = anchor == np.arange(P)
    own = is_anchor[owner]
    big = int(ranks.max(initial=0)) + 1
    keys = np.sort(owner[own].astype(np.int64) * big + ranks[own])
    sizes = np.bincount(owner[own], minlength=P)
    return keys, np.cumsum(sizes) - sizes, np.int64(big)


def draws_to_stored(
    owner: np.ndarray, named: np.ndarray, ranks: np.ndarray, anchor: np.ndarray, next_rank: np.ndarray
) -> tuple[StoredDraws, npt.NDArray[np.int64]]:
    """Draws in schema 4's order (each position's named by a top-k slot first, then the others by rank) in
    schema 5's (``StoredDraws``), and where each value comes from (``values[perm]`` is the new order).

    ``owner``: each draw's position; ``named``: its top-k slot (-1: none); ``ranks``: its rank in the
    shard's id order; ``anchor``: each position's (``anchors``); ``next_rank``: the rank of each position's
    next token (-1: none).
    """
    owner, named, ranks = (np.asarray(a, np.int64) for a in (owner, named, ranks))
    anchor, next_rank = np.asarray(anchor, np.int64), np.asarray(next_rank, np.int64)
    P = len(anchor)
    distinct = np.bincount(owner, minlength=P)
    keys, starts, big = _anchor_lists(owner, ranks, anchor)
    of = anchor[owner]
    wanted = of * big + ranks
    at = np.searchsorted(keys, wanted)
    found = (of != owner) & (named < 0) & (at < len(keys))
    if len(keys):
        found &= keys[np.minimum(at, len(keys) - 1)] == wanted
    place = at - starts[of]
    group = np.where(named >= 0, BY_SLOT, np.where(found, BY_ANCHOR, BY_RANK))
    is_next = (group == BY_RANK) & (ranks == next_rank[owner])
    group[is_next] = BY_NEXT
    key = np.select([group == BY_SLOT, group == BY_ANCHOR], [named, place], ranks)
    span = max(int(big), MASK_SLOTS, int(distinct.max(initial=0))) + 1  # above every key
    perm = np.argsort((owner * 4 + group) * span + key)
    slots = np.where(anchor != np.arange(P), distinct[anchor], 0)
    bits = np.zeros(int(slots.sum()), bool)
    bits[(np.cumsum(slots) - slots)[owner[found]] + place[found]] = True
    flags = np.zeros(P, bool)
    flags[owner[is_next]] = True
    others = ranks[perm][group[perm] == BY_RANK]
    return StoredDraws(slots, bits, flags, others), perm


def draws_from_stored(
    stored: StoredDraws,
    distinct: np.ndarray,
    named_owner: np.ndarray,
    named_ranks: np.ndarray,
    anchor: np.ndarray,
    next_rank: np.ndarray,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The inverse of ``draws_to_stored``, given the draws per position (``distinct``) and those named by a
    top-k slot (their positions and ranks, in slot order): per position the draws not named by a slot, by
    rank (how many, and their ranks), and where each value of schema 4's order comes from (``values[perm]``).
    ``ValueError`` for draws that cannot be."""
    anchor, next_rank = np.asarray(anchor, np.int64), np.asarray(next_rank, np.int64)
    named_owner, named_ranks = np.asarray(named_owner, np.int64), np.asarray(named_ranks, np.int64)
    P = len(anchor)
    is_anchor = anchor == np.arange(P)
    flags = np.asarray(stored.next_drawn, bool)
    if (next_rank[flags] < 0).any():
        raise ValueError("a draw named as the next token at a row's last position")
    slots, bits = np.asarray(stored.anchor_slots, np.int64), np.asarray(stored.from_anchor, bool)
    if (slots[is_anchor] != 0).any() or (slots[~is_anchor] != np.asarray(distinct)[anchor[~is_anchor]]).any():
        raise ValueError("flags for the draws of an anchor that has other draws")
    slot_owner = np.repeat(np.arange(P), slots)
    anchor_owner = slot_owner[bits]
    named = np.bincount(named_owner, minlength=P)
    other_counts = np.asarray(distinct, np.int64) - named - np.bincount(anchor_owner, minlength=P) - flags
    others = np.asarray(stored.others, np.int64)
    if (other_counts < 0).any() or other_counts.sum() != others.size:
        raise ValueError("draws that do not add up to the position's")
    other_owner = np.repeat(np.arange(P), other_counts)
    flag_owner = np.flatnonzero(flags)
    # The anchors' draws (they name none by an anchor) by rank: the lists the others' flags point into.
    own_owner = np.concatenate([named_owner, flag_owner, other_owner])
    own_ranks = np.concatenate([named_ranks, next_rank[flag_owner], others])
    keys, starts, big = _anchor_lists(own_owner, own_ranks, anchor)
    anchor_ranks = (keys % big)[(starts[anchor[slot_owner]] + place_in_position(slots))[bits]]
    # Schema 5's order of the values: by slot, by anchor, the next token, the others; schema 4's: the slots'
    # (as they are), then the rest by rank.
    parts = [named_owner, anchor_owner, flag_owner, other_owner]
    owner5 = np.concatenate(parts)
    group5 = np.concatenate(
        [np.full(len(x), g) for g, x in zip((BY_SLOT, BY_ANCHOR, BY_NEXT, BY_RANK), parts)]
    )
    ranks5 = np.concatenate([named_ranks, anchor_ranks, next_rank[flag_owner], others])
    order5 = np.argsort(owner5 * 4 + group5, kind="stable")  # each group in the order listed
    owner5, group5, ranks5 = owner5[order5], group5[order5], ranks5[order5]
    span = max(int(ranks5.max(initial=0)), MASK_SLOTS) + 1
    if (np.diff(np.sort(owner5 * span + ranks5)) == 0).any():
        raise ValueError("a draw named twice at one position")
    key4 = np.where(group5 == BY_SLOT, place_in_position(np.bincount(owner5, minlength=P)), ranks5)
    perm = np.argsort((owner5 * 2 + (group5 != BY_SLOT)) * span + key4)
    rest = group5[perm] != BY_SLOT
    return np.bincount(owner5[perm][rest], minlength=P), ranks5[perm][rest], perm
