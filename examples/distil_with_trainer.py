"""Distil a student from a teacher-farm cache with Hugging Face's Trainer.

    pip install 'teacher-farm[trainer]'
    teacher-farm cache --server http://node1:8000 --input corpus.jsonl --out cache/ --k 16
    python examples/distil_with_trainer.py --cache cache/ --student STUDENT --out runs/kd \\
        --max-steps 2000 --batch-size 8 --alpha 0.5 --bf16

STUDENT is a model name or a local directory with the teacher's tokenizer (checked against the
cache). Checkpoints go to ``--out/checkpoint-N`` every ``--save-steps`` steps, the final model and
tokenizer to ``--out``. On several GPUs: ``torchrun --nproc_per_node 8 examples/distil_with_trainer.py
...`` (``--batch-size`` is per GPU). Any other Trainer setting is one more ``TrainingArguments`` field
below.
"""

from __future__ import annotations

import argparse
import json

LOSSES = ("tail", "renorm", "sampled")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True, help="the directory teacher-farm cache wrote")
    p.add_argument("--student", required=True, help="model name or directory (with the teacher's tokenizer)")
    p.add_argument("--out", required=True, help="where checkpoints and the final model go")
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=None,
        help="tail: TopkTailKLLoss, renorm: TopkRenormKLLoss, sampled: SampledKDLoss "
        "(default: tail, or sampled for a cache of sampled targets only)",
    )
    p.add_argument(
        "--alpha", type=float, default=0.5, help="weight of the KD loss; 1 - alpha weighs the text's CE"
    )
    p.add_argument(
        "--chunks", type=int, default=1, help="compute the KD loss in this many chunks (ChunkedKDLoss)"
    )
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps (the cache is streamed)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per device and micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-length", type=int, default=None, help="truncate longer cached sequences")
    p.add_argument("--save-steps", type=int, default=500)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers (each reads its own row groups)"
    )
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU is present")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from teacher_farm.training import (
        ChunkedKDLoss,
        DistillationTrainer,
        SampledKDLoss,
        TopkDataset,
        TopkRenormKLLoss,
        TopkTailKLLoss,
        assert_same_tokenizer,
        default_kd_loss,
    )

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    assert_same_tokenizer(args.cache, tokenizer)  # the cache holds the teacher's token ids
    model = AutoModelForCausalLM.from_pretrained(args.student)

    # rank=0, world_size=1: under torchrun the Trainer gives each process its share of the batches.
    dataset = TopkDataset(
        args.cache, shuffle_shards=True, seed=args.seed, max_length=args.max_length, rank=0, world_size=1
    )
    kd = (
        {"tail": TopkTailKLLoss, "renorm": TopkRenormKLLoss, "sampled": SampledKDLoss}[args.loss]()
        if args.loss
        else default_kd_loss(dataset)
    )
    if args.chunks > 1:
        kd = ChunkedKDLoss(kd, num_output_chunks=args.chunks)

    training_args = TrainingArguments(
        output_dir=args.out,
        max_steps=args.max_steps,  # a streamed dataset has no length: the Trainer needs the steps
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine",
        logging_steps=args.logging_steps,
        save_strategy="steps",
        save_steps=args.save_steps,
        bf16=args.bf16,
        use_cpu=args.cpu,
        dataloader_num_workers=args.workers,
        remove_unused_columns=False,  # keep the teacher's targets in the batch (the trainer insists)
        report_to=[],
        seed=args.seed,
    )
    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        processing_class=tokenizer,
        kd_loss=kd,
        alpha=args.alpha,
    )
    trainer.train()
    trainer.save_model(args.out)
    if torch.distributed.is_initialized():  # under torchrun: leave before the interpreter tears down
        torch.distributed.destroy_process_group()
    logged = [entry for entry in trainer.state.log_history if "kd_loss" in entry or "ce_loss" in entry]
    last = logged[-1] if logged else {}
    losses = {key: last[key] for key in ("loss", "kd_loss", "ce_loss") if key in last}
    print(json.dumps({"step": trainer.state.global_step, **losses}))


if __name__ == "__main__":
    main()
