"""How the client reaches a teacher: HTTP servers (``TeacherPool`` of ``HttpTeacher``).

Every ``Teacher`` (these, or the server's in-process ``LocalTeacher``) answers ``info()`` and
``score(lines, scoring, max_length)`` with a result table (see
``schemas.arrow.result_schema``), and gives a line's full token ids (``tokenize``, ``tokenize_chat``)
for windowing it. HTTP failures are mapped onto ``teacher_farm.schemas.errors``; a
``TeacherPool`` spreads requests over servers and retries the retryable failures with exponential
backoff and jitter, honouring the server's Retry-After. A server whose engine died is left alone for
``DEAD_SERVER_OUT_S``: it exits, and a supervisor restarts it (it then answers 503 while it loads).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import httpx
import numpy as np
import orjson
import pyarrow as pa
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)
from tenacity.stop import stop_base

from teacher_farm.client.inputs import Line
from teacher_farm.schemas import ARROW_STREAM, FINGERPRINT_HEADER
from teacher_farm.schemas.arrow import flat_values, list_lengths, result_schema, whole
from teacher_farm.schemas.errors import (
    AuthError,
    CacheMismatch,
    EngineDead,
    EngineNotReady,
    InputError,
    MalformedBody,
    RequestTooLarge,
    RetryableError,
    ServerBusy,
    ServerRejected,
    ServerUnreachable,
    TeacherFarmError,
    TransportError,
)
from teacher_farm.schemas.scoring import Scoring
from teacher_farm.schemas.wire import Info

log = logging.getLogger(__name__)
T = TypeVar("T")

#: At the start of a run, a server that refuses every connection this long is reported, not waited for:
#: a ``serve`` just started listens well within it (and then answers 503 while its model loads).
START_REFUSED_S = 60.0
#: A server whose engine died is not tried again for this long (the longest backoff): restarting
#: and loading a model takes longer, and the work meanwhile goes to the other servers.
DEAD_SERVER_OUT_S = 30.0


class Teacher(Protocol):
    """What the cache pipeline needs from a teacher: a pool of servers, one server, or an in-process engine.

    ``wire_dtype`` is the precision of the answer's logprobs ("float32" or "float16"): a cache asks for
    its format's (``schemas.formats.LogprobFormat.wire_dtype``), so the two cannot disagree. A teacher
    may answer in float32 whatever is asked (the writer casts).
    """

    name: str

    async def info(self) -> Info: ...

    async def score(
        self,
        lines: Sequence[Line],
        scoring: Scoring,
        max_length: int | None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table: ...

    async def score_ids(
        self,
        ids_and_tokens: Sequence[tuple[str | None, Sequence[int] | np.ndarray]],
        scoring: Scoring,
        max_length: int | None = None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table: ...

    async def tokenize(self, text: str) -> list[int]: ...

    async def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]: ...

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


def _kind(response: httpx.Response) -> str | None:
    """The error class a teacher-farm server named in its answer's ``kind``."""
    try:
        body = response.json()
        return str(body["kind"]) if isinstance(body, dict) and "error" in body else None
    except Exception:  # noqa: BLE001 - another server, a proxy's error page
        return None


#: The ``kind`` a teacher-farm server names when it refuses the inputs themselves (``server/app.py``'s
#: error handler): only such an answer is a verdict on the lines of a request.
INPUT_KINDS = frozenset({InputError.__name__, MalformedBody.__name__, RequestTooLarge.__name__})


def describe_answer(response: httpx.Response) -> str:
    """One line naming an answer that is not teacher-farm's: status, the server that sent it, its first
    bytes."""
    server = response.headers.get("server", "no Server header")
    head = response.content[:120].decode("utf-8", "replace").replace("\n", " ").strip()
    return f"{response.request.url} answered {response.status_code} (server: {server}): {head!r}"


