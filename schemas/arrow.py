"""The cache's Arrow schema, and building it from numpy arrays without a loop per token.

One row per scored sequence. With ``n = len(input_ids)``:

- ``topk_ids`` / ``topk_logprobs``: n lists of k, position i = the teacher's k most likely next
  tokens after reading ``input_ids[0..i]``, most likely first;
- ``target_logprobs`` / ``target_ranks``: n-1 values, the logprob and rank (1 = argmax) of
  ``input_ids[i+1]`` at position i;
- with sampled targets: ``sample_ids`` / ``sample_counts`` / ``sample_logprobs``, n lists each, the
  distinct tokens among N draws from the teacher at position i, how often each was drawn (summing
  to N) and their logprobs. ``targets="sampled"`` leaves the top-k columns out.

Logprobs are those of ``softmax(logits / T)`` at the cache's temperature T. That is what the server
sends (``result_schema``). A cache stores it in a format of its own (``cache_schema`` with ``k``,
schema 3 to 5): the top-k as fixed-size lists of k, the logprobs as ``--logprob-dtype`` says
(``schemas.formats``: ``uint8-gap`` replaces ``topk_logprobs`` with ``topk_top1`` and ``topk_gaps``,
``topk_ids`` with ``topk_id_codes`` and ``sample_ids`` with ``sample_rank_gaps``, schema 4; schema 5 codes
those, ``sample_in_topk`` and ``sample_counts`` into one ``coded`` blob a row (``schemas.coding``) beside
``sample_lengths``; schema 3 stored ``topk_ids`` and ``sample_id_gaps``), counts in the smallest type that
holds N and ``sample_logprobs`` only when asked. ``encode_rows`` turns results into that layout (schema 5
by way of schema 4's: ``_coded``); ``uncoded`` turns schema 5's rows back into schema 4's, and
``topk_logprobs_of`` and ``decode_rows`` read any layout back, schema 2's included (lists of any width,
int16 counts, every column).
"""

from __future__ import annotations

import base64
import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from teacher_farm.schemas import SCHEMA_VERSION, coding
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.formats import (
    GAP_CLIP,
    MASK_SLOTS,
    StoredDraws,
    anchors,
    count_dtype,
    decode_gaps,
    decode_topk_ids,
    draws_from_stored,
    draws_to_stored,
    encode_gaps,
    encode_topk_ids,
    frequency_order,
    from_mask,
    from_ranks,
    id_gaps,
    ids_from_gaps,
    last_in_position,
    logprob_format,
    next_tokens,
    place_in_position,
    split_by_topk,
    to_ranks,
    unpack_order,
)

#: The wire's logprob dtypes (``TopkRequest.logprob_dtype``); a cache's formats are
#: ``schemas.formats.FORMATS``.
LOGPROB_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

#: What a cache stores per position: the top-k, tokens sampled from the teacher, or both.
TARGET_KINDS = ("topk", "sampled", "both")

#: Columns that hold logprobs (cast together to the cache's logprob dtype).
LOGPROB_COLUMNS = ("topk_logprobs", "target_logprobs", "sample_logprobs")

#: The top-k logprobs of a ``uint8-gap`` cache, in place of ``topk_logprobs``: the top-1 (n float16 per
#: row) and the gaps from each entry to the next (n fixed-size lists of k - 1 uint8; absent when k is 1).
GAP_COLUMNS = ("topk_top1", "topk_gaps")

#: A compact (schema 4) shard's ids by frequency, in its Parquet metadata (``with_id_order``); every row's
#: ``id_order`` column holds its checksum, so rows read with another shard's order are refused.
ID_ORDER_KEY = b"teacher_farm.id_order"


@dataclass(frozen=True)
class ScoredSequence:
    """The teacher's answer for one input, as numpy arrays."""

    id: str | None
    input_ids: np.ndarray  # (n,) int32
    topk_ids: np.ndarray  # (n, k) int32
    topk_logprobs: np.ndarray  # (n, k) float32
    target_logprobs: np.ndarray  # (n - 1,) float32
    target_ranks: np.ndarray  # (n - 1,) int32
    #: Sampled targets, flat over positions: ``sample_lengths[i]`` distinct tokens at position i.
    sample_lengths: np.ndarray | None = None  # (n,) int32
    sample_ids: np.ndarray | None = None  # (sum,) int32, ascending within a position
    sample_counts: np.ndarray | None = None  # (sum,) int16, summing to N per position
    sample_logprobs: np.ndarray | None = None  # (sum,) float32
    #: The positions whose targets (top-k, draws) are kept, by the request's position rule; None: all.
    selected: np.ndarray | None = None  # (n,) bool

    def sample_lists(self) -> dict[str, list[np.ndarray]]:
        """The sampled targets as n arrays per column (for JSON answers)."""
        if self.sample_lengths is None:
            return {}
        cuts = np.cumsum(self.sample_lengths)[:-1]
        return {
            name: np.split(getattr(self, name), cuts)
            for name in ("sample_ids", "sample_counts", "sample_logprobs")
        }


def result_schema(logprob_dtype: str = "float32", targets: str = "topk") -> pa.Schema:
    """Schema of the results the server sends (the cache row without ``line``)."""
    if targets not in TARGET_KINDS:
        raise ValueError(f"targets must be one of {TARGET_KINDS}, not {targets!r}")
    lp = LOGPROB_DTYPES[logprob_dtype]
    fields = [pa.field("id", pa.string()), pa.field("input_ids", pa.list_(pa.int32()))]
    if targets != "sampled":
        fields += [
            pa.field("topk_ids", pa.list_(pa.list_(pa.int32()))),
            pa.field("topk_logprobs", pa.list_(pa.list_(lp))),
        ]
    fields += [pa.field("target_logprobs", pa.list_(lp)), pa.field("target_ranks", pa.list_(pa.int32()))]
    if targets != "topk":
        fields += [
            pa.field("sample_ids", pa.list_(pa.list_(pa.int32()))),
            pa.field("sample_counts", pa.list_(pa.list_(pa.int16()))),
            pa.field("sample_logprobs", pa.list_(pa.list_(lp))),
        ]
    return pa.schema(fields)


