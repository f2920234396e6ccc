"""Taking a request in, shared by every scoring route: the teacher, the body, validation, admission.

One path from bytes to scored sequences, so ``/v1/topk`` and ``/v1/completions`` enforce the same
limits and count the same metrics.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.errors import (
    EngineDead, EngineNotReady, InputError, MalformedBody, RequestTooLarge, ServerBusy, TeacherFarmError,
)
from teacher_farm.schemas.wire import TopkRequest
from teacher_farm.server import metrics
from teacher_farm.server.settings import ServerSettings, get_settings

Model = TypeVar("Model", bound=BaseModel)


class Admission:
    """A bound on tokens admitted but not yet answered: overload degrades into 429s, not OOM."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queued = 0

    def acquire(self, tokens: int, retry_after: int) -> None:
        # An idle server takes any single request that passed the per-request limits.
        if self.queued and self.queued + tokens > self.limit:
            raise ServerBusy(
                f"server busy: {self.queued} tokens queued (limit {self.limit}); retry later",
                retry_after=retry_after,
            )
        self.queued += tokens
        metrics.QUEUED_TOKENS.set(self.queued)

    def release(self, tokens: int) -> None:
        self.queued -= tokens
        metrics.QUEUED_TOKENS.set(self.queued)


ENGINE_DEAD_MESSAGE = "the teacher's engine died; this server exits for its supervisor to restart it"


def engine_dead(engine: Any) -> bool:
    """Whether the vLLM engine of ``engine`` died (it never recovers in this process)."""
    llm = getattr(engine, "llm", None)
    return llm is not None and bool(llm.errored)


def _engine_dead_error(exc: BaseException) -> bool:
    """Whether ``exc`` is vLLM's ``EngineDeadError`` (without importing vLLM, which takes seconds)."""
    module = sys.modules.get("vllm.v1.engine.exceptions")
    return module is not None and isinstance(exc, module.EngineDeadError)


def loaded_engine(request: Request) -> Any:
    """The loaded teacher (a FastAPI dependency); 503 while it loads, the server drains, or once its engine died."""
    state = request.app.state
    if state.engine_dead or engine_dead(state.engine):
        raise EngineDead(ENGINE_DEAD_MESSAGE)
    if state.engine is None:
        if state.load_error is not None:
            raise TeacherFarmError(f"the engine failed to start: {state.load_error}")
        raise EngineNotReady("the teacher model is still loading", retry_after=get_settings().retry_after_s)
    if state.draining:
        raise EngineNotReady("the server is shutting down", retry_after=get_settings().retry_after_s)
    return state.engine


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _problems(errors: list[dict]) -> list[str]:
    # Errors of the scoring options a TopkRequest holds name the body's fields they came from.
    where = (".".join(str(p) for p in TopkRequest.body_loc(e["loc"])) or "body" for e in errors)
    return [f"{loc}: {e['msg']}" for loc, e in zip(where, errors)]


def parse_body(model: type[Model], body: bytes, problems: Callable[[list[dict]], list[str]] = _problems) -> Model:
    """Validate a JSON body into ``model``; the message names each bad field (``problems`` words it)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise MalformedBody(f"the body is not valid JSON: {exc.errors()[0]['msg']}") from exc
        raise InputError(f"invalid request: {'; '.join(problems(exc.errors())[:10])}") from exc


async def score_admitted(
    request: Request, engine: Any, req: TopkRequest, settings: ServerSettings
) -> tuple[list[ScoredSequence], int]:
    """Check a request's limits, admit its tokens and score it; returns the results and their tokens."""
    import asyncio

    if len(req.inputs) > settings.max_inputs_per_request:
        raise RequestTooLarge(
            f"{len(req.inputs)} inputs in one request; the limit is {settings.max_inputs_per_request}"
        )
    token_ids = await asyncio.to_thread(engine.prepare, req)
    total = sum(len(ids) for ids in token_ids)
    if total > settings.max_tokens_per_request:
        raise RequestTooLarge(
            f"{total} tokens in one request; the limit is {settings.max_tokens_per_request}: send fewer inputs"
        )
    admission: Admission = request.app.state.admission
    admission.acquire(total, settings.retry_after_s)
    try:
        with metrics.REQUESTS_IN_FLIGHT.track_inprogress(), metrics.REQUEST_LATENCY.time():
            results = await engine.score_request(req, token_ids)
    except Exception as exc:
        # vLLM's EngineDeadError, or whatever a request in flight meets as its engine dies.
        if engine_dead(engine) or _engine_dead_error(exc):
            raise EngineDead(ENGINE_DEAD_MESSAGE) from exc
        raise
    finally:
        admission.release(total)
    metrics.TOKENS_SCORED.inc(total)
    metrics.SEQUENCES_SCORED.inc(len(results))
    return results, total
