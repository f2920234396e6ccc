"""The cache pipeline over many inputs, pre-tokenized records and long lines, against a stand-in teacher."""

from __future__ import annotations

import asyncio
import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.client.cache import CacheOptions, CacheRun
from teacher_farm.client.manifest import save_manifest
from teacher_farm.schemas.cache_dir import load_manifests
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.formats import FORMATS
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.windows import window_starts
from tests.conftest import load_manifest
from tests.standin import StandInTeacher, chat_tokens, expected_topk, tokens

VOCAB = 1000
LONG = "the quick brown fox jumps over the lazy dog. " * 5  # 225 characters: 226 tokens with BOS


def run(tmp_path, inp, out="out", teacher=None, **kw):
    opts = CacheOptions(input=inp, out_dir=tmp_path / out, scoring=Scoring(k=4), **kw)
    return asyncio.run(CacheRun(opts, teacher or StandInTeacher(VOCAB)).run())


def rows(out):
    shards = sorted(
        (s for m in load_manifests(out).values() for s in m.shards.values()), key=lambda s: s.index
    )
    return pq.read_table([out / s.file for s in shards]).to_pylist()


def make_corpus(root):
    root.mkdir(parents=True)
    (root / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "text", "text": "hello"},
                {"id": "ids", "input_ids": [7, 8, 9, 10]},
                {"id": "oov", "input_ids": [3, VOCAB + 5]},
                {"id": "none", "body": "neither text nor ids"},
            ]
        )
        + "\n"
    )
    with gzip.open(root / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": "long", "text": LONG}) + "\n")
    pq.write_table(
        pa.table(
            {
                "id": ["p0", "p1", "p2"],
                "text": ["pa", None, "pc"],
                "input_ids": pa.array([None, [4, 4], None], pa.list_(pa.int32())),
            }
        ),
        root / "c.parquet",
        row_group_size=2,
    )
    return root


def test_a_directory_of_jsonl_gz_and_parquet_caches_in_one_run(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    summary = run(tmp_path, str(root), rows_per_shard=3, max_length=64)
    got = rows(tmp_path / "out")
    src = {str(root / n): n for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")}
    assert [(r["id"], src[r["source"]], r["line"], r["offset"]) for r in got] == [
        ("text", "a.jsonl", 0, 0),
        ("ids", "a.jsonl", 1, 0),
        ("long", "b.jsonl.gz", 0, 0),
        ("p0", "c.parquet", 0, 0),
        ("p1", "c.parquet", 1, 0),
        ("p2", "c.parquet", 2, 0),
    ]
    by_id = {r["id"]: r for r in got}
    assert by_id["text"]["input_ids"] == tokens("hello", VOCAB).tolist()
    assert by_id["ids"]["input_ids"] == [7, 8, 9, 10]  # exactly the record's ids: no BOS added
    assert by_id["p1"]["input_ids"] == [4, 4]
    assert by_id["ids"]["topk_ids"] == expected_topk(np.array([7, 8, 9, 10]), 4, VOCAB).tolist()
    assert len(by_id["long"]["input_ids"]) == 64  # truncate is the default
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert [(src[r["source"]], r["line"], r["id"]) for r in rejects] == [
        ("a.jsonl", 2, "oov"),
        ("a.jsonl", 3, "none"),
    ]
    assert "outside the vocabulary" in rejects[0]["reason"] and "no field 'text'" in rejects[1]["reason"]
    manifest = load_manifest(tmp_path / "out")
    assert [(f.name, f.size) for f in manifest.identity.inputs] == [
        (n, (root / n).stat().st_size) for n in ("a.jsonl", "b.jsonl.gz", "c.parquet")
    ]
    assert all(len(f.head_sha256) == 16 for f in manifest.identity.inputs)
    assert [(s.first_line, s.end_line) for s in manifest.shards.values()] == [(0, 3), (3, 6), (6, 8)]
    assert summary.rows == 6 and summary.rejects == 2


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_a_cache_asks_the_wire_for_what_its_format_keeps(tmp_path, fmt):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": LONG}) + "\n")
    teacher = StandInTeacher(VOCAB)
    run(
        tmp_path,
        str(tmp_path / "a.jsonl"),
        teacher=teacher,
        logprob_dtype=fmt,
        max_length=64,
        long_lines="window",
    )
    assert teacher.wire_dtypes == {FORMATS[fmt].wire_dtype} and teacher.requests > 1  # the windows' too


def test_the_http_teacher_sends_the_wire_dtype_it_is_asked_for():
    import httpx

    from teacher_farm.client.transport import HttpTeacher
    from teacher_farm.schemas.errors import ServerRejected

    bodies = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(422, json={"error": "no", "kind": "InputError"})

    async def ask():
        teacher = HttpTeacher("http://teacher", transport=httpx.MockTransport(answer))
        for dtype in ("float16", "float32"):
            with pytest.raises(ServerRejected):
                await teacher.score_ids([("a", [1, 2])], Scoring(k=2), wire_dtype=dtype)
        with pytest.raises(ServerRejected):
            await teacher.score_ids([("a", [1, 2])], Scoring(k=2))
        await teacher.aclose()

    asyncio.run(ask())
    assert [b["logprob_dtype"] for b in bodies] == ["float16", "float32", "float32"]


def test_a_run_is_checked_in_one_place_and_finds_its_inputs_once(tmp_path, monkeypatch):
    from teacher_farm.cli import main
    from teacher_farm.client import cache, transport

    found = []
    discover = cache.discover
    monkeypatch.setattr(cache, "discover", lambda inputs: found.append(inputs) or discover(inputs))
    monkeypatch.setattr(transport, "TeacherPool", lambda teachers, retry_for_s: StandInTeacher(VOCAB))
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    assert (
        main(
            [
                "cache",
                "--server",
                "http://x",
                "--input",
                str(tmp_path / "a.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--k",
                "4",
            ]
        )
        == 0
    )
    assert len(found) == 1 and rows(tmp_path / "o")
    # A library caller meets the checks the command line does.
    for bad, words in [
        ({"sample_logprobs": True}, "--sample-logprobs applies"),
        ({"parts": 2, "part": 2}, r"--part must be in 0\.\.1"),
        ({"stride": 4}, "--stride applies"),
        ({"concurrency": 0}, "--concurrency must be at least 1"),
    ]:
        with pytest.raises(InputError, match=words):
            run(tmp_path, str(tmp_path / "a.jsonl"), "bad", **bad)


def test_a_split_is_named_parts_and_the_former_shard_flags_still_work(capsys):
    from teacher_farm.cli import cache_parser, main

    base = ["--server", "http://x", "--input", "a.jsonl", "--out", "o"]
    for flags in (["--parts", "4", "--part", "2"], ["--num-shards", "4", "--shard-index", "2"]):
        args = cache_parser().parse_args([*base, *flags])
        assert (args.parts, args.part) == (4, 2)
    args = cache_parser().parse_args(base)
    assert (args.parts, args.part) == (1, 0)
    assert "--num-shards" not in cache_parser().format_help()
    with pytest.raises(SystemExit):
        main(["cache", *base, "--num-shards", "2", "--shard-index", "2"])
    assert "--part must be in 0..1" in capsys.readouterr().err


def test_resume_and_split_across_files_cache_every_line_once(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    run(tmp_path, str(root), "whole", rows_per_shard=2)
    whole = rows(tmp_path / "whole")
    # Two client processes, each a half of the shards, write one cache.
    for i in range(2):
        run(tmp_path, str(root), "split", rows_per_shard=2, parts=2, part=i)
    assert sorted(rows(tmp_path / "split"), key=lambda r: (r["source"], r["line"])) == sorted(
        whole, key=lambda r: (r["source"], r["line"])
    )
    # A run that died after shard 2 (lines 4, 5: across b.jsonl.gz and c.parquet) resumes the rest.
    out = tmp_path / "whole"
    manifest = load_manifest(out)
    for index in (0, 1, 3):
        (out / manifest.shards.pop(index).file).unlink()
    manifest.complete, manifest.rejects_bytes = False, 0
    save_manifest(manifest, out)
    again = run(tmp_path, str(root), "whole", rows_per_shard=2)
    assert again.skipped_shards == 1
    assert rows(out) == whole
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 2


def test_a_changed_input_file_is_refused_on_resume(tmp_path):
    root = make_corpus(tmp_path / "corpus")
    run(tmp_path, str(root))
    with open(root / "a.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more"}) + "\n")
    from teacher_farm.schemas.errors import CacheMismatch

    with pytest.raises(CacheMismatch, match="inputs:"):
        run(tmp_path, str(root))


# --- long lines ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, L, S, starts",
    [
        (10, 10, 4, [0]),
        (11, 10, 4, [0, 4]),
        (14, 10, 4, [0, 4]),
        (15, 10, 4, [0, 4, 8]),
        (100, 10, 9, [0, 9, 18, 27, 36, 45, 54, 63, 72, 81, 90]),
    ],
)
def test_windows_start_every_stride_until_one_reaches_the_last_token(n, L, S, starts):
    got = window_starts(n, L, S)
    assert got.tolist() == starts
    assert got[-1] + L >= n and (len(got) == 1 or got[-2] + L < n)


def test_long_lines_in_window_mode_cover_every_token_with_windows_scored_alone(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    long_ids = np.arange(2, 2 + 150) % 997
    (root / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "short", "text": "short"},
                {"id": "long-text", "text": LONG},
                {"id": "long-ids", "input_ids": long_ids.tolist()},
                {"id": "exact", "text": "x" * 39},  # 40 tokens: fits, not split
            ]
        )
        + "\n"
    )
    L, S = 40, 15
    run(tmp_path, str(root), max_length=L, long_lines="window", stride=S, batch_lines=3)
    got = rows(tmp_path / "out")
    for seq_id, full in (("long-text", tokens(LONG, VOCAB)), ("long-ids", long_ids)):
        windows = [r for r in got if r["id"] == seq_id]
        starts = window_starts(len(full), L, S).tolist()
        assert [w["offset"] for w in windows] == starts and len(starts) > 3
        covered = np.zeros(len(full), bool)
        for w in windows:
            s = w["offset"]
            assert w["input_ids"] == full[s : s + L].tolist() and w["line"] == windows[0]["line"]
            # The teacher saw the window's tokens alone.
            assert w["topk_ids"] == expected_topk(full[s : s + L], 4, VOCAB).tolist()
            assert len(w["target_logprobs"]) == len(w["input_ids"]) - 1
            covered[s : s + L] = True
        assert covered.all()
    assert [(r["id"], r["offset"]) for r in got if r["id"] in ("short", "exact")] == [
        ("short", 0),
        ("exact", 0),
    ]
    assert load_manifest(tmp_path / "out").identity.stride == S


