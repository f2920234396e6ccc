"""A run's inputs: files, directories and globs, JSONL and Parquet, read as one stream of lines.

Every input line becomes a ``Line`` to score or a ``Reject`` (a bad line, and why). A line holds
``text``, chat ``messages`` or pre-tokenized ``input_ids`` (scored on exactly those ids).

``--input`` repeats; each value is a file, a directory (every corpus file under it, recursively) or
a glob. The files are taken in sorted order, each once, so every run of the same command sees the
same lines in the same order: shards are cut by a line's position in that whole stream
(``Line.index``), while the row records the file (``source``) and its line in that file (``line``).

JSONL (plain, ``.gz``, ``.zst``) is read line by line; Parquet one row group at a time, with
``--text-field``, ``--ids-field`` and ``--id-field`` naming its columns.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import sys
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeGuard

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from teacher_farm.schemas.errors import InputError

#: The three kinds of record a line holds: text, a chat record (its messages) or pre-tokenized ids.
Kind = Literal["text", "chat", "ids"]
#: Each kind's field in a ``/v1/topk`` input (``schemas.wire.TopkInput``).
WIRE_FIELDS: dict[Kind, str] = {"text": "text", "chat": "messages", "ids": "token_ids"}


@dataclass(frozen=True)
class Line:
    """A good input line: 0-based line number (in its file), its id, its text (or messages or token ids).

    Exactly one of ``text``, ``messages`` and ``input_ids`` is set; ``kind`` says which (the one place
    that asks) and ``content`` is it.
    """

    line: int
    id: str
    text: str | None
    #: A chat record (``[{"role", "content"}, ...]``), rendered by the teacher's chat template.
    messages: list[dict[str, str]] | None = field(default=None, compare=False)
    #: Byte offset just past this line in the (uncompressed) input: how far a run has read.
    end: int = field(default=0, compare=False)
    #: A pre-tokenized record: exactly these ids are scored (int32), no tokenizer, no BOS added.
    input_ids: np.ndarray | None = field(default=None, compare=False)
    #: The input file the line comes from (as the run found it), and its position in the run's
    #: whole input (the lines of every file, in order): what shards are cut by.
    source: str | None = field(default=None, compare=False)
    index: int = field(default=-1, compare=False)

    @property
    def record(self) -> int:
        """Position in the run's whole input (the line number when the run reads one file)."""
        return self.index if self.index >= 0 else self.line

    @property
    def kind(self) -> Kind:
        """Which record this is."""
        if self.input_ids is not None:
            return "ids"
        return "chat" if self.messages is not None else "text"

    @property
    def content(self) -> str | list[dict[str, str]] | np.ndarray:
        """The record: its text, its chat messages or its token ids."""
        if self.input_ids is not None:
            return self.input_ids
        if self.messages is not None:
            return self.messages
        assert self.text is not None, "a text line holds its text"
        return self.text

    def wire_input(self) -> dict[str, Any]:
        """The line as a ``/v1/topk`` input (token ids as numpy, which orjson writes)."""
        return {"id": self.id, WIRE_FIELDS[self.kind]: self.content}

    def weight(self, per_token_id: int) -> int:
        """Characters of the record, a token id counting as ``per_token_id`` (what batches and pools
        weigh)."""
        if self.input_ids is not None:
            return per_token_id * len(self.input_ids)
        if self.messages is not None:
            return sum(len(m["content"]) for m in self.messages)
        return len(self.text or "")


@dataclass(frozen=True)
class Reject:
    """A bad input line and why it was refused."""

    line: int
    reason: str
    id: str | None = None
    end: int = field(default=0, compare=False)
    source: str | None = field(default=None, compare=False)
    index: int = field(default=-1, compare=False)

    @property
    def record(self) -> int:
        return self.index if self.index >= 0 else self.line

    def to_json(self) -> bytes:
        out = {"line": self.line, "id": self.id, "reason": self.reason}
        if self.source is not None:
            out["source"] = self.source
        return orjson.dumps(out) + b"\n"


