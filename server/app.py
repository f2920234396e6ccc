"""The HTTP service: ``POST /v1/topk``, ``GET /v1/info``, ``GET /health``, ``GET /metrics``.

The engine starts in the background when the app starts, so ``/health`` can answer 503 while it
loads. Once it runs, a watch task checks that it is alive: a dead engine (its process killed, out of
memory, a device fault) never comes back in this process, so the server answers 503 ``EngineDead``
for a few seconds, long enough for clients and health checks to see it, then asks to exit
(``on_engine_dead``) so that a supervisor restarts it. Domain errors become JSON answers in one place
(``_error_response``).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pyarrow as pa
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from teacher_farm.schemas import ARROW_STREAM, FINGERPRINT_HEADER
from teacher_farm.schemas.arrow import ScoredSequence, cast_logprobs, results_to_table
from teacher_farm.schemas.errors import (
    AuthError,
    ClientGone,
    EngineDead,
    EngineNotReady,
    InputError,
    MalformedBody,
    RequestTimeout,
    RequestTooLarge,
    ServerBusy,
    TeacherFarmError,
)
from teacher_farm.schemas.wire import TopkRequest
from teacher_farm.server import metrics
from teacher_farm.server.engine import engine_dead
from teacher_farm.server.intake import (
    Admission,
    AnswerResponse,
    check_numbers,
    json_chunks,
    loaded_engine,
    parse_body,
    read_body,
    score_admitted,
    topk_answer_bytes,
)
from teacher_farm.server.openai_compat import router as openai_router
from teacher_farm.server.settings import ServerSettings, get_settings

log = logging.getLogger(__name__)
router = APIRouter()

#: How often the watch task checks that the engine is alive.
WATCH_S = 1.0
#: How long a server with a dead engine keeps answering 503 before it asks to exit.
DEAD_LINGER_S = 3.0


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
        response = _error_response(
            None, AuthError("missing or wrong API key: send 'Authorization: Bearer <key>'")
        )
        await response(scope, receive, send)


@router.get("/health")
async def health(request: Request) -> Response:
    """200 when the engine is ready to score, 503 while loading, shutting down or once the engine died."""
    state = request.app.state
    if state.engine_dead:
        return JSONResponse({"status": "engine dead"}, status_code=503)
    if engine_up(state):
        return JSONResponse({"status": "ok"})
    status = "failed" if state.load_error else ("draining" if state.draining else "loading")
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "2"})


def engine_up(state: Any) -> bool:
    """Whether the engine takes requests: what ``/health`` answers 200 for."""
    return not state.engine_dead and state.engine is not None and not state.draining


@router.get("/metrics")
async def prometheus(request: Request) -> Response:
    """Prometheus exposition of the ``teacher_farm_*`` series."""
    # Read at each scrape, so it never disagrees with /health.
    metrics.ENGINE_UP.set(engine_up(request.app.state))
    metrics.ENGINE_REQUESTS.set(engine_requests(request.app.state.engine))
    body, media_type = metrics.exposition()
    return Response(body, media_type=media_type)


def engine_requests(engine: Any) -> int:
    """Requests the vLLM engine holds unfinished (0 without one): what a disconnected client's abort frees."""
    processor = getattr(getattr(engine, "llm", None), "output_processor", None)
    return processor.get_num_unfinished_requests() if processor is not None else 0


@router.get("/v1/info")
async def info(
    engine: Any = Depends(loaded_engine), settings: ServerSettings = Depends(get_settings)
) -> Response:
    """What a client must know to trust and resume a cache."""
    limits = {
        "max_inputs_per_request": settings.max_inputs_per_request,
        "max_tokens_per_request": settings.max_tokens_per_request,
        "max_answer_bytes": settings.max_answer_bytes,
        "max_body_bytes": settings.max_body_bytes,
        "max_chat_turns": settings.max_chat_turns,
    }
    return JSONResponse(engine.info.model_copy(update=limits).model_dump())


