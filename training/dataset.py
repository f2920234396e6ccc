"""The student's dataset: one dict of tensors per cached sequence, streamed a Parquet row group at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info

from teacher_farm.schemas.cache_dir import CacheDir
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.reader import (
    COLUMNS,
    SAMPLE_COLUMNS,
    RowGroupArrays,
    join_windows,
    row_group_arrays,
)


def _units(paths: Sequence[Path]) -> tuple[list[tuple[int, int]], np.ndarray]:
    """(shard index into ``paths``, row group) for every non-empty row group, in line order; and its rows."""
    units, rows = [], []
    for i, path in enumerate(paths):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                units.append((i, rg))
                rows.append(n)
    return units, np.array(rows, dtype=np.int64)


def _line_starts(paths: Sequence[Path], units: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    """For each unit, the rows where a line starts (``offset`` 0): a window cache's lines, to deal whole."""
    starts, current = [], -1
    pf: Any = None  # the open shard's pq.ParquetFile
    for shard, rg in units:
        if shard != current:
            current, pf = shard, pq.ParquetFile(paths[shard])
        offset = pf.read_row_group(rg, columns=["offset"]).column("offset").to_numpy()
        if offset[0] != 0:
            raise InputError(
                f"cannot join windows: row group {rg} of {paths[shard].name} starts inside a line "
                "(its first row has offset > 0)"
            )
        starts.append(np.flatnonzero(offset == 0))
    return starts


def _per_rank(total: int, world_size: int, drop_last: bool) -> int:
    return total // world_size if drop_last else -(-total // world_size)


def reader_share(
    sizes: np.ndarray,
    order: np.ndarray,
    rank: int,
    world_size: int,
    worker: int = 0,
    workers: int = 1,
    drop_last: bool = False,
) -> list[tuple[int, int, int]]:
    """The items one reader yields in an epoch: ``(unit, first, end)`` spans, in the epoch's order.

    ``sizes[u]`` is the number of items (rows, or lines) of unit ``u``; ``order`` the epoch's order
    of the units. Every rank gets the same number of items, a contiguous run of that order: the
    total divided by ``world_size``, rounded up and padded with the epoch's first items (or, with
    ``drop_last``, rounded down and the last items left out). A rank's run is split over its
    ``workers`` in contiguous parts whose sizes differ by at most one.
    """
    sizes = np.asarray(sizes, np.int64)[order]
    total = int(sizes.sum())
    per_rank = _per_rank(total, world_size, drop_last)
    lo = rank * per_rank + per_rank * worker // workers
    hi = rank * per_rank + per_rank * (worker + 1) // workers
    ends = np.cumsum(sizes)
    starts = ends - sizes
    spans = []
    while lo < hi:  # past the end, the padding wraps around to the epoch's first items
        a = lo % total
        b = min(a + hi - lo, total)
        for j in range(
            int(np.searchsorted(ends, a, side="right")), int(np.searchsorted(starts, b, side="left"))
        ):
            spans.append(
                (int(order[j]), int(max(a, starts[j]) - starts[j]), int(min(b, ends[j]) - starts[j]))
            )
        lo += b - a
    return spans


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): the ones given, else ``torch.distributed``'s when initialized, else (0, 1)."""
    import torch.distributed as dist

    if rank is None and world_size is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return rank, world_size