def open_input(path: str | Path) -> BinaryIO:
    """A binary stream of ``path`` ('-' for stdin), decompressing .gz and .zst by suffix."""
    if str(path) == "-":
        return sys.stdin.buffer
    p = Path(path)
    if p.suffix == ".gz":
        return gzip.open(p, "rb")  # type: ignore[return-value]  # a GzipFile is a binary stream
    if p.suffix in (".zst", ".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True))
    return open(p, "rb")


def parse_line(
    number: int, raw: bytes, text_field: str, id_field: str, ids_field: str = "input_ids"
) -> Line | Reject:
    """Validate one raw line; the reason of a reject says what is wrong with it."""
    if not raw.strip():
        return Reject(number, "blank line")
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Reject(number, f"not valid JSON: {exc}")
    if not isinstance(record, dict):
        return Reject(number, f"expected a JSON object, got {type(record).__name__}")
    raw_id = record.get(id_field)
    if raw_id is None:
        seq_id = str(number)
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        seq_id = str(raw_id)
    else:
        return Reject(
            number, f"field '{id_field}' must be a string or an integer, got {type(raw_id).__name__}"
        )
    if ids_field in record:
        return token_ids_line(number, seq_id, record[ids_field], ids_field)
    if text_field not in record and "messages" in record:
        return _chat_line(number, seq_id, record["messages"])
    if text_field not in record:
        return Reject(number, f"no field '{text_field}'", seq_id)
    text = record[text_field]
    if not isinstance(text, str):
        return Reject(number, f"field '{text_field}' must be a string, got {type(text).__name__}", seq_id)
    if not text:
        return Reject(number, f"field '{text_field}' is empty", seq_id)
    return Line(number, seq_id, text)


def token_ids_line(number: int, seq_id: str, ids: object, ids_field: str) -> Line | Reject:
    """A pre-tokenized record; its ids must be a non-empty list of non-negative integers."""
    arr = np.asarray(ids) if isinstance(ids, (list, np.ndarray)) else None
    if arr is None or arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        return Reject(number, f"field '{ids_field}' must be a non-empty list of token ids (integers)", seq_id)
    if arr.min() < 0 or arr.max() >= 2**31:
        return Reject(number, f"field '{ids_field}' holds a token id outside 0..2**31-1", seq_id)
    return Line(number, seq_id, None, input_ids=arr.astype(np.int32, copy=False))


def _is_chat(messages: object) -> TypeGuard[list[dict[str, str]]]:
    """Whether ``messages`` is a non-empty list of ``{"role": str, "content": str}``."""
    return bool(
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict)
            and set(m) == {"role", "content"}
            and isinstance(m["role"], str)
            and isinstance(m["content"], str)
            for m in messages
        )
    )


def _chat_line(number: int, seq_id: str, messages: object) -> Line | Reject:
    if not _is_chat(messages):
        return Reject(
            number, 'field \'messages\' must be a non-empty list of {"role": str, "content": str}', seq_id
        )
    return Line(number, seq_id, None, messages=messages)


JSONL_SUFFIXES = (
    ".jsonl",
    ".json",
    ".ndjson",
    ".jsonl.gz",
    ".json.gz",
    ".ndjson.gz",
    ".jsonl.zst",
    ".json.zst",
    ".ndjson.zst",
    ".jsonl.zstd",
    ".gz",
    ".zst",
    ".zstd",
)
PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSED = (".gz", ".zst", ".zstd")


@dataclass(frozen=True)
class InputFile:
    """One input file: ``source`` is its path as the run found it ('-' for stdin)."""

    source: str
    kind: str  # "jsonl" or "parquet"

    @property
    def path(self) -> Path:
        return Path(self.source)

    @property
    def plain_size(self) -> int | None:
        """Bytes read from it when known up front (plain JSONL; Parquet by its file size), for the progress
        ETA."""
        if self.source == "-" or self.source.endswith(_COMPRESSED):
            return None
        return self.path.stat().st_size

    def fingerprint(self) -> dict[str, object]:
        """Name, size and the hash of the first MiB: cheap, and catches a changed or swapped file."""
        if self.source == "-":
            return {"name": "-"}
        with open(self.path, "rb") as f:
            head = hashlib.sha256(f.read(1 << 20)).hexdigest()[:16]
        return {"name": self.path.name, "size": self.path.stat().st_size, "head_sha256": head}


