"""``teacher-farm cache``: a corpus (JSONL and Parquet files) in, Parquet shards of teacher top-k out,
resumably.

The input (every file, in sorted order, as one stream of lines) is split into fixed ranges of
``rows_per_shard`` lines; shard j holds lines ``[j*R, (j+1)*R)`` of that stream. Requests of a few
lines each stay in flight (``concurrency``), and one writer takes their answers in input order, so
memory is bounded by the requests in flight and one row group. A shard is renamed into place when
complete and only then named in the manifest: a rerun skips named shards and redoes the rest, so
every good line lands exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from teacher_farm.client.fsutil import create_exclusive, fsync_dir, open_nofollow
from teacher_farm.client.inputs import InputFile, Line, Reject, check_parquet_columns, discover, read_inputs
from teacher_farm.client.lock import OutputLock
from teacher_farm.client.manifest import check_identity, save_manifest
from teacher_farm.client.progress import Progress
from teacher_farm.client.shards import ShardWriter, shard_name
from teacher_farm.client.transport import Teacher
from teacher_farm.schemas import __version__
from teacher_farm.schemas.arrow import with_source_columns
from teacher_farm.schemas.cache_dir import (
    CacheIdentity,
    InputFingerprint,
    Manifest,
    RunIdentity,
    ShardRecord,
    load_manifests,
    manifest_name,
)
from teacher_farm.schemas.errors import (
    CacheMismatch,
    InputError,
    OutputLocked,
    OutputWriteError,
    ServerRejected,
)
from teacher_farm.schemas.formats import DEFAULT_FORMAT, logprob_format
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.windows import default_stride, window_starts

log = logging.getLogger(__name__)
T = TypeVar("T")

REJECTS = "rejects.jsonl"
#: A run split into N client processes marks its directory ``.parts-N`` (``CacheRun._claim_split``).
SPLIT_MARKER = ".parts-"

#: Where lines are cut when the user names no ``--max-length`` (and the teacher holds that many).
DEFAULT_MAX_LENGTH = 8192


@dataclass
class CacheOptions:
    """Everything ``teacher-farm cache`` is told; see ``teacher_farm.cli`` for the flags."""

    #: Files, directories or globs ('-' for stdin); see ``client.inputs``.
    input: str | list[str]
    out_dir: Path
    #: Lines are cut at this many tokens; None: ``DEFAULT_MAX_LENGTH``, or what the teacher holds if less.
    max_length: int | None = None
    text_field: str = "text"
    id_field: str = "id"
    concurrency: int = 8
    rows_per_shard: int = 4096
    batch_lines: int = 32
    batch_chars: int = 200_000
    #: The cache's logprob format (``schemas.formats``); the wire dtype follows from it.
    logprob_dtype: str = DEFAULT_FORMAT
    #: Keep the logprobs of sampled targets (what ``SampledKDLoss(entropy=True)`` reads).
    sample_logprobs: bool = False
    #: Seconds between progress log lines when stderr is not a terminal.
    log_every_s: float = 10.0
    #: k, the temperature and sampled targets (``schemas.scoring.Scoring``).
    scoring: Scoring = field(default_factory=Scoring)
    #: The corpus split into ``parts``, one per client process (``--parts``); this process
    #: caches ``part`` (``--part``): the shards j with j % parts == part.
    parts: int = 1
    part: int = 0
    # --- many inputs, pre-tokenized records, long lines ---
    #: Field (JSONL) or list column (Parquet) of a pre-tokenized record's token ids.
    ids_field: str = "input_ids"
    #: "truncate" (keep the first max_length tokens) or "window" (every token, in overlapping windows).
    long_lines: str = "truncate"
    #: Tokens between window starts with long_lines="window"; None: half the max length.
    stride: int | None = None
    #: Once the cache is complete, score the lines of its rejects again (``--retry-rejects``).
    retry_rejects: bool = False

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)

    def check(self) -> None:
        """Refuse options that cannot work, alone or together (``InputError``, naming the flags)."""
        for name in ("concurrency", "rows_per_shard", "batch_lines", "batch_chars", "max_length", "stride"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1")
        if self.parts < 1:
            raise InputError("--parts must be at least 1")
        if not 0 <= self.part < self.parts:
            raise InputError(f"--part must be in 0..{self.parts - 1}")
        if self.long_lines not in ("truncate", "window"):
            raise InputError(f"--long-lines {self.long_lines}: choose truncate or window")
        if self.stride is not None and self.long_lines != "window":
            raise InputError("--stride applies to --long-lines window only")
        if self.sample_logprobs and self.scoring.targets == "topk":
            raise InputError("--sample-logprobs applies to --targets sampled or both only")
        if self.scoring.positions == "assistant" and self.long_lines == "window":
            # Windows after the first are scored as token ids, which carry no turns to keep.
            raise InputError(
                "--positions assistant keeps a chat's assistant turns in truncated records "
                "only: use --long-lines truncate"
            )

    def input_files(self) -> list[InputFile]:
        """The run's input files, found once, each readable as these options read it (else ``InputError``)."""
        files = discover(self.inputs)
        check_parquet_columns(files, self.text_field, self.id_field, self.ids_field)
        return files

    @property
    def wire_dtype(self) -> str:
        """What the teacher is asked for: the least precision the cache's format keeps."""
        return logprob_format(self.logprob_dtype).wire_dtype

    @property
    def rejects_name(self) -> str:
        n, i = self.parts, self.part
        return REJECTS if n == 1 else f"rejects-{i:05d}-of-{n:05d}.jsonl"


