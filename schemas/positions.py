"""Targets kept at some positions only (``--positions entropy:F`` or ``assistant``): null where dropped.

A position whose targets a rule drops keeps its row slot, so every per-position column still holds
one entry per input token, but its top-k and sampled lists are null there: Parquet then stores no
value for it, only the null. ``target_logprobs`` and ``target_ranks`` stay at every position. The
reader turns the nulls into a mask (``kept``), and the losses average over the kept positions.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: The per-position target columns a rule thins out.
THINNED_COLUMNS = ("topk_ids", "topk_logprobs", "sample_ids", "sample_counts", "sample_logprobs")


def _keep(column: pa.Array, kept: np.ndarray) -> pa.Array:
    """A list<list<...>> column with the inner lists at positions not ``kept`` made null (values dropped)."""
    outer = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    inner = outer.flatten()
    lengths = pc.list_value_length(inner).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = inner.flatten()
    keep_values = np.repeat(kept, lengths)
    new_lengths = np.where(kept, lengths, 0)
    inner_offsets = np.zeros(len(new_lengths) + 1, dtype=np.int32)
    np.cumsum(new_lengths, out=inner_offsets[1:])
    thinned = pa.ListArray.from_arrays(
        pa.array(inner_offsets), values.filter(pa.array(keep_values)), type=inner.type, mask=pa.array(~kept),
    )
    return pa.ListArray.from_arrays(outer.offsets, thinned, type=outer.type)


def keep_positions(table: pa.Table, kept: np.ndarray) -> pa.Table:
    """``table`` (result or cache rows) with targets only at the positions ``kept`` ((P,) bool over all rows)."""
    for name in THINNED_COLUMNS:
        if name in table.column_names:
            i = table.column_names.index(name)
            table = table.set_column(i, table.schema.field(i), _keep(table.column(name), kept))
    return table


def kept_mask(column: pa.Array) -> np.ndarray:
    """(P,) bool over every position of the rows: where a per-position target column holds a list."""
    outer = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return outer.flatten().is_valid().to_numpy(zero_copy_only=False)
