"""Every stored format reads back what the teacher sent, within the error it states; old caches still read."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.client.inspect import inspect_cache
from teacher_farm.client.manifest import save_manifest
from teacher_farm.client.shards import ShardWriter
from teacher_farm.schemas.arrow import (
    ScoredSequence,
    cache_schema,
    cast_logprobs,
    decode_rows,
    encode_rows,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import CacheIdentity, Manifest, ShardRecord
from teacher_farm.schemas.formats import (
    FORMATS,
    GAP_CLIP,
    GAP_STEP,
    decode_gaps,
    encode_gaps,
    id_gaps,
    ids_from_gaps,
    logprob_format,
    value_ulp,
)
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.training.reader import RowGroupArrays, row_group_arrays
from tests.conftest import table_to_results

#: Ids need 18 bits here: more than any 16-bit type holds.
VOCAB = 150_000
K = 16


def sorted_logprobs(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Top-k logprobs as a peaked teacher gives them: most likely first, steps of a fraction of a nat."""
    top1 = -rng.exponential(0.8, (n, 1))
    return (
        (top1 - np.cumsum(rng.exponential(0.35, (n, k)), axis=1) + rng.exponential(0.35, (n, 1)))
        .astype(np.float32)
        .clip(max=top1.astype(np.float32))
    )


def zipf_ids(rng: np.random.Generator, size, vocab: int = VOCAB) -> np.ndarray:
    """Token ids drawn the way text uses them: a few often, most rarely."""
    return np.minimum(rng.zipf(1.3, size) - 1, vocab - 1).astype(np.int32)


def draws(rng: np.random.Generator, n: int, samples: int) -> dict[str, np.ndarray]:
    """``samples`` draws per position, compacted to distinct ids (ascending) with counts and logprobs."""
    lengths, ids, counts = [], [], []
    for _ in range(n):
        drawn, count = np.unique(zipf_ids(rng, samples), return_counts=True)
        lengths.append(len(drawn))
        ids.append(drawn)
        counts.append(count)
    total = int(sum(lengths))
    return {
        "sample_lengths": np.array(lengths, np.int32),
        "sample_ids": np.concatenate(ids).astype(np.int32),
        "sample_counts": np.concatenate(counts).astype(np.int16),
        "sample_logprobs": -rng.exponential(2.0, total).astype(np.float32),
    }


