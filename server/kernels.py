"""The reduction's steps that can be done more than one way, and the choice among them, made by timing.

Which way is fastest depends on the device, the vocabulary, k and the libraries' builds: on one
2-core x86 machine numpy's introselect beat ``torch.topk`` at k = 16 and 64; on another of the same
kind it lost 3.9x at k = 16 and won at k = 64, and there a two-stage select over block maxima was 3
to 8x faster than either at a 49k vocabulary (one thread, 2026-12-06). So nothing here is chosen in
advance: :func:`choose` times every way of a step on the shapes the worker will reduce (its slice
of rows at the model's vocabulary, at each k bucket up to k_max), checks that each gives the same
values as ``torch.topk``, and keeps the fastest. It runs once per process (the worker, or the
server's start-up self-test), in well under a second at a 4k vocabulary, and its verdict is logged
in one line and shown in ``GET /v1/info``.

The draws (a searchsorted of hashed uniforms in the cumulative distribution) have one way only: it
is what makes them reproducible.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

TopK = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
Count = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Entropy = Callable[[torch.Tensor], torch.Tensor]

#: A request's k is timed as the smallest bucket at or above it.
K_BUCKETS = (16, 64, 256)
#: Values timed per call (rows x vocabulary, at most the worker's slice of rows): enough for a
#: steady figure at the slice's own cache footprint, few enough to keep the choice within a second or two.
TIMING_VALUES = 1 << 22
#: Timed calls per way (the best one counts), after one untimed call.
TIMING_CALLS = 3


def topk_torch(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk``: a radix select on a GPU; on a CPU a heap or a sort whose cost grows with k."""
    return x.topk(k, dim=-1)


