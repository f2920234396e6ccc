"""Batching: cached (or online) sequences padded into one batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from teacher_farm.training.reader import SAMPLE_COLUMNS, TAIL_FLOOR


def collate_topk(
    batch: Sequence[dict[str, torch.Tensor]],
    pad_id: int = 0,
    *,
    pad_to_multiple_of: int | None = None,
) -> dict[str, torch.Tensor]:
    """Pad a list of :class:`TopkDataset` items to the longest one (B sequences, T positions).

    Returns ``input_ids`` (B, T) padded with ``pad_id``; ``attention_mask`` (B, T) long, 1 on real
    tokens (the positions the KD loss uses); ``labels`` (B, T) the input ids with -100 on padding,
    Hugging Face style (the model shifts them); ``topk_ids`` (B, T, k) long and ``topk_logprobs``
    (B, T, k) float32, padded with 0; ``tail_logprob`` (B, T) padded with log(TAIL_FLOOR);
    ``target_logprobs`` (B, T) aligned with the logits, position i holding the teacher's logprob of
    token i+1, and ``target_mask`` (B, T) bool, True where there is such a token; ``lengths`` (B,),
    ``line`` (B,) and ``temperature`` (B,). Sampled targets, when the items have them:
    ``sample_ids`` (B, T, S) long, ``sample_counts`` (B, T, S) int16, ``sample_logprobs`` (B, T, S)
    float32 (when the cache stored them), padded with 0 to the widest position S of the batch, and
    ``sample_mask`` (B, T, S) bool, True on a drawn token. Items of a cache written with ``--positions``
    give ``kept_mask`` (B, T) bool, True where the cache kept targets (the losses average over those).
    Pad values are finite so masked positions never turn a loss into NaN.
    """
    import torch

    if not batch:
        raise ValueError("collate_topk got an empty batch")
    lengths = [int(x["input_ids"].shape[0]) for x in batch]
    B, T = len(batch), max(lengths)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    out = {
        "input_ids": torch.full((B, T), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((B, T), dtype=torch.long),
        "target_logprobs": torch.zeros((B, T), dtype=torch.float32),
        "target_mask": torch.zeros((B, T), dtype=torch.bool),
    }
    has_topk = _same_presence(batch, "topk_ids")
    if has_topk:
        ks = {int(x["topk_ids"].shape[1]) for x in batch}
        if len(ks) != 1:
            raise ValueError(f"sequences with different k in one batch: {sorted(ks)}")
        (k,) = ks
        out["topk_ids"] = torch.zeros((B, T, k), dtype=torch.long)
        out["topk_logprobs"] = torch.zeros((B, T, k), dtype=torch.float32)
        out["tail_logprob"] = torch.full((B, T), float(np.log(TAIL_FLOOR)), dtype=torch.float32)
    has_samples = _same_presence(batch, "sample_ids")
    if has_samples:
        S = max(int(x["sample_ids"].shape[1]) for x in batch)
        out["sample_ids"] = torch.zeros((B, T, S), dtype=torch.long)
        out["sample_counts"] = torch.zeros((B, T, S), dtype=torch.int16)
        if _same_presence(batch, "sample_logprobs"):
            out["sample_logprobs"] = torch.zeros((B, T, S), dtype=torch.float32)
    has_kept = any("kept" in x for x in batch)
    if has_kept:
        out["kept_mask"] = torch.zeros((B, T), dtype=torch.bool)
    for b, (x, n) in enumerate(zip(batch, lengths)):
        out["input_ids"][b, :n] = x["input_ids"]
        out["attention_mask"][b, :n] = 1
        out["target_logprobs"][b, : n - 1] = x["target_logprobs"]
        out["target_mask"][b, : n - 1] = True
        if has_topk:
            out["topk_ids"][b, :n] = x["topk_ids"]
            out["topk_logprobs"][b, :n] = x["topk_logprobs"]
            out["tail_logprob"][b, :n] = x["tail_logprob"]
        if has_kept:
            out["kept_mask"][b, :n] = x["kept"] if "kept" in x else True
        if has_samples:
            s = int(x["sample_ids"].shape[1])
            for key in SAMPLE_COLUMNS:
                if key in out:
                    out[key][b, :n, :s] = x[key]
    if has_samples:
        out["sample_mask"] = out["sample_counts"] > 0
    out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    out["lengths"] = torch.tensor(lengths, dtype=torch.long)
    for key in ("line", "temperature"):
        if all(key in x for x in batch):
            out[key] = torch.stack([torch.as_tensor(x[key]) for x in batch])
    return out


def _same_presence(batch: Sequence[dict[str, Any]], key: str) -> bool:
    have = {key in x for x in batch}
    if len(have) != 1:
        raise ValueError(f"some sequences of the batch have {key} and some do not: mixed caches in one batch")
    return have.pop()
