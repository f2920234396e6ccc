"""The training side: stream a teacher-farm cache into a student's PyTorch trainer.

A cache directory holds ``manifest.json`` (or ``manifest*.json`` files, one per client process when
a corpus was split across several) and the Parquet shards it names. This module reads them without
ever loading the whole cache, one row group at a time, and turns every row into tensors with numpy
operations over the whole row group (no loop per token)::

    from torch.utils.data import DataLoader
    from teacher_farm.training import TopkDataset, collate_topk, kd_loss

    ds = TopkDataset("cache/", shuffle_shards=True, seed=0, max_length=2048)
    loader = DataLoader(ds, batch_size=8, num_workers=4, collate_fn=collate_topk)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = kd_loss(logits, batch)

**Losses and online targets.** One loss class per formula lives in ``client/losses.py`` (top-k
KL with the tail term, top-k renormalised, sampled targets; a chunked wrapper), all at the cache's
temperature; ``client/online.py``'s :class:`OnlineTeacher` yields the same batches as this module's
dataset and collate function, with the targets fetched from running servers. Both are served from
here (and from ``teacher_farm.training``) on first access.

**Same tokenizer.** The cache stores the teacher's token ids: ``input_ids`` as the teacher tokenized
each line, and the top-k as ids of the teacher's vocabulary. Distilling on top-k ids is only
meaningful when the student uses the very same tokenizer (same vocabulary, same ids), so the student
must consume the cached ``input_ids`` as they are. :func:`assert_same_tokenizer` compares the
tokenizer fingerprint the teacher wrote into every shard with the student's tokenizer;
:func:`check_alignment` compares one row's ids with the student's own tokenization of the same text.

**Without torch, through Hugging Face ``datasets``.** The shards are plain Parquet, so::

    import datasets
    from teacher_farm.training import shard_paths

    ds = datasets.load_dataset(
        "parquet", data_files=[str(p) for p in shard_paths("cache/")], split="train", streaming=True
    )

gives the raw rows (``topk_logprobs`` as stored, no ``tail_logprob``); :func:`row_group_arrays`
is the numpy conversion :class:`TopkDataset` uses, for any other loader.

Importing this module needs numpy and pyarrow only: torch is imported inside the functions that use
it, and ``TopkDataset`` (a ``torch.utils.data.IterableDataset``) is built on first access.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from teacher_farm.client.manifest import Manifest, ShardRecord, load_manifests
from teacher_farm.client.windows import owned_positions, ranges
from teacher_farm.schemas.arrow import read_metadata
from teacher_farm.schemas.errors import CacheMismatch, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

__all__ = [
    "TAIL_FLOOR", "ChunkedKDLoss", "OnlineTeacher", "RowGroupArrays", "SampledKDLoss", "TopkDataset",
    "TopkRenormKLLoss", "TopkTailKLLoss", "assert_same_tokenizer", "cache_metadata_of", "check_alignment",
    "collate_topk", "join_windows", "kd_loss", "row_group_arrays", "sampled_kd_loss", "shard_paths",
]

#: Names served lazily (they need torch): the losses (``client/losses.py``) and the online teacher.
_LAZY = {
    "ChunkedKDLoss": "losses", "SampledKDLoss": "losses", "TopkRenormKLLoss": "losses",
    "TopkTailKLLoss": "losses", "OnlineTeacher": "online",
}

#: The smallest probability mass ``tail_logprob`` reports: log(TAIL_FLOOR) when the top-k hold
#: (almost) everything, or when float16 rounding makes them sum to a little over 1.
TAIL_FLOOR = 1e-12

#: Manifest identity entries that every manifest of one cache must share.
SHARED_IDENTITY = (
    "model_fingerprint", "tokenizer_fingerprint", "vocab_size", "k", "temperature", "targets", "samples", "seed",
)

#: The columns the dataset reads when a cache has them (``id`` and ``target_ranks`` are left on disk).
COLUMNS = [
    "line", "input_ids", "topk_ids", "topk_logprobs", "target_logprobs",
    "sample_ids", "sample_counts", "sample_logprobs",
]

#: Sampled-target columns: n lists per row, each of the distinct tokens drawn at that position.
SAMPLE_COLUMNS = ("sample_ids", "sample_counts", "sample_logprobs")

#: Stand-in for -inf that keeps gradients finite (exp of it is 0 in float32).
_NEG = -1e30


# --------------------------------------------------------------------------------------------
# Finding the shards
# --------------------------------------------------------------------------------------------


def _manifests(cache_dir: Path) -> list[tuple[Path, Manifest]]:
    """Every ``manifest*.json`` of ``cache_dir`` (``manifest.json`` first), parsed."""
    if not cache_dir.is_dir():
        raise InputError(f"{cache_dir} is not a directory")
    found = load_manifests(cache_dir)
    if not found:
        raise InputError(
            f"{cache_dir} has no manifest.json (nor manifest*.json): not a teacher-farm cache, "
            "or no shard has been finished yet"
        )
    return [(cache_dir / name, manifest) for name, manifest in found.items()]


def _shard_records(cache_dir: Path) -> list[ShardRecord]:
    manifests = _manifests(cache_dir)
    first_path, first = manifests[0]
    records: dict[int, tuple[Path, ShardRecord]] = {}
    for path, manifest in manifests:
        for key in SHARED_IDENTITY:
            if manifest.identity.get(key) != first.identity.get(key):
                raise InputError(
                    f"{path.name} and {first_path.name} in {cache_dir} describe different caches: "
                    f"{key} is {manifest.identity.get(key)!r} there and {first.identity.get(key)!r} here"
                )
        if not manifest.complete:
            log.warning(
                "%s: its cache run has not finished; reading the %d shards done", path, len(manifest.shards)
            )
        for rec in manifest.shards.values():
            seen = records.get(rec.index)
            if seen is not None and seen[1] != rec:
                raise InputError(
                    f"shard {rec.index} is named differently by {seen[0].name} and {path.name} in {cache_dir}"
                )
            records[rec.index] = (path, rec)
    return sorted((rec for _, rec in records.values()), key=lambda r: (r.first_line, r.index))


def shard_paths(cache_dir: str | Path) -> list[Path]:
    """The complete shards of a cache, in input line order.

    Only the shards named by ``manifest.json`` count (when a corpus was cached by several client
    processes, the union of every ``manifest*.json`` in the directory): a shard file the manifest
    does not name is unfinished or stray and is ignored. Raises ``InputError`` when the directory
    has no manifest, when a named shard is missing or its size differs from the manifest, or when
    two manifests describe different teachers.
    """
    cache_dir = Path(cache_dir)
    paths = []
    for rec in _shard_records(cache_dir):
        path = cache_dir / rec.file
        if not path.is_file():
            raise InputError(f"{path} is named by the manifest but missing")
        if path.stat().st_size != rec.bytes:
            raise InputError(
                f"{path} is {path.stat().st_size} bytes, the manifest says {rec.bytes}: not the shard named"
            )
        paths.append(path)
    return paths


def cache_metadata_of(cache_dir: str | Path) -> dict[str, str]:
    """The teacher-farm metadata of the cache's first shard (model, tokenizer fingerprint, k, ...)."""
    paths = shard_paths(cache_dir)
    if not paths:
        raise InputError(f"{cache_dir} has no complete shard yet")
    return read_metadata(pq.read_schema(paths[0]))


