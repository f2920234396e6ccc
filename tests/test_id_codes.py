"""The compact format's ids as codes (schema 4, still read; schema 5 entropy-codes the same codes:
``test_coding``): exact round trips, every reader, schema 3 still read."""

from __future__ import annotations

import functools
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from benchmarks.formats import as_schema_3
from teacher_farm.client.inspect import inspect_cache
from teacher_farm.client.manifest import save_manifest
from teacher_farm.schemas.arrow import (
    ID_ORDER_KEY,
    ScoredSequence,
    cache_schema,
    cast_logprobs,
    decode_rows,
    encode_rows,
    flat_values,
    results_to_table,
    topk_ids_of,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import Manifest, ShardRecord
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.formats import (
    FORMATS,
    ORDER_MIN_COUNT,
    anchors,
    decode_topk_ids,
    encode_topk_ids,
    frequency_order,
    from_ranks,
    id_sorted,
    next_tokens,
    rank_sorted,
    to_ranks,
    unpack_order,
)
from teacher_farm.schemas.positions import thin
from teacher_farm.schemas.reader import read_rows, row_group_arrays
from tests.test_formats import check_within, draws, identity, stated_bound, write_shard

#: SmolLM2's vocabulary.
VOCAB = 49_152
K = 16


def peaked(rng: np.random.Generator, i: int, n: int, k: int = K, samples: int = 64) -> ScoredSequence:
    """A row as a small real teacher scores text: the next token the argmax at ~57% of positions and in the
    top-k at ~84%, the other candidates drawn from a list that depends on the current token (a word is
    followed by much the same words each time it occurs)."""
    words = np.minimum(rng.zipf(1.2, n) - 1, VOCAB - 1)
    candidates = (words[:, None] * 7919 + np.arange(4 * k)[None, :] * 104729) % VOCAB
    ids = np.empty((n, k), np.int64)
    for p in range(n):  # a test's rows: a few hundred positions
        ids[p] = rng.choice(candidates[p], k, replace=False)
    nxt = np.append(words[1:], -1)
    slot = np.where(rng.random(n) < 0.57, 0, rng.integers(1, 3 * k, n))
    for p in np.flatnonzero((slot < k) & (nxt >= 0)):
        ids[p] = np.where(ids[p] == nxt[p], ids[p, slot[p]], ids[p])  # keep the ids distinct
        ids[p, slot[p]] = nxt[p]
    lp = np.sort(-rng.exponential(1.5, (n, k)), axis=1)[:, ::-1].astype(np.float32)
    return ScoredSequence(
        id=f"doc-{i}",
        input_ids=words.astype(np.int32),
        topk_ids=ids.astype(np.int32),
        topk_logprobs=lp,
        target_logprobs=-rng.exponential(2.0, n - 1).astype(np.float32),
        target_ranks=rng.integers(1, 40, n - 1).astype(np.int32),
        **draws(rng, n, samples),
    )


def test_codes_round_trip_exactly_with_positions_dropped():
    rng = np.random.default_rng(0)
    rows = [peaked(rng, i, n) for i, n in enumerate([1, 300, 2, 1, 57])]
    lengths = np.array([len(r.input_ids) for r in rows])
    tokens = np.concatenate([r.input_ids for r in rows])
    ids = np.concatenate([r.topk_ids for r in rows]).astype(np.int64)
    nxt = next_tokens(tokens, lengths)
    assert (nxt[np.cumsum(lengths) - 1] == -1).all()
    for kept in (None, rng.random(len(tokens)) < 0.6):
        anchor = anchors(tokens, lengths, kept)
        codes = encode_topk_ids(ids, nxt, anchor)
        keep = np.ones(len(tokens), bool) if kept is None else kept
        np.testing.assert_array_equal(decode_topk_ids(codes, nxt, anchor)[keep], ids[keep])
        # An anchor is a kept position of the same row with the same token, never after its positions.
        row = np.repeat(np.arange(len(lengths)), lengths)
        assert (tokens[anchor] == tokens).all() and (row[anchor] == row).all()
        assert (anchor <= np.arange(len(tokens))).all() and keep[
            anchor[anchor != np.arange(len(tokens))]
        ].all()
    # Many ids of such a teacher become small numbers: the next token or a rank in the anchor's list.
    anchor = anchors(tokens, lengths)
    codes = encode_topk_ids(ids, nxt, anchor)
    referring = anchor != np.arange(len(tokens))
    assert ((codes > 0) & (codes <= K))[referring].mean() > 0.15 and (codes == 0).mean() > 0.5 / K


def test_codes_that_cannot_be_are_refused():
    tokens, lengths = np.array([5, 6, 5]), np.array([3])
    nxt, anchor = next_tokens(tokens, lengths), anchors(tokens, lengths)
    ids = np.array([[6, 1], [5, 2], [7, 1]])
    codes = encode_topk_ids(ids, nxt, anchor)
    assert codes.tolist() == [[0, 4], [0, 5], [10, 2]]  # k + 1 + id, 0: next token, 1 + j: the anchor's j-th
    with pytest.raises(ValueError, match="last position"):
        decode_topk_ids(np.array([[3, 4], [0, 5], [0, 2]]), nxt, anchor)
    with pytest.raises(ValueError, match="no anchor"):
        decode_topk_ids(np.array([[1, 4], [0, 5], [10, 2]]), nxt, anchor)


@pytest.fixture(autouse=True)
def schema_4(request, monkeypatch):
    """These tests hold schema 4's layout (it still reads): a cache identity's schema is that one, unless a
    test asks for the current one (``layout`` 5)."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("layout") == 5:
        return
    from teacher_farm.schemas import cache_dir

    monkeypatch.setattr(cache_dir, "cache_schema", functools.partial(cache_schema, version=4))


@pytest.mark.parametrize("layout", [4, 5])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("targets", ["topk", "both"])
def test_every_reader_reads_every_format(tmp_path, fmt, targets, layout):
    torch = pytest.importorskip("torch")
    from teacher_farm.client.report import scan
    from teacher_farm.client.verify import CACHE_COLUMNS, table_rows
    from teacher_farm.training import TopkDataset

    rng = np.random.default_rng(3)
    results = [peaked(rng, i, n) for i, n in enumerate([40, 1, 120, 9])]
    ident = identity(fmt, targets=targets, sample_logprobs=False)
    stored = write_shard(tmp_path, results, ident)
    coded = "coded" if layout == 5 else "topk_id_codes"
    assert (coded in stored.column_names) == FORMATS[fmt].gaps
    manifest_for(tmp_path, ident, results)
    ids = [r.topk_ids for r in results]

    # The numpy reader, the table decoder, verify's rows (read through only the columns it names).
    a = row_group_arrays(stored)
    np.testing.assert_array_equal(a.topk_ids, np.concatenate(ids))
    want = np.concatenate([r.topk_logprobs for r in results])
    check_within(a.topk_logprobs, want, *stated_bound(fmt, want), f"{fmt} top-k")
    decoded = decode_rows(stored)
    assert "topk_id_codes" not in decoded.column_names
    assert decoded.column("topk_ids").to_pylist() == [r.topk_ids.tolist() for r in results]
    picked, problems = read_rows(tmp_path / "part-000000.parquet", np.array([0, 2]), ["id", "topk_ids"])
    assert problems == [] and ("input_ids" in picked.column_names) == FORMATS[fmt].gaps
    np.testing.assert_array_equal(topk_ids_of(picked)[1], np.concatenate([ids[0], ids[2]]))
    some, _ = read_rows(tmp_path / "part-000000.parquet", np.array([1, 3]), CACHE_COLUMNS)
    for r, row in zip([results[1], results[3]], table_rows(some)):
        np.testing.assert_array_equal(row["topk_ids"], r.topk_ids)
        np.testing.assert_array_equal(row["target_ranks"], r.target_ranks)

    # The student's dataset, the report and inspect.
    items = sorted(TopkDataset(tmp_path), key=lambda x: int(x["line"]))
    for r, item in zip(results, items):
        assert item["topk_ids"].dtype == torch.long
        np.testing.assert_array_equal(item["topk_ids"].numpy(), r.topk_ids)
    stats, _ = scan(tmp_path)
    assert stats.tokens == sum(len(r.input_ids) for r in results)
    summary, problems = inspect_cache(tmp_path)
    assert problems == [] and "schema:     v5" in summary  # the version a run writes (its manifest's)


def test_dropped_positions_read_as_zeros_and_their_anchors_are_never_used():
    rng = np.random.default_rng(4)
    results = [peaked(rng, i, n) for i, n in enumerate([200, 30])]
    ident = identity("uint8-gap", targets="topk")
    kept = rng.random(230) < 0.3
    kept[[0, 199, 229]] = False  # the rows' first and last positions dropped too
    ids = np.concatenate([r.topk_ids for r in results])
    # Thinned before encoding (what a --positions run writes): anchors only at kept positions.
    table = with_source_columns(results_to_table(results, K, "topk"), range(2))
    encoded = encode_rows(thin(cast_logprobs(table, "float32"), kept), ident.schema())
    a = row_group_arrays(encoded)
    np.testing.assert_array_equal(a.kept, kept)
    np.testing.assert_array_equal(a.topk_ids[kept], ids[kept])
    assert (a.topk_ids[~kept] == 0).all()
    assert decode_rows(encoded).column("topk_ids").to_pylist()[0][199] is None


def manifest_for(out, ident, results, schema_version: int | None = None) -> None:
    path = out / "part-000000.parquet"
    record = ShardRecord(
        index=0,
        file=path.name,
        first_line=0,
        end_line=len(results),
        rows=len(results),
        rejects=0,
        tokens=sum(len(r.input_ids) for r in results),
        bytes=path.stat().st_size,
        sha256="0" * 64,
    )
    extra = {} if schema_version is None else {"schema_version": schema_version}
    save_manifest(
        Manifest(**extra, identity={**ident.entries(), "max_length": 512}, shards={0: record}, complete=True),
        out,
    )


def test_a_schema_3_compact_cache_still_reads_everywhere(tmp_path):
    """Schema 3's ``uint8-gap``: plain ``topk_ids``, version 3 in the metadata."""
    pytest.importorskip("torch")
    from teacher_farm.client.report import scan
    from teacher_farm.training import TopkDataset

    rng = np.random.default_rng(5)
    results = [peaked(rng, i, n) for i, n in enumerate([12, 5, 33])]
    ident = identity("uint8-gap", sample_logprobs=False)
    new = write_shard(tmp_path, results, ident)
    (tmp_path / "part-000000.parquet").unlink()
    old = as_schema_3(new)
    assert "sample_id_gaps" in old.column_names and "id_order" not in old.column_names
    meta = {**old.schema.metadata, b"teacher_farm.schema_version": json.dumps(3).encode()}
    pq.write_table(old.replace_schema_metadata(meta), tmp_path / "part-000000.parquet", compression="zstd")
    manifest_for(tmp_path, ident, results, schema_version=3)
    stored = pq.read_table(tmp_path / "part-000000.parquet")
    assert stored.schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32(), K))
    a = row_group_arrays(stored)
    np.testing.assert_array_equal(a.topk_ids, np.concatenate([r.topk_ids for r in results]))
    np.testing.assert_array_equal(
        a.sample_ids[0, : a.sample_lengths[0]], results[0].sample_ids[: results[0].sample_lengths[0]]
    )
    items = sorted(TopkDataset(tmp_path), key=lambda x: int(x["line"]))
    for r, item in zip(results, items):
        np.testing.assert_array_equal(item["topk_ids"].numpy(), r.topk_ids)
    stats, metadata = scan(tmp_path)
    assert stats.tokens == 50 and metadata["schema_version"] == "3"
    summary, problems = inspect_cache(tmp_path)
    assert problems == [] and "schema:     v3" in summary