def sequence(
    rng: np.random.Generator, i: int, n: int, k: int = K, samples: int = 64, hard: bool = True
) -> ScoredSequence:
    lp = sorted_logprobs(rng, n, k)
    if hard and n >= 4 and k >= 4:
        lp[0, k // 2 :] = -np.inf  # tokens the teacher rules out
        lp[1, 1:] = (
            lp[1, 0] - np.array([15.8, 15.9, 16.0, 40.0, 300.0, 1e4, *([2e4] * (k - 7))])[: k - 1]
        )  # at the clip
        lp[2, 0] = -1e-6  # a certain token; the rest far below
        lp[3, :] = lp[3, 0]  # ties
    ids = np.stack([rng.choice(VOCAB, k, replace=False) for _ in range(n)]).astype(np.int32)
    ids[:, 0] = VOCAB - 1 - i  # ids near the top of the vocabulary
    return ScoredSequence(
        id=f"doc-{i}",
        input_ids=zipf_ids(rng, n),
        topk_ids=ids,
        topk_logprobs=lp,
        target_logprobs=-rng.exponential(3.0, n - 1).astype(np.float32) - (rng.random(n - 1) < 0.1) * 30,
        target_ranks=rng.integers(1, 5000, n - 1).astype(np.int32),
        **draws(rng, n, samples),
    )


def identity(
    fmt: str, targets: str = "both", k: int = K, samples: int = 64, sample_logprobs: bool = True
) -> CacheIdentity:
    return CacheIdentity(
        model="teacher",
        model_fingerprint="mf",
        tokenizer_fingerprint="tf",
        vocab_size=VOCAB,
        scoring=Scoring(k=k, targets=targets, samples=samples),
        logprob_dtype=fmt,
        sample_logprobs=sample_logprobs and targets != "topk",
    )


def write_shard(path, results: list[ScoredSequence], ident: CacheIdentity, wire: str = "float32") -> pa.Table:
    """Results as the client writes them: the wire's dtype, then the cache's layout; the shard read back."""
    targets = ident.scoring.targets
    table = with_source_columns(results_to_table(results, ident.scoring.k, targets), range(len(results)))
    writer = ShardWriter(path, 0, ident.schema())
    writer.write(encode_rows(cast_logprobs(table, wire), ident.schema()))
    stats = writer.commit()
    return pq.read_table(path / stats.file)


def stated_bound(fmt: str, want: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """How far below and above the value written a format may read (top-k rows, most likely first)."""
    f = logprob_format(fmt)
    if not f.gaps:
        half = value_ulp(want, f.value_dtype) / 2
        return half, half
    top1 = want[:, :1].astype(np.float16).astype(np.float32)
    below = np.full(want.shape, GAP_STEP / 2, np.float32)
    above = below.copy()
    below[:, :1] = above[:, :1] = value_ulp(want[:, :1], "float16") / 2
    # Further than the clip below the top-1: read at the clip, i.e. above what was written.
    clipped = np.isfinite(want) & (top1 - want > (GAP_CLIP + 0.5) * GAP_STEP)
    above[clipped] = np.inf
    return below, above


def check_within(got: np.ndarray, want: np.ndarray, below: np.ndarray, above: np.ndarray, what: str) -> None:
    inf = ~np.isfinite(want)
    np.testing.assert_array_equal(got[inf], want[inf], err_msg=f"{what}: -inf must stay -inf")
    d = got[~inf].astype(np.float64) - want[~inf]
    assert (d <= above[~inf] + 1e-7).all() and (-d <= below[~inf] + 1e-7).all(), (
        f"{what}: read back {np.abs(d).max():.4g} from what was written"
    )


def per_position(a: RowGroupArrays, name: str) -> list[np.ndarray]:
    """A padded sample array back as one array per position."""
    block = getattr(a, name)
    return [block[p, : a.sample_lengths[p]] for p in range(len(a.sample_lengths))]


# ------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_format_reads_back_within_its_stated_error(tmp_path, fmt):
    rng = np.random.default_rng(7)
    results = [sequence(rng, i, n) for i, n in enumerate([1, 2, 9, 40, 5])]
    stored = write_shard(tmp_path, results, identity(fmt))
    a = row_group_arrays(stored)
    want = np.concatenate([r.topk_logprobs for r in results])
    np.testing.assert_array_equal(a.input_ids, np.concatenate([r.input_ids for r in results]))
    np.testing.assert_array_equal(a.topk_ids, np.concatenate([r.topk_ids for r in results]))
    assert a.topk_ids.max() == VOCAB - 1
    check_within(a.topk_logprobs, want, *stated_bound(fmt, want), f"{fmt} top-k")
    value = FORMATS[fmt].value_dtype
    for name, got in (
        ("target_logprobs", a.target_logprobs),
        ("sample_logprobs", np.concatenate(per_position(a, "sample_logprobs"))),
    ):
        w = np.concatenate([getattr(r, name) for r in results])
        half = value_ulp(w, value) / 2
        check_within(got, w, half, half, f"{fmt} {name}")
    np.testing.assert_array_equal(a.sample_lengths, np.concatenate([r.sample_lengths for r in results]))
    np.testing.assert_array_equal(
        np.concatenate(per_position(a, "sample_ids")), np.concatenate([r.sample_ids for r in results])
    )
    np.testing.assert_array_equal(
        np.concatenate(per_position(a, "sample_counts")), np.concatenate([r.sample_counts for r in results])
    )
    # The per-sequence view (verify, tests) decodes the same way.
    for r, back in zip(results, table_to_results(stored.drop_columns(["line", "source", "offset"]))):
        check_within(back.topk_logprobs, r.topk_logprobs, *stated_bound(fmt, r.topk_logprobs), f"{fmt} row")
        np.testing.assert_array_equal(back.sample_ids, r.sample_ids)


def test_the_worst_error_of_uint8_gap_is_half_a_step_and_it_is_reached():
    rng = np.random.default_rng(0)
    lp = sorted_logprobs(rng, 20_000, K)
    got = decode_gaps(*encode_gaps(lp))
    err = np.abs(got.astype(np.float64) - lp)
    assert err[:, 1:].max() == pytest.approx(GAP_STEP / 2, abs=1e-6)
    assert err[:, 0].max() <= value_ulp(lp[:, 0], "float16").max() / 2
    np.testing.assert_array_equal(FORMATS["uint8-gap"].round_trip(lp), got)


def test_uint8_gap_at_its_edges():
    top = np.float32(-0.5)
    lp = np.array(
        [
            [top, top - 1, -np.inf, -np.inf],  # -inf stays -inf
            [-np.inf] * 4,  # a row the teacher ruled out entirely
            [
                top,
                top + 1e-4,
                top - 15.85,
                top - 15.95,
            ],  # a tie float16 rounding puts above the top-1; the clip
            [top, top - 2, top - 1, top - 3],  # not sorted: the entry above its predecessor reads as it
        ],
        np.float32,
    )
    top1, gaps = encode_gaps(lp)
    got = decode_gaps(top1, gaps)
    np.testing.assert_array_equal(got[0, 2:], [-np.inf, -np.inf])
    assert np.isneginf(got[1]).all()
    assert abs(got[2, 1] - lp[2, 1]) <= GAP_STEP / 2 and abs(got[2, 2] - lp[2, 2]) <= GAP_STEP / 2
    assert got[2, 3] == np.float32(top1[2]) - GAP_CLIP * GAP_STEP > lp[2, 3]
    assert got[3, 2] == got[3, 1] == np.float32(top1[3]) - 2
    assert (np.diff(got[~np.isneginf(got).any(axis=1)], axis=1) <= 0).all()
    assert gaps.dtype == np.uint8 and top1.dtype == np.float16


def test_k_of_one_and_rows_of_one_token(tmp_path):
    rng = np.random.default_rng(3)
    results = [sequence(rng, i, 1, k=1, hard=False) for i in range(3)]
    stored = write_shard(tmp_path, results, identity("uint8-gap", targets="topk", k=1))
    assert "topk_gaps" not in stored.column_names and "topk_top1" in stored.column_names
    a = row_group_arrays(stored)
    assert a.topk_logprobs.shape == (3, 1) and a.target_logprobs.size == 0
    want = np.concatenate([r.topk_logprobs for r in results])
    np.testing.assert_allclose(a.topk_logprobs, want, atol=float(value_ulp(want, "float16").max()))


@pytest.mark.parametrize("samples, counts", [(64, pa.uint8()), (255, pa.uint8()), (300, pa.int16())])
def test_counts_take_the_smallest_type_that_holds_n(tmp_path, samples, counts):
    rng = np.random.default_rng(samples)
    results = [sequence(rng, i, n, samples=samples, hard=False) for i, n in enumerate([3, 4])]
    stored = write_shard(
        tmp_path, results, identity("float16", targets="sampled", samples=samples, sample_logprobs=False)
    )
    assert stored.schema.field("sample_counts").type.value_type.value_type == counts
    assert "sample_logprobs" not in stored.column_names and "topk_ids" not in stored.column_names
    a = row_group_arrays(stored)
    assert a.sample_logprobs is None and (a.sample_counts.sum(axis=1) == samples).all()


def test_sampled_ids_as_gaps_are_exact():
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 6, 300)
    ids = np.concatenate([np.sort(rng.choice(VOCAB, n, replace=False)) for n in lengths]).astype(np.int64)
    gaps = id_gaps(ids, lengths)
    assert (gaps >= 0).all()
    np.testing.assert_array_equal(ids_from_gaps(gaps, lengths), ids)


def test_layout_per_format():
    for fmt in FORMATS:
        schema = cache_schema(fmt, "both", k=K, samples=64, sample_logprobs=False, version=4)
        ids = "topk_id_codes" if FORMATS[fmt].gaps else "topk_ids"
        assert schema.field(ids).type.value_type == pa.list_(pa.int32(), K)
        assert schema.field("sample_counts").type.value_type.value_type == pa.uint8()
        assert "sample_logprobs" not in schema.names
        gaps = FORMATS[fmt].gaps
        assert ("topk_logprobs" in schema.names) != gaps and ("sample_rank_gaps" in schema.names) == gaps
    schema = cache_schema("uint8-gap", "both", k=K, samples=64, version=4)
    assert schema.field("topk_gaps").type.value_type == pa.list_(pa.uint8(), K - 1)
    assert schema.field("topk_top1").type.value_type == pa.float16()
    assert schema.field("sample_logprobs").type.value_type.value_type == pa.float16()
    # Schema 5 (what a run writes): the compact format's integers in one coded blob a row.
    schema = identity("uint8-gap").schema()
    assert json.loads(schema.metadata[b"teacher_farm.schema_version"]) == 5
    assert (
        schema.field("coded").type == pa.binary() and schema.field("coded").metadata[b"k"] == str(K).encode()
    )
    assert not {"topk_id_codes", "topk_gaps", "sample_rank_gaps", "sample_counts"} & set(schema.names)
    assert schema.field("sample_lengths").type.value_type == pa.uint8()
    assert schema.field("topk_top1").type.value_type == pa.float16()
    assert identity("float16").schema().field("topk_ids").type.value_type == pa.list_(pa.int32(), K)
    with pytest.raises(ValueError, match="give k"):
        cache_schema("uint8-gap", "topk")
    with pytest.raises(ValueError, match="float64"):
        logprob_format("float64")


# ------------------------------------------------------------------------------------ sizes


def compact_sizes(tmp_path, fmt: str) -> dict[str, float]:
    """Bytes per token of each column of a realistic synthetic cache written in ``fmt``."""
    rng = np.random.default_rng(11)
    results = [sequence(rng, i, 256, hard=False) for i in range(24)]
    out = tmp_path / fmt
    out.mkdir()
    write_shard(out, results, identity(fmt, sample_logprobs=False))
    meta = pq.ParquetFile(out / "part-000000.parquet").metadata
    tokens = sum(len(r.input_ids) for r in results)
    sizes: dict[str, float] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size / tokens
    return sizes


def test_the_compact_format_is_smaller_than_float16(tmp_path):
    half, compact = compact_sizes(tmp_path, "float16"), compact_sizes(tmp_path, "uint8-gap")
    values = ("topk_ids", "topk_logprobs", "sample_ids", "sample_counts")  # what the blob codes, and top-1
    assert compact["topk_top1"] + compact["coded"] < 0.8 * sum(half[c] for c in values)
    # Sampled ids: these draws are unrelated to the top-k and the text, so their codes gain nothing here; on
    # a real teacher they do (benchmarks/formats.py, README).
    assert sum(compact.values()) < 0.9 * sum(half.values())


# ------------------------------------------------------------------------------------ schema 2


def write_v2_cache(out, results: list[ScoredSequence], dtype: str = "float16") -> None:
    """A cache as schema 2 wrote it: every column as the server sent it, float logprobs,
    version 2 metadata."""
    out.mkdir(parents=True)
    ident = CacheIdentity(
        model="teacher",
        model_fingerprint="mf",
        tokenizer_fingerprint="tf",
        vocab_size=VOCAB,
        scoring=Scoring(k=K, targets="both", samples=64),
        logprob_dtype=dtype,
    )
    entries = {key: value for key, value in ident.entries().items() if key != "sample_logprobs"}
    metadata = {
        f"teacher_farm.{key}".encode(): (v if isinstance(v, str) else json.dumps(v)).encode()
        for key, v in {"schema_version": 2, "model": "teacher", **entries, "package_version": "0.1.0"}.items()
    }
    schema = cache_schema(dtype, "both").with_metadata(metadata)
    table = with_source_columns(results_to_table(results, K, "both"), range(len(results)))
    table = cast_logprobs(table, dtype).cast(schema)
    pq.write_table(table, out / "part-000000.parquet", compression="zstd")
    size = (out / "part-000000.parquet").stat().st_size
    record = ShardRecord(
        index=0,
        file="part-000000.parquet",
        first_line=0,
        end_line=len(results),
        rows=len(results),
        rejects=0,
        tokens=sum(len(r.input_ids) for r in results),
        bytes=size,
        sha256="0" * 64,
    )
    save_manifest(
        Manifest(schema_version=2, identity={**entries, "max_length": 64}, shards={0: record}, complete=True),
        out,
    )


def test_a_schema_2_cache_still_reads_everywhere(tmp_path):
    torch = pytest.importorskip("torch")
    from teacher_farm.client.report import scan
    from teacher_farm.training import TopkDataset, collate_topk

    rng = np.random.default_rng(5)
    results = [sequence(rng, i, n, hard=False) for i, n in enumerate([4, 7, 2])]
    out = tmp_path / "v2"
    write_v2_cache(out, results)
    stored = pq.read_table(out / "part-000000.parquet")
    assert stored.schema.field("sample_counts").type.value_type.value_type == pa.int16()
    assert decode_rows(stored).equals(stored)

    items = sorted(TopkDataset(out), key=lambda x: int(x["line"]))
    for r, item in zip(results, items):
        np.testing.assert_array_equal(item["topk_ids"].numpy(), r.topk_ids)
        np.testing.assert_array_equal(
            item["topk_logprobs"].numpy(), r.topk_logprobs.astype(np.float16).astype(np.float32)
        )
        np.testing.assert_array_equal(
            item["sample_logprobs"][:, 0].numpy(),
            r.sample_logprobs[np.cumsum(r.sample_lengths) - r.sample_lengths].astype(np.float16),
        )
    batch = collate_topk(items)
    assert batch["sample_logprobs"].dtype == torch.float32 and batch["sample_counts"].sum() == 64 * 13
    stats, meta = scan(out)
    assert stats.tokens == 13 and stats.has_samples and meta["schema_version"] == "2"
    summary, problems = inspect_cache(out)
    assert problems == [] and "schema:     v2" in summary and "64 draws (with their logprobs)" in summary


def test_inspect_names_the_format_and_what_the_draws_keep(tmp_path):
    rng = np.random.default_rng(2)
    ident = identity("uint8-gap", sample_logprobs=False)
    write_shard(tmp_path, [sequence(rng, 0, 5, hard=False)], ident)
    stats = pq.ParquetFile(tmp_path / "part-000000.parquet").metadata
    record = ShardRecord(
        index=0,
        file="part-000000.parquet",
        first_line=0,
        end_line=1,
        rows=1,
        rejects=0,
        tokens=5,
        bytes=(tmp_path / "part-000000.parquet").stat().st_size,
        sha256="0" * 64,
    )
    save_manifest(
        Manifest(identity={**ident.entries(), "max_length": 64}, shards={0: record}, complete=True), tmp_path
    )
    summary, problems = inspect_cache(tmp_path)
    assert problems == [] and stats.num_rows == 1
    assert "logprobs uint8-gap, 64 draws (without their logprobs)" in summary
    assert (
        "schema:     v5" in summary
        and "coded: binary" in summary
        and "sample_lengths: list<element: uint8>" in summary
    )


def test_the_cache_command_offers_every_format_and_keeps_draw_logprobs_only_when_asked(capsys):
    from teacher_farm.cli import cache_parser, main

    for fmt in FORMATS:
        args = cache_parser().parse_args(
            ["--server", "http://x", "--input", "a.jsonl", "--out", "o", "--logprob-dtype", fmt]
        )
        assert args.logprob_dtype == fmt and not args.sample_logprobs
    with pytest.raises(SystemExit):
        main(["cache", "--server", "http://x", "--input", "a.jsonl", "--out", "o", "--logprob-dtype", "q4"])
    assert "invalid choice: 'q4' (choose from 'float32', 'float16', 'uint8-gap')" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "--server", "http://x", "--input", "a.jsonl", "--out", "o", "--sample-logprobs"])
    assert exit_.value.code == 2
    assert "--sample-logprobs applies to --targets sampled or both only" in capsys.readouterr().err
