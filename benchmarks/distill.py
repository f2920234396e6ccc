"""Which targets train a student best? A small, seeded distillation experiment on the CPU.

1. Cut local text (this Python's standard library sources) into documents, train a BPE tokenizer
   and a tiny Llama teacher on the training part (300 steps, a few minutes: a random-weight teacher
   is nearly uniform and would hide every difference between targets).
2. Cache the teacher's targets for the training documents through the real ``teacher-farm cache
   --model`` path (in-process vLLM engine): top-k (k=16) and sampled (N=64) in one cache.
3. Train the same tiny student, from the same initialisation and on the same batches, each way: no
   KD (cross-entropy on the text), full-distribution KD (the teacher run online, every logit: the
   reference), top-k with the tail term, top-k renormalised, and sampled targets.
4. On held-out documents print the student's cross-entropy on the text, its KL(teacher || student)
   over the full vocabulary, its expected calibration error (top-1, 15 bins) and the cache's bytes
   per token for the targets each way needs.

    python benchmarks/distill.py --out /tmp/distill --seed 0   # about 10 minutes on 2 CPU cores

With ``--teacher DIR`` (a pretrained teacher, e.g. ``teacher-farm make-smollm2``'s SmolLM2-135M-Instruct)
the same arms run on the real teacher instead: the corpus is ``real_corpus.py``'s (every
``--train-every``-th document cached, its held-out part evaluated), the caches are made once into
``--data`` (through ``--server URL``, else an in-process engine) and reused by every later run, and
full-distribution KD reads the teacher's whole distribution at every training position, computed once
with transformers (float32, stored in float16) rather than asked of a server at every step: the teacher
is frozen, so an online teacher would send the same values. The students share the teacher's
tokenizer (a small Llama from scratch, ``--student-hidden`` / ``--student-layers``) and train on the
first ``--train-rows`` cached documents, every arm on the same tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from teacher_farm.training import (
    SampledKDLoss,
    TopkDataset,
    TopkRenormKLLoss,
    TopkTailKLLoss,
    assert_same_tokenizer,
    collate_topk,
    shard_paths,
)

SEQ = 128  # tokens per document (the cache's --max-length)
PAD = 0


def documents(seed: int, train_chars: int, heldout_chars: int) -> tuple[list[str], list[str]]:
    """Chunks of ~450 characters (about SEQ tokens) of standard-library sources, split by file."""
    files = sorted(Path(os.__file__).parent.glob("*.py"))
    np.random.default_rng(seed).shuffle(files)
    train, heldout = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        chunks, cur = [], ""
        for line in text.splitlines(keepends=True):
            cur += line
            if len(cur) >= 450:
                chunks.append(cur)
                cur = ""
        target = heldout if sum(map(len, heldout)) < heldout_chars else train
        target.extend(c for c in chunks if c.strip())
        if sum(map(len, train)) >= train_chars:
            break
    return train, heldout


def tokenize(tokenizer, docs: list[str], max_length: int = SEQ) -> list[torch.Tensor]:
    enc = tokenizer(docs, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return [torch.tensor(x, dtype=torch.long) for x in enc if len(x) > 1]


def pad(seqs: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return {"input_ids": ids, "attention_mask": mask}


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of position t's logits on token t+1, over real pairs."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100
    )


def train_teacher(model_dir: Path, train: list[str], steps: int, seed: int) -> dict:
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    seqs = tokenize(tok, train)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    # A fixed number of steps, not of seconds: the same teacher however busy the machine is.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps)
    )
    t0, losses = time.monotonic(), []
    while len(losses) < steps:
        order = rng.permutation(len(seqs))
        for start in range(0, len(seqs) - 31, 32):
            if len(losses) == steps:
                break
            b = pad([seqs[i] for i in order[start : start + 32]])
            loss = next_token_ce(model(**b).logits, b["input_ids"], b["attention_mask"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
    model.eval().save_pretrained(model_dir, safe_serialization=True)
    return {"steps": steps, "final_train_ce": float(np.mean(losses[-20:])), "seconds": time.monotonic() - t0}


def in_process(model_dir: Path, gpu_memory_utilization: float = 0.2) -> list[str]:
    """The ``teacher-farm cache`` flags of an in-process engine on ``model_dir``."""
    return [
        "--model",
        str(model_dir),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--gpu-memory-utilization",
        str(gpu_memory_utilization),
        "--max-model-len",
        "1024",
    ]


def run_cache(
    model_dir: Path,
    train: list[str],
    out: Path,
    k: int,
    samples: int,
    seed: int,
    logprob_dtype: str = "float16",
    targets: str = "both",
    positions: str = "all",
) -> float:
    """The toy mode's caches: the training documents through an in-process engine."""
    src = out.parent / "train.jsonl"
    src.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(train)))
    return score(in_process(model_dir), src, out, k, samples, seed, logprob_dtype, targets, positions, SEQ)