def test_malformed_codes_are_an_input_error(tmp_path):
    rng = np.random.default_rng(6)
    stored = write_shard(tmp_path, [peaked(rng, 0, 20)], identity("uint8-gap", targets="topk"))
    codes = stored.column("topk_id_codes").combine_chunks()
    values = codes.flatten().flatten().to_numpy().copy()
    values[-K:] = 0  # the last position's ids coded as its next token: there is none
    bad = pa.ListArray.from_arrays(
        codes.offsets, pa.FixedSizeListArray.from_arrays(pa.array(values, pa.int32()), K)
    )
    broken = stored.set_column(stored.schema.get_field_index("topk_id_codes"), "topk_id_codes", bad)
    with pytest.raises(InputError, match="malformed cache rows: .*last position"):
        row_group_arrays(broken)


def test_rows_read_with_another_shards_id_order_are_refused(tmp_path):
    rng = np.random.default_rng(8)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_shard(tmp_path / "a", [peaked(rng, 0, 300)], identity("uint8-gap", targets="topk"))
    b = write_shard(tmp_path / "b", [peaked(rng, 1, 300)], identity("uint8-gap", targets="topk"))
    assert a.schema.metadata[ID_ORDER_KEY] != b.schema.metadata[ID_ORDER_KEY]
    with pytest.raises(InputError, match="another shard's id order"):
        row_group_arrays(pa.concat_tables([a, b]))
    with pytest.raises(InputError, match="without their shard's id order"):
        row_group_arrays(b.replace_schema_metadata({}))


