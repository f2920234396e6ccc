"""``teacher-farm cache`` against a real server: rejects, ids, truncation, resume, refusals."""

from __future__ import annotations

import gzip
import json

import pyarrow.parquet as pq
import pytest

from teacher_farm.client.manifest import save_manifest
from tests.conftest import API_KEY, SAMPLE, load_manifest, read_lines, teacher_farm
from tests.reference_check import assert_same_rows

pytestmark = pytest.mark.engine


def cache(server, inp, out, *extra, **kwargs):
    return teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(out),
        "--k",
        "4",
        "--logprob-dtype",
        "float32",
        *extra,
        **kwargs,
    )


def rows(out):
    return pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()


def test_bad_lines_go_to_rejects_and_the_run_goes_on(server, tmp_path):
    lines = [
        json.dumps({"id": "good-0", "text": "first good line"}),
        "{this is not json",
        json.dumps({"id": "no-text", "body": "wrong field"}),
        json.dumps({"id": "num", "text": 42}),
        json.dumps({"id": "empty", "text": ""}),
        "",
        json.dumps(["a", "list"]),
        json.dumps({"text": "no id: the line number is the id"}),
        json.dumps({"id": 17, "text": "integer id"}),
        json.dumps({"id": "uni", "text": "naïve café 🧪 知识蒸馏"}),
    ]
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    proc = cache(server, inp, tmp_path / "out", "--rows-per-shard", "3")
    assert proc.returncode == 0, proc.stderr
    assert "4 rows" in proc.stdout and "6 lines rejected" in proc.stdout
    got = rows(tmp_path / "out")
    assert [(r["line"], r["id"]) for r in got] == [(0, "good-0"), (7, "7"), (8, "17"), (9, "uni")]
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rejects] == [1, 2, 3, 4, 5, 6]
    reasons = [r["reason"] for r in rejects]
    assert "not valid JSON" in reasons[0] and "no field 'text'" in reasons[1]
    assert "must be a string" in reasons[2] and "empty" in reasons[3]
    assert reasons[4] == "blank line" and "JSON object" in reasons[5]
    assert rejects[1]["id"] == "no-text"


def test_truncation_custom_fields_and_seed_flag_names(server, tmp_path):
    inp = tmp_path / "in.jsonl.gz"
    with gzip.open(inp, "wt", encoding="utf-8") as f:
        for i in range(5):
            f.write(json.dumps({"doc": f"d{i}", "content": "long text " * 50}) + "\n")
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input_jsonl",
        str(inp),
        "--out_dir",
        str(tmp_path / "o"),
        "--max_length",
        "16",
        "--batch_size",
        "1",
        "--k",
        "3",
        "--text-field",
        "content",
        "--id-field",
        "doc",
    )
    assert proc.returncode == 0, proc.stderr
    got = rows(tmp_path / "o")
    assert [r["id"] for r in got] == [f"d{i}" for i in range(5)]
    assert all(
        len(r["input_ids"]) == 16 and len(r["topk_ids"]) == 16 and len(r["topk_ids"][0]) == 3 for r in got
    )
    assert load_manifest(tmp_path / "o").identity.max_length == 16


def test_stdin_input(server, tmp_path):
    data = "\n".join(read_lines(SAMPLE, 3)) + "\n"
    proc = cache(server, "-", tmp_path / "o", input=data)
    assert proc.returncode == 0, proc.stderr
    assert len(rows(tmp_path / "o")) == 3


def test_rerun_resumes_and_caches_every_line_exactly_once(server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 20)) + "\n{bad\n", encoding="utf-8")
    out = tmp_path / "o"
    assert cache(server, inp, out, "--rows-per-shard", "4").returncode == 0
    first = rows(out)
    # A run that died after shard 1 and 3 were committed but before the rest: forget the others.
    manifest = load_manifest(out)
    for index in (0, 2, 4, 5):
        (out / manifest.shards.pop(index).file).unlink()
    manifest.complete = False
    manifest.rejects_bytes = 0
    save_manifest(manifest, out)
    (out / "rejects.jsonl").write_text('{"line": 20, "reason": "left by a run that died"}\n')
    again = cache(server, inp, out, "--rows-per-shard", "4")
    assert again.returncode == 0, again.stderr
    assert "2 shards already done" in again.stdout
    second = rows(out)
    assert [r["line"] for r in second] == list(range(20))
    assert_same_rows(second, first)
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 1
    # A finished cache run again does nothing and says so.
    done = cache(server, inp, out, "--rows-per-shard", "4")
    assert done.returncode == 0 and "6 shards already done" in done.stdout


def test_rerun_with_other_settings_is_refused(server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(read_lines(SAMPLE, 2)) + "\n", encoding="utf-8")
    out = tmp_path / "o"
    assert cache(server, inp, out).returncode == 0
    before = sorted(p.name for p in out.iterdir())
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(inp),
        "--out",
        str(out),
        "--k",
        "8",
    )
    assert proc.returncode == 1
    assert "k: 4 there, 8 now" in proc.stderr and "new --out directory" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == before


def test_wrong_api_key_fails_with_advice(server, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(read_lines(SAMPLE, 1)[0] + "\n", encoding="utf-8")
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        "wrong",
        "--input",
        str(inp),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 1 and "--api-key" in proc.stderr


def test_chat_records_render_with_the_teachers_chat_template(server, reference, tmp_path):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Wie geht's? 🧪"},
        {"role": "assistant", "content": "Gut, danke."},
    ]
    docs = [
        {"id": "chat", "messages": chat},
        {"id": "bad", "messages": [{"role": "user"}]},
        {"id": "plain", "text": "plain text"},
    ]
    inp = tmp_path / "chat.jsonl"
    inp.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    proc = cache(server, inp, tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    got = rows(tmp_path / "o")
    assert [r["id"] for r in got] == ["chat", "plain"]
    expected = reference.tokenizer.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=False, return_dict=False
    )
    assert got[0]["input_ids"] == expected and expected.count(reference.tokenizer.bos_token_id) == 1
    assert len(got[0]["topk_ids"]) == len(expected)
    (rej,) = [json.loads(x) for x in (tmp_path / "o" / "rejects.jsonl").read_text().splitlines()]
    assert rej["id"] == "bad" and "messages" in rej["reason"]