def test_window_mode_stride_defaults_to_half_the_max_length(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": LONG}) + "\n")
    run(tmp_path, str(tmp_path / "a.jsonl"), max_length=100, long_lines="window")
    assert [r["offset"] for r in rows(tmp_path / "out")] == [0, 50, 100, 150]


def test_a_stride_not_below_the_max_length_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": LONG}) + "\n")
    from teacher_farm.schemas.errors import InputError

    with pytest.raises(InputError, match="--stride 100 must be in 1..99"):
        run(tmp_path, str(tmp_path / "a.jsonl"), max_length=100, long_lines="window", stride=100)


CHAT = [
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": LONG},
    {"role": "assistant", "content": "A fox jumps over a dog, " * 3},
]


def test_a_chat_record_longer_than_the_max_length_is_windowed_like_text(tmp_path):
    from teacher_farm.training import TopkDataset

    (tmp_path / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "chat", "messages": CHAT},
                {"id": "short-chat", "messages": [{"role": "user", "content": "hi"}]},
            ]
        )
        + "\n"
    )
    L, S = 64, 24
    run(tmp_path, str(tmp_path / "a.jsonl"), max_length=L, long_lines="window", stride=S)
    got = rows(tmp_path / "out")
    full = chat_tokens(CHAT, VOCAB)
    starts = window_starts(len(full), L, S)
    assert len(starts) > 4
    assert [(r["id"], r["offset"]) for r in got] == [("chat", s) for s in starts] + [("short-chat", 0)]
    for w in got[:-1]:
        s = w["offset"]
        # Each window holds the rendered record's tokens from its offset, and the teacher saw them alone.
        assert w["input_ids"] == full[s : s + L].tolist() and w["line"] == 0
        assert w["topk_ids"] == expected_topk(full[s : s + L], 4, VOCAB).tolist()
    assert got[-1]["input_ids"] == chat_tokens([{"role": "user", "content": "hi"}], VOCAB).tolist()
    # Joined for training, the windows give back the record's one token stream.
    items = list(TopkDataset(tmp_path / "out", join_windows=True))
    assert [int(x["line"]) for x in items] == [0, 1]
    assert items[0]["input_ids"].tolist() == full.tolist() and items[0]["target_logprobs"].shape == (
        len(full) - 1,
    )


