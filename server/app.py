"""The HTTP service: ``POST /v1/topk``, ``GET /v1/info``, ``GET /health``, ``GET /metrics``.

The engine starts in the background when the app starts, so ``/health`` can answer 503 while it
loads. Domain errors become JSON answers in one place (``_error_response``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from teacher_farm.schemas import ARROW_STREAM, FINGERPRINT_HEADER
from teacher_farm.schemas.arrow import ScoredSequence, cast_logprobs, results_to_table
from teacher_farm.schemas.errors import (
    AuthError, EngineDead, EngineNotReady, InputError, MalformedBody, RequestTooLarge, ServerBusy, TeacherFarmError,
)
from teacher_farm.schemas.wire import TopkRequest
from teacher_farm.server import metrics
from teacher_farm.server.intake import Admission, parse_body, read_body, score_admitted, teacher
from teacher_farm.server.openai_compat import router as openai_router
from teacher_farm.server.settings import ServerSettings, get_settings

log = logging.getLogger(__name__)
router = APIRouter()


class RequireKey:
    """ASGI middleware: every path but ``/health`` needs the bearer key, compared in constant time.

    A middleware rather than a route dependency, so the OpenAPI pages and every router's routes are
    covered without each remembering to ask.
    """

    OPEN_PATHS = ("/health",)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        key = get_settings().api_key
        if scope["type"] != "http" or key is None or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token, key.get_secret_value().encode()):
            return await self.app(scope, receive, send)
        response = _error_response(None, AuthError("missing or wrong API key: send 'Authorization: Bearer <key>'"))
        await response(scope, receive, send)


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when the engine is ready to score, 503 while loading or shutting down."""
    state = request.app.state
    if state.teacher is not None and not state.draining:
        return JSONResponse({"status": "ok"})
    status = "failed" if state.load_error else ("draining" if state.draining else "loading")
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "2"})


@router.get("/metrics")
async def prometheus() -> Response:
    """Prometheus exposition of the ``teacher_farm_*`` series."""
    body, media_type = metrics.exposition()
    return Response(body, media_type=media_type)


@router.get("/v1/info")
async def info(t: Any = Depends(teacher), settings: ServerSettings = Depends(get_settings)) -> Response:
    """What a client must know to trust and resume a cache."""
    return JSONResponse(t.info.to_wire(settings.max_inputs_per_request).model_dump())


@router.post("/v1/topk")
async def topk(request: Request, t: Any = Depends(teacher), settings: ServerSettings = Depends(get_settings)) -> Response:
    """Score inputs; JSON by default, an Arrow IPC stream when asked for by ``Accept``."""
    req = parse_body(TopkRequest, await read_body(request, settings.max_body_bytes))
    results, _ = await score_admitted(request, t, req, settings)
    headers = {FINGERPRINT_HEADER: t.info.fingerprint}
    if ARROW_STREAM in request.headers.get("accept", ""):
        payload = await asyncio.to_thread(_arrow_payload, results, req)
        return Response(payload, media_type=ARROW_STREAM, headers=headers)
    body = {"model": t.info.model, "k": req.k, "results": [_json_result(r, req.targets) for r in results]}
    return Response(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json", headers=headers)


def _json_result(r: ScoredSequence, targets: str) -> dict[str, Any]:
    """One result for a JSON answer: numpy arrays (orjson writes them), one array per position at most."""
    out: dict[str, Any] = {"id": r.id, "input_ids": r.input_ids}
    if targets != "sampled":
        out |= {"topk_ids": r.topk_ids, "topk_logprobs": r.topk_logprobs}
    out |= {"target_logprobs": r.target_logprobs, "target_ranks": r.target_ranks}
    return out | r.sample_lists()


def _arrow_payload(results: list[ScoredSequence], req: TopkRequest) -> bytes:
    table = cast_logprobs(results_to_table(results, req.k, req.targets), req.logprob_dtype)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


_STATUS: list[tuple[type[Exception], int]] = [
    (AuthError, 401),
    (RequestTooLarge, 413),
    (MalformedBody, 400),
    (InputError, 422),
    (ServerBusy, 429),
    (EngineDead, 503),
    (EngineNotReady, 503),
    (TeacherFarmError, 500),
]


def _error_response(request: Request | None, exc: Exception) -> Response:
    status = next(code for cls, code in _STATUS if isinstance(exc, cls))
    metrics.ERRORS.labels(kind=type(exc).__name__).inc()
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 500:
        log.error("request failed: %s", exc)
    # ``kind`` lets a client tell errors of one status apart (a dead engine from one still loading).
    return JSONResponse({"error": str(exc), "kind": type(exc).__name__}, status_code=status, headers=headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error", exc_info=exc)
    metrics.ERRORS.labels(kind="internal").inc()
    return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)


def create_app(load_teacher: Callable[[], Any]) -> FastAPI:
    """The ASGI app; ``load_teacher`` runs in a thread at start-up and returns a ``Teacher``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.teacher, state.load_error, state.draining = None, None, False
        state.admission = Admission(get_settings().max_queued_tokens)

        async def load() -> None:
            try:
                state.teacher = await asyncio.to_thread(load_teacher)
                log.info("teacher ready: %s", state.teacher.info)
            except Exception as exc:  # noqa: BLE001 - reported on /health and every request
                log.exception("the engine failed to start")
                state.load_error = f"{type(exc).__name__}: {exc}"

        loader = asyncio.create_task(load())
        yield
        state.draining = True
        await loader
        if state.teacher is not None:
            state.teacher.shutdown()

    app = FastAPI(title="teacher-farm", lifespan=lifespan)
    app.include_router(router)
    app.include_router(openai_router)
    app.add_exception_handler(TeacherFarmError, _error_response)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(RequireKey)
    return app