# --------------------------------------------------------------------------------------------
# Same tokenizer
# --------------------------------------------------------------------------------------------


def assert_same_tokenizer(cache_dir: str | Path, tokenizer: Any) -> str:
    """Raise ``CacheMismatch`` unless ``tokenizer`` is the one the teacher used; returns its fingerprint.

    The fingerprint is ``teacher_farm.server.engine.tokenizer_fingerprint`` (which needs no vLLM or torch), and
    it is compared with ``teacher_farm.tokenizer_fingerprint`` in every shard's metadata and with
    the manifests' identity.
    """
    from teacher_farm.server.engine import tokenizer_fingerprint  # numpy/pydantic only; vLLM is imported lazily there

    cache_dir = Path(cache_dir)
    found: dict[str, str] = {}
    for _, manifest in _manifests(cache_dir):
        fp = manifest.identity.get("tokenizer_fingerprint")
        if fp is not None:
            found.setdefault(str(fp), "manifest")
    for path in shard_paths(cache_dir):
        fp = read_metadata(pq.read_schema(path)).get("tokenizer_fingerprint")
        if fp is not None:
            found.setdefault(fp, path.name)
    if not found:
        raise InputError(f"{cache_dir} records no tokenizer fingerprint")
    mine = tokenizer_fingerprint(tokenizer)
    others = sorted(set(found) - {mine})
    if others:
        raise CacheMismatch(
            f"the student's tokenizer (fingerprint {mine}) is not the teacher's "
            f"(fingerprint {others[0]} in {found[others[0]]} of {cache_dir}): "
            "distillation on top-k token ids "
            "needs the very same tokenizer and vocabulary"
        )
    return mine


