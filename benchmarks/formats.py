"""What each stored format costs: the rows of one cache rewritten in every format, bytes per token per column.

Takes a cache written with ``--logprob-dtype float32 --targets both`` (``benchmarks/distill.py``'s, say:
the float32 values are what the teacher sent, so every format is derived from them once) and writes
its rows again as a run writes them (``ShardWriter.write_results``, answers of 32 lines: a compact
shard's id order and models are its first answers') in each format, with and without the logprobs of
the draws, plus schema 2's float16 layout with the writer options it had (the old default) and the
compact format's schemas 3 and 4. Prints, per format, the compressed bytes per token of each column and
of the three kinds of cache (top-k, sampled, both; schema 5's caches of one kind written on their own),
the worst error of the top-k and target logprobs read back (ids and ranks must read back exactly), the
write and read (``row_group_arrays``) rates, and schema 5's coded bytes split by what they hold.

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
    coded_values,
    decode_rows,
    encode_rows,
    flat_values,
    list_lengths,
    topk_logprobs_of,
)
from teacher_farm.schemas.cache_dir import CacheDir, CacheIdentity
from teacher_farm.schemas.coding import split_bits
from teacher_farm.schemas.formats import id_gaps
from teacher_farm.training.reader import row_group_arrays

#: Columns every kind of cache holds (the text and the target's logprob and rank).
COMMON = ("id", "line", "source", "offset", "input_ids", "target_logprobs", "target_ranks")
TOPK = ("topk_ids", "id_order", "topk_id_codes", "topk_logprobs", "topk_top1", "topk_gaps", "coded")
SAMPLED = (
    "sample_ids",
    "sample_id_gaps",
    "sample_rank_gaps",
    "sample_in_topk",
    "sample_counts",
    "sample_lengths",
)


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


#: Lines a run's answers hold (``CacheOptions.batch_lines``): the rows reach the shard this many at a time.
RUN_BATCH = 32


def write_as_a_run(out: Path, wire: pa.Table, schema: pa.Schema) -> ShardWriter:
    """A shard of ``wire``'s rows written as a cache run writes them: answers of ``RUN_BATCH`` lines, each
    encoded by the shard (a compact shard's id order and models are its first answers')."""
    writer = ShardWriter(out, 0, schema, row_group_bytes=1 << 40)
    for start in range(0, wire.num_rows, RUN_BATCH):
        writer.write_results(wire.slice(start, RUN_BATCH))
    return writer


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
    elif fmt in ("v3", "v4"):  # schema 3's uint8-gap (plain topk_ids) or 4's (id codes), written the same way
        ident = identity.model_copy(update={"logprob_dtype": "uint8-gap", "sample_logprobs": sample_logprobs})
        s = ident.scoring
        schema = cache_schema(
            "uint8-gap", s.targets, k=s.k, samples=s.samples, sample_logprobs=sample_logprobs, version=4
        ).with_metadata(ident.schema().metadata)
        if fmt == "v3":
            rows = as_schema_3(encode_rows(cast_logprobs(table, "float32"), schema))
            writer = ShardWriter(out, 0, rows.schema, row_group_bytes=1 << 40)
            writer.write(rows)
        else:
            writer = write_as_a_run(out, cast_logprobs(table, "float32"), schema)
        path = out / writer.commit().file
    elif fmt in ("draws", "topk"):  # a cache of draws only (--targets sampled) or of the top-k only
        targets = "sampled" if fmt == "draws" else "topk"
        scoring = identity.scoring.model_copy(update={"targets": targets})
        ident = identity.model_copy(update={"logprob_dtype": "uint8-gap", "scoring": scoring})
        ident = ident.model_copy(update={"sample_logprobs": sample_logprobs})
        drop = (
            ["topk_ids", "topk_logprobs"]
            if fmt == "draws"
            else ["sample_ids", "sample_counts", "sample_logprobs"]
        )
        wire = cast_logprobs(table.drop_columns(drop), "float32")
        writer = write_as_a_run(out, wire, ident.schema())
        path = out / writer.commit().file
    else:
        ident = identity.model_copy(update={"logprob_dtype": fmt, "sample_logprobs": sample_logprobs})
        # What the server would send: float32 for float32 and uint8-gap, float16 for float16.
        wire = cast_logprobs(table, "float16" if fmt == "float16" else "float32")
        writer = write_as_a_run(out, wire, ident.schema())
        path = out / writer.commit().file
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    pf = pq.ParquetFile(path)
    arrays = [row_group_arrays(pf.read_row_group(g), ranks=True) for g in range(pf.num_row_groups)]
    read_s = time.perf_counter() - started
    # The targets: ranks exact, logprobs within float16's half step or (uint8-gap, a target among the top-k,
    # read at its slot) the gaps' 1/32 nat.
    got_ranks = np.concatenate([a.target_ranks for a in arrays])
    if not np.array_equal(
        got_ranks, flat_values(table.column("target_ranks")).to_numpy(zero_copy_only=False)
    ):
        raise SystemExit(f"{fmt}: target ranks read back differ")
    want_t = flat_values(table.column("target_logprobs")).to_numpy(zero_copy_only=False).astype(np.float64)
    got_t = np.concatenate([a.target_logprobs for a in arrays])
    finite_t = np.isfinite(want_t)
    target_error = float(np.abs(got_t[finite_t] - want_t[finite_t]).max()) if finite_t.any() else 0.0
    if target_error > 1 / 32 + 0.004 + 1e-6:
        raise SystemExit(f"{fmt}: target logprobs read back {target_error:.3g} from what was written")
    # Ids read back exactly, in every format.
    if fmt != "topk":
        want_drawn = flat_values(table.column("sample_ids")).to_numpy(zero_copy_only=False)
        got_drawn = np.concatenate(
            [
                a.sample_ids[np.arange(a.sample_ids.shape[1])[None, :] < a.sample_lengths[:, None]]
                for a in arrays
            ]
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
    if "coded" in sizes:  # the blob's bytes split by what they hold, in proportion to their bits
        bits = {}
        for g in range(pf.num_row_groups):
            models, values = coded_values(pf.read_row_group(g))
            for name, b in split_bits(models, values).items():
                bits[name] = bits.get(name, 0.0) + b
        total = sum(bits.values())
        coded_split = {f"coded: {name}": sizes["coded"] * b / total for name, b in bits.items()}
    # The footer: the schema, statistics and (compact) the shard's id order, per shard, not per token.
    sizes["footer"] = path.stat().st_size - sum(sizes.values())
    path.unlink()
    return {
        "per_token": {name: b / tokens for name, b in sizes.items()},
        "coded_split": {name: b / tokens for name, b in coded_split.items()} if "coded" in sizes else {},
        "worst_error": worst,
        "target_error": target_error,
        "write_tokens_per_s": tokens / write_s,
        "read_tokens_per_s": tokens / read_s,
        "tokens": tokens,
        "targets": {"draws": "sampled", "topk": "topk"}.get(fmt, "both"),
    }


def kinds(per_token: dict[str, float], targets: str = "both") -> dict[str, float]:
    """Bytes per token of a top-k, a sampled and a both cache of these columns (of ``targets``: a cache whose
    rows code their values together, schema 5's ``coded``, is only the kind it is)."""
    if "coded" in per_token:
        total = sum(per_token.values())
        common = sum(v for k, v in per_token.items() if k in COMMON or k == "footer")
        kind = {"topk": "topk", "sampled": "sampled", "both": "both"}[targets]
        return {
            "rest": common,
            **{c: (total if c == kind else float("nan")) for c in ("topk", "sampled", "both")},
        }
    common = sum(v for k, v in per_token.items() if k in COMMON or k == "footer")
    topk = sum(v for k, v in per_token.items() if k in TOPK)
    if targets != "both":  # a cache of one kind of targets (schema 4's draws, say) is that kind only
        sampled = sum(v for k, v in per_token.items() if k in SAMPLED or k == "sample_logprobs")
        total = common + topk + sampled
        return {
            "rest": common,
            **{c: (total if c == targets else float("nan")) for c in ("topk", "sampled", "both")},
        }
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
    runs = [("float16, schema 2", "v2", True), ("uint8-gap, schema 3", "v3", False)]
    runs += [("uint8-gap, schema 4 (before)", "v4", False)]
    runs += [
        ("uint8-gap, a cache of top-k only", "topk", False),
        ("uint8-gap, a cache of draws only", "draws", False),
    ]
    runs += [
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
        "sample_lengths",
        "coded",
        "sample_logprobs",
        "footer",
    ]
    print(
        "| format | "
        + " | ".join(columns)
        + " | rest | top-k cache | sampled cache | both | worst error (nat) | targets' worst error "
        "| write Mtok/s | read Mtok/s |"
    )
    print("|---" * (len(columns) + 9) + "|")
    for name, r in results.items():
        cells = [f"{r['per_token'][c]:.1f}" if c in r["per_token"] else "-" for c in columns]
        k = kinds(r["per_token"], r["targets"])
        print(
            f"| {name} | " + " | ".join(cells) + f" | {k['rest']:.1f} | {k['topk']:.1f} | {k['sampled']:.1f} "
            f"| {k['both']:.1f} | {r['worst_error']:.3g} | {r['target_error']:.3g} "
            f"| {r['write_tokens_per_s'] / 1e6:.2f} | {r['read_tokens_per_s'] / 1e6:.2f} |"
        )
    print("\nSchema 5's coded bytes per token by what they hold (in proportion to their bits):\n")
    for name, r in results.items():
        if r["coded_split"]:
            print(f"- {name}: " + ", ".join(f"{c[7:]} {v:.2f}" for c, v in r["coded_split"].items()))


if __name__ == "__main__":
    main()
