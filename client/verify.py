"""``teacher-farm verify DIR``: re-score a random sample of cached rows and compare.

Silent corruption of a shard, or a teacher that changed since the cache was made, shows up here:

1. the server's ``/v1/info`` must name the teacher of the manifests (model and tokenizer
   fingerprints, vocabulary size), else nothing is re-scored;
2. N rows are drawn uniformly (seeded) across all shards the manifests name, and only the row
   groups holding them are read;
3. every shard a sampled row lies in is re-hashed against the manifest's sha256 and size;
4. the rows' cached ``input_ids`` are sent back as ``token_ids`` (so tokenization cannot differ)
   with k+1 candidates where the server allows it, the extra one showing ties at the k-th place;
5. per row, with numpy (``client/compare.py``, which states the rules): ``input_ids`` equal;
   logprobs within ``atol`` plus one unit in the last place of the cache's format
   (``schemas/formats.py``), the fresh values stored and read back in that format first;
   ``topk_ids`` and ``target_ranks`` equal except where ties within that tolerance allow;
6. sampled targets are drawn again with the cache's seed and compared under the draw contract
   (``schemas/draws.py``): a draw may move to a neighbouring token where its uniform lay on a CDF
   boundary, and only a boundary's share of all draws may; any other difference is a mismatch.

Rows are read and converted by the one cache reader (``schemas/reader.py``), the teacher's answers too.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from teacher_farm.client.compare import compare_answer, compare_draws, compare_row, split_rows
from teacher_farm.client.fsutil import sha256_file
from teacher_farm.client.transport import HttpTeacher, TeacherPool
from teacher_farm.exits import run_async
from teacher_farm.schemas import reader
from teacher_farm.schemas.arrow import offsets
from teacher_farm.schemas.cache_dir import CacheDir, CacheIdentity, ShardRecord
from teacher_farm.schemas.draws import DrawComparison
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.reader import row_group_arrays
from teacher_farm.schemas.wire import Info

__all__ = [
    "CACHE_COLUMNS",
    "Mismatch",
    "VerifyOptions",
    "VerifyReport",
    "compare_draws",
    "compare_row",
    "read_rows",
    "run_verify",
    "sample_positions",
    "table_rows",
    "teacher_problem",
    "verify_cache",
]

#: Default tolerance of logprobs beyond the rounding of the cache's format, by format.
DEFAULT_ATOL = {"float32": 1e-3, "float16": 1e-2, "uint8-gap": 1e-2}

CACHE_COLUMNS = ["id", "line", "input_ids", "topk_ids", "topk_logprobs", "target_logprobs", "target_ranks"]
SAMPLE_COLUMNS = ["sample_ids", "sample_counts"]

#: Lines of mismatches printed in the report (all are counted).
REPORT_MISMATCHES = 50


@dataclass
class VerifyOptions:
    """What ``teacher-farm verify`` is told; see ``teacher_farm.cli`` for the flags."""

    out_dir: Path
    servers: list[str]
    sample: int
    seed: int | None = None
    atol: float | None = None
    api_key: str | None = None
    concurrency: int = 4
    batch_rows: int = 16
    batch_tokens: int = 65_536
    retry_for_s: float = 600.0
    ca_bundle: str | None = None


@dataclass
class Mismatch:
    """One disagreement: a row's (``line`` set) or a whole shard's (``line`` None)."""

    file: str
    line: int | None
    id: str | None
    what: str

    def render(self) -> str:
        if self.line is None:
            return f"{self.file}: {self.what}"
        return f"{self.file} line {self.line} (id {self.id}): {self.what}"


@dataclass
class VerifyReport:
    """What a verification found; ``ok`` only when every check agreed."""

    out_dir: Path
    teacher: str = ""
    teacher_problem: str | None = None
    total_rows: int = 0
    total_shards: int = 0
    sampled_rows: int = 0
    sampled_shards: int = 0
    seed: int = 0
    atol: float = 0.0
    logprob_dtype: str = "float32"
    k: int = 0
    rows_checked: int = 0
    positions_checked: int = 0
    max_abs_diff: float = 0.0
    #: Sampled targets drawn again (None: the cache has none).
    draws: DrawComparison | None = None
    shards_hashed: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    bad_rows: set[tuple[str, int]] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.teacher_problem is None and not self.mismatches

    def add(self, m: Mismatch) -> None:
        self.mismatches.append(m)
        if m.line is not None:
            self.bad_rows.add((m.file, m.line))

    def count(self, row: dict[str, Any], diff: float, draws: DrawComparison | None) -> None:
        """Count one compared row: its positions, its largest difference and its draws."""
        self.rows_checked += 1
        self.positions_checked += len(row["input_ids"])
        self.max_abs_diff = max(self.max_abs_diff, diff)
        if draws is not None and self.draws is not None:
            self.draws = DrawComparison(
                self.draws.draws + draws.draws,
                self.draws.moved + draws.moved,
                self.draws.jumped + draws.jumped,
            )

    def render(self) -> str:
        lines = [f"verify:     {self.out_dir}", f"teacher:    {self.teacher}"]
        if self.teacher_problem is not None:
            lines += [f"status:     FAILED: {self.teacher_problem}"]
            return "\n".join(lines)
        every = " (all)" if self.sampled_rows == self.total_rows else ""
        shard_problems = len({m.file for m in self.mismatches if m.line is None})
        lines += [
            f"sample:     {self.sampled_rows} of {self.total_rows} rows{every} from {self.sampled_shards} of "
            f"{self.total_shards} shards, seed {self.seed}",
            f"shards:     {self.shards_hashed} re-hashed, {shard_problems} differ from the manifest",
            f"rows:       {self.rows_checked} rows checked ({self.positions_checked} positions, k {self.k}), "
            f"{len(self.bad_rows)} disagree",
            f"max |diff|: {self.max_abs_diff:.3g} (atol {self.atol:g}, {self.logprob_dtype} logprobs)",
            *([f"draws:      {self.draws}, {self.draws.allowed} allowed"] if self.draws is not None else []),
            "status:     " + ("OK" if self.ok else "FAILED: " + _count(len(self.mismatches), "mismatch")),
        ]
        shown = sorted(self.mismatches, key=lambda m: (m.file, -1 if m.line is None else m.line))
        lines += [f"mismatch:   {m.render()}" for m in shown[:REPORT_MISMATCHES]]
        if len(shown) > REPORT_MISMATCHES:
            lines.append(f"            ... and {len(shown) - REPORT_MISMATCHES} more")
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("h") else "s")


# ---------------------------------------------------------------------------------------------
# Sampling and reading (the reader itself is ``schemas.reader``; the comparison ``client.compare``)


def sample_positions(records: Sequence[ShardRecord], n: int, seed: int) -> dict[int, np.ndarray]:
    """``n`` rows drawn uniformly without replacement: shard index -> sorted rows in that shard."""
    counts = np.array([r.rows for r in records], dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return {}
    picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = offsets(counts)
    which = np.searchsorted(starts, picks, side="right") - 1
    return {records[s].index: picks[which == s] - starts[s] for s in np.unique(which)}


def read_rows(
    path: Path,
    rows: np.ndarray,
    columns: Sequence[str] = CACHE_COLUMNS,
) -> tuple[pa.Table, list[str]]:
    """The sampled rows of a shard, of the columns verify compares (``schemas.reader.read_rows``)."""
    return reader.read_rows(path, rows, columns)


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Each row of a cache or result table (any stored layout) as a dict of arrays
    (``compare.split_rows``)."""
    ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * table.num_rows
    return split_rows(row_group_arrays(table, ranks=True), ids)