@dataclass
class Batch:
    """Consecutive lines of one shard, sent as one request."""

    shard: int
    lines: list[Line] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    chars: int = 0
    #: Position of the batch's last line in the run's whole input (see ``Line.record``).
    last_line: int = -1
    end_offset: int = 0
    closes_shard: bool = False


@dataclass
class Summary:
    """What a run did, printed at its end."""

    out_dir: Path
    shards: int
    rows: int
    rejects: int
    tokens: int
    bytes: int
    seconds: float
    new_tokens: int
    skipped_shards: int

    rejects_file: str = REJECTS
    wire_bytes: int | None = None
    #: Where lines were cut (or windowed), in tokens.
    max_length: int | None = None

    def render(self) -> str:
        bpt = self.bytes / self.tokens if self.tokens else 0.0
        rate = self.new_tokens / self.seconds if self.seconds else 0.0
        return (
            f"cache in {self.out_dir}: {self.rows} rows, {self.tokens} tokens in {self.shards} shards "
            f"({self.bytes / 2**20:.1f} MiB, {bpt:.1f} bytes/token); {self.rejects} lines rejected"
            + (f" (see {self.out_dir / self.rejects_file})" if self.rejects else "")
            + (f"; max length {self.max_length} tokens" if self.max_length else "")
            + f"; this run: {self.new_tokens} tokens in {self.seconds:.1f} s ({rate:,.0f} tokens/s)"
            + (f", {self.skipped_shards} shards already done" if self.skipped_shards else "")
            + (
                f"; {self.wire_bytes:,} wire bytes ({self.wire_bytes / self.new_tokens:.1f}/token)"
                if self.wire_bytes and self.new_tokens
                else ""
            )
        )


def input_size(files: list[InputFile]) -> int | None:
    """Bytes a run reads when known up front (plain files only), for the progress ETA."""
    sizes = [f.plain_size for f in files]
    known = [s for s in sizes if s is not None]
    return sum(known) if len(known) == len(sizes) else None


def make_batches(records: Iterable[Line | Reject], opts: CacheOptions) -> Iterator[Batch]:
    """Group records into requests that never cross a shard boundary; mark each shard's last."""
    cur: Batch | None = None
    for rec in records:
        shard = rec.record // opts.rows_per_shard
        if cur is not None and shard != cur.shard:
            cur.closes_shard = True
            yield cur
            cur = None
        elif cur is not None and (len(cur.lines) >= opts.batch_lines or cur.chars >= opts.batch_chars):
            yield cur
            cur = None
        if cur is None:
            cur = Batch(shard)
        if isinstance(rec, Line):
            cur.lines.append(rec)
            cur.chars += rec.weight(per_token_id=4)
        else:
            cur.rejects.append(rec)
        cur.last_line = rec.record
        cur.end_offset = rec.end
    if cur is not None:
        cur.closes_shard = True
        yield cur


