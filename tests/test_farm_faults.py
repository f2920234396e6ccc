"""Faults a real farm meets, against the stand-in teacher behind the real wire (``tests/standin.py``):
proxies' answers, lying servers, long lines, locks across hosts, edited inputs, hostile manifests."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import httpx
import hypothesis  # noqa: F401 - imported before the runs: CPython 3.11.7's ast.parse fails after them (gh-106905)
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from teacher_farm.client import lock, transport
from teacher_farm.client.cache import CacheOptions, CacheRun
from teacher_farm.client.transport import TeacherPool
from teacher_farm.schemas.cache_dir import load_manifests
from teacher_farm.schemas.errors import CacheMismatch, OutputLocked, TransportError
from teacher_farm.schemas.scoring import Scoring
from tests.standin import StandInServer

VOCAB = 1000


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Backoff of a few milliseconds, so a test retries many times in well under a second."""
    monkeypatch.setattr(transport, "random", SimpleNamespace(uniform=lambda a, b: 0.01))


def corpus(path, n=40):
    path.write_text(
        "".join(
            json.dumps({"id": f"l{i}", "text": f"line number {i} " * (1 + i % 3)}) + "\n" for i in range(n)
        )
    )
    return path


def cache(tmp_path, server, inp, *, retry_for_s=30.0, out="out", **kw):
    opts = CacheOptions(
        input=str(inp),
        out_dir=tmp_path / out,
        scoring=Scoring(k=4),
        rows_per_shard=8,
        batch_lines=4,
        concurrency=4,
        **kw,
    )
    pool = TeacherPool([server.http_teacher()], retry_for_s=retry_for_s)
    return asyncio.run(CacheRun(opts, pool).run())


def cached_ids(out):
    shards = sorted(
        (s for m in load_manifests(out).values() for s in m.shards.values()), key=lambda s: s.index
    )
    return pq.read_table([out / s.file for s in shards], columns=["id"]).column("id").to_pylist()


def proxy_pages(count):
    """A proxy in front of the teacher answering its own 404, 403, 408, 502 and a bare 422 to the first
    ``count`` scoring requests (a deploy), then passing them through."""
    pages = [
        (404, b"<html><body>404 Not Found</body></html>"),
        (403, b"<html>403 Forbidden</html>"),
        (408, b"<html>408 Request Timeout</html>"),
        (502, b"<html>502 Bad Gateway</html>"),
        (422, b'{"detail": "unknown field"}'),
    ]
    seen = []

    def fault(request):
        if request.url.path != "/v1/topk" or len(seen) >= count:
            return None
        status, body = pages[len(seen) % len(pages)]
        seen.append(status)
        return httpx.Response(status, content=body, headers={"server": "nginx/1.25"})

    return fault, seen


def test_a_proxys_4xx_pages_are_retried_and_every_line_is_cached_once_none_rejected(tmp_path):
    fault, seen = proxy_pages(12)
    summary = cache(tmp_path, StandInServer(VOCAB, fault=fault), corpus(tmp_path / "in.jsonl"))
    assert len(seen) == 12 and {404, 403, 408, 422} <= set(seen)
    assert summary.rejects == 0
    assert sorted(cached_ids(tmp_path / "out")) == sorted(f"l{i}" for i in range(40))
    assert (tmp_path / "out" / "rejects.jsonl").read_bytes() == b""


def test_a_proxy_that_never_lets_through_stops_the_run_naming_its_answer(tmp_path):
    fault, _ = proxy_pages(10**9)
    with pytest.raises(TransportError) as err:
        cache(tmp_path, StandInServer(VOCAB, fault=fault), corpus(tmp_path / "in.jsonl"), retry_for_s=0.5)
    assert "nginx" in str(err.value) and "answered" in str(err.value)
    assert "\n" not in str(err.value)
    manifest = load_manifests(tmp_path / "out")["manifest.json"]
    assert manifest.rejects == 0 and not manifest.complete


