"""Online distillation: a stream of token-id batches, each with the teacher's targets fetched live.

:class:`OnlineTeacher` wraps any iterable of token-id batches (a DataLoader of the student's own
packed sequences, say) and sends each batch to one or many ``teacher-farm serve`` processes ahead of
the training step: up to ``prefetch`` batches are in flight while the student trains on the current
one, over the Arrow wire, through the client's :class:`TeacherPool` (least-loaded server first,
retries with backoff, failover). It yields exactly the dict of tensors that
``DataLoader(TopkDataset(cache), collate_fn=collate_topk)`` yields, so a training loop switches
between cached and online targets by changing the line that builds its loader::

    loader = DataLoader(TopkDataset("cache/"), batch_size=8, collate_fn=collate_topk)   # cached
    loader = OnlineTeacher(token_batches, ["http://node1:8000", "http://node2:8000"], k=16)  # online
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, cast

import numpy as np
import pyarrow as pa
import torch

from teacher_farm.client.transport import HttpTeacher, TeacherPool
from teacher_farm.schemas.errors import InputError
from teacher_farm.schemas.scoring import Scoring, Targets
from teacher_farm.schemas.wire import Info
from teacher_farm.training.collate import collate_topk
from teacher_farm.training.dataset import rank_and_world, sequence_items
from teacher_farm.training.reader import row_group_arrays

__all__ = ["OnlineTeacher"]


def _sequences(batch: Any) -> tuple[list[np.ndarray], list[int] | None]:
    """The token ids of each sequence of a batch, and its ``line`` numbers when it carries them.

    A batch is a dict with ``input_ids`` (B, T) and optionally ``attention_mask`` (B, T) (the
    tokens where it is 1 are sent) and ``line`` (B,); a (B, T) tensor or array of real tokens only;
    or a list of 1-d sequences of different lengths.
    """
    lines = None
    if isinstance(batch, dict):
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if "line" in batch:
            lines = [int(x) for x in np.asarray(torch.as_tensor(batch["line"]).cpu()).reshape(-1)]
    else:
        ids, mask = batch, None
    if isinstance(ids, torch.Tensor) or (isinstance(ids, np.ndarray) and ids.ndim == 2):
        ids = np.asarray(torch.as_tensor(ids).cpu(), dtype=np.int64)
        if ids.ndim != 2:
            raise InputError(f"a batch of token ids must be (B, T), not {tuple(ids.shape)}")
        if mask is not None:
            keep = np.asarray(torch.as_tensor(mask).cpu()).astype(bool)
            seqs = [row[m] for row, m in zip(ids, keep)]
        else:
            seqs = list(ids)
    else:
        seqs = [np.asarray(torch.as_tensor(s).cpu(), dtype=np.int64).reshape(-1) for s in ids]
    if any(len(s) == 0 for s in seqs):
        raise InputError("a sequence of the batch has no tokens")
    return seqs, lines


def _batch_size(batch: Any) -> int:
    """The number of sequences of a batch, without converting it."""
    return len(batch["input_ids"] if isinstance(batch, dict) else batch)


class OnlineTeacher:
    """Iterate ``batches`` of token ids, each as a training batch with the teacher's targets.

    ``servers``: one URL or several (a :class:`TeacherPool`). ``k``, ``temperature``, ``targets``
    (``topk``, ``sampled`` or ``both``), ``samples`` and ``seed`` are what a cache would be written
    with; the batches carry the same keys as a cache's (``temperature`` included, so the losses
    check it). ``prefetch`` batches are requested ahead of the one being trained on. ``pad_id``,
    ``pad_to_multiple_of`` and ``renormalize`` mean what they mean for :func:`collate_topk` and
    :class:`TopkDataset`. Without ``line`` in the input batches, ``line`` counts sequences from 0.
    ``info`` holds the teacher's facts once iteration has started.

    Under ``torch.distributed`` (or with ``rank``/``world_size`` given), every rank iterates the
    same ``batches`` and takes its own share: batch i goes to rank i % world_size, and every rank
    yields the same number of batches. A last round of fewer than ``world_size`` batches is padded
    (a rank without a batch repeats one of that round) or, with ``drop_last``, left out. When
    ``batches`` already differ per rank, pass ``rank=0, world_size=1``.
    """

    def __init__(
        self,
        batches: Iterable[Any],
        servers: str | Sequence[str],
        *,
        k: int = 16,
        temperature: float = 1.0,
        targets: Targets = "topk",
        samples: int = 64,
        seed: int = 0,
        api_key: str | None = None,
        prefetch: int = 4,
        renormalize: bool = False,
        pad_id: int = 0,
        pad_to_multiple_of: int | None = None,
        logprob_dtype: str = "float32",
        retry_for_s: float = 600.0,
        timeout_s: float = 600.0,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if prefetch < 1:
            raise ValueError("prefetch must be at least 1")
        self.batches = batches
        self.urls = [servers] if isinstance(servers, str) else list(servers)
        if not self.urls:
            raise ValueError("give at least one server URL")
        self.scoring = Scoring(k=k, temperature=temperature, targets=targets, samples=samples, seed=seed)
        self.api_key, self.prefetch, self.renormalize = api_key, prefetch, renormalize
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of
        self.logprob_dtype, self.retry_for_s, self.timeout_s = logprob_dtype, retry_for_s, timeout_s
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.info: Info | None = None
        #: Bytes of answers received, over every iteration (the wire cost of online targets).
        self.bytes_received = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="teacher-farm-online", daemon=True)
        thread.start()

        def submit(coro: Any) -> Future:
            return asyncio.run_coroutine_threadsafe(coro, loop)

        pool = TeacherPool(
            [HttpTeacher(u, api_key=self.api_key, timeout_s=self.timeout_s) for u in self.urls],
            retry_for_s=self.retry_for_s,
        )
        pending: deque[Future] = deque()
        try:
            self.info = submit(pool.info()).result()
            if (refusal := self.scoring.refusal(self.info)) is not None:
                reason, flag = refusal
                raise InputError(f"{reason}; start the servers with {flag}")
            source = self._my_batches()
            exhausted = False
            while True:
                while not exhausted and len(pending) < self.prefetch:
                    try:
                        batch, first_line = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    seqs, lines = _sequences(batch)
                    if lines is None:
                        lines = list(range(first_line, first_line + len(seqs)))
                    pending.append(submit(self._fetch(pool, seqs, lines)))
                if not pending:
                    return
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()
            self.bytes_received += pool.bytes_received
            submit(pool.aclose()).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            loop.close()

    def _my_batches(self) -> Iterator[tuple[Any, int]]:
        """This rank's batches, each with the number of sequences of every batch before it (on any rank)."""
        rank, world = rank_and_world(self.rank, self.world_size)
        round_: list[tuple[Any, int]] = []
        seen = 0
        for batch in self.batches:
            round_.append((batch, seen))
            seen += _batch_size(batch)
            if len(round_) == world:
                yield round_[rank]
                round_ = []
        if round_ and not self.drop_last:
            yield round_[rank % len(round_)]

    async def _fetch(
        self, pool: TeacherPool, seqs: list[np.ndarray], lines: list[int]
    ) -> dict[str, torch.Tensor]:
        table = await pool.score_ids(
            # An int array serves as a token sequence: the client only encodes it into the request.
            [(str(i), cast("Sequence[int]", s)) for i, s in enumerate(seqs)],
            self.scoring,
            wire_dtype=self.logprob_dtype,
        )
        return await asyncio.to_thread(self._collate, table, seqs, lines)

    def _collate(self, table: pa.Table, seqs: list[np.ndarray], lines: list[int]) -> dict[str, torch.Tensor]:
        if table.num_rows != len(seqs):
            raise InputError(f"the teacher answered {table.num_rows} sequences for {len(seqs)}")
        table = table.add_column(1, "line", pa.array(lines, type=pa.int64()))
        arrays = row_group_arrays(table, renormalize=self.renormalize)
        sent = np.concatenate(seqs)
        if arrays.input_ids.shape != sent.shape or not np.array_equal(arrays.input_ids, sent):
            raise InputError(
                "the teacher scored other tokens than were sent (a sequence longer than its max_model_len?)"
            )
        items = list(sequence_items(arrays, None, self.scoring.temperature))
        return collate_topk(items, self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of)