def test_a_chat_record_is_still_truncated_by_default(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "chat", "messages": CHAT}) + "\n")
    teacher = StandInTeacher(VOCAB)
    run(tmp_path, str(tmp_path / "a.jsonl"), teacher=teacher, max_length=64)
    (row,) = rows(tmp_path / "out")
    assert row["input_ids"] == chat_tokens(CHAT, VOCAB)[:64].tolist() and row["offset"] == 0
    assert teacher.tokenizations == 0


def test_window_0_of_a_long_line_is_the_cut_row_scored_once(tmp_path):
    """The batch's row of a line cut at L is its first window: only the later windows are scored."""
    long_ids = (np.arange(150) * 3 + 2) % 997
    (tmp_path / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "text", "text": LONG},
                {"id": "chat", "messages": CHAT},
                {"id": "ids", "input_ids": long_ids.tolist()},
                {"id": "short", "text": "short"},
            ]
        )
        + "\n"
    )
    L, S = 40, 15
    teacher = StandInTeacher(VOCAB)
    summary = run(
        tmp_path, str(tmp_path / "a.jsonl"), teacher=teacher, max_length=L, long_lines="window", stride=S
    )
    got = rows(tmp_path / "out")
    for seq_id, full in (
        ("text", tokens(LONG, VOCAB)),
        ("chat", chat_tokens(CHAT, VOCAB)),
        ("ids", long_ids),
    ):
        windows = [r for r in got if r["id"] == seq_id]
        assert [w["offset"] for w in windows] == window_starts(len(full), L, S).tolist()
        assert [w["input_ids"] for w in windows] == [
            full[s : s + L].tolist() for s in window_starts(len(full), L, S)
        ]
    # Every token the teacher scored is in the cache exactly once: no window was scored twice.
    assert teacher.tokens_scored == summary.tokens == sum(len(r["input_ids"]) for r in got)
    # One request for the batch, one for the later windows of each long line; text and chat tokenized once.
    assert teacher.requests == 1 + 3 and teacher.tokenizations == 2


