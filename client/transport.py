"""How the client reaches a teacher: over HTTP (``HttpTeacher``) or in process (``LocalTeacher``).

Both answer ``info()`` and ``topk(lines, k, max_length)`` with a result table (see
``schemas.arrow.result_schema``). HTTP failures are mapped onto ``schemas.errors``; retryable
ones are retried with exponential backoff and jitter, honouring the server's Retry-After.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import httpx
import orjson
import pyarrow as pa
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

from client.reader import Line
from schemas import ARROW_STREAM
from schemas.errors import (
    AuthError, EngineNotReady, RetryableError, ServerBusy, ServerRejected, TransportError,
)
from schemas.wire import Info


class Teacher(Protocol):
    """What the cache pipeline needs from a teacher."""

    name: str

    async def info(self) -> Info: ...

    async def topk(self, lines: Sequence[Line], k: int, max_length: int | None) -> pa.Table: ...

    async def aclose(self) -> None: ...


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"])
    except Exception:  # noqa: BLE001 - a non-JSON error page still gets reported
        return response.text[:500] or response.reason_phrase


def raise_for_answer(response: httpx.Response) -> None:
    """Map a non-2xx answer onto the project's errors."""
    status = response.status_code
    if status < 400:
        return
    msg = f"{response.request.url} answered {status}: {_message(response)}"
    if status == 401:
        raise AuthError(msg + " (pass --api-key or set TEACHER_FARM_API_KEY)")
    if status == 429:
        raise ServerBusy(msg, retry_after=_retry_after(response))
    if status == 503:
        raise EngineNotReady(msg, retry_after=_retry_after(response))
    if status >= 500:
        raise TransportError(msg, retry_after=_retry_after(response))
    raise ServerRejected(msg, status)


class _WaitRetryAfter(wait_exponential_jitter):
    """Exponential backoff with jitter, but never sooner than the server asked."""

    def __call__(self, retry_state: Any) -> float:
        base = super().__call__(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return max(base, getattr(exc, "retry_after", None) or 0.0)


class HttpTeacher:
    """A teacher-farm server at ``url``."""

    def __init__(
        self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0,
        retry_for_s: float = 600.0, transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=self.name, headers=headers, transport=transport,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        self.retry_for_s = retry_for_s

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise TransportError(f"{self.name}{path}: {type(exc).__name__}: {exc}") from exc
        raise_for_answer(response)
        return response

    async def _retrying(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(RetryableError),
            wait=_WaitRetryAfter(initial=0.5, max=30.0),
            stop=stop_after_delay(self.retry_for_s),
            reraise=True,
        ):
            with attempt:
                return await self._call(method, path, **kwargs)
        raise AssertionError("unreachable")

    async def info(self) -> Info:
        """The server's model facts; waits (with retries) while its engine loads."""
        return Info.model_validate_json((await self._retrying("GET", "/v1/info")).content)

    async def topk(self, lines: Sequence[Line], k: int, max_length: int | None) -> pa.Table:
        """Score ``lines``; the answer comes back as an Arrow IPC stream."""
        body = orjson.dumps(
            {"k": k, "max_length": max_length, "inputs": [{"id": x.id, "text": x.text} for x in lines]}
        )
        response = await self._retrying(
            "POST", "/v1/topk", content=body,
            headers={"Content-Type": "application/json", "Accept": ARROW_STREAM},
        )
        return pa.ipc.open_stream(response.content).read_all()

    async def aclose(self) -> None:
        await self._http.aclose()


class LocalTeacher:
    """The same job with an in-process engine and no HTTP (one machine, no server)."""

    def __init__(self, engine_args: dict[str, Any], k_max: int = 64) -> None:
        from server.engine import Teacher as Engine

        self._engine = Engine.load(engine_args, k_max)
        self.name = f"in-process:{self._engine.info.model}"

    async def info(self) -> Info:
        return self._engine.info.to_wire(max_inputs_per_request=1 << 30)

    async def topk(self, lines: Sequence[Line], k: int, max_length: int | None) -> pa.Table:
        import asyncio

        from schemas.arrow import results_to_table
        from schemas.wire import TopkInput, TopkRequest

        req = TopkRequest(k=k, max_length=max_length, inputs=[TopkInput(id=x.id, text=x.text) for x in lines])
        token_ids = await asyncio.to_thread(self._engine.prepare, req)
        results = await self._engine.score([x.id for x in lines], token_ids, k)
        return await asyncio.to_thread(results_to_table, results, k)

    async def aclose(self) -> None:
        self._engine.shutdown()