def test_the_teachers_own_refusal_of_a_line_still_rejects_only_that_line(tmp_path):
    inp = tmp_path / "in.jsonl"
    corpus(inp, 8)
    with open(inp, "a") as f:
        f.write(json.dumps({"id": "oov", "input_ids": [3, VOCAB + 5]}) + "\n")
    summary = cache(tmp_path, StandInServer(VOCAB), inp)
    assert summary.rejects == 1 and len(cached_ids(tmp_path / "out")) == 8
    assert "outside the vocabulary" in (tmp_path / "out" / "rejects.jsonl").read_text()


def lie(change):
    """A mangle that applies ``change(rows)`` to the rows of an answer (Python dicts)."""

    def mangle(table):
        rows = table.to_pylist()
        change(rows)
        return pa.Table.from_pylist(rows, schema=table.schema)

    return mangle


def _ids(rows):
    rows[0]["input_ids"][0] += 1


def _oov(rows):
    rows[0]["topk_ids"][0][0] = VOCAB + 3


def _nan(rows):
    rows[0]["topk_logprobs"][1][0] = float("nan")


def _positive(rows):
    rows[0]["target_logprobs"][0] = 0.5


def _ascending(rows):
    rows[0]["topk_logprobs"][0] = sorted(rows[0]["topk_logprobs"][0])


def _swapped(rows):
    rows[0]["id"], rows[1]["id"] = rows[1]["id"], rows[0]["id"]


def _short(rows):
    rows[0]["topk_ids"].pop()
    rows[0]["topk_logprobs"].pop()


def _narrow(rows):
    rows[1]["topk_ids"][0].pop()
    rows[1]["topk_logprobs"][0].pop()


LIES = [_ids, _oov, _nan, _positive, _ascending, _swapped, _short, _narrow]


def ids_corpus(path, n=16):
    path.write_text(
        "".join(json.dumps({"id": f"l{i}", "input_ids": [5 + i, 6, 7, 8 + i % 5]}) + "\n" for i in range(n))
    )
    return path


@pytest.mark.parametrize("change", LIES, ids=lambda f: f.__name__.strip("_"))
def test_a_lying_answer_is_never_written_and_stops_the_run(tmp_path, change):
    server = StandInServer(VOCAB, mangle=lie(change))
    with pytest.raises(TransportError, match="wrong answer"):
        cache(tmp_path, server, ids_corpus(tmp_path / "in.jsonl"), retry_for_s=0.3)
    manifest = load_manifests(tmp_path / "out")["manifest.json"]
    assert manifest.shards == {} and not list((tmp_path / "out").glob("part-*.parquet"))


def test_a_server_that_lied_for_a_while_is_asked_again_and_every_row_is_the_true_one(tmp_path):
    told = []

    def sometimes(table):
        told.append(1)
        return lie(LIES[len(told) % len(LIES)])(table) if len(told) <= 10 else table

    cache(tmp_path, StandInServer(VOCAB, mangle=sometimes), ids_corpus(tmp_path / "in.jsonl"))
    honest_dir = tmp_path / "honest"
    cache(tmp_path, StandInServer(VOCAB), tmp_path / "in.jsonl", out="honest")
    assert len(told) > 10
    assert pq.read_table(tmp_path / "out" / "part-000000.parquet").equals(
        pq.read_table(honest_dir / "part-000000.parquet")
    )


def test_an_answer_larger_than_its_request_can_produce_is_not_read(tmp_path):
    def huge(request):
        if request.url.path == "/v1/topk":
            return httpx.Response(200, content=b"\0" * (8 << 20))
        return None

    with pytest.raises(TransportError, match="more than the"):
        cache(tmp_path, StandInServer(VOCAB, fault=huge), ids_corpus(tmp_path / "in.jsonl"), retry_for_s=0.3)


