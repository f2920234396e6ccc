"""Distillation with Hugging Face's ``Trainer``: a cache's batches in, any loss of ``losses`` out.

:class:`DistillationTrainer` is a ``transformers.Trainer`` whose ``compute_loss`` runs the student on
the batch's ``input_ids`` and ``attention_mask`` and mixes the distillation loss with the student's
own next-token cross-entropy on the text::

    loss = alpha * kd_loss(student_logits, batch) + (1 - alpha) * cross_entropy(student_logits, labels)

Everything else is the Trainer's: the optimizer and schedule, gradient accumulation, mixed precision,
checkpoints, logging, evaluation. Needs ``transformers`` and ``accelerate``
(``pip install 'teacher-farm[trainer]'``); ``teacher_farm.training`` imports this module only when
:class:`DistillationTrainer` is asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import accelerate  # noqa: F401 - the Trainer needs it; without it, fail here rather than at TrainingArguments
import torch
import transformers

from teacher_farm.training.collate import collate_topk
from teacher_farm.training.dataset import TopkDataset
from teacher_farm.training.losses import SampledKDLoss, TopkTailKLLoss

__all__ = ["DistillationTrainer", "default_kd_loss"]

#: The loss a trainer uses when none is given, by the cache's ``--targets``.
_DEFAULT_LOSS: dict[str | None, type[torch.nn.Module]] = {
    "topk": TopkTailKLLoss,
    "both": TopkTailKLLoss,
    "sampled": SampledKDLoss,
}


def default_kd_loss(dataset: Any = None) -> torch.nn.Module:
    """``SampledKDLoss()`` for a dataset of sampled targets only, ``TopkTailKLLoss()`` otherwise.

    Reads ``dataset.targets`` (a :class:`TopkDataset` has it: the cache's ``--targets``).
    """
    return _DEFAULT_LOSS.get(getattr(dataset, "targets", None), TopkTailKLLoss)()


class DistillationTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that distils from cached teacher targets.

    Takes every argument of ``Trainer`` and two more:

    - ``kd_loss``: any loss of :mod:`teacher_farm.training.losses` (``TopkTailKLLoss()``,
      ``TopkRenormKLLoss()``, ``SampledKDLoss()``, ``ChunkedKDLoss(...)``) or any callable
      ``(student_logits, batch) -> 0-d tensor``; by default :func:`default_kd_loss` of the training
      dataset (the tail loss, or the sampled loss for a cache of sampled targets only);
    - ``alpha`` (default 0.5): the weight of the distillation loss; ``1 - alpha`` weighs the
      student's next-token cross-entropy on ``labels`` (computed by the model, which shifts them).
      A part whose weight is 0 is not computed.

    Batches are those of :func:`collate_topk` (the default ``data_collator``) over a
    :class:`TopkDataset`: only ``input_ids`` and ``attention_mask`` (and ``labels``) go to the model,
    the rest feeds the loss. ``args.remove_unused_columns`` is set to False, since the Trainer would
    otherwise drop the teacher's targets from every item before collating it (for a torch dataset
    as for a ``datasets.Dataset``). Each part, as a mean over its micro-batch, is logged as
    ``kd_loss`` and ``ce_loss`` (``eval_kd_loss`` and ``eval_ce_loss`` in evaluation), averaged
    over the steps since the last log.

    With ``num_items_in_batch`` (the Trainer counts the predicted tokens of all the micro-batches of
    one optimizer step when the model takes loss keyword arguments, as Hugging Face causal LMs do),
    a micro-batch's loss is weighted by its share of those tokens, so gradient accumulation gives
    long micro-batches their weight, as the Trainer does for the plain language-model loss.

    Under several processes (``torchrun``, ``accelerate launch``) each process reads its own batches
    (``args.accelerator_config.dispatch_batches`` is set to False unless given) and the Trainer gives
    each its share of them, so a :class:`TopkDataset` must not deal the cache to the ranks as well:
    build it with ``rank=0, world_size=1`` (a dataset that would is refused with that advice).
    """

    def __init__(
        self,
        model: Any = None,
        args: transformers.TrainingArguments | None = None,
        *,
        kd_loss: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
        alpha: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha is the weight of the distillation loss, in [0, 1]; got {alpha}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(
                "DistillationTrainer computes its own loss: pass kd_loss= (and alpha=), not compute_loss_func"
            )
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = collate_topk
        # transformers types accelerator_config as given (dict, str or None); TrainingArguments'
        # __post_init__ has made it an AcceleratorConfig.
        if args is not None and args.accelerator_config.dispatch_batches is None:  # type: ignore[union-attr]
            # accelerate's default for an iterable dataset: the first process reads every batch and
            # sends the others theirs, which needs batches of one shape; collate_topk pads each batch
            # to its own longest sequence. Each process reads its own batches instead.
            args.accelerator_config.dispatch_batches = False  # type: ignore[union-attr]
        super().__init__(model, args, **kwargs)
        # The Trainer removes every key the model's forward does not name, before collating.
        self.args.remove_unused_columns = False
        self.kd_loss = kd_loss if kd_loss is not None else default_kd_loss(self.train_dataset)
        self.alpha = float(alpha)
        #: Each loss part of every micro-batch since the last log, by mode.
        self._parts: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The Trainer's loader, after checking the dataset is not split between processes twice."""
        self._check_split(self.train_dataset)
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset: Any = None) -> torch.utils.data.DataLoader:
        """The Trainer's loader, after checking the dataset is not split between processes twice."""
        # A name picks one of a dict of evaluation datasets (transformers' own rule).
        chosen = self.eval_dataset[eval_dataset] if isinstance(eval_dataset, str) else eval_dataset  # type: ignore[index]
        self._check_split(chosen if chosen is not None else self.eval_dataset)
        return super().get_eval_dataloader(eval_dataset)

    def _check_split(self, dataset: Any) -> None:
        """Under several processes the Trainer gives each its share of the batches (accelerate's
        ``IterableDatasetShard``); a dataset that deals row groups to the ranks itself would leave
        most of the cache unread, so it is refused."""
        if self.args.world_size <= 1 or not isinstance(dataset, TopkDataset):
            return
        rank, world = getattr(dataset, "rank", None), getattr(dataset, "world_size", None)
        if (world or 1) > 1 or (rank is None and world is None):
            raise ValueError(
                f"under {self.args.world_size} processes the Trainer already gives each process its share "
                "of the batches; a TopkDataset that also deals the cache to the ranks would skip most of it: "
                "build it with TopkDataset(cache_dir, ..., rank=0, world_size=1)"
            )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """``alpha * kd + (1 - alpha) * ce`` on one micro-batch of :func:`collate_topk`."""
        labels = inputs.get("labels")
        with_ce = self.alpha < 1.0
        if with_ce and labels is None:
            raise ValueError(
                "the text's cross-entropy (alpha < 1) needs labels in the batch: collate_topk gives them"
            )
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        if with_ce:
            model_inputs["labels"] = labels
        outputs = model(**model_inputs)

        parts = {}
        if self.alpha > 0.0:
            parts["kd_loss"] = self.kd_loss(outputs.logits, inputs)
        if with_ce:
            parts["ce_loss"] = outputs.loss
        loss = self.alpha * parts.get("kd_loss", 0.0) + (1.0 - self.alpha) * parts.get("ce_loss", 0.0)
        store = self._parts["train" if model.training else "eval"]
        for name, value in parts.items():
            store[name].append(value.detach().float())

        if num_items_in_batch is not None and labels is not None:
            # The Trainer then takes the loss as scaled for gradient accumulation (it does not divide
            # it by the steps): weigh this micro-batch by its share of the step's predicted tokens,
            # counted as the Trainer counts them.
            tokens = (labels[..., 1:] != -100).sum()
            loss = loss * tokens / num_items_in_batch
            if getattr(self.args, "average_tokens_across_devices", False):
                # num_items_in_batch is then summed over the processes, whose gradients are averaged.
                tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                processes = self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu
                loss = loss * processes
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean of each loss part since the last log (with the metrics' prefix in evaluation)."""
        mode = "train" if self.model.training else "eval"  # type: ignore[union-attr]  # set by __init__
        prefix = ""
        if mode == "eval":  # evaluate(metric_key_prefix=...) names its loss "<prefix>_loss"
            prefix = next((key[: -len("loss")] for key in logs if key.endswith("_loss")), "eval_")
        for name, values in self._parts[mode].items():
            if values:
                mean = torch.stack(values).mean()
                logs[prefix + name] = self.accelerator.reduce(mean, reduction="mean").item()
        self._parts[mode].clear()
        super().log(logs, start_time)