#: Columns the client adds to the server's results: where each row comes from in the input.
#: ``line`` is the 0-based line (or Parquet row) in its file ``source``; ``offset`` is the index, in
#: the line's full token sequence, of the row's first token (0 unless the line was split into windows).
SOURCE_FIELDS = [
    pa.field("line", pa.int64()),
    pa.field("source", pa.string()),
    pa.field("offset", pa.int64()),
]


def cache_schema(
    logprob_dtype: str = "float32",
    targets: str = "topk",
    *,
    k: int | None = None,
    samples: int | None = None,
    sample_logprobs: bool = True,
    version: int = SCHEMA_VERSION,
) -> pa.Schema:
    """Schema of one cache row: ``id``, ``line``, ``source``, ``offset``, then the stored result columns.

    With ``k`` (what ``teacher-farm cache`` writes, schema 3): ``topk_ids`` as fixed-size lists of k,
    the top-k logprobs in the format ``logprob_dtype`` names (``schemas.formats``), ``sample_counts``
    in the smallest type that holds ``samples`` draws, and ``sample_logprobs`` only with
    ``sample_logprobs`` (``uint8-gap``: ``sample_id_gaps`` in place of ``sample_ids``). Without
    ``k``: the result columns as the server sends them (lists of any width, int16 counts, every
    column), the layout of schema 2. ``uint8-gap`` at ``version`` 5 (the default; 4 for the layout
    before it): one ``coded`` blob per row (``schemas.coding``) in place of ``topk_id_codes``,
    ``topk_gaps``, ``sample_in_topk``, ``sample_rank_gaps`` and ``sample_counts``, and
    ``sample_lengths``, the distinct draws per position.
    """
    fmt = logprob_format(logprob_dtype)
    if k is None:
        if fmt.gaps:
            raise ValueError(f"the {logprob_dtype} format stores fixed-size top-k lists: give k")
        fields = list(result_schema(logprob_dtype, targets))
        return pa.schema([fields[0], *SOURCE_FIELDS, *fields[1:]])
    if targets not in TARGET_KINDS:
        raise ValueError(f"targets must be one of {TARGET_KINDS}, not {targets!r}")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    if fmt.gaps and version >= 5:
        return _coded_schema(targets, k, samples, sample_logprobs)
    value = LOGPROB_DTYPES[fmt.value_dtype]
    fields = [pa.field("id", pa.string()), *SOURCE_FIELDS, pa.field("input_ids", pa.list_(pa.int32()))]
    if fmt.gaps:
        fields.append(pa.field("id_order", pa.int64()))
    if targets != "sampled":
        fields.append(
            pa.field("topk_id_codes" if fmt.gaps else "topk_ids", pa.list_(pa.list_(pa.int32(), k)))
        )
        if fmt.gaps:
            fields.append(pa.field("topk_top1", pa.list_(pa.float16())))
            if k > 1:
                fields.append(pa.field("topk_gaps", pa.list_(pa.list_(pa.uint8(), k - 1))))
        else:
            fields.append(pa.field("topk_logprobs", pa.list_(pa.list_(value, k))))
    fields += [pa.field("target_logprobs", pa.list_(value)), pa.field("target_ranks", pa.list_(pa.int32()))]
    if targets != "topk":
        counts = pa.from_numpy_dtype(np.dtype(count_dtype(samples))) if samples else pa.int16()
        fields += [
            pa.field("sample_rank_gaps" if fmt.gaps else "sample_ids", pa.list_(pa.list_(pa.int32()))),
            *([pa.field("sample_in_topk", pa.list_(pa.int64()))] if fmt.gaps and targets == "both" else []),
            pa.field("sample_counts", pa.list_(pa.list_(counts))),
        ]
        if sample_logprobs:
            fields.append(pa.field("sample_logprobs", pa.list_(pa.list_(value))))
    return pa.schema(fields)


def _coded_schema(targets: str, k: int, samples: int | None, sample_logprobs: bool) -> pa.Schema:
    """Schema 5's ``uint8-gap`` row; ``coded`` says in its field metadata what its blob holds."""
    count = pa.from_numpy_dtype(np.dtype(count_dtype(samples))) if samples else pa.int16()
    coded = {b"targets": targets.encode(), b"k": str(k).encode(), b"samples": str(samples or 0).encode()}
    fields = [
        pa.field("id", pa.string()),
        *SOURCE_FIELDS,
        pa.field("input_ids", pa.list_(pa.int32())),
        pa.field("id_order", pa.int64()),
    ]
    if targets != "sampled":
        fields.append(pa.field("topk_top1", pa.list_(pa.float16())))
    fields += [
        pa.field("coded", pa.binary(), metadata=coded),
        pa.field("target_logprobs", pa.list_(pa.float16())),
        pa.field("target_ranks", pa.list_(pa.int32())),
    ]
    if targets != "topk":
        fields.append(pa.field("sample_lengths", pa.list_(count)))
        if sample_logprobs:
            fields.append(pa.field("sample_logprobs", pa.list_(pa.list_(pa.float16()))))
    return pa.schema(fields)


def _coded_shape(schema: pa.Schema) -> tuple[str, int, int]:
    """What a schema 5 schema's blobs hold: targets, k and draws, from ``coded``'s field metadata (a schema
    ``cache_schema`` made) or the shard's models (a schema read from a file, which holds no Arrow schema)."""
    meta = schema.field("coded").metadata or {}
    if b"targets" in meta:
        return meta[b"targets"].decode(), int(meta[b"k"]), int(meta[b"samples"])
    models = models_of(schema)
    targets = "both" if models.k and models.samples else "topk" if models.k else "sampled"
    return targets, models.k or 1, models.samples


def _uncoded_schema(schema: pa.Schema) -> pa.Schema:
    """The schema 4 layout of a schema 5 ``uint8-gap`` row (what ``coded`` and ``sample_lengths`` hold)."""
    targets, k, samples = _coded_shape(schema)
    out = cache_schema(
        "uint8-gap",
        targets,
        k=k,
        samples=samples or None,
        sample_logprobs="sample_logprobs" in schema.names,
        version=4,
    )
    return out.with_metadata(schema.metadata or {})


