"""DistillationTrainer: the real transformers.Trainer distils a tiny student from a tiny teacher's cache.

The cache is the project's own: a random Llama teacher scores lines of the sample corpus with torch
(top-k, the next token's logprob and rank, seeded draws) and the rows go through the client's shard
writer and manifest, as ``teacher-farm cache`` writes them, without vLLM.
"""

from __future__ import annotations

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import torch.nn.functional as F  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments  # noqa: E402

from teacher_farm.schemas.arrow import (  # noqa: E402
    ScoredSequence,
    cache_schema,
    results_to_table,
    with_source_columns,
)
from teacher_farm.schemas.cache_dir import CacheIdentity  # noqa: E402
from teacher_farm.schemas.fingerprints import tokenizer_fingerprint  # noqa: E402
from teacher_farm.schemas.scoring import Scoring  # noqa: E402
from teacher_farm.server.tinymodel import make_tiny_model  # noqa: E402
from teacher_farm.training import (  # noqa: E402
    ChunkedKDLoss,
    DistillationTrainer,
    SampledKDLoss,
    TopkDataset,
    TopkRenormKLLoss,
    TopkTailKLLoss,
    collate_topk,
    default_kd_loss,
)
from tests.helpers import write_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "examples" / "sample.jsonl"
EXAMPLE = ROOT / "examples" / "distil_with_trainer.py"
VOCAB, K, N = 320, 8, 32
LINES, MAX_TOKENS, ROWS_PER_SHARD, ROWS_PER_GROUP = 24, 32, 12, 4
STEPS, ALPHA = 40, 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """A teacher and a smaller student: random Llamas sharing a tokenizer trained on the sample corpus."""
    root = tmp_path_factory.mktemp("models")
    teacher = make_tiny_model(
        root / "teacher", [SAMPLE], vocab_size=VOCAB, hidden_size=64, num_layers=1, num_heads=2
    )
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    # A random Llama's next-token distributions are nearly flat (entropy 5.5 nats of log 320 = 5.8);
    # a sharper output layer gives the teacher something to teach: entropy 3.4, its top-8 about 60%.
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    model.save_pretrained(teacher)
    config = model.config.to_dict() | {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
    }
    torch.manual_seed(1)
    student = root / "student"
    AutoModelForCausalLM.from_config(type(model.config).from_dict(config)).save_pretrained(student)
    tokenizer.save_pretrained(student)
    return teacher, student


def teacher_row(model, ids: list[int], rng: np.random.Generator) -> ScoredSequence:
    """What the server sends for one line: the teacher's top-k at every position, the next token's
    logprob and rank, and N draws per position (distinct ids ascending, with counts)."""
    with torch.no_grad():
        full = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1).numpy()
    n = len(ids)
    top = np.argsort(-full, axis=1, kind="stable")[:, :K]
    nxt = np.array(ids[1:])
    target = full[np.arange(n - 1), nxt]
    ranks = 1 + (full[: n - 1] > target[:, None]).sum(-1)
    lengths, sid, counts, slp = [], [], [], []
    for row in full:
        p = np.exp(row)
        drawn, count = np.unique(rng.choice(len(p), size=N, p=p / p.sum()), return_counts=True)
        lengths.append(len(drawn))
        sid.append(drawn)
        counts.append(count)
        slp.append(row[drawn])
    return ScoredSequence(
        id=None,
        input_ids=np.array(ids, np.int32),
        topk_ids=top.astype(np.int32),
        topk_logprobs=np.take_along_axis(full, top, 1).astype(np.float32),
        target_logprobs=target.astype(np.float32),
        target_ranks=ranks.astype(np.int32),
        sample_lengths=np.array(lengths, np.int32),
        sample_ids=np.concatenate(sid).astype(np.int32),
        sample_counts=np.concatenate(counts).astype(np.int16),
        sample_logprobs=np.concatenate(slp).astype(np.float32),
    )