def raise_for_answer(response: httpx.Response) -> None:
    """Map a non-2xx answer onto the project's errors.

    Only a teacher-farm error about the inputs (its JSON body's ``kind``) rejects them. Any other
    answer (a proxy's or load balancer's 403/404/502 page during a deploy, a 408, another server's
    422) says nothing about the lines: it is retried, and stops the run once ``--retry-for`` is spent.
    """
    status = response.status_code
    if status < 400:
        return
    kind = _kind(response)
    msg = f"{response.request.url} answered {status}: {_message(response)}"
    if status == 401:
        raise AuthError(msg + " (pass --api-key or set TEACHER_FARM_API_KEY)")
    if status == 429:
        raise ServerBusy(msg, retry_after=_retry_after(response))
    if status == 503 and kind is not None:
        cls = EngineDead if kind == EngineDead.__name__ else EngineNotReady
        raise cls(msg, retry_after=_retry_after(response))
    if 400 <= status < 500 and kind in INPUT_KINDS:
        raise ServerRejected(msg, status)
    if status >= 500 and kind is not None:
        raise TransportError(msg, retry_after=_retry_after(response))
    raise TransportError(
        describe_answer(response) + "; not a teacher-farm answer", retry_after=_retry_after(response)
    )


def _cost(line: Line) -> int:
    """Roughly a line's request bytes, for least-outstanding-work balancing (without encoding it)."""
    return line.weight(per_token_id=5)


#: Logprobs a teacher may send above 0: rounding of a probability near 1 (float16 holds 0 exactly).
LOGPROB_SLACK = 1e-3
#: Bytes of an answer beyond what a request can produce (``answer_limit``): Arrow's framing, the ids.
ANSWER_SLACK_BYTES = 1 << 20


def answer_limit(tokens: int, rows: int, scoring: Scoring, logprob_dtype: str) -> int:
    """The most bytes an honest answer to a request of ``tokens`` positions over ``rows`` inputs holds,
    uncompressed, with a margin of 2: an answer larger than this is not read."""
    lp = 2 if logprob_dtype == "float16" else 4
    drawn = scoring.samples if scoring.targets != "topk" else 0
    per_position = 4 + (4 + lp) * scoring.k + 8 + (4 + 2 + 4 + 8) * drawn
    return 2 * (tokens * (per_position + 3 * 4) + rows * 256) + ANSWER_SLACK_BYTES


