"""What the test modules share (and the benchmarks: a free port, a process group stopped): not a test
module, no fixtures.

A free port, a process group stopped, a command beside this Python, a one-line failure, and caches
written through the client's own writer (``client.shards.ShardWriter`` and the manifest's save), so a
test's cache cannot drift from what a run writes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from teacher_farm.client.manifest import save_manifest
from teacher_farm.client.shards import ShardWriter
from teacher_farm.schemas.arrow import (
    ScoredSequence,
    cache_schema,
    cast_logprobs,
    encode_rows,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import CacheIdentity, Manifest, ShardRecord
from teacher_farm.schemas.fingerprints import tokenizer_fingerprint
from teacher_farm.schemas.scoring import Scoring


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """Stop ``proc``'s process group (a server and the engine processes it started): SIGTERM, then
    SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def tool(name: str) -> str | None:
    """A command on PATH, or installed beside this Python (a virtualenv's bin/ need not be on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


def one_line_error(proc) -> str:
    """The command failed with exactly one line on stderr and no traceback; that line."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------------ caches


def write_shards(
    out: Path,
    schema: pa.Schema,
    shards: Mapping[int, tuple[range, Iterable[pa.Table]]],
    identity: Mapping[str, Any],
    manifests: Mapping[str, list[int]] | None = None,
) -> dict[int, ShardRecord]:
    """Shard j of ``shards`` (the input lines it covers, its tables in ``schema``) written as a run writes it.

    Each table is one row group; the lines without a row count as rejected. Every shard is named in
    ``manifest.json``, or ``manifests`` splits them over several manifest files (as split runs write).
    """
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for j, (lines, tables) in shards.items():
        writer = ShardWriter(out, j, schema, row_group_bytes=1)  # every write is one row group
        for table in tables:
            writer.write(table)
        stats = writer.commit()
        records[j] = ShardRecord(
            index=j,
            file=stats.file,
            first_line=lines.start,
            end_line=lines.stop,
            rows=stats.rows,
            rejects=len(lines) - stats.rows,
            tokens=stats.tokens,
            bytes=stats.bytes,
            sha256=stats.sha256,
        )
    for name, indices in (manifests or {"manifest.json": list(shards)}).items():
        save_manifest(
            Manifest(identity=dict(identity), shards={j: records[j] for j in indices}, complete=True),
            out,
            name,
        )
    return records


# The training side's hand-built cache: VOCAB tokens, top-K, ROWS_PER_SHARD lines a shard.
VOCAB, K, ROWS_PER_SHARD = 50, 5, 8
SHARDS = {2: [3, 1, 9, 4], 0: [5, 2, 7, 1, 6], 1: [4, 8, 3]}
UNEVEN = {0: [5, 2, 7, 1, 6, 3, 4], 1: [4, 8, 3, 2]}


class FakeTokenizer:
    """Enough of a tokenizer for the fingerprint: a vocabulary and the special ids."""

    def __init__(self, vocab: int = VOCAB, bos: int = 1) -> None:
        self.vocab, self.bos_token_id, self.eos_token_id = vocab, bos, 2

    def get_vocab(self) -> dict[str, int]:
        return {f"t{i}": i for i in range(self.vocab)}