def test_window_0_is_scored_on_its_own_when_the_cut_row_is_not_the_lines_first_tokens(tmp_path):
    """A tokenizer that ends every sequence with a special token cuts a line to ``[:L-1] + [EOS]``."""
    EOS = 999

    class EndsWithEos(StandInTeacher):
        def _ids(self, line, max_length):
            if line.text is None:
                return super()._ids(line, max_length)
            ids = np.append(tokens(line.text, self.vocab), EOS).astype(np.int32)
            return (
                ids if max_length is None or len(ids) <= max_length else np.append(ids[: max_length - 1], EOS)
            )

        async def tokenize(self, text):
            return tokens(text, self.vocab).tolist() + [EOS]

    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "text", "text": LONG}) + "\n")
    L, S = 40, 15
    teacher = EndsWithEos(VOCAB)
    summary = run(
        tmp_path, str(tmp_path / "a.jsonl"), teacher=teacher, max_length=L, long_lines="window", stride=S
    )
    full = np.append(tokens(LONG, VOCAB), EOS)
    got = rows(tmp_path / "out")
    assert [r["input_ids"] for r in got] == [full[s : s + L].tolist() for s in window_starts(len(full), L, S)]
    assert got[0]["topk_ids"] == expected_topk(full[:L], 4, VOCAB).tolist()
    # The cut row was scored and dropped; every window, window 0 included, was scored once more.
    assert teacher.tokens_scored == summary.tokens + L


