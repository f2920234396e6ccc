"""A stand-in teacher in process: deterministic, instant, checkable by hand.

Text becomes BOS then one token per character; a chat record is rendered as the text
``<role>content\n`` per message (``render_chat``) and tokenized the same way. The top-k at position
i of a scored sequence are ``(sum of its tokens 0..i + j) % vocab`` for j < k, so an answer depends
on exactly the tokens the teacher was given (a window's answer differs from the full line's past its
first position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from teacher_farm.client.inputs import Line
from teacher_farm.schemas.arrow import ScoredSequence, results_to_table
from teacher_farm.schemas.errors import ServerRejected
from teacher_farm.schemas.wire import Info, Versions

BOS = 1


def tokens(text: str, vocab: int) -> np.ndarray:
    """The stand-in tokenizer: BOS, then one token per character."""
    return np.array([BOS] + [2 + ord(c) % (vocab - 2) for c in text], np.int32)


def render_chat(messages: Sequence[dict]) -> str:
    """The stand-in's chat template."""
    return "".join(f"<{m['role']}>{m['content']}\n" for m in messages)


def chat_tokens(messages: Sequence[dict], vocab: int) -> np.ndarray:
    """A chat record's tokens as the stand-in renders it (BOS once, from the tokenizer)."""
    return tokens(render_chat(messages), vocab)


def expected_topk(ids: np.ndarray, k: int, vocab: int) -> np.ndarray:
    """The stand-in's top-k ids for exactly ``ids``: (n, k)."""
    return ((np.cumsum(ids.astype(np.int64))[:, None] + np.arange(k)) % vocab).astype(np.int32)


def score(seq_id: str | None, ids: np.ndarray, k: int, vocab: int) -> ScoredSequence:
    n = len(ids)
    lps = -np.log(np.arange(2, k + 2, dtype=np.float32))[None, :].repeat(n, 0)
    return ScoredSequence(
        seq_id,
        ids.astype(np.int32),
        expected_topk(ids, k, vocab),
        lps,
        np.full(n - 1, -3.0, np.float32),
        np.full(n - 1, 7, np.int32),
    )