class Cache:
    """A cache directory written with the project's own writer, and the full distributions behind it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.full: dict[int, np.ndarray] = {}  # line -> (n, VOCAB) float32 teacher log-softmax
        self.rows: dict[int, ScoredSequence] = {}


def draws(rng: np.random.Generator, full: np.ndarray, samples: int) -> dict[str, np.ndarray]:
    """N draws per position from exp(full), as the server stores them: distinct ids ascending, counts."""
    lengths, ids, counts, lps = [], [], [], []
    p = np.exp(full.astype(np.float64))
    for row, probs in zip(full, p):
        drawn, count = np.unique(
            rng.choice(len(probs), size=samples, p=probs / probs.sum()), return_counts=True
        )
        lengths.append(len(drawn))
        ids.append(drawn)
        counts.append(count)
        lps.append(row[drawn])
    return {
        "sample_lengths": np.array(lengths, np.int32),
        "sample_ids": np.concatenate(ids).astype(np.int32),
        "sample_counts": np.concatenate(counts).astype(np.int16),
        "sample_logprobs": np.concatenate(lps).astype(np.float32),
    }


def scored(
    rng: np.random.Generator,
    line: int,
    n: int,
    temperature: float = 1.0,
    targets: str = "topk",
    samples: int = 16,
) -> tuple[ScoredSequence, np.ndarray]:
    import torch

    logits = torch.from_numpy(rng.standard_normal((n, VOCAB)).astype(np.float32) * 2.5)
    full = torch.log_softmax(logits / temperature, dim=-1)
    values, ids = torch.topk(full, K, dim=-1)
    input_ids = rng.integers(0, VOCAB, n)
    target = full[torch.arange(n - 1), torch.from_numpy(input_ids[1:])]
    ranks = 1 + (full[: n - 1] > target[:, None]).sum(-1)
    seq = ScoredSequence(
        id=f"doc-{line}",
        input_ids=input_ids.astype(np.int32),
        topk_ids=ids.numpy().astype(np.int32),
        topk_logprobs=values.numpy(),
        target_logprobs=target.numpy(),
        target_ranks=ranks.numpy().astype(np.int32),
        **(draws(rng, full.numpy(), samples) if targets != "topk" else {}),
    )
    return seq, full.numpy()


def write_cache(
    out: Path,
    shards: dict[int, list[int]],
    *,
    dtype: str = "float32",
    manifests: dict[str, list[int]] | None = None,
    fingerprint: str | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    targets: str = "topk",
    samples: int = 16,
    fmt: str | None = None,
    sample_logprobs: bool = True,
) -> Cache:
    """Shard j holds lines [j*R, (j+1)*R) (its last line rejected) with the given token counts,
    several rows per row group; ``manifests`` splits the shard records over several manifest files.
    Every column as the server sends it (the layout of schema 2) in ``dtype``, or with ``fmt`` in the
    layout a cache run writes, in that format."""
    cache = Cache(out)
    rng = np.random.default_rng(seed)
    ident = CacheIdentity(
        model="teacher",
        model_fingerprint="mf",
        tokenizer_fingerprint=fingerprint or tokenizer_fingerprint(FakeTokenizer()),
        vocab_size=VOCAB,
        scoring=Scoring(k=K, temperature=temperature, targets=targets, samples=samples, seed=0),
        logprob_dtype=fmt or dtype,
        sample_logprobs=sample_logprobs and targets != "topk",
    )
    schema = ident.schema() if fmt else cache_schema(dtype, targets).with_metadata(ident.metadata())
    written = {}
    for j, lengths in shards.items():
        assert len(lengths) < ROWS_PER_SHARD
        lines = [j * ROWS_PER_SHARD + i for i in range(len(lengths))]
        results = []
        for line, n in zip(lines, lengths):
            seq, full = scored(rng, line, n, temperature, targets, samples)
            results.append(seq)
            cache.rows[line], cache.full[line] = seq, full
        tables = []
        shard_schema = schema  # a compact shard's rows share one id order and models: its first rows'
        for i in range(0, len(results), 3):
            table = with_source_columns(results_to_table(results[i : i + 3], K, targets), lines[i : i + 3])
            if fmt:
                tables.append(encode_rows(table, shard_schema))
                shard_schema = shard_schema.with_metadata(tables[-1].schema.metadata)
            else:
                tables.append(cast_logprobs(table, dtype).cast(schema))
        written[j] = (range(j * ROWS_PER_SHARD, (j + 1) * ROWS_PER_SHARD), tables)
    identity = {
        "model_fingerprint": "mf",
        "tokenizer_fingerprint": fingerprint or tokenizer_fingerprint(FakeTokenizer()),
        "vocab_size": VOCAB,
        "k": K,
        "logprob_dtype": fmt or dtype,
        "rows_per_shard": ROWS_PER_SHARD,
        "temperature": temperature,
        "targets": targets,
    }
    write_shards(out, schema, written, identity, manifests)
    return cache


def items(ds) -> dict[int, dict[str, Any]]:
    """A dataset's items by line; no line twice."""
    out: dict[int, dict[str, Any]] = {}
    for item in ds:
        line = int(item["line"])
        assert line not in out, f"line {line} yielded twice"
        out[line] = item
    return out


def true_tail(full: np.ndarray, topk_ids: np.ndarray) -> np.ndarray:
    """Per position, the log of the teacher's mass outside its top-k, from the full distribution."""
    p = np.exp(full.astype(np.float64))
    np.put_along_axis(p, topk_ids.astype(np.int64), 0.0, axis=1)
    return np.log(p.sum(axis=1))


def write_window_cache(
    out: Path, lengths: list[int], max_length: int = 12, stride: int = 5
) -> dict[int, list[int]]:
    """A ``--long-lines window`` cache (the stand-in teacher, 3 lines a shard) of pre-tokenized lines
    of the given lengths; returns each line's full token ids."""
    import asyncio
    import json

    from teacher_farm.client.cache import CacheOptions, CacheRun
    from tests.standin import StandInTeacher

    rng = np.random.default_rng(0)
    lines = {i: rng.integers(3, 900, n).tolist() for i, n in enumerate(lengths)}
    src = out.parent / f"{out.name}.jsonl"
    src.write_text("".join(json.dumps({"input_ids": ids}) + "\n" for ids in lines.values()))
    opts = CacheOptions(
        input=str(src),
        out_dir=out,
        scoring=Scoring(k=4),
        max_length=max_length,
        long_lines="window",
        stride=stride,
        rows_per_shard=3,
    )
    asyncio.run(CacheRun(opts, StandInTeacher(1000)).run())
    return lines
