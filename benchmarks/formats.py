"""What each stored format costs: the rows of one cache rewritten in every format, bytes per token per column.

Takes a cache written with ``--logprob-dtype float32 --targets both`` (``benchmarks/distill.py``'s, say:
the float32 values are what the teacher sent, so every format is derived from them once) and writes
its rows again through the client's own path (``encode_rows`` and ``ShardWriter``, encodings chosen
as a run chooses them) in each format, with and without the logprobs of the draws, plus schema 2's
float16 layout with the writer options it had (the old default). Prints, per format, the compressed
bytes per token of each column and of the three kinds of cache (top-k, sampled, both), the worst
error of the top-k logprobs read back, and the write and read (``row_group_arrays``) rates.

``--vocab 131072`` measures a larger vocabulary from the same cache: every id i becomes an id of the
block [128 i, 128 i + 128), ``--spread fixed`` the same one each time (ids merely need 17 bits) or
``--spread drawn`` a random one each time (seven bits of entropy more per id: a teacher spreading its
choices 128 times more widely). A real teacher lies between the two.

    python benchmarks/formats.py /tmp/distill/cache32
    python benchmarks/formats.py /tmp/distill/cache32 --vocab 131072 --spread drawn
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from teacher_farm.client.shards import ShardWriter
from teacher_farm.schemas.arrow import (
    ID_ORDER_KEY,
    cache_schema,
    cast_logprobs,
    decode_rows,
    encode_rows,
    flat_values,
    list_lengths,
    topk_logprobs_of,
)
from teacher_farm.schemas.cache_dir import CacheDir, CacheIdentity
from teacher_farm.schemas.formats import id_gaps
from teacher_farm.training.reader import row_group_arrays

#: Columns every kind of cache holds (the text and the target's logprob and rank).
COMMON = ("id", "line", "source", "offset", "input_ids", "target_logprobs", "target_ranks")
TOPK = ("topk_ids", "id_order", "topk_id_codes", "topk_logprobs", "topk_top1", "topk_gaps")
SAMPLED = ("sample_ids", "sample_id_gaps", "sample_rank_gaps", "sample_in_topk", "sample_counts")


def load(cache: Path, k: int | None = None) -> tuple[pa.Table, CacheIdentity]:
    """The cache's rows and identity; with ``k``, only the first k of its top-k (a cache of that k's)."""
    c = CacheDir(cache)
    identity = c.identity
    if identity.logprob_dtype != "float32" or identity.scoring.targets != "both":
        raise SystemExit(f"{cache}: needs a float32 cache with --targets both, not {identity.entries()}")
    table = pa.concat_tables(pq.read_table(p) for p in c.shard_paths()).combine_chunks()
    if k is not None and k != identity.scoring.k:
        if k > identity.scoring.k:
            raise SystemExit(f"{cache} holds the top {identity.scoring.k}, not {k}")
        for name in ("topk_ids", "topk_logprobs"):
            col = table.column(name).combine_chunks()
            values = flat_values(col).to_numpy(zero_copy_only=False)
            values = values.reshape(-1, identity.scoring.k)[:, :k].reshape(-1)
            inner = pa.FixedSizeListArray.from_arrays(pa.array(values), k)
            table = table.set_column(
                table.schema.get_field_index(name), name, pa.ListArray.from_arrays(col.offsets, inner)
            )
        identity = identity.model_copy(update={"scoring": identity.scoring.model_copy(update={"k": k})})
    return table, identity


def respread(table: pa.Table, vocab: int, spread: str, seed: int = 0) -> pa.Table:
    """Every id i as an id of [w i, w i + w), w = vocab // the cache's vocabulary (see the module's doc)."""
    rng = np.random.default_rng(seed)
    top = int(
        max(pc.max(flat_values(table.column(c))).as_py() for c in ("input_ids", "topk_ids", "sample_ids"))
    )
    width = vocab // (top + 1)
    offset = rng.integers(0, width, top + 1)

    def remap(name: str) -> pa.Table:
        col = table.column(name).combine_chunks()
        ids = flat_values(col).to_numpy(zero_copy_only=False).astype(np.int64)
        extra = offset[ids] if spread == "fixed" else rng.integers(0, width, ids.shape)
        values = pa.array((ids * width + extra).astype(np.int32))
        # The same list structure around the new values.
        levels = []
        arr = col
        while pa.types.is_list(arr.type) or pa.types.is_fixed_size_list(arr.type):
            levels.append(arr)
            arr = arr.flatten()
        for level in reversed(levels):
            if pa.types.is_fixed_size_list(level.type):
                values = pa.FixedSizeListArray.from_arrays(values, level.type.list_size)
            else:
                cut = np.zeros(len(level) + 1, np.int32)
                np.cumsum(list_lengths(level), out=cut[1:])
                values = pa.ListArray.from_arrays(pa.array(cut), values)
        return table.set_column(table.schema.get_field_index(name), name, values)

    for name in ("input_ids", "topk_ids", "sample_ids"):
        table = remap(name)
    return table


