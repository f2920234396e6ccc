"""The in-process teacher (``cache --model``) whose engine dies: one error, not a traceback per request."""

from __future__ import annotations

import asyncio
import gc
import json
import logging

import pytest

from teacher_farm.client.cache import CacheOptions, run_cache
from teacher_farm.schemas.errors import EngineDead
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.server.local import LOCAL_ENGINE_DEAD, LocalTeacher
from tests.conftest import fake_engine_info


class DyingEngine:
    """What ``LocalTeacher`` reads of an ``Engine``; every request fails as vLLM's do once the engine died."""

    def __init__(self) -> None:
        self.llm = type("LLM", (), {"errored": False})()
        self.info = fake_engine_info()
        self.requests = 0

    def prepare(self, req):
        return [[1, 2, 3] for _ in req.inputs]

    async def score_request(self, req, token_ids):
        self.requests += 1
        await asyncio.sleep(0.05)  # every request in flight fails at once, as when the engine dies
        self.llm.errored = True
        raise RuntimeError("EngineCore encountered an issue. See stack trace (above) for the root cause.")

    def shutdown(self) -> None:
        pass


def test_a_dead_in_process_engine_stops_the_run_with_one_error(tmp_path, caplog):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(64)))
    teacher = LocalTeacher.__new__(LocalTeacher)
    teacher._engine, teacher.name = DyingEngine(), "in-process:teacher"
    opts = CacheOptions(
        input=str(corpus), out_dir=tmp_path / "out", batch_lines=4, concurrency=8, scoring=Scoring(k=2)
    )
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(EngineDead) as caught:
            asyncio.run(run_cache(opts, teacher))
        message, cause = str(caught.value), caught.value.__cause__
        del caught  # its traceback holds the run's frames, and through them its tasks
        gc.collect()  # asyncio reports a task's unretrieved exception as the task is collected
    assert message == LOCAL_ENGINE_DEAD and cause is None
    assert teacher._engine.requests > 1
    assert [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()] == []