def _numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values of a list column (its nulls skipped), or of a flat one, as numpy."""
    values: np.ndarray = flat_values(arr).to_numpy(zero_copy_only=False)
    return values


def check_answer(
    table: pa.Table,
    inputs: Sequence[dict[str, Any]],
    scoring: Scoring,
    max_length: int | None,
    vocab_size: int | None,
) -> str | None:
    """What is wrong with a ``/v1/topk`` answer to ``inputs``, or None; every check is on whole columns.

    The row ids and count; each row's ``input_ids`` (exactly the ids sent, cut at ``max_length``, or
    1 to ``max_length`` tokens of a text or chat record); n positions of top-k and n - 1 targets;
    every id below the vocabulary; logprobs finite and not above 0; top-k k wide and descending;
    sampled ids ascending and distinct, their counts positive and summing to N.
    """
    expected = result_schema(targets=scoring.targets).names
    if table.column_names != expected:
        return f"columns {table.column_names}, not {expected}"
    if table.num_rows != len(inputs):
        return f"{table.num_rows} rows for {len(inputs)} inputs"
    if table.column("id").to_pylist() != [x.get("id") for x in inputs]:
        return "its row ids are not those of the inputs sent, in order"
    ids = table.column("input_ids").combine_chunks()
    n = list_lengths(ids)
    cap = max_length or np.iinfo(np.int64).max
    if ids.null_count or (n < 1).any() or (n > cap).any():
        return f"a row holds {int(n.min())}..{int(n.max())} tokens, not 1..{cap}"
    sent = [i for i, x in enumerate(inputs) if x.get("token_ids") is not None]
    if sent:
        want = [np.asarray(inputs[i]["token_ids"])[:cap] for i in sent]
        if not np.array_equal(n[sent], [len(w) for w in want]) or not np.array_equal(
            _numpy(ids.take(pa.array(sent))), np.concatenate(want)
        ):
            return "its input_ids are not the token ids sent"
    vocab = vocab_size or np.iinfo(np.int64).max
    every = scoring.positions == "all"
    for name in ("target_logprobs", "target_ranks"):
        if not np.array_equal(list_lengths(table.column(name)), n - 1):
            return f"{name} does not hold n - 1 values for a row of n tokens"
    lps = [_numpy(table.column("target_logprobs").combine_chunks())]
    all_ids = [_numpy(ids)]
    if scoring.targets != "sampled":
        for name in ("topk_ids", "topk_logprobs"):
            if not np.array_equal(list_lengths(table.column(name)), n):
                return f"{name} does not hold n positions for a row of n tokens"
        inner_ids, inner_lps = (
            whole(table.column("topk_ids")).flatten(),
            whole(table.column("topk_logprobs")).flatten(),
        )
        width = list_lengths(inner_ids)
        if not ((width == scoring.k) | (not every and (width == 0))).all() or not np.array_equal(
            list_lengths(inner_lps), width
        ):
            return f"its top-k lists are not {scoring.k} wide"
        top = _numpy(inner_lps).astype(np.float32).reshape(-1, scoring.k)
        if (np.diff(top, axis=1) > LOGPROB_SLACK).any():
            return "its top-k logprobs are not in descending order"
        lps.append(top.reshape(-1))
        all_ids.append(_numpy(inner_ids))
    if scoring.targets != "topk":
        inner_ids, counts = (
            whole(table.column("sample_ids")).flatten(),
            whole(table.column("sample_counts")).flatten(),
        )
        length = list_lengths(inner_ids)
        if not np.array_equal(list_lengths(counts), length) or len(length) != int(n.sum()):
            return "its sample ids and counts do not match"
        values = _numpy(inner_ids).astype(np.int64)
        c = _numpy(counts).astype(np.int64)
        ends = np.cumsum(length)
        sums = np.concatenate([[0], np.cumsum(c)])
        per_position = sums[ends] - sums[ends - length]
        if (c < 1).any() or not ((per_position == scoring.samples) | (not every and (length == 0))).all():
            return f"its sample counts do not sum to {scoring.samples} at every position"
        rising = np.diff(values) > 0
        first = (ends - length)[
            (length > 0) & (ends - length > 0)
        ]  # a position's first draw may be below the last's
        rising[first - 1] = True
        if not rising.all():
            return "its sampled ids are not ascending and distinct at every position"
        all_ids.append(values)
        if "sample_logprobs" in table.column_names:
            lps.append(_numpy(whole(table.column("sample_logprobs")).flatten()))
    for values in all_ids:
        if len(values) and (values.min() < 0 or values.max() >= vocab):
            return (
                f"a token id in {int(values.min())}..{int(values.max())} is outside the vocabulary "
                f"(size {vocab})"
            )
    for values in lps:
        v = values.astype(np.float32)
        if len(v) and (not np.isfinite(v).all() or v.max() > LOGPROB_SLACK):
            return "a logprob is not finite, or above 0"
    return None


class _WaitRetryAfter(wait_exponential_jitter):
    """Exponential backoff with jitter, but never sooner than the server asked."""

    def __call__(self, retry_state: RetryCallState) -> float:
        base = super().__call__(retry_state)
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        return max(base, getattr(exc, "retry_after", None) or 0.0)


def connect_error(url: str, exc: httpx.ConnectError) -> TeacherFarmError:
    """What a failed connection means to a person: an untrusted certificate, or no server there."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return InputError(
            f"{url}: the TLS handshake failed ({getattr(cause, 'verify_message', None) or cause}); "
            "if the server's certificate is signed by your own CA, pass it with --ca-bundle FILE"
        )
    return ServerUnreachable(
        f"cannot connect to {url} ({str(exc) or type(exc).__name__}): is 'teacher-farm serve' running there? "
        "It may still be starting (it listens within a minute, then answers 503 while the model loads); "
        "check the URL and port"
    )


