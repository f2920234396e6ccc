"""Entropy coding of a compact cache's integer values (schema 5): one ``coded`` blob per row.

Schema 4's ``uint8-gap`` columns ``topk_id_codes``, ``topk_gaps``, ``sample_in_topk``,
``sample_rank_gaps`` and ``sample_counts`` hold small numbers of very unequal frequency, which Parquet
stores at a fixed bit width per page (and, for lists of lists, with two levels per value). Schema 5
codes them per row with an asymmetric numeral system (``constriction``'s ANS coder) under static
models counted on each shard's first rows and kept in its metadata (``CODING_KEY``):

- each top-k id code (``schemas.formats.encode_topk_ids``) by its class (``to_classes``: the value's
  bit length and its two bits after the leading one), one model per rank, the lower bits uniform;
- each top-k gap, one model per rank;
- with both kinds of targets, per top-k slot (the first ``MASK_SLOTS``) whether it was drawn, one model
  per slot;
- per draw of the position's anchor (``schemas.formats.anchors``; its draws by rank) whether it is drawn
  here too, one model per place in that list (the sixteenth and later share one);
- per position whether its next token (``input_ids[i + 1]``) is among the other draws, one model (that
  draw is then named by the flag alone);
- the other draws' rank gaps by class, one model per place in the position's list (the eighth and
  later share one) and bucket of draws at the position (``RANK_BUCKETS``), their lower bits uniform;
- the draws' counts but each position's last (the draws less the others), one model per kind of draw
  (named by a slot, the next token, another) and bucket of draws (``COUNT_BUCKETS``).

A row's shape stays in its Parquet columns (``input_ids``, ``topk_top1``, ``sample_lengths``): the
blob holds values only, of the positions that keep their targets. Everything is numpy on whole
arrays but the coder's calls, a few dozen per row.
"""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, field

import constriction
import numpy as np
import numpy.typing as npt

from teacher_farm.schemas.formats import (
    MASK_SLOTS,
    _from_varints,
    _varints,
    last_in_position,
    place_in_position,
)

#: A compact shard's entropy models (``Models.pack``), in its Parquet metadata beside the id order.
CODING_KEY = b"teacher_farm.coding"
#: Bits of a value's class beyond its bit length (``to_classes``).
CLASS_BITS = 2
#: Values coded by class stay below this (``constriction``'s uniform model holds fewer than 2^24).
VALUE_LIMIT = 1 << 24
#: Classes of values below ``VALUE_LIMIT``.
CLASSES = (24 - CLASS_BITS) * (1 << CLASS_BITS) + (1 << CLASS_BITS)
#: Places in a position's list of rank gaps with a model of their own (the later ones share the last).
RANK_PLACES = 8
#: Lower edges of the buckets of distinct draws at a position that, with the place, pick a rank gap's model.
RANK_BUCKETS = np.array([0, 4, 10, 20])
#: Edges of the buckets of distinct draws at a position that, with a draw's kind, pick its count's model.
COUNT_BUCKETS = np.array([1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128])
#: A draw's kind, for its count's model: named by a top-k slot, the next token, any other.
NAMED, ANCHOR, NEXT, OTHER = 0, 1, 2, 3
#: Places in the anchor's list of draws with a model of their own for "drawn here too".
ANCHOR_PLACES = 16
#: The format of ``Models.pack`` (its first varint).
PACK_VERSION = 1