def batches(rows: list[dict[str, Any]], max_rows: int, max_tokens: int) -> Iterator[list[dict[str, Any]]]:
    """Group rows into requests of at most ``max_rows`` rows and about ``max_tokens`` tokens."""
    cur: list[dict[str, Any]] = []
    tokens = 0
    for row in rows:
        n = len(row["input_ids"])
        if cur and (len(cur) >= max_rows or tokens + n > max_tokens):
            yield cur
            cur, tokens = [], 0
        cur.append(row)
        tokens += n
    if cur:
        yield cur


# ---------------------------------------------------------------------------------------------
# The run


def teacher_problem(info: Info, identity: CacheIdentity) -> str | None:
    """Why ``info`` is not the teacher that made a cache of ``identity``, or None."""
    diffs = [
        f"{key} {getattr(identity, key)!r} in the cache, {getattr(info, key)!r} served"
        for key in ("model_fingerprint", "tokenizer_fingerprint", "vocab_size")
        if getattr(identity, key) != getattr(info, key)
    ]
    if not diffs:
        return None
    return "the server runs a different teacher than the one that made this cache: " + "; ".join(diffs)


class _Verification:
    """One verification under way: sampled shards re-hashed and read, their rows re-scored and compared."""

    def __init__(
        self, opts: VerifyOptions, teacher: Any, identity: CacheIdentity, info: Info, report: VerifyReport
    ) -> None:
        self.opts, self.teacher, self.info, self.report = opts, teacher, info, report
        self.dtype = identity.logprob_dtype
        scoring = identity.scoring
        self.k, self.samples = scoring.topk, scoring.draws  # k 0: no top-k to compare
        # The top-k at the cache's temperature, the draws again with the cache's seed, and one entry
        # more than cached where the server allows it: a tie at the k-th place then shows.
        self.asked = scoring.model_copy(update={"k": min(self.k + 1, info.k_max) if self.k else 1})
        self.columns = [c for c in CACHE_COLUMNS if self.k or not c.startswith("topk_")]
        self.columns += SAMPLE_COLUMNS if self.samples else []
        self.slots = asyncio.Semaphore(opts.concurrency)
        self.tasks: list[asyncio.Task[None]] = []

    async def run(self, records: dict[int, ShardRecord], picks: dict[int, np.ndarray]) -> None:
        """Check every sampled shard, keeping ``concurrency`` requests in flight."""
        try:
            for index, local in sorted(picks.items()):
                await self.shard(records[index], local)
            await asyncio.gather(*self.tasks)
        finally:
            for task in self.tasks:
                task.cancel()

    async def shard(self, rec: ShardRecord, local: np.ndarray) -> None:
        """Re-hash one shard, read its sampled rows and send them to be re-scored."""
        path = Path(self.opts.out_dir) / rec.file
        rows = await self._read(path, rec, local)
        limit = min(self.opts.batch_rows, self.info.max_inputs_per_request)
        for batch in batches(rows, limit, self.opts.batch_tokens):
            await self.slots.acquire()
            self.tasks.append(asyncio.create_task(self.check(batch, rec.file)))

    async def _read(self, path: Path, rec: ShardRecord, local: np.ndarray) -> list[dict[str, Any]]:
        report = self.report
        if not path.exists():
            report.add(Mismatch(rec.file, None, None, f"missing; {len(local)} sampled rows not checked"))
            return []
        size = path.stat().st_size
        digest = await asyncio.to_thread(sha256_file, path)
        report.shards_hashed += 1
        if size != rec.bytes:
            report.add(Mismatch(rec.file, None, None, f"{size} bytes, the manifest says {rec.bytes}"))
        if digest != rec.sha256:
            report.add(Mismatch(rec.file, None, None, "sha256 checksum differs from the manifest's"))
        try:
            table, problems = await asyncio.to_thread(read_rows, path, local, self.columns)
            rows = table_rows(table)
        except (OSError, pa.ArrowException, InputError) as exc:
            report.add(Mismatch(rec.file, None, None, f"unreadable: {exc}"))
            return []
        for what in problems:
            report.add(Mismatch(rec.file, None, None, what))
        return [row for row in rows if self._scorable(row, rec.file)]

    def _scorable(self, row: dict[str, Any], file: str) -> bool:
        n, most = len(row["input_ids"]), self.info.max_input_tokens
        if n == 0:
            self.report.add(Mismatch(file, row["line"], row["id"], "empty input_ids"))
        elif n > most:
            self.report.add(
                Mismatch(
                    file,
                    row["line"],
                    row["id"],
                    f"{n} tokens, more than the server holds ({most}); not re-scored",
                )
            )
        return 0 < n <= most

    async def check(self, batch: list[dict[str, Any]], file: str) -> None:
        """Re-score one batch of rows and compare each with its answer."""
        try:
            items = [(row["id"], np.ascontiguousarray(row["input_ids"], dtype=np.int64)) for row in batch]
            fresh = table_rows(await self.teacher.score_ids(items, self.asked))
        except InputError as exc:
            fresh, why = [], f"the teacher's answer is malformed: {exc}"
        else:
            why = f"the teacher answered {len(fresh)} rows for {len(batch)}"
        finally:
            self.slots.release()
        if len(fresh) != len(batch):
            for row in batch:
                self.report.add(Mismatch(file, row["line"], row["id"], why))
            return
        for row, answer in zip(batch, fresh):
            problems, diff, draws = compare_answer(
                row, answer, k=self.k, samples=self.samples, atol=self.report.atol, logprob_dtype=self.dtype
            )
            self.report.count(row, diff, draws)
            for what in problems:
                self.report.add(Mismatch(file, row["line"], row["id"], what))


