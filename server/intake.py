"""Taking a request in, shared by every scoring route: the teacher, the body, validation, admission.

One path from bytes to scored sequences, so ``/v1/topk`` and ``/v1/completions`` enforce the same
limits and count the same metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from teacher_farm.schemas.arrow import ScoredSequence
from teacher_farm.schemas.errors import (
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
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.wire import TopkRequest
from teacher_farm.server import metrics
from teacher_farm.server.engine import engine_dead, is_engine_dead_error
from teacher_farm.server.settings import ServerSettings, get_settings

Model = TypeVar("Model", bound=BaseModel)


class Admission:
    """Bounds on what admitted requests hold until answered: overload degrades into 429s, not OOM.

    Two measures: input tokens (the engine's work) and the estimated bytes of the answers (the server's
    own memory: arrays, then their encoding), both held from admission until the answer is sent.
    """

    def __init__(self, limit: int, max_answer_bytes: int = 1 << 62) -> None:
        self.limit = limit
        self.max_answer_bytes = max_answer_bytes
        self.queued = 0
        self.answer_bytes = 0

    def acquire(self, tokens: int, retry_after: int, answer_bytes: int = 0) -> Callable[[], None]:
        """Admit a request, or raise ``ServerBusy``; returns its release (idempotent)."""
        # An idle server takes any single request that passed the per-request limits.
        if self.queued and self.queued + tokens > self.limit:
            raise ServerBusy(
                f"server busy: {self.queued} tokens queued (limit {self.limit}); retry later",
                retry_after=retry_after,
            )
        if self.answer_bytes and self.answer_bytes + answer_bytes > self.max_answer_bytes:
            raise ServerBusy(
                f"server busy: answers of {self.answer_bytes} bytes in flight "
                f"(limit {self.max_answer_bytes}); retry later",
                retry_after=retry_after,
            )
        self.queued += tokens
        self.answer_bytes += answer_bytes
        self._publish()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.queued -= tokens
                self.answer_bytes -= answer_bytes
                self._publish()

        return release

    def _publish(self) -> None:
        metrics.QUEUED_TOKENS.set(self.queued)
        metrics.ANSWER_BYTES_IN_FLIGHT.set(self.answer_bytes)


#: Estimated bytes per number of a ``/v1/topk`` answer while it is built and sent: the engine's packed
#: rows, the unpacked arrays, and the encoded body (Arrow: 4 B a number before compression; JSON: up to
#: ~12 characters). Measured by tests/test_attacks.py, which holds the server's memory to the estimate.
ANSWER_BYTES_PER_NUMBER = {"arrow": 16, "json": 28}
#: Per entry of a ``/v1/completions`` answer's ``top_logprobs`` (a Python float in a dict, then its JSON).
COMPLETION_BYTES_PER_ENTRY = 200


def topk_answer_bytes(scoring: Scoring, tokens: int, inputs: int, arrow: bool) -> int:
    """What a ``/v1/topk`` answer of ``tokens`` positions will hold, in bytes (an upper estimate)."""
    # Per position: its input id, the top-k ids and logprobs, the target's logprob and rank, up to
    # ``draws`` distinct drawn ids with their counts and logprobs, the kept flag and the entropy.
    per_position = 1 + 2 * scoring.topk + 2 + 3 * scoring.draws + 2
    return (tokens * per_position + 16 * inputs) * ANSWER_BYTES_PER_NUMBER["arrow" if arrow else "json"]


def completion_answer_bytes(logprobs: int, tokens: int, prompts: int) -> int:
    """What a ``/v1/completions`` answer of ``tokens`` prompt tokens will hold, in bytes (an upper bound)."""
    return (tokens * (logprobs + 4) + 16 * prompts) * COMPLETION_BYTES_PER_ENTRY


def check_answer_size(estimate: int, settings: ServerSettings, how: str) -> None:
    """413 for an answer over ``max_answer_bytes``, naming the cap and ``how`` to stay under it."""
    if estimate > settings.max_answer_bytes:
        raise RequestTooLarge(
            f"the answer would hold about {estimate / 2**20:,.0f} MiB; this server's limit is "
            f"{settings.max_answer_bytes / 2**20:,.0f} MiB per request (max_answer_bytes): {how}"
        )


#: Numbers (or dict entries) orjson encodes in one call: each call holds the GIL, so the event loop
#: (``/health``) waits at most one call's time (a few milliseconds) while an answer is encoded.
JSON_CHUNK_NUMBERS = 1 << 16
#: Encoded pieces are joined up to this size before they are sent.
SEND_CHUNK_BYTES = 1 << 20


def json_chunks(obj: Any) -> list[bytes]:
    """``obj`` as JSON (numpy arrays included), in pieces each encoded by one short orjson call.

    Run it in a thread: between the calls the event loop runs. The pieces joined are what
    ``orjson.dumps(obj, option=OPT_SERIALIZE_NUMPY)`` gives.
    """
    out: list[bytes] = []
    pending: list[bytes] = []
    size = 0

    def put(piece: bytes) -> None:
        nonlocal size
        pending.append(piece)
        size += len(piece)
        if size >= SEND_CHUNK_BYTES:
            out.append(b"".join(pending))
            pending.clear()
            size = 0

    def dumps(x: Any) -> bytes:
        return orjson.dumps(x, option=orjson.OPT_SERIALIZE_NUMPY)

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            put(b"{")
            for i, (key, value) in enumerate(x.items()):
                put((b"," if i else b"") + dumps(key) + b":")
                walk(value)
            put(b"}")
        elif isinstance(x, np.ndarray) and x.ndim and x.size > JSON_CHUNK_NUMBERS:
            step = max(1, JSON_CHUNK_NUMBERS // max(1, x[0].size))
            put(b"[")
            for start in range(0, len(x), step):
                put((b"," if start else b"") + dumps(x[start : start + step])[1:-1])
            put(b"]")
        elif (
            isinstance(x, list)
            and x
            and isinstance(x[0], dict)
            and any(isinstance(v, (list, dict, np.ndarray, orjson.Fragment)) for v in x[0].values())
        ):
            put(b"[")  # results or choices: one at a time (a Fragment is JSON encoded already)
            for i, item in enumerate(x):
                if i:
                    put(b",")
                walk(item)
            put(b"]")
        elif isinstance(x, list) and len(x) > 1:
            first = next((v for v in x[:8] if v is not None), x[0])  # echo's top_logprobs start with null
            width = (
                first.size
                if isinstance(first, np.ndarray)
                else (len(first) if isinstance(first, (dict, list)) else 1)
            )
            step = max(1, JSON_CHUNK_NUMBERS // max(1, width))
            put(b"[")
            for start in range(0, len(x), step):
                put((b"," if start else b"") + dumps(x[start : start + step])[1:-1])
            put(b"]")
        else:
            put(dumps(x))

    walk(obj)
    if pending:
        out.append(b"".join(pending))
    return out


class AnswerResponse(Response):
    """An encoded answer sent chunk by chunk; its admission is released once it is sent (or the send failed).

    The chunks are sent as they are, without joining them into one more copy of the body.
    """

    def __init__(
        self,
        chunks: list[bytes],
        media_type: str,
        headers: dict[str, str],
        release: Callable[[], None],
        send_timeout_s: float,
    ) -> None:
        size = sum(map(len, chunks))
        super().__init__(None, media_type=media_type, headers={**headers, "content-length": str(size)})
        self.chunks, self.release, self.send_timeout_s = chunks, release, send_timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        chunks, self.chunks = self.chunks, []
        try:
            # A client that stops reading would hold the answer's memory for ever.
            with anyio.fail_after(self.send_timeout_s):  # asyncio.timeout is 3.11+
                await send(
                    {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
                )
                for i, chunk in enumerate(chunks):
                    more = i + 1 < len(chunks)
                    await send({"type": "http.response.body", "body": chunk, "more_body": more})
                if not chunks:
                    await send({"type": "http.response.body", "body": b""})
        finally:
            del chunks
            self.release()


ENGINE_DEAD_MESSAGE = "the teacher's engine died; this server exits for its supervisor to restart it"


def loaded_engine(request: Request) -> Any:
    """The loaded teacher (a FastAPI dependency); 503 while it loads, the server drains,
    or once its engine died."""
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


async def read_body(request: Request, limit: int, timeout_s: float | None = None) -> bytes:
    """The request body: 413 over ``limit`` bytes (before reading it all), 408 if late (``timeout_s``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    timeout_s = get_settings().body_timeout_s if timeout_s is None else timeout_s
    chunks, size = [], 0
    try:
        with anyio.fail_after(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(f"request body is over the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s ({size} bytes came): send it again"
        ) from None
    return b"".join(chunks)


def count_numbers(body: bytes, chunk: int = 1 << 20) -> int:
    """How many JSON numbers ``body`` holds at most: its commas outside strings, plus one (vectorized).

    A body of token ids becomes one Python int per id when parsed; this bounds them before parsing.
    """
    inside, carry, commas = False, 0, 0  # in a string at the chunk's start; backslashes just before it
    for start in range(0, len(body), chunk):
        b = np.frombuffer(body, np.uint8, min(chunk, len(body) - start), start)
        idx = np.arange(b.size)
        last_other = np.maximum.accumulate(np.where(b == 0x5C, -1, idx))  # last non-backslash at or before i
        before = np.concatenate(([-1], last_other[:-1]))
        run = np.where(before < 0, idx + carry, idx - 1 - before)  # backslashes right before byte i
        quote = (b == 0x22) & (run % 2 == 0)  # a quote after an odd run is escaped
        toggles = np.cumsum(quote)
        in_string = (toggles % 2 == 1) ^ inside
        commas += int(np.count_nonzero((b == 0x2C) & ~in_string))
        inside = inside ^ bool(toggles[-1] % 2)
        carry = carry + b.size if last_other[-1] < 0 else b.size - 1 - int(last_other[-1])
    return commas + 1


#: Numbers a scoring body may hold beside its token ids (k, seed, max_length, ...).
NUMBERS_BESIDE_TOKENS = 1024


def check_numbers(body: bytes, limit: int) -> None:
    """413 before parsing a body that holds more numbers than ``limit`` tokens can explain.

    Bodies under 8 bytes per allowed token are not scanned: they hold too few numbers to matter.
    """
    numbers = limit + NUMBERS_BESIDE_TOKENS
    # Every comma counted first (fast): only a body with more is scanned for commas outside strings.
    if len(body) > 8 * numbers and body.count(b",") >= numbers and count_numbers(body) > numbers:
        raise RequestTooLarge(
            f"the body holds more than {numbers} numbers: more token ids than this server's limit of {limit} "
            "tokens per request (max_tokens_per_request): send fewer inputs"
        )


async def disconnected(request: Request) -> None:
    """Return once the client has closed its connection (the body must have been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _problems(errors: list[ErrorDetails]) -> list[str]:
    # Errors of the scoring options a TopkRequest holds name the body's fields they came from.
    where = (".".join(str(p) for p in TopkRequest.body_loc(e["loc"])) or "body" for e in errors)
    return [f"{loc}: {e['msg']}" for loc, e in zip(where, errors)]


def parse_body(
    model: type[Model], body: bytes, problems: Callable[[list[ErrorDetails]], list[str]] = _problems
) -> Model:
    """Validate a JSON body into ``model``; the message names each bad field (``problems`` words it)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise MalformedBody(f"the body is not valid JSON: {exc.errors()[0]['msg']}") from exc
        raise InputError(f"invalid request: {'; '.join(problems(exc.errors())[:10])}") from exc


async def score_admitted(
    request: Request,
    engine: Any,
    req: TopkRequest,
    settings: ServerSettings,
    answer_bytes: Callable[[int], int] | None = None,
    how: str = "send fewer inputs",
    *,
    draws_at_last: bool = False,
) -> tuple[list[ScoredSequence], int, Callable[[], None]]:
    """Check a request's limits, admit its tokens and answer bytes, and score it.

    Returns the results, their tokens and the admission's release, which the caller calls once the
    answer is sent (``AnswerResponse`` does). ``answer_bytes`` estimates the answer from its tokens
    (default: a ``/v1/topk`` JSON answer); over ``max_answer_bytes`` it is refused, saying ``how`` to
    stay under. A client that disconnects while scored has its engine work aborted. ``draws_at_last``
    draws the request's samples at each input's last position only (``Engine.score_one``).
    """
    if len(req.inputs) > settings.max_inputs_per_request:
        raise RequestTooLarge(
            f"{len(req.inputs)} inputs in one request; the limit is {settings.max_inputs_per_request}"
        )
    for i, x in enumerate(req.inputs):
        if x.messages is not None and len(x.messages) > settings.max_chat_turns:
            raise RequestTooLarge(
                f"inputs.{i}.messages: {len(x.messages)} turns in one chat record; this server's limit is "
                f"{settings.max_chat_turns} (max_chat_turns): split the conversation"
            )
    token_ids = await asyncio.to_thread(engine.prepare, req)
    total = sum(len(ids) for ids in token_ids)
    if total > settings.max_tokens_per_request:
        raise RequestTooLarge(
            f"{total} tokens in one request; the limit is {settings.max_tokens_per_request}: "
            "send fewer inputs"
        )
    estimate = (answer_bytes or (lambda n: topk_answer_bytes(req.scoring, n, len(req.inputs), arrow=False)))(
        total
    )
    check_answer_size(estimate, settings, how)
    admission: Admission = request.app.state.admission
    release = admission.acquire(total, settings.retry_after_s, estimate)
    try:
        with metrics.REQUESTS_IN_FLIGHT.track_inprogress(), metrics.REQUEST_LATENCY.time():
            scoring = (
                engine.score_request(req, token_ids, draws_at_last=True)
                if draws_at_last
                else engine.score_request(req, token_ids)
            )
            results = await _unless_disconnected(request, scoring)
    except Exception as exc:
        release()
        # vLLM's EngineDeadError, or whatever a request in flight meets as its engine dies.
        if engine_dead(engine) or is_engine_dead_error(exc):
            raise EngineDead(ENGINE_DEAD_MESSAGE) from exc
        raise
    except BaseException:
        release()
        raise
    metrics.TOKENS_SCORED.inc(total)
    metrics.SEQUENCES_SCORED.inc(len(results))
    return results, total, release


async def _unless_disconnected(request: Request, scoring: Any) -> Any:
    """Await ``scoring``; if the client disconnects first, cancel it (vLLM aborts the engine's requests)."""
    work = asyncio.ensure_future(scoring)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            # Cancelling the engine's generators aborts their vLLM requests (AsyncLLM.abort).
            await asyncio.gather(work, return_exceptions=True)
            metrics.REQUESTS_ABORTED.inc()
            if not gone.cancelled() and gone.done():
                raise ClientGone("the client closed its connection: its requests were aborted in the engine")
    return work.result()
