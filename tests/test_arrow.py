"""The cache's Arrow layout: numpy results in, the same numbers out, self-describing metadata."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from teacher_farm.schemas import SCHEMA_VERSION, __version__
from teacher_farm.schemas.arrow import (
    ScoredSequence,
    cache_schema,
    cast_logprobs,
    result_schema,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import METADATA_PREFIX, CacheIdentity, read_metadata
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.scoring import Scoring
from tests.conftest import table_to_results

LENGTHS = [1, 2, 7, 33]


def random_sequence(rng: np.random.Generator, seq_id: str | None, n: int, k: int) -> ScoredSequence:
    return ScoredSequence(
        id=seq_id,
        input_ids=rng.integers(0, 150_000, n).astype(np.int32),
        topk_ids=rng.integers(0, 150_000, (n, k)).astype(np.int32),
        topk_logprobs=-rng.exponential(3.0, (n, k)).astype(np.float32),
        target_logprobs=-rng.exponential(3.0, n - 1).astype(np.float32),
        target_ranks=rng.integers(1, 1000, n - 1).astype(np.int32),
    )


def random_results(k: int, seed: int = 0) -> list[ScoredSequence]:
    rng = np.random.default_rng(seed)
    return [random_sequence(rng, f"doc-{i}" if i != 2 else None, n, k) for i, n in enumerate(LENGTHS)]


@pytest.mark.parametrize("k", [1, 16])
def test_round_trip_gives_back_every_number(k):
    results = random_results(k)
    back = table_to_results(results_to_table(results, k))
    assert len(back) == len(results)
    for want, got in zip(results, back):
        assert got.id == want.id
        n = len(want.input_ids)
        assert got.topk_ids.shape == got.topk_logprobs.shape == (n, k)
        assert got.target_logprobs.shape == got.target_ranks.shape == (n - 1,)
        for name in ("input_ids", "topk_ids", "topk_logprobs", "target_logprobs", "target_ranks"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("k", [1, 16])
def test_table_has_result_schema_and_list_lengths(k):
    results = random_results(k)
    table = results_to_table(results, k)
    assert table.schema.equals(result_schema())
    assert table.num_rows == len(LENGTHS)
    assert table.column("input_ids").to_pylist() == [r.input_ids.tolist() for r in results]
    topk = table.column("topk_ids").to_pylist()
    assert [len(row) for row in topk] == LENGTHS
    assert all(len(position) == k for row in topk for position in row)
    assert [len(row) for row in table.column("target_ranks").to_pylist()] == [n - 1 for n in LENGTHS]


def test_single_token_sequence_has_empty_targets():
    results = [random_sequence(np.random.default_rng(1), "one", 1, 4)]
    table = results_to_table(results, 4)
    assert table.column("target_logprobs").to_pylist() == [[]]
    assert table.column("target_ranks").to_pylist() == [[]]
    assert len(table.column("topk_ids")[0]) == 1


def test_no_results_give_an_empty_table_of_the_result_schema():
    table = results_to_table([], 16)
    assert table.num_rows == 0
    assert table.schema.equals(result_schema())


def test_cast_to_float16_changes_only_the_logprob_columns():
    k = 16
    results = random_results(k)
    table = results_to_table(results, k)
    table = with_source_columns(table, range(10, 10 + table.num_rows), ["a.jsonl"] * table.num_rows)
    half = cast_logprobs(table, "float16")

    assert half.schema.equals(cache_schema("float16"))
    for name in ("id", "line", "source", "offset", "input_ids", "topk_ids", "target_ranks"):
        assert half.column(name).equals(table.column(name)), name
    for want, got in zip(results, table_to_results(half.drop_columns(["line", "source", "offset"]))):
        np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
        np.testing.assert_array_equal(
            got.topk_logprobs, want.topk_logprobs.astype(np.float16).astype(np.float32)
        )
        np.testing.assert_array_equal(
            got.target_logprobs, want.target_logprobs.astype(np.float16).astype(np.float32)
        )


def test_cast_to_the_dtype_it_already_has_keeps_the_table():
    table = results_to_table(random_results(2), 2)
    assert cast_logprobs(table, "float32").equals(table)


def test_cache_schema_puts_where_a_row_comes_from_after_its_id():
    for dtype in ("float32", "float16"):
        schema = cache_schema(dtype)
        assert schema.names[:4] == ["id", "line", "source", "offset"]
        assert schema.field("line").type == pa.int64() and schema.field("offset").type == pa.int64()
        assert schema.field("source").type == pa.string()
        rest = pa.schema([f for f in schema if f.name not in ("line", "source", "offset")])
        assert rest.equals(result_schema(dtype))


def test_cache_identity_round_trips_through_parquet_metadata_and_the_manifest():
    identity = CacheIdentity(
        model="org/Model-7B",
        model_fingerprint="m" * 16,
        tokenizer_fingerprint="t" * 16,
        vocab_size=151_936,
        scoring=Scoring(k=16, temperature=0.5, targets="both", samples=32, seed=7),
        logprob_dtype="uint8-gap",
        sample_logprobs=True,
    )
    metadata = identity.metadata()
    assert all(key.startswith(METADATA_PREFIX.encode()) for key in metadata)
    schema = cache_schema("float16").with_metadata({**metadata, b"pandas": b"{}"})
    assert read_metadata(schema) == {
        "schema_version": str(SCHEMA_VERSION),
        "model": "org/Model-7B",
        "model_fingerprint": "m" * 16,
        "tokenizer_fingerprint": "t" * 16,
        "vocab_size": "151936",
        "k": "16",
        "temperature": "0.5",
        "targets": "both",
        "samples": "32",
        "seed": "7",
        "sample_logprobs": "true",
        "logprob_dtype": "uint8-gap",
        "package_version": __version__,
    }
    assert CacheIdentity.from_entries(read_metadata(schema)) == identity
    # The manifest holds the same entries (the model's name is provenance there).
    assert CacheIdentity.from_entries(json.loads(json.dumps(identity.entries()))) == identity.model_copy(
        update={"model": ""}
    )
    # N, the seed and whether sampled logprobs are kept are part of a cache's identity only with sampled
    # targets.
    topk = identity.model_copy(update={"scoring": Scoring(k=16), "sample_logprobs": False})
    assert not {"samples", "seed", "sample_logprobs"} & set(topk.entries())
    assert CacheIdentity.from_entries(topk.entries()) == topk.model_copy(update={"model": ""})


def test_an_identity_of_schema_2_kept_its_sampled_logprobs_and_an_unknown_format_is_refused():
    entries = {
        "model_fingerprint": "m",
        "tokenizer_fingerprint": "t",
        "vocab_size": 10,
        "k": 4,
        "temperature": 1.0,
        "targets": "both",
        "samples": 8,
        "seed": 0,
        "logprob_dtype": "float16",
    }
    assert CacheIdentity.from_entries(entries).sample_logprobs
    with pytest.raises(InputError, match="logprob_dtype 'float64' is none of float32, float16, uint8-gap"):
        CacheIdentity.from_entries({**entries, "logprob_dtype": "float64"})


def test_schema_without_metadata_reads_as_empty():
    assert read_metadata(cache_schema()) == {}