def with_source_columns(
    table: pa.Table,
    line: Sequence[int] | np.ndarray,
    source: Sequence[str | None] | pa.Array | None = None,
    offset: Sequence[int] | np.ndarray | None = None,
) -> pa.Table:
    """A result table with the client-side columns ``line``, ``source`` and ``offset`` after ``id``."""
    n = table.num_rows
    columns = [
        pa.array(line, type=pa.int64()),
        source
        if isinstance(source, pa.Array)
        else pa.array([None] * n if source is None else source, type=pa.string()),
        pa.array(np.zeros(n, np.int64) if offset is None else offset, type=pa.int64()),
    ]
    for i, (f, col) in enumerate(zip(SOURCE_FIELDS, columns)):
        table = table.add_column(1 + i, f, col)
    return table


def offsets(lengths: np.ndarray, dtype: type = np.int64) -> npt.NDArray[np.integer]:
    """List offsets from list lengths: ``[0, l0, l0 + l1, ...]``."""
    out: npt.NDArray[np.integer] = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=out[1:])
    return out


def _list(lengths: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets(lengths, np.int32)), values)


def _nested(lengths: np.ndarray, k: int, flat: np.ndarray) -> pa.Array:
    inner_offsets = pa.array(np.arange(0, flat.size + 1, k, dtype=np.int32))
    return _list(lengths, pa.ListArray.from_arrays(inner_offsets, pa.array(flat)))


def _fixed(lengths: np.ndarray, k: int, flat: np.ndarray) -> pa.Array:
    """n fixed-size lists of k per row (a schema 3+ top-k column) from the flat values."""
    return _list(lengths, pa.FixedSizeListArray.from_arrays(pa.array(flat), k))


def _ragged(n: np.ndarray, lengths: np.ndarray, flat: np.ndarray) -> pa.Array:
    """n lists per row, position i holding ``lengths[i]`` values of ``flat``."""
    return _list(n, pa.ListArray.from_arrays(pa.array(offsets(lengths, np.int32)), pa.array(flat)))


def results_to_table(results: Sequence[ScoredSequence], k: int, targets: str = "topk") -> pa.Table:
    """Build the result table for ``results`` with one concatenation per column."""
    schema = result_schema(targets=targets)
    if not results:
        return schema.empty_table()
    n = np.fromiter((len(r.input_ids) for r in results), dtype=np.int64, count=len(results))

    def cat(name: str, dtype: type) -> np.ndarray:
        flat: np.ndarray = np.concatenate([getattr(r, name).reshape(-1) for r in results])
        return flat.astype(dtype, copy=False)

    columns = {
        "id": pa.array([r.id for r in results], type=pa.string()),
        "input_ids": _list(n, pa.array(cat("input_ids", np.int32))),
        "target_logprobs": _list(n - 1, pa.array(cat("target_logprobs", np.float32))),
        "target_ranks": _list(n - 1, pa.array(cat("target_ranks", np.int32))),
    }
    if targets != "sampled":
        columns["topk_ids"] = _nested(n, k, cat("topk_ids", np.int32))
        columns["topk_logprobs"] = _nested(n, k, cat("topk_logprobs", np.float32))
    if targets != "topk":
        lengths = cat("sample_lengths", np.int32)
        columns["sample_ids"] = _ragged(n, lengths, cat("sample_ids", np.int32))
        columns["sample_counts"] = _ragged(n, lengths, cat("sample_counts", np.int16))
        columns["sample_logprobs"] = _ragged(n, lengths, cat("sample_logprobs", np.float32))
    table = pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
    if any(r.selected is not None for r in results):
        from teacher_farm.schemas.positions import thin

        kept = np.concatenate(
            [np.ones(len(r.input_ids), bool) if r.selected is None else r.selected for r in results]
        )
        table = thin(table, kept)
    return table


def _is_list(t: pa.DataType) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_fixed_size_list(t))


