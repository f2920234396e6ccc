"""Faults a real farm meets, against the stand-in teacher behind the real wire (``tests/standin.py``):
proxies' answers, lying servers, long lines, locks across hosts, edited inputs, hostile manifests."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import httpx
import hypothesis  # noqa: F401 - imported before the runs: CPython 3.11.7's ast.parse fails after them (gh-106905)
import pyarrow.parquet as pq
import pytest

from teacher_farm.client import transport
from teacher_farm.client.cache import CacheOptions, CacheRun
from teacher_farm.client.transport import TeacherPool
from teacher_farm.schemas.cache_dir import load_manifests
from teacher_farm.schemas.errors import TransportError
from teacher_farm.schemas.scoring import Scoring
from tests.standin import StandInServer

VOCAB = 1000


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """Backoff of a few milliseconds, so a test retries many times in well under a second."""
    monkeypatch.setattr(transport, "random", SimpleNamespace(uniform=lambda a, b: 0.01))


def corpus(path, n=40):
    path.write_text("".join(json.dumps({"id": f"l{i}", "text": f"line number {i} " * (1 + i % 3)}) + "\n"
                            for i in range(n)))
    return path


def cache(tmp_path, server, inp, *, retry_for_s=30.0, out="out", **kw):
    opts = CacheOptions(input=str(inp), out_dir=tmp_path / out, scoring=Scoring(k=4), rows_per_shard=8,
                        batch_lines=4, concurrency=4, **kw)
    pool = TeacherPool([server.http_teacher()], retry_for_s=retry_for_s)
    return asyncio.run(CacheRun(opts, pool).run())


def cached_ids(out):
    shards = sorted((s for m in load_manifests(out).values() for s in m.shards.values()), key=lambda s: s.index)
    return pq.read_table([out / s.file for s in shards], columns=["id"]).column("id").to_pylist()


def proxy_pages(count):
    """A proxy in front of the teacher answering its own 404, 403, 408, 502 and a bare 422 to the first
    ``count`` scoring requests (a deploy), then passing them through."""
    pages = [(404, b"<html><body>404 Not Found</body></html>"), (403, b"<html>403 Forbidden</html>"),
             (408, b"<html>408 Request Timeout</html>"), (502, b"<html>502 Bad Gateway</html>"),
             (422, b'{"detail": "unknown field"}')]
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