def sampled_answer(counts=((3, 1), (4,), (2, 2))):
    """An answer with sampled targets (N = 4): ids ascending per position, counts as given."""
    from teacher_farm.schemas.arrow import ScoredSequence, results_to_table

    lengths = np.array([len(c) for c in counts], np.int32)
    ids = np.concatenate([np.arange(10, 10 + len(c)) * (i + 1) for i, c in enumerate(counts)]).astype(
        np.int32
    )
    seq = ScoredSequence(
        "a",
        np.array([5, 6, 7], np.int32),
        np.tile(np.arange(2, dtype=np.int32), (3, 1)),
        np.tile(np.array([-0.1, -2.0], np.float32), (3, 1)),
        np.full(2, -1.0, np.float32),
        np.zeros(2, np.int32),
        sample_lengths=lengths,
        sample_ids=ids,
        sample_counts=np.concatenate(counts).astype(np.int16),
        sample_logprobs=np.full(len(ids), -1.0, np.float32),
    )
    return results_to_table([seq], 2, "both")


def test_sampled_targets_are_checked_counts_summing_to_n_and_ids_ascending():
    from teacher_farm.client.transport import check_answer

    scoring = Scoring(k=2, targets="both", samples=4)
    inputs = [{"id": "a", "token_ids": [5, 6, 7]}]
    assert check_answer(sampled_answer(), inputs, scoring, None, VOCAB) is None
    assert "sum to 4" in check_answer(sampled_answer(((3, 1), (3,), (2, 2))), inputs, scoring, None, VOCAB)
    table = sampled_answer()
    rows = table.to_pylist()
    rows[0]["sample_ids"][0] = rows[0]["sample_ids"][0][::-1]
    backwards = pa.Table.from_pylist(rows, schema=table.schema)
    assert "ascending" in check_answer(backwards, inputs, scoring, None, VOCAB)


@pytest.mark.parametrize("published", [None, 50_000], ids=["default-limit", "published-limit"])
def test_a_300k_token_line_in_window_mode_is_cached_whole_in_requests_within_the_servers_limit(
    tmp_path, published
):
    limit = published or 262_144
    server = StandInServer(VOCAB, max_model_len=16384, max_tokens_per_request=limit)
    if published is None:  # a server older than the published limit: the client assumes the default
        server.publish_limits = False
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"id": "long", "text": "ab" * 150_000})
        + "\n"
        + json.dumps({"id": "s", "text": "x"})
        + "\n"
    )
    summary = cache(tmp_path, server, inp, long_lines="window", max_length=8192)
    assert summary.rejects == 0
    assert max(server.request_tokens) <= limit and len(server.request_tokens) > 2
    rows = pq.read_table(
        tmp_path / "out" / "part-000000.parquet", columns=["id", "offset", "input_ids"]
    ).to_pylist()
    long = [r for r in rows if r["id"] == "long"]
    assert long[-1]["offset"] + len(long[-1]["input_ids"]) == 300_001  # BOS and every character


def test_the_server_publishes_its_request_limits_in_info():
    import time
    from types import SimpleNamespace as NS

    from fastapi.testclient import TestClient

    from teacher_farm.server.app import create_app
    from teacher_farm.server.settings import ServerSettings, get_settings
    from tests.standin import StandInTeacher

    engine = NS(info=asyncio.run(StandInTeacher(VOCAB).info()), shutdown=lambda: None)
    app = create_app(lambda: engine)
    app.dependency_overrides[get_settings] = lambda: ServerSettings(
        max_tokens_per_request=5000,
        max_inputs_per_request=7,
        max_answer_bytes=2**30,
        max_chat_turns=64,
        max_body_bytes=2**20,
    )
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while (r := client.get("/v1/info")).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert r.json()["max_tokens_per_request"] == 5000 and r.json()["max_inputs_per_request"] == 7
        assert r.json()["max_answer_bytes"] == 2**30 and r.json()["max_chat_turns"] == 64
        assert r.json()["max_body_bytes"] == 2**20


# --- one writer, across hosts -----------------------------------------------------------------