@dataclass(frozen=True)
class RequestLimits:
    """What one ``/v1/topk`` request may hold (``Info``): the defaults are those of a server that did not
    say."""

    tokens: int = 262_144
    inputs: int = 1024

    def groups(self, lengths: list[int]) -> list[slice]:
        """Consecutive runs of sequences of ``lengths`` tokens, each run within both limits."""
        out, start, tokens = [], 0, 0
        for i, n in enumerate(lengths):
            if i > start and (tokens + n > self.tokens or i - start >= self.inputs):
                out.append(slice(start, i))
                start, tokens = i, 0
            tokens += n
        return out + [slice(start, len(lengths))] if lengths else out


#: A batch's result rows (or None) and the lines the server refused as bad.
Scored = tuple[pa.Table | None, list[Reject]]
#: A batch on its way through the pipeline, and the request scoring it.
_Scoring = tuple[Batch, asyncio.Task[Scored]]


def _retrieve(task: asyncio.Task[Scored]) -> None:
    if not task.cancelled():
        task.exception()


async def score_batch(
    teacher: Teacher,
    batch: Batch,
    opts: CacheOptions,
    max_length: int,
    limits: RequestLimits = RequestLimits(),
) -> Scored:
    """The batch's result rows (with ``line``, ``source``, ``offset``), and the lines the server refused as
    bad."""
    if not batch.lines:
        return None, []
    try:
        table = await teacher.score(batch.lines, opts.scoring, max_length, wire_dtype=opts.wire_dtype)
        if table.num_rows == len(batch.lines) and opts.long_lines == "window":
            # A refused tokenization or window rejects its line, like a refused line.
            return await split_long_lines(teacher, batch.lines, table, opts, max_length, limits), []
    except ServerRejected as exc:
        if len(batch.lines) == 1:
            line = batch.lines[0]
            return None, [
                Reject(
                    line.line, f"refused by the server: {exc}", line.id, source=line.source, index=line.record
                )
            ]
        # Find the bad lines: each line alone, so the good ones still land.
        parts = await asyncio.gather(
            *(score_batch(teacher, Batch(batch.shard, [x]), opts, max_length, limits) for x in batch.lines)
        )
        tables = [t for t, _ in parts if t is not None]
        rejects = [r for _, rs in parts for r in rs]
        return (pa.concat_tables(tables) if tables else None), rejects
    if table.num_rows != len(batch.lines):
        raise InputError(f"{teacher.name} answered {table.num_rows} rows for {len(batch.lines)} inputs")
    table = with_source_columns(table, [x.line for x in batch.lines], [x.source for x in batch.lines])
    # The writer turns it into the cache's layout and format once, for every batch.
    return table, []


async def full_ids(teacher: Teacher, line: Line) -> np.ndarray:
    """A line's whole token sequence, as the teacher scores it: a text's or a chat record's tokens, or its own
    ids."""
    if line.input_ids is not None:
        return line.input_ids
    if line.messages is not None:
        return np.asarray(await teacher.tokenize_chat(line.messages), np.int32)
    assert line.text is not None, "a text line holds its text"
    return np.asarray(await teacher.tokenize(line.text), np.int32)


