"""From logits to what a cache stores, in torch, on the device that computed the logits.

For every row (one position of one sequence): ``log_softmax(logits / T)`` in fp32, its top-k ids and
logprobs, the logprob and rank of the actual next token, and optionally N tokens drawn from
``softmax(logits / T)`` with their logprobs. Everything a row yields is packed into one int32 row
(floats bit-cast, so nothing is rounded), because vLLM hands a pooler's output back as one tensor
per request (the layout: ``schemas.scoring.PackedLayout``; its reader: ``server/packed.py``).

The draws are reproducible: the uniform number behind draw j at position p of a request with seed s
is a hash of (s, p, j), so the same seed and input give the same draws however the engine batches
or chunks the work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from teacher_farm.schemas.scoring import PackedLayout
from teacher_farm.server import kernels

_MASK32 = 0xFFFFFFFF
FLOAT32_MAX = torch.finfo(torch.float32).max


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer on int64 tensors holding 32-bit values (low bits stay exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def uniforms(seeds: torch.Tensor, positions: torch.Tensor, samples: int) -> torch.Tensor:
    """(rows, samples) float32 in (0, 1), a pure function of (seed, position, draw index)."""
    draw = torch.arange(samples, device=positions.device, dtype=torch.int64)
    h = _fmix32((seeds.to(torch.int64) & _MASK32) ^ 0x9E3779B9)
    h = _fmix32(h[:, None] ^ (positions.to(torch.int64)[:, None] & _MASK32))
    h = _fmix32(h ^ (draw[None, :] * 0x27D4EB2F & _MASK32))
    # 24 bits: every float32 in (0, 1) below is exact, none is 0 or 1.
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of ``x`` (rows × vocabulary) are >= ``values`` (rows × 1), the way
    this process chose (``server/kernels.py``)."""
    return kernels.active().count_at_least(x, values)


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x``, the ``k`` largest values, largest first, and their column ids, the way this
    process chose by timing them where it runs (``server/kernels.py``)."""
    return kernels.active().top_k(x, k)


def rank_of(
    lp: torch.Tensor,
    target_lp: torch.Tensor,
    top_lp: torch.Tensor,
    count: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = count_at_least,
) -> torch.Tensor:
    """Each row's rank of its target (1 = the argmax; ties rank together, as vLLM's prompt logprobs
    count them): how many logprobs are >= the target's.

    Where the target is above the row's k-th largest value, every value >= it is among the top k,
    so the top k alone give the count; only the other rows pass over the vocabulary again. A trained
    teacher's next token is in its top 16 at most positions (84% for SmolLM2-135M on real text).
    """
    if top_lp.shape[1] == 0:
        return count(lp, target_lp)
    inside = target_lp[:, 0] > top_lp[:, -1]
    ranks = (top_lp >= target_lp).sum(dim=-1)
    outside = (~inside).nonzero()[:, 0]
    if len(outside) * 2 > len(inside):  # most rows: one pass over all, no copy of their rows
        return torch.where(inside, ranks, count(lp, target_lp))
    if len(outside):
        ranks[outside] = count(lp[outside], target_lp[outside])
    return ranks


def reduce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    layout: PackedLayout,
    inv_temperature: torch.Tensor | None = None,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    *,
    row_samples: torch.Tensor | None = None,
    count: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = count_at_least,
) -> torch.Tensor:
    """Rows of ``layout`` (``schemas.scoring.PackedLayout``) for ``logits`` (rows × vocabulary).

    ``targets`` holds each row's next token (any valid id where there is none: its columns are then
    ignored); ``inv_temperature`` is 1/T per row (None: T = 1 everywhere, saving a pass);
    ``seeds`` and ``positions`` key the layout's draws. ``row_samples`` holds each row's own draw
    count where rows of one batch ask for fewer than ``layout.samples``: a row's own draws then come
    first, sorted, whatever its neighbours asked for; a row of count 0 draws nothing (its draw
    columns hold the last id). A layout with ``entropy`` also carries the
    entropy of ``softmax(logits / T)`` in nats (one more pass over the vocabulary, for the
    ``entropy:F`` position rule). ``count`` counts ranks (by default the way this process chose,
    ``server/kernels.py``).
    """
    lp = logits.float()
    if inv_temperature is not None:
        # Clamped above: a logit overflowing to inf would make log_softmax NaN (inf - inf); a masked
        # logit stays -inf.
        lp = (lp * inv_temperature[:, None]).clamp_(max=FLOAT32_MAX)
    lp = torch.log_softmax(lp, dim=-1)
    top_lp, top_ids = top_k(lp, layout.k)
    target_lp = lp.gather(1, targets.to(torch.int64)[:, None])
    target_rank = rank_of(lp, target_lp, top_lp, count).to(torch.int32)[:, None]
    out = torch.empty((lp.shape[0], layout.width), dtype=torch.int32, device=lp.device)
    out[:, layout.topk_ids] = top_ids.to(torch.int32)
    out[:, layout.topk_logprobs] = top_lp.view(torch.int32)
    out[:, layout.target_logprob] = target_lp.view(torch.int32)[:, 0]
    out[:, layout.target_rank] = target_rank[:, 0]
    samples = layout.samples
    if samples:
        assert seeds is not None and positions is not None
        last = lp.shape[1] - 1
        drawing = None
        if row_samples is not None and not bool((row_samples > 0).all()):
            # Rows that draw nothing (a top-k request beside a sampling one; every position but the
            # last of a request that draws only there) skip the pass over their vocabulary.
            drawing = (row_samples > 0).nonzero()[:, 0]
        drawn = torch.full((lp.shape[0], samples), last, dtype=torch.int64, device=lp.device)
        if drawing is None or len(drawing):
            rows, row_seeds, row_positions = lp, seeds, positions
            if drawing is not None:
                rows, row_seeds, row_positions = lp[drawing], seeds[drawing], positions[drawing]
            cdf = rows.exp().cumsum(dim=-1)
            # Scaling by the row's own total makes the fp32 sum's last-bit error harmless.
            u = uniforms(row_seeds, row_positions, samples) * cdf[:, -1:]
            own = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=last)
            del cdf, rows
            if row_samples is not None:
                # Draws beyond a row's own count sort after its own (and are dropped by the caller).
                counts = row_samples if drawing is None else row_samples[drawing]
                beyond = torch.arange(samples, device=own.device)[None, :] >= counts[:, None]
                own = own.masked_fill_(beyond, lp.shape[1]).sort(dim=-1).values.clamp_(max=last)
            else:
                own = own.sort(dim=-1).values
            if drawing is None:
                drawn = own
            else:
                drawn[drawing] = own
        out[:, layout.sample_ids] = drawn.to(torch.int32)
        out[:, layout.sample_logprobs] = lp.gather(1, drawn).view(torch.int32)
    if layout.entropy:
        out[:, layout.entropy_column] = kernels.active().entropy_of(lp).view(torch.int32)
    return out
