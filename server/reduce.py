"""From logits to what a cache stores, in torch, on the device that computed the logits.

For every row (one position of one sequence): ``log_softmax(logits / T)`` in fp32, its top-k ids and
logprobs, the logprob and rank of the actual next token, and optionally N tokens drawn from
``softmax(logits / T)`` with their logprobs. Everything a row yields is packed into one int32 row
(floats bit-cast, so nothing is rounded), because vLLM hands a pooler's output back as one tensor
per request (the layout and its reader: ``server/packed.py``).

The draws are reproducible: the uniform number behind draw j at position p of a request with seed s
is a hash of (s, p, j), so the same seed and input give the same draws however the engine batches
or chunks the work.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


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


def reduce_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: torch.Tensor,
    k: int,
    samples: int = 0,
    seeds: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed int32 rows (``server/packed.py``) for ``logits`` (rows × vocabulary).

    ``targets`` holds each row's next token (any valid id where there is none: its columns are then
    ignored); ``inv_temperature`` is 1/T per row; ``seeds`` and ``positions`` key the draws.
    """
    lp = logits.float()
    lp = lp * inv_temperature[:, None]
    lp = torch.log_softmax(lp, dim=-1)
    top_lp, top_ids = lp.topk(k, dim=-1)
    target_lp = lp.gather(1, targets.to(torch.int64)[:, None])
    # Rank 1 is the argmax: one more than the number of tokens strictly more likely.
    target_rank = (lp > target_lp).sum(dim=-1, keepdim=True, dtype=torch.int32) + 1
    parts = [top_ids.to(torch.int32), top_lp.view(torch.int32), target_lp.view(torch.int32), target_rank]
    if samples:
        assert seeds is not None and positions is not None
        cdf = lp.exp().cumsum(dim=-1)
        # Scaling by the row's own total makes the fp32 sum's last-bit error harmless.
        u = uniforms(seeds, positions, samples) * cdf[:, -1:]
        drawn = torch.searchsorted(cdf, u.contiguous(), right=True).clamp_(max=lp.shape[1] - 1)
        del cdf
        drawn = drawn.sort(dim=-1).values
        parts += [drawn.to(torch.int32), lp.gather(1, drawn).view(torch.int32)]
    return torch.cat(parts, dim=1)