def score(
    teacher_flags: list[str],
    src: Path,
    out: Path,
    k: int,
    samples: int,
    seed: int,
    logprob_dtype: str,
    targets: str,
    positions: str,
    max_length: int,
) -> float:
    """``teacher-farm cache`` of ``src`` into ``out`` (resumed) by an engine or ``--server``; its seconds."""
    cmd = [
        sys.executable,
        "-m",
        "teacher_farm.cli",
        "cache",
        *teacher_flags,
        "--input",
        str(src),
        "--out",
        str(out),
        "--k",
        str(k),
        "--targets",
        targets,
        "--samples",
        str(samples),
        "--seed",
        str(seed),
        "--max-length",
        str(max_length),
        "--logprob-dtype",
        logprob_dtype,
        "--positions",
        positions,
    ]
    t0 = time.monotonic()
    for attempt in (1, 2):  # an engine start can fail on a busy shared machine (memory); the cache resumes
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            return time.monotonic() - t0
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        print(f"teacher-farm cache failed (attempt {attempt}): {errors[:5]}", flush=True)
    raise SystemExit(f"teacher-farm cache failed:\n{proc.stderr[-4000:]}")


def bytes_per_token(cache: Path) -> dict[str, float]:
    """Compressed bytes per token of the columns each kind of cache holds (one 'both' cache, split)."""
    common = {"id", "line", "input_ids", "target_logprobs", "target_ranks"}
    sizes: dict[str, int] = {}
    tokens = 0
    for path in shard_paths(cache):
        meta = pq.ParquetFile(path).metadata
        for rg in range(meta.num_row_groups):
            g = meta.row_group(rg)
            for c in range(g.num_columns):
                name = g.column(c).path_in_schema.split(".")[0]
                sizes[name] = sizes.get(name, 0) + g.column(c).total_compressed_size
        tokens += sum(len(x) for x in pq.read_table(path, columns=["input_ids"]).column(0).to_pylist())
    base = sum(v for k, v in sizes.items() if k in common)
    # Whatever columns the cache's format stores for each kind (see schemas/formats.py).
    topk = base + sum(v for k, v in sizes.items() if k.startswith("topk_"))
    sampled = base + sum(v for k, v in sizes.items() if k.startswith("sample_"))
    return {"topk": topk / tokens, "sampled": sampled / tokens, "text_only": base / tokens}


def make_student(
    vocab: int, bos: int, eos: int, seed: int, hidden: int = 64, layers: int = 2, max_positions: int = SEQ
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        max_position_embeddings=max_positions,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).to(torch.float32)