def _as_numpy(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):  # a torch tensor, on any device
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).reshape(-1)


def check_alignment(student_input_ids: Any, row_input_ids: Any, *, allow_truncation: bool = False) -> None:
    """Raise ``InputError`` unless the student's tokenization of a line equals the cached one.

    ``student_input_ids`` come from the student's tokenizer on the line's text, ``row_input_ids``
    from the cache row. With ``allow_truncation`` the cached ids may be a prefix of the student's
    (the teacher truncates lines to ``--max-length``). Lists, numpy arrays and tensors are accepted.
    """
    student, teacher = _as_numpy(student_input_ids), _as_numpy(row_input_ids)
    n = min(len(student), len(teacher))
    diff = np.flatnonzero(student[:n] != teacher[:n])
    if diff.size:
        i = int(diff[0])
        raise InputError(
            f"token {i} differs: the student has {int(student[i])}, the teacher {int(teacher[i])}; "
            "the student must use the teacher's tokenizer (and the same special tokens)"
        )
    if len(student) != len(teacher) and not (allow_truncation and len(teacher) < len(student)):
        raise InputError(f"the student has {len(student)} tokens, the teacher {len(teacher)}")


# --------------------------------------------------------------------------------------------
# One row group to numpy, vectorized
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowGroupArrays:
    """The rows of one row group as flat numpy arrays; row r's positions are ``offsets[r]:offsets[r+1]``.

    The top-k arrays are None for a cache of sampled targets only; the sample arrays are None for
    a top-k cache. Sampled targets are ragged per position (``sample_lengths``) and held padded to
    the row group's widest position S, with ids, counts and logprobs 0 in the padding.
    """

    line: np.ndarray  # (rows,) int64
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
    sample_logprobs: np.ndarray | None = None  # (P, S) float32

    @property
    def rows(self) -> int:
        return len(self.line)


