"""A dead engine, without an engine (seconds): the client's pool leaving such a server alone."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from teacher_farm.client import transport
from teacher_farm.client.transport import HttpTeacher, TeacherPool, raise_for_answer
from teacher_farm.schemas.errors import EngineDead, EngineNotReady


def _answer(status: int, body: dict) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("POST", "http://a/v1/topk"))


def test_the_client_tells_a_dead_engine_from_one_loading():
    with pytest.raises(EngineDead):
        raise_for_answer(_answer(503, {"error": "the teacher's engine died", "kind": "EngineDead"}))
    with pytest.raises(EngineNotReady) as loading:
        raise_for_answer(_answer(503, {"error": "the teacher model is still loading", "kind": "EngineNotReady"}))
    assert not isinstance(loading.value, EngineDead)


def test_a_pool_moves_off_a_dead_engine_and_leaves_it_alone():
    calls = {"dead": 0, "live": 0}

    def dead(request: httpx.Request) -> httpx.Response:
        calls["dead"] += 1
        return httpx.Response(503, json={"error": "the teacher's engine died", "kind": "EngineDead"})

    def live(request: httpx.Request) -> httpx.Response:
        calls["live"] += 1
        return httpx.Response(200, json={"tokens": [1, 2]})

    async def run() -> TeacherPool:
        pool = TeacherPool([HttpTeacher("http://dead", transport=httpx.MockTransport(dead)),
                            HttpTeacher("http://live", transport=httpx.MockTransport(live))], retry_for_s=60)
        try:
            for _ in range(5):
                assert await pool.tokenize("ab") == [1, 2]
                await asyncio.sleep(0.3)  # longer than a first backoff: a loading server would be tried again
        finally:
            await pool.aclose()
        return pool

    start = time.monotonic()
    pool = asyncio.run(run())
    assert time.monotonic() - start < 5  # nothing waited on the dead server
    assert calls == {"dead": 1, "live": 5}
    assert pool.members[0].down_until - time.monotonic() > transport.DEAD_SERVER_OUT_S - 5
