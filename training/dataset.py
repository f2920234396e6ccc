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
from teacher_farm.training.reader import COLUMNS, SAMPLE_COLUMNS, RowGroupArrays, join_windows, row_group_arrays


def _units(paths: Sequence[Path]) -> tuple[list[tuple[int, int]], int]:
    """(shard index into ``paths``, row group) for every non-empty row group, in line order; and the rows."""
    units, rows = [], 0
    for i, path in enumerate(paths):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            n = meta.row_group(rg).num_rows
            if n:
                units.append((i, rg))
                rows += n
    return units, rows


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
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

    The row groups of the shards are dealt round-robin to every reader: the DataLoader workers
    (``get_worker_info``) of every distributed rank (``torch.distributed`` when initialized, or
    ``rank``/``world_size`` given here), so each row is read exactly once per epoch. Ranks may
    get a few sequences more or less than each other: cap the steps per epoch when a collective
    must not wait. ``shuffle_shards`` shuffles the row group order, the same on every reader,
    from ``seed`` and the epoch set with :meth:`set_epoch` (not with ``persistent_workers``,
    whose workers keep their own copy). ``max_length`` truncates longer sequences.
    ``join_windows`` turns the windows of a line cached with ``--long-lines window`` into one
    stream per line, each position from the window where it has the most context
    (:func:`join_windows`); without it every window is an item of its own.
    """

    def __init__(
        self, cache_dir: str | Path, *, renormalize: bool = False, shuffle_shards: bool = False,
        seed: int = 0, max_length: int | None = None,
        rank: int | None = None, world_size: int | None = None, join_windows: bool = False,
    ) -> None:
        super().__init__()
        if max_length is not None and max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.cache_dir = Path(cache_dir)
        cache = CacheDir(self.cache_dir)
        self.paths = cache.shard_paths()
        self.units, self.num_rows = _units(self.paths)
        self.metadata = _shared_metadata(cache, self.paths)
        #: The cache's identity (its teacher and ``Scoring``), as its manifests state it.
        self.identity = cache.identity
        self.temperature = self.identity.scoring.temperature
        self.targets = self.identity.scoring.targets
        present = set(pq.read_schema(self.paths[0]).names) if self.paths else set(COLUMNS)
        self.columns = [c for c in COLUMNS if c in present]
        self.renormalize = renormalize
        self.shuffle_shards = shuffle_shards
        self.seed = seed
        self.max_length = max_length
        self.rank, self.world_size = rank, world_size
        self.join_windows = join_windows
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Pick the shuffle of the coming epoch (with ``shuffle_shards``)."""
        self.epoch = epoch

    def my_units(self) -> list[tuple[int, int]]:
        """The (shard, row group) pairs this reader streams this epoch."""
        order = np.arange(len(self.units))
        if self.shuffle_shards:
            np.random.default_rng([self.seed, self.epoch]).shuffle(order)
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = _rank_and_world(self.rank, self.world_size)
        me, readers = rank * workers + worker, world * workers
        return [self.units[i] for i in order[me::readers]]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        current, pf = -1, None
        for shard, rg in self.my_units():
            if shard != current:
                current, pf = shard, pq.ParquetFile(self.paths[shard])
            columns = self.columns + ["offset"] if self.join_windows else self.columns
            has_source = "source" in pf.schema_arrow.names
            table = pf.read_row_group(rg, columns=columns + (["source"] if has_source else []))
            arrays = row_group_arrays(table, renormalize=self.renormalize)
            source = table.column("source").to_pylist() if has_source else None
            if self.join_windows:
                offset = table.column("offset").to_numpy()
                arrays = join_windows(arrays, offset)
                source = None if source is None else [source[i] for i in np.flatnonzero(offset == 0)]
            yield from sequence_items(arrays, self.max_length, self.temperature, source)



def _shared_metadata(cache: CacheDir, paths: Sequence[Path]) -> dict[str, str]:
    """The first shard's metadata, after checking every shard was scored the same way."""
    if not paths:
        return {}
    first = cache.shard_metadata(paths[0])
    for path in paths[1:]:
        meta = cache.shard_metadata(path)
        for key in ("temperature", "targets", "k", "samples"):
            if meta.get(key) != first.get(key):
                raise InputError(
                    f"{path.name} was cached with {key}={meta.get(key)} and {paths[0].name} with "
                    f"{key}={first.get(key)}: one dataset must hold targets of one kind"
                )
    return first


def sequence_items(
    a: RowGroupArrays, max_length: int | None, temperature: float = 1.0, source: Sequence[str | None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Slice a converted row group into per-sequence tensors (one loop step per row, none per token).

    ``source``, one per row of ``a``, gives each item its input file (a str, not a tensor).
    """
    import torch

    per_position = {"input_ids": a.input_ids, "topk_ids": a.topk_ids, "topk_logprobs": a.topk_logprobs,
                    "tail_logprob": a.tail_logprob}
    per_position = {k: torch.from_numpy(v) for k, v in per_position.items() if v is not None}
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
        item = {k: v[start:end].clone() for k, v in per_position.items()}
        if samples:
            width = int(a.sample_lengths[start:end].max())
            item.update({k: v[start:end, :width].clone() for k, v in samples.items()})
        item["target_logprobs"] = targets[t0:t0 + end - start - 1].clone()
        item["line"] = torch.tensor(int(a.line[r]))
        item["temperature"] = temp.clone()
        if source is not None:
            item["source"] = source[r]
        yield item
