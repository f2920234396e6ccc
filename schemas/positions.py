"""Targets kept at some positions only (``--positions entropy:F`` or ``assistant``): null where dropped.

A position whose targets a rule drops keeps its row slot, so every per-position column still holds
one entry per input token, but its top-k and sampled lists are null there: Parquet then stores no
value for it, only the null. ``target_logprobs`` and ``target_ranks`` stay at every position. The
reader turns the nulls into a mask (``kept``), and the losses average over the kept positions.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from teacher_farm.schemas.arrow import list_lengths, offsets, whole

#: The per-position target columns a rule thins out (on the wire and in every stored format).
THINNED_COLUMNS = (
    "topk_ids",
    "topk_id_codes",
    "topk_logprobs",
    "topk_top1",
    "topk_gaps",
    "sample_ids",
    "sample_id_gaps",
    "sample_rank_gaps",
    "sample_in_topk",
    "sample_counts",
    "sample_lengths",
    "sample_logprobs",
)


def _positions(column: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """A per-position column (one list per row) and its entries, one per position of every row."""
    outer = whole(column)
    return outer, outer.flatten()


def _rewrap(outer: pa.Array, inner: pa.Array) -> pa.Array:
    cut = pa.array(outer.offsets.to_numpy() - outer.offsets[0].as_py())
    return pa.ListArray.from_arrays(cut, inner, type=pa.list_(inner.type))


def kept_mask(column: pa.Array | pa.ChunkedArray) -> npt.NDArray[np.bool_]:
    """(P,) bool over every position of the rows: where a per-position target column holds an entry."""
    kept: npt.NDArray[np.bool_] = _positions(column)[1].is_valid().to_numpy(zero_copy_only=False)
    return kept


def _thin_lists(inner: pa.ListArray, kept: np.ndarray) -> pa.ListArray:
    """Variable lists, one per position, null where not ``kept`` and with no values there."""
    lengths = list_lengths(inner)
    cut = offsets(np.where(kept, lengths, 0), np.int32)
    values = inner.flatten().filter(pa.array(np.repeat(kept, lengths)))
    return pa.ListArray.from_arrays(pa.array(cut), values, type=inner.type, mask=pa.array(~kept))


def thin(table: pa.Table, kept: np.ndarray) -> pa.Table:
    """``table`` (result or cache rows, any stored layout) with targets only at the positions ``kept``.

    ``kept`` is (P,) bool over every position of every row. Variable lists drop their values where a
    position is not kept; fixed-size lists and scalars keep placeholders under the null, which
    Parquet does not store.
    """
    for name in THINNED_COLUMNS:
        if name not in table.column_names:
            continue
        outer, inner = _positions(table.column(name))
        if pa.types.is_fixed_size_list(inner.type):
            new = pa.FixedSizeListArray.from_arrays(inner.flatten(), type=inner.type, mask=pa.array(~kept))
        elif pa.types.is_list(inner.type):
            new = _thin_lists(inner, kept)
        else:
            new = pc.if_else(pa.array(kept), inner, pa.nulls(len(inner), inner.type))
        i = table.column_names.index(name)
        table = table.set_column(i, table.schema.field(i), _rewrap(outer, new))
    return table


def thicken(table: pa.Table) -> tuple[pa.Table, np.ndarray | None]:
    """``table`` with every dropped position filled (zeros of the row's width, empty draws), and the mask
    of kept positions; ``(table, None)`` when every position kept its targets."""
    present = [name for name in THINNED_COLUMNS if name in table.column_names]
    if not present:
        return table, None
    kept = kept_mask(table.column(present[0]))
    if kept.all():
        return table, None
    for name in present:
        outer, inner = _positions(table.column(name))
        if pa.types.is_fixed_size_list(inner.type):
            width = inner.type.list_size
            dense = np.zeros((len(inner), width), dtype=inner.type.value_type.to_pandas_dtype())
            dense[kept] = inner.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            new = pa.FixedSizeListArray.from_arrays(pa.array(dense.reshape(-1), inner.type.value_type), width)
        elif pa.types.is_list(inner.type):
            lengths = list_lengths(inner)
            values = inner.flatten()
            # Top-k lists have one width: a dropped position gets that many zeros; draws get none.
            width = int(lengths[kept].max()) if name.startswith("topk") and kept.any() else 0
            if width and (lengths[kept] != width).any():
                raise ValueError(f"{name}: top-k lists of different lengths")
            fill = np.where(kept, lengths, width)
            dense = np.zeros(int(fill.sum()), dtype=values.type.to_pandas_dtype())
            where = np.repeat(kept, fill)
            dense[where] = values.to_numpy(zero_copy_only=False)
            new = pa.ListArray.from_arrays(pa.array(offsets(fill, np.int32)), pa.array(dense, values.type))
        else:
            new = inner.fill_null(0)
        i = table.column_names.index(name)
        table = table.set_column(i, pa.field(name, pa.list_(new.type)), _rewrap(outer, new))
    return table, kept
