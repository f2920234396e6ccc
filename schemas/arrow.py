"""The cache's Arrow schema, and building it from numpy arrays without a loop per token.

One row per scored sequence. With ``n = len(input_ids)``:

- ``topk_ids`` / ``topk_logprobs``: n lists of k, position i = the teacher's k most likely next
  tokens after reading ``input_ids[0..i]``, most likely first;
- ``target_logprobs`` / ``target_ranks``: n-1 values, the logprob and rank (1 = argmax) of
  ``input_ids[i+1]`` at position i;
- with sampled targets: ``sample_ids`` / ``sample_counts`` / ``sample_logprobs``, n lists each, the
  distinct tokens among N draws from the teacher at position i, how often each was drawn (summing
  to N) and their logprobs. ``targets="sampled"`` leaves the top-k columns out.

Logprobs are those of ``softmax(logits / T)`` at the cache's temperature T.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


LOGPROB_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

#: What a cache stores per position: the top-k, tokens sampled from the teacher, or both.
TARGET_KINDS = ("topk", "sampled", "both")

#: Columns that hold logprobs (cast together to the cache's logprob dtype).
LOGPROB_COLUMNS = ("topk_logprobs", "target_logprobs", "sample_logprobs")



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
SOURCE_FIELDS = [pa.field("line", pa.int64()), pa.field("source", pa.string()), pa.field("offset", pa.int64())]


def cache_schema(logprob_dtype: str = "float32", targets: str = "topk") -> pa.Schema:
    """Schema of one cache row: ``id``, ``line``, ``source``, ``offset``, then the result columns."""
    fields = list(result_schema(logprob_dtype, targets))
    return pa.schema([fields[0], *SOURCE_FIELDS, *fields[1:]])


def with_source_columns(
    table: pa.Table, line: Sequence[int] | np.ndarray, source: Sequence[str | None] | pa.Array | None = None,
    offset: Sequence[int] | np.ndarray | None = None,
) -> pa.Table:
    """A result table with the client-side columns ``line``, ``source`` and ``offset`` after ``id``."""
    n = table.num_rows
    columns = [
        pa.array(line, type=pa.int64()),
        source if isinstance(source, pa.Array) else pa.array([None] * n if source is None else source, type=pa.string()),
        pa.array(np.zeros(n, np.int64) if offset is None else offset, type=pa.int64()),
    ]
    for i, (f, col) in enumerate(zip(SOURCE_FIELDS, columns)):
        table = table.add_column(1 + i, f, col)
    return table


def offsets(lengths: np.ndarray, dtype: type = np.int64) -> np.ndarray:
    """List offsets from list lengths: ``[0, l0, l0 + l1, ...]``."""
    out = np.zeros(len(lengths) + 1, dtype=dtype)
    np.cumsum(lengths, out=out[1:])
    return out


def _list(lengths: np.ndarray, values: pa.Array) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets(lengths, np.int32)), values)


def _nested(lengths: np.ndarray, k: int, flat: np.ndarray) -> pa.Array:
    inner_offsets = pa.array(np.arange(0, flat.size + 1, k, dtype=np.int32))
    return _list(lengths, pa.ListArray.from_arrays(inner_offsets, pa.array(flat)))


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
        return np.concatenate([getattr(r, name).reshape(-1) for r in results]).astype(dtype, copy=False)

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
        from teacher_farm.schemas.positions import keep_positions

        kept = np.concatenate([np.ones(len(r.input_ids), bool) if r.selected is None else r.selected for r in results])
        table = keep_positions(table, kept)
    return table


def table_to_results(table: pa.Table) -> list[ScoredSequence]:
    """Split a result table back into per-sequence numpy arrays (for tests and verification)."""
    out = []
    for row in range(table.num_rows):
        t = table.slice(row, 1)

        def flat(name: str) -> np.ndarray:
            arr = t.column(name).combine_chunks()
            values = arr.flatten()
            while pa.types.is_list(values.type):
                values = values.flatten()
            return values.to_numpy(zero_copy_only=False)

        n = len(flat("input_ids"))
        has_topk = "topk_ids" in t.column_names
        samples = {}
        if "sample_ids" in t.column_names:
            samples = {
                "sample_lengths": pc.list_value_length(t.column("sample_ids").combine_chunks().flatten())
                .to_numpy(zero_copy_only=False).astype(np.int32),
                "sample_ids": flat("sample_ids"),
                "sample_counts": flat("sample_counts"),
                "sample_logprobs": flat("sample_logprobs").astype(np.float32),
            }
        out.append(
            ScoredSequence(
                id=t.column("id")[0].as_py(),
                input_ids=flat("input_ids"),
                topk_ids=flat("topk_ids").reshape(n, -1) if has_topk else np.empty((n, 0), np.int32),
                topk_logprobs=flat("topk_logprobs").astype(np.float32).reshape(n, -1)
                if has_topk else np.empty((n, 0), np.float32),
                target_logprobs=flat("target_logprobs").astype(np.float32),
                target_ranks=flat("target_ranks"),
                **samples,
            )
        )
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