def write_cache(out: Path, teacher_dir: Path, targets: str) -> Path:
    """LINES lines of the sample corpus scored by the teacher, ROWS_PER_SHARD to a shard, and the manifest."""
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines()[:LINES]]
    # Lengths from 14 to MAX_TOKENS, so batches have padding and micro-batches differ in tokens.
    token_ids = [tokenizer(t)["input_ids"][: 14 + 5 * i % (MAX_TOKENS - 13)] for i, t in enumerate(texts)]
    identity = CacheIdentity(
        model="teacher",
        model_fingerprint="tiny-teacher",
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        vocab_size=VOCAB,
        scoring=Scoring(k=K, targets=targets, samples=N, seed=0),
        logprob_dtype="float32",
    )
    schema = cache_schema("float32", targets).with_metadata(identity.metadata())
    rng = np.random.default_rng(0)
    out.mkdir(parents=True)
    shards = {}
    for j, first in enumerate(range(0, LINES, ROWS_PER_SHARD)):
        tables = []
        for start in range(first, first + ROWS_PER_SHARD, ROWS_PER_GROUP):
            lines = range(start, start + ROWS_PER_GROUP)
            table = results_to_table([teacher_row(model, token_ids[i], rng) for i in lines], K, targets)
            tables.append(with_source_columns(table, list(lines), [SAMPLE.name] * len(lines)).cast(schema))
        shards[j] = (range(first, first + ROWS_PER_SHARD), tables)
    write_shards(out, schema, shards, identity.entries())
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory, models) -> Path:
    return write_cache(tmp_path_factory.mktemp("caches") / "both", models[0], "both")


def arguments(out: Path, **overrides) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps",
        save_steps=STEPS,
        use_cpu=True,
        report_to=[],
        seed=0,
        disable_tqdm=True,
    )
    return TrainingArguments(**{**base, **overrides})


def student(models) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(models[1])


def first_batch(cache: Path, size: int = 4) -> dict[str, torch.Tensor]:
    items = iter(TopkDataset(cache))
    return collate_topk([next(items) for _ in range(size)])