def _lengths(arr: pa.Array) -> np.ndarray:
    return pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table.column(name)
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _offsets(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _topk_arrays(table: pa.Table, n: np.ndarray, renormalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(topk_ids, topk_logprobs, tail_logprob) of the rows, (P, k), (P, k), (P,)."""
    outer = _column(table, "topk_ids")
    if not np.array_equal(_lengths(outer), n):
        raise InputError("malformed cache rows: topk_ids has not one list per input token")
    inner = outer.flatten()
    positions = len(inner)
    klens = _lengths(inner)
    k = int(klens[0]) if positions else 0
    if positions and (klens != k).any():
        raise InputError("malformed cache rows: top-k lists of different lengths")
    topk_ids = inner.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(positions, k)

    lp_outer = _column(table, "topk_logprobs")
    lp_flat = lp_outer.flatten().flatten().to_numpy(zero_copy_only=False)
    if not np.array_equal(_lengths(lp_outer), n) or lp_flat.size != positions * k:
        raise InputError("malformed cache rows: topk_logprobs does not match topk_ids")
    lp = lp_flat.astype(np.float64).reshape(positions, k)

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


def _sample_arrays(table: pa.Table, n: np.ndarray) -> dict[str, np.ndarray]:
    """The sampled targets of the rows, padded per position to the widest: (P,) and three (P, S)."""
    lengths = None
    out: dict[str, np.ndarray] = {}
    for name, dtype in (("sample_ids", np.int64), ("sample_counts", np.int16), ("sample_logprobs", np.float32)):
        outer = _column(table, name)
        if not np.array_equal(_lengths(outer), n):
            raise InputError(f"malformed cache rows: {name} has not one list per input token")
        inner = outer.flatten()
        mine = _lengths(inner)
        if lengths is None:
            lengths = mine
            P, S = len(lengths), int(lengths.max()) if len(lengths) else 0
            # Where each flat value goes in the (P, S) block, raveled: position * S + slot.
            dest = np.arange(int(lengths.sum())) + np.repeat(np.arange(P) * S - _offsets(lengths)[:-1], lengths)
        elif not np.array_equal(mine, lengths):
            raise InputError(f"malformed cache rows: {name} does not match sample_ids")
        values = inner.flatten().to_numpy(zero_copy_only=False)
        block = np.zeros(P * S, dtype=dtype)
        block[dest] = values
        block = block.reshape(P, S)
        out[name] = block
    assert lengths is not None
    out["sample_lengths"] = lengths
    return out


def row_group_arrays(table: pa.Table, *, renormalize: bool = False) -> RowGroupArrays:
    """Convert cache rows (one row group, or any cache table) to numpy with whole-array operations.

    Logprobs come back as float32 whatever the stored dtype. ``tail_logprob`` is
    ``log(1 - sum(exp(topk_logprobs)))`` per position, computed in float64 and floored at
    ``log(TAIL_FLOOR)``. With ``renormalize`` the top-k logprobs are replaced by their log-softmax
    (the teacher restricted to its top-k); ``tail_logprob`` still reports the mass left out.
    Sampled targets, when the table has them, come padded per position (see :class:`RowGroupArrays`).
    """
    lines = _column(table, "line").to_numpy(zero_copy_only=False).astype(np.int64)
    ids = _column(table, "input_ids")
    n = _lengths(ids)
    input_ids = ids.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    names = set(table.column_names)
    if "topk_ids" not in names and "sample_ids" not in names:
        raise InputError("cache rows with neither top-k (topk_ids) nor sampled (sample_ids) targets")

    topk_ids = topk_logprobs = tail = None
    if "topk_ids" in names:
        topk_ids, topk_logprobs, tail = _topk_arrays(table, n, renormalize)
    samples = _sample_arrays(table, n) if "sample_ids" in names else {}

    targets = _column(table, "target_logprobs")
    tn = _lengths(targets)
    if not np.array_equal(tn, np.maximum(n - 1, 0)):
        raise InputError("malformed cache rows: target_logprobs must hold len(input_ids) - 1 values")
    target_logprobs = targets.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    return RowGroupArrays(
        line=lines, offsets=_offsets(n), input_ids=input_ids, topk_ids=topk_ids,
        topk_logprobs=topk_logprobs, tail_logprob=tail,
        target_logprobs=target_logprobs, target_offsets=_offsets(tn), **samples,
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
        raise InputError("cannot join windows: a row group starts inside a line (its first row has offset > 0)")
    try:
        pos_lo, target_lo = owned_positions(offset, n)
    except ValueError as exc:
        raise InputError(f"cannot join windows: {exc}") from exc
    take = ranges(a.offsets[:-1] + pos_lo, a.offsets[1:])
    take_t = ranges(a.target_offsets[:-1] + np.minimum(target_lo, tn), a.target_offsets[1:])
    lengths = np.add.reduceat(n - pos_lo, first)
    per_position = {
        name: None if getattr(a, name) is None else getattr(a, name)[take]
        for name in ("topk_ids", "topk_logprobs", "tail_logprob", "sample_lengths", "sample_ids", "sample_counts",
                     "sample_logprobs")
    }
    return RowGroupArrays(
        line=a.line[first], offsets=_offsets(lengths), input_ids=a.input_ids[take], **per_position,
        target_logprobs=a.target_logprobs[take_t], target_offsets=_offsets(np.maximum(lengths - 1, 0)),
    )


# --------------------------------------------------------------------------------------------
# The dataset (torch imported on first access)
# --------------------------------------------------------------------------------------------


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


def _make_dataset_class() -> type:
    try:
        import torch
        from torch.utils.data import IterableDataset, get_worker_info
    except ImportError as exc:  # pragma: no cover - exercised in a torch-free subprocess
        raise ImportError("teacher_farm.training.TopkDataset needs PyTorch (pip install torch)") from exc

    class TopkDataset(IterableDataset):
        """One dict of tensors per cached sequence, streamed one Parquet row group at a time.

        Each item: ``input_ids`` (n,) long, ``topk_ids`` (n, k) long, ``topk_logprobs`` (n, k)
        float32, ``tail_logprob`` (n,) float32 (log of the teacher's mass outside its top-k),
        ``target_logprobs`` (n - 1,) float32, ``line`` (a 0-d long: the input line number) and
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
            self.paths = shard_paths(self.cache_dir)
            self.units, self.num_rows = _units(self.paths)
            self.metadata = _shared_metadata(self.paths)
            self.temperature = float(self.metadata.get("temperature", "1.0"))
            self.targets = self.metadata.get("targets", "topk")
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
                table = pf.read_row_group(rg, columns=columns)
                arrays = row_group_arrays(table, renormalize=self.renormalize)
                if self.join_windows:
                    arrays = join_windows(arrays, table.column("offset").to_numpy())
                yield from _rows(arrays, self.max_length, self.temperature)

    TopkDataset.__module__ = __name__
    TopkDataset.__qualname__ = "TopkDataset"
    return TopkDataset


def _shared_metadata(paths: Sequence[Path]) -> dict[str, str]:
    """The first shard's metadata, after checking every shard was scored the same way."""
    if not paths:
        return {}
    first = read_metadata(pq.read_schema(paths[0]))
    for path in paths[1:]:
        meta = read_metadata(pq.read_schema(path))
        for key in ("temperature", "targets", "k", "samples"):
            if meta.get(key) != first.get(key):
                raise InputError(
                    f"{path.name} was cached with {key}={meta.get(key)} and {paths[0].name} with "
                    f"{key}={first.get(key)}: one dataset must hold targets of one kind"
                )
    return first


def _rows(a: RowGroupArrays, max_length: int | None, temperature: float = 1.0) -> Iterator[dict[str, torch.Tensor]]:
    """Slice a converted row group into per-sequence tensors (one loop step per row, none per token)."""
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
        yield item


def __getattr__(name: str) -> Any:
    if name == "TopkDataset":
        cls = _make_dataset_class()
        globals()[name] = cls
        return cls
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f"teacher_farm.client.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------
# Batching and the loss
# --------------------------------------------------------------------------------------------


def collate_topk(
    batch: Sequence[dict[str, torch.Tensor]], pad_id: int = 0, *, pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`TopkDataset` items to the longest one (B sequences, T positions).

    Returns ``input_ids`` (B, T) padded with ``pad_id``; ``attention_mask`` (B, T) long, 1 on real
    tokens (the positions the KD loss uses); ``labels`` (B, T) the input ids with -100 on padding,
    Hugging Face style (the model shifts them); ``topk_ids`` (B, T, k) long and ``topk_logprobs``
    (B, T, k) float32, padded with 0; ``tail_logprob`` (B, T) padded with log(TAIL_FLOOR);
    ``target_logprobs`` (B, T) aligned with the logits, position i holding the teacher's logprob of
    token i+1, and ``target_mask`` (B, T) bool, True where there is such a token; ``lengths`` (B,),
    ``line`` (B,) and ``temperature`` (B,). Sampled targets, when the items have them:
    ``sample_ids`` (B, T, S) long, ``sample_counts`` (B, T, S) int16, ``sample_logprobs`` (B, T, S)
    float32, padded with 0 to the widest position S of the batch, and ``sample_mask`` (B, T, S) bool,
    True on a drawn token. Pad values are finite so masked positions never turn a loss into NaN.
    """
    import torch

    if not batch:
        raise ValueError("collate_topk got an empty batch")
    lengths = [int(x["input_ids"].shape[0]) for x in batch]
    B, T = len(batch), max(lengths)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "target_logprobs": torch.zeros((B, T), dtype=torch.float32),
        "target_mask": torch.zeros((B, T), dtype=torch.bool),
    }
    has_topk = _same_presence(batch, "topk_ids")
    if has_topk:
        ks = {int(x["topk_ids"].shape[1]) for x in batch}
        if len(ks) != 1:
            raise ValueError(f"sequences with different k in one batch: {sorted(ks)}")
        (k,) = ks
        out["topk_ids"] = torch.zeros((B, T, k), dtype=torch.long)
        out["topk_logprobs"] = torch.zeros((B, T, k), dtype=torch.float32)
        out["tail_logprob"] = torch.full((B, T), float(np.log(TAIL_FLOOR)), dtype=torch.float32)
    has_samples = _same_presence(batch, "sample_ids")
    if has_samples:
        S = max(int(x["sample_ids"].shape[1]) for x in batch)
        out["sample_ids"] = torch.zeros((B, T, S), dtype=torch.long)
        out["sample_counts"] = torch.zeros((B, T, S), dtype=torch.int16)
        out["sample_logprobs"] = torch.zeros((B, T, S), dtype=torch.float32)
    for b, (x, n) in enumerate(zip(batch, lengths)):
        out["input_ids"][b, :n] = x["input_ids"]
        out["attention_mask"][b, :n] = 1
        out["target_logprobs"][b, : n - 1] = x["target_logprobs"]
        out["target_mask"][b, : n - 1] = True
        if has_topk:
            out["topk_ids"][b, :n] = x["topk_ids"]
            out["topk_logprobs"][b, :n] = x["topk_logprobs"]
            out["tail_logprob"][b, :n] = x["tail_logprob"]
        if has_samples:
            s = int(x["sample_ids"].shape[1])
            for key in SAMPLE_COLUMNS:
                out[key][b, :n, :s] = x[key]
    if has_samples:
        out["sample_mask"] = out["sample_counts"] > 0
    out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    out["lengths"] = torch.tensor(lengths, dtype=torch.long)
    for key in ("line", "temperature"):
        if all(key in x for x in batch):
            out[key] = torch.stack([torch.as_tensor(x[key]) for x in batch])
    return out


def _same_presence(batch: Sequence[dict[str, Any]], key: str) -> bool:
    have = {key in x for x in batch}
    if len(have) != 1:
        raise ValueError(f"some sequences of the batch have {key} and some do not: mixed caches in one batch")
    return have.pop()


def kd_loss(
    student_logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float | None = None, tail: bool = True,
) -> torch.Tensor:
    """Forward KL(teacher || student) per position from the cached top-k, mean over the attention mask.

    ``student_logits`` (B, T, V) are the student's logits at the batch's positions (position i
    predicts token i+1, like the teacher's top-k). With ``tail`` (the default) this is
    :class:`TopkTailKLLoss`: the exact KL over k + 1 buckets, the teacher's top-k tokens and
    everything else; without, :class:`TopkRenormKLLoss`: the KL of both distributions renormalised
    over the teacher's top-k. Both at the cache's temperature T (``temperature`` None, or equal to
    the cache's: anything else raises ``ValueError``), times T². Zero when the student's
    distribution is the teacher's.
    """
    from teacher_farm.client.losses import TopkRenormKLLoss, TopkTailKLLoss

    loss = TopkTailKLLoss(temperature) if tail else TopkRenormKLLoss(temperature)
    return loss(student_logits, batch)


def sampled_kd_loss(
    student_logits: torch.Tensor, batch: dict[str, torch.Tensor], temperature: float | None = None,
    entropy: bool = False,
) -> torch.Tensor:
    """Random-Sampling KD from cached draws (:class:`SampledKDLoss`), mean over the attention mask.

    The student's cross-entropy against ``sample_counts / N`` at the cache's temperature (times T²),
    an unbiased estimate of its cross-entropy against the teacher; with ``entropy`` the teacher's
    entropy estimate is subtracted so the value estimates KL(teacher || student).
    """
    from teacher_farm.client.losses import SampledKDLoss

    return SampledKDLoss(temperature, entropy=entropy)(student_logits, batch)
