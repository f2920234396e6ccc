"""The compact format's values entropy-coded per row (schema 5): exact round trips, smaller than schema 4,
targets read from their top-k slot, malformed rows refused, schema 4 still read."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.client.shards import ShardWriter
from teacher_farm.schemas import coding
from teacher_farm.schemas.arrow import (
    ScoredSequence,
    cache_schema,
    cast_logprobs,
    decode_rows,
    encode_rows,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.formats import GAP_STEP, MASK_SLOTS
from teacher_farm.schemas.positions import thin
from teacher_farm.schemas.reader import read_rows, row_group_arrays
from tests.test_formats import identity, write_shard
from tests.test_id_codes import peaked


def test_classes_round_trip_at_their_edges():
    values = np.concatenate([np.arange(0, 4096), (1 << np.arange(12, 24)) - 1, (1 << np.arange(12, 24)) - 2])
    cls, nbits, low = coding.to_classes(values)
    assert cls.max() < coding.CLASSES and (low < (1 << nbits)).all() and (low >= 0).all()
    np.testing.assert_array_equal(coding.class_bits(cls), nbits)
    np.testing.assert_array_equal(coding.from_classes(cls, low), values)
    assert coding.to_classes(np.arange(7))[1].max() == 0  # small values are their class alone
    with pytest.raises(ValueError, match="must lie in"):
        coding.to_classes(np.array([coding.VALUE_LIMIT]))


def random_values(rng: np.random.Generator, P: int, k: int, samples: int) -> coding.Values:
    v = coding.Values()
    if k:
        v.codes = np.minimum(rng.zipf(1.3, (P, k)) - 1, coding.VALUE_LIMIT - 1)
        if k > 1:
            v.gaps = rng.integers(0, 256, (P, k - 1))
    if samples:
        if k:
            v.drawn = rng.random((P, min(k, MASK_SLOTS))) < 0.2
        v.anchor_slots = rng.integers(0, 6, P) * (rng.random(P) < 0.5)
        v.from_anchor = rng.random(int(v.anchor_slots.sum())) < 0.3
        v.next_drawn = rng.random(P) < 0.6
        v.distinct = np.zeros(P, np.int64)  # named() needs it: then named, anchored, the next token, others
        v.distinct = v.named() + v.anchored() + v.next_drawn + rng.integers(0, 8, P)
        v.distinct[v.distinct == 0] = 1
        rest = v.rest()
        v.rank_gaps = np.minimum(rng.zipf(1.2, int(rest.sum())) - 1, 1 << 20)
        # Counts of at least one each, summing to the draws at every position.
        v.counts = np.concatenate([partition(rng, samples, m) for m in v.distinct])
    return v


def partition(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


@pytest.mark.parametrize("k,samples", [(16, 0), (1, 0), (0, 64), (16, 64), (70, 300)])
def test_values_round_trip_exactly_row_by_row(k, samples):
    rng = np.random.default_rng(k + samples)
    positions = np.array([0, 5, 1, 130, 0, 17])
    values = random_values(rng, int(positions.sum()), k, samples)
    models = coding.Models.fit(random_values(rng, 40, k, samples), k, samples)  # other rows' counts
    models = coding.Models.unpack(models.pack())
    blobs = coding.encode(models, values, positions)
    assert len(blobs) == len(positions) and all(len(b) % 4 == 0 for b in blobs)
    back = coding.decode(models, blobs, positions, values.distinct, values.anchor_slots)
    for name in ("codes", "gaps", "drawn", "distinct", "from_anchor", "next_drawn", "rank_gaps", "counts"):
        want, got = getattr(values, name), getattr(back, name)
        assert (want is None) == (got is None), name
        if want is not None:
            np.testing.assert_array_equal(np.asarray(got, np.int64), np.asarray(want, np.int64), err_msg=name)
    if samples:  # a position's last count is not stored: counts that do not sum to the draws are refused
        values.counts[0] += 1
        with pytest.raises(ValueError, match="do not sum"):
            coding.encode(models, values, positions)
        values.counts[0] -= 1
    if k:  # the top-k alone, without the draws' lengths
        top = coding.decode(models, blobs, positions, None)
        np.testing.assert_array_equal(top.codes, values.codes)
        assert top.counts is None


def test_malformed_models_are_refused():
    models = coding.Models.fit(random_values(np.random.default_rng(0), 10, 4, 32), 4, 32)
    import base64
    import zlib

    raw = zlib.decompress(base64.b64decode(models.pack()))
    for bad in (raw[:-3], raw + b"\x01", b"\x07" + raw[1:]):
        with pytest.raises(ValueError):
            coding.Models.unpack(base64.b64encode(zlib.compress(bad)))


def consistent(rng: np.random.Generator, i: int, n: int) -> ScoredSequence:
    """A peaked row whose targets agree with its top-k: the next token's rank and logprob are its slot's."""
    r = peaked(rng, i, n)
    nxt = r.input_ids[1:].astype(np.int64)
    match = r.topk_ids[:-1] == nxt[:, None]
    inside, slot = match.any(axis=1), match.argmax(axis=1)
    ranks = np.where(inside, slot + 1, r.target_ranks + 16).astype(np.int32)
    logprobs = np.where(inside, r.topk_logprobs[:-1][np.arange(n - 1), slot], r.target_logprobs - 20)
    return ScoredSequence(
        **{**r.__dict__, "target_ranks": ranks, "target_logprobs": logprobs.astype(np.float32)}
    )


@pytest.mark.parametrize("targets", ["topk", "sampled", "both"])
def test_schema_5_reads_back_what_schema_4_holds_and_is_smaller(tmp_path, targets):
    rng = np.random.default_rng(5)
    results = [consistent(rng, i, n) for i, n in enumerate([300, 1, 2, 250, 40])]
    ident = identity("uint8-gap", targets=targets, sample_logprobs=targets != "topk")
    s = ident.scoring
    old = cache_schema(
        "uint8-gap", targets, k=s.k, samples=s.samples, sample_logprobs=ident.sample_logprobs, version=4
    ).with_metadata(ident.schema().metadata)
    (tmp_path / "v5").mkdir()
    (tmp_path / "v4").mkdir()
    new_rows = write_shard(tmp_path / "v5", results, ident)
    table = with_source_columns(results_to_table(results, s.k, targets), range(len(results)))
    writer = ShardWriter(tmp_path / "v4", 0, old)
    writer.write(encode_rows(cast_logprobs(table, "float32"), old))
    old_rows = pq.read_table(tmp_path / "v4" / writer.commit().file)
    assert "coded" in new_rows.column_names and "coded" not in old_rows.column_names
    a, b = row_group_arrays(new_rows, ranks=True), row_group_arrays(old_rows, ranks=True)
    names = ("input_ids", "topk_ids", "sample_ids", "sample_counts", "sample_logprobs", "sample_lengths")
    for name in (*names, "target_ranks"):
        if getattr(b, name) is not None:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if targets != "sampled":
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        # A target among the top-k reads as its slot's logprob (in float16): within a gap step.
        np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=GAP_STEP / 2 + 2e-3)
        stored = np.concatenate(new_rows.column("target_ranks").to_numpy(zero_copy_only=False))
        assert (stored == 0).mean() > 0.6  # most targets are in the top-k: stored by their slot
    else:
        np.testing.assert_array_equal(a.target_logprobs, b.target_logprobs)
    for x, y in zip(decode_rows(new_rows).to_pylist(), decode_rows(old_rows).to_pylist()):
        assert x.keys() == y.keys() and x["input_ids"] == y["input_ids"]
    size = {v: column_bytes(tmp_path / v / "part-000000.parquet") for v in ("v4", "v5")}
    assert size["v5"] < 0.95 * size["v4"], size  # the columns (a shard's models are in its footer)
    # A reader that asks for a few columns gets what decodes them.
    picked, problems = read_rows(
        tmp_path / "v5" / "part-000000.parquet", np.array([0, 3]), ["target_logprobs"]
    )
    assert problems == []
    np.testing.assert_allclose(
        row_group_arrays(picked).target_logprobs,
        np.concatenate([results[0].target_logprobs, results[3].target_logprobs]),
        atol=GAP_STEP / 2 + 0.02,
    )


def column_bytes(path) -> int:
    meta = pq.ParquetFile(path).metadata
    return sum(
        meta.row_group(g).column(c).total_compressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
    )


def test_positions_dropped_are_not_coded_and_read_back(tmp_path):
    rng = np.random.default_rng(9)
    results = [consistent(rng, i, n) for i, n in enumerate([200, 3, 90])]
    kept = rng.random(sum(len(r.input_ids) for r in results)) < 0.3
    ident = identity("uint8-gap", targets="both", sample_logprobs=False)
    whole = with_source_columns(results_to_table(results, 16, "both"), range(3))
    rows = encode_rows(cast_logprobs(thin(whole, kept), "float32"), ident.schema())
    full = encode_rows(cast_logprobs(whole, "float32"), ident.schema())
    assert sum(map(len, rows.column("coded").to_pylist())) < 0.5 * sum(
        map(len, full.column("coded").to_pylist())
    )
    a = row_group_arrays(rows)
    np.testing.assert_array_equal(a.kept, kept)
    want = np.concatenate([r.topk_ids for r in results])
    np.testing.assert_array_equal(a.topk_ids[kept], want[kept])
    assert (a.sample_lengths[~kept] == 0).all()


def test_rows_read_with_another_shards_models_or_cut_short_are_refused():
    rng = np.random.default_rng(2)
    ident = identity("uint8-gap", targets="both", sample_logprobs=False)

    def rows(seed_rows):
        table = with_source_columns(results_to_table(seed_rows, 16, "both"), range(len(seed_rows)))
        return encode_rows(cast_logprobs(table, "float32"), ident.schema())

    one, two = rows([consistent(rng, 0, 80)]), rows([consistent(rng, 1, 60)])
    mixed = two.replace_schema_metadata(one.schema.metadata)
    with pytest.raises(InputError, match="another shard"):
        row_group_arrays(mixed)
    blob = one.column("coded").to_pylist()[0]
    for bad in (blob[: len(blob) // 2], blob[:-1]):
        cut = one.set_column(
            one.schema.get_field_index("coded"), one.schema.field("coded"), pa.array([bad], pa.binary())
        )
        with pytest.raises(InputError, match="malformed"):
            row_group_arrays(cut)
    stripped = one.replace_schema_metadata(
        {k: v for k, v in one.schema.metadata.items() if k != coding.CODING_KEY}
    )
    with pytest.raises(InputError, match="models|another shard"):
        row_group_arrays(stripped)


def test_verify_accepts_a_target_read_from_its_slot_and_not_a_moved_one(tmp_path):
    from teacher_farm.client.compare import compare_row
    from teacher_farm.client.verify import CACHE_COLUMNS, table_rows

    rng = np.random.default_rng(4)
    results = [consistent(rng, i, n) for i, n in enumerate([200, 90])]
    write_shard(tmp_path, results, identity("uint8-gap", targets="topk"))
    rows, _ = read_rows(tmp_path / "part-000000.parquet", np.array([0, 1]), CACHE_COLUMNS)
    for cached, r in zip(table_rows(rows), results):
        fresh = {name: getattr(r, name) for name in ("input_ids", "topk_ids", "topk_logprobs")}
        fresh |= {"target_logprobs": r.target_logprobs, "target_ranks": r.target_ranks}
        # Read from the top-k, such targets are up to 1/32 nat off: more than the atol, as their slot reads.
        assert np.abs(cached["target_logprobs"] - r.target_logprobs).max() > 0.01
        assert compare_row(cached, fresh, k=16, atol=0.01, logprob_dtype="uint8-gap")[0] == []
        moved = dict(fresh, target_logprobs=r.target_logprobs - 0.2)
        problems, _ = compare_row(cached, moved, k=16, atol=0.01, logprob_dtype="uint8-gap")
        assert any("target_logprobs differ" in p for p in problems)


def test_a_compact_shard_counts_its_models_on_its_first_answers_and_stores_them_once(tmp_path):
    from teacher_farm.client import shards
    from teacher_farm.schemas.arrow import ID_ORDER_KEY

    rng = np.random.default_rng(6)
    results = [consistent(rng, i, n) for i, n in enumerate([300, 200, 250, 100])]
    ident = identity("uint8-gap", targets="both", sample_logprobs=False)
    table = cast_logprobs(with_source_columns(results_to_table(results, 16, "both"), range(4)), "float32")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    writer = ShardWriter(tmp_path / "a", 0, ident.schema())
    for i in range(4):  # answers of one line: all within FIT_TOKENS, held back and encoded together
        assert writer.write_results(table.slice(i, 1)) == len(results[i].input_ids)
    path = tmp_path / "a" / writer.commit().file
    at_once = encode_rows(table, ident.schema()).schema.metadata
    meta = pq.ParquetFile(path).metadata.metadata
    assert (
        meta[ID_ORDER_KEY] == at_once[ID_ORDER_KEY] and meta[coding.CODING_KEY] == at_once[coding.CODING_KEY]
    )
    # Its metadata once, in the file's key-value pairs (no Arrow schema), which every reader returns.
    assert b"ARROW:schema" not in meta
    for schema in (
        pq.read_schema(path),
        pq.read_table(path).schema,
        pq.ParquetFile(path).read_row_group(0).schema,
    ):
        assert schema.metadata[coding.CODING_KEY] == meta[coding.CODING_KEY]
    a = row_group_arrays(pq.read_table(path))
    np.testing.assert_array_equal(a.topk_ids, np.concatenate([r.topk_ids for r in results]))
    # Past FIT_TOKENS the first answers' order and models are the shard's: the later ones coded under them.
    writer = ShardWriter(tmp_path / "b", 0, ident.schema())
    old, shards.FIT_TOKENS = shards.FIT_TOKENS, 1
    try:
        for i in range(4):
            writer.write_results(table.slice(i, 1))
    finally:
        shards.FIT_TOKENS = old
    first = encode_rows(table.slice(0, 1), ident.schema()).schema.metadata
    meta = pq.ParquetFile(tmp_path / "b" / writer.commit().file).metadata.metadata
    assert meta[ID_ORDER_KEY] == first[ID_ORDER_KEY] != at_once[ID_ORDER_KEY]


def test_targets_read_without_their_ranks_are_refused_not_misread():
    rng = np.random.default_rng(12)
    ident = identity("uint8-gap", targets="topk")
    table = with_source_columns(results_to_table([consistent(rng, 0, 120)], 16, "topk"), [0])
    rows = encode_rows(cast_logprobs(table, "float32"), ident.schema())
    with pytest.raises(InputError, match="without target_ranks"):
        decode_rows(rows.drop_columns(["target_ranks"]))