async def split_long_lines(
    teacher: Teacher,
    lines: list[Line],
    table: pa.Table,
    opts: CacheOptions,
    max_length: int,
    limits: RequestLimits = RequestLimits(),
) -> pa.Table:
    """Replace every row cut at ``max_length`` by windows over the line's full token sequence.

    A row shorter than ``max_length`` was not cut and stays as it is. A line of exactly that length
    may have been: its full tokens come from the teacher (its tokenizer, or its chat template for a
    chat record); a pre-tokenized line's are its own. The cut row already is window 0 when its ids
    are the first ``max_length`` of the full sequence (as the teacher cuts text and chat records),
    so only the later windows are scored; otherwise (a tokenizer that ends every sequence with a
    special token) window 0 is scored on its own too.
    """
    ids = table.column("input_ids")
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    stride = opts.stride or default_stride(max_length)
    pieces, line_no, sources, offsets = [], [], [], []
    done = 0
    for i in np.flatnonzero(lengths >= max_length):
        line = lines[i]
        full = await full_ids(teacher, line)
        if len(full) <= max_length:
            continue
        starts = window_starts(len(full), max_length, stride)
        keep = int(np.array_equal(ids[int(i)].values.to_numpy(zero_copy_only=False), full[:max_length]))
        wanted = [(line.id, full[s : s + max_length]) for s in starts[keep:]]
        # A long line's windows go in as many requests as the server's limits need, scored together.
        parts = await asyncio.gather(
            *(
                teacher.score_ids(wanted[g], opts.scoring, max_length, wire_dtype=opts.wire_dtype)
                for g in limits.groups([len(t) for _, t in wanted])
            )
        )
        windows = pa.concat_tables(parts) if parts else table.slice(0, 0)
        if windows.num_rows != len(starts) - keep:
            raise InputError(
                f"{teacher.name} answered {windows.num_rows} rows for {len(starts) - keep} windows"
            )
        pieces += [table.slice(done, i + keep - done), windows.select(table.column_names).cast(table.schema)]
        line_no += [x.line for x in lines[done:i]] + [line.line] * len(starts)
        sources += [x.source for x in lines[done:i]] + [line.source] * len(starts)
        offsets += [0] * (i - done) + starts.tolist()
        done = i + 1
    if not pieces:
        return with_source_columns(table, [x.line for x in lines], [x.source for x in lines])
    pieces.append(table.slice(done))
    line_no += [x.line for x in lines[done:]]
    sources += [x.source for x in lines[done:]]
    offsets += [0] * (len(lines) - done)
    return with_source_columns(pa.concat_tables(pieces), line_no, sources, offsets)


class LineHashes:
    """sha256 of each shard's input lines (their bytes), as the run reads them past, skipped lines too.

    A finished shard's hash must be the one its record holds (``ShardRecord.input_sha256``): a corpus
    edited after its first MiB (which the input's fingerprint covers) is refused while the resumed
    run reads past it, before any later shard is committed. Costs one sha256 pass over the input.
    """

    def __init__(
        self, rows_per_shard: int, mine: Callable[[int], bool], done: dict[int, ShardRecord], where: Path
    ) -> None:
        self.rows_per_shard, self.mine, self.done, self.where = rows_per_shard, mine, done, where
        self.digests: dict[int, str] = {}
        self._shard = -1
        self._hash: Any = None

    def feed(self, index: int, raw: bytes) -> None:
        shard = index // self.rows_per_shard
        if shard != self._shard:
            self.close()
            self._shard = shard
            self._hash = hashlib.sha256() if self.mine(shard) else None
        if self._hash is not None:
            self._hash.update(raw)

    def close(self) -> None:
        """Finish the shard being read (at the next shard's first line, or the input's end)."""
        if self._hash is None:
            return
        digest, self._hash = self._hash.hexdigest(), None
        self.digests[self._shard] = digest
        rec = self.done.get(self._shard)
        if rec is not None and rec.input_sha256 is not None and rec.input_sha256 != digest:
            raise CacheMismatch(
                f"{self.where}: input lines {rec.first_line}..{rec.end_line - 1} (shard {rec.index}) differ "
                "from those its finished shard was made from: the input changed since. Restore it, or cache "
                "it into a new --out"
            )


