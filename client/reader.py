"""Stream a JSONL corpus line by line; every line becomes a ``Line`` to score or a ``Reject``.

A line holds ``text``, chat ``messages`` or pre-tokenized ``input_ids`` (scored on exactly those
ids). Several files and Parquet input are read by ``client.inputs``.
"""

from __future__ import annotations

import gzip
import io
import sys
from dataclasses import replace
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import orjson


@dataclass(frozen=True)
class Line:
    """A good input line: 0-based line number (in its file), its id, its text (or messages or token ids)."""

    line: int
    id: str
    text: str | None
    #: A chat record (``[{"role", "content"}, ...]``), rendered by the teacher's chat template.
    messages: list[dict] | None = field(default=None, compare=False)
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
        return gzip.open(p, "rb")  # type: ignore[return-value]
    if p.suffix in (".zst", ".zstd"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(p, "rb"), closefd=True))
    return open(p, "rb")


def parse_line(number: int, raw: bytes, text_field: str, id_field: str, ids_field: str = "input_ids") -> Line | Reject:
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
        return Reject(number, f"field '{id_field}' must be a string or an integer, got {type(raw_id).__name__}")
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


def _chat_line(number: int, seq_id: str, messages: object) -> Line | Reject:
    ok = (
        isinstance(messages, list) and messages
        and all(isinstance(m, dict) and set(m) == {"role", "content"}
                and isinstance(m["role"], str) and isinstance(m["content"], str) for m in messages)
    )
    if not ok:
        return Reject(number, "field 'messages' must be a non-empty list of {\"role\": str, \"content\": str}", seq_id)
    return Line(number, seq_id, None, messages=messages)


def read_corpus(
    path: str | Path, *, text_field: str = "text", id_field: str = "id", skip: Callable[[int], bool] | None = None,
    ids_field: str = "input_ids",
) -> Iterator[Line | Reject]:
    """Every line of the corpus in order, without loading it whole.

    ``skip(line_number)`` lets a resumed run pass over lines already cached without parsing them.
    """
    offset = 0
    with open_input(path) as f:
        for number, raw in enumerate(f):
            offset += len(raw)
            if skip is not None and skip(number):
                continue
            yield replace(parse_line(number, raw, text_field, id_field, ids_field), end=offset)
