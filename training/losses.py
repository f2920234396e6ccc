"""Distillation losses for every kind of cached target, one class per formula.

Every loss compares the student with the teacher at the **cache's temperature** T: the cached
logprobs are already those of ``softmax(teacher_logits / T)``, so the student's logits are divided
by T and the teacher's values are used as they are. A batch from :class:`TopkDataset` (or the online
teacher) carries ``temperature`` (B,); asking a loss for another temperature raises ``ValueError``
rather than rescaling the teacher's values silently (the cache holds no logits to rescale). Every
value is multiplied by T² (Hinton et al.) so gradient magnitudes do not depend on T; at T = 1 that is
a no-op.

Shapes, for B sequences of T positions, a student vocabulary V, k top-k entries and S sample slots:

- ``student_logits`` (B, T, V), any float dtype (computed in float32): position t predicts token
  t+1, like the teacher's targets, so a causal LM's logits are used unshifted;
- ``attention_mask`` (B, T): the positions that count; the loss is the mean over them, and over
  ``kept_mask`` (B, T) too where the batch has one (a cache written with ``--positions``: the
  positions whose targets it kept).

=================  ============================================================================
class              per-position value (p: teacher, q: student, both at temperature T)
=================  ============================================================================
TopkTailKLLoss     KL over k + 1 buckets: the teacher's top-k tokens and "everything else"
TopkRenormKLLoss   KL of the teacher's top-k renormalised against the student's on the same ids
SampledKDLoss      cross-entropy of q against ``sample_counts / N``: unbiased for CE(p, q);
                   with ``entropy=True`` the teacher-entropy estimate is added, so it reads as KL
=================  ============================================================================

:class:`ChunkedKDLoss` wraps any of them and works through the positions a chunk at a time under
activation checkpointing, so the float32 buffers of only one chunk are alive at once (torchtune's
``*WithChunkedOutputLoss`` takes the same list of logit chunks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "ChunkedKDLoss",
    "SampledKDLoss",
    "TopkRenormKLLoss",
    "TopkTailKLLoss",
    "cache_temperature",
    "kd_loss",
    "sampled_kd_loss",
]

Batch = Mapping[str, torch.Tensor]

#: Stand-in for -inf that keeps gradients finite (exp of it is 0 in float32).
_NEG = -1e30
#: Logprobs below this are treated as log 0 (a token the teacher rules out): 0 * log 0 = 0, not NaN.
_LOG_ZERO = -1e4


def cache_temperature(batch: Batch, asked: float | None) -> float:
    """The temperature a loss works at: the batch's (the cache's), which ``asked`` must equal.

    A batch without ``temperature`` (built by hand) is taken to be at ``asked``, or 1.
    """
    if asked is not None and asked <= 0:
        raise ValueError("temperature must be positive")
    temps = batch.get("temperature")
    if temps is None:
        return 1.0 if asked is None else float(asked)
    values = torch.unique(torch.as_tensor(temps, dtype=torch.float64).reshape(-1)).tolist()
    if len(values) != 1:
        raise ValueError(f"one batch mixes targets cached at several temperatures: {values}")
    cached = float(values[0])
    if asked is not None and abs(cached - asked) > 1e-6 * max(1.0, cached):
        raise ValueError(
            f"the targets were cached at temperature {cached:g} and the loss asks for {asked:g}: the "
            f"cache holds log softmax(logits / {cached:g}) and cannot be rescaled; build the loss with "
            f"temperature={cached:g} (or None), or cache the targets again with --temperature {asked:g}"
        )
    return cached


class _KDLoss(torch.nn.Module):
    """Shared plumbing: temperature check, shape check, masking and the mean over real positions."""

    #: Batch keys a loss reads (checked, so a cache without them gets a clear message).
    needs: tuple[str, ...] = ()

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        if temperature is not None and temperature <= 0:
            raise ValueError("temperature must be positive")
        self.temperature = temperature

    def per_token(self, logits: torch.Tensor, batch: Batch, T: float) -> torch.Tensor:
        """(B, t) float32 loss of each position of ``logits`` (B, t, V) against ``batch`` sliced alike."""
        raise NotImplementedError

    def check(self, student_logits: torch.Tensor, batch: Batch) -> float:
        """Validate the inputs; returns the temperature to work at."""
        missing = [key for key in self.needs if key not in batch]
        if missing:
            raise ValueError(
                f"{type(self).__name__} needs {', '.join(missing)} in the batch: "
                + (
                    "a cache written with --targets sampled or both"
                    if "sample_ids" in missing
                    else "a cache written with --sample-logprobs (the teacher's logprobs of its draws), "
                    "which this one was not; without entropy=True the loss needs only the draws"
                    if missing == ["sample_logprobs"]
                    else "a cache written with --targets topk or both"
                )
            )
        want = tuple(batch["attention_mask"].shape)
        if tuple(student_logits.shape[:2]) != want:
            raise ValueError(
                f"student logits {tuple(student_logits.shape)} do not cover the batch's {want} positions"
            )
        return cache_temperature(batch, self.temperature)

    def sum_and_count(
        self, logits: torch.Tensor, batch: Batch, T: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked sum of the per-position loss over ``logits`` (B, t, V), and the number of positions."""
        mask = batch["attention_mask"].to(logits.device).bool()
        if "kept_mask" in batch:  # a position rule kept targets at these positions only
            mask = mask & batch["kept_mask"].to(logits.device).bool()
        per = self.per_token(logits.float(), batch, T) * (T * T)
        per = torch.where(mask, per, torch.zeros_like(per))
        return per.sum(), mask.sum()

    def forward(self, student_logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Mean per-position loss over ``batch["attention_mask"]``: a 0-d float32 tensor."""
        T = self.check(student_logits, batch)
        total, count = self.sum_and_count(student_logits, _on(batch, student_logits.device), T)
        return total / count.clamp_min(1)


def _on(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


class TopkTailKLLoss(_KDLoss):
    """Forward KL(teacher || student) over k + 1 buckets: the teacher's top-k tokens and the rest.

    Reads ``topk_ids`` (B, T, k) long, ``topk_logprobs`` (B, T, k) float (the teacher's logprobs
    over the whole vocabulary at the cache's temperature, or renormalised over the top-k) and
    ``tail_logprob`` (B, T) (log of the teacher's mass outside its top-k). With p the teacher and
    q = softmax(student_logits / T), per position::

        sum_i p_i (log p_i - log q_i)  +  p_tail (log p_tail - log q_tail)

    where q_tail is the student's mass on every id outside the teacher's top-k. This is the exact
    KL of the two distributions coarsened to k + 1 buckets (a lower bound of the full KL), and 0
    when the student is the teacher. Needs one extra (B, T, V) buffer for the student's tail.
    """

    needs = ("topk_ids", "topk_logprobs", "tail_logprob")

    def per_token(self, logits: torch.Tensor, batch: Batch, T: float) -> torch.Tensor:
        t = logits.shape[1]
        ids = batch["topk_ids"][:, :t]
        t_tail = batch["tail_logprob"][:, :t].float().clamp(_LOG_ZERO, 0.0)
        # The top-k's shape times their mass 1 - p_tail: the raw logprobs again, from raw and from
        # renormalised rows alike.
        t_top = torch.log1p(-t_tail.exp()).clamp_min(_LOG_ZERO)
        t_lp = (
            F.log_softmax(batch["topk_logprobs"][:, :t].float().clamp_min(_LOG_ZERO), dim=-1)
            + t_top[..., None]
        )
        z = logits / T
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        s_lp = z.gather(-1, ids) - lse
        s_tail = (torch.logsumexp(z.scatter(-1, ids, _NEG), dim=-1) - lse[..., 0]).clamp_min(_LOG_ZERO)
        return (t_lp.exp() * (t_lp - s_lp)).sum(-1) + t_tail.exp() * (t_tail - s_tail)


class TopkRenormKLLoss(_KDLoss):
    """Forward KL between the teacher's and the student's distributions renormalised over the top-k.

    Reads ``topk_ids`` (B, T, k) long and ``topk_logprobs`` (B, T, k) float (raw or renormalised
    rows alike: they are log-softmaxed over the k entries here). Per position, with p̂ the teacher's
    top-k renormalised and q̂ = softmax over the same k ids of ``student_logits / T``::

        sum_i p̂_i (log p̂_i - log q̂_i)

    The usual sparse KD: it ignores how much mass either puts outside the top-k (the bias
    Random-Sampling KD points out). No (B, T, V) buffer beyond the float32 cast of the logits.
    """

    needs = ("topk_ids", "topk_logprobs")

    def per_token(self, logits: torch.Tensor, batch: Batch, T: float) -> torch.Tensor:
        t = logits.shape[1]
        ids = batch["topk_ids"][:, :t]
        t_shape = F.log_softmax(batch["topk_logprobs"][:, :t].float().clamp_min(_LOG_ZERO), dim=-1)
        s_shape = F.log_softmax(logits.gather(-1, ids) / T, dim=-1)
        return (t_shape.exp() * (t_shape - s_shape)).sum(-1)


class SampledKDLoss(_KDLoss):
    """Random-Sampling KD: cross-entropy of the student against the teacher's sampled tokens.

    Reads ``sample_ids`` (B, T, S) long (the distinct tokens among the N draws of each position,
    padded), ``sample_counts`` (B, T, S) (how often each was drawn; 0 on padding) and, with
    ``entropy``, ``sample_logprobs`` (B, T, S) float (the teacher's logprobs of those tokens). With
    w = counts / N and q = softmax(student_logits / T), per position::

        -sum_j w_j log q(s_j)                    (entropy=False: estimates CE(p, q))
        sum_j w_j (log p(s_j) - log q(s_j))      (entropy=True: estimates KL(p || q))

    Both are unbiased: their expectation over the draws is the full-vocabulary value, because
    E[counts / N] = p. The entropy term is constant in the student, so the gradient is the same;
    it makes the value read as a KL (near 0 for a student equal to the teacher). Positions whose
    counts sum to 0 are skipped.
    """

    needs: tuple[str, ...] = ("sample_ids", "sample_counts")

    def __init__(self, temperature: float | None = None, *, entropy: bool = False) -> None:
        super().__init__(temperature)
        self.entropy = entropy
        if entropy:
            self.needs = (*self.needs, "sample_logprobs")

    def per_token(self, logits: torch.Tensor, batch: Batch, T: float) -> torch.Tensor:
        t = logits.shape[1]
        ids = batch["sample_ids"][:, :t]
        counts = batch["sample_counts"][:, :t].float()
        w = counts / counts.sum(-1, keepdim=True).clamp_min(1.0)
        s_lp = F.log_softmax(logits / T, dim=-1).gather(-1, ids)
        per = -(w * s_lp).sum(-1)
        if self.entropy:
            t_lp = batch["sample_logprobs"][:, :t].float().clamp_min(_LOG_ZERO)
            per = per + (w * t_lp).sum(-1)
        return per

    def sum_and_count(
        self, logits: torch.Tensor, batch: Batch, T: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        has = batch["sample_counts"][:, : logits.shape[1]].sum(-1) > 0
        batch = {**batch, "attention_mask": batch["attention_mask"].bool() & has}
        return super().sum_and_count(logits, batch, T)


class ChunkedKDLoss(torch.nn.Module):
    """Any of the losses above, a chunk of positions at a time, to bound memory.

    ``student_logits`` is either (B, T, V), split along T into ``num_output_chunks`` pieces, or a
    list of (B, T_i, V) chunks along T (what a model with a chunked output projection returns, as
    torchtune's ``*WithChunkedOutputLoss`` take it). Each chunk is cast to float32 and reduced under
    activation checkpointing (when gradients are needed), so only one chunk's float32 intermediates
    exist at a time, in the forward and in the backward pass. Same value and gradient as ``loss``.
    """

    def __init__(self, loss: _KDLoss, num_output_chunks: int = 8) -> None:
        super().__init__()
        if num_output_chunks < 1:
            raise ValueError("num_output_chunks must be at least 1")
        self.loss = loss
        self.num_output_chunks = num_output_chunks

    def forward(self, student_logits: torch.Tensor | Sequence[torch.Tensor], batch: Batch) -> torch.Tensor:
        """Mean per-position loss over ``batch["attention_mask"]``: a 0-d float32 tensor."""
        chunks = (
            list(student_logits.chunk(self.num_output_chunks, dim=1))
            if isinstance(student_logits, torch.Tensor)
            else list(student_logits)
        )
        if not chunks:
            raise ValueError("no logits")
        B, T = batch["attention_mask"].shape
        width = sum(c.shape[1] for c in chunks)
        shape = (chunks[0].shape[0], width, chunks[0].shape[-1])
        T_ = self.loss.check(torch.empty(shape, device="meta"), batch)
        batch = _on(batch, chunks[0].device)
        total = torch.zeros((), device=chunks[0].device)
        count = torch.zeros((), device=chunks[0].device, dtype=torch.long)
        start = 0
        for chunk in chunks:
            stop = start + chunk.shape[1]
            part = {k: _slice(v, start, stop, B, T) for k, v in batch.items()}
            if torch.is_grad_enabled() and chunk.requires_grad:
                s, c = checkpoint(self._reduce, chunk, part, T_, use_reentrant=False)
            else:
                s, c = self._reduce(chunk, part, T_)
            total, count, start = total + s, count + c, stop
        return total / count.clamp_min(1)

    def _reduce(self, chunk: torch.Tensor, part: Batch, T: float) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss.sum_and_count(chunk, part, T)


def _slice(value: torch.Tensor, start: int, stop: int, B: int, T: int) -> torch.Tensor:
    """Positions [start, stop) of a per-position batch entry; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (B, T):
        return value[:, start:stop]
    return value


def kd_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    temperature: float | None = None,
    tail: bool = True,
) -> torch.Tensor:
    """Forward KL(teacher || student) per position from the cached top-k, mean over the attention mask.

    ``student_logits`` (B, T, V) are the student's logits at the batch's positions (position i
    predicts token i+1, like the teacher's top-k). With ``tail`` (the default) this is
    :class:`TopkTailKLLoss`: the exact KL over k + 1 buckets, the teacher's top-k tokens and
    everything else; without, :class:`TopkRenormKLLoss`: the KL of both distributions renormalised
    over the teacher's top-k. Both at the cache's temperature T (``temperature`` None, or equal to
    the cache's: anything else raises ``ValueError``), times T². Zero when the student's
    distribution is the teacher's.
    """
    loss = TopkTailKLLoss(temperature) if tail else TopkRenormKLLoss(temperature)
    return loss(student_logits, batch)


def sampled_kd_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    temperature: float | None = None,
    entropy: bool = False,
) -> torch.Tensor:
    """Random-Sampling KD from cached draws (:class:`SampledKDLoss`), mean over the attention mask.

    The student's cross-entropy against ``sample_counts / N`` at the cache's temperature (times T²),
    an unbiased estimate of its cross-entropy against the teacher; with ``entropy`` the teacher's
    entropy estimate is subtracted so the value estimates KL(teacher || student).
    """
    return SampledKDLoss(temperature, entropy=entropy)(student_logits, batch)
