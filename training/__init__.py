"""The student's side: caches or an online teacher into PyTorch training (``teacher_farm.training``).

Needs torch (``pip install 'teacher-farm[training]'``) and no vLLM, except ``reader`` and
``tokenizer``, which need numpy and pyarrow only: the names below are imported from their module on
first use, so ``teacher_farm.training.shard_paths`` works where torch is not installed. One module
per job::

    reader     the cache's shards, a row group at a time as numpy arrays (``teacher_farm.schemas.reader``,
               numpy and pyarrow only, which the client's verify and report read with too)
    tokenizer  the student must tokenize as the teacher did
    dataset    TopkDataset: one dict of tensors per cached sequence
    collate    collate_topk: a batch of them, padded
    losses     one loss class per formula (top-k with tail, top-k renormalised, sampled targets)
    online     OnlineTeacher: the same batches, with targets fetched live from servers
    trainer    DistillationTrainer: a Hugging Face Trainer fed by the cache (needs transformers, accelerate)

Typical use::

    from torch.utils.data import DataLoader
    from teacher_farm.training import TopkDataset, collate_topk, kd_loss

    ds = TopkDataset("cache/", shuffle_shards=True, seed=0, max_length=2048)
    loader = DataLoader(ds, batch_size=8, num_workers=4, collate_fn=collate_topk)
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = kd_loss(logits, batch)
"""

import importlib
from typing import Any

#: Every public name and the module that defines it.
_EXPORTS = {
    "collate_topk": "collate",
    "TopkDataset": "dataset",
    "ChunkedKDLoss": "losses",
    "SampledKDLoss": "losses",
    "TopkRenormKLLoss": "losses",
    "TopkTailKLLoss": "losses",
    "kd_loss": "losses",
    "sampled_kd_loss": "losses",
    "OnlineTeacher": "online",
    "DistillationTrainer": "trainer",
    "default_kd_loss": "trainer",
    "TAIL_FLOOR": "reader",
    "RowGroupArrays": "reader",
    "cache_metadata_of": "reader",
    "join_windows": "reader",
    "row_group_arrays": "reader",
    "shard_paths": "reader",
    "assert_same_tokenizer": "tokenizer",
    "check_alignment": "tokenizer",
}

__all__ = sorted(_EXPORTS)

#: A missing package, and the extra that brings it.
_EXTRA_OF: dict[str | None, str] = {"torch": "training", "transformers": "trainer", "accelerate": "trainer"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF.get(exc.name)
        if extra is None:
            raise
        raise ImportError(
            f"teacher_farm.training.{name} needs {exc.name}: pip install 'teacher-farm[{extra}]'"
        ) from exc
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
