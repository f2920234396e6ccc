"""Shard files: invisible until committed, then complete, checksummed and self-describing."""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.client import shards
from teacher_farm.client.shards import ShardWriter, shard_name
from teacher_farm.schemas.arrow import (
    ScoredSequence,
    cache_schema,
    cast_logprobs,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import CacheIdentity, read_metadata
from teacher_farm.schemas.scoring import Scoring

K = 4


def schema_for(dtype: str = "float32") -> pa.Schema:
    return cache_schema(dtype).with_metadata(
        CacheIdentity(
            model="m",
            model_fingerprint="mf",
            tokenizer_fingerprint="tf",
            vocab_size=1000,
            scoring=Scoring(k=K),
            logprob_dtype=dtype,
        ).metadata()
    )


def cache_rows(lengths, first_line: int, dtype: str = "float32", seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    results = [
        ScoredSequence(
            id=f"d{first_line + i}",
            input_ids=rng.integers(0, 1000, n).astype(np.int32),
            topk_ids=rng.integers(0, 1000, (n, K)).astype(np.int32),
            topk_logprobs=rng.standard_normal((n, K)).astype(np.float32),
            target_logprobs=rng.standard_normal(n - 1).astype(np.float32),
            target_ranks=rng.integers(1, 50, n - 1).astype(np.int32),
        )
        for i, n in enumerate(lengths)
    ]
    table = results_to_table(results, K)
    table = with_source_columns(
        table, range(first_line, first_line + len(lengths)), ["corpus.jsonl"] * len(lengths)
    )
    return cast_logprobs(table, dtype).cast(cache_schema(dtype))


def test_shard_name_is_zero_padded_and_sorts_in_order():
    assert shard_name(0) == "part-000000.parquet"
    assert shard_name(42) == "part-000042.parquet"
    indices = [100_000, 2, 10, 999]
    assert sorted(shard_name(i) for i in indices) == [shard_name(i) for i in sorted(indices)]


def test_only_a_hidden_temp_file_exists_before_commit(tmp_path):
    writer = ShardWriter(tmp_path, 7, schema_for())
    writer.write(cache_rows([3, 5], first_line=0))
    assert [p.name for p in tmp_path.iterdir()] == [".part-000007.parquet.tmp"]
    assert list(tmp_path.glob("part-*.parquet")) == []


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_commit_renames_into_place_with_right_stats(tmp_path, dtype):
    schema = schema_for(dtype)
    first, second = cache_rows([1, 4, 9], 700, dtype, seed=1), cache_rows([2, 6], 703, dtype, seed=2)
    writer = ShardWriter(tmp_path, 7, schema)
    writer.write(first)
    writer.write(second)
    stats = writer.commit()

    path = tmp_path / "part-000007.parquet"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert stats.file == path.name
    assert stats.rows == 5
    assert stats.tokens == 1 + 4 + 9 + 2 + 6
    assert stats.bytes == path.stat().st_size
    assert stats.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    back = pq.read_table(path)
    assert back.schema.equals(cache_schema(dtype))
    assert back.equals(pa.concat_tables([first, second]))
    assert back.column("line").to_pylist() == [700, 701, 702, 703, 704]
    assert read_metadata(back.schema) == read_metadata(schema)
    assert read_metadata(back.schema)["k"] == str(K)


def test_rows_buffer_into_one_row_group_by_default(tmp_path):
    writer = ShardWriter(tmp_path, 0, schema_for())
    for i in range(3):
        writer.write(cache_rows([5, 5], first_line=2 * i, seed=i))
    writer.commit()
    assert pq.ParquetFile(tmp_path / shard_name(0)).metadata.num_row_groups == 1


def test_tiny_row_group_bytes_flushes_each_write(tmp_path):
    writer = ShardWriter(tmp_path, 0, schema_for(), row_group_bytes=1)
    for i in range(3):
        writer.write(cache_rows([5, 5], first_line=2 * i, seed=i))
    stats = writer.commit()
    meta = pq.ParquetFile(tmp_path / shard_name(0)).metadata
    assert meta.num_row_groups == 3
    assert [meta.row_group(i).num_rows for i in range(3)] == [2, 2, 2]
    assert stats.rows == meta.num_rows == 6


class GatedFile:
    """A shard's file whose writes wait for ``opened``; with ``fail`` set, each write fails instead."""

    def __init__(self, path, fail: bool = False) -> None:
        self.f, self.fail = open(path, "wb"), fail
        self.opened, self.waiting = threading.Event(), threading.Event()

    def write(self, data) -> int:
        self.waiting.set()
        if not self.opened.wait(10):
            raise TimeoutError("the gate was never opened")
        if self.fail:
            raise OSError(28, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def gated(monkeypatch, fail: bool = False) -> list[GatedFile]:
    made: list[GatedFile] = []

    def open_sink(path):
        made.append(GatedFile(path, fail))
        return pa.PythonFile(made[-1], mode="w")

    monkeypatch.setattr(shards, "open_sink", open_sink)
    monkeypatch.setattr(shards, "SINK_BUFFER", 1)  # every page reaches the file at once
    return made


def test_a_full_row_group_is_written_beside_the_caller(tmp_path, monkeypatch):
    made = gated(monkeypatch)
    writer = ShardWriter(tmp_path, 0, schema_for(), row_group_bytes=1)
    first, second = cache_rows([5, 5], 0, seed=1), cache_rows([3], 2, seed=2)
    writer.write(first)  # a full row group: handed to the shard's thread, which waits on the file
    assert made[0].waiting.wait(10)  # this call returned while its row group is being written
    made[0].opened.set()
    writer.write(second)  # the next one waits for the first to be written, then hands its own over
    writer.commit()
    back = pq.read_table(tmp_path / shard_name(0))
    assert back.equals(pa.concat_tables([first, second]))
    assert pq.ParquetFile(tmp_path / shard_name(0)).metadata.num_row_groups == 2


def test_a_failed_row_group_write_is_raised_by_the_writer_and_leaves_no_shard(tmp_path, monkeypatch):
    made = gated(monkeypatch, fail=True)
    writer = ShardWriter(tmp_path, 0, schema_for(), row_group_bytes=1)
    writer.write(cache_rows([5, 5], 0))
    made[0].opened.set()
    with pytest.raises(OSError, match="No space left"), writer.discard_on_error():
        writer.write(cache_rows([3], 2))
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def test_line_column_has_statistics(tmp_path):
    writer = ShardWriter(tmp_path, 0, schema_for())
    writer.write(cache_rows([2, 3, 4], first_line=40))
    writer.commit()
    meta = pq.ParquetFile(tmp_path / shard_name(0)).metadata.row_group(0)
    line = next(meta.column(i) for i in range(meta.num_columns) if meta.column(i).path_in_schema == "line")
    assert (line.statistics.min, line.statistics.max) == (40, 42)


def test_each_integer_column_takes_the_encoding_that_measures_smallest(tmp_path):
    rng = np.random.default_rng(0)
    n = 4000
    few = rng.choice(np.array([3, 70_000, 1_000_000, 77], np.int32), (n, K))  # four ids: a dictionary's case
    wide = rng.integers(0, 2**24, (n, K)).astype(np.int32)  # random 24-bit ids: no dictionary pays
    table = cache_rows([n], first_line=0)
    table = table.set_column(
        table.schema.get_field_index("topk_ids"),
        "topk_ids",
        pa.array([few.tolist()], type=table.schema.field("topk_ids").type),
    )
    table = table.set_column(
        table.schema.get_field_index("input_ids"),
        "input_ids",
        pa.array([wide[:, 0].tolist()], type=pa.list_(pa.int32())),
    )
    writer = ShardWriter(tmp_path, 0, schema_for())
    writer.write(table)
    writer.commit()
    assert writer.encodings["topk_ids.list.element.list.element"] == "RLE_DICTIONARY"
    assert writer.encodings["input_ids.list.element"] != "RLE_DICTIONARY"
    assert writer.encodings["topk_logprobs.list.element.list.element"] == "BYTE_STREAM_SPLIT"
    assert writer.encodings["id"] == "RLE_DICTIONARY" and writer.encodings["line"] == "PLAIN"
    meta = pq.ParquetFile(tmp_path / shard_name(0)).metadata.row_group(0)
    used = {meta.column(i).path_in_schema: meta.column(i).encodings for i in range(meta.num_columns)}
    assert "RLE_DICTIONARY" in used["topk_ids.list.element.list.element"]
    assert "BYTE_STREAM_SPLIT" in used["topk_logprobs.list.element.list.element"]
    assert "RLE_DICTIONARY" not in used["input_ids.list.element"]
    assert pq.read_table(tmp_path / shard_name(0)).equals(table)


def test_an_empty_shard_is_a_readable_file(tmp_path):
    writer = ShardWriter(tmp_path, 3, schema_for())
    stats = writer.commit()
    assert stats.rows == 0 and pq.read_table(tmp_path / shard_name(3)).schema.equals(cache_schema())
