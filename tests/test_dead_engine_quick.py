"""A dead engine, without an engine (seconds): the app's watch, its answers and the exit it asks for,
and the client's pool leaving such a server alone. tests/test_dead_engine.py kills a real one."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient

from teacher_farm.client import transport
from teacher_farm.client.transport import HttpTeacher, TeacherPool, raise_for_answer
from teacher_farm.schemas.errors import EngineDead, EngineNotReady
from teacher_farm.server import app as app_module
from teacher_farm.server import settings as settings_module
from teacher_farm.server.app import create_app
from teacher_farm.server.settings import ServerSettings
from tests.conftest import fake_engine_info, wait_for

BODY = {"k": 2, "inputs": [{"token_ids": [1, 2, 3]}]}


class FakeLLM:
    """What the app reads of vLLM's ``AsyncLLM``: ``errored``, true once the engine died (or was stopped)."""

    def __init__(self) -> None:
        self.errored = False


class FakeTeacher:
    """A loaded teacher whose engine can die; scoring fails as vLLM's does once it has."""

    def __init__(self) -> None:
        self.llm = FakeLLM()
        self.info = fake_engine_info()
        self.die_while_scoring = False

    def prepare(self, req):
        return [x.token_ids for x in req.inputs]

    async def score_request(self, req, token_ids):
        if self.die_while_scoring:
            self.llm.errored = True
        if self.llm.errored:
            raise RuntimeError("EngineCore encountered an issue")  # as vLLM's EngineDeadError says it
        raise AssertionError("these tests score nothing on a live engine")

    def shutdown(self) -> None:
        self.llm.errored = True  # as vLLM's: a stopped engine reads as errored too


@pytest.fixture(autouse=True)
def open_settings(monkeypatch):
    """Default limits and no API key, whatever the environment says."""
    monkeypatch.setattr(settings_module, "_settings", ServerSettings(api_key=None))


@pytest.fixture
def served():
    """A running app on a fake teacher, and an event set when the app asks to exit."""
    fake, asked_to_exit = FakeTeacher(), threading.Event()
    app = create_app(lambda: fake, on_engine_dead=asked_to_exit.set)
    with TestClient(app) as client:
        wait_for(lambda: client.get("/health").status_code == 200, 10, "/health to answer 200", interval=0.05)
        yield SimpleNamespace(client=client, teacher=fake, app=app, asked_to_exit=asked_to_exit)


def test_a_dead_engine_turns_health_and_requests_to_503_then_asks_to_exit(served):
    client = served.client
    served.teacher.llm.errored = True
    died = time.monotonic()
    wait_for(
        lambda: client.get("/health").status_code == 503,
        2 * app_module.WATCH_S + 3,
        "/health to answer 503",
        interval=0.05,
    )
    assert client.get("/health").json() == {"status": "engine dead"}
    r = client.post("/v1/topk", json=BODY)
    assert r.status_code == 503 and r.json()["kind"] == "EngineDead" and "died" in r.json()["error"]
    assert client.get("/v1/info").status_code == 503
    assert not served.asked_to_exit.is_set()  # clients and health checks get to see it first
    assert served.asked_to_exit.wait(app_module.WATCH_S + app_module.DEAD_LINGER_S + 2)
    assert time.monotonic() - died >= app_module.DEAD_LINGER_S - 0.2
    assert served.app.state.engine_dead


def test_an_engine_that_fails_to_start_is_reported_then_the_app_asks_to_exit():
    asked_to_exit = threading.Event()

    def fails():
        raise RuntimeError("Engine core initialization failed")

    app = create_app(fails, on_engine_dead=asked_to_exit.set)
    with TestClient(app) as client:
        wait_for(
            lambda: client.get("/health").json()["status"] == "failed",
            10,
            "/health to say failed",
            interval=0.05,
        )
        r = client.post("/v1/topk", json=BODY)
        assert r.status_code == 500 and "failed to start" in r.json()["error"]
        assert asked_to_exit.wait(app_module.DEAD_LINGER_S + 5)
        assert app.state.load_error.startswith("RuntimeError")


def test_a_request_in_flight_when_the_engine_dies_gets_503_engine_dead(served):
    served.teacher.die_while_scoring = True
    r = served.client.post("/v1/topk", json=BODY)
    assert r.status_code == 503, r.text
    assert r.json()["kind"] == "EngineDead"


def _answer(status: int, body: dict) -> httpx.Response:
    return httpx.Response(status, json=body, request=httpx.Request("POST", "http://a/v1/topk"))


def test_the_client_tells_a_dead_engine_from_one_loading():
    with pytest.raises(EngineDead):
        raise_for_answer(_answer(503, {"error": "the teacher's engine died", "kind": "EngineDead"}))
    with pytest.raises(EngineNotReady) as loading:
        raise_for_answer(
            _answer(503, {"error": "the teacher model is still loading", "kind": "EngineNotReady"})
        )
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
        pool = TeacherPool(
            [
                HttpTeacher("http://dead", transport=httpx.MockTransport(dead)),
                HttpTeacher("http://live", transport=httpx.MockTransport(live)),
            ],
            retry_for_s=60,
        )
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
