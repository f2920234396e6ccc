"""Reading the corpus: every line becomes a Line or a Reject whose reason says what is wrong."""

from __future__ import annotations

import gzip
import json

import pytest
import zstandard

from teacher_farm.client.inputs import Line, Reject, discover, parse_line, read_inputs


def read_corpus(path, **kwargs):
    """Every line of one corpus file, as a run reads it."""
    return read_inputs(discover([str(path)]), **kwargs)


def parse(raw: bytes, number: int = 5, text_field: str = "text", id_field: str = "id"):
    return parse_line(number, raw, text_field, id_field)


@pytest.mark.parametrize(
    "raw, reason, seq_id",
    [
        (b"\n", "blank line", None),
        (b"  \t \r\n", "blank line", None),
        (b'{"text": "unterminated\n', "not valid JSON", None),
        (b"[1, 2]\n", "expected a JSON object, got list", None),
        (b'"just a string"\n', "expected a JSON object, got str", None),
        (b'{"id": "a"}\n', "no field 'text'", "a"),
        (b'{"id": "a", "text": 42}\n', "field 'text' must be a string, got int", "a"),
        (b'{"id": "a", "text": null}\n', "field 'text' must be a string, got NoneType", "a"),
        (b'{"id": "a", "text": ""}\n', "field 'text' is empty", "a"),
        (b'{"id": true, "text": "hi"}\n', "field 'id' must be a string or an integer, got bool", None),
        (b'{"id": [1], "text": "hi"}\n', "field 'id' must be a string or an integer, got list", None),
        (b'{"id": 1.5, "text": "hi"}\n', "field 'id' must be a string or an integer, got float", None),
        (b'{"text": "caf\xe9"}\n', "not valid JSON", None),
    ],
)
def test_bad_lines_are_rejected_with_a_reason(raw, reason, seq_id):
    got = parse(raw, number=5)
    assert isinstance(got, Reject)
    assert got.line == 5
    assert got.reason.startswith(reason)
    assert got.id == seq_id


def test_integer_id_becomes_a_string():
    assert parse(b'{"id": 17, "text": "hi"}') == Line(5, "17", "hi")


@pytest.mark.parametrize("raw", [b'{"text": "hi"}', b'{"id": null, "text": "hi"}'])
def test_missing_id_is_the_line_number(raw):
    assert parse(raw, number=12) == Line(12, "12", "hi")


def test_unicode_text_is_kept_exactly():
    text = "  Grüße, 世界 👩‍🔬\tcafé\u0301\nnext line  "
    raw = ('{"id": "ü", "text": ' + json.dumps(text, ensure_ascii=False) + "}\n").encode()
    assert parse(raw) == Line(5, "ü", text)


def test_custom_text_and_id_fields():
    raw = b'{"doc_id": "d1", "content": "body", "text": "ignored", "id": "ignored"}'
    assert parse(raw, text_field="content", id_field="doc_id") == Line(5, "d1", "body")
    missing = parse(b'{"doc_id": 3, "text": "t"}', text_field="content", id_field="doc_id")
    assert missing == Reject(5, "no field 'content'", "3")


def test_reject_serialises_to_one_json_line():
    assert Reject(3, "blank line").to_json() == b'{"line":3,"id":null,"reason":"blank line"}\n'


CORPUS = (
    b'{"id": "a", "text": "first"}\n'
    b"\n"
    b"not json\n"
    b'{"text": "fourth \xf0\x9f\x99\x82"}\n'
    b'{"id": 9, "text": "last, no newline"}'
)
EXPECTED = [
    Line(0, "a", "first"),
    Reject(1, "blank line"),
    "not valid JSON",
    Line(3, "3", "fourth \U0001f642"),
    Line(4, "9", "last, no newline"),
]


def write_corpus(tmp_path, suffix: str):
    path = tmp_path / f"corpus.jsonl{suffix}"
    if suffix == ".gz":
        path.write_bytes(gzip.compress(CORPUS))
    elif suffix == ".zst":
        path.write_bytes(zstandard.ZstdCompressor().compress(CORPUS))
    else:
        path.write_bytes(CORPUS)
    return path


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_read_corpus_numbers_lines_from_zero(tmp_path, suffix):
    got = list(read_corpus(write_corpus(tmp_path, suffix)))
    assert [r.line for r in got] == [0, 1, 2, 3, 4]
    assert isinstance(got[2], Reject) and got[2].reason.startswith(EXPECTED[2])
    assert got[:2] + got[3:] == EXPECTED[:2] + EXPECTED[3:]


def test_compressed_and_plain_corpora_read_the_same(tmp_path):
    plain, gz, zst = (list(read_corpus(write_corpus(tmp_path, s))) for s in ("", ".gz", ".zst"))
    assert plain == gz == zst


def test_skip_passes_over_lines_without_parsing_them(tmp_path):
    asked = []

    def skip(number: int) -> bool:
        asked.append(number)
        return number in (1, 2)

    got = list(read_corpus(write_corpus(tmp_path, ""), skip=skip))
    assert asked == [0, 1, 2, 3, 4]
    # The blank and the invalid line are skipped, so they are not even rejected.
    assert got == [EXPECTED[0], EXPECTED[3], EXPECTED[4]]


def test_read_corpus_with_custom_fields(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"key": "k0", "body": "b0"}\n{"key": "k1", "text": "t1"}\n')
    got = list(read_corpus(path, text_field="body", id_field="key"))
    assert got == [Line(0, "k0", "b0"), Reject(1, "no field 'body'", "k1")]


def test_chat_records_are_lines_with_messages_and_bad_ones_are_rejected():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    line = parse_line(4, json.dumps({"id": "c", "messages": chat}).encode(), "text", "id")
    assert isinstance(line, Line) and line.messages == chat and line.text is None and line.id == "c"
    for bad in (
        [],
        [{"role": "user"}],
        [{"role": "user", "content": 3}],
        "hi",
        [{"role": "u", "content": "x", "extra": 1}],
    ):
        rec = parse_line(5, json.dumps({"messages": bad}).encode(), "text", "id")
        assert isinstance(rec, Reject) and "messages" in rec.reason