def as_schema_3(rows: pa.Table) -> pa.Table:
    """Compact rows of schema 4 in schema 3's layout: plain ``topk_ids`` and ``sample_id_gaps``."""
    decoded = decode_rows(rows)
    if "topk_id_codes" in rows.column_names:
        where = rows.schema.get_field_index("topk_id_codes")
        rows = rows.set_column(where, "topk_ids", decoded.column("topk_ids"))
    if "sample_rank_gaps" in rows.column_names:
        for name in ("sample_counts", "sample_logprobs"):
            if name in rows.column_names:
                rows = rows.set_column(rows.schema.get_field_index(name), name, decoded.column(name))
        outer = decoded.column("sample_ids").combine_chunks()
        lengths = list_lengths(outer.flatten())
        gaps = id_gaps(flat_values(outer).to_numpy(zero_copy_only=False), lengths).astype(np.int32)
        column = pa.ListArray.from_arrays(
            outer.offsets, pa.ListArray.from_arrays(outer.flatten().offsets, pa.array(gaps))
        )
        rows = rows.set_column(rows.schema.get_field_index("sample_rank_gaps"), "sample_id_gaps", column)
        if "sample_in_topk" in rows.column_names:
            rows = rows.drop_columns(["sample_in_topk"])
    meta = {k: v for k, v in (rows.schema.metadata or {}).items() if k != ID_ORDER_KEY}
    return rows.drop_columns(["id_order"]).replace_schema_metadata(meta)


def old_options() -> dict:
    """The writer options of schema 2 (before the encodings were measured per column)."""
    return {
        "compression": "zstd",
        "compression_level": 3,
        "use_dictionary": ["id", "source"],
        "use_byte_stream_split": [
            "topk_logprobs.list.element.list.element",
            "target_logprobs.list.element",
            "sample_logprobs.list.element.list.element",
        ],
        "write_statistics": ["line"],
    }


def column_bytes(path: Path) -> dict[str, int]:
    meta = pq.ParquetFile(path).metadata
    sizes: dict[str, int] = {}
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            col = meta.row_group(g).column(c)
            name = col.path_in_schema.split(".")[0]
            sizes[name] = sizes.get(name, 0) + col.total_compressed_size
    return sizes


def measure(table: pa.Table, identity: CacheIdentity, fmt: str, sample_logprobs: bool, out: Path) -> dict:
    """Write ``table`` as a cache of ``fmt`` would (``fmt`` 'v2' for schema 2's float16);
    sizes, error, rates."""
    tokens = int(pc.sum(list_lengths(table.column("input_ids"))).as_py())
    started = time.perf_counter()
    if fmt == "v2":
        schema = cache_schema("float16", "both")
        rows = cast_logprobs(table, "float16").select(schema.names).cast(schema)
        path = out / "v2.parquet"
        pq.write_table(rows, path, row_group_size=1 << 30, **old_options())
    elif fmt == "v3":  # schema 3's uint8-gap: plain topk_ids, written the same way
        ident = identity.model_copy(update={"logprob_dtype": "uint8-gap", "sample_logprobs": sample_logprobs})
        rows = as_schema_3(encode_rows(cast_logprobs(table, "float32"), ident.schema()))
        writer = ShardWriter(out, 0, rows.schema, row_group_bytes=1 << 40)
        writer.write(rows)
        path = out / writer.commit().file
    elif (
        fmt == "draws"
    ):  # a cache of draws only (--targets sampled): its ids coded against the anchors' draws
        scoring = identity.scoring.model_copy(update={"targets": "sampled"})
        ident = identity.model_copy(update={"logprob_dtype": "uint8-gap", "scoring": scoring})
        ident = ident.model_copy(update={"sample_logprobs": sample_logprobs})
        wire = cast_logprobs(table.drop_columns(["topk_ids", "topk_logprobs"]), "float32")
        writer = ShardWriter(out, 0, ident.schema(), row_group_bytes=1 << 40)
        writer.write(encode_rows(wire, ident.schema()))
        path = out / writer.commit().file
    else:
        ident = identity.model_copy(update={"logprob_dtype": fmt, "sample_logprobs": sample_logprobs})
        # What the server would send: float32 for float32 and uint8-gap, float16 for float16.
        wire = cast_logprobs(table, "float16" if fmt == "float16" else "float32")
        writer = ShardWriter(out, 0, ident.schema(), row_group_bytes=1 << 40)
        writer.write(encode_rows(wire, ident.schema()))
        path = out / writer.commit().file
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    pf = pq.ParquetFile(path)
    arrays = [row_group_arrays(pf.read_row_group(g)) for g in range(pf.num_row_groups)]
    read_s = time.perf_counter() - started
    # Ids read back exactly, in every format.
    want_drawn = flat_values(table.column("sample_ids")).to_numpy(zero_copy_only=False)
    got_drawn = np.concatenate(
        [a.sample_ids[np.arange(a.sample_ids.shape[1])[None, :] < a.sample_lengths[:, None]] for a in arrays]
    )
    if not np.array_equal(got_drawn, want_drawn):
        raise SystemExit(f"{fmt}: sampled ids read back differ")
    worst = float("nan")
    if fmt != "draws":
        got_ids = np.concatenate([a.topk_ids for a in arrays])
        if not np.array_equal(got_ids.reshape(-1), flat_values(table.column("topk_ids")).to_numpy()):
            raise SystemExit(f"{fmt}: top-k ids read back differ")
        got = np.concatenate([a.topk_logprobs for a in arrays])
        want = topk_logprobs_of(table)
        finite = np.isfinite(want)
        worst = float(np.abs(got[finite].astype(np.float64) - want[finite]).max())
    sizes = column_bytes(path)
    # The footer: the schema, statistics and (compact) the shard's id order, per shard, not per token.
    sizes["footer"] = path.stat().st_size - sum(sizes.values())
    path.unlink()
    return {
        "per_token": {name: b / tokens for name, b in sizes.items()},
        "worst_error": worst,
        "write_tokens_per_s": tokens / write_s,
        "read_tokens_per_s": tokens / read_s,
        "tokens": tokens,
    }


