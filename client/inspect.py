"""``teacher-farm inspect DIR``: what a cache directory holds, and whether it is whole."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq

from teacher_farm.client.fsutil import sha256_file
from teacher_farm.client.report import scan
from teacher_farm.schemas.cache_dir import CacheDir, read_metadata

#: The positions the summary's teacher line reads: enough for its shares, quick on any cache.
SUMMARY_TOKENS = 1_000_000


def inspect_cache(out_dir: Path, checksums: bool = False) -> tuple[str, list[str]]:
    """A human summary of ``out_dir`` and the problems found (empty when the cache is whole)."""
    cache = CacheDir(out_dir)
    manifests, manifest = cache.manifests, cache.merged()
    problems = []
    for rec in manifest.shards.values():
        path = out_dir / rec.file
        if not path.exists():
            problems.append(f"{rec.file}: missing")
        elif path.stat().st_size != rec.bytes:
            problems.append(f"{rec.file}: {path.stat().st_size} bytes, manifest says {rec.bytes}")
        elif checksums and sha256_file(path) != rec.sha256:
            problems.append(f"{rec.file}: checksum differs from the manifest")
    for name, m in manifests.items():
        if not m.complete:
            problems.append(f"{name}: incomplete; run the same cache command again to finish it")
    first = next(iter(sorted(manifest.shards.values(), key=lambda r: r.index)), None)
    meta, schema = {}, ""
    if first is not None and (out_dir / first.file).exists():
        arrow_schema = pq.read_schema(out_dir / first.file)
        meta = read_metadata(arrow_schema)
        schema = ", ".join(f"{f.name}: {f.type}" for f in arrow_schema)
    nbytes = sum(r.bytes for r in manifest.shards.values())
    run = manifest.identity
    ident, scoring = run.cache, run.cache.scoring
    lines = [
        f"cache:      {out_dir}",
        f"status:     {'complete' if not problems else 'NOT OK'}",
        f"model:      {manifest.provenance.get('model')} (fingerprint {ident.model_fingerprint})",
        f"tokenizer:  fingerprint {ident.tokenizer_fingerprint}, vocab {ident.vocab_size}",
        f"k:          {scoring.k}, logprobs {ident.logprob_dtype}"
        + (
            ""
            if scoring.targets == "topk"
            else f", {scoring.samples} draws ({'with' if ident.sample_logprobs else 'without'} "
            "their logprobs)"
        )
        + f", max length {run.max_length}",
        f"rows:       {manifest.rows} in {len(manifest.shards)} shards, {manifest.rejects} lines rejected",
        f"tokens:     {manifest.tokens}",
        f"bytes:      {nbytes / 2**20:.1f} MiB, {nbytes / manifest.tokens if manifest.tokens else 0:.1f} "
        "bytes/token",
        f"schema:     v{meta.get('schema_version', manifest.schema_version)}: {schema}",
    ]
    if manifest.tokens and not problems:
        lines.insert(-1, teacher_line(out_dir, manifest.tokens))
    return "\n".join(lines), problems


def teacher_line(out_dir: Path, tokens: int, max_tokens: int = SUMMARY_TOKENS) -> str:
    """How peaked the cached teacher is, over the cache's first ``max_tokens`` positions."""
    stats, _ = scan(out_dir, max_tokens)
    shown = {key: text for key, _, _, text in stats.headline()}
    parts = []
    if "mean_topk_mass" in shown:
        parts.append(f"top-{stats.k} mass {shown['mean_topk_mass']} on average")
    if "share_rank_1" in shown:
        parts.append(f"next token the argmax at {shown['share_rank_1']}")
    if "share_in_topk" in shown:
        parts.append(f"in the top-{stats.k} at {shown['share_in_topk']}")
    if "mean_distinct_draws" in shown:
        parts.append(f"{shown['mean_distinct_draws']} distinct tokens in {stats.samples} draws")
    of = "" if stats.tokens >= tokens else f" (first {stats.tokens:,} positions)"
    return f"teacher:    {'; '.join(parts)}{of}"
