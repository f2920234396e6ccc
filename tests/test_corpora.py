"""A real corpus layout against the real server: a directory of JSONL, .jsonl.gz and Parquet files with
text records, pre-tokenized records and a document several times the max length, in one command; and
a chat record several times the max length, windowed like text."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.schemas.windows import window_starts
from tests.conftest import API_KEY, SAMPLE, load_manifest, read_lines, table_to_results, teacher_farm
from tests.reference_check import assert_matches_reference

pytestmark = pytest.mark.engine

L, S, K = 64, 24, 4


def test_a_mixed_directory_caches_in_one_command_and_windows_match_the_reference(server, reference, tmp_path):
    texts = [json.loads(x)["text"] for x in read_lines(SAMPLE)]
    book = " ".join(texts[:12])
    pretok = reference.tokenizer(texts[20], add_special_tokens=False)["input_ids"][:50]
    root = tmp_path / "corpus"
    (root / "part").mkdir(parents=True)
    (root / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "t0", "text": texts[0]},
                {"id": "ids", "input_ids": pretok},
                {"id": "oov", "input_ids": [5, 10**6]},
            ]
        )
        + "\n"
    )
    with gzip.open(root / "part" / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "book", "text": book}) + "\n")
    pq.write_table(
        pa.table(
            {
                "id": ["p0", "p1"],
                "text": [texts[30], None],
                "input_ids": pa.array([None, pretok[:10]], pa.list_(pa.int32())),
            }
        ),
        root / "part" / "c.parquet",
    )
    out = tmp_path / "out"
    proc = teacher_farm(
        "cache",
        "--server",
        server.url,
        "--api-key",
        API_KEY,
        "--input",
        str(root),
        "--out",
        str(out),
        "--k",
        str(K),
        "--max-length",
        str(L),
        "--long-lines",
        "window",
        "--stride",
        str(S),
        "--logprob-dtype",
        "float32",
    )
    assert proc.returncode == 0, proc.stderr
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    rows = table.to_pylist()
    scored = table_to_results(table.drop_columns(["line", "source", "offset"]))
    # Every row, windows included, is the teacher's distribution on that row's own tokens.
    for row in scored:
        assert_matches_reference(row, reference, K)
    by_id = {}
    for r, s in zip(rows, scored):
        by_id.setdefault(r["id"], []).append((r, s))
    assert list(by_id) == ["t0", "ids", "book", "p0", "p1"]  # a.jsonl, part/b.jsonl.gz, part/c.parquet
    # Pre-tokenized: exactly those ids, no BOS added.
    assert by_id["ids"][0][0]["input_ids"] == pretok and pretok[0] != reference.tokenizer.bos_token_id
    assert by_id["p1"][0][0]["input_ids"] == pretok[:10]
    # Text: windows over the line's full token sequence cover every token (one row when it fits).
    assert len(reference.tokenize(book)) > 4 * L
    for seq_id, text in (("t0", texts[0]), ("book", book), ("p0", texts[30])):
        full = reference.tokenize(text)
        windows = [r for r, _ in by_id[seq_id]]
        assert [w["offset"] for w in windows] == window_starts(len(full), L, S).tolist()
        covered = np.zeros(len(full), bool)
        for w in windows:
            assert w["input_ids"] == full[w["offset"] : w["offset"] + L]
            covered[w["offset"] : w["offset"] + len(w["input_ids"])] = True
        assert covered.all(), seq_id
    assert {(r["source"].removeprefix(str(root) + "/"), r["line"]) for r in rows} == {
        ("a.jsonl", 0),
        ("a.jsonl", 1),
        ("part/b.jsonl.gz", 0),
        ("part/c.parquet", 0),
        ("part/c.parquet", 1),
    }
    (rej,) = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert rej["id"] == "oov" and rej["source"] == str(root / "a.jsonl") and "vocabulary" in rej["reason"]
    manifest = load_manifest(out)
    assert [f.name for f in manifest.identity.inputs] == ["a.jsonl", "b.jsonl.gz", "c.parquet"]
    assert manifest.identity.long_lines == "window" and manifest.identity.stride == S


SHORT_CHAT = [{"role": "user", "content": "Hi."}]


def test_a_long_chat_record_is_windowed_by_the_real_teacher_scoring_window_0_once(
    server, reference, tmp_path
):
    import httpx

    from teacher_farm.training import TopkDataset

    texts = [json.loads(x)["text"] for x in read_lines(SAMPLE)]
    chat = [{"role": "system", "content": "Be brief."}] + [
        {"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(texts[5:8])
    ]
    full = reference.tokenizer.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=False, return_dict=False
    )
    assert len(full) > 3 * L
    # The teacher's text cut at L is the first L tokens of its full tokenization (its window 0).
    for text in texts[:10]:
        assert reference.tokenize(text, L) == reference.tokenize(text)[:L]
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    with http:
        r = http.post("/tokenize", json={"messages": chat, "add_generation_prompt": False})
        assert r.status_code == 200 and r.json()["tokens"] == full, r.text

        def tokens_scored() -> float:
            lines = http.get("/metrics").text.splitlines()
            return float(
                next(x for x in lines if x.startswith("teacher_farm_tokens_scored_total ")).split()[1]
            )

        inp = tmp_path / "chat.jsonl"
        inp.write_text(
            "\n".join(
                json.dumps(r)
                for r in [
                    {"id": "chat", "messages": chat},
                    {"id": "book", "text": " ".join(texts[:3])},
                    {"id": "short", "messages": SHORT_CHAT},
                ]
            )
            + "\n"
        )
        out = tmp_path / "out"
        before = tokens_scored()
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
            str(K),
            "--max-length",
            str(L),
            "--long-lines",
            "window",
            "--stride",
            str(S),
            "--logprob-dtype",
            "float32",
        )
        assert proc.returncode == 0, proc.stderr
        scored = tokens_scored() - before
    table = pq.read_table(sorted(out.glob("part-*.parquet")))
    rows = table.to_pylist()
    # No window was scored twice: the teacher scored exactly the tokens the cache holds.
    assert scored == sum(len(r["input_ids"]) for r in rows)
    windows = [
        (r, s)
        for r, s in zip(rows, table_to_results(table.drop_columns(["line", "source", "offset"])))
        if r["id"] == "chat"
    ]
    assert [w["offset"] for w, _ in windows] == window_starts(len(full), L, S).tolist()
    for w, s in windows:
        assert (
            w["input_ids"] == full[w["offset"] : w["offset"] + L]
            and w["line"] == 0
            and w["source"] == str(inp)
        )
        # The teacher's distribution on the window's own tokens.
        assert_matches_reference(s, reference, K)
    assert [r["offset"] for r in rows if r["id"] == "short"] == [0]
    items = list(TopkDataset(out, join_windows=True))
    short = reference.tokenizer.apply_chat_template(
        SHORT_CHAT, tokenize=True, add_generation_prompt=False, return_dict=False
    )
    assert [x["input_ids"].tolist() for x in items] == [full, reference.tokenize(" ".join(texts[:3])), short]
    assert [x["source"] for x in items] == [str(inp)] * 3