def foreign_lock(path, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "host": "node-17.other",
                "pid": 4242,
                "started": "2026-12-06T10:00:00Z",
                "heartbeat": time.time() - age_s,
            }
        )
    )


def test_another_hosts_live_lock_is_never_taken_over(tmp_path):
    """Where flock is node-local it is granted here too: the holder's fresh heartbeat still refuses us."""
    foreign_lock(tmp_path / "out" / "manifest.json.lock", age_s=3)
    with pytest.raises(OutputLocked) as err:
        cache(tmp_path, StandInServer(VOCAB), corpus(tmp_path / "in.jsonl"))
    assert "pid 4242 on host node-17.other" in str(err.value) and "heartbeat 3 s ago" in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_another_hosts_lock_without_a_fresh_heartbeat_is_stale_and_taken_over(tmp_path):
    foreign_lock(tmp_path / "out" / "manifest.json.lock", age_s=lock.STALE_S + 5)
    summary = cache(tmp_path, StandInServer(VOCAB), corpus(tmp_path / "in.jsonl"))
    assert summary.rows == 40


def test_a_holder_whose_lock_another_host_took_stops_before_committing(tmp_path):
    path = tmp_path / "x.lock"
    held = lock.OutputLock(path, heartbeat_s=0.02)
    held.acquire()
    try:
        foreign_lock(path, age_s=0)
        deadline = time.monotonic() + 5
        while held.lost is None and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(OutputLocked, match="took over the lock"):
            held.check()
    finally:
        held.release()
    assert "node-17.other" in path.read_text()  # the other writer's lock is left as it is


def test_a_shards_temporary_file_is_created_exclusively_never_through_a_link(tmp_path):
    from teacher_farm.client.shards import ShardWriter
    from teacher_farm.schemas.arrow import cache_schema

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / ".part-000003.parquet.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, 3, cache_schema(k=4))
    assert victim.read_bytes() == b"precious"
    ShardWriter(tmp_path, 4, cache_schema(k=4))
    with pytest.raises(FileExistsError):  # a second writer of the same shard
        ShardWriter(tmp_path, 4, cache_schema(k=4))


def test_a_run_split_otherwise_than_one_already_begun_is_refused_before_it_writes(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".parts-3").touch()  # a run split in 3 has begun: none of its manifests is written yet
    with pytest.raises(CacheMismatch, match="--parts 3, not 2"):
        cache(tmp_path, StandInServer(VOCAB), corpus(tmp_path / "in.jsonl"), parts=2, part=0)
    assert sorted(p.name for p in out.iterdir()) == [".parts-3"]


# --- resuming onto an edited input ------------------------------------------------------------


def unfinish(out, keep):
    """The manifest of a run that stopped after its first ``keep`` shards."""
    from teacher_farm.client.manifest import save_manifest

    manifest = load_manifests(out)["manifest.json"]
    manifest.shards = {i: s for i, s in manifest.shards.items() if i < keep}
    manifest.complete = False
    save_manifest(manifest, out)


def test_a_resume_onto_an_input_edited_after_its_first_mib_is_refused(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        "".join(json.dumps({"id": f"l{i}", "text": f"{i:08d} " + "x" * 2000}) + "\n" for i in range(1200))
    )
    assert inp.stat().st_size > 2 << 20
    cache(tmp_path, StandInServer(VOCAB), inp, max_length=64)
    records = load_manifests(tmp_path / "out")["manifest.json"].shards
    assert all(r.input_sha256 for r in records.values())
    unfinish(tmp_path / "out", keep=100)
    raw = bytearray(inp.read_bytes())
    at = raw.index(b"00000700")  # line 700: past the first MiB, in a finished shard; same size
    raw[at : at + 8] = b"00000701"
    inp.write_bytes(bytes(raw))
    with pytest.raises(CacheMismatch, match="differ from those its finished shard was made from"):
        cache(tmp_path, StandInServer(VOCAB), inp, max_length=64)
    assert sorted(load_manifests(tmp_path / "out")["manifest.json"].shards) == list(range(100))  # nothing new


