"""Stream a JSONL corpus line by line; every line becomes a ``Line`` to score or a ``Reject``."""

from __future__ import annotations

import gzip
import io
import sys
from dataclasses import replace
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson


@dataclass(frozen=True)
class Line:
    """A good input line: 0-based line number, its id, its text."""

    line: int
    id: str
    text: str | None
    #: A chat record (``[{"role", "content"}, ...]``), rendered by the teacher's chat template.
    messages: list[dict] | None = field(default=None, compare=False)
    #: Byte offset just past this line in the (uncompressed) input: how far a run has read.
    end: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Reject:
    """A bad input line and why it was refused."""

    line: int
    reason: str
    id: str | None = None
    end: int = field(default=0, compare=False)

    def to_json(self) -> bytes:
        return orjson.dumps({"line": self.line, "id": self.id, "reason": self.reason}) + b"\n"


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


def parse_line(number: int, raw: bytes, text_field: str, id_field: str) -> Line | Reject:
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
    path: str | Path, *, text_field: str = "text", id_field: str = "id", skip: Callable[[int], bool] | None = None
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
            yield replace(parse_line(number, raw, text_field, id_field), end=offset)