def kinds(per_token: dict[str, float]) -> dict[str, float]:
    """Bytes per token of a top-k, a sampled and a both cache of these columns."""
    common = sum(v for k, v in per_token.items() if k in COMMON or k == "footer")
    topk = sum(v for k, v in per_token.items() if k in TOPK)
    sampled = sum(v for k, v in per_token.items() if k in SAMPLED or k == "sample_logprobs")
    return {
        "rest": common,
        "topk": common + topk,
        "sampled": common + sampled,
        "both": common + topk + sampled,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", type=Path, help="a float32 cache with --targets both")
    p.add_argument("--vocab", type=int, default=None, help="measure ids spread over this vocabulary")
    p.add_argument("--spread", choices=["fixed", "drawn"], default="fixed")
    p.add_argument("--k", type=int, help="measure the cache's first k top-k entries only")
    a = p.parse_args(argv)
    table, identity = load(a.cache, a.k)
    label = f"vocabulary {identity.vocab_size:,}"
    if a.vocab:
        table = respread(table, a.vocab, a.spread)
        label = f"vocabulary {a.vocab:,} ({a.spread} spread of {identity.vocab_size:,})"
    runs = [("float16, schema 2", "v2", True), ("uint8-gap, schema 3 (before)", "v3", False)]
    runs += [("uint8-gap, a cache of draws only", "draws", False)] + [
        (f"{fmt}{'' if keep else ', no sample logprobs'}", fmt, keep)
        for fmt in ("float32", "float16", "uint8-gap")
        for keep in (True, False)
    ]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt, keep in runs:
            results[name] = measure(table, identity, fmt, keep, Path(tmp))
    tokens = next(iter(results.values()))["tokens"]
    print(f"{a.cache}: {tokens:,} tokens, k={identity.scoring.k}, N={identity.scoring.samples}, {label}\n")
    columns = [
        "input_ids",
        "target_logprobs",
        "target_ranks",
        "topk_ids",
        "id_order",
        "topk_id_codes",
        "topk_logprobs",
        "topk_top1",
        "topk_gaps",
        "sample_ids",
        "sample_id_gaps",
        "sample_rank_gaps",
        "sample_in_topk",
        "sample_counts",
        "sample_logprobs",
        "footer",
    ]
    print(
        "| format | "
        + " | ".join(columns)
        + " | rest | top-k cache | sampled cache | both | worst error (nat) "
        "| write Mtok/s | read Mtok/s |"
    )
    print("|---" * (len(columns) + 8) + "|")
    for name, r in results.items():
        cells = [f"{r['per_token'][c]:.1f}" if c in r["per_token"] else "-" for c in columns]
        k = kinds(r["per_token"])
        print(
            f"| {name} | " + " | ".join(cells) + f" | {k['rest']:.1f} | {k['topk']:.1f} | {k['sampled']:.1f} "
            f"| {k['both']:.1f} | {r['worst_error']:.3g} | {r['write_tokens_per_s'] / 1e6:.2f} "
            f"| {r['read_tokens_per_s'] / 1e6:.2f} |"
        )


if __name__ == "__main__":
    main()