def to_classes(
    values: np.ndarray,
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Non-negative values below ``VALUE_LIMIT`` as (class, number of low bits, low bits).

    With v = value + 1 of bit length e + 1: up to ``2 ** (CLASS_BITS + 1) - 1`` the class is v - 1 and
    no bits follow; above, the class names e and the ``CLASS_BITS`` bits after the leading one, and the
    e - ``CLASS_BITS`` bits below them follow as they are.
    """
    v = np.asarray(values, np.int64) + 1
    if v.size and (v.min() < 1 or v.max() > VALUE_LIMIT):
        raise ValueError(f"values to code must lie in [0, {VALUE_LIMIT - 1}]")
    e = np.frexp(v.astype(np.float64))[1].astype(np.int64) - 1
    nbits = np.maximum(e - CLASS_BITS, 0)
    top = v >> nbits
    cls = np.where(nbits == 0, v, nbits * (1 << CLASS_BITS) + top) - 1
    return cls.astype(np.int32), nbits.astype(np.int32), (v - (top << nbits)).astype(np.int32)


def class_bits(cls: np.ndarray) -> npt.NDArray[np.int32]:
    """The number of low bits that follow each class (``to_classes``)."""
    c = np.asarray(cls, np.int64) + 1
    out: npt.NDArray[np.int32] = np.where(c < (2 << CLASS_BITS), 0, (c >> CLASS_BITS) - 1).astype(np.int32)
    return out


def from_classes(cls: np.ndarray, low: np.ndarray) -> npt.NDArray[np.int64]:
    """The values of ``to_classes``' classes and low bits."""
    c = np.asarray(cls, np.int64) + 1
    nbits = class_bits(cls).astype(np.int64)
    top = np.where(nbits == 0, c, (c & ((1 << CLASS_BITS) - 1)) | (1 << CLASS_BITS))
    out: npt.NDArray[np.int64] = (top << nbits) + np.asarray(low, np.int64) - 1
    return out


@dataclass
class Values:
    """The coded values of some positions (those that keep their targets, rows one after another).

    ``codes`` (P, k) and ``gaps`` (P, k - 1) of a cache with top-k targets; ``drawn`` (P, slots) of one
    with both; of one with draws, ``distinct`` (P,) draws per position, ``anchor_slots`` (P,) the draws
    of the position's anchor (0 at an anchor), ``from_anchor`` (their sum) whether each of those is
    drawn here too (and not named by ``drawn``), ``next_drawn`` (P,) whether the position's next token is
    one of the draws named by neither, ``rank_gaps`` (the others, ``rest()`` a position) and ``counts``
    (``distinct`` a position, in that order: the draws named by ``drawn``, by ``from_anchor``, the next
    token's, the others'; they sum to the cache's number of draws).
    """

    codes: np.ndarray | None = None
    gaps: np.ndarray | None = None
    drawn: np.ndarray | None = None
    distinct: np.ndarray | None = None
    anchor_slots: np.ndarray | None = None
    from_anchor: np.ndarray | None = None
    next_drawn: np.ndarray | None = None
    rank_gaps: np.ndarray | None = None
    counts: np.ndarray | None = None

    def named(self) -> npt.NDArray[np.int64]:
        """Draws per position named by a top-k slot."""
        assert self.distinct is not None
        if self.drawn is None:
            return np.zeros(len(self.distinct), np.int64)
        out: npt.NDArray[np.int64] = np.asarray(self.drawn).sum(axis=1).astype(np.int64)
        return out

    def anchored(self) -> npt.NDArray[np.int64]:
        """Draws per position named by the anchor's."""
        assert self.anchor_slots is not None and self.from_anchor is not None
        slots = np.asarray(self.anchor_slots, np.int64)
        owner = np.repeat(np.arange(len(slots)), slots)
        out: npt.NDArray[np.int64] = np.bincount(
            owner[np.asarray(self.from_anchor, bool)], minlength=len(slots)
        )
        return out

    def rest(self) -> npt.NDArray[np.int64]:
        """Draws per position stored as rank gaps."""
        assert self.distinct is not None and self.next_drawn is not None
        flags = np.asarray(self.next_drawn, np.int64)
        out: npt.NDArray[np.int64] = (
            np.asarray(self.distinct, np.int64) - self.named() - self.anchored() - flags
        )
        return out

    def rank_models(self) -> npt.NDArray[np.int64]:
        """Each rank gap's model: its place in its position's list and the position's bucket of draws."""
        assert self.distinct is not None
        rest = self.rest()
        bucket = np.repeat(_bucket(RANK_BUCKETS, np.asarray(self.distinct, np.int64)), rest)
        out: npt.NDArray[np.int64] = _places(rest) * len(RANK_BUCKETS) + bucket
        return out

    def count_models(self) -> npt.NDArray[np.int64]:
        """Each count's model: its draw's kind (``NAMED``, ``ANCHOR``, ``NEXT``, ``OTHER``) and its position's
        bucket."""
        assert self.distinct is not None and self.next_drawn is not None
        distinct = np.asarray(self.distinct, np.int64)
        place = place_in_position(distinct)
        named = np.repeat(self.named(), distinct)
        anchored = named + np.repeat(self.anchored(), distinct)
        flagged = anchored + np.repeat(np.asarray(self.next_drawn, np.int64), distinct)
        kind = np.select([place < named, place < anchored, place < flagged], [NAMED, ANCHOR, NEXT], OTHER)
        bucket = np.repeat(_bucket(COUNT_BUCKETS, distinct), distinct)
        out: npt.NDArray[np.int64] = kind * len(COUNT_BUCKETS) + bucket
        return out


def _bucket(edges: np.ndarray, values: np.ndarray) -> npt.NDArray[np.int64]:
    out: npt.NDArray[np.int64] = np.maximum(np.searchsorted(edges, values, side="right") - 1, 0)
    return out


def _places(lengths: np.ndarray) -> npt.NDArray[np.int64]:
    """Each value's place in its position's list (``lengths`` a position), capped at ``RANK_PLACES - 1``."""
    out: npt.NDArray[np.int64] = np.minimum(place_in_position(lengths), RANK_PLACES - 1)
    return out


@dataclass
class Models:
    """A shard's symbol counts, one table (models x alphabet) per kind of value, and the coder's models."""

    k: int
    samples: int
    tables: dict[str, np.ndarray]
    _built: dict[str, list[object]] = field(default_factory=dict, repr=False)

    @staticmethod
    def shapes(k: int, samples: int) -> dict[str, tuple[int, int]]:
        """Each table's (models, alphabet) for a cache of top-k ``k`` (0: none) and ``samples`` draws (0)."""
        out = {}
        if k:
            out["codes"] = (k, CLASSES)
            if k > 1:
                out["gaps"] = (k - 1, 256)
        if samples:
            if k:
                out["drawn"] = (min(k, MASK_SLOTS), 2)
            out["anchor"] = (ANCHOR_PLACES, 2)
            out["next"] = (1, 2)
            out["rank_gaps"] = (RANK_PLACES * len(RANK_BUCKETS), CLASSES)
            out["counts"] = (4 * len(COUNT_BUCKETS), samples + 1)
        return out

    @classmethod
    def fit(cls, values: Values, k: int, samples: int) -> Models:
        """The symbol counts of ``values`` (a shard's first rows)."""
        tables = {name: np.zeros(shape, np.int64) for name, shape in cls.shapes(k, samples).items()}
        for name, (model, symbol) in _symbols(values, k).items():
            np.add.at(tables[name], (model, symbol), 1)
        return cls(k, samples, tables)

    def pack(self) -> bytes:
        """The models as metadata: base64 of zlib of varints (version, k, samples, every table's counts)."""
        flat = [np.array([PACK_VERSION, self.k, self.samples], np.uint64)]
        flat += [
            self.tables[name].reshape(-1).astype(np.uint64) for name in self.shapes(self.k, self.samples)
        ]
        return base64.b64encode(zlib.compress(_varints(np.concatenate(flat)), 9))

    @classmethod
    def unpack(cls, packed: bytes) -> Models:
        """The models of ``pack``; ``ValueError`` when they are not."""
        values = _from_varints(zlib.decompress(base64.b64decode(packed)))
        if values.size < 3 or values[0] != PACK_VERSION:
            raise ValueError("entropy models of an unknown format")
        k, samples = int(values[1]), int(values[2])
        tables, at = {}, 3
        for name, (rows, cols) in cls.shapes(k, samples).items():
            if values.size < at + rows * cols:
                raise ValueError("entropy models cut short")
            tables[name] = values[at : at + rows * cols].reshape(rows, cols)
            at += rows * cols
        if at != values.size:
            raise ValueError("entropy models with values left over")
        return cls(k, samples, tables)

    def model(self, name: str, i: int) -> object:
        """The coder's model ``i`` of table ``name``: its counts plus one (every symbol can be coded)."""
        if name not in self._built:
            self._built[name] = [
                constriction.stream.model.Categorical(row.astype(np.float64) + 1.0, perfect=False)
                for row in self.tables[name]
            ]
        return self._built[name][i]


def _symbols(values: Values, k: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per table, each value's model and symbol (for counting)."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if values.codes is not None and k:
        cls = to_classes(values.codes)[0]
        out["codes"] = (np.broadcast_to(np.arange(k), cls.shape).reshape(-1), cls.reshape(-1))
        if k > 1 and values.gaps is not None:
            g = np.asarray(values.gaps, np.int64)
            out["gaps"] = (np.broadcast_to(np.arange(k - 1), g.shape).reshape(-1), g.reshape(-1))
    if values.drawn is not None:
        d = np.asarray(values.drawn, np.int64)
        out["drawn"] = (np.broadcast_to(np.arange(d.shape[1]), d.shape).reshape(-1), d.reshape(-1))
    if values.rank_gaps is not None and values.counts is not None and values.next_drawn is not None:
        flags = np.asarray(values.next_drawn, np.int64)
        assert values.anchor_slots is not None and values.from_anchor is not None
        anchor_places = place_in_position(values.anchor_slots).clip(max=ANCHOR_PLACES - 1)
        out["anchor"] = (anchor_places, np.asarray(values.from_anchor, np.int64))
        out["next"] = (np.zeros(len(flags), np.int64), flags)
        out["rank_gaps"] = (values.rank_models(), to_classes(values.rank_gaps)[0].astype(np.int64))
        stored = ~last_in_position(np.asarray(values.distinct))
        out["counts"] = (values.count_models()[stored], np.asarray(values.counts, np.int64)[stored])
    return out


#: What the coder codes in one call: symbols, their model and (a uniform model's) each one's alphabet size.
Segment = tuple[np.ndarray, object, "np.ndarray | None"]


def _by_model(models: Models, name: str, which: np.ndarray, symbols: np.ndarray) -> list[Segment]:
    """Coder segments: the symbols of each model of table ``name`` in turn (``which`` names each one's)."""
    order, models_used, cuts = _grouped(which)
    parts = np.split(np.asarray(symbols, np.int32)[order], cuts)
    return [(part, models.model(name, int(i)), None) for i, part in zip(models_used, parts)]


def _grouped(which: np.ndarray) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Values grouped by their model, each group in its values' order: the order, the models present, and
    where each group after the first starts."""
    order: npt.NDArray[np.int64] = np.argsort(which, kind="stable")
    present, sizes = np.unique(np.asarray(which)[order], return_counts=True)
    return order, present, np.cumsum(sizes)[:-1]


def _low_bits(nbits: np.ndarray, low: np.ndarray) -> list[Segment]:
    keep = nbits > 0
    if not keep.any():
        return []
    sizes = (np.int32(1) << nbits[keep]).astype(np.int32)
    return [(low[keep].astype(np.int32), constriction.stream.model.Uniform(), sizes)]


def _row_segments(models: Models, row: Values) -> list[Segment]:
    """One row's symbols as coder segments (symbols, model, uniform sizes), in the order they are read: each
    table's (``_symbols``) model by model, the codes' and rank gaps' low bits after their classes."""
    segments: list[Segment] = []
    for name, (which, symbols) in _symbols(row, models.k).items():
        segments += _by_model(models, name, which, symbols)
        classed = {"codes": row.codes, "rank_gaps": row.rank_gaps}.get(name)
        if classed is not None:
            _, nbits, low = to_classes(classed)
            segments += _low_bits(nbits.reshape(-1), low.reshape(-1))
    return segments


def encode(models: Models, values: Values, positions: np.ndarray) -> list[bytes]:
    """Each row's blob: ``values`` of rows one after another, ``positions[r]`` positions in row r."""
    cuts = np.cumsum(np.asarray(positions, np.int64))
    starts = cuts - np.asarray(positions, np.int64)
    if values.rank_gaps is not None:
        assert values.counts is not None
        distinct = np.asarray(values.distinct, np.int64)
        if distinct.any():
            starts_of = (np.cumsum(distinct) - distinct)[distinct > 0]
            if (np.add.reduceat(np.asarray(values.counts, np.int64), starts_of) != models.samples).any():
                raise ValueError(f"draws whose counts do not sum to the cache's {models.samples}")
        value_cuts = np.concatenate([[0], np.cumsum(distinct)])
        rest_cuts = np.concatenate([[0], np.cumsum(values.rest())])
        slot_cuts = np.concatenate([[0], np.cumsum(np.asarray(values.anchor_slots, np.int64))])
    blobs = []
    for a, b in zip(starts, cuts):
        row = Values(
            codes=None if values.codes is None else values.codes[a:b],
            gaps=None if values.gaps is None else values.gaps[a:b],
            drawn=None if values.drawn is None else values.drawn[a:b],
        )
        if values.rank_gaps is not None:
            assert values.distinct is not None and values.counts is not None
            row.distinct = values.distinct[a:b]
            assert values.anchor_slots is not None and values.from_anchor is not None
            row.anchor_slots = values.anchor_slots[a:b]
            row.from_anchor = values.from_anchor[slot_cuts[a] : slot_cuts[b]]
            row.next_drawn = None if values.next_drawn is None else values.next_drawn[a:b]
            row.rank_gaps = values.rank_gaps[rest_cuts[a] : rest_cuts[b]]
            row.counts = values.counts[value_cuts[a] : value_cuts[b]]
        coder = constriction.stream.stack.AnsCoder()
        for symbols, model, sizes in reversed(_row_segments(models, row)):
            if len(symbols):
                if sizes is None:
                    coder.encode_reverse(np.ascontiguousarray(symbols, np.int32), model)
                else:
                    coder.encode_reverse(np.ascontiguousarray(symbols, np.int32), model, sizes)
        blobs.append(coder.get_compressed().tobytes())
    return blobs


class _Reader:
    """Reads one blob's segments in order."""

    def __init__(self, blob: bytes) -> None:
        if len(blob) % 4:
            raise ValueError("a coded row whose length is not whole 32-bit words")
        self.coder = constriction.stream.stack.AnsCoder(np.frombuffer(blob, np.uint32).copy())

    def read(self, model: object, count: int) -> npt.NDArray[np.int64]:
        if not count:
            return np.empty(0, np.int64)
        out: npt.NDArray[np.int64] = np.asarray(self.coder.decode(model, count), np.int64)
        return out

    def low(self, nbits: np.ndarray) -> npt.NDArray[np.int64]:
        out = np.zeros(len(nbits), np.int64)
        keep = nbits > 0
        if keep.any():
            sizes = (np.int32(1) << nbits[keep]).astype(np.int32)
            out[keep] = self.coder.decode(constriction.stream.model.Uniform(), sizes)
        return out

    def by_model(self, models: Models, name: str, which: np.ndarray) -> npt.NDArray[np.int64]:
        order, models_used, cuts = _grouped(which)
        sizes = np.diff(np.concatenate([[0], cuts, [len(which)]]))
        out = np.zeros(len(which), np.int64)
        if len(which):
            out[order] = np.concatenate(
                [self.read(models.model(name, int(i)), int(n)) for i, n in zip(models_used, sizes)]
            )
        return out


def decode(
    models: Models,
    blobs: list[bytes],
    positions: np.ndarray,
    distinct: np.ndarray | None,
    anchor_slots: np.ndarray | None = None,
    *,
    draws: bool = True,
) -> Values:
    """The values of ``encode``'s blobs; ``distinct`` and ``anchor_slots`` per position (all rows') when the
    cache has draws.

    ``draws=False`` reads the top-k values only (the draws' are the blob's last). ``ValueError`` when a
    blob does not hold what its shape says.
    """
    k = models.k
    draws = draws and bool(models.samples) and distinct is not None
    codes, gaps, drawn, next_drawn, rank_gaps, counts, from_anchor = [], [], [], [], [], [], []
    if draws and anchor_slots is None:
        raise ValueError("coded draws read without their anchors' numbers of draws")
    at = 0
    for blob, p in zip(blobs, np.asarray(positions, np.int64)):
        reader = _Reader(blob)
        p = int(p)
        if k:
            cls = np.stack([reader.read(models.model("codes", j), p) for j in range(k)], axis=1)
            nbits = class_bits(cls)
            codes.append(from_classes(cls, reader.low(nbits.reshape(-1)).reshape(cls.shape)))
            if k > 1:
                gaps.append(np.stack([reader.read(models.model("gaps", j), p) for j in range(k - 1)], axis=1))
        if draws:
            assert distinct is not None
            assert anchor_slots is not None
            row_distinct = np.asarray(distinct[at : at + p], np.int64)
            row = Values(distinct=row_distinct)
            row.anchor_slots = np.asarray(anchor_slots[at : at + p], np.int64)
            if k:
                slots = min(k, MASK_SLOTS)
                row.drawn = (
                    np.stack([reader.read(models.model("drawn", j), p) for j in range(slots)], axis=1) > 0
                )
                drawn.append(row.drawn)
            anchor_places = place_in_position(row.anchor_slots).clip(max=ANCHOR_PLACES - 1)
            row.from_anchor = reader.by_model(models, "anchor", anchor_places) > 0
            from_anchor.append(row.from_anchor)
            row.next_drawn = reader.read(models.model("next", 0), p) > 0
            next_drawn.append(row.next_drawn)
            if (row.rest() < 0).any():
                raise ValueError("a coded row with more draws named than at the position")
            cls = reader.by_model(models, "rank_gaps", row.rank_models())
            rank_gaps.append(from_classes(cls, reader.low(class_bits(cls))))
            last = last_in_position(row_distinct)
            row_counts = np.zeros(len(last), np.int64)
            row_counts[~last] = reader.by_model(models, "counts", row.count_models()[~last])
            if last.any():
                starts = (np.cumsum(row_distinct) - row_distinct)[row_distinct > 0]
                row_counts[last] = models.samples - np.add.reduceat(row_counts, starts)
                if (row_counts[last] < 1).any():
                    raise ValueError("a coded row whose counts exceed the cache's draws")
            counts.append(row_counts)
        at += p

    def cat(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(shape, np.int64)

    out = Values()
    if k:
        out.codes = cat(codes, (0, k))
        if k > 1:
            out.gaps = cat(gaps, (0, k - 1))
    if draws:
        out.distinct = np.asarray(distinct, np.int64)
        if k:
            out.drawn = cat(drawn, (0, min(k, MASK_SLOTS))).astype(bool)
        out.next_drawn = cat(next_drawn, (0,)).astype(bool)
        out.anchor_slots = np.asarray(anchor_slots, np.int64)
        out.from_anchor = cat(from_anchor, (0,)).astype(bool)
        out.rank_gaps, out.counts = cat(rank_gaps, (0,)), cat(counts, (0,))
    return out


def split_bits(models: Models, values: Values) -> dict[str, float]:
    """Bits each kind of value takes under ``models`` (what ``encode`` writes, less its few bytes a row):
    per table the symbols' -log2 of their model's probability, and the uniform low bits of the codes
    (``codes_low``) and rank gaps (``rank_gaps_low``)."""
    out: dict[str, float] = {}
    for name, (model, symbol) in _symbols(values, models.k).items():
        counts = models.tables[name].astype(np.float64) + 1.0
        p = counts[model, symbol] / counts[model].sum(axis=1)
        out[name] = float(-np.log2(p).sum())
    for name, v in (("codes_low", values.codes), ("rank_gaps_low", values.rank_gaps)):
        if v is not None:
            out[name] = float(to_classes(v)[1].sum())
    return out