class TopkDataset(IterableDataset):
    """One dict of tensors per cached sequence, streamed one Parquet row group at a time.

    Each item: ``input_ids`` (n,) long, ``topk_ids`` (n, k) long, ``topk_logprobs`` (n, k)
    float32, ``tail_logprob`` (n,) float32 (log of the teacher's mass outside its top-k),
    ``target_logprobs`` (n - 1,) float32, ``line`` (a 0-d long: the input line number),
    ``source`` (a str: the input file of that line, when the cache records it) and
    ``temperature`` (a 0-d float32: the cache's). With ``renormalize`` the top-k logprobs are
    log-softmaxed over the top-k. A cache with sampled targets adds ``sample_ids`` (n, S) long,
    ``sample_counts`` (n, S) int16 and ``sample_logprobs`` (n, S) float32, S the widest position
    of the sequence, padded with 0 (count 0 marks padding); a cache of sampled targets only
    has no top-k keys.

    Every distributed rank (``torch.distributed``'s, read when the dataset is made, or else when it is
    iterated; or ``rank``/``world_size`` given here) yields the same number of sequences per epoch, so a loop
    that runs a collective every step never waits on a rank that has run out: the epoch's rows are split into
    equal contiguous shares, the total rounded up and padded by repeating the epoch's first rows (with
    ``drop_last``, rounded down and the epoch's last rows left out, fewer than ``world_size``).
    A rank's share is split again over its DataLoader workers (``get_worker_info``), and a
    reader reads only the row groups that hold its rows. ``shuffle_shards`` shuffles the row
    group order, the same on every reader, from ``seed`` and the epoch set with
    :meth:`set_epoch` (not with ``persistent_workers``, whose workers keep their own copy).
    ``max_length`` truncates longer sequences.
    ``join_windows`` turns the windows of a line cached with ``--long-lines window`` into one
    stream per line, each position from the window where it has the most context
    (:func:`join_windows`); without it every window is an item of its own. In that mode the
    shares are counted in lines, and a line's windows are always read together.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        renormalize: bool = False,
        shuffle_shards: bool = False,
        seed: int = 0,
        max_length: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        join_windows: bool = False,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        if max_length is not None and max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.cache_dir = Path(cache_dir)
        cache = CacheDir(self.cache_dir)
        self.paths = cache.shard_paths()
        self.units, rows = _units(self.paths)
        self.num_rows = int(rows.sum())
        # Join mode deals whole lines: the rows where each line starts, per row group.
        self._line_starts = _line_starts(self.paths, self.units) if join_windows else None
        #: What the shares are counted in, per row group: rows, or lines with ``join_windows``.
        self.unit_sizes = (
            rows if self._line_starts is None else np.array([len(x) for x in self._line_starts], np.int64)
        )
        _check_shards_agree(cache, self.paths)
        #: The first shard's metadata as stored, for people.
        self.metadata = cache.shard_metadata(self.paths[0]) if self.paths else {}
        #: The cache's identity (its teacher and ``Scoring``), as its manifests state it.
        self.identity = cache.identity
        self.temperature = self.identity.scoring.temperature
        self.targets = self.identity.scoring.targets
        present = set(pq.read_schema(self.paths[0]).names) if self.paths else set(COLUMNS)
        self.columns = [c for c in COLUMNS if c in present]
        if "coded" in present:  # schema 5: a target among the top-k is read from there, by its rank
            self.columns.append("target_ranks")
        self.renormalize = renormalize
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.max_length = max_length
        if rank is None and world_size is None:
            import torch.distributed as dist

            # Read here, in the rank's own process: a spawned DataLoader worker has no process group.
            if dist.is_available() and dist.is_initialized():
                rank, world_size = dist.get_rank(), dist.get_world_size()
        self.rank, self.world_size = rank, world_size
        self.join_windows = join_windows
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle of the coming epoch (with ``shuffle_shards``)."""
        self.epoch = epoch

    def sequences_per_rank(self) -> int:
        """How many sequences every rank yields per epoch (over all of its DataLoader workers)."""
        _, world = rank_and_world(self.rank, self.world_size)
        return _per_rank(int(self.unit_sizes.sum()), world, self.drop_last)

    def my_share(self) -> list[tuple[int, int, int, int]]:
        """What this reader streams this epoch: ``(shard, row group, first, end)`` row ranges
        (line ranges with ``join_windows``), in the epoch's order."""
        return [(*self.units[u], first, end) for u, first, end in self._spans()]

    def _spans(self) -> list[tuple[int, int, int]]:
        order = np.arange(len(self.units))
        if self.shuffle_shards:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = rank_and_world(self.rank, self.world_size)
        return reader_share(self.unit_sizes, order, rank, world, worker, workers, self.drop_last)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        current = -1
        pf: Any = None  # the open shard's pq.ParquetFile
        columns = self.columns + ["offset"] if self.join_windows else self.columns
        for unit, first, end in self._spans():
            shard, rg = self.units[unit]
            if shard != current:
                current, pf = shard, pq.ParquetFile(self.paths[shard])
            has_source = "source" in pf.schema_arrow.names
            table = pf.read_row_group(rg, columns=columns + (["source"] if has_source else []))
            if self._line_starts is not None:  # lines to rows: a line runs to the next line's start
                starts = self._line_starts[unit]
                first, end = int(starts[first]), int(starts[end]) if end < len(starts) else table.num_rows
            if end - first < table.num_rows:
                table = table.slice(first, end - first)
            arrays = row_group_arrays(table, renormalize=self.renormalize)
            source = table.column("source").to_pylist() if has_source else None
            if self.join_windows:
                offset = table.column("offset").to_numpy()
                arrays = join_windows(arrays, offset)
                source = None if source is None else [source[i] for i in np.flatnonzero(offset == 0)]
            yield from sequence_items(arrays, self.max_length, self.temperature, source)