def whole(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """One array of a column's chunks."""
    return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr


def flat_values(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The values of a (nested) list column, every list level flattened."""
    values = whole(arr)
    while _is_list(values.type):
        values = values.flatten()
    return values


def combined(table: pa.Table, name: str) -> pa.Array:
    """Column ``name`` of ``table`` as one array (its chunks combined)."""
    return whole(table.column(name))


def list_lengths(arr: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.int64]:
    """Length of each list of a list column (a null list counts 0), int64."""
    lengths = pc.list_value_length(whole(arr)).fill_null(0).to_numpy(zero_copy_only=False)
    out: npt.NDArray[np.int64] = lengths.astype(np.int64)
    return out


def cast_logprobs(table: pa.Table, logprob_dtype: str) -> pa.Table:
    """Cast the logprob columns of a result or cache table to ``logprob_dtype``."""
    lp = LOGPROB_DTYPES[logprob_dtype]
    if table.schema.field("target_logprobs").type.value_type == lp:
        return table
    target = pa.schema(
        [
            f.with_type(pa.list_(lp) if f.name == "target_logprobs" else pa.list_(pa.list_(lp)))
            if f.name in LOGPROB_COLUMNS
            else f
            for f in table.schema
        ]
    )
    return table.cast(target)


# ---------------------------------------------------------------------------------------------
# A cache's own layout (schema 3) from results, and back from any layout


def _topk_matrix(outer: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row lengths and the (positions, width) values of an n-lists-of-width column; ``InputError`` when
    ragged."""
    inner = outer.flatten()
    widths = list_lengths(inner)
    width = int(widths[0]) if len(widths) else 0
    if (widths != width).any():
        raise InputError(f"malformed cache rows: {name} holds lists of different lengths")
    values = flat_values(inner).to_numpy(zero_copy_only=False)
    return list_lengths(outer), values.reshape(len(widths), width)


def encode_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` (result rows with the source columns) in the layout of ``schema`` (a ``cache_schema``).

    Columns are cast (fixed-size lists, narrower counts, the logprob dtype); ``topk_top1`` and
    ``topk_gaps`` are computed from ``topk_logprobs`` (``schemas.formats.encode_gaps``),
    ``sample_id_gaps`` from ``sample_ids``; columns the schema does not name (``sample_logprobs``
    unless asked) are left out.
    """
    from teacher_farm.schemas.positions import thicken, thin

    table, kept = thicken(table)  # a position rule's dropped positions: encoded as placeholders, nulled after
    if "coded" in schema.names:
        encoded = _coded(_encoded(table, _uncoded_schema(schema), kept), schema, kept, table)
    else:
        encoded = _encoded(table, schema, kept)
    return encoded if kept is None else thin(encoded, kept)


def _encoded(table: pa.Table, schema: pa.Schema, kept: np.ndarray | None) -> pa.Table:
    """``encode_rows`` of rows with every position filled (``thicken``; ``kept``: those with targets)."""
    names = set(schema.names)
    made: dict[str, pa.Array] = {}
    if "id_order" in names:
        schema = with_id_order(schema, table)
        order, checksum = id_order_of(schema)
        made["id_order"] = pa.array(np.full(table.num_rows, checksum, np.int64))
        n = list_lengths(combined(table, "input_ids"))
        tokens = flat_values(combined(table, "input_ids")).to_numpy(zero_copy_only=False)
        nxt, anchor = next_tokens(tokens, n), anchors(tokens, n, kept)
        ids = None
        if "topk_id_codes" in names:
            _, ids = _topk_matrix(combined(table, "topk_ids"), "topk_ids")
            codes = encode_topk_ids(ids, nxt, anchor, order)
            made["topk_id_codes"] = _fixed(n, ids.shape[1], codes.reshape(-1))
        if "sample_rank_gaps" in names:
            # Each position's draws in the order of their ranks, so that their gaps are small; the counts
            # and logprobs stored beside them in the same order.
            lengths, drawn = sample_ids_of(table)
            # With top-k targets, the draws among them are named by their slots (one bit mask a position)
            # and stored first, in slot order; the others follow in the order of their ranks, as rank gaps.
            owner = np.repeat(np.arange(len(lengths)), lengths)
            ranks = to_ranks(drawn, order)
            key = ranks + MASK_SLOTS + 1
            inside = np.zeros(len(drawn), bool)
            if "sample_in_topk" in names:
                assert ids is not None
                mask, inside, slot = split_by_topk(drawn, lengths, ids)
                made["sample_in_topk"] = _list(n, pa.array(mask))
                key = np.where(inside, slot, key)
            perm = np.lexsort((key, owner))
            rest = ~inside[perm]
            rest_lengths = np.bincount(owner[perm][rest], minlength=len(lengths))
            rank_gaps = id_gaps(ranks[perm][rest], rest_lengths).astype(np.int32)
            made["sample_rank_gaps"] = _ragged(n, rest_lengths, rank_gaps)
            for name in ("sample_counts", "sample_logprobs"):
                if name in names:
                    values = flat_values(combined(table, name)).to_numpy(zero_copy_only=False)[perm]
                    inner = schema.field(name).type.value_type.value_type
                    made[name] = _ragged(
                        n, lengths, pa.array(values).cast(inner).to_numpy(zero_copy_only=False)
                    )
    if names & set(GAP_COLUMNS):
        n, lp = _topk_matrix(combined(table, "topk_logprobs"), "topk_logprobs")
        top1, gaps = encode_gaps(lp) if lp.shape[1] else (np.empty(0, np.float16), np.empty((0, 0), np.uint8))
        cut = pa.array(offsets(n, np.int32))
        made["topk_top1"] = pa.ListArray.from_arrays(cut, pa.array(top1), type=schema.field("topk_top1").type)
        if "topk_gaps" in names:
            inner = schema.field("topk_gaps").type.value_type
            if gaps.shape[1] != inner.list_size:
                raise ValueError(
                    f"top-k lists of {gaps.shape[1] + 1} entries, the schema's k is {inner.list_size + 1}"
                )
            made["topk_gaps"] = pa.ListArray.from_arrays(
                cut,
                pa.FixedSizeListArray.from_arrays(pa.array(gaps.reshape(-1)), type=inner),
                type=schema.field("topk_gaps").type,
            )
    if "sample_id_gaps" in names:
        outer = combined(table, "sample_ids")
        inner = outer.flatten()
        lengths = list_lengths(inner)
        gaps = id_gaps(flat_values(inner).to_numpy(zero_copy_only=False), lengths).astype(np.int32)
        made["sample_id_gaps"] = _ragged(list_lengths(outer), lengths, gaps)
    columns = []
    for field in schema:
        if field.name in made:
            columns.append(made[field.name])
            continue
        col = table.column(field.name)
        columns.append(col if col.type == field.type else col.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _coded(rows: pa.Table, schema: pa.Schema, kept: np.ndarray | None, results: pa.Table) -> pa.Table:
    """Schema 4 ``uint8-gap`` rows (every position filled; ``results`` what they were encoded from) as schema
    5's: their integer values coded per row (``schemas.coding``) under the models of ``schema``'s metadata,
    or of these rows when it has none."""
    targets, k, samples = _coded_shape(schema)
    n = list_lengths(combined(rows, "input_ids"))
    sel = np.ones(int(n.sum()), bool) if kept is None else kept
    values = coding.Values()
    if targets != "sampled":
        values.codes = _topk_matrix(combined(rows, "topk_id_codes"), "topk_id_codes")[1][sel]
        if k > 1:
            values.gaps = _topk_matrix(combined(rows, "topk_gaps"), "topk_gaps")[1][sel]
    distinct = None
    if targets != "topk":
        counts = combined(rows, "sample_counts").flatten()
        distinct = list_lengths(counts)
        named = np.zeros(len(distinct), np.int64)
        if targets == "both":
            mask = flat_values(combined(rows, "sample_in_topk")).to_numpy(zero_copy_only=False)
            drawn = (mask[:, None] >> np.arange(min(k, MASK_SLOTS))) & 1 == 1
            named = drawn.sum(axis=1)
            values.drawn = drawn[sel]
        # Draws named by the anchor's draws or as the next token, the others by rank (draws_to_stored).
        order, _ = id_order_of(rows.schema)
        owner = np.repeat(np.arange(len(distinct)), distinct)
        slot = np.full(len(owner), -1, np.int64)
        ranks = np.empty(len(owner), np.int64)
        is_named = place_in_position(distinct) < np.repeat(named, distinct)
        if targets == "both":
            where, slots = np.nonzero(drawn)
            slot[is_named] = slots
            ids = _topk_matrix(combined(results, "topk_ids"), "topk_ids")[1]
            ranks[is_named] = to_ranks(ids[where, slots], order)
        rank_gaps = flat_values(combined(rows, "sample_rank_gaps")).to_numpy(zero_copy_only=False)
        ranks[~is_named] = ids_from_gaps(rank_gaps, distinct - named)
        tokens = flat_values(combined(rows, "input_ids")).to_numpy(zero_copy_only=False)
        next_rank = _next_ranks(next_tokens(tokens, n), order)
        stored, perm = draws_to_stored(owner, slot, ranks, anchors(tokens, n, kept), next_rank)
        values.distinct, values.next_drawn = distinct[sel], stored.next_drawn[sel]
        values.anchor_slots, values.from_anchor = stored.anchor_slots[sel], stored.from_anchor
        values.rank_gaps = id_gaps(stored.others, values.rest())
        values.counts = flat_values(counts).to_numpy(zero_copy_only=False).astype(np.int64)[perm]
        rows = _reordered_draws(rows, n, distinct, perm)
    if targets != "sampled":
        rows = _targets_by_slot(rows, sel)
    shard = rows.schema.metadata or {}
    packed = (schema.metadata or {}).get(coding.CODING_KEY)
    if packed is None:
        models = coding.Models.fit(
            values, 0 if targets == "sampled" else k, 0 if targets == "topk" else samples
        )
        packed = models.pack()
    schema = schema.with_metadata({**shard, **(schema.metadata or {}), coding.CODING_KEY: packed})
    row = np.repeat(np.arange(len(n)), n)
    blobs = coding.encode(models_of(schema), values, np.bincount(row[sel], minlength=len(n)))
    made = {
        "coded": pa.array(blobs, pa.binary()),
        "id_order": pa.array(np.full(len(n), shard_checksum(schema), np.int64)),
    }
    if distinct is not None:
        value_type = schema.field("sample_lengths").type.value_type
        made["sample_lengths"] = _list(n, pa.array(distinct).cast(value_type))
    columns = [made[f.name] if f.name in made else rows.column(f.name) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def _next_ranks(nxt: np.ndarray, order: np.ndarray) -> npt.NDArray[np.int64]:
    """Each position's next token (``next_tokens``) as its rank in the shard's id order (``to_ranks``); -1 at
    a row's last."""
    out: npt.NDArray[np.int64] = np.where(nxt >= 0, to_ranks(np.maximum(nxt, 0), order), -1)
    return out


def _reordered_draws(rows: pa.Table, n: np.ndarray, distinct: np.ndarray, perm: np.ndarray) -> pa.Table:
    """``rows`` with ``sample_logprobs`` (when stored) in the order ``perm`` (every position filled)."""
    if "sample_logprobs" not in rows.column_names:
        return rows
    i = rows.schema.get_field_index("sample_logprobs")
    values = flat_values(combined(rows, "sample_logprobs")).take(pa.array(perm))
    return rows.set_column(
        i, rows.schema.field(i), _ragged(n, distinct, values.to_numpy(zero_copy_only=False))
    )


#: ``target_ranks`` of schema 5 where the next token is among the position's top-k: its rank and logprob are
#: those of its slot (``topk_id_codes`` 0), and ``target_logprobs`` holds 0 there.
BY_SLOT = 0


def _target_positions(n: np.ndarray) -> npt.NDArray[np.int64]:
    """The position of each target (``target_logprobs`` value): every position of a row but its last."""
    out: npt.NDArray[np.int64] = np.flatnonzero(~last_in_position(n))
    return out


def _slots_of_next(codes: np.ndarray) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.int64]]:
    """Per position whether its next token is among its top-k (an id code 0), and its slot."""
    is_next = np.asarray(codes) == 0
    out: npt.NDArray[np.int64] = is_next.argmax(axis=1)
    return is_next.any(axis=1), out


def _set_targets(rows: pa.Table, ranks: np.ndarray, logprobs: np.ndarray) -> pa.Table:
    n = np.maximum(list_lengths(combined(rows, "input_ids")) - 1, 0)
    for name, values in (("target_ranks", ranks), ("target_logprobs", logprobs)):
        if name in rows.column_names:
            i = rows.schema.get_field_index(name)
            value_type = rows.schema.field(i).type.value_type
            rows = rows.set_column(i, rows.schema.field(i), _list(n, pa.array(values).cast(value_type)))
    return rows


def _targets_by_slot(rows: pa.Table, kept: np.ndarray) -> pa.Table:
    """Schema 4 rows with ``target_ranks`` ``BY_SLOT`` (and ``target_logprobs`` 0) where a kept position's
    next token is among its top-k at the slot of its rank, not clipped (what the top-k reads back for it)."""
    n = list_lengths(combined(rows, "input_ids"))
    pos = _target_positions(n)
    ranks = flat_values(combined(rows, "target_ranks")).to_numpy(zero_copy_only=False).astype(np.int64)
    logprobs = flat_values(combined(rows, "target_logprobs")).to_numpy(zero_copy_only=False).copy()
    codes = _topk_matrix(combined(rows, "topk_id_codes"), "topk_id_codes")[1][pos]
    inside, slot = _slots_of_next(codes)
    ok = inside & kept[pos] & (ranks == slot + 1)
    if "topk_gaps" in rows.column_names:
        steps = np.cumsum(
            _topk_matrix(combined(rows, "topk_gaps"), "topk_gaps")[1][pos], axis=1, dtype=np.int32
        )
        below = np.take_along_axis(np.pad(steps, ((0, 0), (1, 0))), slot[:, None], axis=1)[:, 0]
        ok &= below < GAP_CLIP
    ranks[ok] = BY_SLOT
    logprobs[ok] = 0
    return _set_targets(rows, ranks, logprobs)


def _targets_from_slot(rows: pa.Table) -> pa.Table:
    """Rows read from schema 5: each ``target_ranks`` ``BY_SLOT`` replaced by its slot's rank and logprob."""
    if "target_ranks" not in rows.column_names:
        if "target_logprobs" in rows.column_names and "topk_id_codes" in rows.column_names:
            raise InputError("malformed cache rows: schema 5's target_logprobs read without target_ranks")
        return rows
    n = list_lengths(combined(rows, "input_ids" if "input_ids" in rows.column_names else "topk_top1"))
    ranks = flat_values(combined(rows, "target_ranks")).to_numpy(zero_copy_only=False).astype(np.int64)
    marked = ranks == BY_SLOT
    if not marked.any():
        return rows
    if "topk_id_codes" not in rows.column_names:
        raise InputError("malformed cache rows: targets read by their top-k slot without the top-k")
    pos = _target_positions(n)[marked]
    inside, slot = _slots_of_next(_topk_matrix(combined(rows, "topk_id_codes"), "topk_id_codes")[1][pos])
    if not inside.all():
        raise InputError(
            "malformed cache rows: a target read by its top-k slot whose token is not among them"
        )
    ranks[marked] = slot + 1
    logprobs = np.zeros(len(ranks), np.float32)
    if "target_logprobs" in rows.column_names:
        logprobs = (
            flat_values(combined(rows, "target_logprobs")).to_numpy(zero_copy_only=False).astype(np.float32)
        )
        logprobs[marked] = np.take_along_axis(topk_logprobs_of(rows)[pos], slot[:, None], axis=1)[:, 0]
    return _set_targets(rows, ranks, logprobs)


@dataclass(frozen=True)
class _Decoded:
    """What a schema 5 table's blobs hold, and the shape they were read with (``_decode_coded``)."""

    models: coding.Models
    values: coding.Values
    n: np.ndarray
    kept: np.ndarray
    distinct: np.ndarray | None
    anchor: np.ndarray | None
    tokens: np.ndarray | None


def _decode_coded(table: pa.Table) -> _Decoded:
    """Decode a schema 5 table's ``coded`` blobs; ``InputError`` when the rows are malformed."""
    models = models_of(table.schema)  # what the blobs hold (a shard may have no Arrow schema)
    names = table.column_names
    shape = "topk_top1" if models.k else "sample_lengths"
    if shape not in names:
        raise InputError(f"malformed cache rows: coded rows read without {shape}")
    outer = combined(table, shape)
    n = list_lengths(outer)
    kept = outer.flatten().is_valid().to_numpy(zero_copy_only=False)
    row = np.repeat(np.arange(len(n)), n)
    per_row = np.bincount(row[kept], minlength=len(n))
    distinct = None
    if "sample_lengths" in names:
        lengths = combined(table, "sample_lengths")
        if not np.array_equal(list_lengths(lengths), n):
            raise InputError("malformed cache rows: sample_lengths does not match the rows' positions")
        distinct = lengths.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    if (combined(table, "id_order").to_numpy(zero_copy_only=False) != shard_checksum(table.schema)).any():
        raise InputError("malformed cache rows: rows of a compact shard read with another shard's id order")
    blobs = combined(table, "coded").to_pylist()
    anchor = slots = tokens = None
    if distinct is not None:  # the draws name those of the position's anchor: how many it has
        if "input_ids" not in names:
            raise InputError("malformed cache rows: coded draws read without input_ids")
        tokens = flat_values(combined(table, "input_ids")).to_numpy(zero_copy_only=False)
        anchor = anchors(tokens, n, kept)
        slots = np.where(anchor != np.arange(len(anchor)), distinct[anchor], 0)[kept]
    try:
        values = coding.decode(models, blobs, per_row, None if distinct is None else distinct[kept], slots)
    except (ValueError, RuntimeError, OverflowError) as exc:
        raise InputError(f"malformed cache rows: a coded row ({exc})") from None
    return _Decoded(models, values, n, kept, distinct, anchor, tokens)


def coded_values(table: pa.Table) -> tuple[coding.Models, coding.Values]:
    """The models and values of a schema 5 table's blobs (what ``benchmarks/formats.py`` splits by kind)."""
    d = _decode_coded(table)
    return d.models, d.values


def uncoded(table: pa.Table) -> pa.Table:
    """Schema 5 ``uint8-gap`` rows in schema 4's layout (``coded`` and ``sample_lengths`` decoded into
    ``topk_id_codes``, ``topk_gaps``, ``sample_in_topk``, ``sample_rank_gaps`` and ``sample_counts``);
    other rows as they are. Without ``sample_lengths`` only the top-k is decoded. ``InputError`` when the
    rows are malformed."""
    if "coded" not in table.column_names:
        return table
    from teacher_farm.schemas.positions import thin

    d = _decode_coded(table)
    models, values, n, kept, distinct, anchor, tokens = (
        d.models,
        d.values,
        d.n,
        d.kept,
        d.distinct,
        d.anchor,
        d.tokens,
    )
    k = models.k
    P = len(kept)
    made: dict[str, pa.Array] = {}
    if values.codes is not None:
        codes = np.zeros((P, k), np.int32)
        codes[kept] = values.codes
        made["topk_id_codes"] = _fixed(n, k, codes.reshape(-1))
        if values.gaps is not None:
            gaps = np.zeros((P, k - 1), np.uint8)
            gaps[kept] = values.gaps
            made["topk_gaps"] = _list(n, pa.FixedSizeListArray.from_arrays(pa.array(gaps.reshape(-1)), k - 1))
    if values.counts is not None:
        assert distinct is not None and values.rank_gaps is not None and values.next_drawn is not None
        assert anchor is not None and values.from_anchor is not None and values.anchor_slots is not None
        flags, slots = np.zeros(P, bool), np.zeros(P, np.int64)
        flags[kept], slots[kept] = values.next_drawn, values.anchor_slots
        named_owner, named_slots = np.zeros(0, np.int64), np.zeros(0, np.int64)
        named_ranks = np.zeros(0, np.int64)
        order, _ = id_order_of(table.schema)
        assert tokens is not None
        nxt = next_tokens(tokens, n)
        try:
            if values.drawn is not None:
                drawn = np.zeros((P, values.drawn.shape[1]), bool)
                drawn[kept] = values.drawn
                made["sample_in_topk"] = _list(
                    n, pa.array((drawn.astype(np.int64) << np.arange(drawn.shape[1])).sum(1))
                )
                named_owner, named_slots = np.nonzero(drawn)
                placeholder = np.where(kept[:, None], codes, k + 1 + order.size)  # dropped: id 0
                ids = decode_topk_ids(placeholder, nxt, anchor, order)
                named_ranks = to_ranks(ids[named_owner, named_slots], order)
            stored = StoredDraws(
                slots, values.from_anchor, flags, ids_from_gaps(values.rank_gaps, values.rest())
            )
            rest, ranks, perm = draws_from_stored(
                stored, distinct, named_owner, named_ranks, anchor, _next_ranks(nxt, order)
            )
        except ValueError as exc:
            raise InputError(f"malformed cache rows: {exc}") from None
        made["sample_rank_gaps"] = _ragged(n, rest, id_gaps(ranks, rest).astype(np.int32))
        count_type = table.schema.field("sample_lengths").type.value_type
        counts = pa.array(values.counts[perm]).cast(count_type).to_numpy()
        made["sample_counts"] = _ragged(n, distinct, counts)
        table = _reordered_draws(table, n, distinct, perm)
    columns, fields = [], []
    for f in table.schema:
        if f.name == "coded":
            for name in ("topk_id_codes", "topk_gaps", "sample_in_topk", "sample_rank_gaps", "sample_counts"):
                if name in made:
                    columns.append(made[name])
                    fields.append(pa.field(name, made[name].type))
        elif f.name != "sample_lengths":
            columns.append(table.column(f.name))
            fields.append(f)
    out = pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))
    out = _targets_from_slot(out)
    return out if kept.all() else thin(out, kept)


def models_of(schema: pa.Schema) -> coding.Models:
    """The entropy models in a schema 5 shard's metadata; ``InputError`` when absent or malformed."""
    packed = (schema.metadata or {}).get(coding.CODING_KEY)
    if packed is None:
        raise InputError(
            "malformed cache rows: coded rows without their shard's models (read a shard's rows with its "
            "Parquet metadata, one shard at a time)"
        )
    try:
        return _models(packed)
    except (ValueError, zlib.error) as exc:
        raise InputError(f"malformed cache metadata: the shard's entropy models ({exc})") from None


@functools.lru_cache(maxsize=8)
def _models(packed: bytes) -> coding.Models:
    return coding.Models.unpack(packed)


def shard_checksum(schema: pa.Schema) -> int:
    """What every row of a compact shard holds in ``id_order``: the checksum of its id order (and models)."""
    meta = schema.metadata or {}
    return zlib.crc32(meta.get(ID_ORDER_KEY, b"") + meta.get(coding.CODING_KEY, b""))


def with_id_order(schema: pa.Schema, table: pa.Table) -> pa.Schema:
    """``schema`` (a compact cache's) with the id order of ``table``'s ids (result rows) in its metadata;
    other schemas, and one that has an order already, unchanged."""
    if "id_order" not in schema.names or ID_ORDER_KEY in (schema.metadata or {}):
        return schema
    sources = [c for c in ("topk_ids", "sample_ids") if c in table.column_names]
    ids = np.concatenate([flat_values(combined(table, c)).to_numpy(zero_copy_only=False) for c in sources])
    packed = base64.b64encode(frequency_order(ids))
    return schema.with_metadata({**(schema.metadata or {}), ID_ORDER_KEY: packed})


def id_order_of(schema: pa.Schema) -> tuple[np.ndarray, int]:
    """The id order in a compact shard's metadata and its checksum; ``InputError`` when absent."""
    packed = (schema.metadata or {}).get(ID_ORDER_KEY)
    if packed is None:
        raise InputError(
            "malformed cache rows: topk_id_codes without their shard's id order (read a shard's rows with "
            "its Parquet metadata, one shard at a time)"
        )
    try:
        order = unpack_order(base64.b64decode(packed))
    except (ValueError, zlib.error) as exc:
        raise InputError(f"malformed cache metadata: the shard's id order ({exc})") from None
    return order, zlib.crc32(packed)


def topk_logprobs_of(table: pa.Table) -> np.ndarray:
    """The rows' top-k logprobs as one (positions, k) float32 array, whatever the layout stores.

    ``topk_logprobs`` (lists of any width, or fixed-size) as they are; ``topk_top1`` / ``topk_gaps``
    decoded (``schemas.formats.decode_gaps``). ``InputError`` when the rows are malformed.
    """
    table = uncoded(table)
    if "topk_top1" not in table.column_names:
        return _topk_matrix(combined(table, "topk_logprobs"), "topk_logprobs")[1].astype(np.float32)
    outer = combined(table, "topk_top1")
    top1 = flat_values(outer).to_numpy(zero_copy_only=False)
    if "topk_gaps" in table.column_names:
        n, gaps = _topk_matrix(combined(table, "topk_gaps"), "topk_gaps")
        if not np.array_equal(n, list_lengths(outer)):
            raise InputError("malformed cache rows: topk_gaps does not match topk_top1")
    else:
        gaps = np.empty((len(top1), 0), np.uint8)
    return decode_gaps(top1, gaps)


def _checked_order(table: pa.Table) -> tuple[np.ndarray, int]:
    """The id order of compact rows, checked against every row's ``id_order``."""
    order, _ = id_order_of(table.schema)
    checksum = shard_checksum(table.schema)  # of the order (and, schema 5, the models)
    if (
        "id_order" not in table.column_names
        or (combined(table, "id_order").to_numpy(zero_copy_only=False) != checksum).any()
    ):
        raise InputError("malformed cache rows: rows of a compact shard read with another shard's id order")
    return order, checksum


def topk_ids_of(table: pa.Table, kept: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row lengths and the rows' (positions, k) top-k ids, int64, from ``topk_ids`` or ``topk_id_codes``
    (decoded with ``input_ids``: ``schemas.formats.decode_ids``). ``kept``: the positions that kept their
    targets (``--positions``; the rest read as 0). ``InputError`` when the rows are malformed."""
    table = uncoded(table)
    if "topk_id_codes" not in table.column_names:
        n, ids = _topk_matrix(combined(table, "topk_ids"), "topk_ids")
        return n, ids.astype(np.int64)
    n, codes = _topk_matrix(combined(table, "topk_id_codes"), "topk_id_codes")
    tokens = combined(table, "input_ids")
    if not np.array_equal(list_lengths(tokens), n):
        raise InputError("malformed cache rows: topk_id_codes has not one list per input token")
    order, _ = _checked_order(table)
    flat = flat_values(tokens).to_numpy(zero_copy_only=False)
    if kept is not None:
        codes = np.where(kept[:, None], codes, codes.shape[1] + 1 + order.size)  # dropped: placeholders, id 0
    try:
        ids = decode_topk_ids(codes, next_tokens(flat, n), anchors(flat, n, kept), order)
    except ValueError as exc:
        raise InputError(f"malformed cache rows: {exc}") from None
    return n, ids


def sample_ids_of(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ids drawn at each position (per-position counts, flat int64 ids, ascending within each
    position), from ``sample_ids``, ``sample_id_gaps`` (schema 3) or ``sample_rank_gaps`` (schema 4's compact
    format; its counts and logprobs are stored in rank order: ``sample_order``)."""
    lengths, ids, _ = sample_order(table)
    return lengths, ids


def sample_order(
    table: pa.Table, topk_ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``sample_ids_of``, and where each id's counts and logprobs are stored (``values[perm]`` reads them in
    the ids' order); None when they are stored in that order already. A compact cache with top-k targets
    names the draws among them by ``sample_in_topk``, decoded against the top-k (``topk_ids`` if given)."""
    table = uncoded(table)
    names = table.column_names
    name = next(c for c in ("sample_rank_gaps", "sample_id_gaps", "sample_ids") if c in names)
    inner = combined(table, name).flatten()
    lengths = list_lengths(inner)
    values = flat_values(inner).to_numpy(zero_copy_only=False)
    if name == "sample_ids":
        return lengths, values.astype(np.int64), None
    if name == "sample_id_gaps":
        return lengths, ids_from_gaps(values, lengths), None
    order, _ = _checked_order(table)
    rest = from_ranks(ids_from_gaps(values, lengths), order)
    if "sample_in_topk" not in names:
        if (table.schema.metadata or {}).get(b"teacher_farm.targets") == b"both":
            raise InputError("sample_rank_gaps of a cache with top-k targets read without sample_in_topk")
        named_lengths, named = np.zeros(len(lengths), np.int64), np.empty(0, np.int64)
    else:
        if topk_ids is None:
            topk_ids = topk_ids_of(table)[1]
        mask = flat_values(combined(table, "sample_in_topk")).to_numpy(zero_copy_only=False)
        try:
            named_lengths, named = from_mask(mask, topk_ids)
        except ValueError as exc:
            raise InputError(f"malformed cache rows: {exc}") from None
    # The stored order: each position's named draws, then its ranked ones; the ids' order is ascending.
    P = len(lengths)
    owner = np.concatenate([np.repeat(np.arange(P), named_lengths), np.repeat(np.arange(P), lengths)])
    group = np.concatenate([np.zeros(len(named), bool), np.ones(len(rest), bool)])
    stored_order = np.lexsort((group, owner))
    stored, owner = np.concatenate([named, rest])[stored_order], owner[stored_order]
    perm = np.lexsort((stored, owner))
    return named_lengths + lengths, stored[perm], perm


def decode_rows(table: pa.Table) -> pa.Table:
    """``table`` with every stored encoding undone: float32 ``topk_logprobs`` for ``topk_top1`` /
    ``topk_gaps``, ``sample_ids`` for ``sample_id_gaps``; other layouts as they are. A ``--positions``
    cache's dropped positions stay null."""
    from teacher_farm.schemas.positions import thicken, thin

    table, kept = thicken(uncoded(table))
    if "topk_id_codes" in table.column_names:
        n, ids = topk_ids_of(table, kept)
        column = _fixed(n, ids.shape[1], ids.reshape(-1).astype(np.int32))
        where = table.schema.get_field_index("topk_id_codes")
        table = table.drop_columns(["topk_id_codes"]).add_column(where, "topk_ids", column)
    if "topk_top1" in table.column_names:
        lp = topk_logprobs_of(table)
        n = list_lengths(table.column("topk_top1"))
        column = _list(n, pa.FixedSizeListArray.from_arrays(pa.array(lp.reshape(-1)), lp.shape[1]))
        where = table.schema.get_field_index("topk_top1")
        table = table.drop_columns([c for c in GAP_COLUMNS if c in table.column_names])
        table = table.add_column(where, "topk_logprobs", column)
    for name in ("sample_id_gaps", "sample_rank_gaps"):
        if name in table.column_names:
            lengths, ids, perm = sample_order(table)
            n = list_lengths(table.column(name))
            column = _ragged(n, lengths, ids.astype(np.int32))
            where = table.schema.get_field_index(name)
            table = table.drop_columns([name]).add_column(where, "sample_ids", column)
            for other in ("sample_counts", "sample_logprobs"):
                if perm is not None and other in table.column_names:
                    values = flat_values(combined(table, other))
                    i = table.schema.get_field_index(other)
                    table = table.set_column(
                        i,
                        other,
                        _ragged(n, lengths, values.take(pa.array(perm)).to_numpy(zero_copy_only=False)),
                    )
    table = table.drop_columns([c for c in ("id_order", "sample_in_topk") if c in table.column_names])
    return table if kept is None else thin(table, kept)