def test_training_items_carry_the_input_file_of_their_line(tmp_path):
    from teacher_farm.training import TopkDataset, collate_topk

    root = tmp_path / "corpus"
    root.mkdir()
    (root / "a.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["one", "two"]) + "\n")
    (root / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["three", LONG]) + "\n")
    run(tmp_path, str(root), max_length=64, long_lines="window", stride=24)
    want = [(str(root / name), line) for name in ("a.jsonl", "b.jsonl") for line in (0, 1)]
    joined = list(TopkDataset(tmp_path / "out", join_windows=True))
    assert [(x["source"], int(x["line"])) for x in joined] == want
    # Unjoined, every window of the long line carries its file too.
    windows = list(TopkDataset(tmp_path / "out"))
    assert len(windows) > 4 and [(x["source"], int(x["line"])) for x in windows[:3]] == want[:3]
    assert {(x["source"], int(x["line"])) for x in windows[3:]} == {want[3]}
    # A batch of them has the keys an online batch has.
    batch = collate_topk(joined)
    assert "source" not in batch and batch["line"].tolist() == [0, 1, 0, 1]


# --- one stream per line for training -------------------------------------------------------


def test_training_reader_joins_windows_into_one_stream_taking_each_position_from_its_most_context(tmp_path):
    from teacher_farm.training import TopkDataset, join_windows, row_group_arrays

    root = tmp_path / "corpus"
    root.mkdir()
    long_ids = (np.arange(137) * 7 + 3) % 997
    (root / "a.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"id": "short", "input_ids": [5, 6, 7]},
                {"id": "long", "input_ids": long_ids.tolist()},
                {"id": "after", "text": "after"},
            ]
        )
        + "\n"
    )
    L, S = 40, 15
    run(tmp_path, str(root), max_length=L, long_lines="window", stride=S)
    items = list(TopkDataset(tmp_path / "out", join_windows=True))
    assert [int(x["line"]) for x in items] == [0, 1, 2]
    long = items[1]
    assert long["input_ids"].tolist() == long_ids.tolist()
    # Position p comes from the earliest window holding it: window i (start iS) owns [(i-1)S + L, iS + L).
    starts = window_starts(len(long_ids), L, S)
    want = np.concatenate(
        [
            expected_topk(long_ids[s : s + L], 4, VOCAB)[(0 if i == 0 else starts[i - 1] + L - s) :]
            for i, s in enumerate(starts)
        ]
    )
    assert long["topk_ids"].tolist() == want.tolist()
    assert long["target_logprobs"].shape == (len(long_ids) - 1,) and long["tail_logprob"].shape == (
        len(long_ids),
    )
    assert items[0]["input_ids"].tolist() == [5, 6, 7]
    # Without joining every window is an item.
    assert len(list(TopkDataset(tmp_path / "out"))) == 2 + len(starts)
    # Rows that start inside a line cannot be joined.
    table = pq.read_table(tmp_path / "out" / "part-000000.parquet")
    from teacher_farm.schemas.errors import InputError

    with pytest.raises(InputError, match="starts inside a line"):
        join_windows(row_group_arrays(table.slice(2)), table.column("offset").to_numpy()[2:])