def test_a_resume_onto_the_same_input_read_from_stdin_goes_on(tmp_path, monkeypatch):
    import io
    import sys

    inp = corpus(tmp_path / "in.jsonl", 40)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(inp.read_bytes())))
    cache(tmp_path, StandInServer(VOCAB), "-")
    unfinish(tmp_path / "out", keep=2)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(inp.read_bytes())))
    assert cache(tmp_path, StandInServer(VOCAB), "-").rows == 40
    edited = inp.read_bytes().replace(b"line number 3 ", b"line number 4 ")
    unfinish(tmp_path / "out", keep=2)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BytesIO(edited)))
    with pytest.raises(CacheMismatch):
        cache(tmp_path, StandInServer(VOCAB), "-")


# --- a manifest naming files outside its directory --------------------------------------------


@pytest.mark.parametrize("name", ["../x.parquet", "/etc/passwd", "sub/../../x.parquet", "..", ""])
def test_a_manifest_naming_a_file_outside_the_cache_directory_is_refused(tmp_path, name):
    from teacher_farm.schemas.cache_dir import CacheDir
    from teacher_farm.schemas.errors import InputError

    cache(tmp_path, StandInServer(VOCAB), corpus(tmp_path / "in.jsonl", 8))
    (tmp_path / "x.parquet").write_bytes((tmp_path / "out" / "part-000000.parquet").read_bytes())
    path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"]["0"]["file"] = name
    path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="not a file name inside the cache directory"):
        CacheDir(tmp_path / "out").shard_paths()


# --- scoring a finished cache's rejects again ----------------------------------------------


def test_retry_rejects_scores_the_rejected_lines_once_into_a_new_shard_and_empties_the_rejects(tmp_path):
    inp = corpus(tmp_path / "in.jsonl", 20)
    with open(inp, "a") as f:
        f.write("not json\n")
    first = cache(tmp_path, StandInServer(VOCAB, max_tokens_per_request=30), inp, batch_chars=1)
    assert first.rejects > 3  # the lines over 30 tokens, refused by the server, and the bad line
    summary = cache(tmp_path, StandInServer(VOCAB), inp, retry_rejects=True)
    assert summary.rejects == 1 and summary.rows == 20
    assert sorted(cached_ids(tmp_path / "out")) == sorted(f"l{i}" for i in range(20))
    assert "not valid JSON" in (tmp_path / "out" / "rejects.jsonl").read_text()
    assert len((tmp_path / "out" / "rejects.jsonl").read_text().splitlines()) == 1
    again = cache(tmp_path, StandInServer(VOCAB), inp, retry_rejects=True)  # nothing new: the bad line stays
    assert again.rows == 20 and again.rejects == 1


def test_a_retry_that_dies_after_its_commit_is_completed_by_the_next_run(tmp_path, monkeypatch):
    from teacher_farm.client.cache import CacheRun as Run

    inp = corpus(tmp_path / "in.jsonl", 20)
    cache(tmp_path, StandInServer(VOCAB, max_tokens_per_request=30), inp, batch_chars=1)
    finish = Run._finish_rejects_rewrite
    monkeypatch.setattr(
        Run, "_finish_rejects_rewrite", lambda self, m: (_ for _ in ()).throw(OSError(5, "power cut"))
    )
    with pytest.raises(Exception, match="power cut"):
        cache(tmp_path, StandInServer(VOCAB), inp, retry_rejects=True)
    monkeypatch.setattr(Run, "_finish_rejects_rewrite", finish)
    summary = cache(tmp_path, StandInServer(VOCAB), inp)
    assert summary.rejects == 0 and (tmp_path / "out" / "rejects.jsonl").read_bytes() == b""
    assert sorted(cached_ids(tmp_path / "out")) == sorted(f"l{i}" for i in range(20))
