"""A real engine dies under ``serve``: the server says so, then exits with ENGINE_DEAD_EXIT for its
supervisor to restart it, leaving no engine process behind. One engine start (a minute on a CPU)."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from teacher_farm.server.cli import ENGINE_DEAD_EXIT
from tests.conftest import Server, alive, descendants, kill_all, wait_for

pytestmark = pytest.mark.engine


def engine_core(server_pid: int) -> psutil.Process:
    """vLLM's EngineCore: the child of ``serve`` that titles itself so (``VLLM::EngineCore``)."""
    children = psutil.Process(server_pid).children()
    for child in children:
        if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
            return child
    raise AssertionError(f"no EngineCore among {[(c.pid, c.name(), c.cmdline()) for c in children]}")


def test_serve_exits_with_status_4_when_its_engine_dies(tiny_model, tmp_path):
    srv = Server(tiny_model, tmp_path / "server.log")
    srv.start()
    engine = []
    try:
        srv.wait_ready()
        engine = descendants(srv.proc.pid)
        core = engine_core(srv.proc.pid)
        os.kill(core.pid, signal.SIGKILL)  # as the OOM killer or a device fault would end it
        killed = time.monotonic()

        def health() -> httpx.Response | None:
            try:
                return httpx.get(srv.url + "/health", timeout=2)
            except httpx.TransportError:
                return None

        wait_for(lambda: (r := health()) is not None and r.status_code == 503, 15, "/health to answer 503")
        assert health().json() == {"status": "engine dead"}, srv.tail()
        r = httpx.post(srv.url + "/v1/topk", json={"k": 2, "inputs": [{"text": "hello"}]}, timeout=10)
        assert r.status_code == 503 and r.json()["kind"] == "EngineDead", r.text

        assert srv.proc.wait(30 - (time.monotonic() - killed)) == ENGINE_DEAD_EXIT, srv.tail()
        wait_for(lambda: alive(engine) == [], 30, "the engine's processes to end")
    finally:
        kill_all(engine)
        srv.stop(signal.SIGKILL)