def text_ce(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The next-token cross-entropy by hand: position i predicts token i+1, padding left out."""
    predicted, wanted = logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten()
    return F.cross_entropy(predicted, wanted, ignore_index=-100)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, models, cache):
    out = tmp_path_factory.mktemp("run")
    trainer = DistillationTrainer(
        model=student(models),
        args=arguments(out),
        train_dataset=TopkDataset(cache, shuffle_shards=True, seed=0),
        alpha=ALPHA,
    )
    trainer.train()
    return trainer, out


def test_the_kd_loss_falls_and_each_step_logs_both_parts(trained):
    trainer, _ = trained
    steps = [e for e in trainer.state.log_history if "kd_loss" in e]
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    kd = np.array([e["kd_loss"] for e in steps])
    assert kd[-5:].mean() < 0.8 * kd[:5].mean(), kd
    for e in steps:  # one micro-batch a step: the step's loss is the mix of the two parts logged
        assert e["loss"] == pytest.approx(
            ALPHA * e["kd_loss"] + (1 - ALPHA) * e["ce_loss"], rel=1e-3, abs=1e-4
        )


def test_a_checkpoint_with_the_trained_weights_is_saved(trained, cache):
    trainer, out = trained
    checkpoint = out / f"checkpoint-{STEPS}"
    assert (checkpoint / "model.safetensors").is_file()
    assert (checkpoint / "trainer_state.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    batch = first_batch(cache)
    trainer.model.eval()
    with torch.no_grad():
        want = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        got = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, want)


def test_on_the_whole_cache_the_trained_student_is_closer_to_the_teacher(trained, models, cache, tmp_path):
    trainer, _ = trained
    metrics = trainer.evaluate(eval_dataset=TopkDataset(cache))
    assert {"eval_loss", "eval_kd_loss", "eval_ce_loss"} <= set(metrics)
    # Three batches of 8: the Trainer's eval_loss weighs batches by their size, the parts equally.
    assert metrics["eval_loss"] == pytest.approx(
        ALPHA * metrics["eval_kd_loss"] + (1 - ALPHA) * metrics["eval_ce_loss"], rel=1e-5
    )
    untrained = DistillationTrainer(model=student(models), args=arguments(tmp_path), alpha=ALPHA)
    before = untrained.evaluate(eval_dataset=TopkDataset(cache))
    assert metrics["eval_kd_loss"] < 0.75 * before["eval_kd_loss"], (before, metrics)
    assert metrics["eval_ce_loss"] < before["eval_ce_loss"]
    assert {"val_kd_loss", "val_ce_loss"} <= set(
        trainer.evaluate(TopkDataset(cache), metric_key_prefix="val")
    )


def test_alpha_zero_is_the_students_own_cross_entropy(tmp_path, models, cache):
    model = student(models)
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), alpha=0.0)
    batch = first_batch(cache)
    assert (batch["attention_mask"] == 0).any(), (
        "the batch should have padding for the check to mean something"
    )
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, text_ce(logits, batch))


@pytest.mark.parametrize(
    "kd",
    [
        TopkTailKLLoss(),
        TopkRenormKLLoss(),
        SampledKDLoss(entropy=True),
        ChunkedKDLoss(TopkTailKLLoss(), 3),
    ],
    ids=["tail", "renorm", "sampled", "chunked"],
)
def test_alpha_one_is_the_kd_loss_on_the_same_logits(tmp_path, models, cache, kd):
    model = student(models)
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), kd_loss=kd, alpha=1.0)
    batch = first_batch(cache)
    loss = trainer.compute_loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(loss, kd(logits, batch))
    assert loss > 0.05  # a random student is far from the teacher: the equality is not 0 == 0


def test_num_items_in_batch_weighs_a_micro_batch_by_its_share_of_tokens(tmp_path, models, cache):
    model = student(models)
    trainer = DistillationTrainer(model=model, args=arguments(tmp_path), alpha=0.3)
    batch = first_batch(cache)
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    mixed = trainer.compute_loss(model, dict(batch))
    share = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(3 * tokens))
    torch.testing.assert_close(share, mixed / 3)


def test_gradient_accumulation_sums_micro_batches_by_their_tokens(tmp_path, models, cache):
    """One SGD step over two accumulated micro-batches moves every weight by lr times the gradient of
    sum_j mix_j * tokens_j / tokens: the Trainer neither divides the loss again nor weighs them equally."""
    model = student(models)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = arguments(
        tmp_path,
        max_steps=1,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        logging_steps=1,
        save_strategy="no",
    )
    DistillationTrainer(model=model, args=args, train_dataset=TopkDataset(cache), alpha=ALPHA).train()

    reference = student(models)
    kd = TopkTailKLLoss()
    items = iter(TopkDataset(cache))
    micro = [collate_topk([next(items) for _ in range(2)]) for _ in range(2)]
    tokens = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
    assert tokens[0] != tokens[1], "micro-batches of equal size would not tell the weighings apart"
    total = 0.0
    for b, n in zip(micro, tokens):
        out = reference(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        mix = ALPHA * kd(out.logits, b) + (1 - ALPHA) * text_ce(out.logits, b)
        total = total + mix * n / sum(tokens)
    total.backward()
    for name, p in reference.named_parameters():
        step = before[name] - dict(model.named_parameters())[name].detach()
        torch.testing.assert_close(step, p.grad, rtol=1e-3, atol=1e-6, msg=name)


#: Run under torchrun by the test below: one epoch on two processes; each writes the lines it trained
#: on, and why a first trainer was refused, to files of its own (their prints would interleave).
TWO_PROCESSES = """
import json, os, sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, TrainingArguments
from teacher_farm.training import DistillationTrainer, TopkDataset

cache, student, out = sys.argv[1:]
rank = os.environ["RANK"]
seen = []

class Recording(DistillationTrainer):
    def compute_loss(self, model, inputs, *args, **kwargs):
        seen.extend(inputs["line"].tolist())
        return super().compute_loss(model, inputs, *args, **kwargs)

args = TrainingArguments(out, max_steps=6, per_device_train_batch_size=2, use_cpu=True, report_to=[],
                         save_strategy="no", disable_tqdm=True)
model = AutoModelForCausalLM.from_pretrained(student)
try:
    Recording(model=model, args=args, train_dataset=TopkDataset(cache)).train()
except ValueError as exc:
    Path(out, f"refused-{rank}.txt").write_text(str(exc))
Recording(model=model, args=args, train_dataset=TopkDataset(cache, rank=0, world_size=1)).train()
Path(out, f"lines-{rank}.json").write_text(json.dumps(seen))
torch.distributed.destroy_process_group()  # gloo's threads can abort the interpreter's exit otherwise
"""


def test_under_torchrun_each_process_trains_on_its_own_share_of_the_cache(tmp_path, models, cache):
    """Two processes, 6 steps of 2 sequences each: one epoch of the 24 lines, each line once. A
    TopkDataset that deals the cache to the ranks itself is refused (the Trainer already splits it)."""
    script, out = tmp_path / "two_processes.py", tmp_path / "out"
    script.write_text(TWO_PROCESSES)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(cache),
            str(models[1]),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for rank in (0, 1):
        assert "rank=0, world_size=1" in (out / f"refused-{rank}.txt").read_text()
    lines = [json.loads((out / f"lines-{rank}.json").read_text()) for rank in (0, 1)]
    assert lines[0] and lines[1]
    assert sorted(lines[0] + lines[1]) == list(range(LINES))


def test_the_teachers_targets_reach_compute_loss_even_with_remove_unused_columns(tmp_path, models, cache):
    trainer = DistillationTrainer(
        model=student(models),
        args=arguments(tmp_path, remove_unused_columns=True),
        train_dataset=TopkDataset(cache),
    )
    assert trainer.args.remove_unused_columns is False
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"topk_ids", "topk_logprobs", "tail_logprob", "sample_ids", "sample_counts", "temperature"} <= set(
        batch
    )


def test_the_default_loss_follows_the_caches_targets(tmp_path, models, cache):
    sampled = write_cache(tmp_path / "sampled", models[0], "sampled")
    assert type(default_kd_loss(TopkDataset(cache))) is TopkTailKLLoss
    trainer = DistillationTrainer(
        model=student(models), args=arguments(tmp_path / "run"), train_dataset=TopkDataset(sampled)
    )
    assert type(trainer.kd_loss) is SampledKDLoss
    batch = first_batch(sampled)
    assert "topk_ids" not in batch
    assert math.isfinite(trainer.compute_loss(trainer.model, dict(batch)).item())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 1.5}, "in \\[0, 1\\]"),
        ({"compute_loss_func": lambda outputs, labels, num_items_in_batch: 0}, "pass kd_loss="),
    ],
)
def test_a_misconfigured_trainer_says_what_to_do(tmp_path, models, kwargs, message):
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(model=student(models), args=arguments(tmp_path), **kwargs)


def test_the_training_package_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import teacher_farm.training as t\n"
        "assert t.shard_paths\n"
        "try:\n    t.DistillationTrainer\nexcept ImportError as exc:\n    print(exc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pip install 'teacher-farm[trainer]'" in proc.stdout


def test_the_example_distils_and_saves(tmp_path, models, cache, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(
        sys,
        "argv",
        [
            str(EXAMPLE),
            "--cache",
            str(cache),
            "--student",
            str(models[1]),
            "--out",
            str(out),
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--lr",
            "3e-3",
            "--save-steps",
            "3",
            "--logging-steps",
            "1",
            "--workers",
            "0",
            "--cpu",
            "--chunks",
            "2",
        ],
    )
    runpy.run_path(
        str(EXAMPLE), run_name="__main__"
    )  # as `python examples/distil_with_trainer.py ...` runs it
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 3 and summary["kd_loss"] > 0 and summary["ce_loss"] > 0
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