async def verify_cache(opts: VerifyOptions, teacher: Any) -> VerifyReport:
    """Check a sample of ``opts.out_dir`` against ``teacher`` (a ``TeacherPool`` or ``HttpTeacher``)."""
    out = Path(opts.out_dir)
    cache = CacheDir(out)
    identity = cache.identity
    dtype = identity.logprob_dtype
    report = VerifyReport(
        out_dir=out,
        seed=opts.seed if opts.seed is not None else secrets.randbits(32),
        atol=opts.atol if opts.atol is not None else DEFAULT_ATOL.get(dtype, 1e-2),
        logprob_dtype=dtype,
        k=identity.scoring.topk,
    )
    info = await teacher.info()
    report.teacher = f"{teacher.name} (model {info.model}, fingerprint {info.fingerprint})"
    if (problem := teacher_problem(info, identity)) is not None:
        report.teacher_problem = problem
        return report
    if (refusal := identity.scoring.refusal(info)) is not None:
        report.teacher_problem = f"the cache asks what the server cannot answer: {refusal[0]}"
        return report
    if identity.scoring.draws:
        report.draws = DrawComparison(0, 0, 0)

    records = sorted(cache.merged().shards.values(), key=lambda r: r.index)
    report.total_rows, report.total_shards = sum(r.rows for r in records), len(records)
    picks = sample_positions(records, opts.sample, report.seed)
    report.sampled_rows = int(sum(len(v) for v in picks.values()))
    report.sampled_shards = len(picks)
    await _Verification(opts, teacher, identity, info, report).run({r.index: r for r in records}, picks)
    if report.draws is not None and report.draws.jumped == 0 and not report.draws.holds:
        report.add(
            Mismatch(
                out.name,
                None,
                None,
                f"sampled targets: {report.draws}, more than the "
                f"{report.draws.allowed} a CDF boundary explains",
            )
        )
    return report


def run_verify(opts: VerifyOptions) -> VerifyReport:
    """Verify with a pool of ``opts.servers``, closing it afterwards."""
    if opts.sample < 1:
        raise InputError("--sample must be at least 1")

    async def go() -> VerifyReport:
        pool = TeacherPool(
            [HttpTeacher(u, api_key=opts.api_key, ca_bundle=opts.ca_bundle) for u in opts.servers],
            retry_for_s=opts.retry_for_s,
        )
        try:
            return await verify_cache(opts, pool)
        finally:
            await pool.aclose()

    return run_async(go())