def full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(teacher || student) over the whole vocabulary at every real position."""
    p = F.log_softmax(teacher_logits.float(), -1)
    q = F.log_softmax(student_logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    m = mask.bool()
    return kl[m].mean()


def kd_where_kept_ce_elsewhere(kd, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Token-selective KD: the KD loss at the positions the cache kept,
    the text's cross-entropy at the others."""
    real = batch["attention_mask"].bool()
    kept = batch["kept_mask"] & real
    n_kd = kept.sum()
    kd_sum = kd(logits, batch) * n_kd  # the loss is the mean over the kept positions
    # Position t predicts token t+1: its cross-entropy counts where t is real, not kept, and t+1 exists.
    other = real[:, :-1] & real[:, 1:] & ~kept[:, :-1]
    labels = batch["input_ids"][:, 1:].masked_fill(~other, -100)
    ce_sum = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return (kd_sum + ce_sum) / (n_kd + other.sum()).clamp_min(1)


def train_student(method: str, items: list[dict], teacher, args, vocab: int, bos: int, eos: int) -> tuple:
    student = make_student(
        vocab, bos, eos, args.seed, args.student_hidden, args.student_layers, args.max_length
    ).train()
    opt = torch.optim.AdamW(student.parameters(), lr=args.student_lr, weight_decay=0.01)
    losses = {"topk_tail": TopkTailKLLoss(), "topk_renorm": TopkRenormKLLoss(), "sampled": SampledKDLoss()}
    # The compact and position-rule rows train with the loss of their kind, on their own cache's items.
    losses |= {
        "topk_tail_compact": losses["topk_tail"],
        "sampled_compact": losses["sampled"],
        "sampled_entropy": losses["sampled"],
    }
    steps_per_epoch = -(-len(items) // args.batch_size)
    total = steps_per_epoch * args.epochs
    warm = args.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / total)
    )
    t0 = time.monotonic()
    for epoch in range(args.epochs):
        order = np.random.default_rng([args.seed, epoch]).permutation(len(items))
        for start in range(0, len(items), args.batch_size):
            batch = collate_topk([items[i] for i in order[start : start + args.batch_size]], PAD)
            logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            if method == "no_kd":
                loss = next_token_ce(logits, batch["input_ids"], batch["attention_mask"])
            elif method == "full_kd":
                with torch.no_grad():
                    t_logits = teacher(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                loss = full_kl(t_logits, logits, batch["attention_mask"])
            elif method == "sampled_entropy_ce":
                loss = kd_where_kept_ce_elsewhere(losses["sampled"], logits, batch)
            else:
                loss = losses[method](logits, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
    return student.eval(), time.monotonic() - t0


@torch.no_grad()
def evaluate(model, teacher, heldout: list[torch.Tensor], batch: int = 32) -> dict[str, float]:
    """Cross-entropy on the text, full-vocabulary KL(teacher || model), top-1 ECE (15 bins)."""
    ce_sum = kl_sum = 0.0
    n_ce = n_kl = 0
    conf, correct = [], []
    for start in range(0, len(heldout), batch):
        b = pad(heldout[start : start + batch])
        ids, mask = b["input_ids"], b["attention_mask"]
        logits = model(**b).logits.float()
        t_logits = teacher(**b).logits.float()
        lq = F.log_softmax(logits, -1)
        pair = (mask[:, 1:] * mask[:, :-1]).bool()
        nll = -lq[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        ce_sum += nll[pair].sum().item()
        n_ce += int(pair.sum())
        lp = F.log_softmax(t_logits, -1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        m = mask.bool()
        kl_sum += kl[m].sum().item()
        n_kl += int(m.sum())
        top_p, top_i = lq[:, :-1].exp().max(-1)
        conf.append(top_p[pair])
        correct.append((top_i == ids[:, 1:])[pair].float())
    conf_t, correct_t = torch.cat(conf), torch.cat(correct)
    edges = torch.linspace(0, 1, 16)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf_t > lo) & (conf_t <= hi)
        if sel.any():
            ece += sel.float().mean().item() * abs(conf_t[sel].mean().item() - correct_t[sel].mean().item())
    return {"ce": ce_sum / n_ce, "kl": kl_sum / n_kl, "ece": ece}


class CachedTeacher:
    """The teacher's full distributions, computed once: answers ``(input_ids, attention_mask)`` as a model.

    Each real sequence is looked up by its tokens; the logits it answers are the teacher's float16
    log-probabilities (log_softmax of them is themselves), zeros on padding.
    """

    def __init__(self, seqs: list[torch.Tensor], logprobs: np.ndarray) -> None:
        starts = np.concatenate([[0], np.cumsum([len(s) for s in seqs])])
        self.rows = {key(s): (int(a), int(b)) for s, a, b in zip(seqs, starts[:-1], starts[1:])}
        self.logprobs = logprobs

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        out = torch.zeros((*input_ids.shape, self.logprobs.shape[1]), dtype=torch.float32)
        for i, n in enumerate(attention_mask.sum(-1).tolist()):
            a, b = self.rows[key(input_ids[i, :n])]
            out[i, :n] = torch.from_numpy(np.asarray(self.logprobs[a:b], dtype=np.float32))
        return SimpleNamespace(logits=out)


def key(seq: torch.Tensor) -> bytes:
    return seq.to(torch.int64).numpy().tobytes()


@torch.no_grad()
def full_logprobs(model_dir: Path, seqs: list[torch.Tensor], path: Path, batch: int = 4) -> np.ndarray:
    """The teacher's log_softmax over its whole vocabulary at every position of ``seqs``, in float16.

    Computed once with transformers in float32 and kept at ``path`` (a memory map, with the tokens'
    digest beside it), so a rerun with the same tokens reads it back instead.
    """
    from transformers import LlamaForCausalLM

    digest = hashlib.sha256(b"".join(key(s) for s in seqs)).hexdigest()
    meta = path.with_suffix(".json")
    n = sum(len(s) for s in seqs)
    if meta.exists() and json.loads(meta.read_text()).get("tokens_sha256") == digest:
        vocab = json.loads(meta.read_text())["vocab"]
        return np.memmap(path, dtype=np.float16, mode="r", shape=(n, vocab))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    out = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, vocab))
    t0, row = time.monotonic(), 0
    for start in range(0, len(seqs), batch):
        b = pad(seqs[start : start + batch])
        lp = F.log_softmax(model(**b).logits.float(), -1)
        for i, length in enumerate(b["attention_mask"].sum(-1).tolist()):
            out[row : row + length] = lp[i, :length].numpy().astype(np.float16)
            row += length
    out.flush()
    secs = time.monotonic() - t0
    meta.write_text(json.dumps({"tokens_sha256": digest, "vocab": vocab, "tokens": n, "seconds": secs}))
    print(f"teacher's full distributions: {n} positions in {secs:.0f} s -> {path}", flush=True)
    return np.memmap(path, dtype=np.float16, mode="r", shape=(n, vocab))


def same_draws(a: list[dict], b: list[dict]) -> bool:
    """Whether two caches' items hold the same tokens and the same draws (ids and counts)."""
    names = ("input_ids", "sample_ids", "sample_counts")
    return len(a) == len(b) and all(torch.equal(x[n], y[n]) for x, y in zip(a, b) for n in names)


def cache_is_complete(out: Path) -> bool:
    from teacher_farm.client.inspect import inspect_cache

    if not (out / "manifest.json").exists():
        return False
    return not inspect_cache(out)[1]


def real_teacher(args) -> tuple[dict, dict, dict, int]:
    """The real-teacher mode: a pretrained teacher, a real corpus, caches kept in ``--data``."""
    from transformers import AutoTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import real_corpus

    data: Path = args.data or args.out
    data.mkdir(parents=True, exist_ok=True)
    every, held_path = data / "corpus.jsonl", data / "held-out.jsonl"
    real_corpus.write(every, held_path)
    src = data / "train.jsonl"
    lines = every.read_text(encoding="utf-8").splitlines(keepends=True)[:: args.train_every]
    if not src.exists() or src.read_text(encoding="utf-8") != "".join(lines):
        src.write_text("".join(lines), encoding="utf-8")
    flags = ["--server", args.server] if args.server else in_process(args.teacher, 0.08)
    flags += ["--concurrency", "2"]
    methods = args.methods.split(",")
    caches = {"f16": (args.logprob_dtype, "both", "all")}
    if {"topk_tail_compact", "sampled_compact"} & set(methods):
        caches["compact"] = (args.compact, "both", "all")
    if {"sampled_entropy", "sampled_entropy_ce"} & set(methods):
        caches["entropy"] = (args.compact, "sampled", f"entropy:{args.entropy_share:g}")
    per_token, items_of_cache, cache_s = {}, {}, {}
    for name, (fmt, targets, positions) in caches.items():
        out = data / f"cache-{name}" if name != "f16" else data / f"cache-{fmt}"
        if not cache_is_complete(out):
            cache_s[name] = score(
                flags, src, out, args.k, args.samples, 0, fmt, targets, positions, args.max_length
            )
            print(f"{out.name}: scored in {cache_s[name]:.0f} s", flush=True)
        items_of_cache[name] = list(TopkDataset(out, shuffle_shards=False))[: args.train_rows]
        per_token[name] = bytes_per_token(out)
        print(f"{out.name}: {len(items_of_cache[name])} rows, bytes/token {per_token[name]}", flush=True)
    tok = AutoTokenizer.from_pretrained(args.teacher)
    assert_same_tokenizer(data / f"cache-{args.logprob_dtype}", tok)

    items = items_of_cache["f16"]
    train_seqs = [it["input_ids"] for it in items]
    held_texts = [json.loads(line)["text"] for line in held_path.read_text(encoding="utf-8").splitlines()]
    held = tokenize(tok, held_texts, args.max_length)
    teacher_train = CachedTeacher(
        train_seqs, full_logprobs(args.teacher, train_seqs, data / "teacher-train.f16")
    )
    teacher_held = CachedTeacher(held, full_logprobs(args.teacher, held, data / "teacher-held-out.f16"))

    results = {"teacher": evaluate(teacher_held, teacher_held, held, args.eval_batch)}
    earlier = args.out / "results.json"
    if args.reuse and earlier.exists():
        results = json.loads(earlier.read_text())["results"] | results
    cost = {
        "no_kd": None,
        "full_kd": None,
        "topk_tail": per_token["f16"]["topk"],
        "topk_renorm": per_token["f16"]["topk"],
        "sampled": per_token["f16"]["sampled"],
    }
    items_of = dict.fromkeys(methods, items)
    if "compact" in caches:
        cost |= {
            "topk_tail_compact": per_token["compact"]["topk"],
            "sampled_compact": per_token["compact"]["sampled"],
        }
        items_of |= {m: items_of_cache["compact"] for m in ("topk_tail_compact", "sampled_compact")}
    if "entropy" in caches:
        cost["sampled_entropy"] = cost["sampled_entropy_ce"] = per_token["entropy"]["sampled"]
        items_of |= {m: items_of_cache["entropy"] for m in ("sampled_entropy", "sampled_entropy_ce")}
    for method in methods:
        if method == "sampled_compact" and "sampled" in results and same_draws(items, items_of[method]):
            # SampledKDLoss reads only the draws' ids and counts: the same student, trained again for nothing.
            results[method] = results["sampled"] | {
                "bytes_per_token": cost[method],
                "same_draws_as": "sampled",
            }
            print(f"{method}: the same draws as the float16 cache (checked), so the same student", flush=True)
            continue
        student, secs = train_student(
            method, items_of[method], teacher_train, args, len(tok), tok.bos_token_id, tok.eos_token_id
        )
        results[method] = {
            **evaluate(student, teacher_held, held, args.eval_batch),
            "bytes_per_token": cost[method],
            "train_s": secs,
        }
        print(f"{method}: {results[method]}", flush=True)
    facts = {
        "teacher": Path(args.teacher).name,
        "train_tokens": sum(map(len, train_seqs)),
        "held_out_tokens": sum(map(len, held)),
        "cache_seconds": cache_s,
    }
    return results, per_token, facts, len(tok)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="working directory (teacher, cache, results.json)")
    p.add_argument("--seed", type=int, default=0, help="toy mode: everything; real mode: the student's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-chars", type=int, default=700_000)
    p.add_argument("--heldout-chars", type=int, default=60_000)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps of 32 documents")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--student-lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20, help="the students' warm-up steps")
    p.add_argument("--student-hidden", type=int, default=64)
    p.add_argument("--student-layers", type=int, default=2)
    p.add_argument(
        "--max-length", type=int, default=SEQ, help="tokens per document (the cache's --max-length)"
    )
    p.add_argument("--eval-batch", type=int, default=32, help="held-out documents per evaluation batch")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument(
        "--logprob-dtype", default="float16", help="the cache's format (teacher-farm cache --logprob-dtype)"
    )
    p.add_argument(
        "--methods",
        default="no_kd,full_kd,topk_tail,topk_renorm,sampled,topk_tail_compact,sampled_compact,"
        "sampled_entropy,sampled_entropy_ce",
    )
    p.add_argument("--compact", default="uint8-gap", help="the compact rows' format")
    p.add_argument(
        "--entropy-share", type=float, default=0.25, help="F of the entropy:F rows (sampled targets)"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="keep the teacher, caches and results of an earlier run in --out; run only --methods",
    )
    real = p.add_argument_group("real teacher (instead of the toy one trained here)")
    real.add_argument("--teacher", type=Path, help="a pretrained teacher's directory (e.g. make-smollm2's)")
    real.add_argument(
        "--data",
        type=Path,
        help="where the corpus, caches and teacher distributions are kept (default --out)",
    )
    real.add_argument("--server", help="score through this running teacher-farm serve (else in process)")
    real.add_argument("--train-every", type=int, default=2, help="cache every n-th corpus document")
    real.add_argument("--train-rows", type=int, help="the students train on the first n cached documents")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.teacher is not None:
        results, per_token, facts, vocab = real_teacher(args)
        report(args, results, per_token, vocab, facts)
        return

    from transformers import AutoTokenizer, LlamaForCausalLM

    from teacher_farm.server.tinymodel import make_tiny_model

    train, heldout = documents(args.seed, args.train_chars, args.heldout_chars)
    corpus = args.out / "corpus.txt"
    corpus.write_text("\n".join(train))
    model_dir = args.out / "teacher"
    if not (args.reuse and (args.out / "teacher-training.json").exists()):
        make_tiny_model(
            model_dir,
            [corpus],
            vocab_size=args.vocab,
            hidden_size=128,
            num_layers=2,
            num_heads=2,
            max_position_embeddings=1024,
            seed=args.seed,
        )
    print(
        f"{len(train)} training and {len(heldout)} held-out documents; training the teacher "
        f"for {args.teacher_steps} steps",
        flush=True,
    )
    trained = args.out / "teacher-training.json"
    if args.reuse and trained.exists():  # the same seed's teacher and caches, from an earlier run
        teacher_stats = json.loads(trained.read_text())
    else:
        teacher_stats = train_teacher(model_dir, train, args.teacher_steps, args.seed)
        trained.write_text(json.dumps(teacher_stats))
    print(f"teacher: {teacher_stats}", flush=True)

    cache = args.out / "cache"
    cache_s = run_cache(model_dir, train, cache, args.k, args.samples, args.seed, args.logprob_dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert_same_tokenizer(cache, tok)
    items = list(TopkDataset(cache))
    print(f"cache: {len(items)} rows in {cache_s:.0f} s (engine start included)", flush=True)

    teacher = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    held = tokenize(tok, heldout)
    results = {"teacher": evaluate(teacher, teacher, held)}
    earlier = args.out / "results.json"
    if args.reuse and earlier.exists():
        results = json.loads(earlier.read_text())["results"] | results
    per_token = bytes_per_token(cache)
    cost = {
        "no_kd": None,
        "full_kd": None,
        "topk_tail": per_token["topk"],
        "topk_renorm": per_token["topk"],
        "sampled": per_token["sampled"],
    }
    methods = args.methods.split(",")
    items_of = dict.fromkeys(methods, items)
    if {"topk_tail_compact", "sampled_compact"} & set(methods):
        compact = args.out / "cache-compact"
        secs = run_cache(model_dir, train, compact, args.k, args.samples, args.seed, args.compact)
        compact_items = list(TopkDataset(compact))
        per_token["compact"] = bytes_per_token(compact)
        cost |= {
            "topk_tail_compact": per_token["compact"]["topk"],
            "sampled_compact": per_token["compact"]["sampled"],
        }
        items_of |= {"topk_tail_compact": compact_items, "sampled_compact": compact_items}
        print(f"{args.compact} cache: {per_token['compact']} in {secs:.0f} s", flush=True)
    if {"sampled_entropy", "sampled_entropy_ce"} & set(methods):
        thin = args.out / "cache-entropy"
        secs = run_cache(
            model_dir,
            train,
            thin,
            args.k,
            args.samples,
            args.seed,
            args.compact,
            targets="sampled",
            positions=f"entropy:{args.entropy_share:g}",
        )
        items_of["sampled_entropy"] = items_of["sampled_entropy_ce"] = list(TopkDataset(thin))
        per_token["entropy"] = bytes_per_token(thin)
        cost["sampled_entropy"] = cost["sampled_entropy_ce"] = per_token["entropy"]["sampled"]
        print(f"entropy:{args.entropy_share:g} cache: {per_token['entropy']} in {secs:.0f} s", flush=True)
    for method in methods:
        student, secs = train_student(
            method, items_of[method], teacher, args, len(tok), tok.bos_token_id, tok.eos_token_id
        )
        results[method] = {
            **evaluate(student, teacher, held),
            "bytes_per_token": cost[method],
            "train_s": secs,
        }
        print(f"{method}: {results[method]}", flush=True)
    report(args, results, per_token, len(tok), {"teacher_training": teacher_stats})


def report(args, results: dict, per_token: dict, vocab: int, facts: dict) -> None:
    """Print the table and write ``results.json`` (what ``distill_plot.py`` reads)."""
    names = {
        "teacher": "the teacher itself",
        "no_kd": "no KD (cross-entropy on the text)",
        "full_kd": "full-distribution KD, online (reference)"
        if args.teacher is None
        else "full-distribution KD (reference; the whole distribution, computed once)",
        "topk_tail": f"top-k k={args.k}, with tail",
        "topk_renorm": f"top-k k={args.k}, renormalised",
        "sampled": f"sampled N={args.samples}",
        "topk_tail_compact": f"top-k k={args.k}, with tail, {args.compact}",
        "sampled_compact": f"sampled N={args.samples}, {args.compact}",
        "sampled_entropy": f"sampled N={args.samples}, {args.compact}, entropy:{args.entropy_share:g}",
        "sampled_entropy_ce": f"sampled N={args.samples}, {args.compact}, entropy:{args.entropy_share:g}, "
        "text CE at the other positions",
    }
    full_bytes = vocab * 2  # the whole vocabulary at float16, were it cached
    print(
        f"\n{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {args.threads} threads; {facts}\n"
    )
    print("| targets | held-out CE (nats) | KL(teacher ‖ student), full vocab | ECE | cache bytes/token |")
    print("|---|---|---|---|---|")
    for key, r in results.items():
        b = r.get("bytes_per_token")
        b = (
            f"{b:.1f}"
            if b is not None
            else (f"(online; {full_bytes} if cached)" if key == "full_kd" else "-")
        )
        print(f"| {names[key]} | {r['ce']:.3f} | {r['kl']:.3f} | {r['ece']:.3f} | {b} |")
    (args.out / "results.json").write_text(
        json.dumps(
            {"results": results, "names": names, "bytes_per_token": per_token, "args": vars(args), **facts},
            default=str,
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