def test_joined_targets_come_from_the_earliest_window_holding_both_tokens():
    """Target of position p (token p+1): the window of p, except at a window's last position."""
    from teacher_farm.training import RowGroupArrays, join_windows

    L, S, n = 6, 2, 10  # windows at 0, 2, 4 (4 + 6 = 10)
    starts = window_starts(n, L, S)
    lengths = np.minimum(L, n - starts)
    # Mark every target with (window, local position).
    targets = np.concatenate([w * 100 + np.arange(m - 1) for w, m in enumerate(lengths)]).astype(np.float32)
    pos = np.concatenate([w * 100 + np.arange(m) for w, m in enumerate(lengths)])
    offsets = np.r_[0, np.cumsum(lengths)]
    a = RowGroupArrays(
        line=np.zeros(3, np.int64),
        offsets=offsets,
        input_ids=pos,
        topk_ids=pos[:, None],
        topk_logprobs=np.zeros((len(pos), 1), np.float32),
        tail_logprob=np.zeros(len(pos), np.float32),
        target_logprobs=targets,
        target_offsets=np.r_[0, np.cumsum(lengths - 1)],
    )
    j = join_windows(a, starts)
    # positions 0-5 from window 0, 6-7 from window 1 (local 4, 5), 8-9 from window 2 (local 4, 5)
    assert j.input_ids.tolist() == [0, 1, 2, 3, 4, 5, 104, 105, 204, 205]
    # targets 0-4 from window 0; 5 (token 6) from window 1 (local 3); 6 from window 1; 7, 8 from window 2
    assert j.target_logprobs.tolist() == [0, 1, 2, 3, 4, 103, 104, 203, 204]


def test_a_long_line_the_server_will_not_tokenize_is_a_reject_and_the_run_goes_on(tmp_path):
    from teacher_farm.schemas.errors import ServerRejected

    class Picky(StandInTeacher):
        async def tokenize(self, text):
            if text.startswith("huge"):
                raise ServerRejected("body too large", 413)
            return await super().tokenize(text)

    (tmp_path / "a.jsonl").write_text(
        "\n".join(json.dumps({"id": i, "text": t}) for i, t in enumerate(["huge " + LONG, LONG, "short"]))
        + "\n"
    )
    summary = run(
        tmp_path, str(tmp_path / "a.jsonl"), teacher=Picky(VOCAB), max_length=100, long_lines="window"
    )
    assert summary.rejects == 1
    assert sorted({r["id"] for r in rows(tmp_path / "out")}) == ["1", "2"]
    (rej,) = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rej["id"] == "0" and "body too large" in rej["reason"]


def test_the_default_max_length_is_capped_at_the_teachers_limit_without_a_warning(tmp_path, caplog):
    """A default the user never chose does not warn; a --max-length over what the teacher holds does."""
    inp = tmp_path / "c.jsonl"
    inp.write_text('{"id": "a", "text": "x"}\n')
    small = StandInTeacher(VOCAB, max_model_len=4096)
    with caplog.at_level("WARNING"):
        summary = run(tmp_path, str(inp), "default", teacher=small)
    assert "over what the teacher holds" not in caplog.text
    assert summary.max_length == 4095 and "max length 4095 tokens" in summary.render()
    assert load_manifest(tmp_path / "default").identity.max_length == 4095
    # Below the teacher's limit, the default is 8192 as before.
    assert (
        run(tmp_path, str(inp), "big", teacher=StandInTeacher(VOCAB, max_model_len=16384)).max_length == 8192
    )
    with caplog.at_level("WARNING"):
        asked = run(tmp_path, str(inp), "asked", teacher=small, max_length=8192)
    assert asked.max_length == 4095 and "--max-length 8192 is over what the teacher holds" in caplog.text