def _kind(path: str) -> str | None:
    name = path.lower()
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return None


def discover(specs: Sequence[str]) -> list[InputFile]:
    """Expand ``--input`` values into files: sorted, each once; a value that finds nothing is an error."""
    if "-" in specs:
        if len(specs) > 1:
            raise InputError("--input - (stdin) cannot be combined with other inputs")
        return [InputFile("-", "jsonl")]
    found: set[str] = set()
    for spec in specs:
        p = Path(spec)
        if p.is_dir():
            files = [
                str(f)
                for f in p.rglob("*")
                if f.is_file()
                and _kind(f.name)
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            ]
            if not files:
                raise InputError(
                    f"--input {spec}: no .jsonl, .jsonl.gz, .jsonl.zst or .parquet file under it"
                )
        elif p.is_file():
            files = [spec]
        elif glob.has_magic(spec):
            files = [f for f in glob.glob(spec, recursive=True) if Path(f).is_file()]
            if not files:
                raise InputError(f"--input {spec}: the pattern matches no file")
        else:
            raise InputError(f"--input {spec}: no such file or directory")
        found.update(files)
    out = []
    for f in sorted(found):
        kind = _kind(f) or "jsonl"  # a file named explicitly is JSONL unless it says Parquet
        out.append(InputFile(f, kind))
    return out


def check_parquet_columns(files: Sequence[InputFile], text_field: str, id_field: str, ids_field: str) -> None:
    """Refuse, before any work, a Parquet file without a text or ids column or with one of the wrong type."""
    for f in files:
        if f.kind != "parquet":
            continue
        try:
            schema = pq.read_schema(f.path)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(f"{f.source}: not a readable Parquet file: {exc}") from exc
        names = schema.names
        if text_field not in names and ids_field not in names:
            raise InputError(
                f"{f.source} has no column '{text_field}' nor '{ids_field}' (its columns: "
                f"{', '.join(names)}); name the text column with --text-field or the token ids column with "
                "--ids-field"
            )
        if text_field in names and not (
            pa.types.is_string(t := schema.field(text_field).type) or pa.types.is_large_string(t)
        ):
            raise InputError(
                f"{f.source}: column '{text_field}' is {t}, not a string column; name the text column with "
                "--text-field"
            )
        if ids_field in names:
            t = schema.field(ids_field).type
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)) or not pa.types.is_integer(
                t.value_type
            ):
                raise InputError(
                    f"{f.source}: column '{ids_field}' is {t}, not a list of integers; name the token ids "
                    "column with --ids-field"
                )
        if id_field in names:
            t = schema.field(id_field).type
            if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
                raise InputError(
                    f"{f.source}: column '{id_field}' is {t}, not strings or integers; name the id column "
                    "with --id-field"
                )


