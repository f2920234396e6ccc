"""The one reader of a cache: its shards, their row groups, and cache rows as flat numpy arrays.

Needs numpy and pyarrow only (no torch), so every side uses it: the student's
:class:`~teacher_farm.training.TopkDataset` (which turns the arrays into tensors; ``teacher_farm.training``
re-exports the public names), and the client's ``verify`` and ``inspect --report``. :func:`row_groups`
and :func:`read_rows` read a shard's stored columns (only the row groups needed), :func:`row_group_arrays`
converts them. Every conversion is a whole-array operation over a row group (no loop per token).
Without torch, through Hugging Face ``datasets``, the shards are plain Parquet::

    import datasets
    from teacher_farm.training import shard_paths

    ds = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in shard_paths("cache/")], split="train", streaming=True
    )

gives the raw rows as stored (no ``tail_logprob``; a ``uint8-gap`` cache's ``topk_top1`` /
``topk_gaps`` and ``sample_id_gaps`` still encoded: see ``schemas/formats.py``, or
``teacher_farm.schemas.arrow.decode_rows``); :func:`row_group_arrays` is the numpy conversion the
dataset uses, for any other loader, and reads every format and layout, schema 2's included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from teacher_farm.schemas.arrow import (
    GAP_COLUMNS,
    combined,
    list_lengths,
    offsets,
    sample_order,
    topk_ids_of,
    topk_logprobs_of,
    uncoded,
)
from teacher_farm.schemas.cache_dir import CacheDir
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.positions import thicken
from teacher_farm.schemas.windows import owned_positions, ranges

#: The smallest probability mass ``tail_logprob`` reports: log(TAIL_FLOOR) when the top-k hold
#: (almost) everything, or when float16 rounding makes them sum to a little over 1.
TAIL_FLOOR = 1e-12

#: The columns the dataset reads when a cache has them (``id`` and ``target_ranks`` are left on disk):
#: every format's (``topk_top1``, ``topk_gaps`` and ``sample_id_gaps`` are ``uint8-gap``'s).
COLUMNS = [
    "line",
    "input_ids",
    "topk_ids",
    "id_order",
    "topk_id_codes",
    "topk_logprobs",
    "topk_top1",
    "topk_gaps",
    "target_logprobs",
    "sample_ids",
    "sample_id_gaps",
    "sample_rank_gaps",
    "sample_in_topk",
    "sample_counts",
    "coded",
    "sample_lengths",
    "sample_logprobs",
]

#: Sampled-target arrays: n lists per row, each of the distinct tokens drawn at that position
#: (``sample_logprobs`` only from a cache that stored them: ``teacher-farm cache --sample-logprobs``).
SAMPLE_COLUMNS = ("sample_ids", "sample_counts", "sample_logprobs")


def shard_paths(cache_dir: str | Path) -> list[Path]:
    """The complete shards of a cache, in input line order.

    Only the shards named by ``manifest.json`` count (when a corpus was cached by several client
    processes, the union of every ``manifest*.json`` in the directory): a shard file the manifest
    does not name is unfinished or stray and is ignored. Raises ``InputError`` when the directory
    has no manifest, when a named shard is missing or its size differs from the manifest, or when
    two manifests describe different teachers.
    """
    return CacheDir(cache_dir).shard_paths()


def cache_metadata_of(cache_dir: str | Path) -> dict[str, str]:
    """The teacher-farm metadata of the cache's first shard (model, tokenizer fingerprint, k, ...)."""
    cache = CacheDir(cache_dir)
    paths = cache.shard_paths()
    if not paths:
        raise InputError(f"{cache_dir} has no complete shard yet")
    return cache.shard_metadata(paths[0])


