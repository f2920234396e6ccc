"""Finding and reading a run's inputs: files, directories, globs; JSONL and Parquet; pre-tokenized records."""

from __future__ import annotations

import gzip
import json

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from teacher_farm.client import inputs
from teacher_farm.client.inputs import (
    InputFile,
    Line,
    Reject,
    check_parquet_columns,
    discover,
    parse_line,
    read_inputs,
)
from teacher_farm.schemas.errors import InputError


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def make_corpus(root):
    """b.jsonl (2 lines), a/c.jsonl.gz (2), a/d.parquet (3 rows in 2 row groups), z.jsonl.zst (1),
    and noise."""
    (root / "a").mkdir(parents=True)
    (root / "b.jsonl").write_bytes(jsonl([{"id": "b0", "text": "bee"}, {"text": "bee two"}]))
    with gzip.open(root / "a" / "c.jsonl.gz", "wb") as f:
        f.write(jsonl([{"id": "c0", "input_ids": [5, 6, 7]}, {"id": "c1", "text": ""}]))
    table = pa.table(
        {
            "id": ["d0", "d1", None],
            "text": ["dee", None, "third"],
            "input_ids": pa.array([None, None, [9, 8]], pa.list_(pa.int64())),
        }
    )
    pq.write_table(table, root / "a" / "d.parquet", row_group_size=2)
    (root / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl([{"text": "zed"}])))
    (root / "README.md").write_text("not a corpus file")
    (root / ".hidden.jsonl").write_bytes(jsonl([{"text": "hidden"}]))
    return root


def test_a_directory_gives_its_corpus_files_sorted_and_skips_the_rest(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    got = discover([str(root)])
    assert [f.source for f in got] == [
        str(root / p) for p in ("a/c.jsonl.gz", "a/d.parquet", "b.jsonl", "z.jsonl.zst")
    ]
    assert [f.kind for f in got] == ["jsonl", "parquet", "jsonl", "jsonl"]


def test_repeated_inputs_and_globs_are_merged_sorted_and_deduplicated(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    got = discover([str(root / "z.jsonl.zst"), str(root / "*.jsonl"), str(root / "b.jsonl"), str(root / "a")])
    assert [f.source for f in got] == sorted(
        {
            str(root / "a/c.jsonl.gz"),
            str(root / "a/d.parquet"),
            str(root / "b.jsonl"),
            str(root / "z.jsonl.zst"),
        }
    )


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope.jsonl", "no such file or directory"),
        ("*.nothing", "matches no file"),
    ],
)
def test_an_input_that_finds_nothing_is_an_error_naming_it(tmp_path, spec, message):
    with pytest.raises(InputError, match=message):
        discover([str(tmp_path / spec)])


def test_an_empty_directory_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no .jsonl.*file under it"):
        discover([str(tmp_path)])


def test_stdin_stands_alone(tmp_path):
    assert discover(["-"]) == [InputFile("-", "jsonl")]
    with pytest.raises(InputError, match="stdin"):
        discover(["-", str(tmp_path)])


def test_lines_of_every_file_in_order_with_source_line_and_running_index(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    got = list(read_inputs(discover([str(root)])))
    assert [(r.source.removeprefix(str(root) + "/"), r.line, r.index) for r in got] == [
        ("a/c.jsonl.gz", 0, 0),
        ("a/c.jsonl.gz", 1, 1),
        ("a/d.parquet", 0, 2),
        ("a/d.parquet", 1, 3),
        ("a/d.parquet", 2, 4),
        ("b.jsonl", 0, 5),
        ("b.jsonl", 1, 6),
        ("z.jsonl.zst", 0, 7),
    ]
    assert (
        got[0].input_ids.tolist() == [5, 6, 7] and got[0].input_ids.dtype == np.int32 and got[0].text is None
    )
    assert isinstance(got[1], Reject) and got[1].reason == "field 'text' is empty"
    assert got[2] == Line(0, "d0", "dee")
    assert isinstance(got[3], Reject) and got[3].reason == "field 'text' is null" and got[3].id == "d1"
    assert got[4].id == "2" and got[4].input_ids.tolist() == [
        9,
        8,
    ]  # ids win over text; no id: the row number
    assert json.loads(got[3].to_json())["source"] == str(root / "a/d.parquet")


def test_skipping_counts_lines_across_files_and_skips_whole_row_groups_unread(tmp_path, monkeypatch):
    root = make_corpus(tmp_path / "corpus")
    files = discover([str(root)])
    read = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(
        pq.ParquetFile, "read_row_group", lambda self, i, **kw: read.append(i) or real(self, i, **kw)
    )
    got = list(read_inputs(files, skip=lambda n: n < 4))
    assert [r.index for r in got] == [4, 5, 6, 7]
    assert read == [1]  # row group 0 (rows 2, 3 of the run) was skipped without reading it


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"input_ids": []}', "must be a non-empty list of token ids"),
        (b'{"input_ids": "1 2 3"}', "must be a non-empty list of token ids"),
        (b'{"input_ids": [1, 2.5]}', "must be a non-empty list of token ids"),
        (b'{"input_ids": [[1, 2]]}', "must be a non-empty list of token ids"),
        (b'{"input_ids": [true, false]}', "must be a non-empty list of token ids"),
        (b'{"input_ids": [1, -2]}', "outside 0..2**31-1"),
    ],
)
def test_bad_token_ids_are_rejected_with_a_reason(raw, reason):
    got = parse_line(3, raw, "text", "id")
    assert isinstance(got, Reject) and reason in got.reason