def test_the_id_order_packs_exactly_and_leaves_out_ids_seen_once():
    rng = np.random.default_rng(9)
    ids = np.minimum(rng.zipf(1.3, 50_000), VOCAB - 1)
    order = unpack_order(frequency_order(ids))
    distinct, counts = np.unique(ids, return_counts=True)
    often = counts >= ORDER_MIN_COUNT
    np.testing.assert_array_equal(order, distinct[often][np.lexsort((distinct[often], -counts[often]))])
    assert len(frequency_order(ids)) < 2 * len(order)  # about a byte an id
    assert unpack_order(frequency_order(np.array([], np.int64))).size == 0
    ranks = to_ranks(ids, order)
    np.testing.assert_array_equal(from_ranks(ranks, order), ids)
    assert ranks[ids == order[0]].max() == 0 and (ranks[~np.isin(ids, order)] >= order.size).all()


def test_draws_stored_by_rank_read_back_ascending_with_their_counts():
    rng = np.random.default_rng(10)
    d = draws(rng, 50, 64)
    lengths, ids = d["sample_lengths"], d["sample_ids"].astype(np.int64)
    order = unpack_order(frequency_order(ids))
    ranks, perm = rank_sorted(ids, lengths, order)
    owner = np.repeat(np.arange(50), lengths)
    assert (np.diff(ranks)[np.diff(owner) == 0] > 0).all()  # ascending within each position: small gaps
    back, undo = id_sorted(ranks, lengths, order)
    np.testing.assert_array_equal(back, ids)
    np.testing.assert_array_equal(d["sample_counts"][perm][undo], d["sample_counts"])