class CacheRun:
    """One invocation of the cache job against one teacher."""

    def __init__(self, opts: CacheOptions, teacher: Teacher, files: list[InputFile] | None = None) -> None:
        """``files``: the inputs as ``opts.input_files()`` found them (when a caller checked them already)."""
        opts.check()
        self.opts = opts
        self.teacher = teacher
        self.out = Path(opts.out_dir)
        self.files = opts.input_files() if files is None else files
        #: Bytes of shards this run committed, for the message when the output cannot be written.
        self.bytes_written = 0
        #: Whether this run created its directory's split marker (``_claim_split``).
        self._marked = False
        #: Whether the shard being written holds retried rejects (``_retry_rejects``).
        self._rewriting = False

    async def prepare(self) -> tuple[Manifest, int, pa.Schema]:
        """Check the job against the teacher and the output directory; return what the run needs."""
        opts, info = self.opts, await self.teacher.info()
        scoring = opts.scoring
        refusal = scoring.refusal(info)
        if refusal is not None:
            reason, flag = refusal
            raise InputError(f"{self.teacher.name}: {reason}; start it with {flag}")
        # A default the user never chose is capped at the teacher's limit silently (the summary says
        # where lines were cut); a --max-length over that limit is worth a warning.
        max_length = min(opts.max_length or DEFAULT_MAX_LENGTH, info.max_input_tokens)
        self.limits = RequestLimits(info.max_tokens_per_request, info.max_inputs_per_request)
        if opts.max_length and opts.max_length > info.max_input_tokens:
            log.warning(
                "--max-length %d is over what the teacher holds (max_model_len %d); truncating lines to %d "
                "tokens",
                opts.max_length,
                info.max_model_len,
                max_length,
            )
        stride = (opts.stride or default_stride(max_length)) if opts.long_lines == "window" else None
        if stride is not None and not 1 <= stride < max_length:
            raise InputError(
                f"--stride {opts.stride} must be in 1..{max_length - 1} (below the max length, {max_length})"
            )
        # The cache's identity and how this run reads its inputs: a rerun must match them all.
        identity = RunIdentity(
            cache=CacheIdentity(
                model_fingerprint=info.model_fingerprint,
                tokenizer_fingerprint=info.tokenizer_fingerprint,
                vocab_size=info.vocab_size,
                scoring=scoring,
                logprob_dtype=opts.logprob_dtype,
                sample_logprobs=opts.sample_logprobs and scoring.targets != "topk",
                model=info.model,
            ),
            max_length=max_length,
            text_field=opts.text_field,
            id_field=opts.id_field,
            ids_field=opts.ids_field,
            rows_per_shard=opts.rows_per_shard,
            parts=opts.parts,
            long_lines=opts.long_lines,
            stride=stride,
            inputs=tuple(InputFingerprint.model_validate(f.fingerprint()) for f in self.files),
        )
        name = manifest_name(opts.parts, opts.part)
        others = load_manifests(self.out)
        for other_name, other in others.items():
            if manifest_name(opts.parts, 0).split("-of-")[-1] != other_name.split("-of-")[-1]:
                raise CacheMismatch(
                    f"{self.out} holds {other_name}, from a run split into another number of client "
                    f"processes than --parts {opts.parts}; use the original split or a new --out"
                )
            check_identity(other, identity, self.out)
        manifest = others.get(name)
        if manifest is None:
            manifest = Manifest(
                identity=identity,
                provenance={
                    "input_paths": [
                        os.path.abspath(f.source) if f.source != "-" else "-" for f in self.files
                    ],
                    "model": info.model,
                    "teacher": self.teacher.name,
                    "versions": info.versions.model_dump(),
                    "client_version": __version__,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
            with self._writing(self.out / name):
                save_manifest(manifest, self.out, name)
        self.manifest_name = name
        schema = identity.schema()
        return manifest, max_length, schema

    async def run(self) -> Summary:
        """Cache every line not cached yet, as the only writer of the output; returns what it now holds."""
        name = manifest_name(self.opts.parts, self.opts.part)
        with self._writing(self.out):
            self.out.mkdir(parents=True, exist_ok=True)
            self._claim_split()
        self.lock = OutputLock(self.out / f"{name}.lock")
        try:
            with self._writing(self.out):
                self.lock.acquire()
            try:
                self._remove_unfinished(name)
                return await self._run()
            finally:
                self.lock.release()
        except BaseException:
            if not (self.out / name).exists():
                self._unmark()
            raise

    def _claim_split(self) -> None:
        """Refuse, before anything is written, a run split into another number of client processes than
        one already writing or written here: each split names its own marker file, created at once."""
        mine = self.out / f"{SPLIT_MARKER}{self.opts.parts}"
        try:
            os.close(create_exclusive(mine))
            self._marked = True
        except FileExistsError:
            pass
        others = sorted(p.name for p in self.out.glob(f"{SPLIT_MARKER}*") if p != mine)
        if others:
            theirs = ", ".join(o[len(SPLIT_MARKER) :] for o in others)
            self._unmark()
            raise CacheMismatch(
                f"{self.out} is (being) written by a run split into --parts {theirs}, not "
                f"{self.opts.parts}: use the original split or a new --out"
            )

    def _unmark(self) -> None:
        """Take back the split marker this run made, when it is refused before writing (it must not
        make the directory's own split look foreign to its next run)."""
        if self._marked:
            (self.out / f"{SPLIT_MARKER}{self.opts.parts}").unlink(missing_ok=True)
            self._marked = False

    def _remove_unfinished(self, name: str) -> None:
        """Remove this part's temporary files left by a run that died (its lock is now ours): new ones are
        created exclusively, so a file found later belongs to another writer."""
        N, P = self.opts.parts, self.opts.part
        for tmp in self.out.glob(".part-*.parquet.tmp"):
            index = tmp.name[len(".part-") : -len(".parquet.tmp")]
            if index.isdigit() and int(index) % N == P:
                tmp.unlink(missing_ok=True)
        (self.out / f".{name}.tmp").unlink(missing_ok=True)
        manifest = load_manifests(self.out).get(name)
        pending = f".{self.opts.rejects_name}.retry"
        if manifest is None or manifest.rejects_pending != pending:  # not committed: a dead retry's
            (self.out / pending).unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """Turn a failed write (full disk, read-only directory) into one message that says what to do."""
        try:
            yield
        except OSError as exc:
            why = exc.strerror or str(exc)
            raise OutputWriteError(
                f"cannot write {path}: {why}; this run had written {self.bytes_written:,} bytes of finished "
                "shards before it stopped, all named in the manifest (nothing unfinished is). Free space "
                f"(or make {self.out} writable) and run the same command again: it resumes where this one "
                "stopped"
            ) from exc

    async def _run(self) -> Summary:
        started = time.monotonic()
        manifest, max_length, schema = await self.prepare()
        done = set(manifest.shards)
        rejects_file = self.out / self.opts.rejects_name
        if manifest.rejects_pending is not None:
            # A --retry-rejects committed its rewritten rejects but died before renaming them into place.
            with self._writing(rejects_file):
                self._finish_rejects_rewrite(manifest)
        # Whatever lies past the committed length was written by a run that died before its commit.
        with self._writing(rejects_file), open_nofollow(rejects_file) as f:
            f.truncate(manifest.rejects_bytes)
        new_tokens = 0
        if not manifest.complete:
            R, N, P = self.opts.rows_per_shard, self.opts.parts, self.opts.part
            self.hashes = LineHashes(R, lambda j: j % N == P, manifest.shards, self.out)
            records = _then(
                read_inputs(
                    self.files,
                    text_field=self.opts.text_field,
                    id_field=self.opts.id_field,
                    ids_field=self.opts.ids_field,
                    skip=lambda n: (n // R) % N != P or n // R in done,
                    tap=self.hashes.feed,
                ),
                self.hashes.close,
            )
            self.progress = Progress(input_size(self.files), every_s=self.opts.log_every_s)
            try:
                # A request of whole lines, each up to max_length tokens, stays within the server's limits.
                per_request = min(
                    self.opts.batch_lines, self.limits.inputs, max(1, self.limits.tokens // max_length)
                )
                batching = dataclasses.replace(self.opts, batch_lines=per_request)
                new_tokens = await self._pipeline(
                    make_batches(records, batching), manifest, max_length, schema
                )
            finally:
                self.progress.close()
            manifest.complete = True
            with self._writing(self.out / self.manifest_name):
                save_manifest(manifest, self.out, self.manifest_name)
        if self.opts.retry_rejects and manifest.rejects_bytes:
            new_tokens += await self._retry_rejects(manifest, max_length, schema)
        return Summary(
            out_dir=self.out,
            shards=len(manifest.shards),
            rows=manifest.rows,
            rejects=manifest.rejects,
            tokens=manifest.tokens,
            bytes=sum(s.bytes for s in manifest.shards.values()),
            seconds=time.monotonic() - started,
            new_tokens=new_tokens,
            skipped_shards=len(done),
            rejects_file=self.opts.rejects_name,
            wire_bytes=getattr(self.teacher, "bytes_received", None),
            max_length=max_length,
        )

    async def _retry_rejects(self, manifest: Manifest, max_length: int, schema: pa.Schema) -> int:
        """Score the committed rejects' lines again, into one new shard; returns the tokens it holds.

        The shard (numbered past every shard of the input) and the rejects rewritten to hold only the
        lines refused again are committed together by one manifest: a crash before it leaves the
        cache as it was (the stray files are replaced by the next try), one after it is completed by
        the next run (``rejects_pending``). So every line is cached, or a reject, exactly once.
        """
        R, N, P = self.opts.rows_per_shard, self.opts.parts, self.opts.part
        path = self.out / self.opts.rejects_name
        with open_nofollow(path) as f:
            committed = f.read(manifest.rejects_bytes)
        wanted = {(e.get("source"), e["line"]) for e in map(orjson.loads, committed.splitlines()) if e}
        records = [
            rec
            for rec in read_inputs(
                self.files,
                text_field=self.opts.text_field,
                id_field=self.opts.id_field,
                ids_field=self.opts.ids_field,
            )
            if (rec.source, rec.line) in wanted
        ]
        if not records:
            return 0
        known = [rec.index for m in load_manifests(self.out).values() for rec in m.shards.values()]
        last_line = max(rec.end_line for m in load_manifests(self.out).values() for rec in m.shards.values())
        index = max([*known, -(-last_line // R) + N]) + 1
        index += (P - index) % N  # a shard of this part: past every shard any part has or will have
        # One shard of the retried lines, in their input order, whatever their number.
        width = max(R, len(records))
        lines = [dataclasses.replace(rec, index=index * width + k) for k, rec in enumerate(records)]
        opts, self.opts = self.opts, dataclasses.replace(self.opts, rows_per_shard=width)
        self._rewriting = True
        self.progress = Progress(None, every_s=opts.log_every_s)
        try:
            per_request = min(opts.batch_lines, self.limits.inputs, max(1, self.limits.tokens // max_length))
            batches = make_batches(iter(lines), dataclasses.replace(self.opts, batch_lines=per_request))
            tokens = await self._pipeline(batches, manifest, max_length, schema)
        finally:
            self.opts, self._rewriting = opts, False
            self.progress.close()
        again = manifest.shards[index].rejects
        log.info(
            "retried %d rejected lines: %d cached now, %d refused again",
            len(records),
            len(records) - again,
            again,
        )
        return tokens

    def _rewrite_rejects(self, manifest: Manifest, rejects: list[Reject]) -> None:
        """Stage the rejects file holding only ``rejects`` (those refused again), named by the manifest
        about to be saved; every earlier shard's rejects were retried, so none of them remains."""
        pending = f".{self.opts.rejects_name}.retry"
        data = b"".join(r.to_json() for r in rejects)
        fd = create_exclusive(self.out / pending)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        for i, rec in list(manifest.shards.items()):
            manifest.shards[i] = rec.model_copy(update={"rejects": 0})
        manifest.rejects_pending, manifest.rejects_bytes = pending, len(data)

    def _finish_rejects_rewrite(self, manifest: Manifest) -> None:
        """Rename a committed, rewritten rejects file into place (again, after a crash) and say so in the
        manifest."""
        assert manifest.rejects_pending is not None, "a rewrite of the rejects is pending"
        pending = self.out / manifest.rejects_pending
        if pending.exists():
            os.replace(pending, self.out / self.opts.rejects_name)
            fsync_dir(self.out)
        manifest.rejects_pending = None
        save_manifest(manifest, self.out, self.manifest_name)

    async def _pipeline(
        self, batches: Iterator[Batch], manifest: Manifest, max_length: int, schema: pa.Schema
    ) -> int:
        """Keep ``concurrency`` requests in flight; write answers in input order."""
        slots = asyncio.Semaphore(self.opts.concurrency)
        queue: asyncio.Queue[_Scoring | None] = asyncio.Queue()
        writer = asyncio.create_task(self._write_in_order(queue, slots, manifest, schema))
        in_flight: set[asyncio.Task[Scored]] = set()
        try:
            for batch in batches:
                acquire = asyncio.ensure_future(slots.acquire())
                await asyncio.wait({acquire, writer}, return_when=asyncio.FIRST_COMPLETED)
                if writer.done():
                    acquire.cancel()
                    break
                task = asyncio.create_task(
                    score_batch(self.teacher, batch, self.opts, max_length, self.limits)
                )
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                # The writer re-raises the first failure; the others (every request in flight when an
                # engine dies) are retrieved here, so that asyncio does not print each one's traceback.
                task.add_done_callback(_retrieve)
                queue.put_nowait((batch, task))
            queue.put_nowait(None)
            return await writer
        finally:
            for pending in (*in_flight, writer):
                pending.cancel()

    async def _write_in_order(
        self,
        queue: asyncio.Queue[_Scoring | None],
        slots: asyncio.Semaphore,
        manifest: Manifest,
        schema: pa.Schema,
    ) -> int:
        shard: ShardWriter | None = None
        rejects: list[Reject] = []
        first_line = 0  # the first line of the shard being written, set as it opens
        tokens = 0
        while (item := await queue.get()) is not None:
            batch, task = item
            table, refused = await task
            slots.release()
            if shard is None:
                try:
                    with self._writing(self.out / shard_name(batch.shard)):
                        shard = ShardWriter(self.out, batch.shard, schema)
                except OutputWriteError as exc:
                    if isinstance(exc.__cause__, FileExistsError):
                        raise OutputLocked(
                            f"{self.out / ('.' + shard_name(batch.shard) + '.tmp')} appeared while this run "
                            "held the lock: another writer is caching into the same directory; run one at a "
                            "time"
                        ) from exc
                    raise
                first_line = batch.shard * self.opts.rows_per_shard
            written = 0
            if table is not None:
                with self._writing(shard.tmp), shard.discard_on_error():
                    # Encoded by the shard: a compact shard's id order and models are its first answers'.
                    written = await asyncio.to_thread(shard.write_results, table)
            self.progress.advance(0 if table is None else table.num_rows, written, batch.end_offset)
            rejects += batch.rejects + refused
            if batch.closes_shard:
                self.lock.check()
                with self._writing(shard.tmp), shard.discard_on_error():
                    stats = await asyncio.to_thread(shard.commit)
                rejects.sort(key=lambda r: r.record)
                with self._writing(self.out / self.opts.rejects_name):
                    if self._rewriting:
                        await asyncio.to_thread(self._rewrite_rejects, manifest, rejects)
                    else:
                        manifest.rejects_bytes = await asyncio.to_thread(
                            self._append_rejects, rejects, manifest.rejects_bytes
                        )
                manifest.shards[batch.shard] = ShardRecord(
                    index=batch.shard,
                    file=stats.file,
                    first_line=first_line,
                    end_line=batch.last_line + 1,
                    rows=stats.rows,
                    rejects=len(rejects),
                    tokens=stats.tokens,
                    bytes=stats.bytes,
                    sha256=stats.sha256,
                    input_sha256=None if self._rewriting else self.hashes.digests.get(batch.shard),
                )
                with self._writing(self.out / self.manifest_name):
                    save_manifest(manifest, self.out, self.manifest_name)
                    if manifest.rejects_pending is not None:
                        self._finish_rejects_rewrite(manifest)
                self.bytes_written += stats.bytes
                tokens += stats.tokens
                log.info(
                    "shard %d: %d rows, %d tokens, %d rejected",
                    batch.shard,
                    stats.rows,
                    stats.tokens,
                    len(rejects),
                )
                shard, rejects = None, []
        return tokens

    def _append_rejects(self, rejects: list[Reject], committed: int) -> int:
        """Append a shard's rejects durably; returns the new committed length."""
        if not rejects:
            return committed
        with open_nofollow(self.out / self.opts.rejects_name) as f:
            f.seek(committed)
            f.truncate()
            f.write(b"".join(r.to_json() for r in rejects))
            f.flush()
            os.fsync(f.fileno())
            return f.tell()


def _then(items: Iterable[T], done: Callable[[], None]) -> Iterator[T]:
    """``items``, then ``done()`` once they are exhausted."""
    yield from items
    done()


async def run_cache(opts: CacheOptions, teacher: Teacher, files: list[InputFile] | None = None) -> Summary:
    """Run the cache job, closing the teacher afterwards (``files``: as ``opts.input_files()`` found them)."""
    try:
        return await CacheRun(opts, teacher, files).run()
    finally:
        await teacher.aclose()
