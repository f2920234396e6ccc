"""Parquet shard files: written under a temporary name, renamed into place only when complete.

A shard holds the rows of one fixed range of input lines, so a rerun knows exactly what is done.
Rows are buffered and flushed as whole row groups; a renamed shard is always a readable file. A full
row group is encoded and written in a thread of the shard's own while the next one fills (at most one
at a time), so that the answers keep coming while Parquet works.

Each column gets the Parquet encoding that keeps it smallest (zstd on top of all): floats split into
byte streams (the shared sign and exponent bytes then compress), and every integer column (token
ids, their gaps, counts, ranks) whichever of dictionary, byte-stream split and plain measures
smallest on the first rows of the shard. Which wins depends on the vocabulary and the teacher: on
the distillation benchmark's 1,024-token vocabulary the dictionary holds the top-k ids smallest,
while ids a teacher spreads over a 128k vocabulary compress better split into bytes
(``benchmarks/formats.py``; README, "The cache").
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from teacher_farm.client.fsutil import create_exclusive, fsync_dir, sha256_file
from teacher_farm.schemas.arrow import ID_ORDER_KEY, encode_rows
from teacher_farm.schemas.coding import CODING_KEY


def shard_name(index: int) -> str:
    """File name of shard ``index``: zero-padded so they sort in line order."""
    return f"part-{index:06d}.parquet"


#: A compact shard's metadata that its first rows set and every later row must share.
SHARD_KEYS = (ID_ORDER_KEY, CODING_KEY)
#: Tokens of a compact shard's first answers held back (``ShardWriter.write_results``) so that its id order
#: and entropy models are counted on all of them. On the real teacher's cache of the reference manual (111k
#: tokens, k=16, N=64; 2026-12-07) orders and models counted on the first 64k tokens gave 29.6 / 27.3 / 48.2
#: bytes per token (top-k / draws / both) where the first 32-line answer alone (15k tokens) gave 30.0 / 27.6 /
#: 48.9; all 111k, 29.6 / 27.2 / 48.4.
FIT_TOKENS = 1 << 16
#: ... or this many bytes of them, whichever comes first (k=256 answers are 2 KiB a token).
FIT_BYTES = 64 << 20
#: Encodings tried on the integer columns of a shard's first row group; the smallest is kept.
INTEGER_ENCODINGS = ("RLE_DICTIONARY", "BYTE_STREAM_SPLIT", "PLAIN")
#: Tokens of the first row group the encodings are tried on (its first rows holding that many). 16k
#: choose as 64k did for every id column of a real teacher's caches (float16 and uint8-gap; top-k,
#: draws, both) and of a k=64 cache of a 4,096-token vocabulary, the shards within 0.04% of their
#: bytes, at a quarter of the time (0.05 s of CPU at k=64 instead of 0.18).
TRIAL_TOKENS = 1 << 14
#: Arrow bytes buffered before a row group is written. Smaller groups spread the writing over the run
#: (the last one is written after the last answer: the smaller, the shorter that wait) and cost
#: little: 16 MiB groups took 0.6% more bytes than 64 MiB ones on a k=64 cache of a 4,096-token
#: vocabulary; on a real teacher's k=16 float16 cache (49,152 ids) two groups of 4 MiB took 0.2% more
#: than one (16 MiB hold about 150k of its tokens).
ROW_GROUP_BYTES = 16 << 20
#: Bytes of Parquet gathered before each write to the shard's file.
SINK_BUFFER = 8 << 20
#: Columns (top-level names) and the encoding each always gets.
FIXED_ENCODINGS = {
    "id": "RLE_DICTIONARY",
    "source": "RLE_DICTIONARY",
    "line": "PLAIN",
    "offset": "PLAIN",
    "coded": "PLAIN",  # entropy-coded already (schemas.coding)
}


def _leaves(schema: pa.Schema) -> list[tuple[str, str, str]]:
    """(column, Parquet leaf path, physical type) of every column of ``schema``."""
    buf = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), buf)
    parquet = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    leaves = [parquet.column(i) for i in range(len(parquet))]
    return [(c.path.split(".")[0], c.path, c.physical_type) for c in leaves]


def _writer_options(encodings: dict[str, str], compression_level: int) -> dict[str, Any]:
    """``pq.ParquetWriter`` keywords giving each leaf path its encoding."""
    return {
        "compression": "zstd",
        "compression_level": compression_level,
        "use_dictionary": [path for path, e in encodings.items() if e == "RLE_DICTIONARY"] or False,
        "column_encoding": {path: e for path, e in encodings.items() if e != "RLE_DICTIONARY"},
        "write_statistics": ["line"],
    }


def choose_encodings(table: pa.Table, compression_level: int = 3) -> dict[str, str]:
    """Parquet encoding per leaf path of ``table``'s columns: fixed ones, byte-stream split for floats,
    and for integer columns the candidate (``INTEGER_ENCODINGS``) that writes the column of ``table``'s
    first rows (``TRIAL_TOKENS``) smallest."""
    if "input_ids" in table.column_names and table.num_rows:
        tokens = np.cumsum(pc.list_value_length(table.column("input_ids")).to_numpy(zero_copy_only=False))
        table = table.slice(0, int(np.searchsorted(tokens, TRIAL_TOKENS)) + 1)
    chosen: dict[str, str] = {}
    for column, path, physical in _leaves(table.schema):
        if column in FIXED_ENCODINGS:
            chosen[path] = FIXED_ENCODINGS[column]
        elif physical not in ("INT32", "INT64"):
            chosen[path] = "BYTE_STREAM_SPLIT"  # float32, and float16 (FIXED_LEN_BYTE_ARRAY)
        elif table.num_rows == 0:
            chosen[path] = INTEGER_ENCODINGS[0]
        else:
            part = table.select([column])
            sizes = [_size(part, _writer_options({path: e}, compression_level)) for e in INTEGER_ENCODINGS]
            chosen[path] = INTEGER_ENCODINGS[sizes.index(min(sizes))]
    return chosen


def _size(table: pa.Table, options: dict[str, Any]) -> int:
    """Compressed bytes of ``table``'s one column written with ``options``."""
    buf = pa.BufferOutputStream()  # Arrow's own memory: the shard's thread writes without the GIL
    pq.write_table(table, buf, **options)
    meta = pq.ParquetFile(pa.BufferReader(buf.getvalue())).metadata
    return sum(meta.row_group(g).column(0).total_compressed_size for g in range(meta.num_row_groups))