@dataclass(frozen=True)
class RowGroupArrays:
    """The rows of one row group as flat numpy arrays; row r's positions are ``offsets[r]:offsets[r+1]``.

    The top-k arrays are None for a cache of sampled targets only; the sample arrays are None for
    a top-k cache, and ``sample_logprobs`` for a cache that did not store them. Sampled targets are
    ragged per position (``sample_lengths``) and held padded to the row group's widest position S,
    with ids, counts and logprobs 0 in the padding.
    """

    line: np.ndarray  # (rows,) int64; -1 for rows without a line (a teacher's answer)
    offsets: np.ndarray  # (rows + 1,) int64, into the position arrays
    input_ids: np.ndarray  # (P,) int64
    topk_ids: np.ndarray | None  # (P, k) int64
    topk_logprobs: np.ndarray | None  # (P, k) float32 (renormalized over the top-k if asked)
    tail_logprob: np.ndarray | None  # (P,) float32, log of the teacher's mass outside the top-k
    target_logprobs: np.ndarray  # (P - rows,) float32; row r's at target_offsets[r]:target_offsets[r+1]
    target_offsets: np.ndarray  # (rows + 1,) int64
    sample_lengths: np.ndarray | None = None  # (P,) int64, distinct tokens drawn at each position
    sample_ids: np.ndarray | None = None  # (P, S) int64
    sample_counts: np.ndarray | None = None  # (P, S) int16, summing to N per position
    sample_logprobs: np.ndarray | None = None  # (P, S) float32, when the cache stored them
    #: The positions whose targets the cache kept (``--positions``); None: every position.
    kept: np.ndarray | None = None  # (P,) bool
    #: Ranks of the actual next tokens, when asked for (``row_group_arrays(ranks=True)``).
    target_ranks: np.ndarray | None = None  # (P - rows,) int64, at target_offsets like target_logprobs

    @property
    def rows(self) -> int:
        return len(self.line)


