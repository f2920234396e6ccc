"""The manifest: saved atomically, loaded back identical, and a guard against resuming the wrong cache."""

from __future__ import annotations

import json

import pytest

from teacher_farm.client.manifest import check_identity, save_manifest
from teacher_farm.schemas import SCHEMA_VERSION
from teacher_farm.schemas.cache_dir import (
    MANIFEST,
    CacheDir,
    CacheIdentity,
    InputFingerprint,
    Manifest,
    RunIdentity,
    ShardRecord,
)
from teacher_farm.schemas.errors import CacheMismatch
from teacher_farm.schemas.scoring import Scoring
from tests.conftest import load_manifest

IDENTITY = RunIdentity(
    cache=CacheIdentity(
        model_fingerprint="abc123",
        tokenizer_fingerprint="tok456",
        vocab_size=32000,
        scoring=Scoring(k=16),
        logprob_dtype="float32",
    ),
    max_length=8192,
    inputs=(InputFingerprint(name="corpus.jsonl", size=1234, head_sha256="ffee"),),
)


def changed(**entries) -> RunIdentity:
    """``IDENTITY`` with some of its entries replaced (None: left out)."""
    merged = {**IDENTITY.entries(), **entries}
    return RunIdentity.from_entries({key: v for key, v in merged.items() if v is not None})


def shard(index: int, rows: int, tokens: int, rejects: int = 0) -> ShardRecord:
    return ShardRecord(
        index=index,
        file=f"part-{index:06d}.parquet",
        first_line=index * 100,
        end_line=index * 100 + 100,
        rows=rows,
        rejects=rejects,
        tokens=tokens,
        bytes=1000 + index,
        sha256=f"{index:064x}",
    )


def manifest() -> Manifest:
    return Manifest(
        identity=IDENTITY,
        provenance={"teacher": "http://x:8000", "created": "2024-01-01T00:00:00Z"},
        shards={0: shard(0, 98, 5000, 2), 3: shard(3, 100, 7000)},
        rejects_bytes=77,
        complete=True,
    )


def test_save_then_load_gives_the_same_manifest(tmp_path):
    m = manifest()
    save_manifest(m, tmp_path)
    loaded = load_manifest(tmp_path)
    assert loaded == m
    assert set(loaded.shards) == {0, 3}  # keys come back as ints, not JSON strings
    assert (loaded.rows, loaded.tokens, loaded.rejects) == (198, 12000, 2)


def test_save_leaves_only_the_manifest(tmp_path):
    m = manifest()
    save_manifest(m, tmp_path)
    m.shards[4] = shard(4, 1, 1)
    save_manifest(m, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [MANIFEST]
    assert set(load_manifest(tmp_path).shards) == {0, 3, 4}
    assert json.loads((tmp_path / MANIFEST).read_text())["schema_version"] == SCHEMA_VERSION


def test_a_new_directory_has_no_manifest(tmp_path):
    assert load_manifest(tmp_path) is None


def test_same_identity_resumes(tmp_path):
    save_manifest(manifest(), tmp_path)
    again = RunIdentity.from_entries(json.loads(json.dumps(IDENTITY.entries())))
    check_identity(load_manifest(tmp_path), again, tmp_path)


def test_different_identity_names_every_difference(tmp_path):
    now = changed(k=32, model_fingerprint="zzz999", rows_per_shard=4096, max_length=None)
    with pytest.raises(CacheMismatch) as info:
        check_identity(manifest(), now, tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "k: 16 there, 32 now" in message
    assert "model_fingerprint: 'abc123' there, 'zzz999' now" in message
    assert "max_length: 8192 there, None now" in message
    assert "rows_per_shard: None there, 4096 now" in message
    for same in ("tokenizer_fingerprint", "vocab_size", "logprob_dtype", "inputs"):
        assert f"{same}:" not in message


def test_a_nested_difference_is_reported(tmp_path):
    now = changed(inputs=[{**IDENTITY.entries()["inputs"][0], "size": 9999}])
    with pytest.raises(CacheMismatch, match="inputs: .*1234.* there, .*9999.* now"):
        check_identity(manifest(), now, tmp_path)


def test_other_schema_version_refuses_to_resume(tmp_path):
    path = tmp_path / MANIFEST
    save_manifest(manifest(), tmp_path)
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    with pytest.raises(
        CacheMismatch, match=f"schema version {SCHEMA_VERSION + 1}.*writes version {SCHEMA_VERSION}"
    ):
        check_identity(load_manifest(tmp_path), IDENTITY, tmp_path)


def test_the_identity_is_written_flat_with_parts_and_read_back_the_same(tmp_path):
    identity = changed(parts=4, rows_per_shard=100, long_lines="window", stride=2048)
    save_manifest(Manifest(identity=identity), tmp_path)
    written = json.loads((tmp_path / MANIFEST).read_text())["identity"]
    assert written["parts"] == 4 and "num_shards" not in written
    assert written["k"] == 16
    assert written["inputs"] == [{"name": "corpus.jsonl", "size": 1234, "head_sha256": "ffee"}]
    assert load_manifest(tmp_path).identity == identity
    # The shard metadata carries the same identity (the inputs' fingerprints only in the manifest)
    # and reads back into the same type.
    assert RunIdentity.from_metadata(identity.schema()) == identity.model_copy(update={"inputs": ()})
    assert RunIdentity.from_metadata(identity.schema()).parts == 4


def test_a_manifest_written_before_parts_reads_and_resumes(tmp_path):
    # What teacher-farm wrote before the client processes were called parts: ``num_shards``.
    old = {
        **IDENTITY.entries(),
        "num_shards": 2,
        "rows_per_shard": 64,
        "text_field": "text",
        "id_field": "id",
        "ids_field": "input_ids",
        "long_lines": "truncate",
        "stride": None,
    }
    del old["parts"]
    (tmp_path / MANIFEST).write_text(
        json.dumps({"schema_version": SCHEMA_VERSION, "identity": old, "shards": {}, "complete": True})
    )
    loaded = load_manifest(tmp_path)
    assert loaded.identity.parts == 2 and loaded.identity.cache == IDENTITY.cache
    assert CacheDir(tmp_path).identity == IDENTITY.cache
    check_identity(loaded, changed(parts=2, rows_per_shard=64), tmp_path)  # the same run: it resumes
    with pytest.raises(CacheMismatch, match="parts: 2 there, 1 now"):
        check_identity(loaded, changed(parts=1, rows_per_shard=64), tmp_path)
