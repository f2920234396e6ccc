"""Parquet shard files: written under a temporary name, renamed into place only when complete.

A shard holds the rows of one fixed range of input lines, so a rerun knows exactly what is done.
Rows are buffered and flushed as whole row groups; a renamed shard is always a readable file.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from teacher_farm.client.fsutil import fsync_dir, sha256_file


def shard_name(index: int) -> str:
    """File name of shard ``index``: zero-padded so they sort in line order."""
    return f"part-{index:06d}.parquet"


def open_sink(path: Path) -> pa.NativeFile:
    """The file a shard is written to (a seam: tests put a disk that fills up here)."""
    return pa.OSFile(str(path), "wb")


@dataclass(frozen=True)
class ShardStats:
    """What a committed shard holds."""

    file: str
    rows: int
    tokens: int
    bytes: int
    sha256: str


class ShardWriter:
    """Writes one shard; ``commit`` makes it visible, anything else leaves only a temporary file."""

    def __init__(
        self, out_dir: Path, index: int, schema: pa.Schema, *,
        compression_level: int = 3, row_group_bytes: int = 64 << 20,
    ) -> None:
        self.path = out_dir / shard_name(index)
        self.tmp = out_dir / f".{shard_name(index)}.tmp"
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self.rows = 0
        self.tokens = 0
        self._sink = open_sink(self.tmp)
        self._writer = pq.ParquetWriter(
            self._sink, schema,
            compression="zstd", compression_level=compression_level,
            # Token ids and logprobs are near-random: dictionaries only cost time. Splitting float
            # bytes into streams lets zstd find the shared sign and exponent bytes.
            use_dictionary=["id", "source"],
            use_byte_stream_split=[
                path for name, path in (
                    ("topk_logprobs", "topk_logprobs.list.element.list.element"),
                    ("target_logprobs", "target_logprobs.list.element"),
                    ("sample_logprobs", "sample_logprobs.list.element.list.element"),
                ) if name in schema.names
            ],
            write_statistics=["line"],
        )

    def write(self, table: pa.Table) -> int:
        """Add cache rows (``table`` must match the shard's schema); returns their token count."""
        tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        self._buffer.append(table)
        self._buffered += table.nbytes
        self.rows += table.num_rows
        self.tokens += tokens
        if self._buffered >= self.row_group_bytes:
            self._flush()
        return tokens

    def _flush(self) -> None:
        if self._buffer:
            self._writer.write_table(pa.concat_tables(self._buffer), row_group_size=1 << 30)
            self._buffer, self._buffered = [], 0

    def commit(self) -> ShardStats:
        """Flush, fsync, rename into place; the shard is complete once this returns."""
        self._flush()
        self._writer.close()
        self._sink.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)
        return ShardStats(self.path.name, self.rows, self.tokens, self.path.stat().st_size, digest)

    @contextlib.contextmanager
    def discard_on_error(self) -> Iterator[None]:
        """On a failed write, remove the unfinished temporary file (it frees the space it took)."""
        try:
            yield
        except Exception:
            self.discard()
            raise

    def discard(self) -> None:
        """Drop the unfinished shard: never renamed, never named in a manifest."""
        for close in (self._writer.close, self._sink.close):
            with contextlib.suppress(Exception):
                close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