def _check_shards_agree(cache: CacheDir, paths: Sequence[Path]) -> None:
    """Refuse shards whose own metadata states targets of another kind than the first shard's."""
    if not paths:
        return
    first = cache.shard_identity(paths[0]).cache.scoring
    for path in paths[1:]:
        scoring = cache.shard_identity(path).cache.scoring
        for key in ("temperature", "targets", "k", "draws"):
            if getattr(scoring, key) != getattr(first, key):
                raise InputError(
                    f"{path.name} was cached with {key}={getattr(scoring, key)} and {paths[0].name} with "
                    f"{key}={getattr(first, key)}: one dataset must hold targets of one kind"
                )


def sequence_items(
    a: RowGroupArrays,
    max_length: int | None,
    temperature: float = 1.0,
    source: Sequence[str | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Slice a converted row group into per-sequence tensors (one loop step per row, none per token).

    ``source``, one per row of ``a``, gives each item its input file (a str, not a tensor).
    """
    import torch

    arrays = {
        "input_ids": a.input_ids,
        "topk_ids": a.topk_ids,
        "topk_logprobs": a.topk_logprobs,
        "tail_logprob": a.tail_logprob,
        "kept": a.kept,
    }
    per_position = {k: torch.from_numpy(v) for k, v in arrays.items() if v is not None}
    samples = {k: torch.from_numpy(getattr(a, k)) for k in SAMPLE_COLUMNS if getattr(a, k) is not None}
    targets = torch.from_numpy(a.target_logprobs)
    temp = torch.tensor(temperature, dtype=torch.float32)
    for r in range(a.rows):
        start, end = int(a.offsets[r]), int(a.offsets[r + 1])
        if end == start:
            continue
        if max_length is not None:
            end = min(end, start + max_length)
        t0 = int(a.target_offsets[r])
        # clone: an item must not keep the whole row group's storage alive (or ship it between processes)
        item: dict[str, Any] = {k: v[start:end].clone() for k, v in per_position.items()}
        if samples:
            assert a.sample_lengths is not None  # with the sample columns
            width = int(a.sample_lengths[start:end].max())
            item.update({k: v[start:end, :width].clone() for k, v in samples.items()})
        item["target_logprobs"] = targets[t0 : t0 + end - start - 1].clone()
        item["line"] = torch.tensor(int(a.line[r]))
        item["temperature"] = temp.clone()
        if source is not None:
            item["source"] = source[r]
        yield item