def test_ids_field_names_the_pretokenized_field():
    got = parse_line(0, b'{"toks": [4, 2], "text": "ignored"}', "text", "id", "toks")
    assert got.input_ids.tolist() == [4, 2]
    assert parse_line(0, b'{"toks": [4, 2], "text": "used"}', "text", "id").text == "used"


def test_parquet_without_a_text_or_ids_column_is_refused_before_any_work(tmp_path):
    pq.write_table(pa.table({"content": ["x"]}), tmp_path / "x.parquet")
    with pytest.raises(
        InputError, match=r"no column 'text' nor 'input_ids' \(its columns: content\).*--text-field"
    ):
        check_parquet_columns(discover([str(tmp_path)]), "text", "id", "input_ids")
    check_parquet_columns(discover([str(tmp_path)]), "content", "id", "input_ids")


def test_parquet_column_of_the_wrong_type_is_refused(tmp_path):
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "x.parquet")
    with pytest.raises(InputError, match="column 'text' is int64, not a string column"):
        check_parquet_columns(discover([str(tmp_path)]), "text", "id", "input_ids")


def test_parquet_is_read_one_row_group_at_a_time(tmp_path, monkeypatch):
    n = 5000
    pq.write_table(
        pa.table({"text": [f"line {i}" for i in range(n)]}), tmp_path / "big.parquet", row_group_size=1000
    )
    sizes = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, **kw):
        t = real(self, i, **kw)
        sizes.append(t.num_rows)
        return t

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole file"))
    got = list(inputs.read_inputs(discover([str(tmp_path)])))
    assert len(got) == n and got[-1].text == f"line {n - 1}" and sizes == [1000] * 5


def test_the_cli_refuses_a_missing_input_or_a_stray_stride_before_reaching_a_server(tmp_path):
    from tests.conftest import teacher_farm

    base = ["cache", "--server", "http://127.0.0.1:9", "--out", str(tmp_path / "o")]
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    missing = teacher_farm(
        *base, "--input", str(tmp_path / "a.jsonl"), "--input", str(tmp_path / "nope"), timeout=120
    )
    assert missing.returncode == 1
    assert (
        missing.stderr.strip().splitlines()[-1]
        == f"teacher-farm cache: error: --input {tmp_path / 'nope'}: no such file or directory"
    )
    stray = teacher_farm(*base, "--input", str(tmp_path / "a.jsonl"), "--stride", "8", timeout=120)
    assert stray.returncode == 2 and "--stride applies to --long-lines window only" in stray.stderr


def test_the_three_kinds_of_record_are_one_type_that_says_which_it_is():
    from teacher_farm.client.inputs import parse_line

    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text, ids, messages = (
        parse_line(0, orjson.dumps(r), "text", "id")
        for r in ({"text": "abc"}, {"input_ids": [4, 5, 6]}, {"messages": chat})
    )
    assert (text.kind, ids.kind, messages.kind) == ("text", "ids", "chat")
    assert text.content == "abc" and ids.content.tolist() == [4, 5, 6] and messages.content == chat
    assert text.wire_input() == {"id": "0", "text": "abc"} and messages.wire_input() == {
        "id": "0",
        "messages": chat,
    }
    assert ids.wire_input()["token_ids"].tolist() == [4, 5, 6]
    assert (text.weight(4), ids.weight(4), ids.weight(5), messages.weight(4)) == (3, 12, 15, 7)
