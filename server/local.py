"""The teacher in process: the cache command's ``--model``, the same job as a server's without HTTP.

``LocalTeacher`` answers what the client's ``Teacher`` protocol asks (``info``, ``score``,
``score_ids``, ``tokenize``, ``tokenize_chat``) from an ``Engine`` in this process, with the same
result tables a server sends, so the cache pipeline cannot tell the two apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from teacher_farm.schemas.arrow import results_to_table
from teacher_farm.schemas.errors import EngineDead
from teacher_farm.schemas.scoring import DEFAULT_K_MAX, Scoring, ScoringChoice
from teacher_farm.schemas.wire import Info, TopkInput, TopkRequest
from teacher_farm.server.engine import engine_dead, is_engine_dead_error

LOCAL_ENGINE_DEAD = (
    "the in-process vLLM engine died (its log above says why; a worker the kernel killed for memory shows "
    "in `dmesg`: lower --gpu-memory-utilization or free memory); what was committed stays: run the same "
    "command again to go on"
)


def _input(line: Any) -> TopkInput:
    """A corpus line (``client.inputs.Line``: text, chat messages or token ids) as a request input."""
    fields = line.wire_input()
    if line.kind == "ids":
        fields["token_ids"] = line.input_ids.tolist()  # the request model takes ints, not numpy's
    return TopkInput(**fields)


class LocalTeacher:
    """An in-process engine behind the client's ``Teacher`` protocol (one machine, no server)."""

    def __init__(
        self,
        engine_args: dict[str, Any],
        k_max: int = DEFAULT_K_MAX,
        scoring: ScoringChoice = "auto",
    ) -> None:
        from teacher_farm.server.engine import Engine

        self._engine = Engine.load(engine_args, k_max, scoring=scoring)
        self.name = f"in-process:{self._engine.info.model}"

    async def info(self) -> Info:
        return self._engine.info

    # In process the answer stays float32 whatever ``wire_dtype`` asks: no wire to save, the writer casts.
    async def score(
        self,
        lines: Sequence[Any],
        scoring: Scoring,
        max_length: int | None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:
        return await self._answer([_input(x) for x in lines], scoring, max_length)

    async def score_ids(
        self,
        ids_and_tokens: Sequence[tuple[str | None, Sequence[int]]],
        scoring: Scoring,
        max_length: int | None = None,
        *,
        wire_dtype: str = "float32",
    ) -> pa.Table:
        """Score exact token sequences in process."""
        inputs = [TopkInput(id=i, token_ids=[int(t) for t in tokens]) for i, tokens in ids_and_tokens]
        return await self._answer(inputs, scoring, max_length)

    async def _answer(self, inputs: list[TopkInput], scoring: Scoring, max_length: int | None) -> pa.Table:
        """What a server's ``/v1/topk`` answers for ``inputs``: the same steps, without HTTP."""
        req = TopkRequest(scoring=scoring, max_length=max_length, inputs=inputs)
        token_ids = await asyncio.to_thread(self._engine.prepare, req)
        try:
            results = await self._engine.score_request(req, token_ids)
        except Exception as exc:
            if engine_dead(self._engine) or is_engine_dead_error(exc):
                # One line for the person at the terminal, not a traceback per request in flight.
                raise EngineDead(LOCAL_ENGINE_DEAD) from None
            raise
        return await asyncio.to_thread(results_to_table, results, scoring.k, scoring.targets)

    async def tokenize(self, text: str) -> list[int]:
        """The teacher's tokens of ``text`` in full."""
        return (await asyncio.to_thread(self._engine.tokenize, [text], None))[0]

    async def tokenize_chat(self, messages: Sequence[dict]) -> list[int]:
        """The teacher's tokens of a chat record in full, as ``score`` renders it."""
        return (await asyncio.to_thread(self._engine.render_chats, [list(messages)], None))[0]

    async def aclose(self) -> None:
        self._engine.shutdown()