@router.post("/v1/topk")
async def topk(
    request: Request, engine: Any = Depends(loaded_engine), settings: ServerSettings = Depends(get_settings)
) -> Response:
    """Score inputs; JSON by default, an Arrow IPC stream when asked for by ``Accept``.

    Admitted by the size of its answer too, which is encoded in a thread and held until it is sent.
    """
    body = await read_body(request, settings.max_body_bytes)
    await asyncio.to_thread(check_numbers, body, settings.max_tokens_per_request)
    req = parse_body(TopkRequest, body)
    del body
    arrow = ARROW_STREAM in request.headers.get("accept", "")
    how = "send fewer inputs or a smaller k or samples"
    if not arrow:
        how += f", or ask for Arrow (Accept: {ARROW_STREAM})"
    results, _, release = await score_admitted(
        request,
        engine,
        req,
        settings,
        lambda n: topk_answer_bytes(req.scoring, n, len(req.inputs), arrow),
        how,
    )
    try:
        headers = {FINGERPRINT_HEADER: engine.info.fingerprint}
        if arrow:
            chunks, media_type = [await asyncio.to_thread(_arrow_payload, results, req)], ARROW_STREAM
        else:
            scoring = req.scoring
            answer = {
                "model": engine.info.model,
                "k": scoring.k,
                "results": [_json_result(r, scoring.targets) for r in results],
            }
            del results
            chunks, media_type = await asyncio.to_thread(json_chunks, answer), "application/json"
    except BaseException:
        release()
        raise
    return AnswerResponse(chunks, media_type, headers, release, settings.body_timeout_s)


def _json_result(r: ScoredSequence, targets: str) -> dict[str, Any]:
    """One result for a JSON answer: numpy arrays (orjson writes them), one array per position at most."""
    out: dict[str, Any] = {"id": r.id, "input_ids": r.input_ids}
    if targets != "sampled":
        out |= {"topk_ids": r.topk_ids, "topk_logprobs": r.topk_logprobs}
    out |= {"target_logprobs": r.target_logprobs, "target_ranks": r.target_ranks}
    if r.selected is not None:
        out["kept"] = r.selected  # a position rule keeps the targets where this is true
    return out | r.sample_lists()


def _arrow_payload(results: list[ScoredSequence], req: TopkRequest) -> bytes:
    table = cast_logprobs(results_to_table(results, req.scoring.k, req.scoring.targets), req.logprob_dtype)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


_STATUS: list[tuple[type[Exception], int]] = [
    (AuthError, 401),
    (RequestTimeout, 408),
    (ClientGone, 499),  # nobody reads it: the client closed its connection (nginx's code for that)
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


async def watch_engine(state: Any, on_engine_dead: Callable[[], None]) -> None:
    """Wait for the engine to die; then answer 503 for ``DEAD_LINGER_S`` and call ``on_engine_dead``."""
    while not engine_dead(state.engine):
        await asyncio.sleep(WATCH_S)
    state.engine_dead = True
    await linger_then_exit("the engine died", on_engine_dead)


async def linger_then_exit(what: str, on_engine_dead: Callable[[], None]) -> None:
    """Answer 503 for ``DEAD_LINGER_S`` (clients and health checks see why), then ask to exit."""
    log.error(
        "%s; telling clients so, then exiting in %.0f s (run serve under a supervisor that restarts it)",
        what,
        DEAD_LINGER_S,
    )
    await asyncio.sleep(DEAD_LINGER_S)
    on_engine_dead()


def create_app(
    load_engine: Callable[[], Any],
    on_engine_dead: Callable[[], None] = lambda: None,
    warm_up: Callable[[Any], Awaitable[None]] | None = None,
) -> FastAPI:
    """The ASGI app; ``load_engine`` runs in a thread at start-up and returns an ``Engine``, which
    ``warm_up`` (``Engine.warm_up``) then readies on the app's event loop before the app says ready.

    ``on_engine_dead`` is called once the engine died or failed to start (and the grace to tell
    clients passed): it should stop the server, which then exits non-zero (``app.state.engine_dead``
    or ``app.state.load_error`` says which).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.engine, state.load_error, state.draining, state.engine_dead = None, None, False, False
        settings = get_settings()
        state.admission = Admission(settings.max_queued_tokens, settings.max_answer_bytes_in_flight)
        watch: list[asyncio.Task] = []

        async def load() -> None:
            try:
                engine = await asyncio.to_thread(load_engine)
                if warm_up is not None:
                    await warm_up(engine)
                state.engine = engine
                log.info("teacher ready: %s", state.engine.info)
            except Exception as exc:  # noqa: BLE001 - reported on /health and every request
                log.exception("the engine failed to start")
                state.load_error = f"{type(exc).__name__}: {exc}"
                watch.append(
                    asyncio.create_task(linger_then_exit("the engine failed to start", on_engine_dead))
                )
                return
            watch.append(asyncio.create_task(watch_engine(state, on_engine_dead)))

        loader = asyncio.create_task(load())
        yield
        state.draining = True
        await loader
        # Stopping the engine below marks it dead too: that is no death to report.
        for task in watch:
            task.cancel()
        if state.engine is not None:
            state.engine.shutdown()

    app = FastAPI(title="teacher-farm", lifespan=lifespan)
    app.include_router(router)
    app.include_router(openai_router)
    app.add_exception_handler(TeacherFarmError, _error_response)
    app.add_exception_handler(Exception, _internal_error)
    app.add_middleware(RequireKey)
    return app