def _topk_arrays(
    table: pa.Table, n: np.ndarray, renormalize: bool, kept: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topk_ids, topk_logprobs, tail_logprob) of the rows, (P, k), (P, k), (P,)."""
    id_lengths, topk_ids = topk_ids_of(table, kept)
    if not np.array_equal(id_lengths, n):
        raise InputError("malformed cache rows: topk_ids has not one list per input token")
    positions, k = topk_ids.shape

    lp_column = "topk_top1" if "topk_top1" in table.column_names else "topk_logprobs"
    lp = topk_logprobs_of(table)
    if not np.array_equal(list_lengths(combined(table, lp_column)), n) or lp.shape != (positions, k):
        raise InputError("malformed cache rows: the top-k logprobs do not match topk_ids")
    lp = lp.astype(np.float64)

    if positions and k:
        top = lp.max(axis=1, keepdims=True)
        top = np.where(np.isfinite(top), top, 0.0)
        lse = top[:, 0] + np.log(np.exp(lp - top).sum(axis=1))
        # -expm1(lse) = 1 - (top-k mass), exact even when the top-k hold nearly everything.
        tail = np.log(np.clip(-np.expm1(lse), TAIL_FLOOR, 1.0))
        if renormalize:
            lp = lp - lse[:, None]
    else:
        tail = np.zeros(positions)
    return topk_ids, lp.astype(np.float32), tail.astype(np.float32)


def _sample_arrays(table: pa.Table, n: np.ndarray, topk_ids: np.ndarray | None) -> dict[str, np.ndarray]:
    """The sampled targets of the rows, padded per position to the widest: (P,) and (P, S) each."""
    id_column = next(
        c for c in ("sample_rank_gaps", "sample_id_gaps", "sample_ids") if c in table.column_names
    )
    if not np.array_equal(list_lengths(combined(table, id_column)), n):
        raise InputError(f"malformed cache rows: {id_column} has not one list per input token")
    lengths, ids, perm = sample_order(table, topk_ids)
    P, S = len(lengths), int(lengths.max()) if len(lengths) else 0
    # Where each flat value goes in the (P, S) block, raveled: position * S + slot.
    dest = np.arange(int(lengths.sum())) + np.repeat(np.arange(P) * S - offsets(lengths)[:-1], lengths)
    out: dict[str, np.ndarray] = {"sample_lengths": lengths}
    for name, dtype in (
        ("sample_ids", np.int64),
        ("sample_counts", np.int16),
        ("sample_logprobs", np.float32),
    ):
        if name == "sample_ids":
            values = ids
        elif name not in table.column_names:
            continue  # sample_logprobs, stored only when asked
        else:
            outer = combined(table, name)
            inner = outer.flatten()
            if not np.array_equal(list_lengths(outer), n) or not np.array_equal(list_lengths(inner), lengths):
                raise InputError(f"malformed cache rows: {name} does not match {id_column}")
            values = inner.flatten().to_numpy(zero_copy_only=False)
            if perm is not None:  # stored in the ranks' order (schema 4's compact format)
                values = values[perm]
        block = np.zeros(P * S, dtype=dtype)
        block[dest] = values
        out[name] = block.reshape(P, S)
    return out


def row_group_arrays(table: pa.Table, *, renormalize: bool = False, ranks: bool = False) -> RowGroupArrays:
    """Convert cache rows (one row group, or any cache table) to numpy with whole-array operations.

    Logprobs come back as float32 whatever the stored format (``schemas/formats.py``: within its
    stated error of what the teacher sent), sampled ids as ids. ``tail_logprob`` is
    ``log(1 - sum(exp(topk_logprobs)))`` per position, computed in float64 and floored at
    ``log(TAIL_FLOOR)``. With ``renormalize`` the top-k logprobs are replaced by their log-softmax
    (the teacher restricted to its top-k); ``tail_logprob`` still reports the mass left out.
    Sampled targets, when the table has them, come padded per position (see :class:`RowGroupArrays`).
    A cache written with ``--positions`` gives ``kept``; its dropped positions read as zeros. With
    ``ranks``, ``target_ranks`` too. A table without ``line`` (a teacher's answer) reads as line -1.
    """
    table, kept = thicken(uncoded(table))
    if "line" in table.column_names:
        lines = combined(table, "line").to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        lines = np.full(table.num_rows, -1, np.int64)
    ids = combined(table, "input_ids")
    n = list_lengths(ids)
    input_ids = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    names = set(table.column_names)
    has_topk = bool(names & {"topk_ids", "topk_id_codes"})
    if not has_topk and not names & {"sample_ids", "sample_id_gaps", "sample_rank_gaps"}:
        raise InputError("cache rows with neither top-k (topk_ids) nor sampled (sample_ids) targets")

    topk_ids = topk_logprobs = tail = None
    if has_topk:
        topk_ids, topk_logprobs, tail = _topk_arrays(table, n, renormalize, kept)
    sampled = {"sample_ids", "sample_id_gaps", "sample_rank_gaps"}
    samples = _sample_arrays(table, n, topk_ids) if names & sampled else {}

    targets = combined(table, "target_logprobs")
    tn = list_lengths(targets)
    if not np.array_equal(tn, np.maximum(n - 1, 0)):
        raise InputError("malformed cache rows: target_logprobs must hold len(input_ids) - 1 values")
    target_logprobs = targets.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    target_ranks = None
    if ranks:
        column = combined(table, "target_ranks")
        if not np.array_equal(list_lengths(column), tn):
            raise InputError("malformed cache rows: target_ranks does not match target_logprobs")
        target_ranks = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    return RowGroupArrays(
        line=lines,
        offsets=offsets(n),
        input_ids=input_ids,
        topk_ids=topk_ids,
        topk_logprobs=topk_logprobs,
        tail_logprob=tail,
        target_logprobs=target_logprobs,
        target_offsets=offsets(tn),
        kept=kept,
        target_ranks=target_ranks,
        **samples,
    )


def join_windows(a: RowGroupArrays, offset: np.ndarray) -> RowGroupArrays:
    """One non-overlapping stream per line from a window-mode cache's rows (``offset`` per row).

    Each position is taken from the earliest window that holds it, where it has the most context:
    window 0 gives positions [0, L), every later window its positions past the end of the one
    before (its last S tokens). ``target_logprobs[p]`` (of token p+1) comes from the earliest window
    holding both p and p+1: the same window except at the last position of a window that is not
    the line's last, which takes it from the next window. Lines that were not split pass unchanged.
    Rows of one line must be consecutive (as the cache writes them: a line's windows never span
    row groups).
    """
    offset = np.asarray(offset, np.int64)
    if a.rows == 0 or not offset.any():
        return a
    n = np.diff(a.offsets)
    tn = np.diff(a.target_offsets)
    first = np.flatnonzero(offset == 0)
    if len(first) == 0 or first[0] != 0:
        raise InputError(
            "cannot join windows: a row group starts inside a line (its first row has offset > 0)"
        )
    try:
        pos_lo, target_lo = owned_positions(offset, n)
    except ValueError as exc:
        raise InputError(f"cannot join windows: {exc}") from exc
    take = ranges(a.offsets[:-1] + pos_lo, a.offsets[1:])
    take_t = ranges(a.target_offsets[:-1] + np.minimum(target_lo, tn), a.target_offsets[1:])
    lengths = np.add.reduceat(n - pos_lo, first)
    per_position = {
        name: None if getattr(a, name) is None else getattr(a, name)[take]
        for name in (
            "topk_ids",
            "topk_logprobs",
            "tail_logprob",
            "sample_lengths",
            "sample_ids",
            "sample_counts",
            "sample_logprobs",
            "kept",
        )
    }
    return RowGroupArrays(
        line=a.line[first],
        offsets=offsets(lengths),
        input_ids=a.input_ids[take],
        **per_position,
        target_logprobs=a.target_logprobs[take_t],
        target_offsets=offsets(np.maximum(lengths - 1, 0)),
        target_ranks=None if a.target_ranks is None else a.target_ranks[take_t],
    )


def stored_columns(columns: Sequence[str], names: Sequence[str]) -> list[str]:
    """The columns of a shard (``names``) that hold ``columns`` in its layout: ``topk_top1`` / ``topk_gaps``
    for ``topk_logprobs``, ``sample_id_gaps`` for ``sample_ids`` and ``topk_id_codes`` (and ``input_ids``,
    which decodes them) for ``topk_ids`` in a ``uint8-gap`` cache; absent ones left out."""
    out: list[str] = []
    if (
        "coded" in names
    ):  # schema 5: one blob a row decodes the top-k with input_ids, the draws with their lengths
        needs = {
            "topk_ids": ["id_order", "coded", "topk_top1", "input_ids"],
            "topk_logprobs": ["id_order", "coded", "topk_top1"],
            "sample_ids": ["id_order", "coded", "topk_top1", "input_ids", "sample_lengths"],
            "sample_counts": ["id_order", "coded", "topk_top1", "input_ids", "sample_lengths"],
            "sample_logprobs": [
                "sample_logprobs",
                "id_order",
                "coded",
                "topk_top1",
                "input_ids",
                "sample_lengths",
            ],
            # A target whose token is among the top-k reads its rank and logprob there (BY_SLOT).
            "target_ranks": ["target_ranks", "id_order", "coded", "topk_top1", "input_ids", "sample_lengths"],
            "target_logprobs": [
                *(
                    "target_logprobs",
                    "target_ranks",
                    "id_order",
                    "coded",
                    "topk_top1",
                    "input_ids",
                    "sample_lengths",
                )
            ],
        }
        for c in columns:
            for x in needs.get(c, [c]):
                if x in names and x not in out:
                    out.append(x)
        return out
    for c in columns:
        if c == "topk_ids" and c not in names and "topk_id_codes" in names:
            out += ["id_order", "topk_id_codes"] + ([] if "input_ids" in columns else ["input_ids"])
        elif c == "topk_logprobs" and c not in names and GAP_COLUMNS[0] in names:
            out += [g for g in GAP_COLUMNS if g in names]
        elif c == "sample_ids" and c not in names and "sample_id_gaps" in names:
            out.append("sample_id_gaps")
        elif c == "sample_ids" and c not in names and "sample_rank_gaps" in names:
            # What decodes them: the id order and, in a cache with top-k targets, the top-k and the mask.
            needed = ["id_order", "sample_rank_gaps", "sample_in_topk", "topk_id_codes", "input_ids"]
            out += [x for x in needed if x in names and x not in out and x not in columns]
        elif c in names:
            out.append(c)
    return out


def row_groups(path: Path, columns: Sequence[str]) -> Iterator[pa.Table]:
    """A shard's row groups in order, each read with only the stored columns that hold ``columns``."""
    pf = pq.ParquetFile(path)
    present = stored_columns(columns, pf.schema_arrow.names)
    for rg in range(pf.num_row_groups):
        yield pf.read_row_group(rg, columns=present)


def read_rows(path: Path, rows: np.ndarray, columns: Sequence[str]) -> tuple[pa.Table, list[str]]:
    """The given rows of a shard (sorted), read from only the row groups that hold them, in the stored
    layout (``row_group_arrays`` reads it); and the problems found (rows the file does not hold)."""
    pf = pq.ParquetFile(path)
    present = stored_columns(columns, pf.schema_arrow.names)
    meta = pf.metadata
    problems = []
    if (missing := rows[rows >= meta.num_rows]).size:
        problems.append(
            f"{meta.num_rows} rows in the file, fewer than the manifest says; rows {missing[:5].tolist()} "
            "absent"
        )
        rows = rows[rows < meta.num_rows]
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    group_starts = offsets(np.array(sizes, dtype=np.int64))
    groups = np.searchsorted(group_starts, rows, side="right") - 1
    parts = [
        pf.read_row_group(int(g), columns=present).take(pa.array(rows[groups == g] - group_starts[g]))
        for g in np.unique(groups)
    ]
    return (pa.concat_tables(parts) if parts else pf.schema_arrow.empty_table().select(present)), problems