class StandInTeacher:
    """Answers like a teacher-farm server, at once; refuses ids outside its vocabulary as a server does."""

    name = "stand-in"

    def __init__(self, vocab: int = 1000, max_model_len: int = 16384) -> None:
        self.vocab = vocab
        self.max_model_len = max_model_len
        #: Scoring requests, and the tokens they scored (every position scored once per request).
        self.requests = 0
        self.tokens_scored = 0
        #: Full tokenizations asked for (text and chat records).
        self.tokenizations = 0
        #: The wire dtypes scoring requests asked for.
        self.wire_dtypes: set[str] = set()

    async def info(self) -> Info:
        return Info(
            model="stand-in",
            model_fingerprint="f" * 16,
            tokenizer_fingerprint="t" * 16,
            vocab_size=self.vocab,
            k_max=64,
            max_model_len=self.max_model_len,
            max_input_tokens=self.max_model_len - 1,
            max_inputs_per_request=1024,
            adds_bos=True,
            versions=Versions(teacher_farm="-", schema_version=1, vllm="-"),
        )

    def _ids(self, line: Line, max_length: int | None) -> np.ndarray:
        if line.input_ids is not None:
            ids = line.input_ids
        elif line.messages is not None:
            ids = chat_tokens(line.messages, self.vocab)
        else:
            ids = tokens(line.text, self.vocab)
        if ids.max() >= self.vocab:
            raise ServerRejected(f"token id {ids.max()} is outside the vocabulary (size {self.vocab})", 422)
        return ids[:max_length]

    async def score(
        self,
        lines: Sequence[Line],
        scoring,
        max_length: int | None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:  # noqa: F821
        self.requests += 1
        self.wire_dtypes.add(wire_dtype)
        k = scoring.k
        scored = [score(x.id, self._ids(x, max_length), k, self.vocab) for x in lines]
        self.tokens_scored += sum(len(x.input_ids) for x in scored)
        return results_to_table(scored, k)

    async def score_ids(
        self, ids_and_tokens, scoring, max_length: int | None = None, *, wire_dtype: str = "float32"
    ):
        lines = [Line(-1, i, None, input_ids=np.asarray(t, np.int32)) for i, t in ids_and_tokens]
        return await self.score(lines, scoring, max_length, wire_dtype=wire_dtype)

    async def tokenize(self, text: str) -> list[int]:
        self.tokenizations += 1
        return tokens(text, self.vocab).tolist()

    async def tokenize_chat(self, messages) -> list[int]:
        self.tokenizations += 1
        return chat_tokens(messages, self.vocab).tolist()

    async def aclose(self) -> None:
        pass


class StandInServer:
    """The stand-in teacher behind the real wire: ``/v1/info``, ``/v1/topk`` (Arrow) and ``/tokenize``,
    as an ``httpx`` transport, with limits like a server's (413/422 with teacher-farm's JSON error).

    ``fault(request)`` may return an answer to send instead (a proxy's page, a lie); ``mangle(table)``
    may change an honest answer before it is sent.
    """

    def __init__(
        self,
        vocab: int = 1000,
        max_model_len: int = 16384,
        *,
        max_tokens_per_request: int = 262_144,
        fault=None,
        mangle=None,
    ) -> None:
        self.teacher = StandInTeacher(vocab, max_model_len)
        self.max_tokens_per_request = max_tokens_per_request
        self.fault, self.mangle = fault, mangle
        #: Whether ``/v1/info`` names the request limits (a server older than them does not).
        self.publish_limits = True
        #: Tokens of every /v1/topk request scored, in order.
        self.request_tokens: list[int] = []

    def transport(self):
        import httpx

        return httpx.MockTransport(self.handle)

    def http_teacher(self, **kw):
        from teacher_farm.client.transport import HttpTeacher

        return HttpTeacher("http://standin", transport=self.transport(), **kw)

    @staticmethod
    def error(status: int, kind: str, message: str):
        import httpx

        return httpx.Response(status, json={"error": message, "kind": kind}, headers={"server": "uvicorn"})

    async def handle(self, request):
        import httpx
        import orjson
        import pyarrow as pa

        from teacher_farm.schemas import ARROW_STREAM, FINGERPRINT_HEADER
        from teacher_farm.schemas.arrow import cast_logprobs
        from teacher_farm.schemas.scoring import Scoring

        if self.fault is not None and (answer := self.fault(request)) is not None:
            return answer
        info = await self.teacher.info()
        if request.url.path == "/v1/info":
            body = info.model_dump(exclude={"max_tokens_per_request"})
            if self.publish_limits:
                body["max_tokens_per_request"] = self.max_tokens_per_request
            return httpx.Response(200, json=body)
        body = orjson.loads(request.content)
        if request.url.path == "/tokenize":
            if "messages" in body:
                return httpx.Response(
                    200, json={"tokens": await self.teacher.tokenize_chat(body["messages"])}
                )
            return httpx.Response(200, json={"tokens": await self.teacher.tokenize(body["prompt"])})
        lines = [
            Line(
                -1,
                x.get("id"),
                x.get("text"),
                messages=x.get("messages"),
                input_ids=None if x.get("token_ids") is None else np.asarray(x["token_ids"], np.int32),
            )
            for x in body["inputs"]
        ]
        ml = body.get("max_length")
        try:
            n = sum(len(self.teacher._ids(x, ml)) for x in lines)
        except ServerRejected as exc:
            return self.error(422, "InputError", str(exc))
        if n > self.max_tokens_per_request:
            return self.error(
                413,
                "RequestTooLarge",
                f"{n} tokens in one request; the limit is {self.max_tokens_per_request}: send fewer inputs",
            )
        self.request_tokens.append(n)
        scoring = Scoring(**{f: body[f] for f in Scoring.model_fields if f in body})
        table = await self.teacher.score(lines, scoring, ml)
        if self.mangle is not None:
            table = self.mangle(table)
        table = cast_logprobs(table, body.get("logprob_dtype", "float32"))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        return httpx.Response(
            200,
            content=sink.getvalue().to_pybytes(),
            headers={"content-type": ARROW_STREAM, FINGERPRINT_HEADER: info.fingerprint},
        )