def topk_numpy(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """numpy's introselect (SIMD where the CPU has it), then a sort of the k picked. CPU only."""
    if not 0 < k < x.shape[1]:
        return x.topk(k, dim=-1)
    a = x.detach().contiguous().numpy()
    ids = np.argpartition(a, a.shape[1] - k, axis=1)[:, -k:]
    values = np.take_along_axis(a, ids, axis=1)
    order = np.argsort(values, axis=1)[:, ::-1]
    return torch.from_numpy(np.take_along_axis(values, order, 1)), torch.from_numpy(
        np.take_along_axis(ids, order, 1)
    )


def topk_blocks(block: int, last: TopK) -> TopK:
    """A two-stage select: the k blocks (of ``block`` columns) with the largest maxima, then ``last``.

    Exact: the k largest values lie in blocks whose maximum is at least the k-th largest block
    maximum, and k distinct blocks reach it. It reads the rows once (the maxima) and then selects
    among k x ``block`` values instead of the whole vocabulary.
    """

    def select(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, width = x.shape
        blocks = -(-width // block)
        if not 0 < k * block < width:
            return last(x, k)
        if blocks * block != width:
            x = torch.nn.functional.pad(x, (0, blocks * block - width), value=float("-inf"))
        grid = x.reshape(rows, blocks, block)
        _, picked = grid.amax(dim=-1).topk(k, dim=-1, sorted=False)
        candidates = grid.gather(1, picked[:, :, None].expand(rows, k, block)).reshape(rows, k * block)
        values, at = last(candidates, k)
        return values, picked.gather(1, at // block) * block + at % block

    return select


def count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of ``x`` (rows x vocabulary) are >= ``values`` (rows x 1)."""
    return (x >= values).sum(dim=-1)


def entropy_entr(lp: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of rows of logprobs: ``entr(p) = -p log p``, 0 where p is 0."""
    return torch.special.entr(lp.exp()).sum(dim=-1)


def entropy_dot(lp: torch.Tensor) -> torch.Tensor:
    """The same as one dot product per row (-inf logprobs clamped: their p is 0, so the term is 0)."""
    return -torch.linalg.vecdot(lp.exp(), lp.clamp(min=torch.finfo(lp.dtype).min))


def topk_ways(device: torch.device) -> dict[str, TopK]:
    """Every way to take the top k on ``device``."""
    lasts: dict[str, TopK] = {"torch": topk_torch}
    if device.type == "cpu":
        lasts["numpy"] = topk_numpy
    ways = dict(lasts)
    for block in (16, 32, 64, 128):
        for name, last in lasts.items():
            ways[f"blocks{block}+{name}"] = topk_blocks(block, last)
    return ways


_WAYS: dict[str, dict[str, TopK]] = {}


def _ways(device_type: str) -> dict[str, TopK]:
    if device_type not in _WAYS:
        _WAYS[device_type] = topk_ways(torch.device(device_type))
    return _WAYS[device_type]


@dataclass
class Kernels:
    """The way chosen for each step (top-k per k bucket), with the timings behind the choice."""

    topk: dict[int, str] = field(default_factory=dict)
    count: str = "eager"
    entropy: str = "entr"
    #: Milliseconds per call of each way, by step: what the choice rests on.
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    shape: tuple[int, int] = (0, 0)
    device: str = "cpu"
    _count_fns: dict[str, Count] = field(default_factory=dict, repr=False)

    def top_k(self, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        bucket = next((b for b in sorted(self.topk) if b >= k), None)
        name = self.topk[bucket] if bucket is not None else "torch"
        return _ways(x.device.type).get(name, topk_torch)(x, k)

    def count_at_least(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        return self._count_fns.get(self.count, count_at_least)(x, values)

    def entropy_of(self, lp: torch.Tensor) -> torch.Tensor:
        return ENTROPY.get(self.entropy, entropy_entr)(lp)

    def summary(self) -> dict[str, Any]:
        """What ``/v1/info`` shows: the ways chosen, the shape they were timed on, the timings."""
        return {
            "device": self.device,
            "rows": self.shape[0],
            "vocab": self.shape[1],
            "topk": {str(k): v for k, v in self.topk.items()},
            "count": self.count,
            "entropy": self.entropy,
            "timings_ms": self.timings,
        }

    def line(self) -> str:
        """The choice in one log line."""
        topk = ", ".join(f"k<={k} {name}" for k, name in self.topk.items())
        return (
            f"reduction kernels on {self.device}, {self.shape[0]} x {self.shape[1]} rows timed: "
            f"top-k {topk}; "
            f"rank count {self.count}; entropy {self.entropy}"
        )


ENTROPY: dict[str, Entropy] = {"entr": entropy_entr, "dot": entropy_dot}


def _best_ms(fn: Callable[[], Any], device: torch.device) -> float:
    fn()
    best = float("inf")
    for _ in range(TIMING_CALLS):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - started)
    return round(best * 1e3, 4)


def timing_rows(vocab: int, slice_rows: int) -> int:
    """Rows to time at ``vocab``: the worker's slice, or fewer at a large vocabulary."""
    return max(8, min(slice_rows, TIMING_VALUES // vocab))


def choose(
    vocab: int,
    k_max: int,
    device: torch.device | str = "cpu",
    rows: int = 64,
    counts: dict[str, Count] | None = None,
) -> Kernels:
    """Time every way of each step on ``rows`` x ``vocab`` logprobs on ``device`` and keep the fastest.

    ``counts`` adds ways to count ranks (the worker passes vLLM's compiled kernel) beside the eager one.
    A top-k way whose values differ from ``torch.topk``'s on the timing rows is never chosen.
    """
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Peaked rows, as a trained teacher's are (a near-uniform row would flatter no way).
    lp = torch.log_softmax(torch.randn(rows, vocab, generator=gen) * 4, dim=-1).to(device)
    kernels = Kernels(shape=(rows, vocab), device=str(device))
    ways = topk_ways(device)
    for bucket in [b for b in K_BUCKETS if b < k_max] + [k_max]:
        k = min(bucket, vocab)
        expected, _ = topk_torch(lp, k)
        timed: dict[str, float] = {}
        for name, way in ways.items():
            values, ids = way(lp, k)
            if torch.equal(values, expected) and torch.equal(lp.gather(1, ids.to(torch.int64)), values):
                timed[name] = _best_ms(functools.partial(way, lp, k), device)
        kernels.topk[bucket] = min(timed, key=timed.__getitem__)
        kernels.timings[f"topk k<={bucket}"] = timed
    target = lp[:, :1].clone()
    count_fns = {"eager": count_at_least, **(counts or {})}
    timed = {name: _best_ms(functools.partial(fn, lp, target), device) for name, fn in count_fns.items()}
    kernels.count, kernels.timings["rank count"] = min(timed, key=timed.__getitem__), timed
    kernels._count_fns = count_fns
    timed = {name: _best_ms(functools.partial(fn, lp), device) for name, fn in ENTROPY.items()}
    kernels.entropy, kernels.timings["entropy"] = min(timed, key=timed.__getitem__), timed
    return kernels


#: This process's choice (the default until :func:`select` runs: torch's ways, no timing).
_ACTIVE = Kernels()


def active() -> Kernels:
    return _ACTIVE


def select(
    vocab: int,
    k_max: int,
    device: torch.device | str = "cpu",
    *,
    slice_rows: int = 256,
    report: str | None = None,
    counts: dict[str, Count] | None = None,
) -> Kernels:
    """Choose this process's kernels once for ``vocab`` and ``k_max`` (later calls reuse them).

    Logs the choice in one line and, given a ``report`` path, writes its summary there as JSON for
    the server process to show (the worker that reduces may be another process).
    """
    global _ACTIVE
    if (
        _ACTIVE.shape[1] == vocab
        and _ACTIVE.device == str(torch.device(device))
        and max(_ACTIVE.topk, default=0) >= k_max
    ):
        return _ACTIVE
    started = time.perf_counter()
    _ACTIVE = choose(vocab, k_max, device, timing_rows(vocab, slice_rows), counts=counts)
    log.info("%s (%.0f ms)", _ACTIVE.line(), 1e3 * (time.perf_counter() - started))
    if report:
        Path(report).write_text(json.dumps(_ACTIVE.summary()))
    return _ACTIVE