def _plain_types(schema: pa.Schema) -> bool:
    """Whether Parquet's own types read back as ``schema``'s, so that the Arrow schema is not stored.

    A compact (schema 5) shard's are (no fixed-size lists), and its Arrow schema would hold the shard's id
    order and models a second time (its metadata, base64 again): its metadata goes in the file's key-value
    metadata alone, which every reader returns as the schema's.
    """
    return "coded" in schema.names and not any(pa.types.is_fixed_size_list(f.type) for f in schema)


def open_sink(path: Path) -> pa.NativeFile:
    """The file a shard is written to, created exclusively (a seam: tests put a disk that fills up here)."""
    return pa.PythonFile(os.fdopen(create_exclusive(path), "wb"), mode="w")


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
        self,
        out_dir: Path,
        index: int,
        schema: pa.Schema,
        *,
        compression_level: int = 3,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ) -> None:
        self.path = out_dir / shard_name(index)
        self.tmp = out_dir / f".{shard_name(index)}.tmp"
        self.schema = schema
        self.row_group_bytes = row_group_bytes
        self.compression_level = compression_level
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        #: Answers held back until a compact shard's order and models are counted (``write_results``).
        self._held: list[pa.Table] = []
        self._held_tokens = self._held_bytes = 0
        self.rows = 0
        self.tokens = 0
        # Buffered in Arrow's memory: the Python file is written (under the GIL) once per SINK_BUFFER
        # bytes, not once per page, so that the shard's thread does not wait on the event loop's.
        self._sink = pa.BufferedOutputStream(open_sink(self.tmp), SINK_BUFFER)
        #: Opened at the first row group, with the encodings measured on it (``choose_encodings``).
        self._writer: pq.ParquetWriter | None = None
        #: Parquet encoding per leaf path, once chosen.
        self.encodings: dict[str, str] = {}
        #: Writes full row groups, one at a time, beside the caller (``_flush``).
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self._pending: Future[None] | None = None

    def write(self, table: pa.Table) -> int:
        """Add cache rows (``table`` must match the shard's schema); returns their token count.

        A full row group is handed to the shard's thread; a failure of its writing is raised here, by the
        next call, or by ``commit``. A compact shard's id order (``schemas.arrow.with_id_order``) is the
        first rows' when the schema has none, and so are a schema 5 shard's entropy models
        (``schemas.coding``); rows encoded with another order or models are refused.
        """
        if self._pending is not None and self._pending.done():
            self._wait()  # its failure, at once
        theirs = table.schema.metadata or {}
        for key in SHARD_KEYS:
            if key not in theirs:
                continue
            mine = self.schema.metadata or {}
            if key not in mine and self._writer is None and not self._buffer:
                self.schema = self.schema.with_metadata({**mine, key: theirs[key]})
            elif mine.get(key) != theirs[key]:
                raise ValueError(
                    "rows encoded with another id order or models than the shard's "
                    "(schemas.arrow.with_id_order, schemas.coding)"
                )
        tokens = int(pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0)
        self._buffer.append(table)
        self._buffered += table.nbytes
        self.rows += table.num_rows
        self.tokens += tokens
        if self._buffered >= self.row_group_bytes:
            self._flush()
        return tokens

    def write_results(self, results: pa.Table) -> int:
        """Add the server's answers (result rows with the source columns), encoded here (``encode_rows``);
        returns their token count. A compact shard holds its first ``FIT_TOKENS`` tokens (``FIT_BYTES``) back,
        so that its id order and entropy models are those of all of them (they are written with the rest)."""
        if not self._fitting():
            return self.write(encode_rows(results, self.schema))
        tokens = int(pc.sum(pc.list_value_length(results.column("input_ids"))).as_py() or 0)
        self._held.append(results)
        self._held_tokens += tokens
        self._held_bytes += results.nbytes
        if self._held_tokens >= FIT_TOKENS or self._held_bytes >= FIT_BYTES:
            self._release()
        return tokens

    def _fitting(self) -> bool:
        """Whether this is a compact shard whose id order is not counted yet."""
        meta = self.schema.metadata or {}
        return "id_order" in self.schema.names and ID_ORDER_KEY not in meta and not self._buffer

    def _release(self) -> None:
        """Encode and add the answers held back (their order and models are the shard's)."""
        if self._held:
            held, self._held, self._held_tokens, self._held_bytes = self._held, [], 0, 0
            self.write(encode_rows(pa.concat_tables(held), self.schema))

    def _open(self, first: pa.Table) -> pq.ParquetWriter:
        if self._writer is None:
            self.encodings = choose_encodings(first, self.compression_level)
            self._writer = pq.ParquetWriter(
                self._sink,
                self.schema,
                store_schema=not _plain_types(self.schema),
                **_writer_options(self.encodings, self.compression_level),
            )
        return self._writer

    def _flush(self) -> None:
        """Hand the buffered rows to the shard's thread as one row group, once the one before is written."""
        self._wait()
        if self._buffer:
            table = pa.concat_tables(self._buffer)
            self._buffer, self._buffered = [], 0
            self._pending = self._pool.submit(self._write_group, table)

    def _write_group(self, table: pa.Table) -> None:
        self._open(table).write_table(table, row_group_size=1 << 30)

    def _wait(self) -> None:
        """Wait for the row group being written; re-raise what failed it."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def commit(self) -> ShardStats:
        """Flush, fsync, rename into place; the shard is complete once this returns."""
        self._release()
        self._flush()
        self._wait()
        self._pool.shutdown()
        writer = self._open(self.schema.empty_table())
        if _plain_types(self.schema) and self.schema.metadata:
            writer.add_key_value_metadata(self.schema.metadata)  # no Arrow schema holds it (_plain_types)
        writer.close()
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
        with contextlib.suppress(Exception):
            self._wait()
        self._pool.shutdown()
        for close in (*([self._writer.close] if self._writer is not None else []), self._sink.close):
            with contextlib.suppress(Exception):
                close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()
