"""The cache equals an independent fp32 transformers computation on the same weights."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from teacher_farm.schemas import SCHEMA_VERSION
from teacher_farm.schemas.cache_dir import read_metadata
from tests.conftest import API_KEY, SAMPLE, read_lines, table_to_results, teacher_farm
from tests.reference_check import assert_matches_reference

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    lines = read_lines(SAMPLE)
    path = tmp_path_factory.mktemp("corpus") / "ref.jsonl"
    # Plain English, code-like docstrings and the multilingual / emoji lines at the end.
    path.write_text("\n".join(lines[:30] + lines[-6:]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("k", [16, 5])
def test_cache_matches_transformers_reference(any_server, reference, corpus, tmp_path, k):
    out = tmp_path / "cache"
    proc = teacher_farm(
        "cache",
        "--server",
        any_server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--k",
        str(k),
        "--rows-per-shard",
        "10",
        "--logprob-dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    records = [json.loads(x) for x in corpus.read_text(encoding="utf-8").splitlines()]
    assert table.column("line").to_pylist() == list(range(len(records)))
    assert table.column("id").to_pylist() == [r["id"] for r in records]
    for rec, row in zip(records, table_to_results(table)):
        assert row.input_ids.tolist() == reference.tokenize(rec["text"])
        assert row.input_ids[0] == reference.tokenizer.bos_token_id
        assert_matches_reference(row, reference, k)
    meta = read_metadata(pq.read_schema(out / "part-000000.parquet"))
    assert (
        meta["k"] == str(k)
        and meta["logprob_dtype"] == "float32"
        and meta["schema_version"] == str(SCHEMA_VERSION)
    )
    assert meta["vocab_size"] == str(reference.model.config.vocab_size)


def test_reference_check_catches_a_wrong_answer(server, reference, corpus, tmp_path):
    """The comparison itself must fail on a corrupted row, or it proves nothing."""
    out = tmp_path / "cache"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(corpus),
        "--out",
        str(out),
        "--k",
        "4",
        "--logprob-dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    row = table_to_results(pq.read_table(sorted(out.glob("part-*.parquet"))).slice(0, 1))[0]
    shifted = row.__class__(**{**row.__dict__, "topk_ids": np.roll(row.topk_ids, 1, axis=0)})
    with pytest.raises(AssertionError):
        assert_matches_reference(shifted, reference, 4)
    nudged = row.__class__(**{**row.__dict__, "target_logprobs": row.target_logprobs + 1e-3})
    with pytest.raises(AssertionError):
        assert_matches_reference(nudged, reference, 4)