class _StopRefused(stop_base):
    """Stop once a server has refused every connection for ``seconds`` (a 503 while loading resets
    nothing)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, retry_state: RetryCallState) -> bool:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        since = retry_state.seconds_since_start  # None only before the first outcome
        return isinstance(exc, ServerUnreachable) and since is not None and since >= self.seconds


class HttpTeacher:
    """One teacher-farm server at ``url``; every call is a single attempt (``TeacherPool`` retries)."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
        ca_bundle: str | None = None,
    ) -> None:
        self.name = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # https:// servers are checked against the system's CAs, or only those of ``ca_bundle``.
        verify = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        self._http = httpx.AsyncClient(
            base_url=self.name,
            headers=headers,
            transport=transport,
            verify=verify,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )
        #: Set once the pool knows the teacher; every answer must come from that teacher.
        self.expected_fingerprint: str | None = None
        #: Bytes of scoring answers received (the wire cost of the cache).
        self.bytes_received = 0
        #: The teacher's vocabulary, once known: every id of an answer must be below it.
        self.vocab_size: int | None = None

    async def _call(
        self, method: str, path: str, *, limit: int | None = None, **kwargs: Any
    ) -> httpx.Response:
        """One request; an answer whose body would pass ``limit`` bytes is not read (``TransportError``)."""
        try:
            async with self._http.stream(method, path, **kwargs) as response:
                declared = response.headers.get("content-length")
                if (
                    limit is not None
                    and declared is not None
                    and declared.isdigit()
                    and int(declared) > limit
                ):
                    raise TransportError(self._too_large(path, f"{int(declared):,} bytes", limit))
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if limit is not None and size > limit:
                        raise TransportError(self._too_large(path, f"over {limit:,} bytes", limit))
                    chunks.append(chunk)
            response._content = b"".join(chunks)
        except httpx.ConnectError as exc:
            raise connect_error(self.name, exc) from exc
        except httpx.TransportError as exc:
            raise TransportError(f"{self.name}{path}: {type(exc).__name__}: {exc}") from exc
        raise_for_answer(response)
        return response

    def _too_large(self, path: str, size: str, limit: int) -> str:
        return (
            f"{self.name}{path} answered {size}, more than the {limit:,} bytes that request can produce: "
            "not a teacher-farm answer to it"
        )

    async def info(self) -> Info:
        """The server's model facts (its vocabulary then bounds the ids of every answer)."""
        info = Info.model_validate_json((await self._call("GET", "/v1/info", limit=1 << 20)).content)
        self.vocab_size = self.vocab_size or info.vocab_size
        return info

    async def score(
        self,
        lines: Sequence[Line],
        scoring: Scoring,
        max_length: int | None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:
        """Score ``lines`` (text, tokenized by the teacher)."""
        return await self._post([x.wire_input() for x in lines], scoring, max_length, wire_dtype)

    async def score_ids(
        self,
        ids_and_tokens: Sequence[tuple[str | None, Sequence[int] | np.ndarray]],
        scoring: Scoring,
        max_length: int | None = None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:
        """Score exact token sequences, ``(id, token_ids)`` pairs (ints or numpy arrays)."""
        inputs = [{"id": i, "token_ids": t} for i, t in ids_and_tokens]
        return await self._post(inputs, scoring, max_length, wire_dtype)

    async def tokenize(self, text: str) -> list[int]:
        """The teacher's tokens of ``text`` in full (special tokens included, no truncation)."""
        response = await self._call("POST", "/tokenize", json={"prompt": text, "add_special_tokens": True})
        tokens: list[int] = response.json()["tokens"]
        return tokens

    async def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The teacher's tokens of a chat record in full: its chat template's rendering, as ``/v1/topk``
        scores it."""
        body = {"messages": list(messages), "add_generation_prompt": False}
        tokens: list[int] = (await self._call("POST", "/tokenize", json=body)).json()["tokens"]
        return tokens

    async def _post(
        self,
        inputs: list[dict[str, Any]],
        scoring: Scoring,
        max_length: int | None,
        wire_dtype: str,
    ) -> pa.Table:
        """One ``POST /v1/topk``; the answer comes back as an Arrow IPC stream from the expected teacher."""
        body = orjson.dumps(
            {
                **scoring.wire_fields(),
                "max_length": max_length,
                "logprob_dtype": wire_dtype,
                "inputs": inputs,
            },
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        tokens = sum(
            len(x["token_ids"]) if x.get("token_ids") is not None else max_length or 1 << 20 for x in inputs
        )
        if max_length:
            tokens = min(tokens, max_length * len(inputs))
        response = await self._call(
            "POST",
            "/v1/topk",
            content=body,
            headers={"Content-Type": "application/json", "Accept": ARROW_STREAM},
            limit=answer_limit(tokens, len(inputs), scoring, wire_dtype),
        )
        self.bytes_received += len(response.content)
        served = response.headers.get(FINGERPRINT_HEADER)
        if self.expected_fingerprint and served != self.expected_fingerprint:
            raise CacheMismatch(
                f"{self.name} now serves teacher {served}, not {self.expected_fingerprint} as when this run "
                "started; its answers would mix teachers in one cache"
            )
        try:
            table = pa.ipc.open_stream(response.content).read_all()
        except pa.ArrowInvalid as exc:  # a truncated answer: the connection broke mid-body
            raise TransportError(f"{self.name}: unreadable Arrow answer: {exc}") from exc
        # Nothing of a wrong answer is written: it is asked again, and stops the run if it stays wrong.
        problem = check_answer(table, inputs, scoring, max_length, self.vocab_size)
        if problem is not None:
            raise TransportError(f"{self.name}/v1/topk gave a wrong answer: {problem}")
        return table

    async def aclose(self) -> None:
        await self._http.aclose()


class _Member:
    """A server in a pool: its outstanding work and when it may be tried again."""

    def __init__(self, teacher: HttpTeacher) -> None:
        self.teacher = teacher
        self.outstanding = 0
        self.failures = 0
        self.down_until = 0.0

    def usable(self, now: float) -> bool:
        return self.down_until <= now


class TeacherPool:
    """Several servers of one teacher: least outstanding work first, failed ones probed back in.

    A retryable failure takes the server out for an exponentially growing while (or its
    Retry-After), a dead engine for ``DEAD_SERVER_OUT_S`` at once; the request moves to another
    server at once, or waits when all are out (a lone server restarted by its supervisor comes
    back). Requests are given up only after ``retry_for_s`` seconds of failures.
    """

    def __init__(self, teachers: Sequence[HttpTeacher], *, retry_for_s: float = 600.0) -> None:
        if not teachers:
            raise ValueError("a pool needs at least one server")
        self.members = [_Member(t) for t in teachers]
        self.retry_for_s = retry_for_s
        self.name = ",".join(t.name for t in teachers)

    def _pick(self) -> _Member:
        now = time.monotonic()
        usable = [m for m in self.members if m.usable(now)]
        if usable:
            return min(usable, key=lambda m: m.outstanding)
        return min(self.members, key=lambda m: m.down_until)

    async def _attempt(self, call: Callable[[HttpTeacher], Awaitable[T]], cost: int) -> T:
        """Run ``call(teacher)`` on the best server, retrying retryable failures on any server."""
        deadline = time.monotonic() + self.retry_for_s
        while True:
            member = self._pick()
            wait = member.down_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            member.outstanding += cost
            try:
                result = await call(member.teacher)
            except RetryableError as exc:
                member.failures += 1
                backoff = min(30.0, 0.5 * 2 ** (member.failures - 1)) * random.uniform(0.5, 1.0)
                if isinstance(exc, EngineDead):
                    backoff = DEAD_SERVER_OUT_S
                member.down_until = time.monotonic() + max(backoff, exc.retry_after or 0.0)
                if time.monotonic() >= deadline:
                    raise
                log.warning("%s; retrying", exc)
                continue
            finally:
                member.outstanding -= cost
            member.failures = 0
            return result

    async def info(self, grace_s: float = 10.0) -> Info:
        """The teacher's facts from the first server that answers (waiting while engines load).

        Servers that answer within ``grace_s`` more must serve the same teacher; every later answer
        is checked too, through the fingerprint header each ``/v1/topk`` answer carries.
        """
        tasks = {
            asyncio.create_task(self._attempt_on(m, lambda t: t.info(), refused_for_s=START_REFUSED_S)): m
            for m in self.members
        }
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        while not any(t.exception() is None for t in done):
            if not pending:
                exc = next(iter(done)).exception()
                assert exc is not None  # every task done so far failed
                raise exc
            more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done |= more
        if pending:
            more, pending = await asyncio.wait(pending, timeout=grace_s)
            done |= more
        for t in pending:
            t.cancel()
        infos = [(tasks[t], t.result()) for t in done if t.exception() is None]
        first = infos[0][1]
        for member, other in infos[1:]:
            if other.fingerprint != first.fingerprint:
                raise InputError(
                    f"{member.teacher.name} serves another teacher ({other.fingerprint}) than "
                    f"{infos[0][0].teacher.name} ({first.fingerprint}); give servers of one model"
                )
        for m in self.members:
            m.teacher.expected_fingerprint = first.fingerprint
            m.teacher.vocab_size = first.vocab_size
        return first.model_copy(
            update={
                "k_max": min(i.k_max for _, i in infos),
                "max_input_tokens": min(i.max_input_tokens for _, i in infos),
                "max_model_len": min(i.max_model_len for _, i in infos),
                "max_inputs_per_request": min(i.max_inputs_per_request for _, i in infos),
                "max_tokens_per_request": min(i.max_tokens_per_request for _, i in infos),
            }
        )

    async def _attempt_on(
        self, member: _Member, call: Callable[[HttpTeacher], Awaitable[T]], refused_for_s: float | None = None
    ) -> T:
        stop: stop_base = stop_after_delay(self.retry_for_s)
        if refused_for_s is not None:
            # Nobody listening at all is most likely a wrong URL: say so soon, not after --retry-for.
            stop = stop | _StopRefused(refused_for_s)
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(RetryableError),
            wait=_WaitRetryAfter(multiplier=0.5, max=30.0),
            stop=stop,
            reraise=True,
        ):
            with attempt:
                return await call(member.teacher)
        raise AssertionError("unreachable")

    @property
    def bytes_received(self) -> int:
        return sum(m.teacher.bytes_received for m in self.members)

    async def score(
        self,
        lines: Sequence[Line],
        scoring: Scoring,
        max_length: int | None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:
        """Score ``lines`` on the best server, with the pool's retries."""
        cost = sum(_cost(x) for x in lines)
        return await self._attempt(lambda t: t.score(lines, scoring, max_length, wire_dtype=wire_dtype), cost)

    async def score_ids(
        self,
        ids_and_tokens: Sequence[tuple[str | None, Sequence[int] | np.ndarray]],
        scoring: Scoring,
        max_length: int | None = None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:
        """Score exact token sequences on the best server, with the pool's retries."""
        cost = sum(len(tokens) for _, tokens in ids_and_tokens)
        return await self._attempt(
            lambda t: t.score_ids(ids_and_tokens, scoring, max_length, wire_dtype=wire_dtype),
            cost,
        )

    async def tokenize(self, text: str) -> list[int]:
        """The teacher's tokens of ``text`` in full, with the pool's retries."""
        return await self._attempt(lambda t: t.tokenize(text), len(text))

    async def tokenize_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The teacher's tokens of a chat record in full, with the pool's retries."""
        return await self._attempt(
            lambda t: t.tokenize_chat(messages), sum(len(m["content"]) for m in messages)
        )

    async def aclose(self) -> None:
        for m in self.members:
            await m.teacher.aclose()