def test_a_cache_of_draws_only_reads_back_exactly(tmp_path):
    rng = np.random.default_rng(11)
    results = [peaked(rng, i, n) for i, n in enumerate([30, 1, 80])]
    ident = identity("uint8-gap", targets="sampled", sample_logprobs=True)
    stored = write_shard(tmp_path, results, ident)
    assert "sample_rank_gaps" in stored.column_names and "topk_id_codes" not in stored.column_names
    a = row_group_arrays(stored)
    filled = np.arange(a.sample_ids.shape[1])[None, :] < a.sample_lengths[:, None]
    np.testing.assert_array_equal(a.sample_ids[filled], np.concatenate([r.sample_ids for r in results]))
    np.testing.assert_array_equal(a.sample_counts[filled], np.concatenate([r.sample_counts for r in results]))
    want = np.concatenate([r.sample_logprobs for r in results])
    np.testing.assert_array_equal(a.sample_logprobs[filled], want.astype(np.float16).astype(np.float32))
    decoded = decode_rows(stored)
    assert decoded.column("sample_counts").to_pylist()[2] == [
        r.tolist() for r in np.split(results[2].sample_counts, np.cumsum(results[2].sample_lengths)[:-1])
    ]


def test_draws_among_the_top_k_are_named_by_their_slots(tmp_path):
    rng = np.random.default_rng(12)
    results = [peaked(rng, i, n) for i, n in enumerate([25, 60])]
    for r in results:  # every position's first draw is its top-1
        starts = np.cumsum(r.sample_lengths) - r.sample_lengths
        r.sample_ids[starts] = r.topk_ids[:, 0]
    results = [ScoredSequence(**{**r.__dict__, **resort(r)}) for r in results]
    stored = write_shard(tmp_path, results, identity("uint8-gap", targets="both", sample_logprobs=True))
    mask = flat_values(stored.column("sample_in_topk")).to_numpy()
    assert (mask & 1).all() and mask.dtype == np.int64
    a = row_group_arrays(stored)
    filled = np.arange(a.sample_ids.shape[1])[None, :] < a.sample_lengths[:, None]
    np.testing.assert_array_equal(a.sample_ids[filled], np.concatenate([r.sample_ids for r in results]))
    np.testing.assert_array_equal(a.sample_counts[filled], np.concatenate([r.sample_counts for r in results]))
    with pytest.raises(InputError, match="without sample_in_topk"):
        row_group_arrays(stored.drop_columns(["sample_in_topk"]))
    picked, _ = read_rows(tmp_path / "part-000000.parquet", np.array([1]), ["sample_ids", "sample_counts"])
    assert {"sample_in_topk", "topk_id_codes", "input_ids", "id_order"} <= set(picked.column_names)
    want = np.split(results[1].sample_ids, np.cumsum(results[1].sample_lengths)[:-1])
    assert decode_rows(picked).column("sample_ids").to_pylist()[0] == [w.tolist() for w in want]


def resort(r: ScoredSequence) -> dict[str, np.ndarray]:
    """Draws ascending and distinct within each position again, counts and logprobs beside them."""
    owner = np.repeat(np.arange(len(r.sample_lengths)), r.sample_lengths)
    key = owner * (VOCAB + 1) + r.sample_ids
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), bool)
    keep[first] = True
    order = np.lexsort((r.sample_ids, owner))
    order = order[keep[order]]
    return {
        "sample_lengths": np.bincount(owner[order], minlength=len(r.sample_lengths)).astype(np.int32),
        "sample_ids": r.sample_ids[order],
        "sample_counts": r.sample_counts[order],
        "sample_logprobs": r.sample_logprobs[order],
    }