def read_parquet(
    f: InputFile,
    *,
    text_field: str,
    id_field: str,
    ids_field: str,
    skip: Callable[[int], bool] | None = None,
) -> Generator[Line | Reject, None, int]:
    """Every row of a Parquet file, one row group in memory at a time; returns the row count.

    ``skip`` sees the row number; a row group whose rows are all skipped is not read at all.
    """
    pf = pq.ParquetFile(f.path)
    names = pf.schema_arrow.names
    columns = [c for c in dict.fromkeys((text_field, ids_field, id_field)) if c in names]
    size, meta = f.path.stat().st_size, pf.metadata
    row = 0
    for rg in range(pf.num_row_groups):
        n = meta.row_group(rg).num_rows
        first, row = row, row + n
        end = size * row // max(meta.num_rows, 1)
        if skip is not None and all(skip(first + i) for i in range(n)):
            continue
        table = pf.read_row_group(rg, columns=columns)
        texts = table.column(text_field).to_pylist() if text_field in names else None
        ids = table.column(id_field).to_pylist() if id_field in names else None
        # Without an ids column no row holds ids.
        tok_offsets = tok_values = np.zeros(0, np.int64)
        tok_valid = np.zeros(n, bool)
        if ids_field in names:
            arr = table.column(ids_field).combine_chunks()
            tok_offsets = np.asarray(arr.offsets)
            tok_values = arr.values.to_numpy(zero_copy_only=False)
            tok_valid = ~np.asarray(arr.is_null())
        for i in range(n):
            number = first + i
            if skip is not None and skip(number):
                continue
            seq_id = str(number) if ids is None or ids[i] is None else str(ids[i])
            if tok_valid[i] and tok_offsets[i + 1] > tok_offsets[i]:
                seg = tok_values[tok_offsets[i] : tok_offsets[i + 1]]
                if seg.min() < 0 or seg.max() >= 2**31:
                    yield Reject(
                        number, f"field '{ids_field}' holds a token id outside 0..2**31-1", seq_id, end
                    )
                else:
                    yield Line(number, seq_id, None, end=end, input_ids=seg.astype(np.int32))
            elif texts is not None and texts[i]:
                yield Line(number, seq_id, texts[i], end=end)
            elif texts is not None:
                what = "is empty" if texts[i] == "" else "is null"
                yield Reject(number, f"field '{text_field}' {what}", seq_id, end)
            else:
                yield Reject(number, f"field '{ids_field}' is null or empty", seq_id, end)
    return row


def read_jsonl(
    f: InputFile,
    *,
    text_field: str,
    id_field: str,
    ids_field: str,
    skip: Callable[[int], bool] | None = None,
    tap: Callable[[int, bytes], None] | None = None,
) -> Generator[Line | Reject, None, int]:
    """Every line of a JSONL file (plain, .gz, .zst or stdin), without loading it whole; returns the line
    count.

    ``tap`` sees every line's number and bytes, skipped ones too (what a resumed run checks them by).
    """
    offset, number = 0, -1
    with open_input(f.source) as stream:
        for number, raw in enumerate(stream):
            offset += len(raw)
            if tap is not None:
                tap(number, raw)
            if skip is not None and skip(number):
                continue
            yield replace(parse_line(number, raw, text_field, id_field, ids_field), end=offset)
        return number + 1


def read_inputs(
    files: Sequence[InputFile],
    *,
    text_field: str = "text",
    id_field: str = "id",
    ids_field: str = "input_ids",
    skip: Callable[[int], bool] | None = None,
    tap: Callable[[int, bytes], None] | None = None,
) -> Iterator[Line | Reject]:
    """The lines of every file in order; ``Line.index`` counts across files and ``skip`` sees it.

    ``tap`` sees every JSONL line's index and bytes, skipped ones too (Parquet rows are not tapped).

    ``end`` counts bytes across files too (the compressed size for Parquet), for the progress bar.
    """
    base, bytes_before = 0, 0
    for f in files:
        local_skip = None if skip is None else (lambda n, b=base: skip(b + n))
        local_tap = None if tap is None else (lambda n, raw, b=base: tap(b + n, raw))
        if f.kind == "parquet":
            records = read_parquet(
                f, text_field=text_field, id_field=id_field, ids_field=ids_field, skip=local_skip
            )
        else:
            records = read_jsonl(
                f,
                text_field=text_field,
                id_field=id_field,
                ids_field=ids_field,
                skip=local_skip,
                tap=local_tap,
            )
        while True:
            try:
                rec = next(records)
            except StopIteration as stop:
                base += stop.value  # every line of the file, skipped ones too
                break
            yield replace(rec, source=f.source, index=base + rec.line, end=bytes_before + rec.end)
        bytes_before += f.path.stat().st_size if f.source != "-" else 0
